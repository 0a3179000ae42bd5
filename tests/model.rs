//! Property tests: random annotation sets against a simple reference model of SPEC §4 that
//! decides "captured to which port / not captured" for a connection.
//!
//! 1. Pure: the ruleset mesh-redirect builds, run through a small interpreter of its rules,
//!    agrees with the model for thousands of random (policy, connection) pairs.
//! 2. Kernel: for a sample, the real ruleset in a real pod namespace, real connections (app,
//!    proxy uid, proxy gid, from outside) agree with the model too.
//!
//! The model is written from the SPEC's text, not from the code: it reads the generated lists
//! directly, never mesh-redirect's parsed plan.

mod common;

use common::*;
use ipnet::IpNet;
use mesh_redirect::config::{Annotations, PluginConfig};
use mesh_redirect::policy::{self, Decision, Pod as PolicyPod};
use mesh_redirect::ruleset::{self, Action, Cmp, Elems, Family, L4, Match, Ruleset};
use proptest::prelude::*;
use std::net::IpAddr;

const PROXY_ID: u32 = 1337;
const OUT_PORT: u16 = 15001;
const IN_PORT: u16 = 15006;

/// A random policy: the values the annotations are made from.
#[derive(Debug, Clone)]
struct Policy {
    include_ranges: Option<Vec<IpNet>>, // None: "*"
    exclude_ranges: Vec<IpNet>,
    include_inbound: Option<Vec<u16>>, // None: "*"
    exclude_inbound: Vec<u16>,
    include_outbound_ports: Vec<u16>,
    exclude_outbound_ports: Option<Vec<u16>>, // None: annotation absent (default 15020)
    exclude_ifaces: Vec<String>,
}

fn list<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(", ")
}

impl Policy {
    fn annotations(&self) -> Vec<(&'static str, String)> {
        let mut a = vec![(STATUS, "{}".to_string())];
        a.push((
            policy::istio::INCLUDE_OUTBOUND_IP_RANGES,
            self.include_ranges.as_ref().map_or("*".into(), |r| list(r)),
        ));
        a.push((
            policy::istio::EXCLUDE_OUTBOUND_IP_RANGES,
            list(&self.exclude_ranges),
        ));
        a.push((
            policy::istio::INCLUDE_INBOUND_PORTS,
            self.include_inbound
                .as_ref()
                .map_or("*".into(), |p| list(p)),
        ));
        a.push((
            policy::istio::EXCLUDE_INBOUND_PORTS,
            list(&self.exclude_inbound),
        ));
        a.push((
            policy::istio::INCLUDE_OUTBOUND_PORTS,
            list(&self.include_outbound_ports),
        ));
        if let Some(p) = &self.exclude_outbound_ports {
            a.push((policy::istio::EXCLUDE_OUTBOUND_PORTS, list(p)));
        }
        a.push((
            policy::istio::EXCLUDE_INTERFACES,
            self.exclude_ifaces.join(","),
        ));
        a
    }
}

/// A connection as the model and the interpreter see it.
#[derive(Debug, Clone)]
enum Conn {
    Out {
        uid: u32,
        gid: u32,
        oif: &'static str,
        src: IpAddr,
        dst: IpAddr,
        dport: u16,
    },
    In {
        iif: &'static str,
        dst: IpAddr,
        dport: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    To(u16),
    NotCaptured,
}

fn is_loopback_dst(a: IpAddr) -> bool {
    a == IpAddr::from([127, 0, 0, 1]) || a == "::1".parse::<IpAddr>().unwrap()
}

fn in_any(nets: &[IpNet], a: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&a))
}

