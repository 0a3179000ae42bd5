//! Invariant checks shared by the fuzz targets (see ../README.md for the list), and the
//! targets' bodies (`annotations`, `cni_config`, `plan_text`): each `fuzz_targets/*.rs` only
//! hands libFuzzer's input to one, so that `replay` runs a kept crash input exactly as its
//! target did, in a plain `cargo test` (tests/reproducers.rs).
//!
//! Every check `panic!`s with a message naming the broken invariant: libFuzzer reports a panic
//! as a crash and saves the input. Nothing here touches the kernel.

pub mod annotations;
pub mod cni_config;
pub mod plan_text;

/// The fuzz targets, by the names of their `fuzz_targets/*.rs` and `artifacts-found/` dirs.
pub const TARGETS: [&str; 3] = ["annotations", "cni_config", "plan_text"];

/// Runs `data` through `target`'s body as libFuzzer would. `false`: the input never reached
/// the body (an `annotations` input too short or not decodable, which libFuzzer skips too).
/// Panics when the input breaks an invariant, as the target does; an unknown target panics.
pub fn replay(target: &str, data: &[u8]) -> bool {
    match target {
        "annotations" => annotations::replay(data),
        "cni_config" => {
            cni_config::run(data);
            true
        }
        "plan_text" => {
            plan_text::run(data);
            true
        }
        other => panic!("no fuzz target {other:?} (targets: {TARGETS:?})"),
    }
}

use ipnet::{Ipv4Net, Ipv6Net};
use mesh_redirect::config::Mesh;
use mesh_redirect::config::{Annotations, PluginConfig};
use mesh_redirect::ffi::{Elem, KeyType};
use mesh_redirect::kernel::encode_elems;
use mesh_redirect::nft_text;
use mesh_redirect::policy::{
    self, Cidrs, Decision, DnsShape, Inbound, Marker, Mode, OutboundRanges, Plan, Pod, Ports, istio,
};
use mesh_redirect::protocol::{CniError, code, truncate};
use mesh_redirect::ruleset::{self, Elems, Family, Match, Ruleset};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// A profile's annotation names: its marker first, then its table's, in order, then (Kuma)
/// the 2.x per-key names read when the YAML is absent.
pub fn names(mesh: Mesh) -> Vec<&'static str> {
    use mesh_redirect::policy::kuma_keys as k;
    let p = mesh.profile();
    let marker = match p.marker {
        Marker::Present(n) | Marker::Equals(n, _) => n,
    };
    let per_key: &[&'static str] = if mesh == Mesh::Kuma {
        &[
            k::NETWORKS,
            k::INBOUND_PORT,
            k::OUTBOUND_PORT,
            k::IP_FAMILY_MODE,
            k::SIDECAR_UID,
            k::GATEWAY,
            k::BUILTIN_DNS,
            k::BUILTIN_DNS_PORT,
            k::PROBE_PROXY_PORT,
            k::EXCLUDE_INBOUND_PORTS,
            k::EXCLUDE_OUTBOUND_PORTS,
            k::EXCLUDE_OUTBOUND_PORTS_FOR_UIDS,
            k::EXCLUDE_INBOUND_IPS,
            k::EXCLUDE_OUTBOUND_IPS,
            k::DROP_INVALID_PACKETS,
            k::IPTABLES_LOGS,
        ]
    } else {
        &[]
    };
    std::iter::once(marker)
        .chain(
            p.annotations
                .iter()
                .map(|a| a.name)
                .filter(|n| *n != marker),
        )
        .chain(per_key.iter().copied())
        .collect()
}

/// The value that marks a pod as meshed in `mesh`'s profile (any for a presence marker).
pub fn marker_value(mesh: Mesh) -> &'static str {
    match mesh.profile().marker {
        Marker::Present(_) => "{}",
        Marker::Equals(_, v) => v,
    }
}

