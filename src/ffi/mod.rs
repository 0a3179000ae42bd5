//! The FFI room: what the safe `nftnl` API lacks, built over `nftnl-sys`, and the netlink socket
//! plumbing under it. Named sets with flags and our key types (interval address sets, port
//! sets, interface-name sets), lookups into them, `redir`, `tproxy`, `ct zone set`, and reading
//! objects back (parsing netlink messages and rendering expressions in libnftnl's own notation)
//! for CHECK.
//!
//! This is the one home of `unsafe` in the library: `lib.rs` denies `unsafe_code` everywhere
//! else, and every `unsafe` block and `unsafe impl` here says why it is sound
//! (`clippy::undocumented_unsafe_blocks`). The rules it keeps:
//!
//! - Every libnftnl object we allocate is owned by a value with a `Drop` impl (`owned`, or a
//!   message type holding one); nothing is freed by hand, so early returns cannot leak.
//! - Every buffer a message is built in has room for `nft_nlmsg_maxsize()` bytes, the size
//!   libnftnl's message builders are written for: a `MsgBuf`, or a page of an `nftnl::Batch`,
//!   which keeps that much room for each `NlMsg::write`.
//! - libnftnl parses only whole messages, checked before the call (`dump`).
//!
//! Who uses what: `exprs` and `sets` build objects that `kernel::compile` puts in batches,
//! wrapped in `flags`; `socket` sends them and dumps the kernel's objects, which `dump`
//! parses; `netlink` is shared by `socket` and `route.rs`'s rtnetlink client.

pub(crate) mod dump;
pub(crate) mod exprs;
pub(crate) mod flags;
pub(crate) mod netlink;
mod owned;
pub(crate) mod sets;
pub(crate) mod socket;

pub(crate) use dump::{RuleInfo, render_rule};
pub(crate) use exprs::{CtZoneSet, HtonU32, Lookup, Redir, Tproxy};
pub(crate) use flags::{Exclusive, NoAck};
pub use sets::{Elem, KeyType};
pub(crate) use sets::{NamedSet, SetElems, elem_chunks};
pub(crate) use socket::Socket;

use std::ptr::NonNull;

/// A pointer libnftnl just allocated, known non-null. libnftnl returns NULL only when malloc
/// fails; like the nftnl crate, treat that as fatal.
fn alloc<T>(p: *mut T) -> NonNull<T> {
    NonNull::new(p).unwrap_or_else(|| std::process::abort())
}
