//! Kernel: compiles a [`Ruleset`] to nftables netlink objects and applies, deletes or checks
//! table `inet mesh_redirect` over one netfilter socket.
//!
//! The socket belongs to the network namespace it was opened in; the caller opens it inside the
//! pod's namespace (see `netns`). Installing is one batch, so the kernel commits all of it or
//! none of it: into a namespace without the table, the table created exclusively with
//! everything in it; over an existing one, add table, delete it, add the new one.

use crate::nft_text;
use crate::nftnl_ext::{
    self, CtZoneSet, Elem, Exclusive, HtonU32, KeyType, Lookup, NamedSet, NoAck, Redir, SetElems,
    Tproxy,
};
use crate::policy::Passthrough6;
use crate::route::{self, Obj, Routing, Rtnl};
use crate::ruleset::{
    Action, ChainKind, Cmp, Elems, Family, HookPoint, L4, Match, Rule as IrRule, Ruleset, TABLE,
};
use nftnl::expr::{self, CmpOp, Immediate, Meta, Payload, Register, Verdict};
use nftnl::nftnl_sys::libc;
use nftnl::{
    Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, NlMsg, Policy, ProtoFamily, Rule, Table,
};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io;
use std::net::IpAddr;

const FAMILY: ProtoFamily = ProtoFamily::Inet;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(io::Error),
    #[error("kernel refused the ruleset at {what}: {err}")]
    Refused { what: String, err: io::Error },
    #[error("netlink conversation with the kernel failed: {0}")]
    Io(#[from] io::Error),
}

impl KernelError {
    /// True for the errors worth retrying (a busy or slow kernel), CNI code 11.
    pub fn is_transient(&self) -> bool {
        let e = match self {
            KernelError::Refused { err, .. } | KernelError::Io(err) | KernelError::Socket(err) => {
                err
            }
        };
        matches!(
            e.raw_os_error(),
            Some(libc::EAGAIN | libc::EBUSY | libc::EINTR | libc::ENOBUFS)
        )
    }
}

fn cstring(s: &str) -> CString {
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

fn make_chain<'t>(table: &'t Table, c: &crate::ruleset::Chain) -> Chain<'t> {
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
type SetIds = BTreeMap<&'static str, u32>;

fn lookup(ids: &SetIds, name: &'static str) -> Lookup {
    Lookup::new(&cstring(name), ids.get(name).copied().unwrap_or(0), false)
}

/// Compiles one rule into netlink expressions.
fn compile_rule<'c>(chain: &'c Chain<'c>, r: &IrRule, ids: &SetIds) -> Rule<'c> {
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
struct Built {
    batch: FinalizedBatch,
    what: Vec<String>,
}

impl Built {
    /// The sequence numbers of our messages (without the batch begin/end markers).
    fn message_seqs(&self) -> std::ops::Range<u32> {
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

    fn describe(&self, seq: u32) -> String {
        let start = self.message_seqs().start;
        seq.checked_sub(start)
            .and_then(|i| self.what.get(i as usize))
            .cloned()
            .unwrap_or_else(|| format!("message {seq}"))
    }
}

fn set_ids(rs: &Ruleset) -> SetIds {
    rs.sets
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name, i as u32 + 1))
        .collect()
}

/// How the batch brings the table in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
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

fn replace_batch(rs: &Ruleset, how: Replace, name: &str) -> Built {
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
        .map(|(_, (_, _, e))| 1 + nftnl_ext::elem_chunks(e.len()))
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

fn delete_batch(name: &str) -> Built {
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

/// `nft`'s names for table flags.
fn table_flag_names(flags: u32) -> String {
    let mut names = Vec::new();
    for (bit, name) in [(1u32, "dormant"), (2, "owner"), (4, "persist")] {
        if flags & bit != 0 {
            names.push(name.to_string());
        }
    }
    let rest = flags & !7;
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    names.join(",")
}

/// A mesh's own capture rules found in a pod's namespace (its init container's or its CNI
/// plugin's): the mesh, and what showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignCapture {
    pub mesh: &'static str,
    pub evidence: String,
}

/// How a namespace's table compares with the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The table's flags, `None` when there is no table.
    pub table_flags: Option<u32>,
    /// What differs, in words (empty: the table is exactly the plan).
    pub differences: Vec<String>,
}

/// `NFT_TABLE_F_OWNER`: the table belongs to one netlink socket, and only it may change it.
pub const TABLE_F_OWNER: u32 = 2;

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.differences.is_empty()
    }

    pub fn table_missing(&self) -> bool {
        self.table_flags.is_none()
    }

    /// Someone in the namespace holds the table as its owner: the kernel refuses every change
    /// from anyone else until that socket closes.
    pub fn owned_by_another(&self) -> bool {
        self.table_flags.is_some_and(|f| f & TABLE_F_OWNER != 0)
    }
}

