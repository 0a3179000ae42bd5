//! Kuma's `traffic.kuma.io/transparent-proxy-config`: the YAML the injector writes with the
//! whole capture configuration (kumahq/kuma `pkg/transparentproxy/config/config.go`), read
//! as kuma-cni reads it (unknown keys ignored, missing keys at Kuma's defaults) and applied to
//! the draft plan. Only a Kuma pod's ADD parses YAML.
//!
//! What maps onto our engine is applied; what cannot be reproduced in a pod's own table, or
//! would silently do something else, is refused with code 100 (README: "Kuma").

use super::{Draft, Mode, OutboundRanges, Skip, Step, UidExclusion};
use crate::protocol::{CniError, truncate};
use crate::values::lists::{self, Ports, bad};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Config {
    #[serde(rename = "kumaDPUser")]
    kuma_dp_user: Option<Scalar>,
    redirect: Redirect,
    drop_invalid_packets: bool,
    dry_run: bool,
    ip_family_mode: Option<String>,
    cni_mode: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Redirect {
    inbound: Flow,
    outbound: Flow,
    dns: Dns,
    vnet: VNet,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Flow {
    enabled: bool,
    port: Option<Scalar>,
    include_ports: Option<PortList>,
    exclude_ports: Option<PortList>,
    #[serde(rename = "excludePortsForUIDs")]
    exclude_ports_for_uids: Vec<String>,
    #[serde(rename = "excludePortsForIPs")]
    exclude_ports_for_ips: Vec<String>,
}

impl Default for Flow {
    fn default() -> Flow {
        Flow {
            enabled: true,
            port: None,
            include_ports: None,
            exclude_ports: None,
            exclude_ports_for_uids: Vec::new(),
            exclude_ports_for_ips: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Dns {
    enabled: bool,
    port: Option<Scalar>,
    capture_all: bool,
    skip_conntrack_zone_split: bool,
}

impl Default for Dns {
    fn default() -> Dns {
        Dns {
            enabled: false,
            port: None,
            capture_all: true,
            skip_conntrack_zone_split: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct VNet {
    networks: Vec<String>,
}

/// A YAML scalar Kuma reads as text or a number (`port: 15006`, `kumaDPUser: "5678"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Num(u64),
    Text(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Num(n) => n.to_string(),
            Scalar::Text(s) => s.clone(),
        }
    }
}

/// Kuma's `Ports`: a list of numbers or strings, or one comma-separated string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortList {
    One(Scalar),
    Many(Vec<Scalar>),
}

impl PortList {
    fn text(&self) -> String {
        match self {
            PortList::One(s) => s.text(),
            PortList::Many(v) => v.iter().map(Scalar::text).collect::<Vec<_>>().join(","),
        }
    }
}

/// Inbound ports the YAML path always excludes.
pub const YAML_ALWAYS_EXCLUDED_INBOUND: [u16; 2] = [9001, 9902];

/// Reads the YAML and applies it to the draft.
pub(crate) fn apply(name: &'static str, v: &str, s: &mut Draft) -> Result<Step, CniError> {
    let c: Config = serde_saphyr::from_str(v).map_err(|e| {
        bad(
            name,
            v,
            &format!("not Kuma's YAML: {}", truncate(&e.to_string(), 160)),
        )
    })?;
    let field = |what: &str, why: &str| bad(name, v, &format!("{what}: {why}"));
    if !c.cni_mode {
        // The injector adds kuma-init (which applies the rules itself) exactly when cniMode is
        // off; capturing here too would install the rules twice.
        return Ok(Step::Skip(Skip::InitContainerMode {
            container: "kuma-init",
            evidence: format!("{name} has no cniMode: true"),
        }));
    }
    if c.dry_run {
        return Ok(Step::Skip(Skip::DryRun { annotation: name }));
    }
    if let Some(u) = &c.kuma_dp_user {
        let u = u.text();
        if !u.is_empty() {
            s.uid = Some(u.parse::<u32>().map_err(|_| {
                field(
                    "kumaDPUser",
                    &format!("{u:?} is not a numeric uid (names need the node's user database)"),
                )
            })?);
        }
    }
    s.ipv6 = match c.ip_family_mode.as_deref() {
        None | Some("") | Some("dualstack") => s.ipv6,
        Some("ipv4") => false,
        Some(m) => {
            return Err(field(
                "ipFamilyMode",
                &format!("{m:?} is not dualstack or ipv4"),
            ));
        }
    };
    s.drop_invalid = c.drop_invalid_packets;
    if !c.redirect.vnet.networks.is_empty() {
        return Err(field(
            "redirect.vnet.networks",
            "not supported (it captures traffic forwarded from bridges on a host, not a pod's)",
        ));
    }

    let r = &c.redirect;
    // Inbound.
    if let Some(p) = &r.inbound.port {
        s.inbound_port =
            port(&p.text()).ok_or_else(|| field("redirect.inbound.port", "not a port 1-65535"))?;
    }
    if !r.inbound.exclude_ports_for_uids.is_empty() {
        return Err(field(
            "redirect.inbound.excludePortsForUIDs",
            "not supported (Kuma turns it into a rule that disables inbound capture)",
        ));
    }
    s.inbound_enabled = r.inbound.enabled;
    // The injector lists the probe proxy (9001) and readiness (9902) ports in excludePorts;
    // they are excluded when the YAML says nothing too.
    s.exclude_inbound = s
        .exclude_inbound
        .union(&Ports::of(&YAML_ALWAYS_EXCLUDED_INBOUND));
    if let Some(p) = &r.inbound.exclude_ports {
        s.exclude_inbound =
            s.exclude_inbound
                .union(&ports(name, v, "redirect.inbound.excludePorts", p)?);
    }
    if let Some(p) = &r.inbound.include_ports {
        let p = ports(name, v, "redirect.inbound.includePorts", p)?;
        if !p.is_empty() {
            s.include_inbound = Some(p);
        }
    }
    s.inbound_exclude_sources = ips(
        name,
        v,
        "redirect.inbound.excludePortsForIPs",
        &r.inbound.exclude_ports_for_ips,
    )?;

    // Outbound.
    if let Some(p) = &r.outbound.port {
        s.outbound_port =
            port(&p.text()).ok_or_else(|| field("redirect.outbound.port", "not a port 1-65535"))?;
    }
    s.outbound = r.outbound.enabled;
    if let Some(p) = &r.outbound.exclude_ports {
        s.exclude_outbound_ports = ports(name, v, "redirect.outbound.excludePorts", p)?;
    }
    if let Some(p) = &r.outbound.include_ports {
        let p = ports(name, v, "redirect.outbound.includePorts", p)?;
        if !p.is_empty() {
            // Kuma redirects only these ports then, whatever the destination.
            s.include_outbound_ports = p;
            s.include_ranges = OutboundRanges::Only(Default::default());
            s.exclude_outbound_ports = Ports::default();
        }
    }
    s.exclude_ranges = ips(
        name,
        v,
        "redirect.outbound.excludePortsForIPs",
        &r.outbound.exclude_ports_for_ips,
    )?;
    s.uid_exclusions = r
        .outbound
        .exclude_ports_for_uids
        .iter()
        .map(|e| {
            uid_exclusion(e).map_err(|why| {
                field(
                    "redirect.outbound.excludePortsForUIDs",
                    &format!("{e:?}: {why}"),
                )
            })
        })
        .collect::<Result<_, _>>()?;

    // DNS.
    s.capture_dns = r.dns.enabled;
    if r.dns.enabled {
        if let Some(p) = &r.dns.port {
            s.dns_port =
                port(&p.text()).ok_or_else(|| field("redirect.dns.port", "not a port 1-65535"))?;
        }
        if !r.dns.capture_all {
            return Err(field(
                "redirect.dns.captureAll",
                "false is not supported (kuma-cni would read the node's resolv.conf, not the pod's)",
            ));
        }
        s.dns_zones = !r.dns.skip_conntrack_zone_split;
    }
    // TPROXY is Istio's; Kuma is REDIRECT only.
    s.mode = Mode::Redirect;
    Ok(Step::Continue)
}

fn port(t: &str) -> Option<u16> {
    t.trim().parse::<u16>().ok().filter(|&p| p != 0)
}

fn ports(name: &str, v: &str, what: &str, p: &PortList) -> Result<Ports, CniError> {
    lists::ports(name, &p.text(), false).map_err(|e| bad(name, v, &format!("{what}: {}", e.msg)))
}

/// `excludePortsForIPs`: each item a comma-separated list of addresses or CIDRs, both families.
fn ips(name: &str, v: &str, what: &str, items: &[String]) -> Result<super::Cidrs, CniError> {
    let joined = items.join(",");
    lists::cidrs(name, &joined)
        .map(|l| l.cidrs)
        .map_err(|e| bad(name, v, &format!("{what}: {}", e.msg)))
}

/// One `excludePortsForUIDs` item: `[PROTOCOLS:][PORTS:]UIDS`, protocols `tcp`, `udp`, a
/// comma list or `*`; ports a comma list of ports and `LOW-HIGH` ranges or `*`; uids one uid
/// or one `LOW-HIGH` range.
pub(crate) fn uid_exclusion(e: &str) -> Result<UidExclusion, String> {
    let parts: Vec<&str> = e.split(':').map(str::trim).collect();
    let (proto, ports, uids) = match parts.as_slice() {
        [u] => ("", "", *u),
        [a, u] if a.chars().all(|c| c.is_ascii_alphabetic() || c == ',') => (*a, "", *u),
        [p, u] => ("", *p, *u),
        [a, p, u] => (*a, *p, *u),
        _ => return Err("expected [PROTOCOLS:][PORTS:]UIDS".into()),
    };
    let (mut tcp, mut udp) = (false, false);
    if proto.is_empty() || proto == "*" {
        (tcp, udp) = (true, true);
    } else {
        for p in proto.split(',') {
            match p.trim() {
                "tcp" => tcp = true,
                "udp" => udp = true,
                other => return Err(format!("{other:?} is not tcp or udp")),
            }
        }
    }
    let ports = if ports.is_empty() || ports == "*" {
        Ports::default()
    } else {
        lists::ports("", ports, true).map_err(|_| format!("{ports:?} is not a port list"))?
    };
    let id = |t: &str| {
        t.trim()
            .parse::<u32>()
            .map_err(|_| format!("{t:?} is not a uid"))
    };
    let uids = match uids.split_once('-') {
        Some((a, b)) => (id(a)?, id(b)?),
        None if !uids.is_empty() && uids != "*" && !uids.contains(',') => (id(uids)?, id(uids)?),
        None => return Err("UIDS must be one uid or one range".into()),
    };
    if uids.0 > uids.1 {
        return Err("the uid range ends below its start".into());
    }
    Ok(UidExclusion {
        tcp,
        udp,
        ports,
        uids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Annotations, PluginConfig};
    use crate::policy::{Decision, Inbound, Pod, decide, kuma_names};

    fn plan(yaml: &str) -> Result<Decision, CniError> {
        let a: Annotations = [
            (kuma_names::SIDECAR_INJECTED.to_string(), "true".to_string()),
            (
                kuma_names::TRANSPARENT_PROXY_CONFIG.to_string(),
                yaml.to_string(),
            ),
        ]
        .into();
        let cfg = PluginConfig::for_mesh(crate::config::Mesh::Kuma);
        decide(
            &cfg,
            &Pod {
                namespace: Some("default"),
                name: Some("web"),
                annotations: Some(&a),
                ipv6: true,
            },
        )
    }

    /// What the injector writes with Helm's defaults (block style, as `yaml.Marshal` does).
    const DEFAULTS: &str = "cniMode: true
ipFamilyMode: dualstack
kumaDPUser: \"5678\"
redirect:
  dns:
    captureAll: true
    enabled: true
    port: 15053
    resolvConfigPath: /etc/resolv.conf
    skipConntrackZoneSplit: false
  inbound:
    enabled: true
    excludePorts:
    - 9001
    - 9902
    port: 15006
  outbound:
    enabled: true
    port: 15001
retry:
  maxRetries: 4
  sleepBetweenRetries: 2s
wait: 5
waitInterval: 0
";

    #[test]
    fn the_injectors_yaml_becomes_the_plan() {
        let Decision::Capture(p) = plan(DEFAULTS).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(p.proxy_uid, Some(5678));
        assert_eq!((p.outbound_port, p.inbound_port), (15001, 15006));
        assert_eq!(p.inbound, Inbound::AllExcept(Ports::of(&[9001, 9902])));
        assert_eq!(p.dns.map(|d| (d.port, d.zones)), Some((15053, true)));
        assert!(p.ipv6 && p.proxy_gid.is_none());
        // Flow style, strings for numbers, a comma string of ports, exclusions of every kind.
        let y = "{cniMode: true, ipFamilyMode: ipv4, kumaDPUser: '1234', dropInvalidPackets: true,
            redirect: {inbound: {port: '15555', excludePorts: '22, 80', excludePortsForIPs: ['10.0.0.0/8,fd00::/8']},
            outbound: {excludePorts: [3306], excludePortsForIPs: ['192.168.0.1'], excludePortsForUIDs: ['tcp:22:1000-2000']},
            dns: {enabled: false}}, unknownKey: 1}";
        let Decision::Capture(p) = plan(y).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(p.proxy_uid, Some(1234));
        assert_eq!(p.inbound_port, 15555);
        assert_eq!(
            p.inbound,
            Inbound::AllExcept(Ports::of(&[22, 80, 9001, 9902]))
        );
        assert_eq!(p.inbound_exclude_sources.v4.len(), 1);
        assert_eq!(p.inbound_exclude_sources.v6.len(), 1);
        assert_eq!(p.exclude_outbound_ports, Ports::of(&[3306]));
        assert_eq!(p.exclude_ranges.v4.len(), 1);
        assert_eq!(p.uid_exclusions.len(), 1);
        assert!(!p.ipv6 && p.drop_invalid && p.dns.is_none());
    }

    #[test]
    fn skips_and_refusals_name_the_key() {
        assert!(matches!(plan("cniMode: false").unwrap(), Decision::Skip(_)));
        assert!(matches!(plan("{}").unwrap(), Decision::Skip(_)));
        assert!(matches!(
            plan("{cniMode: true, dryRun: true}").unwrap(),
            Decision::Skip(_)
        ));
        for (yaml, key) in [
            ("{cniMode: true, kumaDPUser: kuma-dp}", "kumaDPUser"),
            ("{cniMode: true, ipFamilyMode: ipv6}", "ipFamilyMode"),
            (
                "{cniMode: true, redirect: {vnet: {networks: ['br+:10.0.0.0/8']}}}",
                "vnet",
            ),
            (
                "{cniMode: true, redirect: {dns: {enabled: true, captureAll: false}}}",
                "captureAll",
            ),
            (
                "{cniMode: true, redirect: {inbound: {excludePortsForUIDs: ['1000']}}}",
                "excludePortsForUIDs",
            ),
            (
                "{cniMode: true, redirect: {inbound: {port: 0}}}",
                "redirect.inbound.port",
            ),
            (
                "{cniMode: true, redirect: {outbound: {excludePorts: [70000]}}}",
                "excludePorts",
            ),
            (
                "{cniMode: true, redirect: {outbound: {excludePortsForIPs: [nope]}}}",
                "excludePortsForIPs",
            ),
            ("{cniMode: true, redirect: [1, 2]}", "not Kuma's YAML"),
            ("cniMode: [unclosed", "not Kuma's YAML"),
        ] {
            let e = plan(yaml).unwrap_err();
            assert_eq!(e.code, 100, "{yaml}");
            assert!(
                e.msg.contains(key) && e.msg.contains(kuma_names::TRANSPARENT_PROXY_CONFIG),
                "{yaml}: {}",
                e.msg
            );
        }
    }

    #[test]
    fn uid_exclusions() {
        let e = uid_exclusion("tcp:22:1000-2000").unwrap();
        assert!(e.tcp && !e.udp);
        assert_eq!(e.ports.ranges(), &[(22, 22)]);
        assert_eq!(e.uids, (1000, 2000));
        let e = uid_exclusion("80:1002").unwrap();
        assert!(e.tcp && e.udp);
        assert_eq!(e.uids, (1002, 1002));
        let e = uid_exclusion("1003").unwrap();
        assert!(e.ports.is_empty() && e.tcp && e.udp);
        let e = uid_exclusion("udp:*:5").unwrap();
        assert!(!e.tcp && e.udp && e.ports.is_empty());
        for bad in ["", "*", "1,2", "sctp:1", "1:2:3:4", "5-1", "x:y:z"] {
            assert!(uid_exclusion(bad).is_err(), "{bad:?}");
        }
    }
}
