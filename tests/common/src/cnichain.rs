//! A minimal libcni: runs a conflist's plugin chain the way container runtimes do (the order,
//! the per-plugin config with `name`, `cniVersion`, `prevResult` and capability-driven
//! `runtimeConfig`, the `CNI_*` environment, DEL in reverse with the cached result).
//! Shared by the tests and `examples/cnitool.rs`.

use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What the runtime knows about one attachment.
#[derive(Debug, Clone, Default)]
pub struct Attachment {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` pairs.
    pub args: Vec<(String, String)>,
    /// Capability arguments (`CAP_ARGS` in cnitool), e.g. the pod annotations.
    pub cap_args: Map<String, Value>,
}

/// Where plugins are found and how they are run.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub cni_path: Vec<PathBuf>,
    /// Run every plugin inside this named netns (`ip netns exec`), as a node runtime would
    /// from the host's namespace. `None`: run in ours.
    pub exec_netns: Option<String>,
}

/// A plugin's failure: exit status and its stdout (the CNI error JSON, when it wrote one).
#[derive(Debug, Clone)]
pub struct PluginError {
    pub plugin: String,
    pub stdout: String,
    pub stderr: String,
    /// The error JSON, when the plugin printed one (boxed: keeps `Result`s small).
    pub json: Option<Box<Value>>,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plugin {} failed: {} {}",
            self.plugin,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

impl Runtime {
    pub fn find(&self, plugin: &str) -> Option<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
    }

    /// Execs one plugin with `conf` on stdin.
    pub fn exec(
        &self,
        command: &str,
        conf: &Value,
        att: &Attachment,
    ) -> Result<Option<Value>, PluginError> {
        let plugin = conf
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let fail = |stdout: String, stderr: String| PluginError {
            plugin: plugin.clone(),
            json: serde_json::from_str(&stdout).ok().map(Box::new),
            stdout,
            stderr,
        };
        let path = self
            .find(&plugin)
            .ok_or_else(|| fail(String::new(), format!("{plugin} not found in CNI_PATH")))?;
        let mut cmd = match &self.exec_netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let cni_path = std::env::join_paths(&self.cni_path).unwrap_or_default();
        let args: Vec<String> = att.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", args.join(";"))
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(String::new(), e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| fail(String::new(), e.to_string()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success() {
            return Err(fail(stdout, stderr));
        }
        if stdout.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&stdout)
            .map(Some)
            .map_err(|e| fail(stdout, format!("stdout is not JSON: {e}")))
    }

    /// Builds the config libcni gives one plugin of a list.
    pub fn plugin_conf(
        list: &Value,
        entry: &Value,
        prev: Option<&Value>,
        att: &Attachment,
    ) -> Value {
        let mut conf = entry.as_object().cloned().unwrap_or_default();
        conf.insert(
            "name".into(),
            list.get("name").cloned().unwrap_or(json!("")),
        );
        conf.insert(
            "cniVersion".into(),
            list.get("cniVersion").cloned().unwrap_or(json!("1.0.0")),
        );
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        let mut rc = Map::new();
        if let Some(Value::Object(caps)) = entry.get("capabilities") {
            for (cap, on) in caps {
                if on == &json!(true)
                    && let Some(v) = att.cap_args.get(cap)
                {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Value::Object(conf)
    }

    fn plugins(list: &Value) -> Vec<Value> {
        list.get("plugins")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// ADD through the whole list; returns the final result.
    pub fn add(&self, list: &Value, att: &Attachment) -> Result<Value, PluginError> {
        Ok(self.add_each(list, att)?.pop().unwrap_or(Value::Null))
    }

    /// ADD through the whole list; returns each plugin's result, in the list's order (Null
    /// for one that printed none).
    pub fn add_each(&self, list: &Value, att: &Attachment) -> Result<Vec<Value>, PluginError> {
        let mut prev: Option<Value> = None;
        let mut results = Vec::new();
        for entry in Self::plugins(list) {
            let conf = Self::plugin_conf(list, &entry, prev.as_ref(), att);
            prev = self.exec("ADD", &conf, att)?;
            results.push(prev.clone().unwrap_or(Value::Null));
        }
        Ok(results)
    }

    /// CHECK through the list with the cached ADD result.
    pub fn check(&self, list: &Value, att: &Attachment, cached: &Value) -> Result<(), PluginError> {
        for entry in Self::plugins(list) {
            let conf = Self::plugin_conf(list, &entry, Some(cached), att);
            self.exec("CHECK", &conf, att)?;
        }
        Ok(())
    }

    /// DEL through the list in reverse, with the cached ADD result. Like libcni, it stops at
    /// the first failure.
    pub fn del(
        &self,
        list: &Value,
        att: &Attachment,
        cached: Option<&Value>,
    ) -> Result<(), PluginError> {
        for entry in Self::plugins(list).iter().rev() {
            let conf = Self::plugin_conf(list, entry, cached, att);
            self.exec("DEL", &conf, att)?;
        }
        Ok(())
    }
}

/// Reads a `.conflist`, or a single-plugin `.conf` turned into a list.
pub fn load_list(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if v.get("plugins").is_some() {
        return Ok(v);
    }
    let mut entry = v.as_object().cloned().unwrap_or_default();
    let name = entry.remove("name").unwrap_or(json!(""));
    let version = entry.remove("cniVersion").unwrap_or(json!("1.0.0"));
    Ok(json!({"cniVersion": version, "name": name, "plugins": [entry]}))
}
