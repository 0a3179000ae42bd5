//! Policy: plugin config + pod annotations → "skip, because …" or a validated capture plan.
//!
//! Pure: no kernel, no I/O. Settings come, later winning, from the mesh profile's defaults, the
//! plugin config and the pod's annotations (SPEC §3). Every malformed annotation is an error that
//! names it; nothing ever falls back to "capture nothing" or "capture everything".

use crate::config::{Annotations, PluginConfig};
use crate::protocol::{CniError, code, truncate, valid_ifname};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Istio's annotation names (the `istio` mesh profile).
pub mod istio {
    pub const STATUS: &str = "sidecar.istio.io/status";
    pub const INJECT: &str = "sidecar.istio.io/inject";
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
    /// Not an Istio name: Istio switches DNS capture through proxy metadata, which a CNI plugin
    /// cannot read without the API server. This per-pod switch overrides `captureDNS`.
    pub const CAPTURE_DNS: &str = "traffic.mesh-redirect.io/captureDNS";

    /// Inbound ports never captured when includeInboundPorts is `*`: the proxy's own
    /// status (15020), health (15021) and Prometheus (15090) ports.
    pub const ALWAYS_EXCLUDED_INBOUND: [u16; 3] = [15020, 15021, 15090];
    /// The default excludeOutboundPorts (replaced, not extended, by the annotation).
    pub const DEFAULT_EXCLUDED_OUTBOUND: [u16; 1] = [15020];
    /// HBONE tunnel port: never redirected inbound, nor by the proxy's loopback rule.
    pub const TUNNEL_PORT: u16 = 15008;
}

/// How inbound connections reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `nat` REDIRECT: the proxy reads the original destination with `SO_ORIGINAL_DST`.
    Redirect,
    /// `tproxy`: the proxy sees the original source and destination on its socket.
    Tproxy,
}

/// Which inbound TCP ports are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Every port but these.
    AllExcept(BTreeSet<u16>),
    /// Only these ports (never empty).
    Only(BTreeSet<u16>),
    /// No inbound capture.
    Off,
}

/// Canonical CIDRs (host bits cleared), sorted and deduplicated, per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl Cidrs {
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn everything() -> Cidrs {
        Cidrs {
            v4: vec![Ipv4Net::default()],
            v6: vec![Ipv6Net::default()],
        }
    }
}

/// Which outbound destinations are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundRanges {
    All,
    /// Only these (empty: no outbound capture by destination).
    Only(Cidrs),
}

/// A validated capture plan: everything the ruleset needs, nothing it must re-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mode: Mode,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub inbound: Inbound,
    pub include_ranges: OutboundRanges,
    pub exclude_ranges: Cidrs,
    pub include_outbound_ports: BTreeSet<u16>,
    pub exclude_outbound_ports: BTreeSet<u16>,
    pub exclude_interfaces: BTreeSet<String>,
    /// Redirect the app's DNS (UDP and TCP 53) to this port.
    pub dns_port: Option<u16>,
}

/// The outcome for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Leave the pod alone; the reason is logged.
    Skip(String),
    Capture(Plan),
}

/// The pod as the runtime describes it (from `CNI_ARGS` and `runtimeConfig`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Pod<'a> {
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// `None`: the runtime passed no annotations at all.
    pub annotations: Option<&'a Annotations>,
}

