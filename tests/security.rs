//! Security properties: the plugin executes nothing, opens only the namespace it was given,
//! leaves a table an app cannot touch, logs nothing secret and nothing unbounded; the
//! installer never writes through a symlink and writes safe modes.

use common::agent::{Launch, Program};
use common::*;
use serde_json::{Value, json};
use std::process::Command;

fn conf(ann: Value, extra: Value) -> Value {
    plugin_conf(ann, extra)
}

/// Runs the plugin under `strace -f` and returns (success, strace output).
fn traced(cmd: &str, netns: &str, conf: &Value, trace: &str) -> (bool, String) {
    let tmp = TempDir::new();
    let out_file = tmp.path().join("trace");
    let filter = format!("trace={trace}");
    let out = out_file.to_string_lossy();
    let wrapper = ["strace", "-f", "-qq", "-e", &filter, "-o", &out];
    let (ok, _) = invoke_wrapped(&wrapper, cmd, netns, conf.to_string().as_bytes(), &[]);
    (ok, std::fs::read_to_string(&out_file).unwrap_or_default())
}

#[test]
fn the_plugin_executes_nothing_and_forks_nothing() {
    require_root();
    let ns = Netns::new("mrt-sec-");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    let c = conf(
        json!({STATUS: "{}", "sidecar.istio.io/interceptionMode": "TPROXY"}),
        json!({}),
    );
    for cmd in ["ADD", "CHECK", "DEL"] {
        let (ok, trace) = traced(cmd, &ns.path(), &c, "process");
        assert!(ok, "{cmd}: {trace}");
        let execs = trace.lines().filter(|l| l.contains("execve(")).count();
        assert_eq!(execs, 1, "{cmd}: only its own exec:\n{trace}");
        assert!(
            !trace
                .lines()
                .any(|l| l.contains("fork(") || l.contains("clone(") || l.contains("clone3(")),
            "{cmd}: no child process or thread:\n{trace}"
        );
    }
}