/// SPEC §4, REDIRECT mode, TCP, read off the text.
fn model(p: &Policy, c: &Conn) -> Verdict {
    use Verdict::*;
    match *c {
        Conn::In { iif, dport, .. } => {
            if p.exclude_ifaces.iter().any(|i| i == iif) || dport == 15008 {
                return NotCaptured;
            }
            match &p.include_inbound {
                None => {
                    if p.exclude_inbound.contains(&dport) || [15020, 15021, 15090].contains(&dport)
                    {
                        NotCaptured
                    } else {
                        To(IN_PORT)
                    }
                }
                Some(ports) if ports.contains(&dport) => To(IN_PORT),
                Some(_) => NotCaptured,
            }
        }
        Conn::Out {
            uid,
            gid,
            oif,
            src,
            dst,
            dport,
        } => {
            let lo = oif == "lo";
            if p.exclude_ifaces.iter().any(|i| i == oif) {
                return NotCaptured;
            }
            let excluded_ports = p
                .exclude_outbound_ports
                .clone()
                .unwrap_or_else(|| vec![15020]);
            if excluded_ports.contains(&dport) {
                return NotCaptured;
            }
            if lo
                && (src == IpAddr::from([127, 0, 0, 6]) || src == "::6".parse::<IpAddr>().unwrap())
            {
                return NotCaptured;
            }
            // rules 4-5 (uid), then 6 (the same for gid)
            for owner_matches in [uid == PROXY_ID, gid == PROXY_ID] {
                if lo && !is_loopback_dst(dst) && dport != 15008 && owner_matches {
                    return To(IN_PORT);
                }
                if lo || owner_matches {
                    return NotCaptured;
                }
            }
            if is_loopback_dst(dst) || in_any(&p.exclude_ranges, dst) {
                return NotCaptured;
            }
            if p.include_outbound_ports.contains(&dport) {
                return To(OUT_PORT);
            }
            match &p.include_ranges {
                None => To(OUT_PORT),
                Some(r) if in_any(r, dst) => To(OUT_PORT),
                Some(_) => NotCaptured,
            }
        }
    }
}

/// Evaluates the built ruleset's nat chains for a new TCP connection.
fn interpret(rs: &Ruleset, c: &Conn) -> Verdict {
    let base = match c {
        Conn::Out { .. } => "output",
        Conn::In { .. } => "prerouting",
    };
    match rs.chains.iter().find(|ch| ch.name == base) {
        None => Verdict::NotCaptured,
        Some(_) => run_chain(rs, base, c).unwrap_or(Verdict::NotCaptured),
    }
}

/// `Some(verdict)` when a rule decided, `None` when the chain ran out (or returned).
fn run_chain(rs: &Ruleset, name: &str, c: &Conn) -> Option<Verdict> {
    let chain = rs.chains.iter().find(|ch| ch.name == name)?;
    for r in &chain.rules {
        if !r.matches.iter().all(|m| matches(rs, m, c)) {
            continue;
        }
        match &r.action {
            Action::Return => return None,
            Action::Accept => return Some(Verdict::NotCaptured),
            Action::Redirect(p) => return Some(Verdict::To(*p)),
            Action::Jump(target) => {
                if let Some(v) = run_chain(rs, target, c) {
                    return Some(v);
                }
            }
            other => panic!("unexpected action in REDIRECT mode: {other:?}"),
        }
    }
    None
}

fn set_has(rs: &Ruleset, set: &str, f: impl Fn(&Elems) -> bool) -> bool {
    rs.set(set).is_some_and(|s| f(&s.elems))
}