/// Upper bound on the rules of any ruleset, whatever the list sizes: lists are sets, so the
/// count depends only on which features are on. The structural maximum is 51 (TPROXY, DNS
/// capture and every list non-empty: 3 prerouting, 10 inbound, 7 output_mangle, 2 output,
/// 21 outbound, 6 dns_zone_out, 2 dns_zone_in) plus 3 (excluded sources, drop invalid);
/// without TPROXY and DNS it is under 35. Two things cost a rule each, so they add to the
/// bound: an interface wildcard (`veth+`, in each chain that checks interfaces) and each
/// port range of a Kuma uid exclusion.
pub const MAX_RULES: usize = 60;

/// The bound for one plan (see [`MAX_RULES`]).
pub fn max_rules(plan: &Plan) -> usize {
    let wild = plan
        .exclude_interfaces
        .iter()
        .filter(|n| n.ends_with('+'))
        .count();
    let uids: usize = plan
        .uid_exclusions
        .iter()
        .map(|e| (e.tcp as usize + e.udp as usize) * e.ports.ranges().len().max(1))
        .sum();
    // KubeVirt's rerouted interfaces: per matcher (the set, each wildcard) two redirects and a
    // return.
    let reroute = if plan.reroute_interfaces.is_empty() {
        0
    } else {
        3 * (1 + plan
            .reroute_interfaces
            .iter()
            .filter(|n| n.ends_with('+'))
            .count())
    };
    MAX_RULES + 5 * wild + uids + reroute
}

/// Runs `decide` and checks every invariant of its outcome (and, for a capture, of the
/// ruleset, its text and its netlink set elements). Returns the decision for further checks.
pub fn decide_and_check(cfg: &PluginConfig, pod: &Pod<'_>) -> Result<Decision, CniError> {
    let res = policy::decide(cfg, pod);
    check_decision(cfg, pod, &res);
    res
}

/// Go's `strconv.ParseBool` false values, exactly, as README.md defines "a false value".
fn is_false(v: &str) -> bool {
    ["0", "f", "F", "false", "FALSE", "False"].contains(&v)
}

pub fn check_decision(cfg: &PluginConfig, pod: &Pod<'_>, res: &Result<Decision, CniError>) {
    match res {
        Err(e) => check_error(pod, e),
        Ok(Decision::Skip(why)) => {
            assert!(!why.to_string().is_empty(), "Skip without a reason");
            assert!(!why.rule().is_empty(), "Skip without a rule");
        }
        Ok(Decision::Capture(plan)) => {
            // README "Pod annotations": who may be captured at all.
            if let Some(ns) = pod.namespace {
                assert!(
                    !cfg.exclude_namespaces.iter().any(|e| e == ns),
                    "captured a pod in excluded namespace {ns:?}"
                );
            }
            let ann = pod
                .annotations
                .unwrap_or_else(|| panic!("captured a pod without annotations"));
            assert_eq!(plan.mesh, cfg.mesh, "plan of another profile");
            match cfg.mesh.profile().marker {
                Marker::Present(n) => {
                    assert!(ann.contains_key(n), "captured a pod without {n}")
                }
                Marker::Equals(n, v) => assert!(
                    ann.get(n).map(String::as_str) == Some(v),
                    "captured a pod without {n}={v:?}"
                ),
            }
            if cfg.mesh == Mesh::Istio {
                check_istio_injection(ann);
                if let Some(v) = ann.get(istio::INJECT) {
                    assert!(!is_false(v), "captured a pod with inject={v:?}");
                }
                if let Some(v) = ann.get(istio::INTERCEPTION_MODE) {
                    assert!(
                        !v.trim().eq_ignore_ascii_case("NONE"),
                        "captured a pod with interceptionMode={v:?}"
                    );
                }
            }
            check_plan(cfg, ann, plan);
            let rs = ruleset::build(plan);
            check_ruleset(plan, &rs);
            check_text(&rs);
            check_encoding(&rs);
        }
    }
}