#[test]
fn the_plugin_opens_only_the_namespace_it_was_given() {
    require_root();
    let ns = Netns::new("mrt-sec-");
    let other = Netns::new("mrt-sec-other-");
    let (ok, trace) = traced(
        "ADD",
        &ns.path(),
        &conf(json!({STATUS: "{}"}), json!({})),
        "openat,open,setns",
    );
    assert!(ok, "{trace}");
    let opened: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("openat(") && !l.contains("ENOENT"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    let namespaces: Vec<&&str> = opened
        .iter()
        .filter(|p| p.contains("/ns/") || p.starts_with("/run/netns"))
        .collect();
    assert_eq!(
        namespaces,
        // The target, ours (to refuse being handed our own), ours again (to come back to).
        [
            &ns.path().as_str(),
            &"/proc/thread-self/ns/net",
            &"/proc/thread-self/ns/net"
        ],
        "namespaces opened: {opened:?}"
    );
    assert!(!opened.iter().any(|p| p.contains(&other.name)));
    // Two setns: into the pod, back home.
    assert_eq!(
        trace.lines().filter(|l| l.contains("setns(")).count(),
        2,
        "{trace}"
    );
}

#[test]
fn an_app_in_the_pod_cannot_alter_or_remove_the_table() {
    let pod = Pod::meshed(&[]);
    let before = pod.pod.ruleset();
    for cmd in [
        vec!["nft", "delete", "table", "inet", "mesh_redirect"],
        vec!["nft", "flush", "chain", "inet", "mesh_redirect", "outbound"],
        vec![
            "nft",
            "add",
            "rule",
            "inet",
            "mesh_redirect",
            "outbound",
            "accept",
        ],
    ] {
        let mut full = vec![
            "ip",
            "netns",
            "exec",
            &pod.pod.name,
            "setpriv",
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
        ];
        full.extend(cmd.iter());
        let out = Command::new(full[0]).args(&full[1..]).output().unwrap();
        assert!(!out.status.success(), "{cmd:?} succeeded as uid 1000");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
            "{cmd:?}"
        );
    }
    // The proxy's uid cannot either (it has no CAP_NET_ADMIN in REDIRECT mode).
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.pod.name,
            "setpriv",
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
        ])
        .args(["nft", "delete", "table", "inet", "mesh_redirect"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(pod.pod.ruleset(), before);
}

#[test]
fn logs_carry_no_secrets_and_stay_bounded() {
    require_root();
    let ns = Netns::new("mrt-log-");
    let tmp = TempDir::new();
    let log = tmp.path().join("plugin.log");
    let secret = "s3cr3t-T0KEN-do-not-log";
    // Another plugin's credentials in the config, a secret in an unrelated annotation, and a
    // megabyte of garbage in a bad one.
    let garbage = "x".repeat(1 << 20);
    let good = conf(
        json!({STATUS: "{}", "vault.hashicorp.com/token": secret}),
        json!({"logFile": log.to_string_lossy(), "apiToken": secret, "ipam": {"password": secret}}),
    );
    let bad = conf(
        json!({STATUS: "{}", "vault.hashicorp.com/token": secret,
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": garbage}),
        json!({"logFile": log.to_string_lossy(), "apiToken": secret}),
    );
    for c in [&good, &bad] {
        let (_, _) = traced("ADD", &ns.path(), c, "none");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(!text.contains(secret), "a secret reached the log: {text}");
    for line in text.lines() {
        assert!(line.len() < 4096, "log line of {} bytes", line.len());
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v["ts"].is_string() && v["command"] == "ADD");
    }
    // The log file itself is not world-readable.
    assert_eq!(mesh_redirect::install::files::mode_of(&log) & 0o007, 0);
}

#[test]
fn the_installer_never_writes_through_symlinks_and_writes_safe_modes() {
    require_root();
    let tmp = TempDir::new();
    let (bin, confd, outside) = (
        tmp.path().join("bin"),
        tmp.path().join("net.d"),
        tmp.path().join("outside"),
    );
    for d in [&bin, &confd, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The binary's name in the bin dir is a symlink to a file outside: replaced, not followed.
    let victim = outside.join("victim");
    std::fs::write(&victim, b"do not overwrite").unwrap();
    std::os::unix::fs::symlink(&victim, bin.join("mesh-redirect")).unwrap();
    // The primary config is a symlink to a file outside: refused, target untouched.
    let target = outside.join("10-bridge.conflist");
    let list = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#;
    std::fs::write(&target, list).unwrap();
    std::os::unix::fs::symlink(&target, confd.join("10-bridge.conflist")).unwrap();
    let ns = Netns::new("mrt-inst-sec-");
    let (netns, events) = (ns.path(), tmp.path().join("events.sock"));
    // Its own event socket, no runtime to reconcile: nothing outside the temp dir.
    let mut inst = Launch {
        program: Program::Plugin,
        ..Launch::new(
            &netns,
            &bin,
            &confd,
            &events,
            tmp.path().join("installer.log"),
        )
    }
    .spawn();
    wait_for(10, "the installer to report the symlink", || {
        inst.log().contains("symlink")
    });
    inst.kill();
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not overwrite");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), list);
    let installed = bin.join("mesh-redirect");
    assert!(
        std::fs::symlink_metadata(&installed).unwrap().is_file(),
        "the link was replaced by the binary"
    );
    let mode = |p: &std::path::Path| mesh_redirect::install::files::mode_of(p);
    assert_eq!(mode(&installed), 0o755);
    assert_eq!(mode(&bin.join("mesh-redirect.libs")), 0o755);
    for lib in std::fs::read_dir(bin.join("mesh-redirect.libs"))
        .unwrap()
        .flatten()
    {
        assert_eq!(mode(&lib.path()), 0o644, "{}", lib.path().display());
    }
    // Nothing group- or world-writable anywhere we wrote, no temporary files left.
    for e in std::fs::read_dir(&bin).unwrap().flatten() {
        assert_eq!(mode(&e.path()) & 0o022, 0, "{}", e.path().display());
        assert!(!e.file_name().to_string_lossy().contains(".tmp-"));
    }
}
