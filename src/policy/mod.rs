//! Policy: plugin config + pod annotations → "skip, because …" or a validated capture plan.
//!
//! Pure: no kernel, no I/O. Settings come, later winning, from the mesh profile's defaults, the
//! plugin config and the pod's annotations (docs/DESIGN.md §3). The profile (`profiles`) says which
//! annotations mean what; this engine applies them. Every malformed annotation is an error
//! that names it; nothing ever falls back to "capture nothing" or "capture everything".

pub mod istio_inject;
pub mod kuma;
pub mod kuma_keys;
pub mod skip;

use crate::config::{Annotations, PluginConfig};
use crate::protocol::{CniError, code};
use crate::values::lists::{self, bad, go_bool};
pub use crate::values::lists::{Cidrs, Ports};
use crate::values::profiles;
pub use crate::values::profiles::{
    DnsShape, Field, Loopback, Marker, Mesh, Profile, Shape, istio, kuma as kuma_names, linkerd,
};
pub use skip::Skip;
use std::collections::BTreeSet;

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
    AllExcept(Ports),
    /// Only these ports (never empty).
    Only(Ports),
    /// No inbound capture.
    Off,
}

/// Which outbound destinations are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundRanges {
    All,
    /// Only these (empty: no outbound capture by destination).
    Only(Cidrs),
}

/// DNS capture: the app's queries go to the proxy's DNS port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dns {
    pub port: u16,
    /// Conntrack zones keep the two legs of a lookup apart (Istio always; Kuma unless
    /// `skipConntrackZoneSplit`).
    pub zones: bool,
}

/// Whether `::6/128` goes on `lo` (the proxy's IPv6 inbound-passthrough source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough6 {
    No,
    Yes,
    /// If IPv6 is on in the pod's namespace (the kernel layer looks).
    IfIpv6Enabled,
}

/// Outbound traffic of some uids (and ports, protocols) never captured: Kuma's
/// `excludePortsForUIDs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidExclusion {
    pub tcp: bool,
    pub udp: bool,
    /// Empty: every port.
    pub ports: Ports,
    /// Inclusive uid range.
    pub uids: (u32, u32),
}

/// A validated capture plan: everything the ruleset needs, nothing it must re-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mesh: Mesh,
    pub mode: Mode,
    /// `None`: no rule by owner uid (Linkerd with `proxy-uid` 0 or less).
    pub proxy_uid: Option<u32>,
    pub proxy_gid: Option<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub inbound: Inbound,
    /// Inbound connections from these sources are never captured.
    pub inbound_exclude_sources: Cidrs,
    /// Outbound TCP is captured at all (Kuma's `outbound.enabled`).
    pub outbound: bool,
    pub include_ranges: OutboundRanges,
    pub exclude_ranges: Cidrs,
    pub include_outbound_ports: Ports,
    pub exclude_outbound_ports: Ports,
    pub exclude_interfaces: BTreeSet<String>,
    /// Interfaces whose arriving TCP goes to the outbound port (Istio's KubeVirt reroute: a
    /// VM's traffic entering the virt-launcher pod), by name, so ones made later match too.
    pub reroute_interfaces: BTreeSet<String>,
    pub dns: Option<Dns>,
    /// Capture IPv6 as well (off: IPv6 traffic is left alone).
    pub ipv6: bool,
    /// The app's traffic over `lo` returns (Istio drops that rule when an include range holds
    /// a loopback address: `HasLoopBackIP`).
    pub app_loopback_return: bool,
    pub passthrough6: Passthrough6,
    pub uid_exclusions: Vec<UidExclusion>,
    /// Drop packets conntrack finds invalid before they reach the app (Kuma's
    /// `dropInvalidPackets`).
    pub drop_invalid: bool,
    pub shape: Shape,
}

impl Plan {
    /// The owner matches the proxy's traffic is known by: (is a gid, id).
    pub fn owners(&self) -> Vec<(bool, u32)> {
        let mut v = Vec::new();
        if let Some(u) = self.proxy_uid {
            v.push((false, u));
        }
        if let Some(g) = self.proxy_gid {
            v.push((true, g));
        }
        v
    }
}

/// The outcome for one pod.
// One per invocation, moved once: boxing the plan would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Leave the pod alone; the reason is logged.
    Skip(Skip),
    Capture(Plan),
}

/// The pod as the runtime describes it (from `CNI_ARGS`, `runtimeConfig` and `prevResult`, or
/// from the CRI).
#[derive(Debug, Clone, Copy, Default)]
pub struct Pod<'a> {
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// `None`: the runtime passed no annotations at all.
    pub annotations: Option<&'a Annotations>,
    /// The pod has an IPv6 address.
    pub ipv6: bool,
}

