//! What the safe `nftnl` API lacks, built over `nftnl-sys`: named sets with flags and our key
//! types (interval address sets, port sets, interface-name sets), lookups into them, `redir`,
//! `tproxy`, `ct zone set`, and reading objects back (parsing netlink messages and
//! rendering expressions in libnftnl's own notation) for CHECK.
//!
//! This is the only module with `unsafe`. Every pointer it hands to libnftnl is owned by a
//! value here and freed on drop; every buffer passed to a `*_build_*` call is
//! `nft_nlmsg_maxsize()` bytes, the size libnftnl's message builders are written for.

use mnl::mnl_sys::libc as mlibc;
use nftnl::expr::{Expression, Register};
use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::{MsgType, NlMsg, Rule, Table};
use std::ffi::{CStr, CString, c_char, c_void};
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the redirect carries a port.
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NFTNL_UDATA_SET_KEYBYTEORDER: u8 = 0;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;

fn alloc<T>(p: *mut T) -> NonNull<T> {
    // libnftnl returns NULL only when malloc fails; like the nftnl crate, treat that as fatal.
    NonNull::new(p).unwrap_or_else(|| std::process::abort())
}

/// A buffer aligned for `nlmsghdr`, `nft_nlmsg_maxsize()` bytes long.
pub(crate) struct MsgBuf(Vec<u64>);

impl MsgBuf {
    pub fn new() -> MsgBuf {
        MsgBuf(vec![
            0u64;
            (nftnl::nft_nlmsg_maxsize() as usize).div_ceil(8)
        ])
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        let len = self.0.len() * 8;
        // SAFETY: a u64 buffer viewed as bytes: same allocation, length in bytes, u8 has no
        // alignment or validity requirements.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }

    fn ptr(&mut self) -> *mut c_void {
        self.0.as_mut_ptr().cast()
    }
}

impl Default for MsgBuf {
    fn default() -> Self {
        MsgBuf::new()
    }
}

/// Key types of our sets (nft's datatype ids and lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Ipv4Addr,
    Ipv6Addr,
    InetService,
    Ifname,
}

impl KeyType {
    pub fn type_id(self) -> u32 {
        match self {
            KeyType::Ipv4Addr => 7,
            KeyType::Ipv6Addr => 8,
            KeyType::InetService => 13,
            KeyType::Ifname => 41,
        }
    }

    pub fn key_len(self) -> u32 {
        match self {
            KeyType::Ipv4Addr => 4,
            KeyType::Ipv6Addr => 16,
            KeyType::InetService => 2,
            KeyType::Ifname => 16,
        }
    }
}

/// One set element as netlink carries it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Elem {
    pub key: Vec<u8>,
    /// `NFT_SET_ELEM_INTERVAL_END`: this key closes an interval (exclusive end).
    pub interval_end: bool,
}

/// Elements per NEWSETELEM message: well inside one message's 64 KiB (an IPv6 interval
/// element takes about 40 bytes), and few enough that only one chunk of libnftnl element
/// objects (a few hundred bytes each) is alive at a time, whatever the set's size.
const ELEMS_PER_MESSAGE: usize = 512;

/// A new libnftnl set object naming `name` in `table` (the fields every set message carries).
fn set_object(table: &Table, name: &CStr, id: u32) -> NonNull<sys::nftnl_set> {
    let set = alloc(unsafe { sys::nftnl_set_alloc() });
    // SAFETY: `set` is a live nftnl_set; strings are copied by libnftnl.
    unsafe {
        let s = set.as_ptr();
        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, table.get_family() as u32);
        sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table.get_name().as_ptr());
        sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, name.as_ptr());
        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, id);
    }
    set
}

/// A named set (with `NFT_SET_INTERVAL` for address ranges): the NEWSET message. Its elements
/// go in [`SetElems`] messages.
pub(crate) struct NamedSet<'a> {
    set: NonNull<sys::nftnl_set>,
    table: &'a Table,
}

impl<'a> NamedSet<'a> {
    pub fn new(table: &'a Table, name: &CStr, id: u32, key: KeyType, interval: bool) -> Self {
        let set = set_object(table, name, id);
        // SAFETY: `set` is a live nftnl_set; the udata buffer is freed after libnftnl copied it.
        unsafe {
            let s = set.as_ptr();
            let flags = if interval {
                libc::NFT_SET_INTERVAL as u32
            } else {
                0
            };
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, flags);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, key.type_id());
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, key.key_len());
            // nft reads the key's byte order from the set's user data to print elements; the
            // kernel ignores it.
            let ud = alloc(sys::nftnl_udata_buf_alloc(64));
            let order = if key == KeyType::Ifname {
                BYTEORDER_HOST
            } else {
                BYTEORDER_BIG
            };
            sys::nftnl_udata_put_u32(ud.as_ptr(), NFTNL_UDATA_SET_KEYBYTEORDER, order);
            sys::nftnl_set_set_data(
                s,
                sys::NFTNL_SET_USERDATA as u16,
                sys::nftnl_udata_buf_data(ud.as_ptr()),
                sys::nftnl_udata_buf_len(ud.as_ptr()),
            );
            sys::nftnl_udata_buf_free(ud.as_ptr());
        }
        NamedSet { set, table }
    }
}

