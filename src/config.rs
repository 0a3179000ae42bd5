//! The plugin's own configuration (its conflist entry) and the pod annotations the runtime
//! passes in `runtimeConfig`, read from the stdin network configuration (docs/DESIGN.md §3.7).

use crate::protocol::{CniError, code, json_kind};
pub use crate::values::Annotations;
use crate::values::lists::{self, Ports};
pub use crate::values::profiles::Mesh;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// The `runtimeConfig` key (and capability) under which containerd and CRI-O pass annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// The plugin's keys of its conflist entry, with the mesh profile's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    pub mesh: Mesh,
    pub proxy_uid: u32,
    /// `None`: no rule by the proxy's group.
    pub proxy_gid: Option<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub exclude_namespaces: Vec<String>,
    pub capture_dns: bool,
    pub dns_port: u16,
    /// Capture IPv6 too.
    pub ipv6: bool,
    /// Inbound ports never captured, besides the profile's own.
    pub exclude_inbound_ports: Ports,
    /// Outbound ports not captured unless an annotation replaces the list.
    pub exclude_outbound_ports: Ports,
    pub log_file: Option<PathBuf>,
    pub log_level: LogLevel,
}

impl Default for PluginConfig {
    /// The istio profile's defaults.
    fn default() -> Self {
        PluginConfig::for_mesh(Mesh::Istio)
    }
}

impl PluginConfig {
    /// A profile's defaults.
    pub fn for_mesh(mesh: Mesh) -> PluginConfig {
        let d = &mesh.profile().defaults;
        PluginConfig {
            mesh,
            proxy_uid: d.proxy_uid,
            proxy_gid: d.proxy_gid,
            outbound_port: d.outbound_port,
            inbound_port: d.inbound_port,
            exclude_namespaces: d.exclude_namespaces.iter().map(|s| s.to_string()).collect(),
            capture_dns: false,
            dns_port: d.dns_port,
            ipv6: d.ipv6,
            exclude_inbound_ports: Ports::default(),
            exclude_outbound_ports: Ports::of(d.excluded_outbound),
            log_file: None,
            log_level: LogLevel::Info,
        }
    }
}

fn invalid(key: &str, want: &str, got: &Value) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!(
            "config key {key:?} must be {want}, got {}",
            crate::protocol::truncate(&got.to_string(), 80)
        ),
    )
}

fn get_u32(conf: &Map<String, Value>, key: &str, default: u32) -> Result<u32, CniError> {
    match conf.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid(key, "an integer 0..4294967295", v)),
    }
}

fn get_port(conf: &Map<String, Value>, key: &str, default: u16) -> Result<u16, CniError> {
    match conf.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| invalid(key, "a port number 1..65535", v)),
    }
}

fn get_str<'a>(conf: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match conf.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(invalid(key, "a string", v)),
    }
}

impl PluginConfig {
    /// Reads the plugin's keys from its conflist entry. Unknown keys are ignored (other plugins
    /// and the runtime put their own keys there); a known key with a bad value is code 7.
    pub fn from_conf(conf: &Map<String, Value>) -> Result<PluginConfig, CniError> {
        let mesh = match get_str(conf, "mesh")? {
            None => Mesh::Istio,
            Some(name) => Mesh::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = Mesh::ALL.iter().map(|m| m.name()).collect();
                CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "config key \"mesh\": profile {name:?} is not supported (supported: {})",
                        known.join(", ")
                    ),
                )
            })?,
        };
        let d = PluginConfig::for_mesh(mesh);
        let exclude_namespaces = match conf.get("excludeNamespaces") {
            None => d.exclude_namespaces,
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str().map(str::to_string).ok_or_else(|| {
                        invalid(
                            "excludeNamespaces",
                            "an array of strings",
                            &Value::Array(items.clone()),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(invalid("excludeNamespaces", "an array of strings", v)),
        };
        let capture_dns = get_bool(conf, "captureDNS", d.capture_dns)?;
        if capture_dns && !mesh.profile().defaults.dns {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "config key \"captureDNS\": the {} proxy answers no DNS",
                    mesh.name()
                ),
            ));
        }
        let log_level = match get_str(conf, "logLevel")? {
            None => d.log_level,
            Some("debug") => LogLevel::Debug,
            Some("info") => LogLevel::Info,
            Some("warn") => LogLevel::Warn,
            Some("error") => LogLevel::Error,
            Some(other) => {
                return Err(invalid(
                    "logLevel",
                    "one of \"debug\", \"info\", \"warn\", \"error\"",
                    &Value::String(other.into()),
                ));
            }
        };
        let log_file = match get_str(conf, "logFile")? {
            None | Some("") => None,
            Some(p) if p.starts_with('/') => Some(PathBuf::from(p)),
            Some(p) => {
                return Err(invalid(
                    "logFile",
                    "an absolute path",
                    &Value::String(p.into()),
                ));
            }
        };
        let proxy_gid = match conf.get("proxyGID") {
            None => d.proxy_gid,
            Some(Value::Null) => None,
            Some(_) => Some(get_u32(conf, "proxyGID", 0)?),
        };
        Ok(PluginConfig {
            mesh,
            proxy_uid: get_u32(conf, "proxyUID", d.proxy_uid)?,
            proxy_gid,
            outbound_port: get_port(conf, "outboundPort", d.outbound_port)?,
            inbound_port: get_port(conf, "inboundPort", d.inbound_port)?,
            exclude_namespaces,
            capture_dns,
            dns_port: get_port(conf, "dnsPort", d.dns_port)?,
            ipv6: get_bool(conf, "ipv6", d.ipv6)?,
            exclude_inbound_ports: get_ports(conf, "excludeInboundPorts", d.exclude_inbound_ports)?,
            exclude_outbound_ports: get_ports(
                conf,
                "excludeOutboundPorts",
                d.exclude_outbound_ports,
            )?,
            log_file,
            log_level,
        })
    }
}