/// The plan as annotations build it up, before the last checks.
pub(crate) struct Draft {
    pub mode: Mode,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// `None`: every port (but the excluded ones).
    pub include_inbound: Option<Ports>,
    pub exclude_inbound: Ports,
    pub inbound_enabled: bool,
    pub inbound_exclude_sources: Cidrs,
    pub outbound: bool,
    pub include_ranges: OutboundRanges,
    pub include_has_loopback: bool,
    pub exclude_ranges: Cidrs,
    pub include_outbound_ports: Ports,
    pub exclude_outbound_ports: Ports,
    pub exclude_interfaces: BTreeSet<String>,
    pub reroute_interfaces: BTreeSet<String>,
    pub capture_dns: bool,
    pub dns_port: u16,
    pub dns_zones: bool,
    pub ipv6: bool,
    pub uid_exclusions: Vec<UidExclusion>,
    pub drop_invalid: bool,
}

/// What reading one annotation decided.
pub(crate) enum Step {
    Continue,
    Skip(Skip),
}

/// Decides what to do for `pod`.
pub fn decide(cfg: &PluginConfig, pod: &Pod<'_>) -> Result<Decision, CniError> {
    let profile = cfg.mesh.profile();
    if let Some(ns) = pod.namespace
        && cfg.exclude_namespaces.iter().any(|e| e == ns)
    {
        return Ok(Decision::Skip(Skip::Namespace(ns.to_string())));
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
        return Ok(Decision::Skip(Skip::NotAPod));
    };
    match profile.marker {
        Marker::Present(name) if !ann.contains_key(name) => {
            return Ok(Decision::Skip(Skip::NoSidecar {
                mesh: profile.name,
                annotation: name,
                want: None,
            }));
        }
        Marker::Equals(name, want) if ann.get(name).map(String::as_str) != Some(want) => {
            return Ok(Decision::Skip(Skip::NoSidecar {
                mesh: profile.name,
                annotation: name,
                want: Some(want),
            }));
        }
        _ => {}
    }
    let d = &profile.defaults;
    let mut draft = Draft {
        mode: Mode::Redirect,
        uid: Some(cfg.proxy_uid),
        gid: cfg.proxy_gid,
        outbound_port: cfg.outbound_port,
        inbound_port: cfg.inbound_port,
        include_inbound: None,
        exclude_inbound: Ports::of(d.always_excluded_inbound).union(&cfg.exclude_inbound_ports),
        inbound_enabled: true,
        inbound_exclude_sources: Cidrs::default(),
        outbound: true,
        include_ranges: OutboundRanges::All,
        include_has_loopback: false,
        exclude_ranges: Cidrs::default(),
        include_outbound_ports: Ports::default(),
        exclude_outbound_ports: cfg.exclude_outbound_ports.clone(),
        exclude_interfaces: BTreeSet::new(),
        reroute_interfaces: BTreeSet::new(),
        capture_dns: cfg.capture_dns,
        dns_port: cfg.dns_port,
        dns_zones: true,
        ipv6: cfg.ipv6,
        uid_exclusions: Vec::new(),
        drop_invalid: false,
    };
    for a in profile.annotations {
        let step = match (a.field, ann.get(a.name)) {
            // Kuma 2.x: without the YAML (or with an empty one), the per-key annotations its
            // injector writes by default, as kuma-cni 2.x falls back to them.
            (Field::KumaConfig, v) if v.is_none_or(|v| v.is_empty()) => {
                kuma_keys::apply(ann, &mut draft)?
            }
            // The deprecated name counts only without the new one (present, even empty).
            (Field::KubevirtInterfaces, _) if ann.contains_key(istio::REROUTE_INTERFACES) => {
                continue;
            }
            (_, None) => continue,
            (_, Some(v)) => apply(profile, &mut draft, a.name, a.field, v)?,
        };
        if let Step::Skip(why) = step {
            return Ok(Decision::Skip(why));
        }
    }
    Ok(Decision::Capture(finish(profile, draft, pod)))
}