impl Drop for NamedSet<'_> {
    fn drop(&mut self) {
        unsafe { sys::nftnl_set_free(self.set.as_ptr()) }
    }
}

unsafe impl NlMsg for NamedSet<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let ty = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWSET,
            MsgType::Del => libc::NFT_MSG_DELSET,
        };
        unsafe {
            let h = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                ty as u16,
                self.table.get_family() as u16,
                (libc::NLM_F_CREATE | libc::NLM_F_ACK) as u16,
                seq,
            );
            sys::nftnl_set_nlmsg_build_payload(h, self.set.as_ptr());
        }
    }
}

/// One NEWSETELEM message: a chunk of a set's elements.
pub(crate) struct SetElems<'a> {
    set: NonNull<sys::nftnl_set>,
    table: &'a Table,
}

impl<'a> SetElems<'a> {
    /// The messages carrying `elems` into set `name` (`id`: its id in this transaction), one
    /// chunk at a time: build one, add it to the batch, drop it, build the next.
    pub fn chunks<'e>(
        table: &'a Table,
        name: &'e CStr,
        id: u32,
        elems: &'e [Elem],
    ) -> impl Iterator<Item = SetElems<'a>> + 'e
    where
        'a: 'e,
    {
        elems.chunks(ELEMS_PER_MESSAGE).map(move |chunk| {
            let set = set_object(table, name, id);
            for elem in chunk {
                // SAFETY: the element is allocated here and owned by the set once added.
                unsafe {
                    let e = alloc(sys::nftnl_set_elem_alloc()).as_ptr();
                    // Keys are at most 16 bytes (IPv6, ifname): never hand libnftnl more.
                    let len = elem.key.len().min(16);
                    sys::nftnl_set_elem_set(
                        e,
                        sys::NFTNL_SET_ELEM_KEY as u16,
                        elem.key.as_ptr().cast(),
                        len as u32,
                    );
                    if elem.interval_end {
                        sys::nftnl_set_elem_set_u32(
                            e,
                            sys::NFTNL_SET_ELEM_FLAGS as u16,
                            libc::NFT_SET_ELEM_INTERVAL_END as u32,
                        );
                    }
                    sys::nftnl_set_elem_add(set.as_ptr(), e);
                }
            }
            SetElems { set, table }
        })
    }
}

impl Drop for SetElems<'_> {
    fn drop(&mut self) {
        unsafe { sys::nftnl_set_free(self.set.as_ptr()) }
    }
}

unsafe impl NlMsg for SetElems<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: `buf` holds nft_nlmsg_maxsize() bytes (NlMsg's contract) and a chunk is a
        // fraction of one message.
        unsafe {
            let h = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                libc::NFT_MSG_NEWSETELEM as u16,
                self.table.get_family() as u16,
                (libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK) as u16,
                seq,
            );
            sys::nftnl_set_elems_nlmsg_build_payload(h, self.set.as_ptr());
        }
    }
}

/// Sends `T`'s add message with `NLM_F_CREATE | NLM_F_EXCL`: fails with EEXIST, failing the
/// whole batch, if the object already exists.
pub(crate) struct Exclusive<'a, T>(pub &'a T);

unsafe impl<T: NlMsg> NlMsg for Exclusive<'_, T> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        unsafe {
            self.0.write(buf, seq, msg_type);
            // The header is at the start of `buf`: libnftnl's batch pages are malloc'd and every
            // message length is NLMSG_ALIGNed, so it is aligned for nlmsghdr.
            let h = buf.cast::<mlibc::nlmsghdr>();
            (*h).nlmsg_flags |= (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
        }
    }
}

/// Sends `T`'s message without `NLM_F_ACK`. The kernel still answers a refused message (it
/// reports errors whatever the flags), so a batch acks only its last message: one reply and one
/// `recvmsg` per batch on success instead of one per message.
pub(crate) struct NoAck<'a, T>(pub &'a T);

unsafe impl<T: NlMsg> NlMsg for NoAck<'_, T> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        // SAFETY: as for `Exclusive`: `T` wrote its header at the start of `buf`, aligned.
        unsafe {
            self.0.write(buf, seq, msg_type);
            let h = buf.cast::<mlibc::nlmsghdr>();
            (*h).nlmsg_flags &= !(libc::NLM_F_ACK as u16);
        }
    }
}

