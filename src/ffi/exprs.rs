//! Expressions the safe `nftnl` API lacks: `lookup` into our named sets, `redir`, `tproxy`,
//! `byteorder` (hton of a uid) and `ct zone set`. Each builds a fresh `nftnl_expr`, which
//! [`nftnl::Rule::add_expr`] takes over (the rule frees it).

use super::alloc;
use nftnl::Rule;
use nftnl::expr::{Expression, Register};
use nftnl::nftnl_sys::{self as sys, libc};
use std::ffi::{CStr, CString};
use std::ptr::NonNull;

/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the redirect carries a port.
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;

/// A new expression of type `name` (`lookup`, `redir`, …).
fn expr(name: &CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: `name` is NUL-terminated and libnftnl copies it; `alloc` aborts on NULL.
    alloc(unsafe { sys::nftnl_expr_alloc(name.as_ptr()) })
}

fn set_u32(e: NonNull<sys::nftnl_expr>, attr: u32, v: u32) {
    // SAFETY: `e` is a live expression (fresh from `expr`, not yet handed to a rule); the
    // attribute numbers are libnftnl's, and an unknown one is ignored.
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
        // SAFETY: `e` is a live expression; the set name is NUL-terminated and libnftnl copies
        // it.
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

#[cfg(test)]
mod tests {
    //! No kernel here: rules are built, written as messages and parsed back the way the kernel
    //! would read them.
    use super::*;
    use crate::ffi::dump::render_rule;
    use nftnl::{Chain, ProtoFamily, Table};

    fn rendered(add: impl FnOnce(&mut Rule)) -> Vec<String> {
        let t = Table::new(c"t", ProtoFamily::Inet);
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
}
