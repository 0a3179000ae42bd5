//! The CNI protocol, written in-house: verbs, versions, the environment, the stdin network
//! configuration, error JSON and the pass-through of `prevResult` (CNI spec 0.3.0 to 1.1.0).
//!
//! Nothing here touches the kernel; everything is unit-tested below.

use serde_json::{Map, Value, json};
use std::fmt;

/// Versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest supported version; used when no other version is known.
pub const LATEST: &str = "1.1.0";
/// Upper bound on what we read from stdin: a conflist entry with 10,000 CIDRs in an
/// annotation is well under 1 MiB, so this only stops a runaway writer.
pub const MAX_STDIN: usize = 8 << 20;

/// Error codes: CNI's well-known ones and the plugin's own (docs/DESIGN.md §4).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    /// CNI 1.1 STATUS: the plugin cannot serve ADDs now.
    pub const NOT_AVAILABLE: u32 = 50;
    pub const BAD_ANNOTATION: u32 = 100;
    pub const NETNS: u32 = 101;
    pub const KERNEL: u32 = 102;
    /// A bug: a panic caught before it could reach the runtime.
    pub const INTERNAL: u32 = 199;
}

/// A CNI error, printed as the spec's error JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

/// The CNI verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    /// The first version in which the verb exists.
    fn min_version(self) -> &'static str {
        match self {
            Command::Check => "0.4.0",
            Command::Gc | Command::Status => "1.1.0",
            _ => "0.3.0",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `major.minor.patch` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(u32, u32, u32);

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.split('.').map(|p| p.parse::<u32>().ok());
        let v = Version(it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(v)
    }
}

fn is_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// The `CNI_*` environment of one invocation, validated the way the reference plugins' `skel`
/// validates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// May be empty for DEL (the runtime may call DEL after the netns is gone).
    pub netns: String,
    pub ifname: String,
    pub args: Vec<(String, String)>,
    pub path: String,
}

impl Env {
    /// Reads and validates the environment through `get` (normally `std::env::var`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let raw = get("CNI_COMMAND").unwrap_or_default();
        let command = Command::parse(&raw).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND {raw:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"),
            )
        })?;
        let var = |k: &str| get(k).unwrap_or_default();
        let env = Env {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: parse_cni_args(&var("CNI_ARGS"))?,
            path: var("CNI_PATH"),
        };
        env.validate()?;
        Ok(env)
    }

    fn validate(&self) -> Result<(), CniError> {
        use Command::*;
        let needs = |cmds: &[Command]| cmds.contains(&self.command);
        let mut missing = Vec::new();
        if needs(&[Add, Del, Check]) && self.container_id.is_empty() {
            missing.push("CNI_CONTAINERID");
        }
        if needs(&[Add, Check]) && self.netns.is_empty() {
            missing.push("CNI_NETNS");
        }
        if needs(&[Add, Del, Check]) && self.ifname.is_empty() {
            missing.push("CNI_IFNAME");
        }
        if needs(&[Add, Del, Check]) && self.path.is_empty() {
            missing.push("CNI_PATH");
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "required environment variables missing: {}",
                    missing.join(", ")
                ),
            ));
        }
        if !self.container_id.is_empty() && !valid_container_id(&self.container_id) {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_CONTAINERID has invalid characters (allowed: letters, digits, '_', '.', '-', not first)",
            )
            .with_details(truncate(&self.container_id, 128)));
        }
        if !self.ifname.is_empty() {
            valid_ifname(&self.ifname).map_err(|why| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_IFNAME {:?} {why}", self.ifname),
                )
            })?;
        }
        Ok(())
    }

    /// A `CNI_ARGS` value by key (e.g. `K8S_POD_NAME`).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_cni_args(s: &str) -> Result<Vec<(String, String)>, CniError> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {:?} is not KEY=VALUE", truncate(pair, 64)),
            )),
        })
        .collect()
}

fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Whether a CNI result (any version) gives the pod an IPv6 address: `ips[].address` in CIDR
/// form (0.3.0 and later). A malformed result counts as none.
pub fn result_has_ipv6(result: &Value) -> bool {
    result
        .get("ips")
        .and_then(Value::as_array)
        .is_some_and(|ips| {
            ips.iter().any(|ip| {
                ip.get("address")
                    .and_then(Value::as_str)
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                    .is_some_and(|a| a.is_ipv6())
            })
        })
}