fn get_bool(conf: &Map<String, Value>, key: &str, default: bool) -> Result<bool, CniError> {
    match conf.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(invalid(key, "true or false", v)),
    }
}

/// A port list key: an array of ports (numbers) and `"LOW-HIGH"` ranges (strings).
fn get_ports(conf: &Map<String, Value>, key: &str, default: Ports) -> Result<Ports, CniError> {
    let want = "an array of ports 1..65535 and \"LOW-HIGH\" ranges";
    match conf.get(key) {
        None => Ok(default),
        Some(Value::Array(items)) => {
            let mut text = Vec::new();
            for i in items {
                match i {
                    Value::Number(n) => text.push(n.to_string()),
                    Value::String(s) => text.push(s.clone()),
                    _ => return Err(invalid(key, want, &Value::Array(items.clone()))),
                }
            }
            lists::ports(key, &text.join(","), true)
                .map_err(|_| invalid(key, want, &Value::Array(items.clone())))
        }
        Some(v) => Err(invalid(key, want, v)),
    }
}

/// Where the plugin sends its per-invocation event (`eventSocket`: an absolute path; anything
/// else, or the key absent, sends nothing).
pub fn event_socket(conf: &Map<String, Value>) -> Option<String> {
    conf.get("eventSocket")
        .and_then(Value::as_str)
        .filter(|p| p.starts_with('/') && p.len() < 108)
        .map(str::to_string)
}