/// The netfilter socket of one network namespace, and its rtnetlink socket when TPROXY's
/// policy routing or `::6` on `lo` is involved.
pub struct Kernel {
    sock: nftnl_ext::Socket,
    routing: Option<RoutingSocket>,
    /// The table this socket manages: `mesh_redirect`, or another tool's of its own (the
    /// bypass probe's), so that neither can touch the other's.
    table: &'static str,
}

struct RoutingSocket {
    rtnl: Rtnl,
    /// Whether IPv6 is on in the namespace, if asked (see [`Sockets`]).
    ipv6: Option<bool>,
}

/// A netfilter socket, kept open past its job, for someone who can afford its release.
///
/// Releasing a netfilter socket can wait: nf_tables' netlink notifier flushes the
/// transaction-destroy work, which frees deleted objects only after an RCU grace period (10-15
/// ms on an idle node with lazy RCU). Since Linux 6.14 (fb8286562ecf, in stable kernels since
/// March 2025) that work is per namespace, so only a socket whose own commit deleted something
/// waits: DEL, a re-ADD. Before, it was one global work item, flushed on every release, so any
/// plugin run, an ADD included, could wait for other pods' DELs (docs/PERFORMANCE.md). The
/// commit itself is done either way; only the freeing is pending. A `Linger` lets the plugin
/// hand the socket to the node agent instead of making the runtime wait; dropped, it closes
/// here and waits as before.
#[derive(Debug, Default)]
#[must_use = "dropped, it closes the socket and waits; hand it over instead"]
pub struct Linger(Option<std::os::fd::OwnedFd>);

impl Linger {
    /// The descriptor to hand over.
    pub fn into_fd(self) -> Option<std::os::fd::OwnedFd> {
        self.0
    }
}

/// Which sockets a job opens in the pod's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sockets {
    /// The netfilter socket only.
    Netfilter,
    /// Also rtnetlink, and whether IPv6 is on (read from the namespace's own `/proc` while
    /// inside it: TPROXY's IPv6 rule and route, DEL and CHECK need to know).
    Routing,
    /// Also rtnetlink, without asking about IPv6: installing only `::6` learns it from the
    /// kernel's answer to the add (`EACCES` with IPv6 off), which saves a `/proc` read per ADD.
    RoutingAnswerTells,
}

impl Sockets {
    /// What installing `rs` needs.
    pub fn to_install(rs: &Ruleset) -> Sockets {
        if !rs.needs_rtnetlink() {
            Sockets::Netfilter
        } else if rs.routing.is_some() {
            Sockets::Routing
        } else {
            Sockets::RoutingAnswerTells
        }
    }

    /// What comparing the kernel with `rs` needs.
    pub fn to_compare(rs: &Ruleset) -> Sockets {
        if rs.needs_rtnetlink() {
            Sockets::Routing
        } else {
            Sockets::Netfilter
        }
    }
}

/// The errors an IPv6 address add gets when IPv6 is off in the namespace: disabled on the
/// device (`EACCES`) or not in the kernel at all (`EAFNOSUPPORT`).
fn ipv6_is_off(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EAFNOSUPPORT))
}

/// What rtnetlink objects a ruleset wants beside its table. `ipv6` unknown: `::6` is tried.
fn rtnl_objects(rs: &Ruleset, ipv6: Option<bool>) -> (Routing, Vec<Obj>) {
    let r = rs.routing.unwrap_or_default();
    let mut objs = match rs.routing {
        Some(r) => r.objects(ipv6.unwrap_or(false)),
        None => Vec::new(),
    };
    let want6 = match rs.passthrough6 {
        Passthrough6::No => false,
        Passthrough6::Yes => true,
        Passthrough6::IfIpv6Enabled => ipv6 != Some(false),
    };
    if want6 {
        objs.push(Obj::Passthrough6);
    }
    (r, objs)
}

impl Kernel {
    /// Opens the netfilter socket in the calling thread's current network namespace.
    pub fn open() -> Result<Kernel, KernelError> {
        Kernel::open_table(TABLE)
    }

    /// Like [`Kernel::open`], for table `inet NAME` instead of `inet mesh_redirect`.
    pub fn open_table(name: &'static str) -> Result<Kernel, KernelError> {
        Ok(Kernel {
            sock: nftnl_ext::Socket::open().map_err(KernelError::Socket)?,
            routing: None,
            table: name,
        })
    }