/// Applies one annotation to the draft.
fn apply(
    profile: &Profile,
    s: &mut Draft,
    name: &'static str,
    field: Field,
    v: &str,
) -> Result<Step, CniError> {
    let ranges = profile.shape.port_ranges;
    match field {
        Field::InjectTemplates => {
            if let Some(skip) = istio_inject::templates(name, v) {
                return Ok(Step::Skip(skip));
            }
        }
        Field::SidecarStatus => {
            if let Some(skip) = istio_inject::status(name, v) {
                return Ok(Step::Skip(skip));
            }
        }
        Field::ProxyConfig => {
            // The proxy's own settings for this pod win over the entry's mesh-wide ones.
            let m = istio_inject::metadata(v);
            if m.disable_envoy {
                return Ok(Step::Skip(Skip::ProxyDisabled { annotation: name }));
            }
            if let Some(d) = m.dns_capture {
                s.capture_dns = d;
            }
            if let Some(d) = m.dual_stack {
                s.ipv6 = d;
            }
            if let Some(d) = m.invalid_drop {
                s.drop_invalid = d;
            }
        }
        Field::RerouteInterfaces | Field::KubevirtInterfaces => {
            s.reroute_interfaces = lists::ifnames(name, v)?;
        }
        Field::Inject => {
            // Go's ParseBool, as istio-cni reads it: a value that does not parse is not false.
            if go_bool(v) == Some(false) {
                return Ok(Step::Skip(Skip::OptedOut {
                    annotation: name,
                    value: v.to_string(),
                }));
            }
        }
        Field::InterceptionMode => match v.trim() {
            m if m.eq_ignore_ascii_case("REDIRECT") => s.mode = Mode::Redirect,
            m if m.eq_ignore_ascii_case("TPROXY") => s.mode = Mode::Tproxy,
            m if m.eq_ignore_ascii_case("NONE") => {
                return Ok(Step::Skip(Skip::NoInterception { annotation: name }));
            }
            _ => return Err(bad(name, v, "must be REDIRECT, TPROXY or NONE")),
        },
        Field::IncludeOutboundRanges => {
            if lists::is_star(v) {
                s.include_ranges = OutboundRanges::All;
            } else {
                let l = lists::cidrs(name, v)?;
                s.include_has_loopback = l.has_loopback;
                s.include_ranges = OutboundRanges::Only(l.cidrs);
            }
        }
        Field::ExcludeOutboundRanges => s.exclude_ranges = lists::cidrs(name, v)?.cidrs,
        Field::InboundExcludeSources => s.inbound_exclude_sources = lists::cidrs(name, v)?.cidrs,
        Field::IncludeInboundPorts => {
            s.include_inbound = if lists::is_star(v) {
                None
            } else {
                Some(lists::ports(name, v, ranges)?)
            };
        }
        Field::ExcludeInboundPorts => {
            s.exclude_inbound = s.exclude_inbound.union(&lists::ports(name, v, ranges)?);
        }
        Field::IncludeOutboundPorts => s.include_outbound_ports = lists::ports(name, v, ranges)?,
        Field::ExcludeOutboundPorts => s.exclude_outbound_ports = lists::ports(name, v, ranges)?,
        Field::ExcludeInterfaces => s.exclude_interfaces = lists::ifnames(name, v)?,
        Field::CaptureDns => s.capture_dns = lists::boolean(name, v)?,
        Field::ProxyUid | Field::ProxyGid => {
            let n = lists::go_int(name, v)?;
            let id = match n {
                // Linkerd writes the owner rule only for ids above 0.
                ..=0 => None,
                1..=0xffff_fffe => Some(n as u32),
                _ => return Err(bad(name, v, "is not a valid uid/gid")),
            };
            if field == Field::ProxyUid {
                s.uid = id;
            } else {
                s.gid = id;
            }
        }
        Field::KumaConfig => return kuma::apply(name, v, s),
    }
    Ok(Step::Continue)
}

