//! Bad input gets the right error code and a message naming the culprit, and the pod's
//! namespace is left exactly as it was. Plus large policies (sets, not rules).

use common::cnichain::Attachment;
use common::*;
use serde_json::{Value, json};
use std::process::{Command, Stdio};

/// Runs mesh-redirect with raw stdin bytes on `netns`; returns (success, stdout JSON).
fn raw(command: &str, stdin: &[u8], netns: &str) -> (bool, Value) {
    invoke(command, netns, stdin, &[])
}

/// ADD with `conf` must fail with `code`, mention every `needles`, and leave the ruleset as is.
#[track_caller]
fn refused_and_unchanged(pod: &Pod, conf: &[u8], code: u64, needles: &[&str]) {
    let before = pod.pod.ruleset();
    assert!(
        before.contains("mesh_redirect"),
        "the pod should already have its table"
    );
    let (ok, out) = raw("ADD", conf, &pod.pod.path());
    assert!(!ok, "ADD should fail: {out}");
    assert_eq!(out["code"], code, "{out}");
    let msg = out["msg"].as_str().unwrap_or_default();
    for n in needles {
        assert!(msg.contains(n), "message should name {n:?}: {msg}");
    }
    assert_eq!(pod.pod.ruleset(), before, "the pod's ruleset changed");
}

fn with_annotation(pod: &Pod, name: &str, value: &str) -> Vec<u8> {
    let mut conf = pod.mesh_conf();
    conf["runtimeConfig"]["io.kubernetes.cri.pod-annotations"][name] = json!(value);
    conf.to_string().into_bytes()
}

#[test]
fn bad_annotations_are_code_100_and_change_nothing() {
    let pod = Pod::meshed(&[]);
    for (name, value) in [
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.0.0.0/33",
        ),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.1,banana",
        ),
        ("traffic.sidecar.istio.io/includeInboundPorts", "80,99999"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "http"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "-1"),
        ("traffic.sidecar.istio.io/includeOutboundPorts", "0"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "a/b"),
        ("sidecar.istio.io/interceptionMode", "BOGUS"),
    ] {
        refused_and_unchanged(
            &pod,
            &with_annotation(&pod, name, value),
            100,
            &[name, value],
        );
    }
}

#[test]
fn bad_json_version_config_and_missing_prev_result_change_nothing() {
    let pod = Pod::meshed(&[]);
    refused_and_unchanged(&pod, b"{\"cniVersion\": \"1.0.0\", ", 6, &["JSON"]);
    refused_and_unchanged(&pod, b"[1,2]", 6, &["object"]);

    let mut conf = pod.mesh_conf();
    conf["cniVersion"] = json!("0.2.0");
    refused_and_unchanged(&pod, conf.to_string().as_bytes(), 1, &["0.2.0"]);

    let mut conf = pod.mesh_conf();
    conf.as_object_mut().unwrap().remove("prevResult");
    refused_and_unchanged(&pod, conf.to_string().as_bytes(), 7, &["prevResult"]);

    let mut conf = pod.mesh_conf();
    conf["proxyUID"] = json!("root");
    refused_and_unchanged(&pod, conf.to_string().as_bytes(), 7, &["proxyUID"]);

    // The runtime passed no annotations for a Kubernetes pod: fail closed, say how to fix it.
    let mut conf = pod.mesh_conf();
    conf.as_object_mut().unwrap().remove("runtimeConfig");
    refused_and_unchanged(
        &pod,
        conf.to_string().as_bytes(),
        7,
        &["capabilities", "io.kubernetes.cri.pod-annotations"],
    );
}

#[test]
fn missing_env_is_code_4() {
    let pod = Pod::meshed(&[]);
    let before = pod.pod.ruleset();
    let out = Command::new(plugin())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_NETNS", pod.pod.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 4);
    assert!(
        v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"),
        "{v}"
    );
    assert_eq!(pod.pod.ruleset(), before);
}

#[test]
fn missing_or_bogus_netns_is_code_101() {
    let pod = Pod::meshed(&[]);
    let conf = pod.mesh_conf().to_string().into_bytes();
    let (ok, out) = raw("ADD", &conf, "/run/netns/does-not-exist");
    assert!(!ok);
    assert_eq!(out["code"], 101, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap()
            .contains("/run/netns/does-not-exist")
    );
    // A regular file where the netns should be.
    let tmp = TempDir::new();
    let file = write_file(tmp.path(), "netns", "");
    let (ok, out) = raw("ADD", &conf, &file.to_string_lossy());
    assert!(!ok);
    assert_eq!(out["code"], 101, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap()
            .contains("not a network namespace"),
        "{out}"
    );
    // Our own (the host's) namespace is refused.
    let (ok, out) = raw("ADD", &conf, "/proc/self/ns/net");
    assert!(!ok);
    assert_eq!(out["code"], 101, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("own"), "{out}");
    // DEL of a gone or torn-down netns succeeds.
    assert!(raw("DEL", &conf, "/run/netns/does-not-exist").0);
    assert!(raw("DEL", &conf, &file.to_string_lossy()).0);
}

