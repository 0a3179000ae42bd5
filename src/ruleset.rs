//! Ruleset: a capture plan → the nftables objects of table `inet mesh_redirect` (SPEC §4).
//!
//! The result is a small, backend-neutral description (sets, chains, rules made of matches and
//! one action). `nft_text` renders it as `nft -f` input and `kernel` compiles it to netlink;
//! both read the same description, so what `plan` prints is what ADD installs.
//! Address and port lists become named sets, so list size costs one lookup, not one rule each.

use crate::policy::{Cidrs, Inbound, Mode, OutboundRanges, Plan, istio};
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
    Ifnames(Vec<String>),
}

impl Elems {
    pub fn len(&self) -> usize {
        match self {
            Elems::V4(v) => v.len(),
            Elems::V6(v) => v.len(),
            Elems::Ports(v) => v.len(),
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
    Saddr(IpAddr),
    Daddr(Cmp, IpAddr),
    DaddrIn(Family, &'static str),
    /// Transport destination port (TCP or UDP: same offset).
    Dport(Cmp, u16),
    DportIn(&'static str),
    SkUid(Cmp, u32),
    SkGid(Cmp, u32),
    /// Packet mark equals.
    Mark(u32),
    /// A socket for the packet's destination exists and is transparent (`socket transparent 1`).
    SocketTransparent,
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Return,
    Accept,
    Jump(&'static str),
    /// `redirect to :port`.
    Redirect(u16),
    /// `meta mark set m; tproxy to :port` (the family is the rule's).
    Tproxy {
        family: Family,
        port: u16,
        mark: u32,
    },
    /// `meta mark set m`, then accept.
    SetMarkAccept(u32),
    /// `ct mark set meta mark` (continue).
    SaveMark,
    /// `meta mark set ct mark` (continue).
    RestoreMark,
    /// `ct zone set z` (continue).
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

/// Everything in table `inet mesh_redirect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

impl Ruleset {
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
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

/// The TPROXY mark (Istio's): marks diverted packets and selects routing table 133.
pub const TPROXY_MARK: u32 = 1337;
/// Conntrack zones keeping the app's and the proxy's DNS flows apart (Istio's zones).
pub const DNS_ZONE_APP: u16 = 1;
pub const DNS_ZONE_UPSTREAM: u16 = 2;

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
        self.sets.push(Set { name, elems });
        Some(name)
    }

    fn ports(
        &mut self,
        name: &'static str,
        ports: impl IntoIterator<Item = u16>,
    ) -> Option<&'static str> {
        self.set(name, Elems::Ports(ports.into_iter().collect()))
    }

    /// Address sets for both families; CIDRs are aggregated so the interval set has no overlap.
    fn cidrs(&mut self, names: [&'static str; 2], c: &Cidrs) -> [Option<&'static str>; 2] {
        [
            self.set(names[0], Elems::V4(Ipv4Net::aggregate(&c.v4))),
            self.set(names[1], Elems::V6(Ipv6Net::aggregate(&c.v6))),
        ]
    }
}

/// Builds the ruleset for `plan`.
pub fn build(plan: &Plan) -> Ruleset {
    let mut b = Builder { sets: Vec::new() };
    let ifaces = b.set(
        SET_EXCLUDE_IFACES,
        Elems::Ifnames(plan.exclude_interfaces.iter().cloned().collect()),
    );
    let mut chains = Vec::new();
    inbound_chains(&mut b, plan, ifaces, &mut chains);
    outbound_chains(&mut b, plan, ifaces, &mut chains);
    if let Some(dns_port) = plan.dns_port {
        chains.extend(dns_zone_chains(plan, dns_port));
    }
    Ruleset {
        sets: b.sets,
        chains,
    }
}

fn tcp() -> Match {
    Match::L4Proto(L4::Tcp)
}

/// The inbound rules (SPEC §4 "Inbound"): one chain that decides, entered for TCP only.
fn inbound_chains(
    b: &mut Builder,
    plan: &Plan,
    ifaces: Option<&'static str>,
    chains: &mut Vec<Chain>,
) {
    if plan.inbound == Inbound::Off {
        return;
    }
    let mut rules = Vec::new();
    if let Some(set) = ifaces {
        rules.push(rule(
            vec![Match::IifnameIn(set)],
            Action::Return,
            "arrived on an excluded interface",
        ));
    }
    rules.push(rule(
        vec![tcp(), Match::Dport(Cmp::Eq, istio::TUNNEL_PORT)],
        Action::Return,
        "HBONE tunnel port",
    ));
    let to_proxy = |matches: Vec<Match>, families: &[Family], comment| -> Vec<Rule> {
        match plan.mode {
            Mode::Redirect => vec![rule(matches, Action::Redirect(plan.inbound_port), comment)],
            // TPROXY needs the family for the address it hands to the proxy's socket.
            Mode::Tproxy => families
                .iter()
                .map(|&f| {
                    let mut m = vec![Match::NfProto(f)];
                    m.extend(matches.iter().cloned());
                    rule(
                        m,
                        Action::Tproxy {
                            family: f,
                            port: plan.inbound_port,
                            mark: TPROXY_MARK,
                        },
                        comment,
                    )
                })
                .collect(),
        }
    };
    let both = [Family::V4, Family::V6];
    match &plan.inbound {
        Inbound::AllExcept(ports) => {
            if let Some(set) = b.ports(SET_IN_EXCLUDE_PORTS, ports.iter().copied()) {
                rules.push(rule(
                    vec![tcp(), Match::DportIn(set)],
                    Action::Return,
                    "excluded inbound port",
                ));
            }
            rules.extend(to_proxy(vec![tcp()], &both, "inbound to the proxy"));
        }
        Inbound::Only(ports) => {
            if let Some(set) = b.ports(SET_IN_PORTS, ports.iter().copied()) {
                rules.extend(to_proxy(
                    vec![tcp(), Match::DportIn(set)],
                    &both,
                    "included inbound port",
                ));
            }
        }
        Inbound::Off => {}
    }
    match plan.mode {
        Mode::Redirect => chains.push(Chain {
            name: "prerouting",
            hook: Some(Hook {
                kind: ChainKind::Nat,
                point: HookPoint::Prerouting,
                priority: NAT_PRIORITY,
            }),
            rules: vec![rule(vec![tcp()], Action::Jump("inbound"), "inbound TCP")],
        }),
        Mode::Tproxy => chains.push(Chain {
            name: "prerouting",
            hook: Some(Hook {
                kind: ChainKind::Filter,
                point: HookPoint::Prerouting,
                priority: MANGLE_PRIORITY,
            }),
            rules: vec![
                // Packets of connections already handed to the proxy: keep them on the proxy's
                // socket (Istio's ISTIO_DIVERT), without touching anything else.
                rule(
                    vec![tcp(), Match::SocketTransparent],
                    Action::SetMarkAccept(TPROXY_MARK),
                    "established, to the proxy's transparent socket",
                ),
                rule(
                    vec![tcp()],
                    Action::RestoreMark,
                    "restore the connection's mark",
                ),
                rule(
                    vec![tcp(), Match::Mark(TPROXY_MARK)],
                    Action::Accept,
                    "already diverted",
                ),
                rule(vec![tcp()], Action::Jump("inbound"), "inbound TCP"),
            ],
        }),
    }
    if plan.mode == Mode::Tproxy {
        // Remember the mark on the connection so replies from the app are routed back through
        // the proxy's table (Istio's CONNMARK save on the app side).
        rules.insert(
            0,
            rule(
                vec![tcp(), Match::Mark(TPROXY_MARK)],
                Action::SaveMark,
                "save the mark on the connection",
            ),
        );
    }
    chains.push(Chain {
        name: "inbound",
        hook: None,
        rules,
    });
}

/// The outbound rules (SPEC §4 "Outbound"), entered for TCP (and UDP when DNS is captured).
fn outbound_chains(
    b: &mut Builder,
    plan: &Plan,
    ifaces: Option<&'static str>,
    chains: &mut Vec<Chain>,
) {
    let mut r = Vec::new();
    if let Some(set) = ifaces {
        r.push(rule(
            vec![Match::OifnameIn(set)],
            Action::Return,
            "leaving on an excluded interface",
        ));
    }
    if let Some(set) = b.ports(
        SET_OUT_EXCLUDE_PORTS,
        plan.exclude_outbound_ports.iter().copied(),
    ) {
        r.push(rule(
            vec![Match::DportIn(set)],
            Action::Return,
            "excluded outbound port",
        ));
    }
    let lo = || Match::Oifname("lo".into());
    for (f, addr) in PASSTHROUGH {
        r.push(rule(
            vec![lo(), Match::NfProto(f), Match::Saddr(addr)],
            Action::Return,
            "proxy passthrough",
        ));
    }
    type Owner = fn(Cmp, u32) -> Match;
    for (owner, id, what) in [
        (Match::SkUid as Owner, plan.proxy_uid, "uid"),
        (Match::SkGid as Owner, plan.proxy_gid, "gid"),
    ] {
        for (f, addr) in LOOPBACK {
            let matches = vec![
                lo(),
                Match::NfProto(f),
                Match::Daddr(Cmp::Ne, addr),
                tcp(),
                Match::Dport(Cmp::Ne, istio::TUNNEL_PORT),
                owner(Cmp::Eq, id),
            ];
            let comment = if what == "uid" {
                "proxy calling the pod's own address: inbound"
            } else {
                "proxy (by gid) calling the pod's own address: inbound"
            };
            // In TPROXY mode the proxy's loopback call is still redirected: nat is the only
            // way to steer locally generated traffic to a local port.
            r.push(rule(matches, Action::Redirect(plan.inbound_port), comment));
        }
        r.push(rule(
            vec![lo(), owner(Cmp::Ne, id)],
            Action::Return,
            "app talking to itself over lo",
        ));
        r.push(rule(
            vec![owner(Cmp::Eq, id)],
            Action::Return,
            "the proxy's own traffic",
        ));
    }
    if let Some(dns_port) = plan.dns_port {
        // After the proxy-owner returns (the proxy's own queries go out untouched), before the
        // localhost return (a resolver on 127.0.0.53 is still captured).
        for l4 in [L4::Udp, L4::Tcp] {
            r.push(rule(
                vec![Match::L4Proto(l4), Match::Dport(Cmp::Eq, DNS_PORT)],
                Action::Redirect(dns_port),
                "DNS to the proxy",
            ));
        }
    }
    for (f, addr) in LOOPBACK {
        r.push(rule(
            vec![Match::NfProto(f), Match::Daddr(Cmp::Eq, addr)],
            Action::Return,
            "localhost",
        ));
    }
    let exclude = b.cidrs(
        [SET_OUT_EXCLUDE_V4, SET_OUT_EXCLUDE_V6],
        &plan.exclude_ranges,
    );
    for (f, set) in [Family::V4, Family::V6].into_iter().zip(exclude) {
        if let Some(set) = set {
            r.push(rule(
                vec![Match::NfProto(f), Match::DaddrIn(f, set)],
                Action::Return,
                "excluded destination",
            ));
        }
    }
    if let Some(set) = b.ports(
        SET_OUT_INCLUDE_PORTS,
        plan.include_outbound_ports.iter().copied(),
    ) {
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
    let mut entry = vec![rule(vec![tcp()], Action::Jump("outbound"), "outbound TCP")];
    if plan.dns_port.is_some() {
        entry.push(rule(
            vec![Match::L4Proto(L4::Udp)],
            Action::Jump("outbound"),
            "outbound UDP (DNS)",
        ));
    }
    chains.push(Chain {
        name: "output",
        hook: Some(Hook {
            kind: ChainKind::Nat,
            point: HookPoint::Output,
            priority: NAT_PRIORITY,
        }),
        rules: entry,
    });
    chains.push(Chain {
        name: "outbound",
        hook: None,
        rules: r,
    });
}

/// Conntrack zones for DNS (what Istio's raw-table `CT --zone` rules do): the app's query to
/// the resolver and the proxy's query upstream would otherwise share a 5-tuple's conntrack entry
/// when the proxy reuses the app's source port, and replies would be NATed to the wrong socket.
fn dns_zone_chains(plan: &Plan, dns_port: u16) -> Vec<Chain> {
    let udp = || Match::L4Proto(L4::Udp);
    vec![
        Chain {
            name: "dns_zone_out",
            hook: Some(Hook {
                kind: ChainKind::Filter,
                point: HookPoint::Output,
                priority: RAW_PRIORITY,
            }),
            rules: vec![
                rule(
                    vec![
                        udp(),
                        Match::Dport(Cmp::Eq, DNS_PORT),
                        Match::SkUid(Cmp::Eq, plan.proxy_uid),
                    ],
                    Action::CtZone(DNS_ZONE_APP),
                    "the proxy's upstream DNS query",
                ),
                rule(
                    vec![
                        udp(),
                        Match::Dport(Cmp::Eq, DNS_PORT),
                        Match::SkGid(Cmp::Eq, plan.proxy_gid),
                    ],
                    Action::CtZone(DNS_ZONE_APP),
                    "the proxy's upstream DNS query (by gid)",
                ),
                rule(
                    vec![udp(), Match::Dport(Cmp::Eq, DNS_PORT)],
                    Action::CtZone(DNS_ZONE_UPSTREAM),
                    "the app's DNS query",
                ),
                rule(
                    vec![
                        udp(),
                        Match::SkUid(Cmp::Eq, plan.proxy_uid),
                        Match::Dport(Cmp::Ne, DNS_PORT),
                    ],
                    Action::Return,
                    "other proxy UDP",
                ),
            ],
        },
        Chain {
            name: "dns_zone_in",
            hook: Some(Hook {
                kind: ChainKind::Filter,
                point: HookPoint::Prerouting,
                priority: RAW_PRIORITY,
            }),
            rules: vec![rule(
                vec![udp(), Match::Dport(Cmp::Eq, dns_port)],
                Action::CtZone(DNS_ZONE_UPSTREAM),
                "DNS answered by the proxy, back to the app",
            )],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Annotations, PluginConfig};
    use crate::policy::{Decision, Pod, decide};

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
        // SPEC §4 order: excluded ports first, then passthrough, owner rules, localhost.
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
    fn thousands_of_cidrs_stay_a_handful_of_rules() {
        let many: Vec<String> = (0..10_000)
            .map(|i| format!("10.{}.{}.0/24", i / 128, (i % 128) * 2))
            .collect();
        let rs = build_with(&[(istio::EXCLUDE_OUTBOUND_IP_RANGES, &many.join(","))]);
        assert_eq!(rs.set(SET_OUT_EXCLUDE_V4).unwrap().elems.len(), 10_000);
        assert!(rs.rule_count() < 30, "{}", rs.rule_count());
    }
}
