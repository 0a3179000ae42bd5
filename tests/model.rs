//! Property tests: random annotation sets against simple reference models — SPEC §4 for Istio
//! (with its parity amendments: loopback includes, interface wildcards), and Linkerd's and
//! Kuma's published rules — that decide "captured to which port / not captured" for a
//! connection.
//!
//! 1. Pure: the ruleset mesh-redirect builds, run through a small interpreter of its rules,
//!    agrees with the model for thousands of random (policy, connection) pairs.
//! 2. Kernel: for a sample, the real ruleset in a real pod namespace, real connections (app,
//!    proxy uid, proxy gid, from outside) agree with the model too.
//!
//! The models are written from the SPEC's text and the meshes' rules, not from the code: they
//! read the generated lists directly, never mesh-redirect's parsed plan.

use common::*;
use ipnet::IpNet;
use mesh_redirect::config::{Annotations, Mesh, PluginConfig};
use mesh_redirect::policy::{self, Decision, Pod as PolicyPod};
use mesh_redirect::ruleset::{self, Action, Cmp, Elems, Family, L4, Match, Ruleset};
use proptest::prelude::*;
use std::net::IpAddr;

const PROXY_ID: u32 = 1337;
const OUT_PORT: u16 = 15001;
const IN_PORT: u16 = 15006;

/// A random policy of one of the meshes.
#[derive(Debug, Clone)]
enum Case {
    Istio(Policy),
    Linkerd(LinkerdPolicy),
    Kuma(KumaPolicy),
    KumaKeys(KumaKeysPolicy),
}

/// Kuma 2.x's per-key annotations (no YAML), as its injector writes them in CNI mode: the
/// inbound and outbound exclusion lists (absent: kuma-cni's default 9901), the application
/// probe proxy port (absent: 9001; 0: none), a delegated gateway, the IP family.
#[derive(Debug, Clone)]
struct KumaKeysPolicy {
    exclude_in: Option<Vec<u16>>,
    probe: Option<u16>,
    exclude_out: Option<Vec<u16>>,
    gateway: bool,
    ipv4_only: bool,
}

/// Linkerd: skip lists (with ranges), skip-subnets (inbound sources), the proxy's ids, IPv6.
#[derive(Debug, Clone)]
struct LinkerdPolicy {
    skip_in: Vec<(u16, u16)>,
    skip_out: Vec<(u16, u16)>,
    subnets: Vec<IpNet>,
    gid: bool,
    ipv6: bool,
}

/// Kuma: the YAML's ports, IPs and uid exclusions, include lists, IP family.
#[derive(Debug, Clone)]
struct KumaPolicy {
    exclude_in: Vec<u16>,
    include_in: Vec<u16>,
    exclude_out: Vec<u16>,
    include_out: Vec<u16>,
    exclude_in_ips: Vec<IpNet>,
    exclude_out_ips: Vec<IpNet>,
    /// (port, uid range) for TCP.
    uid_exclusions: Vec<(u16, (u32, u32))>,
    ipv4_only: bool,
}

/// A random Istio policy: the values the annotations are made from.
#[derive(Debug, Clone)]
struct Policy {
    include_ranges: Option<Vec<IpNet>>, // None: "*"
    exclude_ranges: Vec<IpNet>,
    include_inbound: Option<Vec<u16>>, // None: "*"
    exclude_inbound: Vec<u16>,
    include_outbound_ports: Vec<u16>,
    exclude_outbound_ports: Option<Vec<u16>>, // None: annotation absent (default 15020)
    /// Names; a trailing `+` is a prefix wildcard.
    exclude_ifaces: Vec<String>,
    /// `istio.io/reroute-virtual-interfaces` (KubeVirt): exact names.
    reroute_ifaces: Vec<String>,
}