/// Decides what to do for `pod`.
pub fn decide(cfg: &PluginConfig, pod: &Pod<'_>) -> Result<Decision, CniError> {
    if let Some(ns) = pod.namespace
        && cfg.exclude_namespaces.iter().any(|e| e == ns)
    {
        return Ok(Decision::Skip(format!("namespace {ns:?} is excluded")));
    }
    let Some(ann) = pod.annotations else {
        if pod.name.is_some() {
            // A Kubernetes pod whose annotations we cannot see: fail closed rather than let a
            // meshed pod run uncaptured.
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "the runtime passed no pod annotations, so mesh-redirect cannot tell whether \
                     the pod has a sidecar; add \"capabilities\": {{\"{}\": true}} to the \
                     mesh-redirect entry of the conflist (needs containerd >= 1.5 or CRI-O)",
                    crate::config::ANNOTATIONS_CAPABILITY
                ),
            ));
        }
        return Ok(Decision::Skip(
            "no pod annotations and not a Kubernetes pod (no K8S_POD_NAME)".into(),
        ));
    };
    let get = |name: &str| lookup(ann, name);

    if get(istio::STATUS).is_none() {
        return Ok(Decision::Skip(format!(
            "no {} annotation: no sidecar was injected",
            istio::STATUS
        )));
    }
    if let Some(v) = get(istio::INJECT)
        && is_false(v)
    {
        return Ok(Decision::Skip(format!("{}={v:?}", istio::INJECT)));
    }
    let mode = match get(istio::INTERCEPTION_MODE).map(str::trim) {
        None => Mode::Redirect,
        Some(v) if v.eq_ignore_ascii_case("REDIRECT") => Mode::Redirect,
        Some(v) if v.eq_ignore_ascii_case("TPROXY") => Mode::Tproxy,
        Some(v) if v.eq_ignore_ascii_case("NONE") => {
            return Ok(Decision::Skip(format!("{}=NONE", istio::INTERCEPTION_MODE)));
        }
        Some(v) => {
            return Err(bad(
                istio::INTERCEPTION_MODE,
                v,
                "must be REDIRECT, TPROXY or NONE",
            ));
        }
    };

    // Validated even when an include list makes them moot: a typo must not pass silently.
    let excluded_inbound = all_excepted_inbound(ann)?;
    let inbound = match get(istio::INCLUDE_INBOUND_PORTS) {
        None => Inbound::AllExcept(excluded_inbound),
        Some(v) if is_star(v) => Inbound::AllExcept(excluded_inbound),
        Some(v) => {
            let ports = ports(istio::INCLUDE_INBOUND_PORTS, v)?;
            if ports.is_empty() {
                Inbound::Off
            } else {
                Inbound::Only(ports)
            }
        }
    };
    let include_ranges = match get(istio::INCLUDE_OUTBOUND_IP_RANGES) {
        None => OutboundRanges::All,
        Some(v) => match cidrs(istio::INCLUDE_OUTBOUND_IP_RANGES, v)? {
            CidrList::Star => OutboundRanges::All,
            CidrList::Cidrs(c) => OutboundRanges::Only(c),
        },
    };
    let exclude_ranges = match get(istio::EXCLUDE_OUTBOUND_IP_RANGES) {
        None => Cidrs::default(),
        Some(v) => match cidrs(istio::EXCLUDE_OUTBOUND_IP_RANGES, v)? {
            CidrList::Star => Cidrs::everything(),
            CidrList::Cidrs(c) => c,
        },
    };
    let include_outbound_ports = optional_ports(ann, istio::INCLUDE_OUTBOUND_PORTS)?;
    let exclude_outbound_ports = match get(istio::EXCLUDE_OUTBOUND_PORTS) {
        None => istio::DEFAULT_EXCLUDED_OUTBOUND.into_iter().collect(),
        Some(v) => ports(istio::EXCLUDE_OUTBOUND_PORTS, v)?,
    };
    let exclude_interfaces = match get(istio::EXCLUDE_INTERFACES) {
        None => BTreeSet::new(),
        Some(v) => items(v)
            .map(|name| {
                valid_ifname(name)
                    .map(|()| name.to_string())
                    .map_err(|why| bad(istio::EXCLUDE_INTERFACES, v, &format!("{name:?} {why}")))
            })
            .collect::<Result<_, _>>()?,
    };
    let capture_dns = match get(istio::CAPTURE_DNS) {
        None => cfg.capture_dns,
        Some(v) if is_false(v) => false,
        Some(v) if is_true(v) => true,
        Some(v) => return Err(bad(istio::CAPTURE_DNS, v, "must be true or false")),
    };

    // DNS excluded by port is not captured at all: its conntrack zones would otherwise split
    // the query from its answer.
    let dns_port = (capture_dns && !exclude_outbound_ports.contains(&53)).then_some(cfg.dns_port);
    Ok(Decision::Capture(Plan {
        mode,
        proxy_uid: cfg.proxy_uid,
        proxy_gid: cfg.proxy_gid,
        outbound_port: cfg.outbound_port,
        inbound_port: cfg.inbound_port,
        inbound,
        include_ranges,
        exclude_ranges,
        include_outbound_ports,
        exclude_outbound_ports,
        exclude_interfaces,
        dns_port,
    }))
}