/// How many element messages [`SetElems::chunks`] makes of `n` elements.
pub(crate) fn elem_chunks(n: usize) -> usize {
    n.div_ceil(ELEMS_PER_MESSAGE)
}

fn expr(name: &CStr) -> NonNull<sys::nftnl_expr> {
    alloc(unsafe { sys::nftnl_expr_alloc(name.as_ptr()) })
}

fn set_u32(e: NonNull<sys::nftnl_expr>, attr: u32, v: u32) {
    // SAFETY: `e` is a freshly allocated expression; attribute numbers are libnftnl's.
    unsafe { sys::nftnl_expr_set_u32(e.as_ptr(), attr as u16, v) }
}

/// `lookup reg 1 set NAME` (with `NFT_LOOKUP_F_INV` when inverted). `id` is the set's id in
/// the same transaction, which the kernel uses to find a set created by that transaction.
pub(crate) struct Lookup {
    set: CString,
    id: u32,
    invert: bool,
}

impl Lookup {
    pub fn new(set: &CStr, id: u32, invert: bool) -> Lookup {
        Lookup {
            set: set.to_owned(),
            id,
            invert,
        }
    }
}

impl Expression for Lookup {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let e = expr(c"lookup");
        set_u32(e, sys::NFTNL_EXPR_LOOKUP_SREG, libc::NFT_REG_1 as u32);
        unsafe {
            sys::nftnl_expr_set_str(
                e.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET as u16,
                self.set.as_ptr(),
            )
        };
        set_u32(e, sys::NFTNL_EXPR_LOOKUP_SET_ID, self.id);
        // Always sent (the kernel reports it even when 0), so a rule we build and the same rule
        // read back render alike.
        let flags = if self.invert {
            libc::NFT_LOOKUP_F_INV as u32
        } else {
            0
        };
        set_u32(e, sys::NFTNL_EXPR_LOOKUP_FLAGS, flags);
        e
    }
}

/// `redir proto_min reg N`: redirect to the local port held (big-endian) in `port`.
pub(crate) struct Redir {
    pub port: Register,
}

impl Expression for Redir {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let e = expr(c"redir");
        // min = max: one port. The kernel reports max even when only min was sent.
        set_u32(e, sys::NFTNL_EXPR_REDIR_REG_PROTO_MIN, self.port.to_raw());
        set_u32(e, sys::NFTNL_EXPR_REDIR_REG_PROTO_MAX, self.port.to_raw());
        set_u32(e, sys::NFTNL_EXPR_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
        e
    }
}

/// `tproxy ip|ip6 to :port`: deliver to the local socket on the port held in `port`.
pub(crate) struct Tproxy {
    /// `NFPROTO_IPV4` or `NFPROTO_IPV6`.
    pub nfproto: u32,
    pub port: Register,
}

impl Expression for Tproxy {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let e = expr(c"tproxy");
        set_u32(e, sys::NFTNL_EXPR_TPROXY_FAMILY, self.nfproto);
        set_u32(e, sys::NFTNL_EXPR_TPROXY_REG_PORT, self.port.to_raw());
        e
    }
}

/// `byteorder reg 1 = hton(reg 1, 4, 4)`: a host-order 32-bit value (a uid) to big-endian, so
/// `cmp gte/lte` (which compare bytes in memory order) order it numerically, as nft does for
/// `meta skuid 1000-2000`.
pub(crate) struct HtonU32;

impl Expression for HtonU32 {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let e = expr(c"byteorder");
        set_u32(e, sys::NFTNL_EXPR_BYTEORDER_SREG, libc::NFT_REG_1 as u32);
        set_u32(e, sys::NFTNL_EXPR_BYTEORDER_DREG, libc::NFT_REG_1 as u32);
        set_u32(
            e,
            sys::NFTNL_EXPR_BYTEORDER_OP,
            libc::NFT_BYTEORDER_HTON as u32,
        );
        set_u32(e, sys::NFTNL_EXPR_BYTEORDER_LEN, 4);
        set_u32(e, sys::NFTNL_EXPR_BYTEORDER_SIZE, 4);
        e
    }
}

/// `ct zone set` from register 1 (a 16-bit zone id).
pub(crate) struct CtZoneSet;

impl Expression for CtZoneSet {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let e = expr(c"ct");
        set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_ZONE as u32);
        set_u32(e, sys::NFTNL_EXPR_CT_SREG, libc::NFT_REG_1 as u32);
        e
    }
}

