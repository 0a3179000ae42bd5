//! The CNI config files a node has, and the edits that chain mesh-redirect into one: pure JSON,
//! no I/O, unit-tested.

use crate::config::ANNOTATIONS_CAPABILITY;
use serde_json::{Map, Value, json};

/// The plugin `type` of our entry.
pub const TYPE: &str = "mesh-redirect";

/// What a config file holds, as the runtime would read it.
#[derive(Debug, Clone, PartialEq)]
pub enum Conf {
    /// A `.conflist` (or a `.json` with `plugins`).
    List(Map<String, Value>),
    /// A single-plugin `.conf` (or `.json`).
    Single(Map<String, Value>),
}

/// Why a file is not a usable network config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("a conflist needs a \"name\"")]
    ListWithoutName,
    #[error("a conflist needs a \"plugins\" array")]
    NoPlugins,
    #[error("\"plugins\" is empty")]
    EmptyPlugins,
    #[error("every plugin needs a \"type\"")]
    PluginWithoutType,
    #[error("a single-plugin config needs a \"type\"")]
    NoType,
    #[error("a network config needs a \"name\"")]
    NoName,
}

/// What `bytes` hold as a network config, or why they are not one.
pub fn parse(bytes: &[u8], is_list_file: bool) -> Result<Conf, ConfError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| ConfError::Json(e.to_string()))?;
    let Value::Object(m) = v else {
        return Err(ConfError::NotObject);
    };
    if is_list_file || m.contains_key("plugins") {
        if !has_str(&m, "name") {
            return Err(ConfError::ListWithoutName);
        }
        let plugins = m
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or(ConfError::NoPlugins)?;
        if plugins.is_empty() {
            return Err(ConfError::EmptyPlugins);
        }
        if !plugins.iter().all(|p| {
            p.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| !t.is_empty())
        }) {
            return Err(ConfError::PluginWithoutType);
        }
        Ok(Conf::List(m))
    } else {
        if !has_str(&m, "type") {
            return Err(ConfError::NoType);
        }
        // Its name becomes the list's, which runtimes require.
        if !has_str(&m, "name") {
            return Err(ConfError::NoName);
        }
        Ok(Conf::Single(m))
    }
}

/// Whether `m[key]` is a non-empty string.
fn has_str(m: &Map<String, Value>, key: &str) -> bool {
    m.get(key)
        .and_then(Value::as_str)
        .is_some_and(|v| !v.is_empty())
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(TYPE)
}

/// Our conflist entry: the operator's plugin config (if any) with `type` and the annotations
/// capability forced, so a config file can never leave pods silently uncaptured.
pub fn entry(plugin_config: Option<&Map<String, Value>>) -> Value {
    let mut e = plugin_config.cloned().unwrap_or_default();
    e.insert("type".into(), json!(TYPE));
    let caps = e.entry("capabilities").or_insert_with(|| json!({}));
    if !caps.is_object() {
        *caps = json!({});
    }
    if let Some(c) = caps.as_object_mut() {
        c.insert(ANNOTATIONS_CAPABILITY.into(), json!(true));
    }
    Value::Object(e)
}

/// The list form of a config (a single-plugin one becomes a one-plugin list).
pub fn as_list(c: &Conf) -> Map<String, Value> {
    match c {
        Conf::List(m) => m.clone(),
        Conf::Single(m) => {
            let mut plugin = m.clone();
            let mut list = Map::new();
            for key in ["cniVersion", "name"] {
                if let Some(v) = plugin.remove(key) {
                    list.insert(key.into(), v);
                }
            }
            list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
            list
        }
    }
}

/// Other meshes' capture plugins, by their `type`: with one of them in the chain we join, new
/// pods get two capture layers.
pub const MESH_CNI_TYPES: [&str; 3] = ["istio-cni", "linkerd-cni", "kuma-cni"];

