//! Ruleset → nftnl objects and batches: set elements as netlink encodes them, chains, rules
//! (each IR match and action as expressions), and the batches that create, replace or delete
//! the table. Pure: nothing here talks to the kernel.

use crate::ffi::{
    CtZoneSet, Elem, Exclusive, HtonU32, KeyType, Lookup, NamedSet, NoAck, Redir, SetElems, Tproxy,
    elem_chunks,
};
use crate::nft_text;
use crate::ruleset::{
    Action, ChainKind, Cmp, Elems, Family, HookPoint, L4, Match, Rule as IrRule, Ruleset,
};
use nftnl::expr::{self, CmpOp, Immediate, Meta, Payload, Register, Verdict};
use nftnl::nftnl_sys::libc;
use nftnl::{
    Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, NlMsg, Policy, ProtoFamily, Rule, Table,
};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::IpAddr;

/// Our table's family: `inet`, IPv4 and IPv6 in one table.
pub(super) const FAMILY: ProtoFamily = ProtoFamily::Inet;

pub(super) fn cstring(s: &str) -> CString {
    // Names come from our own constants and validated interface names: no NUL inside.
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// Key type, interval flag and netlink elements of a set.
pub fn encode_elems(e: &Elems) -> (KeyType, bool, Vec<Elem>) {
    match e {
        Elems::V4(nets) => {
            let ranges = nets.iter().map(|n| {
                (
                    u32::from(n.network()) as u128,
                    u32::from(n.broadcast()) as u128,
                )
            });
            (
                KeyType::Ipv4Addr,
                true,
                intervals(ranges, u32::MAX as u128, 4),
            )
        }
        Elems::V6(nets) => {
            let ranges = nets
                .iter()
                .map(|n| (u128::from(n.network()), u128::from(n.broadcast())));
            (KeyType::Ipv6Addr, true, intervals(ranges, u128::MAX, 16))
        }
        Elems::Ports(ports) => (
            KeyType::InetService,
            false,
            ports
                .iter()
                .map(|p| Elem {
                    key: p.to_be_bytes().to_vec(),
                    interval_end: false,
                })
                .collect(),
        ),
        Elems::PortRanges(ranges) => (
            KeyType::InetService,
            true,
            intervals(
                ranges.iter().map(|&(a, b)| (a as u128, b as u128)),
                u16::MAX as u128,
                2,
            ),
        ),
        Elems::Ifnames(names) => (
            KeyType::Ifname,
            false,
            names
                .iter()
                .map(|n| Elem {
                    key: ifname_key(n),
                    interval_end: false,
                })
                .collect(),
        ),
    }
}

/// `IFNAMSIZ` bytes, NUL-padded, as the kernel compares interface names.
fn ifname_key(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.resize(16, 0);
    k
}

/// Encodes inclusive ranges the way nft does for an interval set: merged, each as a start key
/// and an exclusive-end key flagged `INTERVAL_END`, with an end marker at 0 when the first range
/// does not start there, and no end key for a range reaching the top of the key space.
fn intervals(ranges: impl Iterator<Item = (u128, u128)>, max: u128, len: usize) -> Vec<Elem> {
    let mut sorted: Vec<(u128, u128)> = ranges.collect();
    sorted.sort();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (s, e) in sorted {
        match merged.last_mut() {
            Some(last) if last.1 == max || s <= last.1 + 1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let key = |v: u128| v.to_be_bytes()[16 - len..].to_vec();
    let mut out = Vec::new();
    if merged.first().is_some_and(|&(s, _)| s != 0) {
        out.push(Elem {
            key: key(0),
            interval_end: true,
        });
    }
    for (s, e) in merged {
        out.push(Elem {
            key: key(s),
            interval_end: false,
        });
        if e != max {
            out.push(Elem {
                key: key(e + 1),
                interval_end: true,
            });
        }
    }
    out
}

pub(super) fn make_chain<'t>(table: &'t Table, c: &crate::ruleset::Chain) -> Chain<'t> {
    let mut chain = Chain::new(cstring(c.name), table);
    if let Some(h) = c.hook {
        let point = match h.point {
            HookPoint::Prerouting => Hook::PreRouting,
            HookPoint::Output => Hook::Out,
        };
        chain.set_hook(point, h.priority);
        chain.set_type(match h.kind {
            ChainKind::Nat => ChainType::Nat,
            ChainKind::Filter => ChainType::Filter,
            ChainKind::Route => ChainType::Route,
        });
        chain.set_policy(Policy::Accept);
    }
    chain
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => libc::NFPROTO_IPV4 as u8,
        Family::V6 => libc::NFPROTO_IPV6 as u8,
    }
}