    /// Opens `which` sockets in the calling thread's current network namespace.
    pub fn open_sockets(which: Sockets) -> Result<Kernel, KernelError> {
        let mut k = Kernel::open()?;
        if which != Sockets::Netfilter {
            k.routing = Some(RoutingSocket {
                rtnl: Rtnl::open().map_err(KernelError::Socket)?,
                ipv6: (which == Sockets::Routing).then(route::ipv6_enabled),
            });
        }
        Ok(k)
    }

    fn routing_socket(&mut self) -> Result<&mut RoutingSocket, KernelError> {
        self.routing.as_mut().ok_or_else(|| {
            KernelError::Socket(io::Error::other(
                "no rtnetlink socket: open the kernel with routing",
            ))
        })
    }

    /// Adds the rtnetlink objects; on failure removes the ones this call added.
    /// Returns the ones it added (for rolling back if what follows fails).
    fn add_routing(&mut self, rs: &Ruleset) -> Result<(Routing, Vec<Obj>), KernelError> {
        let sock = self.routing_socket()?;
        let (r, objs) = rtnl_objects(rs, sock.ipv6);
        let mut added = Vec::new();
        for o in objs {
            match sock.rtnl.add(&r, o) {
                Ok(true) => added.push(o),
                Ok(false) => {}
                // Asked without knowing: IPv6 is off, so there is no `::6` to add.
                Err(err)
                    if o == Obj::Passthrough6
                        && rs.passthrough6 == Passthrough6::IfIpv6Enabled
                        && ipv6_is_off(&err) =>
                {
                    sock.ipv6 = Some(false);
                }
                Err(err) => {
                    for a in added.iter().rev() {
                        let _ = sock.rtnl.del(&r, *a);
                    }
                    let mut what = r.describe(o);
                    if err.raw_os_error() == Some(libc::ENETDOWN) {
                        what.push_str(" (lo is down in the pod's namespace: the runtime's loopback plugin must run first)");
                    }
                    return Err(KernelError::Refused { what, err });
                }
            }
        }
        Ok((r, added))
    }

    /// Best effort, newest first: used to undo, where the first error is already reported.
    fn remove_routing(&mut self, r: &Routing, objs: &[Obj]) {
        if let Some(rs) = self.routing.as_mut() {
            for o in objs.iter().rev() {
                let _ = rs.rtnl.del(r, *o);
            }
        }
    }

    /// Closes the sockets, keeping a second descriptor of the netfilter socket (see
    /// [`Linger`]): this close is then immediate. Without one (no descriptor left) it waits
    /// here, as it always did.
    pub fn close_lingering(self) -> Linger {
        Linger(self.sock.dup_fd().ok())
    }

    fn send(&mut self, built: &Built) -> Result<(), KernelError> {
        let errors = self
            .sock
            .send_batch(&built.batch, built.message_seqs().end - 1)?;
        match errors.into_iter().next() {
            None => Ok(()),
            Some(e) => Err(KernelError::Refused {
                what: built.describe(e.seq),
                err: e.err,
            }),
        }
    }

    /// Installs `rs` as table `inet mesh_redirect`, replacing any previous one, atomically;
    /// with TPROXY, its policy routing first. One logical transaction: if the table is refused,
    /// the routing this call added is removed again, and if the routing is refused, the table
    /// is not touched.
    pub fn replace(&mut self, rs: &Ruleset) -> Result<(), KernelError> {
        let added = if rs.needs_rtnetlink() {
            Some(self.add_routing(rs)?)
        } else {
            None
        };
        let res = self.install(rs);
        if res.is_err()
            && let Some((r, objs)) = &added
        {
            self.remove_routing(r, objs);
        }
        res
    }

    /// The table: created fresh when there is none (the cheap commit), else replaced. If a
    /// table appears between the question and the batch (a concurrent ADD), the exclusive
    /// create fails as a whole and the replace runs instead.
    fn install(&mut self, rs: &Ruleset) -> Result<(), KernelError> {
        if !self.table_exists()? {
            match self.create(rs) {
                Err(KernelError::Refused { err, .. })
                    if err.raw_os_error() == Some(libc::EEXIST) => {}
                other => return other,
            }
        }
        self.send(&replace_batch(rs, Replace::Replace, self.table))
    }

    /// Creates the table with `rs` in it, exclusively: refused with `EEXIST` (and nothing
    /// changed) when the table is already there. No routing.
    pub fn create(&mut self, rs: &Ruleset) -> Result<(), KernelError> {
        self.send(&replace_batch(rs, Replace::Create, self.table))
    }