/// The error for a malformed annotation: code 100, naming the annotation and the value.
fn bad(name: &str, value: &str, why: &str) -> CniError {
    CniError::new(
        code::BAD_ANNOTATION,
        format!(
            "invalid pod annotation {name}={:?}: {why}",
            truncate(value, 200)
        ),
    )
}

/// Go's `strconv.ParseBool` false values, which is what Istio accepts (`"no"` is not false).
fn is_false(v: &str) -> bool {
    ["false", "f", "0"]
        .iter()
        .any(|f| v.trim().eq_ignore_ascii_case(f))
}

fn is_true(v: &str) -> bool {
    ["true", "t", "1"]
        .iter()
        .any(|f| v.trim().eq_ignore_ascii_case(f))
}

fn is_star(v: &str) -> bool {
    v.trim() == "*"
}

/// Comma-separated items with surrounding spaces trimmed and empty items dropped (Istio's
/// splitting: `"80, 443,"` is two ports).
fn items(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn ports(name: &str, v: &str) -> Result<BTreeSet<u16>, CniError> {
    items(v)
        .map(|item| match item.parse::<u32>() {
            Ok(p @ 1..=65535) => Ok(p as u16),
            _ if item == "*" => Err(bad(name, v, "'*' is not allowed in this list")),
            _ => Err(bad(
                name,
                v,
                &format!("{:?} is not a port number 1-65535", truncate(item, 40)),
            )),
        })
        .collect()
}

fn lookup<'a>(ann: &'a Annotations, name: &str) -> Option<&'a str> {
    ann.get(name).map(String::as_str)
}

fn optional_ports(ann: &Annotations, name: &str) -> Result<BTreeSet<u16>, CniError> {
    lookup(ann, name).map_or(Ok(BTreeSet::new()), |v| ports(name, v))
}

fn all_excepted_inbound(ann: &Annotations) -> Result<BTreeSet<u16>, CniError> {
    let mut ex = optional_ports(ann, istio::EXCLUDE_INBOUND_PORTS)?;
    ex.extend(istio::ALWAYS_EXCLUDED_INBOUND);
    Ok(ex)
}

enum CidrList {
    Star,
    Cidrs(Cidrs),
}