/// Renders every expression of a parsed rule the way `nft --debug=netlink` shows it.
fn render_exprs(rule: *mut sys::nftnl_rule) -> Vec<String> {
    let mut out = Vec::new();
    let mut text = vec![0u8; 4096];
    // SAFETY: `rule` is a live parsed rule; the iterator and expressions it yields are owned by
    // the rule; snprintf writes at most `text.len()` bytes, NUL-terminated.
    unsafe {
        let it = alloc(sys::nftnl_expr_iter_create(rule));
        loop {
            let e = sys::nftnl_expr_iter_next(it.as_ptr());
            if e.is_null() {
                break;
            }
            let name = CStr::from_ptr(sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_NAME as u16));
            let n = sys::nftnl_expr_snprintf(
                text.as_mut_ptr().cast(),
                text.len(),
                e,
                sys::NFTNL_OUTPUT_DEFAULT,
                0,
            );
            let body = if n > 0 {
                let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
                String::from_utf8_lossy(&text[..end]).trim().to_string()
            } else {
                String::new()
            };
            out.push(format!("[ {} {} ]", name.to_string_lossy(), body));
        }
        sys::nftnl_expr_iter_destroy(it.as_ptr());
    }
    out
}

/// Renders a rule we built by writing its netlink message and parsing it back: exactly the
/// form a kernel dump of the same rule is rendered in.
pub(crate) fn render_rule(rule: &Rule) -> Vec<String> {
    let mut buf = MsgBuf::new();
    // SAFETY: `buf` has nft_nlmsg_maxsize() bytes, which NlMsg::write requires.
    unsafe { rule.write(buf.ptr(), 0, MsgType::Add) };
    let r = alloc(unsafe { sys::nftnl_rule_alloc() });
    let parsed = unsafe { sys::nftnl_rule_nlmsg_parse(buf.ptr().cast(), r.as_ptr()) };
    let out = if parsed < 0 {
        Vec::new()
    } else {
        render_exprs(r.as_ptr())
    };
    unsafe { sys::nftnl_rule_free(r.as_ptr()) };
    out
}

/// A chain as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChainInfo {
    pub name: String,
    /// (hook number, priority, type name) for base chains.
    pub hook: Option<(u32, i32, String)>,
    /// The verdict for packets no rule decided (`NF_ACCEPT`, `NF_DROP`): base chains only.
    pub policy: Option<u32>,
}

/// A set as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetInfo {
    pub name: String,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
}

/// A rule as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleInfo {
    pub chain: String,
    pub handle: u64,
    pub exprs: Vec<String>,
}

fn cstr_attr(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Reads one object type from a dump, keeping those of `table`.
trait Dumpable: Sized {
    const GET: u32;
    fn parse(msg: &[u8]) -> Option<(String, Self)>;
}

impl Dumpable for ChainInfo {
    const GET: u32 = libc::NFT_MSG_GETCHAIN as u32;
    fn parse(msg: &[u8]) -> Option<(String, Self)> {
        unsafe {
            let c = alloc(sys::nftnl_chain_alloc()).as_ptr();
            let ok = sys::nftnl_chain_nlmsg_parse(msg.as_ptr().cast(), c) >= 0;
            let out = ok.then(|| {
                let table = cstr_attr(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TABLE as u16));
                let hook = sys::nftnl_chain_is_set(c, sys::NFTNL_CHAIN_HOOKNUM as u16).then(|| {
                    (
                        sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16),
                        sys::nftnl_chain_get_s32(c, sys::NFTNL_CHAIN_PRIO as u16),
                        cstr_attr(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TYPE as u16)),
                    )
                });
                let policy = sys::nftnl_chain_is_set(c, sys::NFTNL_CHAIN_POLICY as u16)
                    .then(|| sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_POLICY as u16));
                let name = cstr_attr(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_NAME as u16));
                (table, ChainInfo { name, hook, policy })
            });
            sys::nftnl_chain_free(c);
            out
        }
    }
}

impl Dumpable for SetInfo {
    const GET: u32 = libc::NFT_MSG_GETSET as u32;
    fn parse(msg: &[u8]) -> Option<(String, Self)> {
        unsafe {
            let s = alloc(sys::nftnl_set_alloc()).as_ptr();
            let ok = sys::nftnl_set_nlmsg_parse(msg.as_ptr().cast(), s) >= 0;
            let out = ok.then(|| {
                let get = |a: u32| sys::nftnl_set_get_u32(s, a as u16);
                (
                    cstr_attr(sys::nftnl_set_get_str(s, sys::NFTNL_SET_TABLE as u16)),
                    SetInfo {
                        name: cstr_attr(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16)),
                        flags: get(sys::NFTNL_SET_FLAGS),
                        key_type: get(sys::NFTNL_SET_KEY_TYPE),
                        key_len: get(sys::NFTNL_SET_KEY_LEN),
                    },
                )
            });
            sys::nftnl_set_free(s);
            out
        }
    }
}

