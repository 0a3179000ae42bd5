//! The plugin's own configuration (its conflist entry) and the pod annotations the runtime
//! passes in `runtimeConfig`, read from the stdin network configuration (SPEC §3).

use crate::protocol::{CniError, code, json_kind};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The `runtimeConfig` key (and capability) under which containerd and CRI-O pass annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// Pod annotations, name → value.
pub type Annotations = BTreeMap<String, String>;

/// Which mesh's annotation names and defaults apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mesh {
    Istio,
}

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
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub exclude_namespaces: Vec<String>,
    pub capture_dns: bool,
    pub dns_port: u16,
    pub log_file: Option<PathBuf>,
    pub log_level: LogLevel,
}

impl Default for PluginConfig {
    /// The istio profile's defaults.
    fn default() -> Self {
        PluginConfig {
            mesh: Mesh::Istio,
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_namespaces: vec!["kube-system".to_string()],
            capture_dns: false,
            dns_port: 15053,
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
        let d = PluginConfig::default();
        let mesh = match get_str(conf, "mesh")? {
            None | Some("istio") => Mesh::Istio,
            Some(other) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "config key \"mesh\": profile {other:?} is not supported (supported: \"istio\")"
                    ),
                ));
            }
        };
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
        let capture_dns = match conf.get("captureDNS") {
            None => d.capture_dns,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(invalid("captureDNS", "true or false", v)),
        };
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
        Ok(PluginConfig {
            mesh,
            proxy_uid: get_u32(conf, "proxyUID", d.proxy_uid)?,
            proxy_gid: get_u32(conf, "proxyGID", d.proxy_gid)?,
            outbound_port: get_port(conf, "outboundPort", d.outbound_port)?,
            inbound_port: get_port(conf, "inboundPort", d.inbound_port)?,
            exclude_namespaces,
            capture_dns,
            dns_port: get_port(conf, "dnsPort", d.dns_port)?,
            log_file,
            log_level,
        })
    }
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
        assert_eq!((c.proxy_uid, c.proxy_gid), (1337, 1337));
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
        assert_eq!((c.proxy_uid, c.proxy_gid), (1000, 2000));
        assert_eq!((c.outbound_port, c.inbound_port), (1, 65535));
        assert_eq!(c.exclude_namespaces, vec!["a", "b"]);
        assert!(c.capture_dns);
        assert_eq!(c.dns_port, 5353);
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/x.log")));
        assert_eq!(c.log_level, LogLevel::Debug);
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
            (json!({"mesh": "linkerd"}), "mesh"),
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