fn cmp_op(c: Cmp) -> CmpOp {
    match c {
        Cmp::Eq => CmpOp::Eq,
        Cmp::Ne => CmpOp::Neq,
    }
}

fn addr_payload(a: &IpAddr, src: bool) -> Payload {
    use expr::{Ipv4HeaderField as F4, Ipv6HeaderField as F6, NetworkHeaderField as N};
    Payload::Network(match (a, src) {
        (IpAddr::V4(_), true) => N::Ipv4(F4::Saddr),
        (IpAddr::V4(_), false) => N::Ipv4(F4::Daddr),
        (IpAddr::V6(_), true) => N::Ipv6(F6::Saddr),
        (IpAddr::V6(_), false) => N::Ipv6(F6::Daddr),
    })
}

fn unspecified(f: Family) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

fn daddr_payload(f: Family) -> Payload {
    addr_payload(&unspecified(f), false)
}

/// `th dport`: TCP and UDP keep the destination port at the same offset.
fn dport_payload() -> Payload {
    Payload::Transport(expr::TransportHeaderField::Tcp(expr::TcpHeaderField::Dport))
}

fn cmp_bytes(rule: &mut Rule, c: Cmp, data: &[u8]) {
    rule.add_expr(&expr::Cmp::new(cmp_op(c), data));
}

/// Set name → (id in this transaction, for lookups).
pub(super) type SetIds = BTreeMap<&'static str, u32>;

fn lookup(ids: &SetIds, name: &'static str) -> Lookup {
    Lookup::new(&cstring(name), ids.get(name).copied().unwrap_or(0), false)
}