fn matches(rs: &Ruleset, m: &Match, c: &Conn) -> bool {
    let (iif, oif, src, dst, dport, uid, gid) = match *c {
        Conn::Out {
            uid,
            gid,
            oif,
            src,
            dst,
            dport,
        } => ("", oif, Some(src), dst, dport, Some(uid), Some(gid)),
        Conn::In { iif, dst, dport } => (iif, "", None, dst, dport, None, None),
    };
    let family = if dst.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    let cmp = |c: &Cmp, eq: bool| if *c == Cmp::Eq { eq } else { !eq };
    match m {
        Match::NfProto(f) => *f == family,
        Match::L4Proto(l) => *l == L4::Tcp,
        Match::Iifname(n) => n == iif,
        Match::Oifname(n) => n == oif,
        Match::IifnameIn(s) => set_has(
            rs,
            s,
            |e| matches!(e, Elems::Ifnames(v) if v.iter().any(|n| n == iif)),
        ),
        Match::OifnameIn(s) => set_has(
            rs,
            s,
            |e| matches!(e, Elems::Ifnames(v) if v.iter().any(|n| n == oif)),
        ),
        Match::Saddr(a) => Some(*a) == src,
        Match::Daddr(c, a) => cmp(c, *a == dst),
        Match::DaddrIn(f, s) => {
            *f == family
                && set_has(rs, s, |e| match (e, dst) {
                    (Elems::V4(v), IpAddr::V4(d)) => v.iter().any(|n| n.contains(&d)),
                    (Elems::V6(v), IpAddr::V6(d)) => v.iter().any(|n| n.contains(&d)),
                    _ => false,
                })
        }
        Match::Dport(c, p) => cmp(c, *p == dport),
        Match::DportIn(s) => set_has(
            rs,
            s,
            |e| matches!(e, Elems::Ports(v) if v.contains(&dport)),
        ),
        Match::SkUid(c, u) => uid.is_some_and(|x| cmp(c, x == *u)),
        Match::SkGid(c, g) => gid.is_some_and(|x| cmp(c, x == *g)),
        other => panic!("unexpected match in REDIRECT mode: {other:?}"),
    }
}

fn build(p: &Policy) -> Ruleset {
    let ann: Annotations = p
        .annotations()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let pod = PolicyPod {
        annotations: Some(&ann),
        ..PolicyPod::default()
    };
    match policy::decide(&PluginConfig::default(), &pod).expect("generated policies are valid") {
        Decision::Capture(plan) => ruleset::build(&plan),
        Decision::Skip(w) => panic!("skipped: {w}"),
    }
}

// Generators: values drawn from small pools around the test topology, so inclusions, exclusions
// and connections actually meet.
fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        Just("10.88.0.1".parse().unwrap()),
        Just("10.88.0.50".parse().unwrap()),
        Just("10.88.0.100".parse().unwrap()),
        Just("10.88.0.2".parse().unwrap()),
        Just("127.0.0.1".parse().unwrap()),
        Just("fd88::1".parse().unwrap()),
        Just("fd88::50".parse().unwrap()),
        Just("::1".parse().unwrap()),
    ]
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        Just("10.88.0.0/24".parse().unwrap()),
        Just("10.88.0.0/26".parse().unwrap()),
        Just("10.88.0.64/26".parse().unwrap()),
        Just("10.88.0.50/32".parse().unwrap()),
        Just("10.96.0.0/12".parse().unwrap()),
        Just("fd88::/64".parse().unwrap()),
        Just("fd88::50/128".parse().unwrap()),
        Just("fd99::/16".parse().unwrap()),
    ]
}

/// Unprivileged ports only: the app server runs as uid 1000.
const PORTS: [u16; 8] = [3306, 8080, 8443, 9090, 15008, 15020, 15021, 15090];

fn port() -> impl Strategy<Value = u16> {
    prop::sample::select(PORTS.to_vec())
}

fn ports() -> impl Strategy<Value = Vec<u16>> {
    prop::collection::vec(port(), 0..3)
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    (
        prop::option::weighted(0.6, prop::collection::vec(net(), 0..3)),
        prop::collection::vec(net(), 0..3),
        prop::option::weighted(0.4, ports()),
        ports(),
        ports(),
        prop::option::weighted(0.5, ports()),
        prop::collection::vec(
            prop::sample::select(vec!["eth0".to_string(), "eth1".to_string()]),
            0..2,
        ),
    )
        .prop_map(|(ir, er, ii, ei, iop, eop, ifs)| Policy {
            // An include list that is `Some` is rendered even if empty (= no outbound capture).
            include_ranges: ir,
            exclude_ranges: er,
            include_inbound: ii,
            exclude_inbound: ei,
            include_outbound_ports: iop,
            exclude_outbound_ports: eop,
            exclude_ifaces: ifs,
        })
}

