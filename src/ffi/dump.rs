//! Parsing what the kernel reports: chains, sets, rules and set elements from dump replies,
//! acks, a table's flags; and rendering a rule's expressions in libnftnl's own notation, so
//! that a rule we build and the kernel's copy of it compare as text.
//!
//! libnftnl's parsers trust the header's `nlmsg_len` and read the `nfgenmsg` after the header,
//! so they are handed only a slice that is one whole nf_tables message ([`nft_message`]):
//! every parser here is sound for any bytes.

use super::netlink::MsgBuf;
use super::owned::{OwnedChain, OwnedRule, OwnedSet, OwnedTable};
use super::sets::Elem;
use mnl::mnl_sys::libc as mlibc;
use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::{MsgType, Rule};
use std::ffi::{CStr, c_char};

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

/// The header fields of the netlink message at the start of `msg`, if it is a header long.
/// Decoded from bytes: any slice will do, aligned or not.
pub(super) fn header(msg: &[u8]) -> Option<mlibc::nlmsghdr> {
    let b = msg.get(..std::mem::size_of::<mlibc::nlmsghdr>())?;
    let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    Some(mlibc::nlmsghdr {
        nlmsg_len: u32_at(0),
        nlmsg_type: u16_at(4),
        nlmsg_flags: u16_at(6),
        nlmsg_seq: u32_at(8),
        nlmsg_pid: u32_at(12),
    })
}

/// `msg` as libnftnl's `*_nlmsg_parse` take it, if it is one whole nf_tables message: aligned
/// for its header, exactly as long as the header says, and long enough for the header and the
/// `nfgenmsg` after it. `mnl::NlMessages` yields messages of exactly their length, at aligned
/// offsets of an aligned buffer, so every kernel reply passes; anything else is not parsed.
fn nft_message(msg: &[u8]) -> Option<*const mlibc::nlmsghdr> {
    const NFGENMSG_LEN: usize = 4;
    let len = header(msg)?.nlmsg_len as usize;
    let p = msg.as_ptr().cast::<mlibc::nlmsghdr>();
    (p.is_aligned()
        && len == msg.len()
        && len >= std::mem::size_of::<mlibc::nlmsghdr>() + NFGENMSG_LEN)
        .then_some(p)
}

/// For an `NLMSG_ERROR` message: (sequence number of the message it answers, errno; 0 = ACK).
pub(super) fn parse_ack(msg: &[u8]) -> Option<(u32, i32)> {
    let hdr = header(msg)?;
    if hdr.nlmsg_type as libc::c_int != libc::NLMSG_ERROR {
        return None;
    }
    let off = std::mem::size_of::<mlibc::nlmsghdr>();
    let err = i32::from_ne_bytes(msg.get(off..off + 4)?.try_into().ok()?);
    // struct nlmsgerr { int error; struct nlmsghdr msg; }: seq is at offset 8 of the echo.
    let echoed_seq = u32::from_ne_bytes(msg.get(off + 4 + 8..off + 4 + 12)?.try_into().ok()?);
    Some((echoed_seq, -err))
}

/// A NEWTABLE reply's flags (0 when it carries none, or does not parse).
pub(super) fn parse_table_flags(msg: &[u8]) -> u32 {
    let Some(nlh) = nft_message(msg) else {
        return 0;
    };
    let t = OwnedTable::new();
    // SAFETY: `nlh` is one whole message (`nft_message`), which libnftnl parses within its
    // length; `t` is a live table, read only for an attribute it reports set.
    unsafe {
        if sys::nftnl_table_nlmsg_parse(nlh.cast(), t.as_ptr()) >= 0
            && sys::nftnl_table_is_set(t.as_ptr(), sys::NFTNL_TABLE_FLAGS as u16)
        {
            sys::nftnl_table_get_u32(t.as_ptr(), sys::NFTNL_TABLE_FLAGS as u16)
        } else {
            0
        }
    }
}