impl Dumpable for RuleInfo {
    const GET: u32 = libc::NFT_MSG_GETRULE as u32;
    fn parse(msg: &[u8]) -> Option<(String, Self)> {
        unsafe {
            let r = alloc(sys::nftnl_rule_alloc()).as_ptr();
            let ok = sys::nftnl_rule_nlmsg_parse(msg.as_ptr().cast(), r) >= 0;
            let out = ok.then(|| {
                (
                    cstr_attr(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_TABLE as u16)),
                    RuleInfo {
                        chain: cstr_attr(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_CHAIN as u16)),
                        handle: sys::nftnl_rule_get_u64(r, sys::NFTNL_RULE_HANDLE as u16),
                        exprs: render_exprs(r),
                    },
                )
            });
            sys::nftnl_rule_free(r);
            out
        }
    }
}

/// Elements parsed from GETSETELEM replies.
fn parse_elems(msg: &[u8], out: &mut Vec<Elem>) -> bool {
    unsafe {
        let s = alloc(sys::nftnl_set_alloc()).as_ptr();
        let ok = sys::nftnl_set_elems_nlmsg_parse(msg.as_ptr().cast(), s) >= 0;
        if ok {
            let it = alloc(sys::nftnl_set_elems_iter_create(s));
            loop {
                let e = sys::nftnl_set_elems_iter_next(it.as_ptr());
                if e.is_null() {
                    break;
                }
                let mut len = 0u32;
                let key = sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_KEY as u16, &mut len);
                let key = if key.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(key.cast::<u8>(), len as usize).to_vec()
                };
                let flags = if sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_FLAGS as u16) {
                    sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_FLAGS as u16)
                } else {
                    0
                };
                out.push(Elem {
                    key,
                    interval_end: flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0,
                });
            }
            sys::nftnl_set_elems_iter_destroy(it.as_ptr());
        }
        sys::nftnl_set_free(s);
        ok
    }
}

/// A netfilter netlink socket of the network namespace it was opened in.
pub(crate) struct Socket {
    sock: mnl::Socket,
    buf: MsgBuf,
    seq: u32,
}

/// A kernel that never answers must not hang the runtime: after `secs`, recv fails (EAGAIN).
pub(crate) fn set_recv_timeout(sock: &mnl::Socket, secs: i64) {
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: 0,
    };
    // SAFETY: a valid socket fd and a timeval of the size given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