/// Compiles one rule into netlink expressions.
pub(super) fn compile_rule<'c>(chain: &'c Chain<'c>, r: &IrRule, ids: &SetIds) -> Rule<'c> {
    let mut rule = Rule::new(chain);
    for m in &r.matches {
        match m {
            Match::NfProto(f) => {
                rule.add_expr(&Meta::NfProto);
                cmp_bytes(&mut rule, Cmp::Eq, &[nfproto(*f)]);
            }
            Match::L4Proto(p) => {
                rule.add_expr(&Meta::L4Proto);
                let proto = match p {
                    L4::Tcp => libc::IPPROTO_TCP,
                    L4::Udp => libc::IPPROTO_UDP,
                };
                cmp_bytes(&mut rule, Cmp::Eq, &[proto as u8]);
            }
            Match::Iifname(n) | Match::Oifname(n) => {
                rule.add_expr(if matches!(m, Match::Iifname(_)) {
                    &Meta::IifName
                } else {
                    &Meta::OifName
                });
                cmp_bytes(&mut rule, Cmp::Eq, &ifname_key(n));
            }
            Match::IifnamePrefix(p) | Match::OifnamePrefix(p) => {
                // An empty prefix (`+` alone) matches every interface: no condition at all.
                if !p.is_empty() {
                    rule.add_expr(if matches!(m, Match::IifnamePrefix(_)) {
                        &Meta::IifName
                    } else {
                        &Meta::OifName
                    });
                    // Comparing only the prefix's bytes (no NUL) is a wildcard match.
                    cmp_bytes(&mut rule, Cmp::Eq, p.as_bytes());
                }
            }
            Match::IifnameIn(s) | Match::OifnameIn(s) => {
                rule.add_expr(if matches!(m, Match::IifnameIn(_)) {
                    &Meta::IifName
                } else {
                    &Meta::OifName
                });
                rule.add_expr(&lookup(ids, s));
            }
            Match::Saddr(a) => {
                rule.add_expr(&addr_payload(a, true));
                cmp_bytes(&mut rule, Cmp::Eq, &ip_bytes(a));
            }
            Match::Daddr(c, a) => {
                rule.add_expr(&addr_payload(a, false));
                cmp_bytes(&mut rule, *c, &ip_bytes(a));
            }
            Match::DaddrIn(f, s) => {
                rule.add_expr(&daddr_payload(*f));
                rule.add_expr(&lookup(ids, s));
            }
            Match::SaddrIn(f, s) => {
                rule.add_expr(&addr_payload(&unspecified(*f), true));
                rule.add_expr(&lookup(ids, s));
            }
            Match::DportRange(lo, hi) => {
                rule.add_expr(&dport_payload());
                rule.add_expr(&expr::Cmp::new(CmpOp::Gte, &lo.to_be_bytes()[..]));
                rule.add_expr(&expr::Cmp::new(CmpOp::Lte, &hi.to_be_bytes()[..]));
            }
            Match::SkUidRange(lo, hi) => {
                rule.add_expr(&Meta::SkUid);
                rule.add_expr(&HtonU32);
                rule.add_expr(&expr::Cmp::new(CmpOp::Gte, &lo.to_be_bytes()[..]));
                rule.add_expr(&expr::Cmp::new(CmpOp::Lte, &hi.to_be_bytes()[..]));
            }
            Match::CtInvalid => {
                rule.add_expr(&expr::Conntrack::State);
                let bits = expr::States::INVALID.bits();
                rule.add_expr(&expr::Bitwise::new(bits, 0u32));
                cmp_bytes(&mut rule, Cmp::Ne, &0u32.to_ne_bytes());
            }
            Match::Dport(c, p) => {
                rule.add_expr(&dport_payload());
                cmp_bytes(&mut rule, *c, &p.to_be_bytes());
            }
            Match::DportIn(s) => {
                rule.add_expr(&dport_payload());
                rule.add_expr(&lookup(ids, s));
            }
            Match::SkUid(c, id) | Match::SkGid(c, id) => {
                rule.add_expr(if matches!(m, Match::SkUid(..)) {
                    &Meta::SkUid
                } else {
                    &Meta::SkGid
                });
                cmp_bytes(&mut rule, *c, &id.to_ne_bytes());
            }
            Match::Sport(p) => {
                rule.add_expr(&Payload::Transport(expr::TransportHeaderField::Tcp(
                    expr::TcpHeaderField::Sport,
                )));
                cmp_bytes(&mut rule, Cmp::Eq, &p.to_be_bytes());
            }
            Match::Mark(c, mark) => {
                rule.add_expr(&Meta::Mark { set: false });
                cmp_bytes(&mut rule, *c, &mark.to_ne_bytes());
            }
            Match::CtMark(mark) => {
                rule.add_expr(&expr::Conntrack::Mark { set: false });
                cmp_bytes(&mut rule, Cmp::Eq, &mark.to_ne_bytes());
            }
            Match::CtEstablished => {
                // ct state & (established | related) != 0
                rule.add_expr(&expr::Conntrack::State);
                let bits = (expr::States::ESTABLISHED | expr::States::RELATED).bits();
                rule.add_expr(&expr::Bitwise::new(bits, 0u32));
                cmp_bytes(&mut rule, Cmp::Ne, &0u32.to_ne_bytes());
            }
        }
    }
    let set_mark = |rule: &mut Rule, mark: u32| {
        rule.add_expr(&Immediate::new(mark.to_ne_bytes(), Register::Reg1));
        rule.add_expr(&Meta::Mark { set: true });
    };
    match &r.action {
        Action::Return => rule.add_expr(&Verdict::Return),
        Action::Accept => rule.add_expr(&Verdict::Accept),
        Action::Drop => rule.add_expr(&Verdict::Drop),
        Action::Jump(c) => rule.add_expr(&Verdict::Jump { chain: cstring(c) }),
        Action::Redirect(port) => {
            rule.add_expr(&Immediate::new(port.to_be_bytes(), Register::Reg1));
            rule.add_expr(&Redir {
                port: Register::Reg1,
            });
        }
        Action::Tproxy { family, port, mark } => {
            rule.add_expr(&Immediate::new(port.to_be_bytes(), Register::Reg1));
            rule.add_expr(&Tproxy {
                nfproto: nfproto(*family) as u32,
                port: Register::Reg1,
            });
            set_mark(&mut rule, *mark);
            rule.add_expr(&Verdict::Accept);
        }
        Action::SetMark(mark) => set_mark(&mut rule, *mark),
        Action::SetMarkAccept(mark) => {
            set_mark(&mut rule, *mark);
            rule.add_expr(&Verdict::Accept);
        }
        Action::SaveMark => {
            rule.add_expr(&Meta::Mark { set: false });
            rule.add_expr(&expr::Conntrack::Mark { set: true });
        }
        Action::RestoreMark => {
            rule.add_expr(&expr::Conntrack::Mark { set: false });
            rule.add_expr(&Meta::Mark { set: true });
        }
        Action::CtZone(zone) => {
            rule.add_expr(&Immediate::new(zone.to_ne_bytes(), Register::Reg1));
            rule.add_expr(&CtZoneSet);
            rule.add_expr(&Verdict::Return);
        }
    }
    if !r.comment.is_empty() {
        // Comments are ours and short; a failure would only lose the comment.
        let _ = rule.set_comment(cstring(r.comment));
    }
    rule
}