/// What Istio's injector says about a captured pod (README, "Istio"): a sidecar template, no
/// istio-init, the proxy among what it injected, the proxy not disabled.
fn check_istio_injection(ann: &Annotations) {
    if let Some(t) = ann.get(istio::TEMPLATES) {
        assert!(
            t.split(',').any(|x| x.trim() == "sidecar"),
            "captured a pod with templates {t:?}"
        );
    }
    if let Some(st) = ann.get(istio::STATUS)
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(st)
    {
        let list = |k: &str| -> Option<Vec<String>> {
            v.get(k)?.as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
        };
        let (init, cont) = (list("initContainers"), list("containers"));
        assert!(
            !init.iter().flatten().any(|c| c == "istio-init"),
            "captured a pod in istio-init mode"
        );
        if init.is_some() || cont.is_some() {
            assert!(
                init.iter()
                    .chain(cont.iter())
                    .flatten()
                    .any(|c| c == "istio-proxy"),
                "captured a pod without istio-proxy: {st}"
            );
        }
    }
}

/// Errors from `decide`: 100 naming the annotation and quoting its value (as given or trimmed,
/// cut at 200 bytes), or 7 for a Kubernetes
/// pod whose annotations the runtime did not pass.
fn check_error(pod: &Pod<'_>, e: &CniError) {
    match e.code {
        code::BAD_ANNOTATION => {
            let ann = pod
                .annotations
                .unwrap_or_else(|| panic!("code 100 without annotations: {}", e.msg));
            // The value is quoted as given or trimmed (interceptionMode quotes it trimmed).
            // A profile's required annotation may be missing: then its name and "missing".
            let named = ann.iter().any(|(name, value)| {
                e.msg.contains(name.as_str())
                    && [value.as_str(), value.trim()]
                        .iter()
                        .any(|v| e.msg.contains(&format!("{:?}", truncate(v, 200))))
            }) || (e.msg.contains("missing")
                && names(Mesh::Kuma).iter().any(|n| e.msg.contains(n)));
            assert!(
                named,
                "code 100 message names no (annotation, value) of the pod: {}",
                e.msg
            );
        }
        code::INVALID_CONFIG => assert!(
            pod.annotations.is_none() && pod.name.is_some(),
            "code 7 from decide for a pod with annotations or no name: {}",
            e.msg
        ),
        other => panic!("decide returned code {other} (want 100 or 7): {}", e.msg),
    }
}