/// A string attribute libnftnl returned: owned, "" when unset (NULL).
///
/// # Safety
///
/// `p` is NULL or a NUL-terminated string that stays valid for the call (an attribute of a
/// live libnftnl object).
unsafe fn cstr_attr(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: not NULL, so a NUL-terminated string valid for this call (our contract).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Reads one object type from a dump, keeping those of `table`.
pub(super) trait Dumpable: Sized {
    const GET: u32;
    /// The object in `msg` and the name of its table; `None` if `msg` does not parse.
    fn parse(msg: &[u8]) -> Option<(String, Self)>;
}

impl Dumpable for ChainInfo {
    const GET: u32 = libc::NFT_MSG_GETCHAIN as u32;
    fn parse(msg: &[u8]) -> Option<(String, Self)> {
        let nlh = nft_message(msg)?;
        let chain = OwnedChain::new();
        let c = chain.as_ptr();
        // SAFETY: `nlh` is one whole message (`nft_message`), which libnftnl parses within its
        // length, into the live chain `c`; strings it returns are the chain's, copied before
        // `chain` drops.
        unsafe {
            if sys::nftnl_chain_nlmsg_parse(nlh.cast(), c) < 0 {
                return None;
            }
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
            Some((table, ChainInfo { name, hook, policy }))
        }
    }
}

impl Dumpable for SetInfo {
    const GET: u32 = libc::NFT_MSG_GETSET as u32;
    fn parse(msg: &[u8]) -> Option<(String, Self)> {
        let nlh = nft_message(msg)?;
        let set = OwnedSet::new();
        let s = set.as_ptr();
        // SAFETY: `nlh` is one whole message (`nft_message`), which libnftnl parses within its
        // length, into the live set `s`; strings it returns are the set's, copied before `set`
        // drops.
        unsafe {
            if sys::nftnl_set_nlmsg_parse(nlh.cast(), s) < 0 {
                return None;
            }
            let get = |a: u32| sys::nftnl_set_get_u32(s, a as u16);
            Some((
                cstr_attr(sys::nftnl_set_get_str(s, sys::NFTNL_SET_TABLE as u16)),
                SetInfo {
                    name: cstr_attr(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16)),
                    flags: get(sys::NFTNL_SET_FLAGS),
                    key_type: get(sys::NFTNL_SET_KEY_TYPE),
                    key_len: get(sys::NFTNL_SET_KEY_LEN),
                },
            ))
        }
    }
}

impl Dumpable for RuleInfo {
    const GET: u32 = libc::NFT_MSG_GETRULE as u32;
    fn parse(msg: &[u8]) -> Option<(String, Self)> {
        let nlh = nft_message(msg)?;
        let rule = OwnedRule::new();
        let r = rule.as_ptr();
        // SAFETY: `nlh` is one whole message (`nft_message`), which libnftnl parses within its
        // length, into the live rule `r`; strings it returns are the rule's, copied before
        // `rule` drops.
        unsafe {
            if sys::nftnl_rule_nlmsg_parse(nlh.cast(), r) < 0 {
                return None;
            }
            Some((
                cstr_attr(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_TABLE as u16)),
                RuleInfo {
                    chain: cstr_attr(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_CHAIN as u16)),
                    handle: sys::nftnl_rule_get_u64(r, sys::NFTNL_RULE_HANDLE as u16),
                    exprs: render_exprs(&rule),
                },
            ))
        }
    }
}