fn range_list(v: &[(u16, u16)]) -> String {
    v.iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Case {
    fn mesh(&self) -> Mesh {
        match self {
            Case::Istio(_) => Mesh::Istio,
            Case::Linkerd(_) => Mesh::Linkerd,
            Case::Kuma(_) | Case::KumaKeys(_) => Mesh::Kuma,
        }
    }

    /// The conflist entry's keys for this case.
    fn conf(&self) -> serde_json::Value {
        match self {
            Case::Istio(_) => serde_json::json!({}),
            Case::Linkerd(l) => serde_json::json!({"mesh": "linkerd", "ipv6": l.ipv6}),
            Case::Kuma(_) | Case::KumaKeys(_) => serde_json::json!({"mesh": "kuma"}),
        }
    }

    fn annotations(&self) -> Vec<(&'static str, String)> {
        match self {
            Case::Istio(p) => p.annotations(),
            Case::Linkerd(l) => {
                let mut a = vec![
                    (policy::linkerd::PROXY_VERSION, "stable-2.18.0".to_string()),
                    (policy::linkerd::SKIP_INBOUND_PORTS, range_list(&l.skip_in)),
                    (
                        policy::linkerd::SKIP_OUTBOUND_PORTS,
                        range_list(&l.skip_out),
                    ),
                    (policy::linkerd::SKIP_SUBNETS, list(&l.subnets)),
                ];
                if l.gid {
                    a.push((policy::linkerd::PROXY_GID, LINKERD_UID.to_string()));
                }
                a
            }
            Case::Kuma(k) => {
                let ips = |v: &[IpNet]| format!("[{:?}]", list(v));
                let uids: Vec<String> = k
                    .uid_exclusions
                    .iter()
                    .map(|(p, (a, b))| format!("\"tcp:{p}:{a}-{b}\""))
                    .collect();
                let yaml = format!(
                    "{{cniMode: true, ipFamilyMode: {}, redirect: {{inbound: {{excludePorts: [{}], includePorts: [{}], excludePortsForIPs: {}}}, outbound: {{excludePorts: [{}], includePorts: [{}], excludePortsForIPs: {}, excludePortsForUIDs: [{}]}}}}}}",
                    if k.ipv4_only { "ipv4" } else { "dualstack" },
                    list(&k.exclude_in),
                    list(&k.include_in),
                    if k.exclude_in_ips.is_empty() {
                        "[]".into()
                    } else {
                        ips(&k.exclude_in_ips)
                    },
                    list(&k.exclude_out),
                    list(&k.include_out),
                    if k.exclude_out_ips.is_empty() {
                        "[]".into()
                    } else {
                        ips(&k.exclude_out_ips)
                    },
                    uids.join(", "),
                );
                vec![
                    (policy::kuma_names::SIDECAR_INJECTED, "true".to_string()),
                    (policy::kuma_names::TRANSPARENT_PROXY_CONFIG, yaml),
                ]
            }
            Case::KumaKeys(k) => {
                use policy::kuma_keys::*;
                let mut a = vec![
                    (policy::kuma_names::SIDECAR_INJECTED, "true".to_string()),
                    (NETWORKS, "kuma-cni".to_string()),
                    (SIDECAR_UID, KUMA_UID.to_string()),
                    (INBOUND_PORT, IN_PORT.to_string()),
                    (OUTBOUND_PORT, OUT_PORT.to_string()),
                    (
                        IP_FAMILY_MODE,
                        if k.ipv4_only { "ipv4" } else { "dualstack" }.to_string(),
                    ),
                ];
                let plain = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
                if let Some(v) = &k.exclude_in {
                    a.push((EXCLUDE_INBOUND_PORTS, plain(v)));
                }
                if let Some(p) = k.probe {
                    a.push((PROBE_PROXY_PORT, p.to_string()));
                }
                if let Some(v) = &k.exclude_out {
                    a.push((EXCLUDE_OUTBOUND_PORTS, plain(v)));
                }
                if k.gateway {
                    a.push((GATEWAY, "enabled".to_string()));
                }
                a
            }
        }
    }

    /// The proxy's uid (and gid) in this mesh.
    fn proxy_id(&self) -> u32 {
        match self {
            Case::Istio(_) => PROXY_ID,
            Case::Linkerd(_) => LINKERD_UID,
            Case::Kuma(_) | Case::KumaKeys(_) => KUMA_UID,
        }
    }

    /// (outbound, inbound) capture ports.
    fn ports(&self) -> (u16, u16) {
        match self {
            Case::Linkerd(_) => (4140, 4143),
            _ => (OUT_PORT, IN_PORT),
        }
    }
}

const LINKERD_UID: u32 = 2102;
const KUMA_UID: u32 = 5678;

fn in_ranges(r: &[(u16, u16)], p: u16) -> bool {
    r.iter().any(|&(a, b)| a <= p && p <= b)
}

/// linkerd2-proxy-init's rules (183e791), read off `iptables.go`: inbound skips ports (4190,
/// 4191 always) and source subnets, then redirects TCP to 4143; outbound returns the proxy's
/// uid (and gid when set), everything out `lo`, skipped ports, then redirects TCP to 4140.
/// IPv6 only with the entry's `ipv6`.
fn linkerd_model(l: &LinkerdPolicy, c: &Conn) -> Verdict {
    use Verdict::*;
    let v6 = match c {
        Conn::In { dst, .. } | Conn::Out { dst, .. } => dst.is_ipv6(),
    };
    if v6 && !l.ipv6 {
        return NotCaptured;
    }
    match *c {
        Conn::In { src, dport, .. } => {
            if [4190, 4191].contains(&dport)
                || in_ranges(&l.skip_in, dport)
                || in_any(&l.subnets, src)
            {
                NotCaptured
            } else {
                To(4143)
            }
        }
        Conn::Out {
            uid,
            gid,
            oif,
            dport,
            ..
        } => {
            if uid == LINKERD_UID
                || (l.gid && gid == LINKERD_UID)
                || oif == "lo"
                || in_ranges(&l.skip_out, dport)
            {
                NotCaptured
            } else {
                To(4140)
            }
        }
    }
}

/// Kuma's builder (348b652), read off the generated rules: excluded outbound IPs and uid
/// exclusions return first; KUMA_MESH_OUTBOUND returns excluded ports, the passthrough source
/// on `lo`, sends the proxy's `lo` traffic to a non-localhost address inbound, returns other
/// `lo` traffic, the proxy's own, localhost; then redirects (only included ports, if any).
/// Inbound returns excluded sources and ports (9001, 9902 always), or redirects only included
/// ports. `ipFamilyMode: ipv4` leaves IPv6 alone.
fn kuma_model(k: &KumaPolicy, c: &Conn) -> Verdict {
    use Verdict::*;
    let v6 = match c {
        Conn::In { dst, .. } | Conn::Out { dst, .. } => dst.is_ipv6(),
    };
    if v6 && k.ipv4_only {
        return NotCaptured;
    }
    match *c {
        Conn::In { src, dport, .. } => {
            if in_any(&k.exclude_in_ips, src) {
                return NotCaptured;
            }
            if !k.include_in.is_empty() {
                return if k.include_in.contains(&dport) {
                    To(IN_PORT)
                } else {
                    NotCaptured
                };
            }
            if [9001, 9902].contains(&dport) || k.exclude_in.contains(&dport) {
                NotCaptured
            } else {
                To(IN_PORT)
            }
        }
        Conn::Out {
            uid,
            oif,
            src,
            dst,
            dport,
            ..
        } => {
            let lo = oif == "lo";
            if in_any(&k.exclude_out_ips, dst)
                || k.uid_exclusions
                    .iter()
                    .any(|&(p, (a, b))| p == dport && a <= uid && uid <= b)
            {
                return NotCaptured;
            }
            // With includePorts, Kuma's excludePorts do not apply.
            if k.include_out.is_empty() && k.exclude_out.contains(&dport) {
                return NotCaptured;
            }
            if lo
                && (src == IpAddr::from([127, 0, 0, 6]) || src == "::6".parse::<IpAddr>().unwrap())
            {
                return NotCaptured;
            }
            if lo && !is_loopback_dst(dst) && uid == KUMA_UID {
                return To(IN_PORT);
            }
            if lo || uid == KUMA_UID || is_loopback_dst(dst) {
                return NotCaptured;
            }
            if !k.include_out.is_empty() {
                return if k.include_out.contains(&dport) {
                    To(OUT_PORT)
                } else {
                    NotCaptured
                };
            }
            To(OUT_PORT)
        }
    }
}

/// kuma-cni 2.x from per-key annotations (v2.14.3, `annotations_linux.go`,
/// `injector_linux.go`), read off the rules it builds: the inbound exclusions are the
/// annotation's list (absent: 9901) plus the probe proxy port (absent: 9001; 0: none); the
/// outbound exclusions the annotation's list (absent: 9901); a gateway captures nothing
/// inbound; the rest is Kuma's builder as in `kuma_model`.
fn kuma_keys_model(k: &KumaKeysPolicy, c: &Conn) -> Verdict {
    use Verdict::*;
    let v6 = match c {
        Conn::In { dst, .. } | Conn::Out { dst, .. } => dst.is_ipv6(),
    };
    if v6 && k.ipv4_only {
        return NotCaptured;
    }
    match *c {
        Conn::In { dport, .. } => {
            let mut excluded = k.exclude_in.clone().unwrap_or_else(|| vec![9901]);
            match k.probe {
                None => excluded.push(9001),
                Some(0) => {}
                Some(p) => excluded.push(p),
            }
            if k.gateway || excluded.contains(&dport) {
                NotCaptured
            } else {
                To(IN_PORT)
            }
        }
        Conn::Out {
            uid,
            oif,
            src,
            dst,
            dport,
            ..
        } => {
            let lo = oif == "lo";
            if k.exclude_out
                .clone()
                .unwrap_or_else(|| vec![9901])
                .contains(&dport)
            {
                return NotCaptured;
            }
            if lo
                && (src == IpAddr::from([127, 0, 0, 6]) || src == "::6".parse::<IpAddr>().unwrap())
            {
                return NotCaptured;
            }
            if lo && !is_loopback_dst(dst) && uid == KUMA_UID {
                return To(IN_PORT);
            }
            if lo || uid == KUMA_UID || is_loopback_dst(dst) {
                return NotCaptured;
            }
            To(OUT_PORT)
        }
    }
}

fn case_model(c: &Case, conn: &Conn) -> Verdict {
    match c {
        Case::Istio(p) => model(p, conn),
        Case::Linkerd(l) => linkerd_model(l, conn),
        Case::Kuma(k) => kuma_model(k, conn),
        Case::KumaKeys(k) => kuma_keys_model(k, conn),
    }
}

/// An interface name matches an excluded one (`name+`: any name with that prefix).
fn iface_excluded(list: &[String], name: &str) -> bool {
    list.iter().any(|i| match i.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => i == name,
    })
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
        if !self.reroute_ifaces.is_empty() {
            a.push((
                policy::istio::REROUTE_INTERFACES,
                self.reroute_ifaces.join(","),
            ));
        }
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
        src: IpAddr,
        dst: IpAddr,
        dport: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    To(u16),
    NotCaptured,
    /// Real traffic only: nobody answered (the model never predicts this: every destination
    /// has a server, so a ruleset that drops what should pass is caught).
    NoAnswer,
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
        Conn::In {
            iif, dst, dport, ..
        } => {
            // Istio's KubeVirt reroute: TCP arriving there goes to the outbound port when its
            // destination is included, and is never inbound-captured.
            if p.reroute_ifaces.iter().any(|i| i == iif) {
                return match &p.include_ranges {
                    None => To(OUT_PORT),
                    Some(r) if in_any(r, dst) => To(OUT_PORT),
                    Some(_) => NotCaptured,
                };
            }
            if iface_excluded(&p.exclude_ifaces, iif) || dport == 15008 {
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
            if iface_excluded(&p.exclude_ifaces, oif) {
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
            // rules 4-5 (uid), then 6 (the same for gid); Istio's HasLoopBackIP: an include
            // range holding a loopback address drops "out lo, not the proxy → not captured".
            let has_loopback = p
                .include_ranges
                .as_ref()
                .is_some_and(|r| r.iter().any(|n| n.addr().is_loopback()));
            for owner_matches in [uid == PROXY_ID, gid == PROXY_ID] {
                if lo && !is_loopback_dst(dst) && dport != 15008 && owner_matches {
                    return To(IN_PORT);
                }
                if (lo && !has_loopback) || owner_matches {
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
        } => ("", oif, src, dst, dport, Some(uid), Some(gid)),
        Conn::In {
            iif,
            src,
            dst,
            dport,
        } => (iif, "", src, dst, dport, None, None),
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
        Match::IifnamePrefix(p) => iif.starts_with(p.as_str()),
        Match::OifnamePrefix(p) => oif.starts_with(p.as_str()),
        Match::Saddr(a) => *a == src,
        Match::SaddrIn(f, s) => {
            *f == family
                && set_has(rs, s, |e| match (e, src) {
                    (Elems::V4(v), IpAddr::V4(a)) => v.iter().any(|n| n.contains(&a)),
                    (Elems::V6(v), IpAddr::V6(a)) => v.iter().any(|n| n.contains(&a)),
                    _ => false,
                })
        }
        Match::DportRange(a, b) => *a <= dport && dport <= *b,
        Match::SkUidRange(a, b) => uid.is_some_and(|u| *a <= u && u <= *b),
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
        Match::DportIn(s) => set_has(rs, s, |e| match e {
            Elems::Ports(v) => v.contains(&dport),
            Elems::PortRanges(v) => v.iter().any(|&(a, b)| a <= dport && dport <= b),
            _ => false,
        }),
        Match::SkUid(c, u) => uid.is_some_and(|x| cmp(c, x == *u)),
        Match::SkGid(c, g) => gid.is_some_and(|x| cmp(c, x == *g)),
        other => panic!("unexpected match in REDIRECT mode: {other:?}"),
    }
}

fn build(c: &Case) -> Ruleset {
    let ann: Annotations = c
        .annotations()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let pod = PolicyPod {
        annotations: Some(&ann),
        ipv6: true,
        ..PolicyPod::default()
    };
    let cfg = match c {
        Case::Linkerd(l) => PluginConfig {
            ipv6: l.ipv6,
            ..PluginConfig::for_mesh(Mesh::Linkerd)
        },
        other => PluginConfig::for_mesh(other.mesh()),
    };
    match policy::decide(&cfg, &pod).expect("generated policies are valid") {
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
        Just("127.0.0.0/8".parse().unwrap()),
    ]
}

/// Unprivileged ports only: the app server runs as uid 1000. Every mesh's always-excluded
/// ports are in the pool (Istio's 15020/15021/15090, Linkerd's 4190/4191, Kuma's 9001/9902
/// and kuma-cni's 9901), so emptying any of those lists shows.
const PORTS: [u16; 13] = [
    3306, 4190, 4191, 8080, 8443, 9001, 9090, 9901, 9902, 15008, 15020, 15021, 15090,
];

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
            prop::sample::select(vec![
                "eth0".to_string(),
                "eth1".to_string(),
                "eth+".to_string(),
                "veth+".to_string(),
            ]),
            0..2,
        ),
        prop::collection::vec(
            prop::sample::select(vec!["k6t-eth0".to_string(), "eth1".to_string()]),
            0..2,
        ),
    )
        .prop_map(|(ir, er, ii, ei, iop, eop, ifs, rr)| Policy {
            // An include list that is `Some` is rendered even if empty (= no outbound capture).
            include_ranges: ir,
            exclude_ranges: er,
            include_inbound: ii,
            exclude_inbound: ei,
            include_outbound_ports: iop,
            exclude_outbound_ports: eop,
            exclude_ifaces: ifs,
            reroute_ifaces: rr,
        })
}