fn check_cidr_list<N: Ord + Copy + std::fmt::Debug>(
    what: &str,
    nets: &[N],
    trunc: impl Fn(N) -> N,
) {
    for n in nets {
        assert!(trunc(*n) == *n, "{what}: {n:?} has host bits set");
    }
    for w in nets.windows(2) {
        assert!(
            w[0] < w[1],
            "{what}: not sorted or duplicated: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

fn check_cidrs(what: &str, c: &Cidrs) {
    check_cidr_list(&format!("{what} v4"), &c.v4, |n: Ipv4Net| n.trunc());
    check_cidr_list(&format!("{what} v6"), &c.v6, |n: Ipv6Net| n.trunc());
}

fn check_ports(what: &str, ports: &Ports) {
    for &(a, b) in ports.ranges() {
        assert!(a != 0 && a <= b, "{what}: range {a}-{b}");
    }
    for w in ports.ranges().windows(2) {
        assert!(
            w[0].1 as u32 + 1 < w[1].0 as u32,
            "{what}: ranges not merged or out of order: {:?}",
            ports.ranges()
        );
    }
}

fn check_ifname(what: &str, name: &str) {
    assert!(
        (1..=15).contains(&name.len()),
        "{what}: interface name {name:?} is {} bytes",
        name.len()
    );
    assert!(
        !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0'),
        "{what}: interface name {name:?} has '/', ':', whitespace or NUL"
    );
    assert!(
        name != "." && name != "..",
        "{what}: interface name {name:?}"
    );
    // The nft text quotes names: a quote, backslash or control character would break it.
    assert!(
        !name
            .chars()
            .any(|c| c == '"' || c == '\\' || c.is_control()),
        "{what}: interface name {name:?} cannot be written in nft text"
    );
}

pub fn check_plan(cfg: &PluginConfig, ann: &Annotations, plan: &Plan) {
    let profile = cfg.mesh.profile();
    // Only Istio takes ids and ports from the config alone (Linkerd's and Kuma's pods may
    // set their own).
    if cfg.mesh == Mesh::Istio {
        assert_eq!(
            (
                plan.proxy_uid,
                plan.proxy_gid,
                plan.outbound_port,
                plan.inbound_port
            ),
            (
                Some(cfg.proxy_uid),
                cfg.proxy_gid,
                cfg.outbound_port,
                cfg.inbound_port
            ),
            "plan does not carry the config's proxy ids and ports"
        );
    }
    assert!(plan.outbound_port != 0 && plan.inbound_port != 0, "port 0");
    check_cidrs("exclude_ranges", &plan.exclude_ranges);
    check_cidrs("inbound_exclude_sources", &plan.inbound_exclude_sources);
    if let OutboundRanges::Only(c) = &plan.include_ranges {
        check_cidrs("include_ranges", c);
    }
    match &plan.inbound {
        Inbound::AllExcept(p) => {
            check_ports("inbound AllExcept", p);
            for &a in profile.defaults.always_excluded_inbound {
                assert!(p.contains(a), "inbound AllExcept lacks always-excluded {a}");
            }
        }
        Inbound::Only(p) => {
            assert!(!p.is_empty(), "Inbound::Only is empty");
            check_ports("inbound Only", p);
        }
        Inbound::Off => {}
    }
    check_ports("include_outbound_ports", &plan.include_outbound_ports);
    check_ports("exclude_outbound_ports", &plan.exclude_outbound_ports);
    for n in &plan.exclude_interfaces {
        // A wildcard's prefix may be empty (`+` alone: every interface).
        let base = n.strip_suffix('+').unwrap_or(n);
        if !base.is_empty() || !n.ends_with('+') {
            check_ifname("exclude_interfaces", base);
        }
    }
    if let Some(d) = plan.dns {
        assert!(d.port != 0, "dns port 0");
        assert!(profile.defaults.dns, "DNS captured for a mesh without DNS");
        if plan.shape.dns == DnsShape::TcpAndUdp {
            assert!(
                !plan.exclude_outbound_ports.contains(53),
                "DNS captured although excludeOutboundPorts holds 53"
            );
        }
    }
    assert_eq!(plan.shape, profile.shape, "the profile's shape");
    // Kuma's pods set their family; an Istio pod's proxy metadata may (ISTIO_DUAL_STACK).
    if cfg.mesh != Mesh::Kuma && !ann.contains_key(istio::PROXY_CONFIG) {
        assert_eq!(
            plan.ipv6,
            cfg.ipv6 || plan.mode == Mode::Tproxy,
            "ipv6 switch"
        );
    }
    for n in &plan.reroute_interfaces {
        let base = n.strip_suffix('+').unwrap_or(n);
        if !base.is_empty() || !n.ends_with('+') {
            check_ifname("reroute_interfaces", base);
        }
    }
    for e in &plan.uid_exclusions {
        assert!(e.tcp || e.udp, "uid exclusion without a protocol");
        assert!(e.uids.0 <= e.uids.1, "uid range {:?}", e.uids);
        check_ports("uid exclusion", &e.ports);
    }
}

fn referenced_sets(rs: &Ruleset) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    for c in &rs.chains {
        for r in &c.rules {
            for m in &r.matches {
                match m {
                    Match::IifnameIn(s) | Match::OifnameIn(s) => out.push((*s, "ifname")),
                    Match::DaddrIn(Family::V4, s) | Match::SaddrIn(Family::V4, s) => {
                        out.push((*s, "v4"))
                    }
                    Match::DaddrIn(Family::V6, s) | Match::SaddrIn(Family::V6, s) => {
                        out.push((*s, "v6"))
                    }
                    Match::DportIn(s) => out.push((*s, "port")),
                    _ => {}
                }
            }
        }
    }
    out
}

fn kind(e: &Elems) -> &'static str {
    match e {
        Elems::V4(_) => "v4",
        Elems::V6(_) => "v6",
        Elems::Ports(_) | Elems::PortRanges(_) => "port",
        Elems::Ifnames(_) => "ifname",
    }
}

/// Sorted, non-overlapping (aggregated: no CIDR inside or overlapping another) address sets.
fn check_aggregated<N: Copy + std::fmt::Debug>(
    what: &str,
    nets: &[N],
    range: impl Fn(N) -> (u128, u128),
    is_trunc: impl Fn(N) -> bool,
) {
    for n in nets {
        assert!(is_trunc(*n), "set {what}: {n:?} has host bits set");
    }
    for w in nets.windows(2) {
        let (a, b) = (range(w[0]), range(w[1]));
        assert!(
            a.1 < b.0,
            "set {what}: {:?} and {:?} overlap or are out of order",
            w[0],
            w[1]
        );
    }
}

/// Every CIDR of the plan's list lies inside some element of the set built from it.
fn check_covered<N: Copy + std::fmt::Debug>(
    what: &str,
    plan: &[N],
    set: &[N],
    range: impl Fn(N) -> (u128, u128),
) {
    let set_ranges: Vec<(u128, u128)> = set.iter().map(|&n| range(n)).collect();
    for &n in plan {
        let (s, e) = range(n);
        let i = set_ranges.partition_point(|r| r.0 <= s);
        let inside = i > 0 && set_ranges[i - 1].1 >= e;
        assert!(
            inside,
            "set {what}: plan CIDR {n:?} is not covered by the set"
        );
    }
}

fn v4_range(n: Ipv4Net) -> (u128, u128) {
    (
        u32::from(n.network()) as u128,
        u32::from(n.broadcast()) as u128,
    )
}

fn v6_range(n: Ipv6Net) -> (u128, u128) {
    (u128::from(n.network()), u128::from(n.broadcast()))
}

pub fn check_ruleset(plan: &Plan, rs: &Ruleset) {
    assert!(
        rs.routing.is_some() == (plan.mode == Mode::Tproxy),
        "policy routing {:?} for mode {:?}",
        rs.routing,
        plan.mode
    );
    assert!(
        rs.rule_count() < max_rules(plan),
        "{} rules (limit {})",
        rs.rule_count(),
        max_rules(plan)
    );
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &rs.sets {
        *names.entry(s.name).or_default() += 1;
        assert!(!s.elems.is_empty(), "set {} is empty", s.name);
    }
    for (name, n) in &names {
        assert!(*n == 1, "set {name} defined {n} times");
    }
    let refs = referenced_sets(rs);
    for (name, want) in &refs {
        let set = rs
            .set(name)
            .unwrap_or_else(|| panic!("rule references set {name}, which does not exist"));
        assert!(
            kind(&set.elems) == *want,
            "set {name} holds {} elements but is matched as {want}",
            kind(&set.elems)
        );
    }
    for s in &rs.sets {
        assert!(
            refs.iter().any(|(n, _)| *n == s.name),
            "set {} is referenced by no rule",
            s.name
        );
        match &s.elems {
            Elems::V4(v) => check_aggregated(s.name, v, v4_range, |n| n.trunc() == n),
            Elems::V6(v) => check_aggregated(s.name, v, v6_range, |n| n.trunc() == n),
            Elems::Ports(p) => {
                for w in p.windows(2) {
                    assert!(w[0] < w[1], "set {}: ports not sorted/unique", s.name);
                }
                assert!(!p.contains(&0), "set {}: port 0", s.name);
            }
            Elems::PortRanges(r) => check_ports(s.name, &Ports::from_ranges(r.iter().copied())),
            Elems::Ifnames(v) => {
                for n in v {
                    check_ifname(s.name, n);
                }
                for w in v.windows(2) {
                    assert!(w[0] < w[1], "set {}: names not sorted/unique", s.name);
                }
            }
        }
    }
    // The address sets cover what the plan lists (where outbound rules exist at all: none
    // when Kuma's outbound capture and DNS are both off).
    let outbound_rules = plan.outbound || (plan.shape.exclude_dst_first && plan.dns.is_some());
    let pairs = [
        (
            ruleset::SET_OUT_EXCLUDE_V4,
            ruleset::SET_OUT_EXCLUDE_V6,
            outbound_rules.then_some(&plan.exclude_ranges),
        ),
        (
            ruleset::SET_OUT_INCLUDE_V4,
            ruleset::SET_OUT_INCLUDE_V6,
            match &plan.include_ranges {
                OutboundRanges::Only(c) if plan.outbound => Some(c),
                _ => None,
            },
        ),
        (
            ruleset::SET_IN_EXCLUDE_SRC_V4,
            ruleset::SET_IN_EXCLUDE_SRC_V6,
            (plan.inbound != Inbound::Off).then_some(&plan.inbound_exclude_sources),
        ),
    ];
    for (n4, n6, cidrs) in pairs {
        let Some(c) = cidrs else { continue };
        match rs.set(n4).map(|s| &s.elems) {
            Some(Elems::V4(set)) => check_covered(n4, &c.v4, set, v4_range),
            None => assert!(c.v4.is_empty(), "plan has v4 CIDRs but no set {n4}"),
            Some(_) => panic!("set {n4} is not a v4 set"),
        }
        match rs.set(n6).map(|s| &s.elems) {
            Some(Elems::V6(set)) => check_covered(n6, &c.v6, set, v6_range),
            None => assert!(c.v6.is_empty(), "plan has v6 CIDRs but no set {n6}"),
            Some(_) => panic!("set {n6} is not a v6 set"),
        }
    }
    // Chains: unique names, jump targets exist.
    let mut chains: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &rs.chains {
        *chains.entry(c.name).or_default() += 1;
    }
    for (name, n) in &chains {
        assert!(*n == 1, "chain {name} defined {n} times");
    }
    for c in &rs.chains {
        for r in &c.rules {
            if let ruleset::Action::Jump(t) = r.action {
                assert!(
                    chains.contains_key(t),
                    "chain {} jumps to missing {t}",
                    c.name
                );
            }
        }
    }
}

pub fn check_text(rs: &Ruleset) {
    let text = nft_text::render(rs);
    assert!(
        text.contains("table inet mesh_redirect"),
        "render lacks the table"
    );
    for s in &rs.sets {
        assert!(
            text.contains(&format!("set {} {{", s.name)),
            "render lacks set {}",
            s.name
        );
    }
    for c in &rs.chains {
        assert!(
            text.contains(&format!("chain {} {{", c.name)),
            "render lacks chain {}",
            c.name
        );
    }
}

fn key_value(what: &str, e: &Elem, len: usize) -> u128 {
    assert!(
        e.key.len() == len,
        "set {what}: key of {} bytes, want {len}",
        e.key.len()
    );
    e.key
        .iter()
        .fold(0u128, |acc, b| (acc << 8) | u128::from(*b))
}

/// Interval-set encoding: `[end-marker at 0]? (start end)* [start]?` with strictly increasing
/// keys; the leading marker exactly when the first range does not start at 0; a final start
/// without end exactly when the last range reaches the top of the key space; and the decoded
/// ranges equal the set's CIDRs with adjacent ones merged.
fn check_intervals(what: &str, elems: &[Elem], nets: &[(u128, u128)], len: usize, max: u128) {
    assert!(!elems.is_empty(), "set {what}: no elements encoded");
    let keys: Vec<u128> = elems.iter().map(|e| key_value(what, e, len)).collect();
    for w in keys.windows(2) {
        assert!(
            w[0] < w[1],
            "set {what}: keys not strictly increasing: {keys:x?}"
        );
    }
    let mut i = 0;
    if elems[0].interval_end {
        assert!(
            keys[0] == 0,
            "set {what}: leading end marker at {:#x}, not 0",
            keys[0]
        );
        i = 1;
        assert!(i < elems.len(), "set {what}: only an end marker");
    } else {
        assert!(
            keys[0] == 0,
            "set {what}: first range starts at {:#x} without a leading end marker",
            keys[0]
        );
    }
    let mut decoded = Vec::new();
    while i < elems.len() {
        assert!(
            !elems[i].interval_end,
            "set {what}: element {i} is an interval end where a start belongs"
        );
        let start = keys[i];
        if i + 1 < elems.len() {
            assert!(
                elems[i + 1].interval_end,
                "set {what}: element {} is a start where an interval end belongs",
                i + 1
            );
            decoded.push((start, keys[i + 1] - 1));
            i += 2;
        } else {
            decoded.push((start, max));
            i += 1;
        }
    }
    let mut sorted = nets.to_vec();
    sorted.sort();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (s, e) in sorted {
        match merged.last_mut() {
            Some(last) if last.1 == max || s <= last.1 + 1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    assert!(
        decoded == merged,
        "set {what}: encoded ranges {decoded:x?} differ from the CIDRs' {merged:x?}"
    );
}

pub fn check_encoding(rs: &Ruleset) {
    for s in &rs.sets {
        let (key, interval, elems) = encode_elems(&s.elems);
        match &s.elems {
            Elems::V4(v) => {
                assert!(
                    matches!(key, KeyType::Ipv4Addr) && interval,
                    "set {}: key type",
                    s.name
                );
                let r: Vec<_> = v.iter().map(|&n| v4_range(n)).collect();
                check_intervals(s.name, &elems, &r, 4, u32::MAX as u128);
            }
            Elems::V6(v) => {
                assert!(
                    matches!(key, KeyType::Ipv6Addr) && interval,
                    "set {}: key type",
                    s.name
                );
                let r: Vec<_> = v.iter().map(|&n| v6_range(n)).collect();
                check_intervals(s.name, &elems, &r, 16, u128::MAX);
            }
            Elems::Ports(p) => {
                assert!(
                    matches!(key, KeyType::InetService) && !interval,
                    "set {}: key type",
                    s.name
                );
                let want: Vec<Elem> = p
                    .iter()
                    .map(|p| Elem {
                        key: p.to_be_bytes().to_vec(),
                        interval_end: false,
                    })
                    .collect();
                assert!(elems == want, "set {}: port elements {elems:?}", s.name);
            }
            Elems::PortRanges(r) => {
                assert!(
                    matches!(key, KeyType::InetService) && interval,
                    "set {}: key type",
                    s.name
                );
                let r: Vec<_> = r.iter().map(|&(a, b)| (a as u128, b as u128)).collect();
                check_intervals(s.name, &elems, &r, 2, u16::MAX as u128);
            }
            Elems::Ifnames(v) => {
                assert!(
                    matches!(key, KeyType::Ifname) && !interval,
                    "set {}: key type",
                    s.name
                );
                assert!(
                    elems.len() == v.len(),
                    "set {}: {} elements for {} names",
                    s.name,
                    elems.len(),
                    v.len()
                );
                for (e, n) in elems.iter().zip(v) {
                    assert!(
                        !e.interval_end && e.key.len() == 16,
                        "set {}: ifname key {e:?}",
                        s.name
                    );
                    assert!(
                        e.key.starts_with(n.as_bytes()) && e.key[n.len()..].iter().all(|&b| b == 0),
                        "set {}: key {:?} is not {n:?} NUL-padded",
                        s.name,
                        e.key
                    );
                }
            }
        }
    }
}

/// Annotations from (name, value) pairs; later pairs win, as in a JSON object.
pub fn annotations<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Annotations {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs `f` with file descriptor 2 pointed at /dev/null: `plugin::run` logs one line per
/// invocation to stderr, which would flood libFuzzer's output. A panic hook (installed once,
/// in front of libfuzzer-sys's) puts stderr back first, so panic messages still show.
pub fn with_stderr_silenced<T>(f: impl FnOnce() -> T) -> T {
    static FDS: OnceLock<(libc::c_int, libc::c_int)> = OnceLock::new();
    let &(saved, null) = FDS.get_or_init(|| {
        // SAFETY: plain fd syscalls on descriptors we own.
        let saved = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 10) };
        // SAFETY: a NUL-terminated path literal; the new descriptor is ours.
        let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        assert!(saved >= 0 && null >= 0, "cannot set up stderr redirection");
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // SAFETY: restores fd 2 from our saved copy.
            unsafe { libc::dup2(saved, 2) };
            prev(info);
        }));
        (saved, null)
    });
    // SAFETY: as above; single-threaded harness.
    unsafe { libc::dup2(null, 2) };
    let out = f();
    // SAFETY: puts fd 2 back from our saved copy.
    unsafe { libc::dup2(saved, 2) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(a: &Annotations) -> Pod<'_> {
        Pod {
            namespace: Some("default"),
            name: Some("web-0"),
            annotations: Some(a),
            ipv6: true,
        }
    }

    #[test]
    fn realistic_plans_pass_every_check() {
        let cfg = PluginConfig {
            capture_dns: true,
            ..PluginConfig::default()
        };
        for pairs in [
            vec![],
            vec![(
                istio::EXCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/8,10.1.0.0/16, 11.0.0.0/8,fd00::/8,::/0",
            )],
            vec![(
                istio::INCLUDE_OUTBOUND_IP_RANGES,
                "0.0.0.0/0, 255.255.255.255, ffff::/16",
            )],
            vec![(istio::INCLUDE_OUTBOUND_IP_RANGES, "128.0.0.0/1,0.0.0.0/1")],
            vec![
                (istio::EXCLUDE_INTERFACES, "eth1, net1"),
                (istio::INTERCEPTION_MODE, "TPROXY"),
            ],
            vec![
                (istio::INCLUDE_INBOUND_PORTS, "80,443"),
                (istio::INCLUDE_OUTBOUND_PORTS, "3306"),
            ],
        ] {
            let mut a = annotations(pairs);
            a.insert(istio::STATUS.into(), "{}".into());
            let d = decide_and_check(&cfg, &pod(&a)).unwrap();
            assert!(matches!(d, Decision::Capture(_)));
        }
    }

    #[test]
    fn errors_pass_the_error_checks() {
        let a = annotations([(istio::STATUS, "{}"), (istio::EXCLUDE_INBOUND_PORTS, "x")]);
        assert_eq!(
            decide_and_check(&PluginConfig::default(), &pod(&a))
                .unwrap_err()
                .code,
            100
        );
    }

    #[test]
    #[should_panic(expected = "differ from the CIDRs")]
    fn interval_check_catches_a_wrong_encoding() {
        let elems = vec![
            Elem {
                key: vec![0, 0, 0, 0],
                interval_end: true,
            },
            Elem {
                key: vec![10, 0, 0, 0],
                interval_end: false,
            },
            Elem {
                key: vec![11, 0, 0, 0],
                interval_end: true,
            },
        ];
        check_intervals(
            "t",
            &elems,
            &[(10 << 24, (12 << 24) - 1)],
            4,
            u32::MAX as u128,
        );
    }

    #[test]
    #[should_panic(expected = "leading end marker")]
    fn interval_check_catches_a_bad_marker() {
        let elems = vec![
            Elem {
                key: vec![1, 0, 0, 0],
                interval_end: true,
            },
            Elem {
                key: vec![10, 0, 0, 0],
                interval_end: false,
            },
        ];
        check_intervals(
            "t",
            &elems,
            &[(10 << 24, u32::MAX as u128)],
            4,
            u32::MAX as u128,
        );
    }
}