/// The last checks and the switches that depend on the whole draft.
fn finish(profile: &Profile, s: Draft, pod: &Pod<'_>) -> Plan {
    let inbound = if !s.inbound_enabled {
        Inbound::Off
    } else {
        match s.include_inbound {
            None => Inbound::AllExcept(s.exclude_inbound),
            Some(p) if p.is_empty() => Inbound::Off,
            Some(p) => Inbound::Only(p),
        }
    };
    // Istio: DNS excluded by port is not captured at all (its conntrack zones would otherwise
    // split the query from its answer). Kuma captures UDP 53 before its port exclusions.
    let dns_excluded =
        profile.shape.dns == DnsShape::TcpAndUdp && s.exclude_outbound_ports.contains(53);
    let dns = (s.capture_dns && !dns_excluded).then_some(Dns {
        port: s.dns_port,
        zones: s.dns_zones,
    });
    let passthrough6 = match profile.shape.passthrough6 {
        profiles::Passthrough6::No => Passthrough6::No,
        profiles::Passthrough6::PodHasIpv6 if pod.ipv6 => Passthrough6::Yes,
        profiles::Passthrough6::PodHasIpv6 => Passthrough6::No,
        profiles::Passthrough6::Ipv6Enabled if s.ipv6 => Passthrough6::IfIpv6Enabled,
        profiles::Passthrough6::Ipv6Enabled => Passthrough6::No,
    };
    Plan {
        mesh: profile.mesh,
        mode: s.mode,
        proxy_uid: s.uid,
        proxy_gid: s.gid,
        outbound_port: s.outbound_port,
        inbound_port: s.inbound_port,
        inbound,
        inbound_exclude_sources: s.inbound_exclude_sources,
        outbound: s.outbound,
        include_ranges: s.include_ranges,
        exclude_ranges: s.exclude_ranges,
        include_outbound_ports: s.include_outbound_ports,
        exclude_outbound_ports: s.exclude_outbound_ports,
        exclude_interfaces: s.exclude_interfaces,
        reroute_interfaces: s.reroute_interfaces,
        dns,
        // TPROXY is Istio's, which always covers both families.
        ipv6: s.ipv6 || s.mode == Mode::Tproxy,
        app_loopback_return: !s.include_has_loopback,
        passthrough6,
        uid_exclusions: s.uid_exclusions,
        drop_invalid: s.drop_invalid,
        shape: profile.shape,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::{Ipv4Net, Ipv6Net};

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
                ipv6: false,
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

    fn set(p: &[u16]) -> Ports {
        Ports::of(p)
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
        assert_eq!((p.proxy_uid, p.proxy_gid), (Some(1337), Some(1337)));
        assert_eq!((p.outbound_port, p.inbound_port), (15001, 15006));
        assert_eq!(p.inbound, Inbound::AllExcept(set(&[15020, 15021, 15090])));
        assert_eq!(p.include_ranges, OutboundRanges::All);
        assert!(p.exclude_ranges.is_empty());
        assert!(p.include_outbound_ports.is_empty());
        assert_eq!(p.exclude_outbound_ports, set(&[15020]));
        assert!(p.exclude_interfaces.is_empty());
        assert_eq!(p.dns, None);
        assert!(p.app_loopback_return && p.ipv6);
        assert_eq!(p.passthrough6, Passthrough6::No);
    }

    #[test]
    fn skip_without_status_or_when_inject_false_or_mode_none() {
        let none = Annotations::new();
        assert!(
            matches!(decide_with(&none).unwrap(), Decision::Skip(w) if w.to_string().contains(istio::STATUS))
        );
        for f in ["false", "False", "FALSE", "f", "F", "0"] {
            let d = decide_with(&ann(&[(istio::INJECT, f)])).unwrap();
            assert!(matches!(d, Decision::Skip(_)), "{f}");
        }
        // Any other value is "not a false value" (Go's ParseBool fails on it, and istio-cni
        // then captures): captured.
        for t in [
            "true", "yes", "no", "off", "whatever", "fALSE", " false ", "false ",
        ] {
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
            ipv6: false,
        };
        assert!(
            matches!(decide(&cfg, &pod).unwrap(), Decision::Skip(w) if w.to_string().contains("kube-system"))
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
            ipv6: false,
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
            ipv6: false,
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
        // `*` counts only as the whole value.
        assert_eq!(
            err(&[(istio::INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,*")]).code,
            code::BAD_ANNOTATION
        );
        assert_eq!(
            plan(&[(istio::INCLUDE_OUTBOUND_IP_RANGES, " * ")]).include_ranges,
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
        for star in ["*", "10.0.0.0/8,*"] {
            let e = err(&[(istio::EXCLUDE_OUTBOUND_IP_RANGES, star)]);
            assert_eq!(e.code, code::BAD_ANNOTATION, "{star}");
        }
        assert_eq!(
            err(&[(istio::INCLUDE_INBOUND_PORTS, "80,*")]).code,
            code::BAD_ANNOTATION
        );
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
        let p = plan(&[(istio::EXCLUDE_INTERFACES, "eth1, net1, veth+")]);
        assert_eq!(
            p.exclude_interfaces,
            ["eth1", "net1", "veth+"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        for bad_value in ["a/b", "waytoolonginterfacename0", "a\"b", "a\\b", "ve+th"] {
            let e = err(&[(istio::EXCLUDE_INTERFACES, bad_value)]);
            assert_eq!(e.code, code::BAD_ANNOTATION);
            assert!(e.msg.contains(istio::EXCLUDE_INTERFACES));
        }
    }

    #[test]
    fn dns_capture_config_and_annotation() {
        assert_eq!(
            plan(&[(istio::CAPTURE_DNS, "true")]).dns,
            Some(Dns {
                port: 15053,
                zones: true
            })
        );
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
        assert_eq!(p.dns.map(|d| d.port), Some(5353));
        let a = ann(&[(istio::CAPTURE_DNS, "false")]);
        let pod = Pod {
            annotations: Some(&a),
            ..Pod::default()
        };
        let Decision::Capture(p) = decide(&cfg, &pod).unwrap() else {
            panic!()
        };
        assert_eq!(p.dns, None);
        assert!(p.app_loopback_return && p.ipv6);
        assert_eq!(p.passthrough6, Passthrough6::No);
        assert_eq!(
            err(&[(istio::CAPTURE_DNS, "maybe")]).code,
            code::BAD_ANNOTATION
        );
    }

    #[test]
    fn config_values_flow_into_the_plan() {
        let cfg = PluginConfig {
            proxy_uid: 101,
            proxy_gid: Some(202),
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
            (Some(101), Some(202), 7001, 7006)
        );
    }

    fn linkerd(pairs: &[(&str, &str)]) -> Result<Decision, CniError> {
        let mut a: Annotations = [(
            linkerd::PROXY_VERSION.to_string(),
            "stable-2.18".to_string(),
        )]
        .into();
        for (k, v) in pairs {
            a.insert(k.to_string(), v.to_string());
        }
        decide(
            &PluginConfig::for_mesh(Mesh::Linkerd),
            &Pod {
                namespace: Some("default"),
                name: Some("web-0"),
                annotations: Some(&a),
                ipv6: true,
            },
        )
    }

    #[test]
    fn linkerd_profile() {
        let Decision::Capture(p) = linkerd(&[]).unwrap() else {
            panic!()
        };
        assert_eq!((p.proxy_uid, p.proxy_gid), (Some(2102), None));
        assert_eq!((p.outbound_port, p.inbound_port), (4140, 4143));
        assert_eq!(p.inbound, Inbound::AllExcept(Ports::of(&[4190, 4191])));
        assert!(p.exclude_outbound_ports.is_empty() && !p.ipv6 && p.dns.is_none());
        assert_eq!(p.passthrough6, Passthrough6::No);
        let Decision::Capture(p) = linkerd(&[
            (linkerd::SKIP_INBOUND_PORTS, "22, 5000-5010"),
            (linkerd::SKIP_OUTBOUND_PORTS, "443,6443"),
            (linkerd::SKIP_SUBNETS, "10.0.0.0/8, fd00::/8"),
            (linkerd::PROXY_UID, "3000"),
            (linkerd::PROXY_GID, "3001"),
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            p.inbound,
            Inbound::AllExcept(Ports::from_ranges([(22, 22), (4190, 4191), (5000, 5010)]))
        );
        assert_eq!(p.exclude_outbound_ports, Ports::of(&[443, 6443]));
        assert_eq!(
            p.inbound_exclude_sources.v4.len() + p.inbound_exclude_sources.v6.len(),
            2
        );
        assert_eq!((p.proxy_uid, p.proxy_gid), (Some(3000), Some(3001)));
        // uid/gid 0 or less: no owner rule, as linkerd-cni writes none.
        let Decision::Capture(p) =
            linkerd(&[(linkerd::PROXY_UID, "0"), (linkerd::PROXY_GID, "-1")]).unwrap()
        else {
            panic!()
        };
        assert_eq!((p.proxy_uid, p.proxy_gid), (None, None));
        // Malformed values are code 100 (linkerd-cni drops a bad port silently; we do not).
        for (k, v) in [
            (linkerd::SKIP_OUTBOUND_PORTS, "443,abc"),
            (linkerd::SKIP_INBOUND_PORTS, "10-5"),
            (linkerd::SKIP_SUBNETS, "10.0.0.0/33"),
            (linkerd::PROXY_UID, "x"),
            (linkerd::PROXY_GID, " 1"),
        ] {
            let e = linkerd(&[(k, v)]).unwrap_err();
            assert_eq!(e.code, code::BAD_ANNOTATION, "{k}={v}");
            assert!(e.msg.contains(k) && e.msg.contains(v.trim()), "{}", e.msg);
        }
        // No proxy-version: no sidecar.
        let none = Annotations::new();
        let pod = Pod {
            annotations: Some(&none),
            ..Pod::default()
        };
        assert!(matches!(
            decide(&PluginConfig::for_mesh(Mesh::Linkerd), &pod).unwrap(),
            Decision::Skip(w) if w.to_string().contains(linkerd::PROXY_VERSION)
        ));
    }

    #[test]
    fn kuma_needs_the_exact_marker_and_its_config() {
        let cfg = PluginConfig::for_mesh(Mesh::Kuma);
        for v in ["True", "yes", "1"] {
            let a: Annotations = [(kuma_names::SIDECAR_INJECTED.to_string(), v.to_string())].into();
            let pod = Pod {
                annotations: Some(&a),
                ..Pod::default()
            };
            assert!(
                matches!(decide(&cfg, &pod).unwrap(), Decision::Skip(_)),
                "{v}"
            );
        }
        let a: Annotations =
            [(kuma_names::SIDECAR_INJECTED.to_string(), "true".to_string())].into();
        let pod = Pod {
            annotations: Some(&a),
            ..Pod::default()
        };
        // No YAML, no kuma-cni network: the injector added kuma-init (init mode).
        let Decision::Skip(why) = decide(&cfg, &pod).unwrap() else {
            panic!("captured")
        };
        assert_eq!(why.rule(), "init-container-mode");
        assert!(why.to_string().contains("kuma-init"), "{why}");
    }

    fn istio_pod(pairs: &[(&str, &str)]) -> Result<Decision, CniError> {
        let a: Annotations = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        decide_with(&a)
    }

    fn skipped_by(d: Result<Decision, CniError>) -> &'static str {
        match d.unwrap() {
            Decision::Skip(s) => s.rule(),
            Decision::Capture(_) => "captured",
        }
    }

    /// Pods as Istio's injector writes them (istio/istio 86c9f01, `pkg/kube/inject/testdata`).
    #[test]
    fn istio_pods_as_the_injector_writes_them() {
        let st = |init: &str, containers: &str| {
            format!(
                r#"{{"initContainers":{init},"containers":{containers},"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}}"#
            )
        };
        // gateway.yaml.injected: template gateway, the proxy a router.
        let gw = st("null", r#"["istio-proxy"]"#);
        assert_eq!(
            skipped_by(istio_pod(&[
                (istio::TEMPLATES, "gateway"),
                (istio::STATUS, &gw)
            ])),
            "gateway-template"
        );
        // A gateway is left alone even with a malformed capture annotation (istio-cni
        // decides the skip before it reads the settings).
        assert_eq!(
            skipped_by(istio_pod(&[
                (istio::TEMPLATES, "gateway"),
                (istio::STATUS, &gw),
                (istio::EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33"),
            ])),
            "gateway-template"
        );
        // hello-old-version.yaml.injected: istio-init mode.
        let init = st(r#"["istio-init"]"#, r#"["istio-proxy"]"#);
        assert_eq!(
            skipped_by(istio_pod(&[(istio::STATUS, &init)])),
            "init-container-mode"
        );
        // CNI mode, classic and native sidecars: captured.
        let cni = st(r#"["istio-validation"]"#, r#"["istio-proxy"]"#);
        let native = st(r#"["istio-validation","istio-proxy"]"#, "null");
        for s in [&cni, &native] {
            assert_eq!(
                skipped_by(istio_pod(&[(istio::STATUS, s)])),
                "captured",
                "{s}"
            );
        }
        assert_eq!(
            skipped_by(istio_pod(&[
                (istio::TEMPLATES, "sidecar"),
                (istio::STATUS, &native)
            ])),
            "captured"
        );
        // No proxy among the injected containers.
        let none = st("null", r#"["hello"]"#);
        assert_eq!(
            skipped_by(istio_pod(&[(istio::STATUS, &none)])),
            "no-proxy-container"
        );
        // DISABLE_ENVOY in the pod's proxy metadata.
        assert_eq!(
            skipped_by(istio_pod(&[
                (istio::STATUS, &cni),
                (
                    istio::PROXY_CONFIG,
                    "proxyMetadata: {DISABLE_ENVOY: \"true\"}"
                ),
            ])),
            "proxy-disabled"
        );
    }

    #[test]
    fn istio_proxy_config_sets_dns_dual_stack_and_invalid_drop_per_pod() {
        let pc = |yaml: &str, extra: &[(&str, &str)]| {
            let mut v = vec![(istio::STATUS, "{}"), (istio::PROXY_CONFIG, yaml)];
            v.extend_from_slice(extra);
            match istio_pod(&v).unwrap() {
                Decision::Capture(p) => p,
                Decision::Skip(s) => panic!("{s}"),
            }
        };
        let p = pc("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n", &[]);
        assert_eq!(p.dns.map(|d| d.port), Some(15053));
        let p = pc(
            "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"false\", ISTIO_DUAL_STACK: \"false\", INVALID_DROP: \"true\"}",
            &[],
        );
        assert!(p.dns.is_none() && !p.ipv6 && p.drop_invalid);
        // Our own per-pod switch wins over the proxy metadata.
        let p = pc(
            "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}",
            &[(istio::CAPTURE_DNS, "false")],
        );
        assert!(p.dns.is_none());
        // The pod's metadata wins over the entry's mesh-wide setting.
        let cfg = PluginConfig {
            capture_dns: true,
            ..PluginConfig::default()
        };
        let a: Annotations = [
            (istio::STATUS.to_string(), "{}".to_string()),
            (
                istio::PROXY_CONFIG.to_string(),
                "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"false\"}".to_string(),
            ),
        ]
        .into();
        let Decision::Capture(p) = decide(
            &cfg,
            &Pod {
                annotations: Some(&a),
                ..Pod::default()
            },
        )
        .unwrap() else {
            panic!()
        };
        assert!(p.dns.is_none());
        // Istio ignores a ProxyConfig it cannot decode, and so does this: the entry's value.
        let p = pc("proxyMetadata: {ISTIO_META_DNS_CAPTURE: true}", &[]);
        assert!(p.dns.is_none() && p.ipv6);
    }

    #[test]
    fn kubevirt_interfaces_new_name_wins() {
        let p = |pairs: &[(&str, &str)]| {
            let mut v = vec![(istio::STATUS, "{}")];
            v.extend_from_slice(pairs);
            match istio_pod(&v) {
                Ok(Decision::Capture(p)) => Ok(p.reroute_interfaces),
                Ok(Decision::Skip(s)) => panic!("{s}"),
                Err(e) => Err(e),
            }
        };
        let set = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            p(&[(istio::REROUTE_INTERFACES, "k6t-eth0, net1")]).unwrap(),
            set(&["k6t-eth0", "net1"])
        );
        assert_eq!(
            p(&[(istio::KUBEVIRT_INTERFACES, "eth1")]).unwrap(),
            set(&["eth1"])
        );
        // Both: the new one, even empty; the deprecated one then is not even read.
        assert_eq!(
            p(&[
                (istio::REROUTE_INTERFACES, "eth2"),
                (istio::KUBEVIRT_INTERFACES, "eth1")
            ])
            .unwrap(),
            set(&["eth2"])
        );
        assert!(
            p(&[
                (istio::REROUTE_INTERFACES, ""),
                (istio::KUBEVIRT_INTERFACES, "bad/name")
            ])
            .unwrap()
            .is_empty()
        );
        assert_eq!(
            p(&[(istio::REROUTE_INTERFACES, "bad/name")])
                .unwrap_err()
                .code,
            code::BAD_ANNOTATION
        );
    }

    fn kuma_keys(pairs: &[(&str, &str)]) -> Result<Decision, CniError> {
        let mut a: Annotations =
            [(kuma_names::SIDECAR_INJECTED.to_string(), "true".to_string())].into();
        for (k, v) in pairs {
            a.insert(k.to_string(), v.to_string());
        }
        decide(
            &PluginConfig::for_mesh(Mesh::Kuma),
            &Pod {
                namespace: Some("default"),
                name: Some("web"),
                annotations: Some(&a),
                ipv6: true,
            },
        )
    }

    /// Kuma 2.x's injector goldens (kumahq/kuma v2.14.3 = 0c7aaec,
    /// `pkg/plugins/runtime/k8s/webhooks/injector/testdata`), read as kuma-cni 2.x reads them.
    #[test]
    fn kuma_2x_per_key_pods() {
        use kuma_keys::*;
        // inject.34: CNI mode, ipv4, inbound 15055, probe proxy off.
        let cni = [
            (NETWORKS, "kuma-cni"),
            (PROBE_PROXY_PORT, "0"),
            ("kuma.io/envoy-admin-port", "9901"),
            (SIDECAR_UID, "5678"),
            ("kuma.io/transparent-proxying", "enabled"),
            (INBOUND_PORT, "15055"),
            (IP_FAMILY_MODE, "ipv4"),
            (OUTBOUND_PORT, "15001"),
            ("kuma.io/virtual-probes", "disabled"),
        ];
        let Decision::Capture(p) = kuma_keys(&cni).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(
            (p.inbound_port, p.outbound_port, p.proxy_uid),
            (15055, 15001, Some(5678))
        );
        assert!(!p.ipv6 && p.dns.is_none());
        assert_eq!(p.inbound, Inbound::AllExcept(Ports::of(&[9901])));
        assert_eq!(p.exclude_outbound_ports, Ports::of(&[9901]));
        // With Helm's defaults: builtin DNS on, the probe proxy port, 9902 for admin over UDS.
        let mut helm = cni.to_vec();
        helm.retain(|(k, _)| *k != PROBE_PROXY_PORT && *k != IP_FAMILY_MODE && *k != INBOUND_PORT);
        helm.extend([
            (PROBE_PROXY_PORT, "9001"),
            (IP_FAMILY_MODE, "dualstack"),
            (BUILTIN_DNS, "enabled"),
            (BUILTIN_DNS_PORT, "15053"),
            ("kuma.io/builtin-dns-logging", "false"),
            (EXCLUDE_INBOUND_PORTS, "9902"),
        ]);
        let Decision::Capture(p) = kuma_keys(&helm).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(p.inbound, Inbound::AllExcept(Ports::of(&[9001, 9902])));
        assert_eq!(p.dns.map(|d| (d.port, d.zones)), Some((15053, true)));
        assert!(p.ipv6 && p.inbound_port == 15006);
        // inject.01: init mode (no kuma-cni network): kuma-init writes the rules.
        let init: Vec<_> = cni
            .iter()
            .filter(|(k, _)| *k != NETWORKS)
            .copied()
            .collect();
        assert_eq!(skipped_by(kuma_keys(&init)), "init-container-mode");
        // inject.41: a delegated gateway in CNI mode: outbound (and DNS) only.
        let mut gw = cni.to_vec();
        gw.extend([(GATEWAY, "enabled"), (BUILTIN_DNS, "enabled")]);
        let Decision::Capture(p) = kuma_keys(&gw).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(p.inbound, Inbound::Off);
        assert!(p.dns.is_some() && p.outbound);
        // Every per-key setting kuma-cni reads.
        let Decision::Capture(p) = kuma_keys(&[
            (NETWORKS, "kuma-cni"),
            (SIDECAR_UID, "1234"),
            (EXCLUDE_INBOUND_PORTS, "22,8443"),
            (EXCLUDE_OUTBOUND_PORTS, "3306"),
            (
                EXCLUDE_OUTBOUND_PORTS_FOR_UIDS,
                "tcp:80,443:1000-1005;udp:53:1001;",
            ),
            (EXCLUDE_INBOUND_IPS, "10.0.0.0/8,fd00::/8"),
            (EXCLUDE_OUTBOUND_IPS, "192.168.0.1"),
            (DROP_INVALID_PACKETS, "true"),
            (IPTABLES_LOGS, "false"),
        ])
        .unwrap() else {
            panic!("skipped")
        };
        assert_eq!(p.proxy_uid, Some(1234));
        assert_eq!(p.inbound, Inbound::AllExcept(Ports::of(&[22, 8443, 9001])));
        assert_eq!(p.exclude_outbound_ports, Ports::of(&[3306]));
        assert_eq!(p.uid_exclusions.len(), 2);
        assert_eq!(
            p.inbound_exclude_sources.v4.len() + p.inbound_exclude_sources.v6.len(),
            2
        );
        assert_eq!(p.exclude_ranges.v4.len(), 1);
        assert!(p.drop_invalid);
        // kuma-cni's refusals, each naming the key.
        for (k, v) in [
            (IP_FAMILY_MODE, "ipv6"),
            (GATEWAY, "builtin"),
            (BUILTIN_DNS, "yes"),
            (SIDECAR_UID, "kuma-dp"),
            (OUTBOUND_PORT, "0"),
            (INBOUND_PORT, "15001,15002"),
            (EXCLUDE_OUTBOUND_PORTS, ""),
            (EXCLUDE_OUTBOUND_PORTS, "80-90"),
            (EXCLUDE_INBOUND_IPS, ""),
            (EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "sctp:1:1"),
            (PROBE_PROXY_PORT, "x"),
        ] {
            let e = kuma_keys(&[(NETWORKS, "kuma-cni"), (k, v)]).unwrap_err();
            assert_eq!(e.code, code::BAD_ANNOTATION, "{k}={v}");
            assert!(e.msg.contains(k), "{k}: {}", e.msg);
        }
        // An empty exclude-inbound-ports with the probe proxy port on is fine (kuma-cni appends).
        assert!(kuma_keys(&[(NETWORKS, "kuma-cni"), (EXCLUDE_INBOUND_PORTS, "")]).is_ok());
        // The YAML, when there, wins: per-key keys are not read.
        let Decision::Capture(p) = kuma_keys(&[
            (NETWORKS, "kuma-cni"),
            (kuma_names::TRANSPARENT_PROXY_CONFIG, "cniMode: true"),
            (IP_FAMILY_MODE, "ipv6"),
        ])
        .unwrap() else {
            panic!("skipped")
        };
        assert_eq!(p.inbound, Inbound::AllExcept(Ports::of(&[9001, 9902])));
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