/// Linux interface-name rules (what `dev_valid_name` accepts).
pub fn valid_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("is empty")
    } else if name.len() > 15 {
        Err("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Err("is not a valid interface name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Err("contains '/', ':', whitespace or a control character")
    } else if name.contains(['"', '\\']) {
        // The kernel would take them, but no real interface has them, and nft text cannot
        // quote them.
        Err("contains a quote or a backslash")
    } else {
        Ok(())
    }
}

/// Shortens `s` to at most `max` bytes (on a char boundary) for messages and logs.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &s[..end], s.len())
}

/// Parses stdin as a JSON object (the network configuration).
pub fn parse_stdin(bytes: &[u8]) -> Result<Map<String, Value>, CniError> {
    if bytes.len() > MAX_STDIN {
        return Err(CniError::new(
            code::DECODE,
            format!(
                "network configuration on stdin is larger than {} MiB",
                MAX_STDIN >> 20
            ),
        ));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(CniError::new(
            code::DECODE,
            format!(
                "network configuration on stdin must be a JSON object, got {}",
                json_kind(&other)
            ),
        )),
        Err(e) => Err(CniError::new(
            code::DECODE,
            format!("network configuration on stdin is not valid JSON: {e}"),
        )),
    }
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The version to speak for this configuration: `cniVersion` if present, otherwise the highest
/// entry of CNI 1.1's `cniVersions` that we support. Also rejects verbs the version lacks.
pub fn negotiate_version(conf: &Map<String, Value>, cmd: Command) -> Result<String, CniError> {
    let version = match (conf.get("cniVersion"), conf.get("cniVersions")) {
        (Some(Value::String(v)), _) => v.clone(),
        (Some(other), _) => {
            return Err(CniError::new(
                code::DECODE,
                format!("cniVersion must be a string, got {}", json_kind(other)),
            ));
        }
        (None, Some(Value::Array(list))) => {
            let best = list
                .iter()
                .filter_map(Value::as_str)
                .filter(|v| is_supported(v))
                .max_by_key(|v| Version::parse(v));
            match best {
                Some(v) => v.to_string(),
                None => {
                    return Err(CniError::new(
                        code::INCOMPATIBLE_VERSION,
                        format!(
                            "none of cniVersions {} is supported (supported: {})",
                            Value::Array(list.clone()),
                            SUPPORTED_VERSIONS.join(", ")
                        ),
                    ));
                }
            }
        }
        (None, _) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "network configuration has no cniVersion",
            ));
        }
    };
    if !is_supported(&version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI versions: config is {version:?}, plugin supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if Version::parse(&version) < Version::parse(cmd.min_version()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "config version {version} does not allow {cmd} (needs {} or later)",
                cmd.min_version()
            ),
        ));
    }
    Ok(version)
}

/// The VERSION verb's answer.
pub fn version_info() -> Value {
    json!({ "cniVersion": LATEST, "supportedVersions": SUPPORTED_VERSIONS })
}

/// 0.3.x and 0.4.0 results carry `ips[].version`; 1.x results do not.
fn has_ip_version_field(v: &str) -> bool {
    Version::parse(v) < Version::parse("1.0.0")
}

/// Returns `prevResult` as this plugin's result in `version`. A chained plugin that does not
/// change the result passes it through unchanged; only the shape differences between 0.x and
/// 1.x results are converted, as libcni's `types.PrintResult` would.
pub fn pass_through_result(prev: &Value, version: &str) -> Result<Value, CniError> {
    let Value::Object(obj) = prev else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("prevResult must be an object, got {}", json_kind(prev)),
        ));
    };
    let from = match obj.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        None => version.to_string(),
        Some(other) => {
            return Err(CniError::new(
                code::DECODE,
                format!(
                    "prevResult.cniVersion must be a string, got {}",
                    json_kind(other)
                ),
            ));
        }
    };
    if obj.contains_key("ip4") || obj.contains_key("ip6") || !is_supported(&from) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("prevResult version {from:?} cannot be converted to {version}"),
        ));
    }
    let mut out = obj.clone();
    out.insert("cniVersion".into(), Value::String(version.to_string()));
    match (has_ip_version_field(&from), has_ip_version_field(version)) {
        (true, false) => for_each_ip(&mut out, |ip| {
            ip.remove("version");
        }),
        (false, true) => for_each_ip(&mut out, |ip| {
            let v6 = ip
                .get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| a.contains(':'));
            ip.insert("version".into(), json!(if v6 { "6" } else { "4" }));
        }),
        _ => {}
    }
    Ok(Value::Object(out))
}