/// Elements parsed from a GETSETELEM reply, appended to `out`; false if it does not parse.
pub(super) fn parse_elems(msg: &[u8], out: &mut Vec<Elem>) -> bool {
    let Some(nlh) = nft_message(msg) else {
        return false;
    };
    let set = OwnedSet::new();
    // SAFETY: `nlh` is one whole message (`nft_message`), which libnftnl parses within its
    // length, into the live set.
    if unsafe { sys::nftnl_set_elems_nlmsg_parse(nlh.cast(), set.as_ptr()) } < 0 {
        return false;
    }
    for e in set.elems() {
        let e = e.as_ptr();
        let mut len = 0u32;
        // SAFETY: `e` is an element of `set`, alive while `set` is borrowed by the iterator;
        // a key libnftnl returns is `len` bytes of the element's own, copied at once.
        let (key, flags) = unsafe {
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
            (key, flags)
        };
        out.push(Elem {
            key,
            interval_end: flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0,
        });
    }
    true
}

/// Renders every expression of a parsed rule the way `nft --debug=netlink` shows it.
fn render_exprs(rule: &OwnedRule) -> Vec<String> {
    let mut out = Vec::new();
    let mut text = vec![0u8; 4096];
    for e in rule.exprs() {
        let e = e.as_ptr();
        // SAFETY: `e` is an expression of `rule`, alive while the iterator borrows it; its name
        // is its own string (or NULL), copied at once; snprintf writes at most `text.len()`
        // bytes, NUL-terminated.
        let (name, n) = unsafe {
            let name = cstr_attr(sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_NAME as u16));
            let n = sys::nftnl_expr_snprintf(
                text.as_mut_ptr().cast(),
                text.len(),
                e,
                sys::NFTNL_OUTPUT_DEFAULT,
                0,
            );
            (name, n)
        };
        let body = if n > 0 {
            let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            String::from_utf8_lossy(&text[..end]).trim().to_string()
        } else {
            String::new()
        };
        out.push(format!("[ {name} {body} ]"));
    }
    out
}

/// Renders a rule we built by writing its netlink message and parsing it back: exactly the
/// form a kernel dump of the same rule is rendered in.
pub(crate) fn render_rule(rule: &Rule) -> Vec<String> {
    let mut buf = MsgBuf::new();
    let Some(nlh) = nft_message(buf.write(rule, 0, MsgType::Add)) else {
        return Vec::new();
    };
    let parsed = OwnedRule::new();
    // SAFETY: `nlh` is one whole message (`nft_message`), which libnftnl parses within its
    // length, into the live rule.
    if unsafe { sys::nftnl_rule_nlmsg_parse(nlh.cast(), parsed.as_ptr()) } < 0 {
        return Vec::new();
    }
    render_exprs(&parsed)
}

#[cfg(test)]
mod tests {
    //! No kernel here: messages are built and parsed back the way the kernel would read them.
    use super::*;
    use nftnl::{Chain, ProtoFamily, Table};

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
        assert_eq!(parse_ack(&m[..10]), None);
    }

    #[test]
    fn only_whole_messages_are_parsed() {
        let t = Table::new(c"t", ProtoFamily::Inet);
        let c = Chain::new(c"c", &t);
        let mut r = Rule::new(&c);
        r.add_expr(&nftnl::expr::Verdict::Accept);
        let mut buf = MsgBuf::new();
        let msg = buf.write(&r, 0, MsgType::Add);
        let (table, info) = RuleInfo::parse(msg).expect("a whole message parses");
        assert_eq!((table.as_str(), info.chain.as_str()), ("t", "c"));
        assert_eq!(info.exprs, ["[ immediate reg 0 accept ]"]);
        // Cut short, or shifted off its alignment: libnftnl never sees it.
        assert_eq!(RuleInfo::parse(&msg[..msg.len() - 4]), None);
        let mut shifted = vec![0u8; msg.len() + 1];
        shifted[1..].copy_from_slice(msg);
        let misaligned = &shifted[1..];
        if !misaligned.as_ptr().cast::<mlibc::nlmsghdr>().is_aligned() {
            assert_eq!(RuleInfo::parse(misaligned), None);
        }
        assert!(!parse_elems(&msg[..16], &mut Vec::new()));
        assert_eq!(parse_table_flags(&msg[..8]), 0);
    }
}
