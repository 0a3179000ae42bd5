//! Kuma 2.x's per-key annotations: what its injector writes by default (Helm's
//! `transparentProxy.configMap.enabled` is false), read as kuma-cni 2.x reads them
//! (kumahq/kuma v2.14.3 = 0c7aaec: `app/cni/pkg/cni/annotations_linux.go`, `injector_linux.go`,
//! with its choice between this and the YAML in `main_linux.go`). The YAML
//! (`traffic.kuma.io/transparent-proxy-config`), when present and not empty, wins, as there.
//!
//! kuma-cni's defaults when a key is absent: inbound 15006, outbound 15001, uid 5678, dual
//! stack, no DNS capture, port 9901 excluded both ways, and the application probe proxy port
//! (9001) added to the inbound exclusions. Every malformed value fails the ADD (code 100), as it
//! does there; the one difference on purpose is noted where it is.

use super::kuma::uid_exclusion;
use super::skip::Skip;
use super::{Draft, Step};
use crate::protocol::CniError;
use crate::values::Annotations;
use crate::values::lists::{self, Ports, bad};

/// Multus's network selection; Kuma's injector puts `kuma-cni` there exactly in CNI mode.
pub const NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
pub const INBOUND_PORT: &str = "kuma.io/transparent-proxying-inbound-port";
pub const OUTBOUND_PORT: &str = "kuma.io/transparent-proxying-outbound-port";
pub const IP_FAMILY_MODE: &str = "kuma.io/transparent-proxying-ip-family-mode";
pub const SIDECAR_UID: &str = "kuma.io/sidecar-uid";
pub const GATEWAY: &str = "kuma.io/gateway";
pub const BUILTIN_DNS: &str = "kuma.io/builtin-dns";
pub const BUILTIN_DNS_PORT: &str = "kuma.io/builtin-dns-port";
pub const PROBE_PROXY_PORT: &str = "kuma.io/application-probe-proxy-port";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.kuma.io/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.kuma.io/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS_FOR_UIDS: &str = "traffic.kuma.io/exclude-outbound-ports-for-uids";
pub const EXCLUDE_INBOUND_IPS: &str = "traffic.kuma.io/exclude-inbound-ips";
pub const EXCLUDE_OUTBOUND_IPS: &str = "traffic.kuma.io/exclude-outbound-ips";
pub const DROP_INVALID_PACKETS: &str = "traffic.kuma.io/drop-invalid-packets";
pub const IPTABLES_LOGS: &str = "traffic.kuma.io/iptables-logs";

/// kuma-cni's default port exclusion (the proxy's admin port) when a list is absent.
const DEFAULT_EXCLUDED: &str = "9901";
const DEFAULT_PROBE_PORT: &str = "9001";

/// Whether Multus's network list (`a,ns/b,c@eth1`, or its JSON form) selects `kuma-cni`.
pub fn selects_kuma_cni(v: &str) -> bool {
    let name = |n: &str| {
        let n = n.trim();
        let n = n.split('@').next().unwrap_or(n);
        n.rsplit('/').next().unwrap_or(n) == "kuma-cni"
    };
    if v.trim_start().starts_with('[') {
        return serde_json::from_str::<Vec<serde_json::Value>>(v)
            .unwrap_or_default()
            .iter()
            .any(|e| e["name"].as_str().is_some_and(name));
    }
    v.split(',').any(name)
}

/// kuma-cni's `GetEnabled`: enabled/true or disabled/false, in any case; nothing else.
fn enabled(name: &str, v: &str) -> Result<bool, CniError> {
    match v.to_ascii_lowercase().as_str() {
        "enabled" | "true" => Ok(true),
        "disabled" | "false" => Ok(false),
        _ => Err(bad(name, v, "must be enabled, disabled, true or false")),
    }
}

/// One redirect port, as kuma-cni's `Port.Set`: 1-65535, no spaces.
fn port(name: &str, v: &str) -> Result<u16, CniError> {
    v.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| bad(name, v, "must be one port 1-65535"))
}