/// The plugin types of a list, in order.
pub fn types(list: &Map<String, Value>) -> Vec<String> {
    list.get("plugins")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.get("type").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// True if `list` ends with exactly `entry` and has no other entry of ours.
pub fn is_chained(list: &Map<String, Value>, entry: &Value) -> bool {
    let plugins = list
        .get("plugins")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    plugins.last() == Some(entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1
}

/// Whether `list` has any entry of ours.
pub fn has_ours(list: &Map<String, Value>) -> bool {
    list.get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|p| p.iter().any(is_ours))
}

/// `list` without our entries.
pub fn unchain(list: &Map<String, Value>) -> Map<String, Value> {
    let mut out = list.clone();
    if let Some(Value::Array(p)) = out.get_mut("plugins") {
        p.retain(|x| !is_ours(x));
    }
    out
}

/// `list` with older entries of ours removed and `entry` appended last.
pub fn chain(list: &Map<String, Value>, entry: &Value) -> Map<String, Value> {
    let mut out = unchain(list);
    if let Some(Value::Array(p)) = out.get_mut("plugins") {
        p.push(entry.clone());
    }
    out
}

/// The JSON text we write: two-space indented, newline-terminated.
pub fn render(list: &Map<String, Value>) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(list).unwrap_or_default();
    s.push(b'\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn parse_accepts_lists_and_singles_and_names_problems() {
        let l = br#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#;
        assert!(matches!(parse(l, true).unwrap(), Conf::List(_)));
        assert!(
            matches!(parse(l, false).unwrap(), Conf::List(_)),
            "a .json with plugins is a list"
        );
        let c = br#"{"cniVersion":"0.4.0","name":"k8s","type":"bridge"}"#;
        assert!(matches!(parse(c, false).unwrap(), Conf::Single(_)));
        for (bad, list, why) in [
            (&b"{"[..], false, "JSON"),
            (b"[]", false, "object"),
            (br#"{"plugins":[{"type":"x"}]}"#, true, "name"),
            (br#"{"name":"n","plugins":[]}"#, true, "empty"),
            (br#"{"name":"n","plugins":[{}]}"#, true, "type"),
            (br#"{"name":"n"}"#, false, "type"),
            (br#"{"type":"bridge"}"#, false, "name"),
            (br#"{"name":"n","type":"bridge"}"#, true, "plugins"),
        ] {
            let e = parse(bad, list).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn entry_forces_type_and_capability() {
        let e = entry(None);
        assert_eq!(
            e,
            json!({"type": "mesh-redirect", "capabilities": {"io.kubernetes.cri.pod-annotations": true}})
        );
        let cfg =
            obj(json!({"type": "other", "proxyUID": 7, "capabilities": {"portMappings": true}}));
        let e = entry(Some(&cfg));
        assert_eq!(e["type"], "mesh-redirect");
        assert_eq!(e["proxyUID"], 7);
        assert_eq!(e["capabilities"]["portMappings"], true);
        assert_eq!(e["capabilities"]["io.kubernetes.cri.pod-annotations"], true);
        let e = entry(Some(&obj(json!({"capabilities": "nonsense"}))));
        assert_eq!(e["capabilities"]["io.kubernetes.cri.pod-annotations"], true);
    }

    #[test]
    fn single_becomes_a_list_keeping_name_and_version() {
        let c = parse(
            br#"{"cniVersion":"0.4.0","name":"k8s","type":"bridge","bridge":"cni0"}"#,
            false,
        )
        .unwrap();
        let l = as_list(&c);
        assert_eq!(l["name"], "k8s");
        assert_eq!(l["cniVersion"], "0.4.0");
        assert_eq!(l["plugins"], json!([{"type": "bridge", "bridge": "cni0"}]));
    }

    #[test]
    fn chain_replaces_older_entries_and_goes_last() {
        let e = entry(None);
        let l = obj(json!({"name": "k8s", "plugins": [
            {"type": "bridge"}, {"type": "mesh-redirect", "old": true}, {"type": "portmap"}]}));
        assert!(!is_chained(&l, &e));
        assert!(has_ours(&l));
        let c = chain(&l, &e);
        assert_eq!(c["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(c["plugins"][1]["type"], "portmap");
        assert!(is_chained(&c, &e));
        assert_eq!(chain(&c, &e), c, "idempotent");
        let u = unchain(&c);
        assert_eq!(
            u["plugins"],
            json!([{"type": "bridge"}, {"type": "portmap"}])
        );
        assert!(!has_ours(&u));
        // A different entry (new config) is not "chained" until rewritten.
        let other = entry(Some(&obj(json!({"proxyUID": 1}))));
        assert!(!is_chained(&c, &other));
    }

    #[test]
    fn render_keeps_key_order() {
        let l = obj(json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]}));
        let text = String::from_utf8(render(&l)).unwrap();
        assert!(text.find("cniVersion").unwrap() < text.find("plugins").unwrap());
        assert!(text.ends_with("}\n"));
    }
}