fn kuma_keys_strategy() -> impl Strategy<Value = KumaKeysPolicy> {
    let nonempty = || prop::collection::vec(port(), 1..3);
    (
        prop::option::weighted(0.6, nonempty()),
        prop::option::weighted(0.5, prop::sample::select(vec![0u16, 9001, 8443])),
        prop::option::weighted(0.5, nonempty()),
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(ei, probe, eo, gateway, v4)| KumaKeysPolicy {
            exclude_in: ei,
            probe,
            exclude_out: eo,
            gateway,
            ipv4_only: v4,
        })
}

fn port_ranges() -> impl Strategy<Value = Vec<(u16, u16)>> {
    prop::collection::vec(
        prop_oneof![
            port().prop_map(|p| (p, p)),
            Just((8000, 8099)),
            Just((3000, 3400)),
            Just((15000, 15100)),
        ],
        0..3,
    )
}

fn linkerd_strategy() -> impl Strategy<Value = LinkerdPolicy> {
    (
        port_ranges(),
        port_ranges(),
        prop::collection::vec(
            net().prop_filter("not loopback", |n| !n.addr().is_loopback()),
            0..3,
        ),
        prop::bool::ANY,
        prop::bool::ANY,
    )
        .prop_map(|(skip_in, skip_out, subnets, gid, ipv6)| LinkerdPolicy {
            skip_in,
            skip_out,
            subnets,
            gid,
            ipv6,
        })
}