#[test]
fn kernel_refusal_is_code_102_with_errno_and_nothing_changes() {
    // Someone else owns a table of our name (NFT_TABLE_F_OWNER): the kernel refuses to let us
    // delete it, so the whole batch is rejected.
    require_root();
    let pod = Pod::with(Some(json!({"app": "x"})), json!({})).unwrap();
    let _held = OwnedTable::hold(&pod.pod);
    let before = pod.pod.ruleset();
    let mut conf = pod.mesh_conf();
    conf["runtimeConfig"]["io.kubernetes.cri.pod-annotations"] = json!({STATUS: "{}"});
    let e = pod.plugin("ADD", &conf).unwrap_err();
    let out = e.json.expect("error JSON");
    assert_eq!(out["code"], 102, "{out}");
    let msg = out["msg"].as_str().unwrap();
    assert!(
        msg.contains("Operation not permitted") && msg.contains("table inet mesh_redirect"),
        "{msg}"
    );
    assert_eq!(pod.pod.ruleset(), before);
}

#[test]
fn five_thousand_excluded_cidrs_are_one_set_not_five_thousand_rules() {
    // Non-adjacent /24s (every other one), so nothing merges: 5,000 intervals.
    let mut cidrs: Vec<String> = (0..5000)
        .map(|i| format!("10.{}.{}.0/24", i / 128, (i % 128) * 2))
        .collect();
    cidrs.push("10.88.0.1".into());
    cidrs.push("fd88::1".into());
    let value = cidrs.join(",");
    let pod = Pod::meshed(&[("traffic.sidecar.istio.io/excludeOutboundIPRanges", &value)]);
    let chain = pod
        .pod
        .exec(&["nft", "list", "chain", "inet", "mesh_redirect", "outbound"]);
    let rules = chain
        .lines()
        .filter(|l| l.contains("return") || l.contains("redirect"))
        .count();
    assert!(rules < 30, "{rules} rules in outbound");
    let set = pod.pod.exec(&[
        "nft",
        "list",
        "set",
        "inet",
        "mesh_redirect",
        "out_exclude_v4",
    ]);
    assert_eq!(set.matches("/24").count(), 5000, "every CIDR is an element");
    pod.check().expect("CHECK with 5,000 elements");
    let _proxy = pod.proxy();
    let _node = pod.node_server(&[8080]);
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 8080)), "node", None);
    assert_answer(pod.dial_from_pod(APP, &hp(GW6, 8080)), "node", None);
    // The last CIDR of the list is excluded (the node, with no route on, answers unreachable);
    // the gap next to it is captured.
    let e = pod
        .dial_from_pod(APP, "10.39.14.7:80")
        .expect_err("excluded: not captured");
    assert!(e.contains("unreachable"), "{e}");
    assert_answer(
        pod.dial_from_pod(APP, "10.39.15.7:80"),
        "proxy",
        Some("10.39.15.7:80"),
    );
    assert_answer(
        pod.dial_from_pod(APP, "10.96.0.10:80"),
        "proxy",
        Some("10.96.0.10:80"),
    );
}

#[test]
fn plan_text_is_accepted_by_nft_check() {
    require_root();
    let tmp = TempDir::new();
    let entry = write_file(
        tmp.path(),
        "entry.json",
        r#"{"type":"mesh-redirect","captureDNS":true}"#,
    );
    let ann = write_file(
        tmp.path(),
        "ann.json",
        &json!({STATUS: "{}",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8,fd00::/8,1.2.3.4",
            "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,172.16.0.0/12,2001:db8::/32",
            "traffic.sidecar.istio.io/includeOutboundPorts": "3306",
            "traffic.sidecar.istio.io/excludeInterfaces": "eth1",
            "traffic.sidecar.istio.io/includeInboundPorts": "80,443"})
        .to_string(),
    );
    let out = Command::new(plugin())
        .args([
            "plan",
            "--config",
            &entry.to_string_lossy(),
            "--annotations",
            &ann.to_string_lossy(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("table inet mesh_redirect"), "{text}");
    let plan = write_file(tmp.path(), "plan.nft", &text);
    // nft -c parses and validates against the kernel without applying anything.
    let ns = Netns::new("mrt-plan-");
    ns.exec(&["nft", "-c", "-f", &plan.to_string_lossy()]);
    assert!(!ns.has_table(), "nft -c must not apply");
}

#[test]
fn annotations_absent_for_a_non_kubernetes_invocation_is_a_skip() {
    let pod = Pod::with(Some(json!({STATUS: "{}"})), json!({})).unwrap();
    let att = Attachment {
        args: vec![],
        ..pod.att.clone()
    };
    let mut conf = pod.mesh_conf();
    conf.as_object_mut().unwrap().remove("runtimeConfig");
    let rt = pod.runtime();
    rt.exec("DEL", &conf, &att).unwrap();
    let out = rt.exec("ADD", &conf, &att).unwrap();
    assert_eq!(out.unwrap(), conf["prevResult"]);
    assert!(!pod.pod.has_table());
}