    /// Deletes the table if it exists, `routing`'s objects, and `::6` on `lo` if it carries
    /// our mark (we added it). Idempotent. Returns whether there was a table.
    ///
    /// Asks first: a commit, even an empty-handed one, makes closing the socket wait for an
    /// RCU grace period (the kernel flushes its transaction-destroy work on socket release),
    /// which DEL of an uncaptured pod need not pay.
    pub fn delete(&mut self, routing: Option<&Routing>) -> Result<bool, KernelError> {
        let existed = self.table_exists()?;
        if existed {
            self.send(&delete_batch(self.table))?;
        }
        if self.routing.is_some() {
            let rs = self.routing_socket()?;
            let ipv6 = *rs.ipv6.get_or_insert(true);
            let objs = routing.map(|r| r.objects(ipv6)).unwrap_or_default();
            let r = routing.copied().unwrap_or_default();
            for o in objs.into_iter().rev() {
                rs.rtnl.del(&r, o).map_err(|err| KernelError::Refused {
                    what: format!("removing {}", r.describe(o)),
                    err,
                })?;
            }
            if ipv6 && rs.rtnl.passthrough6()? == Some(true) {
                rs.rtnl
                    .del(&r, Obj::Passthrough6)
                    .map_err(|err| KernelError::Refused {
                        what: format!("removing {}", route::describe_passthrough6()),
                        err,
                    })?;
            }
        }
        Ok(existed)
    }

    /// A mesh's own capture rules in this namespace, if any: iptables(-nft) chains of
    /// istio-iptables (`ISTIO_*`), linkerd2-proxy-init (`PROXY_INIT_*`) or Kuma (`KUMA_MESH_*`),
    /// or istio-cni's nftables tables (`istio-proxy-*`). Legacy iptables is not visible over
    /// nftables netlink; the caller checks it separately.
    pub fn foreign_capture(&mut self) -> Result<Option<ForeignCapture>, KernelError> {
        for (table, chain) in self.sock.all_chains()? {
            if table == self.table {
                continue;
            }
            let mesh = if chain.starts_with("ISTIO_") || table.starts_with("istio-proxy") {
                "istio"
            } else if chain.starts_with("PROXY_INIT_") {
                "linkerd"
            } else if chain.starts_with("KUMA_MESH") {
                "kuma"
            } else {
                continue;
            };
            return Ok(Some(ForeignCapture {
                mesh,
                evidence: format!("chain {chain} in table {table}"),
            }));
        }
        Ok(None)
    }

    pub fn table_exists(&mut self) -> Result<bool, KernelError> {
        Ok(self.sock.table_exists(FAMILY as u16, self.table)?)
    }

    /// Compares the kernel's table with `rs`: what differs (nothing: identical).
    pub fn diff(&mut self, rs: &Ruleset) -> Result<Drift, KernelError> {
        let fam = FAMILY as u16;
        let table = self.table;
        let Some(flags) = self.sock.table_flags(fam, table)? else {
            return Ok(Drift {
                table_flags: None,
                differences: vec![format!("table inet {table} is missing")],
            });
        };
        let mut diffs = Vec::new();
        if flags != 0 {
            // Dormant (`flags dormant`) turns every hook off: nothing is captured.
            diffs.push(format!(
                "table inet {table} has flags {} (expected none)",
                table_flag_names(flags)
            ));
        }
        self.diff_chains(rs, &mut diffs)?;
        // Sets.
        let have_sets = self.sock.sets(fam, table)?;
        for s in &rs.sets {
            let (key, interval, want) = encode_elems(&s.elems);
            let Some(info) = have_sets.iter().find(|h| h.name == s.name) else {
                diffs.push(format!("set {} is missing", s.name));
                continue;
            };
            let want_flags = if interval {
                libc::NFT_SET_INTERVAL as u32
            } else {
                0
            };
            // Every flag changes what a lookup does (a map, timeouts, a constant set…).
            if info.key_type != key.type_id() || info.key_len != key.key_len() {
                diffs.push(format!(
                    "set {} has key type {}/{} bytes (expected {}/{})",
                    s.name,
                    info.key_type,
                    info.key_len,
                    key.type_id(),
                    key.key_len()
                ));
                continue;
            }
            if info.flags != want_flags {
                diffs.push(format!(
                    "set {} has flags {:#x} (expected {want_flags:#x})",
                    s.name, info.flags
                ));
                continue;
            }
            let have: BTreeSet<Elem> = self
                .sock
                .set_elems(fam, table, s.name)?
                .into_iter()
                .collect();
            let want: BTreeSet<Elem> = want.into_iter().collect();
            if have != want {
                let missing = want.difference(&have).count();
                let extra = have.difference(&want).count();
                diffs.push(format!(
                    "set {} elements differ: {missing} expected element key(s) missing, {extra} unexpected (expected {} elements from the plan)",
                    s.name,
                    s.elems.len()
                ));
            }
        }
        for h in &have_sets {
            if rs.set(&h.name).is_none() {
                diffs.push(format!("unexpected set {}", h.name));
            }
        }
        self.diff_rules(rs, &mut diffs)?;
        if rs.needs_rtnetlink() {
            let sock = self.routing_socket()?;
            let (r, objs) = rtnl_objects(rs, sock.ipv6);
            for o in objs {
                if !sock.rtnl.exists(&r, o)? {
                    diffs.push(format!("{} is missing", r.describe(o)));
                }
            }
        }
        Ok(Drift {
            table_flags: Some(flags),
            differences: diffs,
        })
    }