fn ip_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// A built batch and, for each message in it, what it is (for error messages).
pub(super) struct Built {
    pub(super) batch: FinalizedBatch,
    what: Vec<String>,
}

impl Built {
    /// The sequence numbers of our messages (without the batch begin/end markers).
    pub(super) fn message_seqs(&self) -> std::ops::Range<u32> {
        let all = self.batch.sequence_numbers();
        let n = self.what.len() as u32;
        // Kernels >= 6.10 also ACK the begin/end markers, and the crate numbers them then.
        let start = if all.end - all.start == n + 2 {
            all.start + 1
        } else {
            all.start
        };
        start..start + n
    }

    pub(super) fn describe(&self, seq: u32) -> String {
        let start = self.message_seqs().start;
        seq.checked_sub(start)
            .and_then(|i| self.what.get(i as usize))
            .cloned()
            .unwrap_or_else(|| format!("message {seq}"))
    }
}

pub(super) fn set_ids(rs: &Ruleset) -> SetIds {
    rs.sets
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name, i as u32 + 1))
        .collect()
}

/// How the batch brings the table in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Replace {
    /// There is none: create it exclusively (EEXIST if one appeared meanwhile). A commit that
    /// only adds leaves the kernel no destroy work, so closing the socket does not wait for an
    /// RCU grace period (see `docs/PERFORMANCE.md`).
    Create,
    /// add table; delete table (whatever was there); then the whole new table.
    Replace,
}

/// Adds messages to a batch, each without `NLM_F_ACK` but the last (see [`NoAck`]), and
/// records what each one is.
struct Messages {
    batch: Batch,
    what: Vec<String>,
    /// Messages still to add, this one included.
    left: usize,
}

impl Messages {
    fn new(total: usize) -> Messages {
        Messages {
            batch: Batch::new(),
            what: Vec::with_capacity(total),
            left: total,
        }
    }

    fn add<T: NlMsg>(&mut self, msg: &T, ty: MsgType, what: String) {
        self.left = self.left.saturating_sub(1);
        if self.left == 0 {
            self.batch.add(msg, ty);
        } else {
            self.batch.add(&NoAck(msg), ty);
        }
        self.what.push(what);
    }

    fn finish(self) -> Built {
        debug_assert_eq!(self.left, 0, "the message count was computed wrong");
        Built {
            batch: self.batch.finalize(),
            what: self.what,
        }
    }
}