/// The pod annotations the runtime passed, or `None` when it passed none at all (the key is
/// absent: the conflist entry lacks the capability, or the runtime does not support it).
pub fn pod_annotations(conf: &Map<String, Value>) -> Result<Option<Annotations>, CniError> {
    let runtime = match conf.get("runtimeConfig") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("runtimeConfig must be an object, got {}", json_kind(v)),
            ));
        }
    };
    let raw = match runtime.get(ANNOTATIONS_CAPABILITY) {
        None => return Ok(None),
        // containerd sends the capability with `null` for a pod without annotations (a nil Go
        // map): the runtime supports it, and the pod has none.
        Some(Value::Null) => return Ok(Some(Annotations::new())),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "runtimeConfig[{ANNOTATIONS_CAPABILITY:?}] must be an object, got {}",
                    json_kind(v)
                ),
            ));
        }
    };
    raw.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "pod annotation {k:?} in runtimeConfig must be a string, got {}",
                    json_kind(other)
                ),
            )),
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn defaults_are_the_istio_profile() {
        let c = PluginConfig::from_conf(&obj(json!({"type": "mesh-redirect"}))).unwrap();
        assert_eq!(c, PluginConfig::default());
        assert_eq!((c.proxy_uid, c.proxy_gid), (1337, Some(1337)));
        assert_eq!((c.outbound_port, c.inbound_port), (15001, 15006));
        assert_eq!(c.exclude_namespaces, vec!["kube-system"]);
        assert_eq!((c.capture_dns, c.dns_port), (false, 15053));
    }

    #[test]
    fn every_key_overrides() {
        let c = PluginConfig::from_conf(&obj(json!({
            "mesh": "istio", "proxyUID": 1000, "proxyGID": 2000, "outboundPort": 1,
            "inboundPort": 65535, "excludeNamespaces": ["a", "b"], "captureDNS": true,
            "dnsPort": 5353, "logFile": "/var/log/x.log", "logLevel": "debug"
        })))
        .unwrap();
        assert_eq!((c.proxy_uid, c.proxy_gid), (1000, Some(2000)));
        assert_eq!((c.outbound_port, c.inbound_port), (1, 65535));
        assert_eq!(c.exclude_namespaces, vec!["a", "b"]);
        assert!(c.capture_dns);
        assert_eq!(c.dns_port, 5353);
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/x.log")));
        assert_eq!(c.log_level, LogLevel::Debug);
    }

    #[test]
    fn profiles_bring_their_defaults_and_the_entry_overrides_them() {
        let c = PluginConfig::from_conf(&obj(json!({"mesh": "linkerd"}))).unwrap();
        assert_eq!(c.mesh, Mesh::Linkerd);
        assert_eq!((c.proxy_uid, c.proxy_gid), (2102, None));
        assert_eq!((c.outbound_port, c.inbound_port), (4140, 4143));
        assert!(!c.ipv6 && c.exclude_outbound_ports.is_empty());
        let c = PluginConfig::from_conf(&obj(json!({"mesh": "linkerd", "ipv6": true,
            "proxyGID": 2103, "excludeOutboundPorts": [443, "6000-6010"]})))
        .unwrap();
        assert!(c.ipv6);
        assert_eq!(c.proxy_gid, Some(2103));
        assert_eq!(
            c.exclude_outbound_ports.ranges(),
            &[(443, 443), (6000, 6010)]
        );
        let c = PluginConfig::from_conf(&obj(json!({"mesh": "kuma"}))).unwrap();
        assert_eq!((c.proxy_uid, c.proxy_gid), (5678, None));
        assert_eq!(
            (c.outbound_port, c.inbound_port, c.dns_port),
            (15001, 15006, 15053)
        );
        let c = PluginConfig::from_conf(&obj(json!({"proxyGID": null}))).unwrap();
        assert_eq!(c.proxy_gid, None);
    }

    #[test]
    fn bad_values_are_code_7_naming_the_key() {
        for (conf, key) in [
            (json!({"proxyUID": -1}), "proxyUID"),
            (json!({"proxyGID": "1337"}), "proxyGID"),
            (json!({"outboundPort": 0}), "outboundPort"),
            (json!({"inboundPort": 70000}), "inboundPort"),
            (json!({"dnsPort": 1.5}), "dnsPort"),
            (
                json!({"excludeNamespaces": "kube-system"}),
                "excludeNamespaces",
            ),
            (json!({"excludeNamespaces": [1]}), "excludeNamespaces"),
            (json!({"captureDNS": "yes"}), "captureDNS"),
            (json!({"logLevel": "loud"}), "logLevel"),
            (json!({"logFile": "relative.log"}), "logFile"),
            (json!({"mesh": "consul"}), "mesh"),
            (json!({"mesh": "linkerd", "captureDNS": true}), "captureDNS"),
            (json!({"ipv6": "yes"}), "ipv6"),
            (json!({"excludeOutboundPorts": [0]}), "excludeOutboundPorts"),
            (json!({"excludeInboundPorts": "80"}), "excludeInboundPorts"),
        ] {
            let e = PluginConfig::from_conf(&obj(conf.clone())).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{conf}");
            assert!(e.msg.contains(key), "{conf}: {}", e.msg);
        }
    }

    #[test]
    fn annotations_present_absent_and_malformed() {
        assert_eq!(pod_annotations(&obj(json!({}))).unwrap(), None);
        assert_eq!(
            pod_annotations(&obj(json!({"runtimeConfig": {}}))).unwrap(),
            None
        );
        let a = pod_annotations(&obj(json!({"runtimeConfig": {
            "io.kubernetes.cri.pod-annotations": {"a": "1"}}})))
        .unwrap()
        .unwrap();
        assert_eq!(a.get("a").map(String::as_str), Some("1"));
        let empty = pod_annotations(&obj(json!({"runtimeConfig": {
            "io.kubernetes.cri.pod-annotations": {}}})))
        .unwrap();
        assert_eq!(empty, Some(Annotations::new()));
        // containerd 1.6 sends null for a pod without annotations: present, and empty.
        let null = pod_annotations(&obj(json!({"runtimeConfig": {
            "io.kubernetes.cri.pod-annotations": null}})))
        .unwrap();
        assert_eq!(null, Some(Annotations::new()));
        for bad in [
            json!({"runtimeConfig": []}),
            json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": "x"}}),
            json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"a": 1}}}),
        ] {
            assert_eq!(
                pod_annotations(&obj(bad)).unwrap_err().code,
                code::INVALID_CONFIG
            );
        }
    }
}
