//! Owning wrappers for the libnftnl objects we allocate: each frees its object in `Drop`, so
//! no path (an early return, a `?`, a panic) frees by hand or leaks. Iterators borrow the
//! object they walk, which therefore outlives them.

use super::alloc;
use nftnl::nftnl_sys as sys;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// An `nftnl_table`.
pub(super) struct OwnedTable(NonNull<sys::nftnl_table>);

impl OwnedTable {
    pub fn new() -> OwnedTable {
        // SAFETY: the allocator takes no arguments; `alloc` aborts on NULL.
        OwnedTable(alloc(unsafe { sys::nftnl_table_alloc() }))
    }

    pub fn as_ptr(&self) -> *mut sys::nftnl_table {
        self.0.as_ptr()
    }
}

impl Drop for OwnedTable {
    fn drop(&mut self) {
        // SAFETY: we allocated the table in `new`, own it alone, and free it once, here.
        unsafe { sys::nftnl_table_free(self.0.as_ptr()) }
    }
}

/// An `nftnl_chain`.
pub(super) struct OwnedChain(NonNull<sys::nftnl_chain>);

impl OwnedChain {
    pub fn new() -> OwnedChain {
        // SAFETY: the allocator takes no arguments; `alloc` aborts on NULL.
        OwnedChain(alloc(unsafe { sys::nftnl_chain_alloc() }))
    }

    pub fn as_ptr(&self) -> *mut sys::nftnl_chain {
        self.0.as_ptr()
    }
}

impl Drop for OwnedChain {
    fn drop(&mut self) {
        // SAFETY: we allocated the chain in `new`, own it alone, and free it once, here.
        unsafe { sys::nftnl_chain_free(self.0.as_ptr()) }
    }
}

/// An `nftnl_set`, with the elements added to it (libnftnl frees those with the set).
pub(super) struct OwnedSet(NonNull<sys::nftnl_set>);

impl OwnedSet {
    pub fn new() -> OwnedSet {
        // SAFETY: the allocator takes no arguments; `alloc` aborts on NULL.
        OwnedSet(alloc(unsafe { sys::nftnl_set_alloc() }))
    }

    pub fn as_ptr(&self) -> *mut sys::nftnl_set {
        self.0.as_ptr()
    }

    /// Its elements, in order.
    pub fn elems(&self) -> SetElemsIter<'_> {
        // SAFETY: `self` is a live set; `alloc` aborts on NULL (malloc failure).
        let it = alloc(unsafe { sys::nftnl_set_elems_iter_create(self.as_ptr()) });
        SetElemsIter {
            it,
            _set: PhantomData,
        }
    }
}

impl Drop for OwnedSet {
    fn drop(&mut self) {
        // SAFETY: we allocated the set in `new`, own it alone, and free it once, here (with the
        // elements it owns).
        unsafe { sys::nftnl_set_free(self.0.as_ptr()) }
    }
}

/// An `nftnl_rule`, with its expressions (libnftnl frees those with the rule).
pub(super) struct OwnedRule(NonNull<sys::nftnl_rule>);

impl OwnedRule {
    pub fn new() -> OwnedRule {
        // SAFETY: the allocator takes no arguments; `alloc` aborts on NULL.
        OwnedRule(alloc(unsafe { sys::nftnl_rule_alloc() }))
    }

    pub fn as_ptr(&self) -> *mut sys::nftnl_rule {
        self.0.as_ptr()
    }

    /// Its expressions, in order.
    pub fn exprs(&self) -> ExprIter<'_> {
        // SAFETY: `self` is a live rule; `alloc` aborts on NULL (malloc failure).
        let it = alloc(unsafe { sys::nftnl_expr_iter_create(self.as_ptr()) });
        ExprIter {
            it,
            _rule: PhantomData,
        }
    }
}

impl Drop for OwnedRule {
    fn drop(&mut self) {
        // SAFETY: we allocated the rule in `new`, own it alone, and free it once, here (with the
        // expressions it owns).
        unsafe { sys::nftnl_rule_free(self.0.as_ptr()) }
    }
}

/// A user-data buffer (TLVs for an object's `USERDATA` attribute, which copies it).
pub(super) struct UdataBuf(NonNull<sys::nftnl_udata_buf>);

impl UdataBuf {
    /// A buffer with room for `size` bytes of TLVs.
    pub fn new(size: u32) -> UdataBuf {
        // SAFETY: allocates a buffer of `size` bytes; `alloc` aborts on NULL.
        UdataBuf(alloc(unsafe { sys::nftnl_udata_buf_alloc(size) }))
    }

    pub fn as_ptr(&self) -> *mut sys::nftnl_udata_buf {
        self.0.as_ptr()
    }
}

impl Drop for UdataBuf {
    fn drop(&mut self) {
        // SAFETY: we allocated the buffer in `new`, own it alone, and free it once, here.
        unsafe { sys::nftnl_udata_buf_free(self.0.as_ptr()) }
    }
}

/// libnftnl's iterator over a rule's expressions. The expressions it yields belong to the
/// rule, which the iterator borrows: they stay valid while the rule is borrowed.
pub(super) struct ExprIter<'r> {
    it: NonNull<sys::nftnl_expr_iter>,
    _rule: PhantomData<&'r OwnedRule>,
}

impl Iterator for ExprIter<'_> {
    type Item = NonNull<sys::nftnl_expr>;

    fn next(&mut self) -> Option<Self::Item> {
        // SAFETY: a live iterator over a rule borrowed for the iterator's lifetime, so not
        // freed or changed meanwhile; NULL ends the walk.
        NonNull::new(unsafe { sys::nftnl_expr_iter_next(self.it.as_ptr()) })
    }
}

impl Drop for ExprIter<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `OwnedRule::exprs`, owned by us alone, destroyed once, here.
        unsafe { sys::nftnl_expr_iter_destroy(self.it.as_ptr()) }
    }
}

/// libnftnl's iterator over a set's elements. The elements it yields belong to the set, which
/// the iterator borrows: they stay valid while the set is borrowed.
pub(super) struct SetElemsIter<'s> {
    it: NonNull<sys::nftnl_set_elems_iter>,
    _set: PhantomData<&'s OwnedSet>,
}

impl Iterator for SetElemsIter<'_> {
    type Item = NonNull<sys::nftnl_set_elem>;

    fn next(&mut self) -> Option<Self::Item> {
        // SAFETY: a live iterator over a set borrowed for the iterator's lifetime, so not freed
        // or changed meanwhile; NULL ends the walk.
        NonNull::new(unsafe { sys::nftnl_set_elems_iter_next(self.it.as_ptr()) })
    }
}

impl Drop for SetElemsIter<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `OwnedSet::elems`, owned by us alone, destroyed once, here.
        unsafe { sys::nftnl_set_elems_iter_destroy(self.it.as_ptr()) }
    }
}