pub(super) fn replace_batch(rs: &Ruleset, how: Replace, name: &str) -> Built {
    let table = Table::new(cstring(name), FAMILY);
    let ids = set_ids(rs);
    let sets: Vec<_> = rs
        .sets
        .iter()
        .map(|s| (s, encode_elems(&s.elems)))
        .collect();
    let total = match how {
        Replace::Create => 1,
        Replace::Replace => 3,
    } + sets
        .iter()
        .map(|(_, (_, _, e))| 1 + elem_chunks(e.len()))
        .sum::<usize>()
        + rs.chains.len()
        + rs.chains.iter().map(|c| c.rules.len()).sum::<usize>();
    let mut m = Messages::new(total);
    match how {
        Replace::Create => {
            m.add(
                &Exclusive(&table),
                MsgType::Add,
                format!("table inet {name} (create)"),
            );
        }
        Replace::Replace => {
            m.add(
                &table,
                MsgType::Add,
                format!("table inet {name} (make sure it exists)"),
            );
            m.add(
                &table,
                MsgType::Del,
                format!("table inet {name} (delete the old one)"),
            );
            m.add(&table, MsgType::Add, format!("table inet {name}"));
        }
    }
    for (s, (key, interval, elems)) in &sets {
        let id = ids.get(s.name).copied().unwrap_or(0);
        let name = cstring(s.name);
        m.add(
            &NamedSet::new(&table, &name, id, *key, *interval),
            MsgType::Add,
            format!("set {}", s.name),
        );
        for (part, msg) in SetElems::chunks(&table, &name, id, elems).enumerate() {
            m.add(
                &msg,
                MsgType::Add,
                format!("elements of set {} (message {})", s.name, part + 1),
            );
        }
    }
    let chains: Vec<Chain> = rs.chains.iter().map(|c| make_chain(&table, c)).collect();
    for (c, chain) in rs.chains.iter().zip(&chains) {
        m.add(chain, MsgType::Add, format!("chain {}", c.name));
    }
    for (c, chain) in rs.chains.iter().zip(&chains) {
        for (i, r) in c.rules.iter().enumerate() {
            m.add(
                &compile_rule(chain, r, &ids),
                MsgType::Add,
                format!(
                    "rule {} of chain {} (`{}`)",
                    i + 1,
                    c.name,
                    nft_text::rule(r)
                ),
            );
        }
    }
    m.finish()
}

pub(super) fn delete_batch(name: &str) -> Built {
    let table = Table::new(cstring(name), FAMILY);
    let mut m = Messages::new(2);
    m.add(
        &table,
        MsgType::Add,
        format!("table inet {name} (make sure it exists)"),
    );
    m.add(&table, MsgType::Del, format!("table inet {name} (delete)"));
    m.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elem(key: &[u8], end: bool) -> Elem {
        Elem {
            key: key.to_vec(),
            interval_end: end,
        }
    }

    #[test]
    fn v4_intervals_match_nft_encoding() {
        // nft encodes { 10.0.0.0/8, 172.16.0.0/12, 192.168.1.1 } exactly like this.
        let nets = ["10.0.0.0/8", "172.16.0.0/12", "192.168.1.1/32"].map(|s| s.parse().unwrap());
        let (k, interval, e) = encode_elems(&Elems::V4(nets.to_vec()));
        assert_eq!((k, interval), (KeyType::Ipv4Addr, true));
        assert_eq!(
            e,
            vec![
                elem(&[0, 0, 0, 0], true),
                elem(&[10, 0, 0, 0], false),
                elem(&[11, 0, 0, 0], true),
                elem(&[172, 16, 0, 0], false),
                elem(&[172, 32, 0, 0], true),
                elem(&[192, 168, 1, 1], false),
                elem(&[192, 168, 1, 2], true),
            ]
        );
    }

    #[test]
    fn adjacent_and_full_ranges_merge() {
        let nets = ["11.0.0.0/8", "12.0.0.0/8"].map(|s| s.parse().unwrap());
        let (_, _, e) = encode_elems(&Elems::V4(nets.to_vec()));
        assert_eq!(
            e,
            vec![
                elem(&[0; 4], true),
                elem(&[11, 0, 0, 0], false),
                elem(&[13, 0, 0, 0], true)
            ]
        );
        let (_, _, e) = encode_elems(&Elems::V4(vec!["0.0.0.0/0".parse().unwrap()]));
        assert_eq!(e, vec![elem(&[0; 4], false)]);
        let (_, _, e) = encode_elems(&Elems::V6(vec!["::/0".parse().unwrap()]));
        assert_eq!(e, vec![elem(&[0; 16], false)]);
        let (_, _, e) = encode_elems(&Elems::V4(vec!["255.255.255.255/32".parse().unwrap()]));
        assert_eq!(e, vec![elem(&[0; 4], true), elem(&[255; 4], false)]);
    }

    #[test]
    fn ports_and_ifnames() {
        let (k, interval, e) = encode_elems(&Elems::Ports(vec![80, 15020]));
        assert_eq!((k, interval), (KeyType::InetService, false));
        assert_eq!(e, vec![elem(&[0, 80], false), elem(&[0x3a, 0xac], false)]);
        let (k, _, e) = encode_elems(&Elems::Ifnames(vec!["eth1".into()]));
        assert_eq!(k, KeyType::Ifname);
        assert_eq!(e[0].key.len(), 16);
        assert_eq!(&e[0].key[..5], b"eth1\0");
    }
}