/// An error reply to one message of a batch.
#[derive(Debug)]
pub(crate) struct BatchError {
    pub seq: u32,
    pub err: io::Error,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        let sock = mnl::Socket::new(mnl::Bus::Netfilter)?;
        let one: libc::c_int = 1;
        // Error replies then carry only the header of the refused message, not its payload
        // (up to 64 KiB per set-element message). Best effort: older kernels lack it.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_CAP_ACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        set_recv_timeout(&sock, 10);
        Ok(Socket {
            sock,
            buf: MsgBuf::new(),
            seq: 1 << 20,
        })
    }

    /// A second descriptor of this socket (close-on-exec): the socket is released only when
    /// both are closed.
    pub fn dup_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        // SAFETY: fcntl on our own open socket; F_DUPFD_CLOEXEC returns a new descriptor (or
        // -1), which nothing else owns, so the OwnedFd may close it.
        unsafe {
            let fd = libc::fcntl(self.sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(std::os::fd::FromRawFd::from_raw_fd(fd))
        }
    }

    /// Sends a finalized batch and waits for the reply to message `last` (the one message sent
    /// with `NLM_F_ACK`; refused messages are answered whatever their flags).
    /// Returns the error replies (empty: the kernel committed the batch).
    pub fn send_batch(
        &mut self,
        batch: &nftnl::FinalizedBatch,
        last: u32,
    ) -> io::Result<Vec<BatchError>> {
        // The kernel takes a batch only from one sendmsg (a batch split over several sends loses
        // its begin marker after the first), so the batch's pages go as one message's iovecs,
        // with a send buffer big enough for them (large sets make batches of hundreds of KiB).
        let pages: Vec<std::io::IoSlice> = batch.iter().map(std::io::IoSlice::new).collect();
        let len: usize = pages.iter().map(|p| p.len()).sum();
        self.grow_sndbuf(len);
        // The replies arrive during the send (the kernel handles the batch in our sendmsg) and
        // must fit in the receive buffer, or the kernel drops them (ENOBUFS) and a committed
        // batch would look failed: room for an error reply per message, in case all fail.
        self.grow_rcvbuf(batch.sequence_numbers().len() * 1024);
        let sent = nix::sys::socket::sendmsg::<()>(
            self.sock.as_raw_fd(),
            &pages,
            &[],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(io::Error::from)?;
        if sent != len {
            return Err(io::Error::other("netlink sendmsg sent a partial batch"));
        }
        let mut pending = true;
        let mut errors = Vec::new();
        while pending {
            let n = self.sock.recv_raw(self.buf.bytes())?;
            for msg in mnl::NlMessages::new(&self.buf.bytes()[..n]) {
                let msg = msg?;
                let Some((seq, errno)) = parse_ack(msg) else {
                    continue;
                };
                if seq == last {
                    pending = false;
                }
                if errno != 0 {
                    errors.push(BatchError {
                        seq,
                        err: io::Error::from_raw_os_error(errno),
                    });
                }
            }
            // After a refusal the rest of the replies matter little: keep reading only while
            // they are already queued, so a kernel that skips some cannot make us wait.
            if !errors.is_empty() && !self.readable_now()? {
                break;
            }
        }
        errors.sort_by_key(|e| e.seq);
        Ok(errors)
    }

    /// Raises the socket's send buffer to hold `len` bytes (SO_SNDBUFFORCE: we are root).
    fn grow_sndbuf(&self, len: usize) {
        let want = libc::c_int::try_from(len + 4096).unwrap_or(libc::c_int::MAX);
        let mut cur: libc::c_int = 0;
        let mut sz = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let fd = self.sock.as_raw_fd();
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut cur as *mut libc::c_int).cast(),
                &mut sz,
            );
            // The kernel doubles the value it is given and reports the doubled value.
            if cur / 2 < want {
                let sz = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                if libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUFFORCE,
                    (&want as *const libc::c_int).cast(),
                    sz,
                ) != 0
                {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_SNDBUF,
                        (&want as *const libc::c_int).cast(),
                        sz,
                    );
                }
            }
        }
    }

    /// Raises the socket's receive buffer to `len` bytes if it is smaller (SO_RCVBUFFORCE).
    fn grow_rcvbuf(&self, len: usize) {
        let want = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
        if want <= 212_992 {
            return; // the default rmem_default holds that
        }
        let sz = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&want as *const libc::c_int).cast(),
                sz,
            );
        }
    }

    fn readable_now(&self) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r > 0)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Runs a GET dump (`NLM_F_DUMP`) for `family` and collects what `each` extracts.
    fn dump<T>(
        &mut self,
        build: impl FnOnce(*mut mlibc::nlmsghdr),
        msg_type: u32,
        family: u16,
        mut each: impl FnMut(&[u8]) -> Option<T>,
    ) -> io::Result<Vec<T>> {
        let seq = self.next_seq();
        let mut req = MsgBuf::new();
        let len = unsafe {
            let h = sys::nftnl_nlmsg_build_hdr(
                req.ptr().cast(),
                msg_type as u16,
                family,
                (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
                seq,
            );
            build(h.cast());
            (*h).nlmsg_len as usize
        };
        self.sock.send(&req.bytes()[..len])?;
        let mut out = Vec::new();
        let portid = self.sock.portid();
        loop {
            let n = self.sock.recv_raw(self.buf.bytes())?;
            let mut done = false;
            for msg in mnl::NlMessages::new(&self.buf.bytes()[..n]) {
                let msg = msg?;
                let hdr = header(msg);
                if hdr.nlmsg_seq != seq || hdr.nlmsg_pid != portid {
                    continue;
                }
                match hdr.nlmsg_type as libc::c_int {
                    libc::NLMSG_DONE => done = true,
                    libc::NLMSG_ERROR => {
                        let errno = parse_ack(msg).map_or(0, |(_, e)| e);
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(errno));
                        }
                        done = true;
                    }
                    _ => {
                        // SAFETY: `msg` is a complete, aligned netlink message in our buffer.
                        // The whole message, so libnftnl parses within its bounds.
                        if let Some(t) = each(msg) {
                            out.push(t);
                        }
                    }
                }
            }
            if done {
                return Ok(out);
            }
        }
    }

    fn dump_objects<T: Dumpable>(&mut self, family: u16, table: &str) -> io::Result<Vec<T>> {
        self.dump(
            |_| {},
            T::GET,
            family,
            |msg| T::parse(msg).and_then(|(t, obj)| (t == table).then_some(obj)),
        )
    }

    pub fn chains(&mut self, family: u16, table: &str) -> io::Result<Vec<ChainInfo>> {
        self.dump_objects(family, table)
    }

    /// Every chain in the namespace, of every family and table: (table, chain).
    pub fn all_chains(&mut self) -> io::Result<Vec<(String, String)>> {
        self.dump(
            |_| {},
            ChainInfo::GET,
            libc::NFPROTO_UNSPEC as u16,
            |msg| ChainInfo::parse(msg).map(|(t, c)| (t, c.name)),
        )
    }

    pub fn sets(&mut self, family: u16, table: &str) -> io::Result<Vec<SetInfo>> {
        self.dump_objects(family, table)
    }

    pub fn rules(&mut self, family: u16, table: &str) -> io::Result<Vec<RuleInfo>> {
        self.dump_objects(family, table)
    }

    /// Whether `table` exists (GETTABLE for it; ENOENT = no).
    pub fn table_exists(&mut self, family: u16, table: &str) -> io::Result<bool> {
        Ok(self.table_flags(family, table)?.is_some())
    }

    /// The flags of `table` (`NFT_TABLE_F_DORMANT`, …) if it exists.
    pub fn table_flags(&mut self, family: u16, table: &str) -> io::Result<Option<u32>> {
        let name = CString::new(table).map_err(io::Error::other)?;
        let t = alloc(unsafe { sys::nftnl_table_alloc() });
        unsafe {
            sys::nftnl_table_set_str(t.as_ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr())
        };
        let seq = self.next_seq();
        let mut req = MsgBuf::new();
        let len = unsafe {
            let h = sys::nftnl_nlmsg_build_hdr(
                req.ptr().cast(),
                libc::NFT_MSG_GETTABLE as u16,
                family,
                libc::NLM_F_ACK as u16,
                seq,
            );
            sys::nftnl_table_nlmsg_build_payload(h, t.as_ptr());
            sys::nftnl_table_free(t.as_ptr());
            (*h).nlmsg_len as usize
        };
        self.sock.send(&req.bytes()[..len])?;
        let mut found = None;
        loop {
            let n = self.sock.recv_raw(self.buf.bytes())?;
            for msg in mnl::NlMessages::new(&self.buf.bytes()[..n]) {
                let msg = msg?;
                if header(msg).nlmsg_seq != seq {
                    continue;
                }
                match parse_ack(msg) {
                    Some((_, 0)) => return Ok(found),
                    Some((_, e)) if e == libc::ENOENT => return Ok(None),
                    Some((_, e)) => return Err(io::Error::from_raw_os_error(e)),
                    None => found = Some(parse_table_flags(msg)),
                }
            }
        }
    }

    /// The elements of set `name` in `table`.
    pub fn set_elems(&mut self, family: u16, table: &str, name: &str) -> io::Result<Vec<Elem>> {
        let tname = CString::new(table).map_err(io::Error::other)?;
        let sname = CString::new(name).map_err(io::Error::other)?;
        let s = alloc(unsafe { sys::nftnl_set_alloc() });
        unsafe {
            sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_TABLE as u16, tname.as_ptr());
            sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_NAME as u16, sname.as_ptr());
        }
        let mut elems = Vec::new();
        let res = self.dump(
            |h| unsafe { sys::nftnl_set_elems_nlmsg_build_payload(h.cast(), s.as_ptr()) },
            libc::NFT_MSG_GETSETELEM as u32,
            family,
            |msg| parse_elems(msg, &mut elems).then_some(()),
        );
        unsafe { sys::nftnl_set_free(s.as_ptr()) };
        res.map(|_| elems)
    }
}