/// The annotation-stage check kuma-cni makes of every port key: a comma list of 0-65535,
/// spaces allowed.
fn port_list_shape(name: &str, v: &str) -> Result<(), CniError> {
    if v.trim().is_empty() {
        return Ok(());
    }
    for p in v.trim().split(',') {
        p.trim()
            .parse::<u16>()
            .map_err(|_| bad(name, v, &format!("{p:?} is not a port")))?;
    }
    Ok(())
}

/// A port list as kuma-cni turns it into rules: split on commas, no spaces, no ranges, not
/// empty. 0 (which the kernel never sees as a destination port) adds nothing.
fn ports(name: &str, v: &str) -> Result<Ports, CniError> {
    let mut out = Vec::new();
    for p in v.split(',') {
        let n = p.parse::<u16>().map_err(|_| {
            bad(
                name,
                v,
                &format!("{p:?} is not a port (a comma list, no spaces)"),
            )
        })?;
        if n != 0 {
            out.push(n);
        }
    }
    Ok(Ports::of(&out))
}

/// Applies the per-key annotations to the draft (the YAML is absent or empty).
pub(crate) fn apply(ann: &Annotations, s: &mut Draft) -> Result<Step, CniError> {
    let get = |k: &str| ann.get(k).map(String::as_str);
    // Without kuma-cni in the network list the injector added kuma-init, which writes this
    // pod's rules itself.
    if !get(NETWORKS).is_some_and(selects_kuma_cni) {
        return Ok(Step::Skip(Skip::InitContainerMode {
            container: "kuma-init",
            evidence: format!(
                "{NETWORKS} does not select kuma-cni (the injector's mark of CNI mode)"
            ),
        }));
    }
    // Validation first, for every key kuma-cni reads, gateway or not.
    for k in [
        INBOUND_PORT,
        OUTBOUND_PORT,
        BUILTIN_DNS_PORT,
        EXCLUDE_INBOUND_PORTS,
        EXCLUDE_OUTBOUND_PORTS,
    ] {
        if let Some(v) = get(k) {
            port_list_shape(k, v)?;
        }
    }
    let gateway = get(GATEWAY)
        .map(|v| enabled(GATEWAY, v))
        .transpose()?
        .unwrap_or(false);
    if let Some(v) = get(SIDECAR_UID) {
        s.uid = Some(v.parse::<u32>().map_err(|_| {
            bad(
                SIDECAR_UID,
                v,
                "is not a numeric uid (names need the node's user database)",
            )
        })?);
    }
    if let Some(v) = get(OUTBOUND_PORT) {
        s.outbound_port = port(OUTBOUND_PORT, v)?;
    }
    s.ipv6 = match get(IP_FAMILY_MODE) {
        None | Some("dualstack") => s.ipv6,
        Some("ipv4") => false,
        Some(m) => return Err(bad(IP_FAMILY_MODE, m, "must be dualstack or ipv4")),
    };
    // The application probe proxy port: validated always, excluded inbound unless 0.
    let probe = get(PROBE_PROXY_PORT).unwrap_or(DEFAULT_PROBE_PORT);
    probe
        .parse::<u16>()
        .map_err(|_| bad(PROBE_PROXY_PORT, probe, "must be a port 0-65535 (0: none)"))?;
    // A gateway (`kuma.io/gateway: enabled`) captures outbound and DNS, never inbound.
    s.inbound_enabled = !gateway;
    if !gateway {
        if let Some(v) = get(INBOUND_PORT) {
            s.inbound_port = port(INBOUND_PORT, v)?;
        }
        // kuma-cni appends the probe port to the list's text and parses the result: an empty
        // list is fine with a probe port, an error without one.
        let given = get(EXCLUDE_INBOUND_PORTS).unwrap_or(DEFAULT_EXCLUDED);
        let listed = match (given, probe) {
            ("", "0") => return Err(bad(EXCLUDE_INBOUND_PORTS, given, "is empty")),
            ("", _) => Ports::default(),
            (v, _) => ports(EXCLUDE_INBOUND_PORTS, v)?,
        };
        let probe = match probe {
            "0" => Ports::default(),
            p => ports(PROBE_PROXY_PORT, p)?,
        };
        s.exclude_inbound = s.exclude_inbound.union(&listed).union(&probe);
        if let Some(v) = get(EXCLUDE_INBOUND_IPS) {
            s.inbound_exclude_sources = ips(EXCLUDE_INBOUND_IPS, v)?;
        }
    }
    s.exclude_outbound_ports = match get(EXCLUDE_OUTBOUND_PORTS) {
        Some(v) => ports(EXCLUDE_OUTBOUND_PORTS, v)?,
        None => s
            .exclude_outbound_ports
            .union(&ports("", DEFAULT_EXCLUDED)?),
    };
    if let Some(v) = get(EXCLUDE_OUTBOUND_IPS) {
        s.exclude_ranges = ips(EXCLUDE_OUTBOUND_IPS, v)?;
    }
    if let Some(v) = get(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS) {
        // On purpose: an empty entry (a trailing `;`) adds nothing here. kuma-cni turns it into
        // a rule without an owner match, which exempts all outbound TCP and UDP from capture.
        s.uid_exclusions = v
            .split(';')
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                uid_exclusion(e).map_err(|why| {
                    bad(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, v, &format!("{e:?}: {why}"))
                })
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(v) = get(BUILTIN_DNS) {
        s.capture_dns = enabled(BUILTIN_DNS, v)?;
    }
    if s.capture_dns {
        if let Some(v) = get(BUILTIN_DNS_PORT) {
            s.dns_port = port(BUILTIN_DNS_PORT, v)?;
        }
        // kuma-cni's per-key DNS: capture all, conntrack zones split.
        s.dns_zones = true;
    }
    if let Some(v) = get(DROP_INVALID_PACKETS) {
        s.drop_invalid = enabled(DROP_INVALID_PACKETS, v)?;
    }
    if let Some(v) = get(IPTABLES_LOGS) {
        // Read and checked as kuma-cni does; no LOG rules here (README: Kuma).
        enabled(IPTABLES_LOGS, v)?;
    }
    Ok(Step::Continue)
}

/// A comma list of addresses and CIDRs, both families; empty is an error, as in kuma-cni.
fn ips(name: &str, v: &str) -> Result<super::Cidrs, CniError> {
    if v.trim().is_empty() {
        return Err(bad(name, v, "must list at least one address or CIDR"));
    }
    Ok(lists::cidrs(name, v)?.cidrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multus_network_lists() {
        for yes in [
            "kuma-cni",
            "default/kuma-cni",
            "macvlan, kuma-cni@eth1",
            r#"[{"name":"kuma-cni","namespace":"kuma-system"}]"#,
        ] {
            assert!(selects_kuma_cni(yes), "{yes}");
        }
        for no in [
            "",
            "istio-cni",
            "kuma-cni-x",
            r#"[{"name":"other"}]"#,
            "[not json",
        ] {
            assert!(!selects_kuma_cni(no), "{no}");
        }
    }

    #[test]
    fn kuma_cni_value_rules() {
        assert!(enabled("k", "Enabled").unwrap());
        assert!(!enabled("k", "FALSE").unwrap());
        for b in ["yes", "no", "builtin", "provided", ""] {
            assert_eq!(enabled("k", b).unwrap_err().code, 100, "{b}");
        }
        assert_eq!(port("k", "15006").unwrap(), 15006);
        for b in ["0", " 15006", "15001,15002", "", "70000"] {
            assert!(port("k", b).is_err(), "{b:?}");
        }
        assert_eq!(ports("k", "9901,9001").unwrap(), Ports::of(&[9001, 9901]));
        for b in ["", " 80", "80,", "80-90"] {
            assert!(ports("k", b).is_err(), "{b:?}");
        }
        assert!(port_list_shape("k", " 80, 443").is_ok() && port_list_shape("k", "").is_ok());
        assert!(port_list_shape("k", "http").is_err());
    }
}