fn for_each_ip(result: &mut Map<String, Value>, mut f: impl FnMut(&mut Map<String, Value>)) {
    if let Some(Value::Array(ips)) = result.get_mut("ips") {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            f(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    const FULL: [(&str, &str); 6] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ),
    ];

    fn with(over: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = FULL
            .iter()
            .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
            .copied()
            .collect();
        v.extend(over.iter().filter(|(_, val)| !val.is_empty()).copied());
        v
    }

    #[test]
    fn env_parses_all_fields_and_args() {
        let env = env_of(&FULL).unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.arg("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(env.arg("K8S_POD_NAMESPACE"), Some("default"));
        assert_eq!(env.arg("nope"), None);
    }

    #[test]
    fn env_every_command_parses() {
        for c in ["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"] {
            let env = env_of(&with(&[("CNI_COMMAND", c)])).unwrap();
            assert_eq!(env.command.as_str(), c);
        }
    }

    #[test]
    fn env_unknown_or_missing_command_is_code_4() {
        for c in ["", "add", "UPDATE"] {
            let e = env_of(&with(&[("CNI_COMMAND", c)])).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{c}");
            assert!(e.msg.contains("CNI_COMMAND"));
        }
    }

    #[test]
    fn env_missing_vars_named() {
        let e = env_of(&with(&[("CNI_NETNS", ""), ("CNI_IFNAME", "")])).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(
            e.msg.contains("CNI_NETNS") && e.msg.contains("CNI_IFNAME"),
            "{e}"
        );
    }

    #[test]
    fn env_del_may_have_empty_netns_version_needs_nothing() {
        env_of(&with(&[("CNI_COMMAND", "DEL"), ("CNI_NETNS", "")])).unwrap();
        env_of(&[("CNI_COMMAND", "VERSION")]).unwrap();
        env_of(&[("CNI_COMMAND", "STATUS")]).unwrap();
        env_of(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")]).unwrap();
    }

    #[test]
    fn env_rejects_bad_container_id_ifname_args() {
        for id in ["-abc", "a b", "a/b", "ä"] {
            let e = env_of(&with(&[("CNI_CONTAINERID", id)])).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{id}");
        }
        for ifn in ["this-name-is-way-too-long", "a/b", "a:b", "a b", ".", ".."] {
            let e = env_of(&with(&[("CNI_IFNAME", ifn)])).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{ifn}");
            assert!(e.msg.contains("CNI_IFNAME"));
        }
        let e = env_of(&with(&[("CNI_ARGS", "K8S_POD_NAME")])).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        // Empty segments are tolerated, as libcni produces trailing ';' sometimes.
        let env = env_of(&with(&[("CNI_ARGS", "A=1;;B=;")])).unwrap();
        assert_eq!(env.arg("B"), Some(""));
    }

    fn conf(s: &str) -> Map<String, Value> {
        parse_stdin(s.as_bytes()).unwrap()
    }

    #[test]
    fn stdin_errors_are_decode_errors() {
        for bad in ["", "{", "[]", "42", "null", "{\"a\":}"] {
            assert_eq!(
                parse_stdin(bad.as_bytes()).unwrap_err().code,
                code::DECODE,
                "{bad}"
            );
        }
        let huge = vec![b' '; MAX_STDIN + 1];
        let e = parse_stdin(&huge).unwrap_err();
        assert_eq!(e.code, code::DECODE);
        assert!(e.msg.contains("larger than"));
    }

    #[test]
    fn every_supported_version_negotiates_for_add_and_del() {
        for v in SUPPORTED_VERSIONS {
            let c = conf(&format!(r#"{{"cniVersion":"{v}"}}"#));
            assert_eq!(negotiate_version(&c, Command::Add).unwrap(), v);
            assert_eq!(negotiate_version(&c, Command::Del).unwrap(), v);
        }
    }

    #[test]
    fn check_needs_040_gc_status_need_110() {
        for (v, check_ok, gc_ok) in [
            ("0.3.0", false, false),
            ("0.3.1", false, false),
            ("0.4.0", true, false),
            ("1.0.0", true, false),
            ("1.1.0", true, true),
        ] {
            let c = conf(&format!(r#"{{"cniVersion":"{v}"}}"#));
            assert_eq!(
                negotiate_version(&c, Command::Check).is_ok(),
                check_ok,
                "{v}"
            );
            for cmd in [Command::Gc, Command::Status] {
                let r = negotiate_version(&c, cmd);
                assert_eq!(r.is_ok(), gc_ok, "{v} {cmd}");
                if let Err(e) = r {
                    assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
                }
            }
        }
    }

    #[test]
    fn unsupported_version_is_code_1() {
        for v in ["0.2.0", "0.1.0", "2.0.0", "1.0", "banana"] {
            let e = negotiate_version(&conf(&format!(r#"{{"cniVersion":"{v}"}}"#)), Command::Add)
                .unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{v}");
            assert!(e.msg.contains(v));
        }
        let e = negotiate_version(&conf(r#"{"cniVersion":1}"#), Command::Add).unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let e = negotiate_version(&conf(r#"{}"#), Command::Add).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn cni_versions_list_picks_highest_supported() {
        let c = conf(r#"{"cniVersions":["0.4.0","1.0.0","9.9.9"]}"#);
        assert_eq!(negotiate_version(&c, Command::Add).unwrap(), "1.0.0");
        let c = conf(r#"{"cniVersions":["9.9.9"]}"#);
        assert_eq!(
            negotiate_version(&c, Command::Add).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        // An explicit cniVersion (what libcni sends to the plugin) wins.
        let c = conf(r#"{"cniVersion":"0.4.0","cniVersions":["1.1.0"]}"#);
        assert_eq!(negotiate_version(&c, Command::Add).unwrap(), "0.4.0");
    }

    #[test]
    fn version_info_lists_all() {
        let v = version_info();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn error_json_shape() {
        let e = CniError::new(100, "bad").with_details("d");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion":"1.0.0","code":100,"msg":"bad","details":"d"})
        );
        assert!(
            CniError::new(4, "x")
                .to_json("0.3.1")
                .get("details")
                .is_none()
        );
    }

    #[test]
    fn pass_through_same_version_is_unchanged() {
        let prev = json!({"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],
            "ips":[{"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":0}],
            "routes":[{"dst":"0.0.0.0/0"}],"dns":{}});
        assert_eq!(pass_through_result(&prev, "1.0.0").unwrap(), prev);
        let prev = json!({"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.5/24"}]});
        assert_eq!(pass_through_result(&prev, "0.3.1").unwrap(), prev);
    }

    #[test]
    fn pass_through_converts_between_0x_and_1x() {
        let prev = json!({"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.0.5/24"},
            {"version":"6","address":"fd00::5/64"}]});
        let out = pass_through_result(&prev, "1.1.0").unwrap();
        assert_eq!(out["cniVersion"], "1.1.0");
        assert!(out["ips"][0].get("version").is_none());
        let back = pass_through_result(&out, "0.3.0").unwrap();
        assert_eq!(back["ips"][0]["version"], "4");
        assert_eq!(back["ips"][1]["version"], "6");
        // 0.3.x <-> 0.4.0 share a shape: only the version string changes.
        let out = pass_through_result(&prev, "0.3.1").unwrap();
        assert_eq!(out["ips"], prev["ips"]);
    }

    #[test]
    fn pass_through_keeps_numbers_exactly() {
        let text = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mtu":1500}],"x":0.1000000000000000055511151231257827,"big":123456789012345678901234567890}"#;
        let prev: Value = serde_json::from_str(text).unwrap();
        let out = pass_through_result(&prev, "1.0.0").unwrap();
        assert_eq!(out.to_string(), text);
    }

    #[test]
    fn pass_through_rejects_non_objects_and_legacy() {
        assert_eq!(
            pass_through_result(&json!([]), "1.0.0").unwrap_err().code,
            code::INVALID_CONFIG
        );
        let legacy = json!({"cniVersion":"0.2.0","ip4":{"ip":"10.0.0.2/24"}});
        assert_eq!(
            pass_through_result(&legacy, "1.0.0").unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        let t = truncate("ääää", 3);
        assert!(t.starts_with('ä') && t.contains("8 bytes"), "{t}");
    }
}