/// A NEWTABLE reply's flags (0 when it carries none, or does not parse).
fn parse_table_flags(msg: &[u8]) -> u32 {
    // SAFETY: `msg` is one whole netlink message (NlMessages checked its length); the table
    // object is freed before returning.
    unsafe {
        let t = alloc(sys::nftnl_table_alloc()).as_ptr();
        let flags = if sys::nftnl_table_nlmsg_parse(msg.as_ptr().cast(), t) >= 0
            && sys::nftnl_table_is_set(t, sys::NFTNL_TABLE_FLAGS as u16)
        {
            sys::nftnl_table_get_u32(t, sys::NFTNL_TABLE_FLAGS as u16)
        } else {
            0
        };
        sys::nftnl_table_free(t);
        flags
    }
}

fn header(msg: &[u8]) -> mlibc::nlmsghdr {
    // SAFETY: NlMessages only yields messages at least one header long, at aligned offsets of
    // an aligned buffer.
    unsafe { msg.as_ptr().cast::<mlibc::nlmsghdr>().read() }
}

/// For an `NLMSG_ERROR` message: (sequence number of the message it answers, errno; 0 = ACK).
fn parse_ack(msg: &[u8]) -> Option<(u32, i32)> {
    let hdr = header(msg);
    if hdr.nlmsg_type as libc::c_int != libc::NLMSG_ERROR {
        return None;
    }
    let off = std::mem::size_of::<mlibc::nlmsghdr>();
    let err = i32::from_ne_bytes(msg.get(off..off + 4)?.try_into().ok()?);
    // struct nlmsgerr { int error; struct nlmsghdr msg; }: seq is at offset 8 of the echo.
    let echoed_seq = u32::from_ne_bytes(msg.get(off + 4 + 8..off + 4 + 12)?.try_into().ok()?);
    Some((echoed_seq, -err))
}