    fn diff_chains(&mut self, rs: &Ruleset, diffs: &mut Vec<String>) -> Result<(), KernelError> {
        let have = self.sock.chains(FAMILY as u16, self.table)?;
        for c in &rs.chains {
            let Some(h) = have.iter().find(|h| h.name == c.name) else {
                diffs.push(format!("chain {} is missing", c.name));
                continue;
            };
            let want = c.hook.map(|hk| {
                let num = match hk.point {
                    HookPoint::Prerouting => libc::NF_INET_PRE_ROUTING,
                    HookPoint::Output => libc::NF_INET_LOCAL_OUT,
                } as u32;
                let kind = match hk.kind {
                    ChainKind::Nat => "nat",
                    ChainKind::Filter => "filter",
                    ChainKind::Route => "route",
                };
                (num, hk.priority, kind.to_string())
            });
            if h.hook != want {
                let show = |hk: &Option<(u32, i32, String)>| match hk {
                    None => "no hook".to_string(),
                    Some((n, p, t)) => format!("type {t} hook {n} priority {p}"),
                };
                diffs.push(format!(
                    "chain {} has {} (expected {})",
                    c.name,
                    show(&h.hook),
                    show(&want)
                ));
            }
            // Base chains are created with policy accept: anything else drops what no rule
            // decided (or, on a regular chain, cannot be set at all).
            let want_policy = c.hook.map(|_| libc::NF_ACCEPT as u32);
            if c.hook.is_some() && h.policy != want_policy {
                diffs.push(format!(
                    "chain {} has policy {} (expected accept)",
                    c.name,
                    match h.policy {
                        Some(p) if p == libc::NF_DROP as u32 => "drop".to_string(),
                        Some(p) => p.to_string(),
                        None => "none".to_string(),
                    }
                ));
            }
        }
        for h in &have {
            if !rs.chains.iter().any(|c| c.name == h.name) {
                diffs.push(format!("unexpected chain {}", h.name));
            }
        }
        Ok(())
    }

    fn diff_rules(&mut self, rs: &Ruleset, diffs: &mut Vec<String>) -> Result<(), KernelError> {
        let have = self.sock.rules(FAMILY as u16, self.table)?;
        let table = Table::new(cstring(self.table), FAMILY);
        let ids = set_ids(rs);
        for c in &rs.chains {
            let chain = make_chain(&table, c);
            let want: Vec<Vec<String>> = c
                .rules
                .iter()
                .map(|r| nftnl_ext::render_rule(&compile_rule(&chain, r, &ids)))
                .collect();
            let got: Vec<&nftnl_ext::RuleInfo> =
                have.iter().filter(|r| r.chain == c.name).collect();
            if got.iter().map(|r| &r.exprs).eq(want.iter()) {
                continue;
            }
            let mut unmatched = got.clone();
            for (i, w) in want.iter().enumerate() {
                match unmatched.iter().position(|g| g.exprs == *w) {
                    Some(p) => {
                        unmatched.remove(p);
                    }
                    None => diffs.push(format!(
                        "chain {}: rule {} is missing: {}",
                        c.name,
                        i + 1,
                        nft_text::rule(&c.rules[i])
                    )),
                }
            }
            for g in &unmatched {
                diffs.push(format!(
                    "chain {}: unexpected rule (handle {}): {}",
                    c.name,
                    g.handle,
                    g.exprs.join(" ")
                ));
            }
            if unmatched.is_empty() && got.len() == want.len() {
                diffs.push(format!("chain {}: rules are in the wrong order", c.name));
            }
        }
        Ok(())
    }
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
