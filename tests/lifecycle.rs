//! ADD/DEL/CHECK/VERSION/GC/STATUS driven the way a runtime drives them, against the real kernel.

use common::cnichain::Attachment;
use common::*;
use serde_json::{Value, json};

#[test]
fn add_twice_is_one_table_with_the_same_behaviour() {
    let pod = Pod::meshed(&[]);
    let first = pod.pod.ruleset();
    let conf = pod.mesh_conf();
    pod.plugin("ADD", &conf).expect("second ADD");
    assert_eq!(
        pod.pod
            .ruleset()
            .matches("table inet mesh_redirect")
            .count(),
        1
    );
    // Same content (handles aside: the table was replaced).
    let strip = |s: &str| {
        s.lines()
            .map(|l| l.split(" # handle").next().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&first), strip(&pod.pod.ruleset()));
    let _proxy = pod.proxy();
    let _node = pod.node_server(&[8080]);
    assert_answer(
        pod.dial_from_pod(APP, &hp(GW4, 8080)),
        "proxy",
        Some("10.88.0.1:8080"),
    );
    pod.check().expect("CHECK after second ADD");
}

#[test]
fn add_prints_prev_result_unchanged_in_every_version() {
    // Debian's reference plugins (1.1.x) speak up to 1.0.0: the real chain covers those.
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
        let pod = Pod::build(Some(json!({STATUS: "{}"})), json!({}), version, "default")
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        assert!(pod.pod.has_table(), "{version}");
        // What the bridge itself returned, given to mesh-redirect as its prevResult.
        let bridge = pod.results[0].clone();
        assert_eq!(pod.list["plugins"][0]["type"], "bridge");
        assert_eq!(bridge["cniVersion"], version);
        assert!(!bridge["ips"].as_array().unwrap().is_empty());
        // The chain's result is the bridge's result passed through: same ips, same version,
        // the same everything.
        let result = pod.result.clone().unwrap();
        assert_eq!(result, bridge, "{version}: the chain's result");
        assert_eq!(result["cniVersion"], version);
        assert!(!result["ips"].as_array().unwrap().is_empty());
        // And an ADD given the bridge's result, as libcni gives it, prints it unchanged.
        let mut conf = pod.mesh_conf();
        conf["prevResult"] = bridge.clone();
        let out = pod.plugin("ADD", &conf).unwrap().unwrap();
        assert_eq!(out, bridge, "{version}");
        let out = pod.plugin("ADD", &pod.mesh_conf()).unwrap().unwrap();
        assert_eq!(out, result, "{version}");
    }
    // 1.1.0: the same 1.x result shape, from a config a 1.1 runtime would send.
    let pod = Pod::meshed(&[]);
    let mut conf = pod.mesh_conf();
    conf["cniVersion"] = json!("1.1.0");
    conf["prevResult"]["cniVersion"] = json!("1.1.0");
    let out = pod.plugin("ADD", &conf).unwrap().unwrap();
    assert_eq!(out, conf["prevResult"]);
    pod.plugin("CHECK", &conf).unwrap();
}

#[test]
fn del_removes_the_table_is_idempotent_and_tolerates_a_gone_netns() {
    let pod = Pod::meshed(&[]);
    assert!(pod.pod.has_table());
    let conf = pod.mesh_conf();
    pod.plugin("DEL", &conf).expect("DEL");
    assert!(!pod.pod.has_table());
    pod.plugin("DEL", &conf).expect("second DEL");
    // The whole chain's DEL (bridge + host-local + us) works too.
    pod.del().expect("chain DEL");

    // Netns deleted before DEL, and an empty CNI_NETNS.
    let pod = Pod::meshed(&[]);
    let conf = pod.mesh_conf();
    common::run(&["ip", "netns", "del", &pod.pod.name]);
    pod.plugin("DEL", &conf).expect("DEL with the netns gone");
    let rt = pod.runtime();
    let att = Attachment {
        netns: String::new(),
        ..pod.att.clone()
    };
    rt.exec("DEL", &conf, &att)
        .expect("DEL with empty CNI_NETNS");
}

