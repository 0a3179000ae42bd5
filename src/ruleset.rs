//! Ruleset: a capture plan → the nftables objects of table `inet mesh_redirect` (docs/DESIGN.md §2).
//!
//! The result is a small, backend-neutral description (sets, chains, rules made of matches and
//! one action). `nft_text` renders it as `nft -f` input and `kernel` compiles it to netlink;
//! both read the same description, so what `plan` prints is what ADD installs.
//! Address and port lists become named sets, so list size costs one lookup, not one rule each.

use crate::policy::{
    Cidrs, DnsShape, Inbound, Loopback, Mode, OutboundRanges, Passthrough6, Plan, Ports,
};
use ipnet::{Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TABLE: &str = "mesh_redirect";

/// Priority of the nat base chains: iptables' `nat` table position (`dstnat`).
pub const NAT_PRIORITY: i32 = -100;
/// Priority of the TPROXY chain: iptables' `mangle` table position.
pub const MANGLE_PRIORITY: i32 = -150;
/// Before conntrack (-200), like iptables' `raw` table: where conntrack zones are assigned.
pub const RAW_PRIORITY: i32 = -300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
}

/// A named set's elements. Address sets hold non-overlapping CIDRs and are interval sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elems {
    V4(Vec<Ipv4Net>),
    V6(Vec<Ipv6Net>),
    Ports(Vec<u16>),
    /// Inclusive port ranges, non-overlapping: an interval set.
    PortRanges(Vec<(u16, u16)>),
    Ifnames(Vec<String>),
}