#[cfg(test)]
mod tests {
    //! No kernel here: messages are built and parsed back the way the kernel would read them.
    use super::*;
    use nftnl::{Chain, ProtoFamily};

    fn table() -> Table {
        Table::new(c"t", ProtoFamily::Inet)
    }

    fn rendered(add: impl FnOnce(&mut Rule)) -> Vec<String> {
        let t = table();
        let c = Chain::new(c"c", &t);
        let mut r = Rule::new(&c);
        add(&mut r);
        render_rule(&r)
    }

    #[test]
    fn expressions_render_like_nft_debug_output() {
        let r = rendered(|r| {
            r.add_expr(&nftnl::expr::Immediate::new(
                15001u16.to_be_bytes(),
                Register::Reg1,
            ));
            r.add_expr(&Redir {
                port: Register::Reg1,
            });
        });
        assert_eq!(
            r,
            [
                "[ immediate reg 1 0x0000993a ]",
                "[ redir proto_min reg 1 proto_max reg 1 flags 0x2 ]"
            ]
        );
        let r = rendered(|r| r.add_expr(&Lookup::new(c"ports", 3, true)));
        assert_eq!(r, ["[ lookup reg 1 set ports 0x1 ]"]);
        let r = rendered(|r| r.add_expr(&Lookup::new(c"ports", 3, false)));
        assert_eq!(r, ["[ lookup reg 1 set ports 0x0 ]"]);
        let r = rendered(|r| {
            r.add_expr(&Tproxy {
                nfproto: libc::NFPROTO_IPV6 as u32,
                port: Register::Reg1,
            })
        });
        assert_eq!(r, ["[ tproxy ip6 port reg 1 ]"]);
        let r = rendered(|r| r.add_expr(&CtZoneSet));
        assert_eq!(r, ["[ ct set zone with reg 1 ]"]);
    }

    fn header(buf: &mut MsgBuf) -> (u32, u16, u16) {
        let b = buf.bytes();
        (
            u32::from_ne_bytes(b[0..4].try_into().unwrap()),
            u16::from_ne_bytes(b[4..6].try_into().unwrap()),
            u16::from_ne_bytes(b[6..8].try_into().unwrap()),
        )
    }

    #[test]
    fn exclusive_adds_create_and_excl() {
        let t = table();
        let mut buf = MsgBuf::new();
        unsafe { Exclusive(&t).write(buf.ptr(), 1, MsgType::Add) };
        let (_, ty, flags) = header(&mut buf);
        assert_eq!(ty & 0xff, libc::NFT_MSG_NEWTABLE as u16);
        let want = (libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK) as u16;
        assert_eq!(flags & want, want);
    }

    #[test]
    fn set_elements_come_in_bounded_messages() {
        let t = table();
        let elems: Vec<Elem> = (0..1300u32)
            .map(|i| Elem {
                key: [0u8; 12].iter().copied().chain(i.to_be_bytes()).collect(),
                interval_end: i % 2 == 1,
            })
            .collect();
        let msgs: Vec<SetElems> = SetElems::chunks(&t, c"s", 1, &elems).collect();
        assert_eq!(msgs.len(), 3);
        for m in &msgs {
            let mut buf = MsgBuf::new();
            unsafe { m.write(buf.ptr(), 7, MsgType::Add) };
            let (len, ty, _) = header(&mut buf);
            assert_eq!(ty & 0xff, libc::NFT_MSG_NEWSETELEM as u16);
            assert!(len < 60_000, "{len} bytes");
        }
    }

    #[test]
    fn acks_are_parsed_and_garbage_is_not() {
        // struct nlmsghdr + struct nlmsgerr { int error; struct nlmsghdr msg; }
        let mut m = vec![0u8; 36];
        m[0..4].copy_from_slice(&36u32.to_ne_bytes());
        m[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        m[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        m[28..32].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(parse_ack(&m), Some((42, libc::EPERM)));
        m[4..6].copy_from_slice(&3u16.to_ne_bytes());
        assert_eq!(parse_ack(&m), None);
        assert_eq!(parse_ack(&m[..20]), None);
    }

    #[test]
    fn key_types_match_nft() {
        for (k, ty, len) in [
            (KeyType::Ipv4Addr, 7, 4),
            (KeyType::Ipv6Addr, 8, 16),
            (KeyType::InetService, 13, 2),
            (KeyType::Ifname, 41, 16),
        ] {
            assert_eq!((k.type_id(), k.key_len()), (ty, len));
        }
    }
}