fn conn_strategy() -> impl Strategy<Value = Conn> {
    prop_oneof![
        (
            prop::sample::select(vec![
                (1000u32, 1000u32),
                (PROXY_ID, PROXY_ID),
                (2000, PROXY_ID),
                (PROXY_ID, 2000)
            ]),
            prop::sample::select(vec!["eth0", "lo"]),
            addr(),
            port(),
            prop::bool::weighted(0.2),
        )
            .prop_map(|((uid, gid), oif, dst, dport, passthrough)| {
                // The source is of the destination's family: the pod's address, or the proxy's
                // passthrough address.
                let src = match (dst.is_ipv4(), passthrough) {
                    (true, false) => "10.88.0.2",
                    (true, true) => "127.0.0.6",
                    (false, false) => "fd88::2",
                    (false, true) => "::6",
                };
                Conn::Out {
                    uid,
                    gid,
                    oif,
                    src: src.parse().unwrap(),
                    dst,
                    dport,
                }
            }),
        (
            prop::sample::select(vec!["eth0", "eth1"]),
            port(),
            prop::bool::ANY
        )
            .prop_map(|(iif, dport, v6)| Conn::In {
                iif,
                dst: if v6 {
                    "fd88::2".parse().unwrap()
                } else {
                    "10.88.0.2".parse().unwrap()
                },
                dport,
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn built_ruleset_agrees_with_the_spec_model(p in policy_strategy(), c in conn_strategy()) {
        let rs = build(&p);
        prop_assert_eq!(interpret(&rs, &c), model(&p, &c), "policy {:?}\nconnection {:?}", p, c);
    }
}

/// One real connection in a real pod: who answers. Returns the verdict it implies.
fn observe(pod: &Pod, c: &Conn) -> Verdict {
    let line = match *c {
        Conn::Out {
            uid,
            gid,
            dst,
            dport,
            ..
        } => pod.dial_from_pod(Ident { uid, gid }, &hp(&dst.to_string(), dport)),
        Conn::In { dst, dport, .. } => pod.dial_from_node(&hp(&dst.to_string(), dport)),
    };
    match line {
        Ok(l) if l.starts_with("proxy port=15001") => Verdict::To(OUT_PORT),
        Ok(l) if l.starts_with("proxy port=15006") => Verdict::To(IN_PORT),
        _ => Verdict::NotCaptured,
    }
}

proptest! {
    // Each case builds a pod with the real plugins: fewer cases, but real packets.
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_kernel_agrees_with_the_model_on_real_traffic(
        p in policy_strategy(),
        conns in prop::collection::vec(conn_strategy(), 6),
    ) {
        let ann: serde_json::Map<String, serde_json::Value> =
            p.annotations().into_iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v))).collect();
        let pod = Pod::with(Some(serde_json::Value::Object(ann)), serde_json::json!({})).expect("ADD");
        // The rest of the cluster: extra addresses on the node's bridge, a server on each port.
        for a in ["10.88.0.50/24", "10.88.0.100/24", "fd88::50/64"] {
            pod.node.exec(&["ip", "addr", "add", a, "dev", "mr0"]);
        }
        let _node = pod.node_server(&PORTS);
        let _app = pod.app_server(&PORTS);
        let _proxy = pod.proxy();
        for c in conns {
            // Real connections leave on the interface the route picks: eth0 for other hosts,
            // lo for the pod's own and loopback addresses. Take the model's view of that.
            let c = match c {
                Conn::Out { uid, gid, dst, dport, .. } => {
                    let local = is_loopback_dst(dst) || dst.to_string() == pod.ip4 || dst.to_string() == pod.ip6;
                    let src = if local { dst } else if dst.is_ipv4() { pod.ip4.parse().unwrap() } else { pod.ip6.parse().unwrap() };
                    Conn::Out { uid, gid, oif: if local { "lo" } else { "eth0" }, src, dst, dport }
                }
                // Inbound traffic arrives on the pod's only interface.
                Conn::In { dst, dport, .. } => Conn::In { iif: "eth0", dst, dport },
            };
            prop_assert_eq!(observe(&pod, &c), model(&p, &c), "policy {:?}\nconnection {:?}", p, c);
        }
    }
}
