//! The plugin binary run directly, as a runtime runs it (stdin config, `CNI_*` environment),
//! and its other faces (`uninstall`).

use crate::paths::plugin;
use crate::pod::STATUS;
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The config a runtime gives mesh-redirect for a pod with `annotations`: a fixed
/// prevResult, plus `extra` top-level keys.
pub fn plugin_conf(annotations: Value, extra: Value) -> Value {
    let mut c = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "mesh-redirect",
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}});
    if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
        c.extend(e);
    }
    c
}

/// `plugin_conf` for a pod with a sidecar and `extra` annotations.
pub fn meshed_conf(extra: &[(&str, &str)]) -> Value {
    let mut ann = json!({STATUS: "{}"});
    for (k, v) in extra {
        ann[*k] = json!(v);
    }
    plugin_conf(ann, json!({}))
}

/// Runs the plugin binary as a runtime does for pod default/web-0 (`env` overrides the
/// `CNI_*` variables; `wrapper` runs it under another program, e.g. strace). Returns
/// (exit success, stdout as JSON or Null).
pub fn invoke_wrapped(
    wrapper: &[&str],
    cmd: &str,
    netns: &str,
    stdin: &[u8],
    env: &[(&str, &str)],
) -> (bool, Value) {
    let mut c = match wrapper.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg(plugin());
            c
        }
        None => Command::new(plugin()),
    };
    c.env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", "test-ctr")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0");
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the plugin");
    if let Some(mut pipe) = child.stdin.take() {
        // The plugin may stop reading early (bounded read): a broken pipe is fine.
        let _ = pipe.write_all(stdin);
    }
    let out = child.wait_with_output().expect("wait for the plugin");
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
    )
}

pub fn invoke(cmd: &str, netns: &str, stdin: &[u8], env: &[(&str, &str)]) -> (bool, Value) {
    invoke_wrapped(&[], cmd, netns, stdin, env)
}

/// `mesh-redirect uninstall` for these dirs, asserting it succeeds.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) {
    let out = Command::new(plugin())
        .arg("uninstall")
        .arg("--cni-bin-dir")
        .arg(bin_dir)
        .arg("--cni-conf-dir")
        .arg(conf_dir)
        .output()
        .expect("run mesh-redirect uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