#[test]
fn check_passes_after_add_and_names_a_rule_removed_by_hand() {
    let pod = Pod::meshed(&[(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "10.0.0.0/8",
    )]);
    pod.check().expect("CHECK right after ADD");
    // Remove one rule the way an operator would, by handle.
    let listing = pod.pod.exec(&[
        "nft",
        "-a",
        "list",
        "chain",
        "inet",
        "mesh_redirect",
        "outbound",
    ]);
    let handle = listing
        .lines()
        .find(|l| l.contains("meta skuid 1337 return"))
        .and_then(|l| l.rsplit("handle ").next())
        .expect("rule with handle")
        .trim()
        .to_string();
    pod.pod.exec(&[
        "nft",
        "delete",
        "rule",
        "inet",
        "mesh_redirect",
        "outbound",
        "handle",
        &handle,
    ]);
    let e = pod
        .plugin("CHECK", &pod.mesh_conf())
        .expect_err("CHECK must fail");
    let json = e.json.expect("error JSON");
    assert_eq!(json["code"], 103);
    let msg = json["msg"].as_str().unwrap();
    assert!(
        msg.contains("chain outbound") && msg.contains("meta skuid 1337 return"),
        "{msg}"
    );

    // A set element removed by hand is named too.
    pod.plugin("ADD", &pod.mesh_conf()).unwrap();
    pod.pod.exec(&[
        "nft",
        "delete",
        "element",
        "inet",
        "mesh_redirect",
        "out_exclude_v4",
        "{ 10.0.0.0/8 }",
    ]);
    let msg = pod
        .plugin("CHECK", &pod.mesh_conf())
        .unwrap_err()
        .json
        .unwrap()["msg"]
        .to_string();
    assert!(msg.contains("set out_exclude_v4"), "{msg}");

    // And a deleted table.
    pod.pod
        .exec(&["nft", "delete", "table", "inet", "mesh_redirect"]);
    let msg = pod
        .plugin("CHECK", &pod.mesh_conf())
        .unwrap_err()
        .json
        .unwrap()["msg"]
        .to_string();
    assert!(msg.contains("table inet mesh_redirect is missing"), "{msg}");
}

/// CHECK reads every attribute that changes what the table does, not only its rules: a
/// dormant table or a base chain turned to `policy drop` keeps every rule and captures nothing
/// (or drops everything).
#[test]
fn check_fails_for_a_dormant_table_or_a_changed_chain_policy() {
    let pod = Pod::meshed(&[]);
    pod.check().expect("CHECK right after ADD");
    let expect_103 = |what: &str| {
        let e = pod
            .plugin("CHECK", &pod.mesh_conf())
            .expect_err("CHECK must fail");
        let json = e.json.expect("error JSON");
        assert_eq!(json["code"], 103, "{json}");
        let msg = json["msg"].as_str().unwrap().to_string();
        assert!(msg.contains(what), "{msg}");
    };
    pod.pod
        .exec(&["nft", "add table inet mesh_redirect { flags dormant; }"]);
    // Dormant really turns capture off: the app's connection goes out as is.
    let _proxy = pod.proxy();
    let _node = pod.node_server(&[8080]);
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 8080)), "node", None);
    expect_103("flags dormant");

    pod.plugin("ADD", &pod.mesh_conf()).unwrap();
    pod.check().expect("CHECK after the repairing ADD");
    pod.pod.exec(&[
        "nft",
        "add chain inet mesh_redirect output { type nat hook output priority -100; policy drop; }",
    ]);
    expect_103("chain output has policy drop");
}

#[test]
fn check_for_a_skipped_pod_passes_without_table_and_fails_with_one() {
    let pod = Pod::with(Some(json!({"app": "x"})), json!({})).unwrap();
    pod.check().expect("CHECK, no sidecar");
    pod.pod
        .exec(&["nft", "add", "table", "inet", "mesh_redirect"]);
    let e = pod.plugin("CHECK", &pod.mesh_conf()).unwrap_err();
    assert!(e.stdout.contains("not captured"), "{}", e.stdout);
}

#[test]
fn version_gc_status() {
    let rt = common::cnichain::Runtime {
        cni_path: vec![plugin_dir()],
        exec_netns: None,
    };
    let att = Attachment::default();
    let v = rt
        .exec(
            "VERSION",
            &json!({"cniVersion": "1.1.0", "type": "mesh-redirect"}),
            &att,
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let conf = json!({"cniVersion": "1.1.0", "name": "k8s", "type": "mesh-redirect",
        "cni.dev/valid-attachments": [{"containerID": "x", "ifname": "eth0"}]});
    assert_eq!(rt.exec("GC", &conf, &att).unwrap(), None);
    // STATUS probes the kernel in a scratch namespace of its own.
    assert_eq!(rt.exec("STATUS", &conf, &att).unwrap(), None);
    // Both need 1.1.0.
    let old = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "mesh-redirect"});
    assert_eq!(
        rt.exec("STATUS", &old, &att).unwrap_err().json.unwrap()["code"],
        1
    );
}

#[test]
fn log_file_gets_one_json_line_per_invocation() {
    let tmp = TempDir::new();
    let log = tmp.path().join("mesh-redirect.log");
    let mesh = json!({"logFile": log.to_string_lossy()});
    let pod = Pod::with(Some(json!({STATUS: "{}"})), mesh).unwrap();
    pod.plugin("CHECK", &pod.mesh_conf()).unwrap();
    pod.plugin("DEL", &pod.mesh_conf()).unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0]["command"], "ADD");
    assert_eq!(lines[0]["decision"], "captured");
    assert_eq!(lines[0]["podName"], "web-0");
    assert_eq!(lines[0]["netns"], pod.pod.path());
    assert!(lines[0]["durationUs"].as_u64().unwrap() > 0);
    assert_eq!(lines[1]["command"], "CHECK");
    assert_eq!(lines[2]["decision"], "deleted");
}