impl Elems {
    pub fn len(&self) -> usize {
        match self {
            Elems::V4(v) => v.len(),
            Elems::V6(v) => v.len(),
            Elems::Ports(v) => v.len(),
            Elems::PortRanges(v) => v.len(),
            Elems::Ifnames(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: &'static str,
    pub elems: Elems,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    Prerouting,
    Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    Nat,
    Filter,
    Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub kind: ChainKind,
    pub point: HookPoint,
    pub priority: i32,
}

/// One condition of a rule. Dependencies are explicit: an address match is preceded by
/// `NfProto`, a port match by `L4Proto` or sits in a chain only TCP/UDP can enter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    NfProto(Family),
    L4Proto(L4),
    Iifname(String),
    Oifname(String),
    IifnameIn(&'static str),
    OifnameIn(&'static str),
    /// The interface name starts with this (iptables' `eth+`, nft's `"eth*"`).
    IifnamePrefix(String),
    OifnamePrefix(String),
    Saddr(IpAddr),
    SaddrIn(Family, &'static str),
    Daddr(Cmp, IpAddr),
    DaddrIn(Family, &'static str),
    /// Transport destination port (TCP or UDP: same offset).
    Dport(Cmp, u16),
    /// Transport source port equals.
    Sport(u16),
    DportIn(&'static str),
    /// Transport destination port within an inclusive range.
    DportRange(u16, u16),
    SkUid(Cmp, u32),
    /// Socket owner uid within an inclusive range.
    SkUidRange(u32, u32),
    SkGid(Cmp, u32),
    /// Packet mark (`meta mark`).
    Mark(Cmp, u32),
    /// Connection mark equals (`ct mark`).
    CtMark(u32),
    /// `ct state established,related`.
    CtEstablished,
    /// `ct state invalid`.
    CtInvalid,
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Return,
    Accept,
    Drop,
    Jump(&'static str),
    /// `redirect to :port`.
    Redirect(u16),
    /// `tproxy ip|ip6 to :port meta mark set m accept`.
    Tproxy {
        family: Family,
        port: u16,
        mark: u32,
    },
    /// `meta mark set m` (the packet goes on to the next rule).
    SetMark(u32),
    /// `meta mark set m accept`.
    SetMarkAccept(u32),
    /// `ct mark set meta mark` (goes on).
    SaveMark,
    /// `meta mark set ct mark` (goes on).
    RestoreMark,
    /// `ct zone set z return`: the first zone rule that matches decides.
    CtZone(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
    /// Why the rule exists, shown as an nft comment (`nft list` prints it).
    pub comment: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

/// Everything in table `inet mesh_redirect`, plus what goes beside it over rtnetlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
    /// TPROXY mode: marked packets are routed to the local stack (see `route`).
    pub routing: Option<Routing>,
    /// `::6/128` on `lo`, the proxy's IPv6 inbound-passthrough source.
    pub passthrough6: Passthrough6,
}

impl Ruleset {
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    /// Whether ADD, DEL or CHECK needs the rtnetlink socket.
    pub fn needs_rtnetlink(&self) -> bool {
        self.routing.is_some() || self.passthrough6 != Passthrough6::No
    }
}

// Set names.
pub const SET_EXCLUDE_IFACES: &str = "exclude_ifaces";
pub const SET_IN_PORTS: &str = "in_ports";
pub const SET_IN_EXCLUDE_PORTS: &str = "in_exclude_ports";
pub const SET_OUT_EXCLUDE_PORTS: &str = "out_exclude_ports";
pub const SET_OUT_INCLUDE_PORTS: &str = "out_include_ports";
pub const SET_OUT_EXCLUDE_V4: &str = "out_exclude_v4";
pub const SET_OUT_EXCLUDE_V6: &str = "out_exclude_v6";
pub const SET_OUT_INCLUDE_V4: &str = "out_include_v4";
pub const SET_OUT_INCLUDE_V6: &str = "out_include_v6";
pub const SET_IN_EXCLUDE_SRC_V4: &str = "in_exclude_src_v4";
pub const SET_IN_EXCLUDE_SRC_V6: &str = "in_exclude_src_v6";
pub const SET_REROUTE_IFACES: &str = "reroute_ifaces";

/// The TPROXY mark (Istio's): marks diverted packets and selects routing table 133.
pub const TPROXY_MARK: u32 = 1337;
pub const TPROXY_TABLE: u32 = 133;

/// The TPROXY routing setup: which mark selects which table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    pub mark: u32,
    pub table: u32,
}

/// The one TPROXY setup we install (and, when a pod's plan cannot be made, remove).
impl Default for Routing {
    fn default() -> Self {
        Routing {
            mark: TPROXY_MARK,
            table: TPROXY_TABLE,
        }
    }
}
/// Marks the proxy's own calls to the pod's address over lo, so TPROXY captures them inbound.
pub const PROXY_LOOPBACK_MARK: u32 = 1338;
/// Conntrack zones keeping the two legs of a captured DNS lookup apart (Istio's numbers).
pub const DNS_ZONE_UPSTREAM_LEG: u16 = 1;
pub const DNS_ZONE_APP_LEG: u16 = 2;

const LOOPBACK: [(Family, IpAddr); 2] = [
    (Family::V4, IpAddr::V4(Ipv4Addr::LOCALHOST)),
    (Family::V6, IpAddr::V6(Ipv6Addr::LOCALHOST)),
];
/// The proxy's inbound passthrough source addresses (Envoy binds 127.0.0.6 / ::6).
const PASSTHROUGH: [(Family, IpAddr); 2] = [
    (Family::V4, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))),
    (
        Family::V6,
        IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
    ),
];
const DNS_PORT: u16 = 53;

fn rule(matches: Vec<Match>, action: Action, comment: &'static str) -> Rule {
    Rule {
        matches,
        action,
        comment,
    }
}

struct Builder {
    sets: Vec<Set>,
}

impl Builder {
    /// Adds a set and returns its name, or `None` when there is nothing to put in it (the rule
    /// that would look it up is then left out).
    fn set(&mut self, name: &'static str, elems: Elems) -> Option<&'static str> {
        if elems.is_empty() {
            return None;
        }
        // A set two parts of the ruleset look up (the include ranges) is made once.
        if !self.sets.iter().any(|s| s.name == name) {
            self.sets.push(Set { name, elems });
        }
        Some(name)
    }

    /// A port set: plain while it holds a few ports (Istio's lists), an interval set for wide
    /// ranges (`1-65535` is one interval, not 65,535 elements).
    fn ports(&mut self, name: &'static str, ports: &Ports) -> Option<&'static str> {
        let elems = if ports.count() <= 1024 {
            Elems::Ports(ports.singles().collect())
        } else {
            Elems::PortRanges(ports.ranges().to_vec())
        };
        self.set(name, elems)
    }

    /// Address sets for both families; CIDRs are aggregated so the interval set has no overlap.
    fn cidrs(&mut self, names: [&'static str; 2], c: &Cidrs) -> [Option<&'static str>; 2] {
        [
            self.set(names[0], Elems::V4(Ipv4Net::aggregate(&c.v4))),
            self.set(names[1], Elems::V6(Ipv6Net::aggregate(&c.v6))),
        ]
    }
}

/// The excluded interfaces: exact names in a set, `name+` wildcards one rule each.
struct Ifaces {
    set: Option<&'static str>,
    prefixes: Vec<String>,
}

impl Ifaces {
    fn new(b: &mut Builder, plan: &Plan) -> Ifaces {
        Ifaces::of(b, SET_EXCLUDE_IFACES, &plan.exclude_interfaces)
    }

    fn of(
        b: &mut Builder,
        set: &'static str,
        names: &std::collections::BTreeSet<String>,
    ) -> Ifaces {
        let (wild, exact): (Vec<&String>, Vec<&String>) =
            names.iter().partition(|n| n.ends_with('+'));
        Ifaces {
            set: b.set(set, Elems::Ifnames(exact.into_iter().cloned().collect())),
            prefixes: wild
                .into_iter()
                .map(|n| n.trim_end_matches('+').to_string())
                .collect(),
        }
    }

    /// One match per interface condition: the set of exact names, then each wildcard.
    fn inbound_matches(&self) -> Vec<Match> {
        self.set
            .map(Match::IifnameIn)
            .into_iter()
            .chain(self.prefixes.iter().cloned().map(Match::IifnamePrefix))
            .collect()
    }

    /// The rules returning what arrived on (`inbound`) or leaves on an excluded interface.
    fn returns(&self, inbound: bool) -> Vec<Rule> {
        let comment = if inbound {
            "arrived on an excluded interface"
        } else {
            "leaving on an excluded interface"
        };
        let mut v = Vec::new();
        if let Some(set) = self.set {
            let m = if inbound {
                Match::IifnameIn(set)
            } else {
                Match::OifnameIn(set)
            };
            v.push(rule(vec![m], Action::Return, comment));
        }
        for p in &self.prefixes {
            let m = if inbound {
                Match::IifnamePrefix(p.clone())
            } else {
                Match::OifnamePrefix(p.clone())
            };
            v.push(rule(vec![m], Action::Return, comment));
        }
        v
    }
}

/// Istio's KubeVirt reroute (`tools/istio-iptables/pkg/capture/run.go`): TCP arriving on a
/// rerouted interface goes to the outbound port when its destination is included (`*`: every
/// destination; narrowed: the include ranges), and everything else arriving there skips
/// inbound capture. Returns (the redirects, the returns), in Istio's order.
fn reroute(b: &mut Builder, plan: &Plan) -> (Vec<Rule>, Vec<Rule>) {
    if plan.reroute_interfaces.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let ifs = Ifaces::of(b, SET_REROUTE_IFACES, &plan.reroute_interfaces);
    let families: Vec<Family> = if plan.ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    };
    let (mut redirects, mut returns) = (Vec::new(), Vec::new());
    let comment = "arrived on a rerouted interface: to the outbound port";
    for m in ifs.inbound_matches() {
        match &plan.include_ranges {
            OutboundRanges::All => {
                let mut ms = vec![m.clone()];
                if !plan.ipv6 {
                    ms.push(Match::NfProto(Family::V4));
                }
                ms.push(tcp());
                redirects.push(rule(ms, Action::Redirect(plan.outbound_port), comment));
            }
            OutboundRanges::Only(c) => {
                let sets = b.cidrs([SET_OUT_INCLUDE_V4, SET_OUT_INCLUDE_V6], c);
                for (f, set) in [Family::V4, Family::V6].into_iter().zip(sets) {
                    if let Some(set) = set.filter(|_| families.contains(&f)) {
                        redirects.push(rule(
                            vec![m.clone(), Match::NfProto(f), Match::DaddrIn(f, set), tcp()],
                            Action::Redirect(plan.outbound_port),
                            comment,
                        ));
                    }
                }
            }
        }
        returns.push(rule(
            vec![m],
            Action::Return,
            "arrived on a rerouted interface: not inbound",
        ));
    }
    (redirects, returns)
}

/// Builds the ruleset for `plan`.
pub fn build(plan: &Plan) -> Ruleset {
    let mut b = Builder { sets: Vec::new() };
    let ifaces = Ifaces::new(&mut b, plan);
    let (rerouted, not_inbound) = reroute(&mut b, plan);
    let mut chains = Vec::new();
    let routing = match plan.mode {
        Mode::Redirect => {
            let mut inbound = redirect_inbound(&mut b, plan, &ifaces);
            // In front of the inbound jump, in the same nat chain, as Istio inserts them.
            let mut front = rerouted;
            front.extend(not_inbound);
            if !front.is_empty() {
                match inbound.iter_mut().find(|c| c.name == "prerouting") {
                    Some(pre) => {
                        front.append(&mut pre.rules);
                        pre.rules = front;
                    }
                    None => inbound.insert(
                        0,
                        base(
                            "prerouting",
                            ChainKind::Nat,
                            HookPoint::Prerouting,
                            NAT_PRIORITY,
                            front,
                        ),
                    ),
                }
            }
            chains.extend(inbound);
            None
        }
        Mode::Tproxy => {
            let mut inbound = tproxy_chains(&mut b, plan, &ifaces);
            // TPROXY diverts inbound in the mangle chain, which runs first: rerouted
            // interfaces return there, and are redirected in a nat chain of their own.
            if let Some(pre) = inbound.iter_mut().find(|c| c.name == "prerouting") {
                let mut front = not_inbound;
                front.append(&mut pre.rules);
                pre.rules = front;
            }
            if !rerouted.is_empty() {
                inbound.push(base(
                    "reroute",
                    ChainKind::Nat,
                    HookPoint::Prerouting,
                    NAT_PRIORITY,
                    rerouted,
                ));
            }
            chains.extend(inbound);
            Some(Routing::default())
        }
    };
    chains.extend(outbound_chains(&mut b, plan, &ifaces));
    if let Some(dns) = plan.dns
        && dns.zones
    {
        chains.extend(dns_zone_chains(plan, dns.port, &ifaces));
    }
    if plan.drop_invalid {
        chains.push(base(
            "drop_invalid",
            ChainKind::Filter,
            HookPoint::Prerouting,
            MANGLE_PRIORITY,
            vec![rule(
                vec![Match::CtInvalid],
                Action::Drop,
                "invalid: would reach the app un-NATed",
            )],
        ));
    }
    Ruleset {
        sets: b.sets,
        chains,
        routing,
        passthrough6: plan.passthrough6,
    }
}

fn tcp() -> Match {
    Match::L4Proto(L4::Tcp)
}

fn lo_out() -> Match {
    Match::Oifname("lo".into())
}

fn owner(by_gid: bool, c: Cmp, id: u32) -> Match {
    if by_gid {
        Match::SkGid(c, id)
    } else {
        Match::SkUid(c, id)
    }
}

/// The matches a base chain's jump starts with: IPv4 only when the plan leaves IPv6 alone.
fn entry(plan: &Plan, l4: L4) -> Vec<Match> {
    let mut m = Vec::new();
    if !plan.ipv6 {
        m.push(Match::NfProto(Family::V4));
    }
    m.push(Match::L4Proto(l4));
    m
}

fn base(
    name: &'static str,
    kind: ChainKind,
    point: HookPoint,
    priority: i32,
    rules: Vec<Rule>,
) -> Chain {
    Chain {
        name,
        hook: Some(Hook {
            kind,
            point,
            priority,
        }),
        rules,
    }
}

fn regular(name: &'static str, rules: Vec<Rule>) -> Chain {
    Chain {
        name,
        hook: None,
        rules,
    }
}

/// The inbound port rules shared by both modes: excluded interfaces, the tunnel port, excluded
/// sources, and the exclusion set (with `*`). Returns them and the match that selects captured
/// ports.
fn inbound_selection(
    b: &mut Builder,
    plan: &Plan,
    ifaces: &Ifaces,
) -> Option<(Vec<Rule>, Vec<Match>)> {
    // Nothing captured inbound: no rule, and no set that no rule would look up.
    if plan.inbound == Inbound::Off {
        return None;
    }
    let mut rules = ifaces.returns(true);
    if let Some(port) = plan.shape.tunnel_port {
        rules.push(rule(
            vec![tcp(), Match::Dport(Cmp::Eq, port)],
            Action::Return,
            "HBONE tunnel port",
        ));
    }
    let sources = b.cidrs(
        [SET_IN_EXCLUDE_SRC_V4, SET_IN_EXCLUDE_SRC_V6],
        &plan.inbound_exclude_sources,
    );
    for (f, set) in [Family::V4, Family::V6].into_iter().zip(sources) {
        if let Some(set) = set {
            rules.push(rule(
                vec![Match::NfProto(f), Match::SaddrIn(f, set)],
                Action::Return,
                "excluded source",
            ));
        }
    }
    let selected = match &plan.inbound {
        Inbound::AllExcept(ports) => {
            if let Some(set) = b.ports(SET_IN_EXCLUDE_PORTS, ports) {
                rules.push(rule(
                    vec![tcp(), Match::DportIn(set)],
                    Action::Return,
                    "excluded inbound port",
                ));
            }
            vec![tcp()]
        }
        // No set (an empty list) selects nothing: no inbound capture, never "every port".
        Inbound::Only(ports) => vec![tcp(), Match::DportIn(b.ports(SET_IN_PORTS, ports)?)],
        Inbound::Off => return None,
    };
    Some((rules, selected))
}

/// REDIRECT mode inbound (docs/DESIGN.md §2.4): nat prerouting, TCP only.
fn redirect_inbound(b: &mut Builder, plan: &Plan, ifaces: &Ifaces) -> Vec<Chain> {
    let Some((mut rules, selected)) = inbound_selection(b, plan, ifaces) else {
        return Vec::new();
    };
    let comment = if matches!(plan.inbound, Inbound::Only(_)) {
        "included inbound port"
    } else {
        "inbound to the proxy"
    };
    rules.push(rule(selected, Action::Redirect(plan.inbound_port), comment));
    vec![
        base(
            "prerouting",
            ChainKind::Nat,
            HookPoint::Prerouting,
            NAT_PRIORITY,
            vec![rule(
                entry(plan, L4::Tcp),
                Action::Jump("inbound"),
                "inbound TCP",
            )],
        ),
        regular("inbound", rules),
    ]
}

/// TPROXY mode inbound (Istio's mangle rules): new inbound TCP connections are handed to the
/// proxy's transparent socket with their addresses untouched and marked, so policy routing
/// delivers them locally; packets of established ones are marked and accepted.
fn tproxy_chains(b: &mut Builder, plan: &Plan, ifaces: &Ifaces) -> Vec<Chain> {
    let mark = TPROXY_MARK;
    let mut chains = Vec::new();
    if let Some((selection, selected)) = inbound_selection(b, plan, ifaces) {
        let lo_in = || Match::Iifname("lo".into());
        let mut rules = vec![
            rule(
                vec![tcp(), Match::Mark(Cmp::Eq, mark)],
                Action::Return,
                "already diverted",
            ),
            rule(
                vec![
                    lo_in(),
                    Match::NfProto(Family::V4),
                    Match::Saddr(PASSTHROUGH[0].1),
                ],
                Action::Return,
                "proxy passthrough",
            ),
            rule(
                vec![
                    lo_in(),
                    Match::NfProto(Family::V6),
                    Match::Saddr(PASSTHROUGH[1].1),
                ],
                Action::Return,
                "proxy passthrough",
            ),
            rule(
                vec![lo_in(), Match::Mark(Cmp::Ne, PROXY_LOOPBACK_MARK)],
                Action::Return,
                "over lo, not the proxy calling the pod's address",
            ),
        ];
        rules.extend(selection);
        let mut established = selected.clone();
        established.push(Match::CtEstablished);
        rules.push(rule(
            established,
            Action::SetMarkAccept(mark),
            "established: to the proxy's socket",
        ));
        for (f, lo) in LOOPBACK {
            let mut m = vec![Match::NfProto(f), Match::Daddr(Cmp::Ne, lo)];
            m.extend(selected.iter().cloned());
            rules.push(rule(
                m,
                Action::Tproxy {
                    family: f,
                    port: plan.inbound_port,
                    mark,
                },
                "inbound to the proxy",
            ));
        }
        // Excluded interfaces return first thing in `inbound` (inbound_selection).
        let mut pre = vec![rule(
            entry(plan, L4::Tcp),
            Action::Jump("inbound"),
            "inbound TCP",
        )];
        pre.push(rule(
            vec![tcp(), Match::Mark(Cmp::Eq, mark)],
            Action::SaveMark,
            "keep the mark on the connection",
        ));
        chains.push(base(
            "prerouting",
            ChainKind::Filter,
            HookPoint::Prerouting,
            MANGLE_PRIORITY,
            pre,
        ));
        chains.push(regular("inbound", rules));
    }
    // Locally generated packets: a route chain, so a mark set here re-routes the packet.
    let mut out = ifaces.returns(false);
    out.push(rule(
        vec![lo_out(), tcp(), Match::Mark(Cmp::Eq, mark)],
        Action::Return,
        "already marked",
    ));
    for (by_gid, id) in plan.owners() {
        for (f, lo) in LOOPBACK {
            out.push(rule(
                vec![
                    lo_out(),
                    Match::NfProto(f),
                    Match::Daddr(Cmp::Ne, lo),
                    tcp(),
                    owner(by_gid, Cmp::Eq, id),
                ],
                Action::SetMark(PROXY_LOOPBACK_MARK),
                "the proxy calling the pod's address over lo",
            ));
        }
    }
    out.push(rule(
        vec![tcp(), Match::CtMark(mark)],
        Action::RestoreMark,
        "replies of diverted connections go back to the proxy",
    ));
    chains.push(base(
        "output_mangle",
        ChainKind::Route,
        HookPoint::Output,
        MANGLE_PRIORITY,
        out,
    ));
    chains
}

/// The outbound rules (docs/DESIGN.md §2.5, with the profile's switches), entered for TCP (and
/// UDP when DNS is captured).
fn outbound_chains(b: &mut Builder, plan: &Plan, ifaces: &Ifaces) -> Vec<Chain> {
    let shape = plan.shape;
    if !plan.outbound && plan.dns.is_none() {
        return Vec::new();
    }
    let mut r = ifaces.returns(false);
    // Excluded destinations matter only in front of something captured.
    let exclude = if plan.outbound || shape.exclude_dst_first {
        b.cidrs(
            [SET_OUT_EXCLUDE_V4, SET_OUT_EXCLUDE_V6],
            &plan.exclude_ranges,
        )
    } else {
        [None, None]
    };
    let mut excluded_dst: Vec<Rule> = [Family::V4, Family::V6]
        .into_iter()
        .zip(exclude)
        .filter_map(|(f, set)| {
            set.map(|set| {
                rule(
                    vec![Match::NfProto(f), Match::DaddrIn(f, set)],
                    Action::Return,
                    "excluded destination",
                )
            })
        })
        .collect();
    if shape.exclude_dst_first {
        // Kuma: before anything else, for every uid (the proxy's too) and protocol.
        r.append(&mut excluded_dst);
    }
    for ex in &plan.uid_exclusions {
        let uid = if ex.uids.0 == ex.uids.1 {
            Match::SkUid(Cmp::Eq, ex.uids.0)
        } else {
            Match::SkUidRange(ex.uids.0, ex.uids.1)
        };
        let l4s = [(ex.tcp, L4::Tcp), (ex.udp, L4::Udp)];
        for l4 in l4s.into_iter().filter(|(on, _)| *on).map(|(_, l)| l) {
            let ranges: Vec<Option<(u16, u16)>> = if ex.ports.is_empty() {
                vec![None]
            } else {
                ex.ports.ranges().iter().copied().map(Some).collect()
            };
            for range in ranges {
                let mut m = vec![Match::L4Proto(l4)];
                match range {
                    Some((a, z)) if a == z => m.push(Match::Dport(Cmp::Eq, a)),
                    Some((a, z)) => m.push(Match::DportRange(a, z)),
                    None => {}
                }
                m.push(uid.clone());
                r.push(rule(m, Action::Return, "excluded uid"));
            }
        }
    }
    let istio_dns = plan.dns.filter(|_| shape.dns == DnsShape::TcpAndUdp);
    if let Some(dns) = plan.dns
        && shape.dns == DnsShape::UdpFirst
    {
        let udp = || Match::L4Proto(L4::Udp);
        for (by_gid, id) in plan.owners() {
            r.push(rule(
                vec![
                    udp(),
                    Match::Dport(Cmp::Eq, DNS_PORT),
                    owner(by_gid, Cmp::Eq, id),
                ],
                Action::Return,
                "the proxy's own DNS",
            ));
        }
        r.push(rule(
            vec![udp(), Match::Dport(Cmp::Eq, DNS_PORT)],
            Action::Redirect(dns.port),
            "DNS to the proxy",
        ));
        let mut m = vec![tcp(), Match::Dport(Cmp::Eq, DNS_PORT)];
        if let Some(uid) = plan.proxy_uid {
            m.push(Match::SkUid(Cmp::Ne, uid));
        }
        r.push(rule(m, Action::Return, "the app's TCP DNS goes out as is"));
    }
    if plan.outbound {
        if let Some(set) = b.ports(SET_OUT_EXCLUDE_PORTS, &plan.exclude_outbound_ports) {
            r.push(rule(
                vec![Match::DportIn(set)],
                Action::Return,
                "excluded outbound port",
            ));
        }
        match shape.loopback {
            Loopback::Passthrough => loopback_passthrough(plan, istio_dns.is_some(), &mut r),
            Loopback::ReturnAll => {
                for (by_gid, id) in plan.owners() {
                    r.push(rule(
                        vec![owner(by_gid, Cmp::Eq, id)],
                        Action::Return,
                        "the proxy's own traffic",
                    ));
                }
                r.push(rule(vec![lo_out()], Action::Return, "over lo"));
            }
        }
    }
    if let Some(dns) = istio_dns {
        // After the proxy-owner returns (the proxy's own queries go out untouched), before the
        // localhost return (a resolver on 127.0.0.53 is still captured).
        for l4 in [L4::Tcp, L4::Udp] {
            r.push(rule(
                vec![Match::L4Proto(l4), Match::Dport(Cmp::Eq, DNS_PORT)],
                Action::Redirect(dns.port),
                "DNS to the proxy",
            ));
        }
    }
    if plan.outbound {
        if shape.loopback == Loopback::Passthrough {
            for (f, addr) in LOOPBACK {
                r.push(rule(
                    vec![Match::NfProto(f), Match::Daddr(Cmp::Eq, addr)],
                    Action::Return,
                    "localhost",
                ));
            }
        }
        r.append(&mut excluded_dst);
        if let Some(set) = b.ports(SET_OUT_INCLUDE_PORTS, &plan.include_outbound_ports) {
            r.push(rule(
                vec![tcp(), Match::DportIn(set)],
                Action::Redirect(plan.outbound_port),
                "included outbound port",
            ));
        }
        match &plan.include_ranges {
            OutboundRanges::All => {
                r.push(rule(
                    vec![tcp()],
                    Action::Redirect(plan.outbound_port),
                    "outbound to the proxy",
                ));
            }
            OutboundRanges::Only(c) => {
                let include = b.cidrs([SET_OUT_INCLUDE_V4, SET_OUT_INCLUDE_V6], c);
                for (f, set) in [Family::V4, Family::V6].into_iter().zip(include) {
                    if let Some(set) = set {
                        r.push(rule(
                            vec![Match::NfProto(f), Match::DaddrIn(f, set), tcp()],
                            Action::Redirect(plan.outbound_port),
                            "included destination",
                        ));
                    }
                }
            }
        }
    }
    let mut jumps = vec![rule(
        entry(plan, L4::Tcp),
        Action::Jump("outbound"),
        "outbound TCP",
    )];
    if plan.dns.is_some() {
        jumps.push(rule(
            entry(plan, L4::Udp),
            Action::Jump("outbound"),
            "outbound UDP (DNS)",
        ));
    }
    vec![
        base(
            "output",
            ChainKind::Nat,
            HookPoint::Output,
            NAT_PRIORITY,
            jumps,
        ),
        regular("outbound", r),
    ]
}

/// Istio's and Kuma's loopback rules: the passthrough source returns; the proxy calling a
/// local address other than localhost goes to the inbound port; the app's other traffic over
/// `lo` returns (unless an include range holds a loopback address); the proxy's own traffic
/// returns.
fn loopback_passthrough(plan: &Plan, istio_dns: bool, r: &mut Vec<Rule>) {
    for (f, addr) in PASSTHROUGH {
        r.push(rule(
            vec![lo_out(), Match::NfProto(f), Match::Saddr(addr)],
            Action::Return,
            "proxy passthrough",
        ));
    }
    let owners = plan.owners();
    if owners.is_empty() {
        r.push(rule(vec![lo_out()], Action::Return, "over lo"));
    }
    for (by_gid, id) in owners {
        for (f, addr) in LOOPBACK {
            let mut m = vec![
                lo_out(),
                Match::NfProto(f),
                Match::Daddr(Cmp::Ne, addr),
                tcp(),
            ];
            // Istio's asymmetry: with DNS, the uid rule spares port 53, the gid rule does not.
            if istio_dns && !by_gid {
                m.push(Match::Dport(Cmp::Ne, DNS_PORT));
            }
            if let Some(t) = plan.shape.tunnel_port {
                m.push(Match::Dport(Cmp::Ne, t));
            }
            m.push(owner(by_gid, Cmp::Eq, id));
            let comment = if by_gid {
                "proxy (by gid) calling the pod's own address: inbound"
            } else {
                "proxy calling the pod's own address: inbound"
            };
            // Also in TPROXY mode: nat is the only way to steer locally generated traffic.
            r.push(rule(m, Action::Redirect(plan.inbound_port), comment));
        }
        if plan.app_loopback_return {
            // With DNS capture, the app's DNS over lo (a local resolver) must still reach the
            // DNS rules.
            let mut m = vec![lo_out()];
            if istio_dns {
                m.extend([tcp(), Match::Dport(Cmp::Ne, DNS_PORT)]);
            }
            m.push(owner(by_gid, Cmp::Ne, id));
            r.push(rule(m, Action::Return, "app talking to itself over lo"));
        }
        r.push(rule(
            vec![owner(by_gid, Cmp::Eq, id)],
            Action::Return,
            "the proxy's own traffic",
        ));
    }
}

/// Conntrack zones for DNS (Istio's raw-table `CT --zone` rules, Kuma's the same), assigned
/// before conntrack sees the packet: the proxy's queries upstream and their answers live in
/// zone 1, the app's queries and the proxy's answers to them in zone 2, so the two legs of one
/// lookup, which can share addresses and ports, never meet in one conntrack entry and replies
/// go to the right socket.
fn dns_zone_chains(plan: &Plan, dns_port: u16, ifaces: &Ifaces) -> Vec<Chain> {
    let udp = || Match::L4Proto(L4::Udp);
    // Traffic on excluded interfaces is not captured, so it keeps the default zone both ways.
    let mut out = ifaces.returns(false);
    let mut inbound = ifaces.returns(true);
    for (by_gid, id) in plan.owners() {
        out.push(rule(
            vec![
                udp(),
                Match::Dport(Cmp::Eq, DNS_PORT),
                owner(by_gid, Cmp::Eq, id),
            ],
            Action::CtZone(DNS_ZONE_UPSTREAM_LEG),
            "the proxy's query upstream",
        ));
        out.push(rule(
            vec![udp(), Match::Sport(dns_port), owner(by_gid, Cmp::Eq, id)],
            Action::CtZone(DNS_ZONE_APP_LEG),
            "the proxy's answer to the app",
        ));
    }
    out.push(rule(
        vec![udp(), Match::Dport(Cmp::Eq, DNS_PORT)],
        Action::CtZone(DNS_ZONE_APP_LEG),
        "the app's query",
    ));
    inbound.push(rule(
        vec![udp(), Match::Sport(DNS_PORT)],
        Action::CtZone(DNS_ZONE_UPSTREAM_LEG),
        "an answer from upstream",
    ));
    vec![
        base(
            "dns_zone_out",
            ChainKind::Filter,
            HookPoint::Output,
            RAW_PRIORITY,
            out,
        ),
        base(
            "dns_zone_in",
            ChainKind::Filter,
            HookPoint::Prerouting,
            RAW_PRIORITY,
            inbound,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Annotations, PluginConfig};
    use crate::policy::{Decision, Pod, decide, istio};

    fn build_with(pairs: &[(&str, &str)]) -> Ruleset {
        let mut a: Annotations = [(istio::STATUS.to_string(), "{}".to_string())].into();
        for (k, v) in pairs {
            a.insert(k.to_string(), v.to_string());
        }
        let pod = Pod {
            annotations: Some(&a),
            ..Pod::default()
        };
        match decide(&PluginConfig::default(), &pod).unwrap() {
            Decision::Capture(p) => build(&p),
            Decision::Skip(w) => panic!("{w}"),
        }
    }

    fn chain<'a>(rs: &'a Ruleset, name: &str) -> &'a Chain {
        rs.chains.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn default_ruleset_shape() {
        let rs = build_with(&[]);
        let names: Vec<_> = rs.chains.iter().map(|c| c.name).collect();
        assert_eq!(names, ["prerouting", "inbound", "output", "outbound"]);
        let sets: Vec<_> = rs.sets.iter().map(|s| s.name).collect();
        // Empty lists make no set (and no rule looking one up).
        assert_eq!(sets, [SET_IN_EXCLUDE_PORTS, SET_OUT_EXCLUDE_PORTS]);
        assert_eq!(
            rs.set(SET_IN_EXCLUDE_PORTS).unwrap().elems,
            Elems::Ports(vec![15020, 15021, 15090])
        );
        let inbound = chain(&rs, "inbound");
        assert_eq!(
            inbound.rules.last().unwrap().action,
            Action::Redirect(15006)
        );
        let outbound = chain(&rs, "outbound");
        assert_eq!(
            outbound.rules.last().unwrap().action,
            Action::Redirect(15001)
        );
        // The order of docs/DESIGN.md §2.5: excluded ports first, then passthrough, owner rules, localhost.
        assert_eq!(
            outbound.rules[0].matches,
            vec![Match::DportIn(SET_OUT_EXCLUDE_PORTS)]
        );
        assert!(matches!(outbound.rules[1].matches[2], Match::Saddr(_)));
    }

    #[test]
    fn owner_rules_cover_uid_then_gid_for_both_families() {
        let rs = build_with(&[]);
        let out = chain(&rs, "outbound");
        let owners: Vec<&Match> = out
            .rules
            .iter()
            .filter_map(|r| {
                r.matches
                    .iter()
                    .find(|m| matches!(m, Match::SkUid(..) | Match::SkGid(..)))
            })
            .collect();
        assert_eq!(owners.len(), 8);
        assert!(owners[..4].iter().all(|m| matches!(m, Match::SkUid(..))));
        assert!(owners[4..].iter().all(|m| matches!(m, Match::SkGid(..))));
    }

    #[test]
    fn include_lists_use_sets_and_inbound_off_drops_the_chains() {
        let rs = build_with(&[
            (istio::INCLUDE_INBOUND_PORTS, ""),
            (
                istio::INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/8,10.1.0.0/16,fd00::/8",
            ),
            (istio::INCLUDE_OUTBOUND_PORTS, "3306"),
        ]);
        assert!(
            rs.chains
                .iter()
                .all(|c| c.name != "inbound" && c.name != "prerouting")
        );
        // 10.1.0.0/16 is inside 10.0.0.0/8: aggregated away.
        assert_eq!(
            rs.set(SET_OUT_INCLUDE_V4).unwrap().elems,
            Elems::V4(vec!["10.0.0.0/8".parse().unwrap()])
        );
        assert!(rs.set(SET_OUT_INCLUDE_V6).is_some());
        assert!(rs.set(SET_OUT_INCLUDE_PORTS).is_some());
        let out = chain(&rs, "outbound");
        // No catch-all redirect when the ranges are a list.
        assert!(
            !out.rules
                .iter()
                .any(|r| r.matches == vec![tcp()] && r.action == Action::Redirect(15001))
        );
    }

    #[test]
    fn include_inbound_list_redirects_only_the_set() {
        let rs = build_with(&[(istio::INCLUDE_INBOUND_PORTS, "80,443")]);
        let inbound = chain(&rs, "inbound");
        let last = inbound.rules.last().unwrap();
        assert_eq!(last.matches, vec![tcp(), Match::DportIn(SET_IN_PORTS)]);
        assert_eq!(last.action, Action::Redirect(15006));
        assert!(rs.set(SET_IN_EXCLUDE_PORTS).is_none());
    }

    #[test]
    fn tproxy_mode_uses_mangle_chains_and_routing() {
        let rs = build_with(&[(istio::INTERCEPTION_MODE, "TPROXY")]);
        let names: Vec<_> = rs.chains.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "prerouting",
                "inbound",
                "output_mangle",
                "output",
                "outbound"
            ]
        );
        assert_eq!(
            chain(&rs, "prerouting").hook.unwrap().kind,
            ChainKind::Filter
        );
        assert_eq!(
            chain(&rs, "output_mangle").hook.unwrap().kind,
            ChainKind::Route
        );
        assert_eq!(
            rs.routing,
            Some(Routing {
                mark: 1337,
                table: 133
            })
        );
        let inbound = chain(&rs, "inbound");
        let tproxy: Vec<_> = inbound
            .rules
            .iter()
            .filter(|r| matches!(r.action, Action::Tproxy { .. }))
            .collect();
        assert_eq!(tproxy.len(), 2, "one per family");
        // Outbound is REDIRECT mode's.
        assert_eq!(chain(&rs, "outbound"), chain(&build_with(&[]), "outbound"));
        assert_eq!(build_with(&[]).routing, None);
    }

    #[test]
    fn dns_capture_adds_udp_entry_dns_rules_and_zone_chains() {
        let rs = build_with(&[(istio::CAPTURE_DNS, "true")]);
        assert_eq!(chain(&rs, "output").rules.len(), 2);
        let out = chain(&rs, "outbound");
        let dns: Vec<_> = out
            .rules
            .iter()
            .filter(|r| r.action == Action::Redirect(15053))
            .collect();
        assert_eq!(dns.len(), 2, "TCP and UDP");
        // DNS rules come after the proxy-owner returns and before the localhost return.
        let pos = |pred: &dyn Fn(&Rule) -> bool| out.rules.iter().position(pred).unwrap();
        let owner = pos(&|r| r.matches == vec![Match::SkGid(Cmp::Eq, 1337)]);
        let first_dns = pos(&|r| r.action == Action::Redirect(15053));
        let localhost = pos(&|r| r.comment == "localhost");
        assert!(owner < first_dns && first_dns < localhost);
        let zones = chain(&rs, "dns_zone_out");
        assert_eq!(zones.hook.unwrap().priority, RAW_PRIORITY);
        assert!(
            zones
                .rules
                .iter()
                .all(|r| matches!(r.action, Action::CtZone(_)))
        );
        assert!(rs.chains.iter().any(|c| c.name == "dns_zone_in"));
    }

    /// Found by fuzzing: an excluded-source set with inbound capture off was left with no
    /// rule looking it up.
    #[test]
    fn no_set_without_a_rule_when_inbound_is_off() {
        let mut a: Annotations = [(
            crate::policy::linkerd::PROXY_VERSION.to_string(),
            "x".to_string(),
        )]
        .into();
        a.insert(
            crate::policy::linkerd::SKIP_SUBNETS.into(),
            "10.0.0.0/8".into(),
        );
        let pod = Pod {
            annotations: Some(&a),
            ..Pod::default()
        };
        let mut cfg = PluginConfig::for_mesh(crate::config::Mesh::Linkerd);
        cfg.exclude_inbound_ports = crate::policy::Ports::from_ranges([(1, 65535)]);
        let Decision::Capture(p) = decide(&cfg, &pod).unwrap() else {
            panic!()
        };
        let mut p = p;
        p.inbound = Inbound::Off;
        let rs = build(&p);
        assert!(rs.set(SET_IN_EXCLUDE_SRC_V4).is_none());
    }

    #[test]
    fn thousands_of_cidrs_stay_a_handful_of_rules() {
        let many: Vec<String> = (0..10_000)
            .map(|i| format!("10.{}.{}.0/24", i / 128, (i % 128) * 2))
            .collect();
        let rs = build_with(&[(istio::EXCLUDE_OUTBOUND_IP_RANGES, &many.join(","))]);
        assert_eq!(rs.set(SET_OUT_EXCLUDE_V4).unwrap().elems.len(), 10_000);
        assert!(rs.rule_count() < 30, "{}", rs.rule_count());
    }
}