fn kuma_strategy() -> impl Strategy<Value = KumaPolicy> {
    let nets = || {
        prop::collection::vec(
            net().prop_filter("not loopback", |n| !n.addr().is_loopback()),
            0..3,
        )
    };
    (
        ports(),
        prop::option::weighted(0.2, ports()),
        ports(),
        prop::option::weighted(0.2, ports()),
        nets(),
        nets(),
        prop::collection::vec(
            (
                port(),
                prop::sample::select(vec![(1000u32, 1000u32), (900, 1100), (2000, 2000)]),
            ),
            0..2,
        ),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(ei, ii, eo, io, eii, eoi, ux, v4)| KumaPolicy {
            exclude_in: ei,
            include_in: ii.unwrap_or_default(),
            exclude_out: eo,
            include_out: io.unwrap_or_default(),
            exclude_in_ips: eii,
            exclude_out_ips: eoi,
            uid_exclusions: ux,
            ipv4_only: v4,
        })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    prop_oneof![
        2 => policy_strategy().prop_map(Case::Istio),
        1 => linkerd_strategy().prop_map(Case::Linkerd),
        1 => kuma_strategy().prop_map(Case::Kuma),
        1 => kuma_keys_strategy().prop_map(Case::KumaKeys),
    ]
}

/// A connection, with the proxy identities of `proxy` (the mesh's proxy uid/gid).
fn conn_strategy_for(proxy: u32) -> impl Strategy<Value = Conn> {
    prop_oneof![
        (
            prop::sample::select(vec![
                (1000u32, 1000u32),
                (proxy, proxy),
                (2000, proxy),
                (proxy, 2000)
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
            .prop_map(|(iif, dport, v6)| {
                // From the node's address on the pod's bridge, as the real traffic comes.
                let (src, dst) = if v6 {
                    ("fd88::1", "fd88::2")
                } else {
                    ("10.88.0.1", "10.88.0.2")
                };
                Conn::In {
                    iif,
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    dport,
                }
            }),
        // A VM's connection arriving on KubeVirt's interface, to anywhere.
        (addr(), port()).prop_map(|(dst, dport)| Conn::In {
            iif: "k6t-eth0",
            src: if dst.is_ipv4() {
                "10.201.0.2"
            } else {
                "fd21::2"
            }
            .parse()
            .unwrap(),
            dst,
            dport,
        }),
    ]
}

fn case_and_conn() -> impl Strategy<Value = (Case, Conn)> {
    case_strategy().prop_flat_map(|c| {
        let id = c.proxy_id();
        (Just(c), conn_strategy_for(id))
    })
}

fn case_and_conns(n: usize) -> impl Strategy<Value = (Case, Vec<Conn>)> {
    case_strategy().prop_flat_map(move |c| {
        let id = c.proxy_id();
        (Just(c), prop::collection::vec(conn_strategy_for(id), n))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn built_ruleset_agrees_with_the_model((case, c) in case_and_conn()) {
        let rs = build(&case);
        prop_assert_eq!(interpret(&rs, &c), case_model(&case, &c), "policy {:?}\nconnection {:?}", case, c);
    }
}

/// One real connection in a real pod: who answers. Returns the verdict it implies, and the
/// answer.
fn observe(pod: &Pod, c: &Conn) -> (Verdict, Result<String, String>) {
    let line = match *c {
        Conn::Out {
            uid,
            gid,
            dst,
            dport,
            ..
        } => pod.dial_from_pod(Ident { uid, gid }, &hp(&dst.to_string(), dport)),
        // From the source the model assumes (the node has several addresses on the bridge).
        Conn::In {
            src, dst, dport, ..
        } => connect_from(
            &pod.node.path(),
            ROOT,
            &hp(&dst.to_string(), dport),
            &src.to_string(),
        ),
    };
    let v = match &line {
        Ok(l) if l.starts_with("proxy port=") => l["proxy port=".len()..]
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .map_or(Verdict::NotCaptured, Verdict::To),
        Ok(_) => Verdict::NotCaptured,
        Err(_) => Verdict::NoAnswer,
    };
    (v, line)
}

proptest! {
    // Each case builds a pod with the real plugins: fewer cases, but real packets.
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_kernel_agrees_with_the_model_on_real_traffic((case, conns) in case_and_conns(6)) {
        let ann: serde_json::Map<String, serde_json::Value> =
            case.annotations().into_iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v))).collect();
        let pod = Pod::with(Some(serde_json::Value::Object(ann)), case.conf()).expect("ADD");
        // The rest of the cluster: extra addresses on the node's bridge, a server on each port.
        for a in ["10.88.0.50/24", "10.88.0.100/24", "fd88::50/64"] {
            pod.node.exec(&["ip", "addr", "add", a, "dev", "mr0"]);
        }
        let _node = pod.node_server(&PORTS);
        let _app = pod.app_server(&PORTS);
        let id = case.proxy_id();
        let (out_port, in_port) = case.ports();
        let _proxy = serve(&pod.pod.path(), Ident { uid: id, gid: id }, "proxy", &[out_port, in_port], &[]);
        for c in conns {
            // A VM behind the pod needs a topology this half does not build (tests/injectors.rs
            // and tests/istio_parity.rs send VM traffic for real).
            if matches!(c, Conn::In { iif: "k6t-eth0", .. }) {
                continue;
            }
            // Real connections leave on the interface the route picks: eth0 for other hosts,
            // lo for the pod's own and loopback addresses. Take the model's view of that.
            let c = match c {
                Conn::Out { uid, gid, dst, dport, .. } => {
                    let local = is_loopback_dst(dst) || dst.to_string() == pod.ip4 || dst.to_string() == pod.ip6;
                    let src = if local { dst } else if dst.is_ipv4() { pod.ip4.parse().unwrap() } else { pod.ip6.parse().unwrap() };
                    Conn::Out { uid, gid, oif: if local { "lo" } else { "eth0" }, src, dst, dport }
                }
                // Inbound traffic arrives on the pod's only interface.
                Conn::In { src, dst, dport, .. } => Conn::In { iif: "eth0", src, dst, dport },
            };
            let (got, line) = observe(&pod, &c);
            prop_assert_eq!(got, case_model(&case, &c), "policy {:?}\nconnection {:?}\nanswer {:?}\nruleset {}", case, c, line, pod.pod.ruleset());
        }
    }
}

/// How Istio's injector may have written a pod, for the decision model.
#[derive(Debug, Clone)]
struct Injected {
    templates: Option<&'static str>,
    status: Option<&'static str>,
    proxy_config: Option<&'static str>,
    inject: Option<&'static str>,
    interception: Option<&'static str>,
    capture_dns: bool,
}

/// istio-cni's decision (86c9f01 `cni/pkg/plugin/plugin.go`, `sidecar_redirect.go`), from
/// what the annotations say of the pod spec, plus SPEC's NONE skip and our DNS switch order:
/// `None` when the pod is left alone, else whether DNS is captured.
fn istio_decision(i: &Injected) -> Option<bool> {
    let status = i.status?;
    if let Some(t) = i.templates
        && !t.split(',').any(|x| x.trim() == "sidecar")
    {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(status).unwrap_or_default();
    let names = |k: &str| -> Option<Vec<String>> {
        v.get(k).and_then(|l| l.as_array()).map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
    };
    let (init, cont) = (names("initContainers"), names("containers"));
    if init.iter().flatten().any(|c| c == "istio-init") {
        return None;
    }
    if (init.is_some() || cont.is_some())
        && !init
            .iter()
            .chain(cont.iter())
            .flatten()
            .any(|c| c == "istio-proxy")
    {
        return None;
    }
    // The proxy metadata counts only if Istio can decode the ProxyConfig (values are strings).
    let md: Option<std::collections::BTreeMap<String, String>> = i.proxy_config.and_then(|y| {
        let d: serde_json::Value = serde_saphyr_like(y)?;
        d.get("proxyMetadata")?
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect()
    });
    let truthy = |k: &str| {
        md.as_ref()
            .and_then(|m| m.get(k))
            .map(|v| ["1", "t", "T", "true", "TRUE", "True"].contains(&v.as_str()))
    };
    if truthy("DISABLE_ENVOY") == Some(true) {
        return None;
    }
    if let Some(v) = i.inject
        && ["0", "f", "F", "false", "FALSE", "False"].contains(&v)
    {
        return None;
    }
    if i.interception == Some("NONE") {
        return None;
    }
    Some(truthy("ISTIO_META_DNS_CAPTURE").unwrap_or(i.capture_dns))
}

/// The few ProxyConfig documents the generator writes, as JSON (flow-style YAML with quoted
/// strings is JSON once keys are quoted; unquoted scalars stay non-strings).
fn serde_saphyr_like(y: &str) -> Option<serde_json::Value> {
    match y {
        "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}" => {
            Some(serde_json::json!({"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}}))
        }
        "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"false\"}" => {
            Some(serde_json::json!({"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "false"}}))
        }
        "proxyMetadata: {DISABLE_ENVOY: \"true\"}" => {
            Some(serde_json::json!({"proxyMetadata": {"DISABLE_ENVOY": "true"}}))
        }
        "proxyMetadata: {ISTIO_META_DNS_CAPTURE: true}" => {
            Some(serde_json::json!({"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": true}}))
        }
        _ => None,
    }
}

fn injected_strategy() -> impl Strategy<Value = Injected> {
    let st = |i: &'static str, c: &'static str| -> &'static str {
        Box::leak(
            format!(r#"{{"initContainers":{i},"containers":{c},"volumes":null,"imagePullSecrets":null,"revision":"default"}}"#)
                .into_boxed_str(),
        )
    };
    let statuses = vec![
        "{}",
        st(r#"["istio-init"]"#, r#"["istio-proxy"]"#),
        st(r#"["istio-init","istio-proxy"]"#, "null"),
        st(r#"["istio-validation"]"#, r#"["istio-proxy"]"#),
        st(r#"["istio-validation","istio-proxy"]"#, "null"),
        st("null", r#"["istio-proxy"]"#),
        st("null", r#"["hello"]"#),
        st("null", "null"),
    ];
    (
        prop::option::weighted(
            0.5,
            prop::sample::select(vec!["sidecar", "gateway", "sidecar, custom", "custom", ""]),
        ),
        prop::option::weighted(0.9, prop::sample::select(statuses)),
        prop::option::weighted(
            0.5,
            prop::sample::select(vec![
                "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}",
                "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"false\"}",
                "proxyMetadata: {DISABLE_ENVOY: \"true\"}",
                "proxyMetadata: {ISTIO_META_DNS_CAPTURE: true}",
                "proxyMetadata: [unclosed",
            ]),
        ),
        prop::option::weighted(
            0.3,
            prop::sample::select(vec!["false", "true", "f", "nope"]),
        ),
        prop::option::weighted(0.3, prop::sample::select(vec!["REDIRECT", "NONE"])),
        prop::bool::ANY,
    )
        .prop_map(
            |(templates, status, proxy_config, inject, interception, capture_dns)| Injected {
                templates,
                status,
                proxy_config,
                inject,
                interception,
                capture_dns,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Which pods are captured, and whether their DNS is: the decision istio-cni makes from the
    /// pod spec, made here from the annotations the injector writes about it.
    #[test]
    fn injector_annotations_decide_as_istio_cni_would(i in injected_strategy()) {
        let mut ann = Annotations::new();
        let pi = policy::istio::STATUS;
        for (k, v) in [
            (policy::istio::TEMPLATES, i.templates),
            (pi, i.status),
            (policy::istio::PROXY_CONFIG, i.proxy_config),
            (policy::istio::INJECT, i.inject),
            (policy::istio::INTERCEPTION_MODE, i.interception),
        ] {
            if let Some(v) = v {
                ann.insert(k.to_string(), v.to_string());
            }
        }
        let cfg = PluginConfig { capture_dns: i.capture_dns, ..PluginConfig::default() };
        let pod = PolicyPod { annotations: Some(&ann), ..PolicyPod::default() };
        let got = match policy::decide(&cfg, &pod).expect("valid") {
            Decision::Skip(_) => None,
            Decision::Capture(p) => Some(p.dns.is_some()),
        };
        prop_assert_eq!(got, istio_decision(&i), "{:?}", i);
    }
}