/// Parses a CIDR list. `*` anywhere means every address (as Istio treats it); a bare address is a
/// /32 or /128; host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`, as iptables would apply it).
fn cidrs(name: &str, v: &str) -> Result<CidrList, CniError> {
    let mut out = Cidrs::default();
    let mut star = false;
    for item in items(v) {
        // Every item is still checked: `*` must not hide a malformed one.
        if item == "*" {
            star = true;
            continue;
        }
        let net = item
            .parse::<IpNet>()
            .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                bad(
                    name,
                    v,
                    &format!(
                        "{:?} is not an IPv4 or IPv6 address or CIDR",
                        truncate(item, 60)
                    ),
                )
            })?;
        match net.trunc() {
            IpNet::V4(n) => out.v4.push(n),
            IpNet::V6(n) => out.v6.push(n),
        }
    }
    out.v4.sort();
    out.v4.dedup();
    out.v6.sort();
    out.v6.dedup();
    Ok(if star {
        CidrList::Star
    } else {
        CidrList::Cidrs(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> Annotations {
        let mut a: Annotations = [(istio::STATUS.to_string(), "{}".to_string())].into();
        for (k, v) in pairs {
            a.insert(k.to_string(), v.to_string());
        }
        a
    }

    fn decide_with(a: &Annotations) -> Result<Decision, CniError> {
        decide(
            &PluginConfig::default(),
            &Pod {
                namespace: Some("default"),
                name: Some("web-0"),
                annotations: Some(a),
            },
        )
    }

    fn plan(pairs: &[(&str, &str)]) -> Plan {
        match decide_with(&ann(pairs)).unwrap() {
            Decision::Capture(p) => p,
            Decision::Skip(why) => panic!("skipped: {why}"),
        }
    }

    fn err(pairs: &[(&str, &str)]) -> CniError {
        decide_with(&ann(pairs)).unwrap_err()
    }

    fn set(p: &[u16]) -> BTreeSet<u16> {
        p.iter().copied().collect()
    }

    fn v4(s: &[&str]) -> Vec<Ipv4Net> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn v6(s: &[&str]) -> Vec<Ipv6Net> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn defaults_capture_everything_with_istio_exclusions() {
        let p = plan(&[]);
        assert_eq!(p.mode, Mode::Redirect);
        assert_eq!((p.proxy_uid, p.proxy_gid), (1337, 1337));
        assert_eq!((p.outbound_port, p.inbound_port), (15001, 15006));
        assert_eq!(p.inbound, Inbound::AllExcept(set(&[15020, 15021, 15090])));
        assert_eq!(p.include_ranges, OutboundRanges::All);
        assert!(p.exclude_ranges.is_empty());
        assert!(p.include_outbound_ports.is_empty());
        assert_eq!(p.exclude_outbound_ports, set(&[15020]));
        assert!(p.exclude_interfaces.is_empty());
        assert_eq!(p.dns_port, None);
    }

    #[test]
    fn skip_without_status_or_when_inject_false_or_mode_none() {
        let none = Annotations::new();
        assert!(
            matches!(decide_with(&none).unwrap(), Decision::Skip(w) if w.contains(istio::STATUS))
        );
        for f in ["false", "False", "FALSE", "f", "0", " false "] {
            let d = decide_with(&ann(&[(istio::INJECT, f)])).unwrap();
            assert!(matches!(d, Decision::Skip(_)), "{f}");
        }
        // Any other value is "not a false value": captured.
        for t in ["true", "yes", "no", "off", "whatever"] {
            assert!(matches!(
                decide_with(&ann(&[(istio::INJECT, t)])).unwrap(),
                Decision::Capture(_)
            ));
        }
        for m in ["NONE", "none"] {
            let d = decide_with(&ann(&[(istio::INTERCEPTION_MODE, m)])).unwrap();
            assert!(matches!(d, Decision::Skip(_)), "{m}");
        }
    }

    #[test]
    fn excluded_namespace_is_skipped_even_without_annotations() {
        let cfg = PluginConfig::default();
        let pod = Pod {
            namespace: Some("kube-system"),
            name: Some("coredns"),
            annotations: None,
        };
        assert!(
            matches!(decide(&cfg, &pod).unwrap(), Decision::Skip(w) if w.contains("kube-system"))
        );
        let cfg = PluginConfig {
            exclude_namespaces: vec!["infra".into()],
            ..PluginConfig::default()
        };
        let a = ann(&[]);
        let pod = Pod {
            namespace: Some("infra"),
            name: Some("x"),
            annotations: Some(&a),
        };
        assert!(matches!(decide(&cfg, &pod).unwrap(), Decision::Skip(_)));
        // kube-system is no longer excluded once the list is replaced.
        let pod = Pod {
            namespace: Some("kube-system"),
            ..pod
        };
        assert!(matches!(decide(&cfg, &pod).unwrap(), Decision::Capture(_)));
    }

    #[test]
    fn kubernetes_pod_without_annotations_fails_closed() {
        let pod = Pod {
            namespace: Some("default"),
            name: Some("web-0"),
            annotations: None,
        };
        let e = decide(&PluginConfig::default(), &pod).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(
            e.msg.contains("capabilities") && e.msg.contains("io.kubernetes.cri.pod-annotations")
        );
        // Not a Kubernetes pod (e.g. cnitool without CAP_ARGS): nothing to capture.
        let pod = Pod::default();
        assert!(matches!(
            decide(&PluginConfig::default(), &pod).unwrap(),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn interception_mode_values() {
        assert_eq!(
            plan(&[(istio::INTERCEPTION_MODE, "REDIRECT")]).mode,
            Mode::Redirect
        );
        assert_eq!(
            plan(&[(istio::INTERCEPTION_MODE, "TPROXY")]).mode,
            Mode::Tproxy
        );
        let e = err(&[(istio::INTERCEPTION_MODE, "MAGIC")]);
        assert_eq!(e.code, code::BAD_ANNOTATION);
        assert!(e.msg.contains(istio::INTERCEPTION_MODE) && e.msg.contains("MAGIC"));
    }

    #[test]
    fn include_inbound_ports_star_list_empty() {
        assert_eq!(
            plan(&[(istio::INCLUDE_INBOUND_PORTS, "*")]).inbound,
            Inbound::AllExcept(set(&[15020, 15021, 15090]))
        );
        assert_eq!(
            plan(&[(istio::INCLUDE_INBOUND_PORTS, " 80, 8080 ,80,")]).inbound,
            Inbound::Only(set(&[80, 8080]))
        );
        assert_eq!(
            plan(&[(istio::INCLUDE_INBOUND_PORTS, "")]).inbound,
            Inbound::Off
        );
        assert_eq!(
            plan(&[(istio::INCLUDE_INBOUND_PORTS, " , ")]).inbound,
            Inbound::Off
        );
    }

    #[test]
    fn exclude_inbound_ports_add_to_the_always_excluded() {
        assert_eq!(
            plan(&[(istio::EXCLUDE_INBOUND_PORTS, "22, 9000")]).inbound,
            Inbound::AllExcept(set(&[22, 9000, 15020, 15021, 15090]))
        );
        // With an explicit include list, exclusions do not apply (Istio's precedence).
        assert_eq!(
            plan(&[
                (istio::INCLUDE_INBOUND_PORTS, "80"),
                (istio::EXCLUDE_INBOUND_PORTS, "80")
            ])
            .inbound,
            Inbound::Only(set(&[80]))
        );
        // ...but they are still validated.
        let e = err(&[
            (istio::INCLUDE_INBOUND_PORTS, "80"),
            (istio::EXCLUDE_INBOUND_PORTS, "x"),
        ]);
        assert_eq!(e.code, code::BAD_ANNOTATION);
    }

    #[test]
    fn outbound_ip_ranges() {
        assert_eq!(
            plan(&[(istio::INCLUDE_OUTBOUND_IP_RANGES, "*")]).include_ranges,
            OutboundRanges::All
        );
        assert_eq!(
            plan(&[(istio::INCLUDE_OUTBOUND_IP_RANGES, "")]).include_ranges,
            OutboundRanges::Only(Cidrs::default())
        );
        assert_eq!(
            plan(&[(istio::INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,*")]).include_ranges,
            OutboundRanges::All
        );
        let p = plan(&[(
            istio::INCLUDE_OUTBOUND_IP_RANGES,
            "10.96.0.0/12, 192.168.1.7, fd00::/8, 2001:db8::1",
        )]);
        assert_eq!(
            p.include_ranges,
            OutboundRanges::Only(Cidrs {
                v4: v4(&["10.96.0.0/12", "192.168.1.7/32"]),
                v6: v6(&["2001:db8::1/128", "fd00::/8"]),
            })
        );
        let p = plan(&[(
            istio::EXCLUDE_OUTBOUND_IP_RANGES,
            "10.1.2.3/8,10.0.0.0/8 ,169.254.169.254",
        )]);
        assert_eq!(
            p.exclude_ranges.v4,
            v4(&["10.0.0.0/8", "169.254.169.254/32"])
        );
        assert!(p.exclude_ranges.v6.is_empty());
        let p = plan(&[(istio::EXCLUDE_OUTBOUND_IP_RANGES, "*")]);
        assert_eq!(p.exclude_ranges, Cidrs::everything());
    }

    #[test]
    fn malformed_cidrs_name_the_annotation_and_value() {
        for bad_value in [
            "10.0.0.0/33",
            "10.0.0.300",
            "fd00::/129",
            "10.0.0.0/8;1.2.3.4",
            "example.com",
            "fe80::1%eth0",
            "10.0.0.0/-1",
        ] {
            for name in [
                istio::INCLUDE_OUTBOUND_IP_RANGES,
                istio::EXCLUDE_OUTBOUND_IP_RANGES,
            ] {
                let e = err(&[(name, bad_value)]);
                assert_eq!(e.code, code::BAD_ANNOTATION, "{name}={bad_value}");
                assert!(
                    e.msg.contains(name) && e.msg.contains(bad_value),
                    "{}",
                    e.msg
                );
            }
        }
    }

    #[test]
    fn malformed_ports_name_the_annotation_and_value() {
        for name in [
            istio::INCLUDE_INBOUND_PORTS,
            istio::EXCLUDE_INBOUND_PORTS,
            istio::INCLUDE_OUTBOUND_PORTS,
            istio::EXCLUDE_OUTBOUND_PORTS,
        ] {
            for bad_value in ["0", "65536", "-1", "80-90", "http", "8 0", "1e3"] {
                let e = err(&[(name, bad_value)]);
                assert_eq!(e.code, code::BAD_ANNOTATION, "{name}={bad_value}");
                assert!(
                    e.msg.contains(name) && e.msg.contains(bad_value),
                    "{}",
                    e.msg
                );
            }
        }
        for name in [
            istio::EXCLUDE_INBOUND_PORTS,
            istio::INCLUDE_OUTBOUND_PORTS,
            istio::EXCLUDE_OUTBOUND_PORTS,
        ] {
            assert_eq!(err(&[(name, "*")]).code, code::BAD_ANNOTATION, "{name}");
        }
    }

    #[test]
    fn outbound_ports() {
        let p = plan(&[(istio::INCLUDE_OUTBOUND_PORTS, "3306, 6379")]);
        assert_eq!(p.include_outbound_ports, set(&[3306, 6379]));
        // excludeOutboundPorts replaces the default 15020.
        let p = plan(&[(istio::EXCLUDE_OUTBOUND_PORTS, "25")]);
        assert_eq!(p.exclude_outbound_ports, set(&[25]));
        let p = plan(&[(istio::EXCLUDE_OUTBOUND_PORTS, "")]);
        assert!(p.exclude_outbound_ports.is_empty());
    }

    #[test]
    fn exclude_interfaces() {
        let p = plan(&[(istio::EXCLUDE_INTERFACES, "eth1, net1")]);
        assert_eq!(
            p.exclude_interfaces,
            ["eth1", "net1"].iter().map(|s| s.to_string()).collect()
        );
        for bad_value in ["a/b", "waytoolonginterfacename0", "a\"b", "a\\b"] {
            let e = err(&[(istio::EXCLUDE_INTERFACES, bad_value)]);
            assert_eq!(e.code, code::BAD_ANNOTATION);
            assert!(e.msg.contains(istio::EXCLUDE_INTERFACES));
        }
    }

    #[test]
    fn dns_capture_config_and_annotation() {
        assert_eq!(plan(&[(istio::CAPTURE_DNS, "true")]).dns_port, Some(15053));
        let cfg = PluginConfig {
            capture_dns: true,
            dns_port: 5353,
            ..PluginConfig::default()
        };
        let a = ann(&[]);
        let pod = Pod {
            annotations: Some(&a),
            ..Pod::default()
        };
        let Decision::Capture(p) = decide(&cfg, &pod).unwrap() else {
            panic!()
        };
        assert_eq!(p.dns_port, Some(5353));
        let a = ann(&[(istio::CAPTURE_DNS, "false")]);
        let pod = Pod {
            annotations: Some(&a),
            ..Pod::default()
        };
        let Decision::Capture(p) = decide(&cfg, &pod).unwrap() else {
            panic!()
        };
        assert_eq!(p.dns_port, None);
        assert_eq!(
            err(&[(istio::CAPTURE_DNS, "maybe")]).code,
            code::BAD_ANNOTATION
        );
    }

    #[test]
    fn config_values_flow_into_the_plan() {
        let cfg = PluginConfig {
            proxy_uid: 101,
            proxy_gid: 202,
            outbound_port: 7001,
            inbound_port: 7006,
            ..PluginConfig::default()
        };
        let a = ann(&[]);
        let pod = Pod {
            annotations: Some(&a),
            ..Pod::default()
        };
        let Decision::Capture(p) = decide(&cfg, &pod).unwrap() else {
            panic!()
        };
        assert_eq!(
            (p.proxy_uid, p.proxy_gid, p.outbound_port, p.inbound_port),
            (101, 202, 7001, 7006)
        );
    }

    #[test]
    fn huge_values_are_truncated_in_messages() {
        let v = "x".repeat(10_000);
        let e = err(&[(istio::EXCLUDE_OUTBOUND_IP_RANGES, &v)]);
        let star_hides_nothing = err(&[(istio::INCLUDE_OUTBOUND_IP_RANGES, "*,10.0.0.0/33")]);
        assert_eq!(star_hides_nothing.code, code::BAD_ANNOTATION);
        assert!(e.msg.len() < 600, "{}", e.msg.len());
    }
}
