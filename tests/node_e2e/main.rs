//! Node end-to-end: a real containerd (its CRI plugin and the runc shim) starts pod sandboxes
//! the way the kubelet asks it to, runs the CNI chain from its conf dir — the primary network
//! (bridge + host-local + portmap) with mesh-redirect chained by `mesh-redirect install`, as
//! the DaemonSet does — and passes the pods' annotations; the capture is then proven with
//! traffic inside the sandboxes' own network namespaces.
//!
//! This is the kubelet path that matters to mesh-redirect, without a cluster: kind needs
//! Docker, which CI lacks. The node is a network namespace with no uplink; containerd's root,
//! state, socket, CNI dirs and the pods' netns mounts all live in a temp dir; the sandbox image
//! is built here (a static pause binary) since no registry is reachable. Everything is removed
//! on drop, also on failure. `scripts/node-e2e.sh` runs it alone with the report visible.

mod containerd;
mod cri;
mod criproxy;
mod daemonset;
mod hostile;
mod image;
mod kubelet;
mod kustomize;
mod node;
mod prometheus;

use common::{APP, PROXY, ROOT, STATUS, assert_answer, connect, hp, serve};
use containerd::{IMAGE, Sandbox};
use node::{GATEWAY, NETWORK, Node, OTHER, in_netns, list_dir, say, tables};
use serde_json::Value;
use std::path::Path;
use std::time::Instant;

const EXCLUDE_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
const EXCLUDE_OUT_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
const EXCLUDE_IN_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// Istio's sidecar annotations for the meshed pods: capture everything except 10.99.0.0/24,
/// outbound port 9090 and inbound port 9443.
const MESHED: &[(&str, &str)] = &[
    (
        STATUS,
        r#"{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"]}"#,
    ),
    ("sidecar.istio.io/interceptionMode", "REDIRECT"),
    (EXCLUDE_RANGES, "10.99.0.0/24"),
    (EXCLUDE_OUT_PORTS, "9090"),
    (EXCLUDE_IN_PORTS, "9443"),
];

struct Report {
    start: Instant,
    step: usize,
}

impl Report {
    fn step(&mut self, what: &str) {
        self.step += 1;
        say(&format!(
            "== {}. {what}   [{:.1}s]",
            self.step,
            self.start.elapsed().as_secs_f64()
        ));
    }
    fn ok(&self, what: &str) {
        say(&format!("   ok  {what}"));
    }
}

/// mesh-redirect's log lines for one sandbox and verb.
fn plugin_lines(node: &Node, id: &str, command: &str) -> Vec<Value> {
    node.plugin_log()
        .into_iter()
        .filter(|l| l["containerID"] == id && l["command"] == command)
        .collect()
}

/// The one ADD line for a sandbox: run by the runtime with the pod's identity and netns.
#[track_caller]
fn add_line(node: &Node, sb: &Sandbox, namespace: &str) -> Value {
    let lines = plugin_lines(node, &sb.id, "ADD");
    assert_eq!(lines.len(), 1, "one ADD for {}: {lines:?}", sb.name);
    let l = lines.into_iter().next().unwrap();
    assert_eq!(l["podName"], sb.name.as_str(), "{l}");
    assert_eq!(l["podNamespace"], namespace, "{l}");
    assert_eq!(l["netns"], sb.netns.as_str(), "{l}");
    l
}

/// A log line's gist for the report.
fn brief(l: &Value) -> String {
    let mut s = format!("{} {}: {}", l["command"], l["podName"], l["decision"]);
    for k in ["rules", "setElements", "durationUs", "code"] {
        if let Some(v) = l.get(k) {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    s.replace('"', "")
}

fn has_table(netns: &str) -> bool {
    tables(netns).contains("inet mesh_redirect")
}

/// Proves a meshed pod's capture with traffic: the stand-in proxy (uid 1337) and app (uid
/// 1000) inside the sandbox's netns, servers in the node namespace.
fn prove_capture(r: &Report, node: &Node, pod: &Sandbox) {
    let _proxy = serve(&pod.netns, PROXY, "proxy", &[15001, 15006], &[]);
    let _app = serve(&pod.netns, APP, "app", &[8080, 9443], &[]);
    let node_ns = node.ns.path();
    let gw = hp(GATEWAY, 8080);
    assert_answer(connect(&pod.netns, APP, &gw), "proxy", Some(&gw));
    r.ok(&format!(
        "outbound: app (uid 1000) -> {gw} answered by the proxy on 15001, SO_ORIGINAL_DST {gw}"
    ));
    assert_answer(connect(&pod.netns, PROXY, &gw), "node", None);
    r.ok(&format!(
        "outbound: the proxy's own connection (uid 1337) -> {gw} goes out as is"
    ));
    assert_answer(connect(&pod.netns, APP, &hp(OTHER, 8080)), "node", None);
    r.ok(&format!(
        "exclusion: app -> {OTHER}:8080 not captured ({EXCLUDE_RANGES}=10.99.0.0/24)"
    ));
    assert_answer(connect(&pod.netns, APP, &hp(GATEWAY, 9090)), "node", None);
    r.ok(&format!(
        "exclusion: app -> {GATEWAY}:9090 not captured ({EXCLUDE_OUT_PORTS}=9090)"
    ));
    let inbound = hp(&pod.ip, 8080);
    assert_answer(connect(&node_ns, ROOT, &inbound), "proxy", Some(&inbound));
    r.ok(&format!(
        "inbound: node -> {inbound} answered by the proxy on 15006, SO_ORIGINAL_DST {inbound}"
    ));
    assert_answer(connect(&node_ns, ROOT, &hp(&pod.ip, 9443)), "app", None);
    r.ok(&format!(
        "exclusion: node -> {}:9443 reaches the app ({EXCLUDE_IN_PORTS}=9443)",
        pod.ip
    ));
}

/// A pod without capture: no table, and the app's traffic goes where it was sent.
/// mesh-redirect logged a skip for the pod, and its traffic goes out uncaptured.
fn prove_skipped(r: &Report, node: &Node, pod: &Sandbox) {
    let l = add_line(node, pod, "default");
    let decision = l["decision"].as_str().unwrap_or_default();
    assert!(decision.starts_with("skipped"), "{l}");
    r.ok(&format!("mesh-redirect logged {}", brief(&l)));
    prove_uncaptured(r, pod);
}

fn prove_uncaptured(r: &Report, pod: &Sandbox) {
    assert!(
        !has_table(&pod.netns),
        "{} has a mesh_redirect table",
        pod.name
    );
    r.ok("no mesh_redirect table in its netns");
    let _proxy = serve(&pod.netns, PROXY, "proxy", &[15001, 15006], &[]);
    assert_answer(connect(&pod.netns, APP, &hp(GATEWAY, 8080)), "node", None);
    r.ok(&format!(
        "app -> {GATEWAY}:8080 answered by the node itself"
    ));
}

/// The plugin types of a loaded / written conflist.
fn types(list: &Value) -> Vec<String> {
    list["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn containerd_runs_kubelet_pods_through_the_installed_chain_and_they_are_captured() {
    let mut r = Report {
        start: Instant::now(),
        step: 0,
    };

    r.step("node: a network namespace with no uplink, containerd started inside it");
    let mut node = Node::start();
    let v = node.cri.version().expect("Version");
    r.ok(&format!(
        "containerd {} answers CRI {} on {} (snapshotter {})",
        v.runtime_version,
        v.runtime_api_version,
        node.socket().display(),
        node.snapshotter
    ));
    assert!(
        node.loaded_network().is_none(),
        "NetworkReady before any CNI config"
    );
    r.ok("NetworkReady=false: no CNI config yet, as on a fresh node");

    r.step("sandbox image: static pause binary in a one-layer OCI image, `ctr images import`");
    let image_id = node.import_pause_image();
    r.ok(&format!("CRI ImageStatus({IMAGE}) = {image_id}"));

    r.step("primary CNI config (bridge + host-local + portmap), then `mesh-redirect install`");
    let conflist = node.write_primary_conflist();
    let primary = std::fs::read(&conflist).unwrap();
    let loaded = node.wait_runtime_loaded(&conflist);
    assert_eq!(types(&loaded), ["bridge", "portmap"]);
    r.ok("NetworkReady=true: containerd loaded the primary chain (bridge, portmap)");
    // From here on the node has a network: containerd must log no CNI error but bad-0's.
    let log_from = node.containerd_log().len();
    node.start_installer();
    node.installer().wait_ready();
    r.ok("installer /readyz = 200 (in the node namespace, hostNetwork-style)");
    let loaded = node.wait_runtime_loaded(&conflist);
    assert_eq!(types(&loaded), ["bridge", "portmap", "mesh-redirect"]);
    assert_eq!(
        loaded["plugins"][2]["capabilities"]["io.kubernetes.cri.pod-annotations"],
        true
    );
    assert!(node.bin_dir().join("mesh-redirect").is_file());
    r.ok("containerd loaded the chain: bridge, portmap, mesh-redirect (annotations capability)");

    // "The rest of the cluster": servers in the node namespace, on the bridge's gateway
    // address and on a second address (for the excluded range).
    let cluster = serve(&node.ns.path(), ROOT, "node", &[8080, 9090], &[]);

    r.step("meshed pod: RunPodSandbox with Istio's annotations, as the kubelet sends it");
    let web = node
        .run_pod(node.pod_config("web-0", "default", MESHED, true))
        .unwrap_or_else(|e| panic!("RunPodSandbox web-0: {e}"));
    r.ok(&format!(
        "sandbox {} ip {} netns {} (from PodSandboxStatus verbose info)",
        &web.id[..12],
        web.ip,
        web.netns
    ));
    let l = add_line(&node, &web, "default");
    assert_eq!(l["decision"], "captured", "{l}");
    r.ok(&format!("mesh-redirect logged {}", brief(&l)));
    assert!(has_table(&web.netns), "no mesh_redirect table in web-0");
    r.ok("table inet mesh_redirect in the sandbox's netns");
    prove_capture(&r, &node, &web);

    r.step("pod without a sidecar (kubelet annotations only): no table");
    let plain = node
        .run_pod(node.pod_config(
            "plain-0",
            "default",
            &[("prometheus.io/scrape", "true")],
            true,
        ))
        .unwrap_or_else(|e| panic!("RunPodSandbox plain-0: {e}"));
    prove_skipped(&r, &node, &plain);

    r.step("pod with no annotations at all (a bare CRI client, e.g. `crictl runp`)");
    // containerd 1.6 passes the capability with a JSON null for a pod without annotations
    // (a nil Go map): the runtime honours the capability, the pod has no sidecar.
    let bare = node
        .run_pod(node.pod_config("bare-0", "default", &[], false))
        .unwrap_or_else(|e| panic!("RunPodSandbox bare-0 (no annotations): {e}"));
    prove_skipped(&r, &node, &bare);

    r.step("malformed annotation: RunPodSandbox fails with our message, nothing left behind");
    let veths = node.veths();
    let ips = node.leased_ips();
    let netns = list_dir(&node.netns_dir());
    let shims = node.shims().len();
    let err = node
        .run_pod(node.pod_config(
            "bad-0",
            "default",
            &[(STATUS, "{}"), (EXCLUDE_RANGES, "10.1.0.0/16,10.0.0.0/33")],
            true,
        ))
        .map(|sb| sb.id)
        .expect_err("RunPodSandbox must fail for a malformed annotation");
    let msg = err.to_string();
    for want in [
        "failed to setup network for sandbox",
        "plugin type=\"mesh-redirect\" failed (add)",
        "invalid pod annotation",
        EXCLUDE_RANGES,
        "10.0.0.0/33",
    ] {
        assert!(
            msg.contains(want),
            "{want:?} not in the error the kubelet gets: {msg}"
        );
    }
    r.ok(&format!(
        "the kubelet gets (kubectl describe pod shows): {msg}"
    ));
    let bad_id = msg
        .split("sandbox \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_default()
        .to_string();
    assert_eq!(bad_id.len(), 64, "sandbox id in {msg}");
    let bad = plugin_lines(&node, &bad_id, "ADD");
    assert!(
        bad.len() == 1 && bad[0]["code"] == 100,
        "mesh-redirect ADD for bad-0: {bad:?}"
    );
    assert!(
        node.cri
            .list_pod_sandbox()
            .unwrap()
            .iter()
            .all(|s| s.metadata.as_ref().is_none_or(|m| m.name != "bad-0")),
        "the failed sandbox is listed"
    );
    assert_eq!(node.veths(), veths, "veth left behind");
    assert_eq!(node.leased_ips(), ips, "IP lease left behind");
    assert_eq!(list_dir(&node.netns_dir()), netns, "netns left behind");
    assert_eq!(node.shims().len(), shims, "shim left behind");
    r.ok("no sandbox, veth, IP lease, netns or shim left behind (the runtime ran CNI DEL)");

    r.step("DaemonSet rollout: SIGTERM the installer, start a new one");
    let chained = std::fs::read(&conflist).unwrap();
    let st = node.stop_installer();
    assert!(st.success(), "installer exit status {st}");
    assert_eq!(
        std::fs::read(&conflist).unwrap(),
        chained,
        "the chain stays as it was"
    );
    assert!(node.bin_dir().join("mesh-redirect").exists());
    r.ok("old installer gone (MESH_REDIRECT_KEEP_ON_EXIT, as the DaemonSet runs it): entry and binary stay");
    let gap = node
        .run_pod(node.pod_config("web-gap", "default", MESHED, true))
        .unwrap_or_else(|e| panic!("RunPodSandbox web-gap: {e}"));
    assert_eq!(add_line(&node, &gap, "default")["decision"], "captured");
    r.ok(&format!(
        "pod web-gap ({}) started between the two installers: captured, no gap",
        gap.ip
    ));
    assert!(has_table(&web.netns), "web-0 lost its table");
    r.ok("running pods keep their ruleset (it lives in their netns)");
    node.start_installer();
    node.installer().wait_ready();
    let loaded = node.wait_runtime_loaded(&conflist);
    assert_eq!(types(&loaded), ["bridge", "portmap", "mesh-redirect"]);
    r.ok("new installer ready, the chain unchanged");
    let web1 = node
        .run_pod(node.pod_config("web-1", "default", MESHED, true))
        .unwrap_or_else(|e| panic!("RunPodSandbox web-1: {e}"));
    let l = add_line(&node, &web1, "default");
    assert_eq!(l["decision"], "captured", "{l}");
    r.ok(&format!(
        "new pod web-1 ({}): mesh-redirect ADD captured",
        web1.ip
    ));
    prove_capture(&r, &node, &web1);
    say("   (and web-0, started before the rollout)");
    prove_capture(&r, &node, &web);

    r.step("delete the pods: StopPodSandbox + RemovePodSandbox (the runtime's CNI DEL)");
    let pods = [&web, &plain, &bare, &web1, &gap];
    for pod in pods {
        node.remove_pod(pod);
        let dels = plugin_lines(&node, &pod.id, "DEL");
        assert!(
            !dels.is_empty() && dels.iter().all(|l| l.get("error").is_none()),
            "mesh-redirect DEL for {}: {dels:?}",
            pod.name
        );
        if pod.name.starts_with("web") {
            assert!(
                dels.iter().any(|l| l["decision"] == "deleted"),
                "{}: {dels:?}",
                pod.name
            );
        }
        assert!(
            !Path::new(&pod.netns).exists(),
            "{}'s netns still exists",
            pod.name
        );
        r.ok(&format!(
            "{}: DEL {}",
            pod.name,
            dels.iter()
                .map(|l| l["decision"].as_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", then ")
        ));
    }
    assert!(node.cri.list_pod_sandbox().unwrap().is_empty());
    assert!(node.veths().is_empty(), "veths left: {:?}", node.veths());
    assert!(
        node.leased_ips().is_empty(),
        "leases left: {:?}",
        node.leased_ips()
    );
    assert!(list_dir(&node.netns_dir()).is_empty(), "netns left");
    assert!(node.shims().is_empty(), "shims left: {:?}", node.shims());
    assert!(node.mounts().is_empty(), "mounts left: {:?}", node.mounts());
    let new_run_netns: Vec<String> = list_dir(Path::new("/run/netns"))
        .into_iter()
        .filter(|n| n.starts_with("cni-") && !node.run_netns_before.contains(n))
        .collect();
    assert!(
        new_run_netns.is_empty(),
        "new in /run/netns: {new_run_netns:?}"
    );
    r.ok(
        "no sandbox, veth, IP lease, netns, shim or mount left; no cni-* in the host's /run/netns",
    );

    r.step("containerd's log: CNI set up and torn down without errors");
    let log = node.containerd_log();
    for pod in pods {
        let torn = format!(
            "TearDown network for sandbox \\\"{}\\\" successfully",
            pod.id
        );
        assert!(log.contains(&torn), "no {torn:?} in containerd's log");
    }
    let (before, after) = log.split_at(log_from);
    let cni_trouble = |l: &&str| {
        let lc = l.to_lowercase();
        ["level=error", "level=warning", "level=fatal"]
            .iter()
            .any(|x| l.contains(x))
            && (lc.contains("cni") || lc.contains("network"))
    };
    // Before the primary config: only "no network config found" (a fresh node's state).
    let early: Vec<&str> = before
        .lines()
        .filter(cni_trouble)
        .filter(|l| !l.contains("no network config found"))
        .collect();
    assert!(early.is_empty(), "containerd logged:\n{}", early.join("\n"));
    let cni_errors: Vec<&str> = after
        .lines()
        .filter(cni_trouble)
        // Expected: the malformed pod's failure.
        .filter(|l| !l.contains(&bad_id) && !l.contains("Name:bad-0,"))
        .collect();
    assert!(
        cni_errors.is_empty(),
        "containerd logged CNI errors:\n{}",
        cni_errors.join("\n")
    );
    r.ok(&format!(
        "every sandbox's network torn down; no CNI error besides bad-0's ({} log lines)",
        log.lines().count()
    ));
    assert_eq!(
        node.plugin_log()
            .iter()
            .filter(|l| l.get("error").is_some())
            .count(),
        1,
        "mesh-redirect failed only for bad-0"
    );

    r.step("removing mesh-redirect from the node: stop the installer, `mesh-redirect uninstall`");
    assert!(node.stop_installer().success());
    common::uninstall(&node.bin_dir(), &node.conf_dir());
    assert_eq!(
        std::fs::read(&conflist).unwrap(),
        primary,
        "the primary config given back byte for byte"
    );
    assert!(!node.bin_dir().join("mesh-redirect").exists());
    let loaded = node.wait_runtime_loaded(&conflist);
    assert_eq!(types(&loaded), ["bridge", "portmap"]);
    r.ok("primary config byte for byte as before, binary gone, containerd reloaded the bare chain");

    let total = r.start.elapsed();
    r.step("cleanup: containerd, shims, mounts, cgroups, namespaces, temp dir (on drop)");
    drop(cluster);
    let (tmp, ns, cgroup_root, socket) = (
        node.tmp.path().to_path_buf(),
        node.ns.path(),
        node.cgroup_root.clone(),
        node.socket(),
    );
    drop(node);
    assert!(!tmp.exists(), "{} left", tmp.display());
    assert!(!Path::new(&ns).exists(), "{ns} left");
    assert!(
        node::cgroup_mounts()
            .iter()
            .all(|m| !Path::new(m).join(&cgroup_root).exists()),
        "cgroup {cgroup_root} left"
    );
    assert!(
        node::procs_with(|argv| argv.iter().any(|a| Path::new(a) == socket)).is_empty(),
        "a process of this containerd is left"
    );
    r.ok("nothing left: temp dir, node netns, cgroups, processes");
    say(&format!(
        "PASS  node e2e in {:.1}s ({NETWORK}: 5 pods started and deleted, 1 refused)",
        total.as_secs_f64()
    ));
}

/// Istio's `istio-validation` init container, as the kubelet runs (and retries) it in a pod:
/// exit code 0 or 126.
fn istio_validation(pod: &Sandbox) -> i32 {
    std::process::Command::new(common::probe())
        .args(["--netns", &pod.netns, "--gid", "1337", "--uid", "1337"])
        .args(["validate", "istio"])
        .output()
        .expect("run capture-probe validate")
        .status
        .code()
        .unwrap_or(-1)
}

/// The agent's log lines with this message.
fn agent_lines(node: &Node, msg: &str) -> Vec<Value> {
    node.installer()
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["msg"] == msg)
        .collect()
}

#[test]
fn pods_started_before_the_agent_are_repaired_in_place_through_the_cri() {
    let mut r = Report {
        start: Instant::now(),
        step: 0,
    };
    r.step("node with containerd and the primary network, mesh-redirect not chained yet");
    let mut node = Node::start();
    node.import_pause_image();
    let conflist = node.write_primary_conflist();
    let loaded = node.wait_runtime_loaded(&conflist);
    assert_eq!(types(&loaded), ["bridge", "portmap"]);
    r.ok("containerd runs pods with bridge + portmap only (a new node, before the DaemonSet)");
    let cluster = serve(&node.ns.path(), ROOT, "node", &[8080, 9090], &[]);

    r.step("pods start before the agent: meshed, plain, kube-system, malformed annotation");
    let mut run = |name: &str, ns: &str, ann: &[(&str, &str)]| {
        node.run_pod(node.pod_config(name, ns, ann, true))
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"))
    };
    let web_a = run("web-a", "default", MESHED);
    let web_b = run("web-b", "default", MESHED);
    let plain = run("plain-0", "default", &[("prometheus.io/scrape", "true")]);
    let sys = run("sys-0", "kube-system", MESHED);
    let bad = run(
        "bad-0",
        "default",
        &[(STATUS, "{}"), (EXCLUDE_RANGES, "10.1.0.0/16,10.0.0.0/33")],
    );
    // An Istio gateway, as the gateway chart's pods are injected: never captured, by ADD or by
    // the agent's repair (the same decision).
    let gw = run(
        "gw-0",
        "default",
        &[
            ("inject.istio.io/templates", "gateway"),
            (
                STATUS,
                r#"{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#,
            ),
        ],
    );
    let all = [&web_a, &web_b, &plain, &sys, &bad, &gw];
    for p in all {
        assert!(!has_table(&p.netns), "{} has a table already", p.name);
    }
    r.ok("6 sandboxes running, none captured: their traffic bypasses the proxy");
    prove_uncaptured(&r, &web_a);
    assert_eq!(istio_validation(&web_a), 126);
    r.ok("web-a's istio-validation fails (exit 126): the pod would sit in Init:Error");

    r.step("the agent starts: chains itself, then reconciles every sandbox through the CRI");
    let agent_start = Instant::now();
    node.start_installer();
    node.installer().wait_ready();
    let ready_after = agent_start.elapsed();
    for p in [&web_a, &web_b] {
        assert!(has_table(&p.netns), "{} not repaired", p.name);
    }
    let repaired = agent_lines(&node, "repaired a pod");
    let last_repair_ms = repaired
        .iter()
        .filter_map(|l| l["sinceStartMs"].as_u64())
        .max()
        .expect("repairs logged");
    r.ok(&format!(
        "/readyz 200 after {:.0} ms; the last repair {last_repair_ms} ms after the agent started ({} pods repaired)",
        ready_after.as_secs_f64() * 1e3,
        repaired.len()
    ));
    for l in &repaired {
        assert!(l["why"].to_string().contains("is missing"), "{l}");
    }
    for p in [&web_a, &web_b] {
        say(&format!("   {}:", p.name));
        prove_capture(&r, &node, p);
    }
    assert_eq!(istio_validation(&web_a), 0);
    r.ok("web-a's istio-validation, retried as the kubelet retries it, passes now");
    for p in [&plain, &sys, &bad, &gw] {
        assert!(!has_table(&p.netns), "{} was touched", p.name);
    }
    r.ok("plain-0 (no sidecar), sys-0 (kube-system), bad-0 (malformed) and gw-0 (an Istio gateway) untouched");
    let invalid = agent_lines(&node, "pod left alone: invalid annotation");
    assert!(
        invalid.iter().any(|l| l["pod"] == "default/bad-0"
            && l["error"]
                .as_str()
                .is_some_and(|e| e.contains(EXCLUDE_RANGES) && e.contains("10.0.0.0/33"))),
        "{invalid:?}"
    );
    r.ok("the agent reported bad-0's annotation and value in its log");

    r.step("someone deletes a table, then changes one: back by the next pass (every 1 s)");
    // The agent checks every pod in each pass and sleeps one period between passes. The pass
    // under way when the table changed may have looked at web-b already, so the one after it
    // repairs it: the second pass at the latest (counted), within a period plus two passes'
    // time. A pass over these six pods takes milliseconds (durationMs in the agent's log), so
    // two periods bound that with most of a period to spare; and since the flush comes right
    // after the first repair, its repair waits a whole period, so an agent that passed less
    // often than every period could not meet the bound there.
    let period = node::RECONCILE_PERIOD;
    let passes = || {
        node.installer()
            .value(r#"mesh_redirect_reconcile_passes_total{result="ok"}"#)
    };
    let back_by_the_next_pass = |what: &str, changed: Instant, before: f64| {
        let took = changed.elapsed();
        let passes = passes() - before;
        assert!(
            took <= 2 * period,
            "{what} after {took:?}: more than a period and two passes ({:?})",
            2 * period
        );
        assert!(
            passes <= 2.0,
            "{what} after {passes} passes: the pass after the one under way must repair it"
        );
        r.ok(&format!(
            "{what} after {:.0} ms, {passes} pass(es) later (period {period:?})",
            took.as_secs_f64() * 1e3
        ));
    };
    let before = passes();
    in_netns(
        &web_b.netns,
        &["nft", "delete", "table", "inet", "mesh_redirect"],
    );
    let t = Instant::now();
    common::wait_for(5, "web-b's table back", || has_table(&web_b.netns));
    back_by_the_next_pass("web-b's table back", t, before);
    let before = passes();
    in_netns(
        &web_b.netns,
        &["nft", "flush", "chain", "inet", "mesh_redirect", "outbound"],
    );
    let t = Instant::now();
    common::wait_for(5, "web-b's outbound rules back", || {
        in_netns(
            &web_b.netns,
            &["nft", "list", "chain", "inet", "mesh_redirect", "outbound"],
        )
        .contains("redirect to :15001")
    });
    back_by_the_next_pass("web-b's flushed outbound chain back", t, before);
    let repairs = agent_lines(&node, "repaired a pod");
    assert!(
        repairs
            .iter()
            .any(|l| l["pod"] == "default/web-b" && l["why"].to_string().contains("rule")),
        "the repair says why: {repairs:?}"
    );
    prove_capture(&r, &node, &web_b);

    r.step("a real Prometheus scrapes the agent: pods started now, and the repairs so far");
    let prom = prometheus::Prometheus::start(&node);
    // Its first scrape before the pods start: it sees their ADDs and DEL happen, so rates over
    // them (the dashboard's duration panels) have something to say.
    prom.wait(r#"up{job="mesh-redirect"}"#, 1.0);
    let web_c = node
        .run_pod(node.pod_config("web-c", "default", MESHED, true))
        .unwrap_or_else(|e| panic!("RunPodSandbox web-c: {e}"));
    let plain_1 = node
        .run_pod(node.pod_config("plain-1", "default", &[("app", "x")], true))
        .unwrap_or_else(|e| panic!("RunPodSandbox plain-1: {e}"));
    let refused = node
        .run_pod(node.pod_config(
            "bad-1",
            "default",
            &[(STATUS, "{}"), (EXCLUDE_IN_PORTS, "http")],
            true,
        ))
        .map(|s| s.id);
    assert!(refused.is_err(), "bad-1 must be refused");
    let inv = |outcome: &str, code: &str| {
        format!(
            r#"mesh_redirect_plugin_invocations_total{{command="ADD",outcome="{outcome}",code="{code}"}}"#
        )
    };
    for (expr, want, what) in [
        (inv("captured", ""), 1.0, "ADD captured (web-c)"),
        (inv("skipped", ""), 1.0, "ADD skipped (plain-1)"),
        (inv("error", "100"), 1.0, "ADD failed with code 100 (bad-1)"),
        (
            r#"mesh_redirect_plugin_duration_seconds_count{command="ADD"}"#.to_string(),
            3.0,
            "ADD durations observed",
        ),
        (
            r#"mesh_redirect_repairs_total{result="ok"}"#.to_string(),
            4.0,
            "repairs: web-a, web-b, web-b's table, web-b's chain",
        ),
        (
            r#"mesh_redirect_drift_total{kind="missing"}"#.to_string(),
            3.0,
            "tables found missing",
        ),
        (
            r#"mesh_redirect_drift_total{kind="differs"}"#.to_string(),
            1.0,
            "tables found differing",
        ),
        (
            r#"mesh_redirect_pods{state="captured"}"#.to_string(),
            3.0,
            "pods captured (web-a, web-b, web-c)",
        ),
        (
            r#"mesh_redirect_pods{state="invalid_annotation"}"#.to_string(),
            1.0,
            "bad-0",
        ),
        (
            r#"mesh_redirect_pods{state="skipped"}"#.to_string(),
            4.0,
            "plain-0, sys-0, gw-0, plain-1",
        ),
        ("mesh_redirect_chain_in_place".to_string(), 1.0, "chained"),
        ("mesh_redirect_ready".to_string(), 1.0, "ready"),
    ] {
        prom.wait(&expr, want);
        r.ok(&format!("Prometheus: {expr} = {want} ({what})"));
    }
    let p50 = prom
        .query(r#"histogram_quantile(0.5, rate(mesh_redirect_plugin_duration_seconds_bucket{command="ADD"}[1m]))"#)
        .or_else(|| prom.query(r#"histogram_quantile(0.5, mesh_redirect_plugin_duration_seconds_bucket{command="ADD"})"#));
    // Three ADDs were observed: their median is a duration (NaN: the buckets say nothing).
    let p50 = p50
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or_else(|| panic!("Prometheus: no ADD duration p50 from the histogram: {p50:?}"));
    r.ok(&format!(
        "Prometheus: ADD duration p50 from the histogram: {p50} s"
    ));
    let (_, text) = common::http_get_in(&node.ns.path(), node::METRICS_PORT, "/metrics")
        .expect("the agent's /metrics");
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // deploy/grafana-dashboard.json: every panel's query, with Grafana's variables as a
    // dashboard opened on "all nodes" sets them, answers with series from this agent.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana-dashboard.json"),
        )
        .expect("deploy/grafana-dashboard.json"),
    )
    .expect("the dashboard is JSON");
    // Every panel, also those inside rows (a collapsed row holds its panels).
    fn panels(list: &Value) -> Vec<&Value> {
        list.as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| std::iter::once(p).chain(panels(&p["panels"])))
            .collect()
    }
    let mut queries = 0;
    for panel in panels(&dash["panels"]) {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            // A series whose value is NaN is no data (a quantile of nothing, a rate of one
            // sample). rate() and increase() need two scrapes in their window: retry a few
            // seconds.
            let has_data = |r: &[Value]| {
                r.iter().any(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| !v.is_nan())
                })
            };
            let deadline = Instant::now() + std::time::Duration::from_secs(15);
            let result = loop {
                let r = prom
                    .instant(&q)
                    .unwrap_or_else(|e| panic!("dashboard panel {:?}: {q}: {e}", panel["title"]));
                if has_data(&r) || Instant::now() > deadline {
                    break r;
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            };
            assert!(
                !result.is_empty(),
                "dashboard panel {:?}: {q}: no series",
                panel["title"]
            );
            assert!(
                has_data(&result),
                "dashboard panel {:?}: {q}: no series with a value: {result:?}",
                panel["title"]
            );
            queries += 1;
        }
    }
    assert!(
        queries > 0,
        "deploy/grafana-dashboard.json: no panel query found"
    );
    r.ok(&format!(
        "deploy/grafana-dashboard.json: all {queries} panel queries run in Prometheus and return series with values"
    ));
    r.ok(&format!(
        "promtool check metrics passes on the scraped text ({} lines)",
        text.lines().count()
    ));
    node.remove_pod(&web_c);
    node.remove_pod(&plain_1);
    drop(prom);

    r.step("the runtime goes away and comes back; a sandbox vanishes; a netns breaks");
    let sock = node.socket();
    let hidden = sock.with_extension("hidden");
    std::fs::rename(&sock, &hidden).unwrap();
    common::wait_for(5, "not ready without the runtime", || {
        node.installer()
            .get("/readyz")
            .is_some_and(|(c, b)| c == 503 && b.contains("cannot reconcile"))
    });
    r.ok("CRI socket gone: /readyz 503 \"cannot reconcile…\", the agent keeps running");
    std::fs::rename(&hidden, &sock).unwrap();
    node.installer().wait_ready();
    r.ok("socket back: ready again");
    // A sandbox removed under the agent's feet, and one whose netns is torn down while its
    // sandbox is still listed: passes go on.
    node.remove_pod(&plain);
    common::run(&["umount", &web_a.netns]);
    common::wait_for(5, "the agent to report web-a", || {
        !agent_lines(&node, "cannot check a pod").is_empty()
    });
    // A meshed pod it cannot check is a pod possibly uncaptured: not ready, and says which.
    common::wait_for(5, "not ready, naming web-a", || {
        node.installer().get("/readyz").is_some_and(|(c, b)| {
            c == 503 && b.contains("1 meshed pod(s) not captured or not checked: default/web-a")
        })
    });
    assert!(has_table(&web_b.netns));
    r.ok(
        "plain-0 removed mid-run and web-a's netns unmounted: logged, the agent stays up, \
          /readyz 503 names default/web-a",
    );
    node.remove_pod(&web_a);
    node.installer().wait_ready();
    r.ok("web-a's sandbox removed: ready again");
    drop(cluster);
    for p in [&web_b, &sys, &bad, &gw] {
        node.remove_pod(p);
    }
    assert!(node.stop_installer().success());
    let total = r.start.elapsed();
    say(&format!(
        "PASS  reconcile e2e in {:.1}s (2 pods repaired {last_repair_ms} ms after the agent started)",
        total.as_secs_f64()
    ));
}

/// Benchmark (scripts/bench.sh --only repair; not part of `cargo test`): MESH_REDIRECT_BENCH_PODS
/// (default 100) meshed pods started before the agent, all repaired by its first pass; prints
/// the pass's own duration and the time from the agent's start to its last repair.
#[test]
#[ignore]
fn bench_repair_pass_over_preexisting_pods() {
    let n: usize = std::env::var("MESH_REDIRECT_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut node = Node::start();
    node.import_pause_image();
    let conflist = node.write_primary_conflist();
    node.wait_runtime_loaded(&conflist);
    let t = Instant::now();
    let pods: Vec<Sandbox> = (0..n)
        .map(|i| {
            node.run_pod(node.pod_config(&format!("web-{i}"), "default", MESHED, true))
                .unwrap_or_else(|e| panic!("RunPodSandbox web-{i}: {e}"))
        })
        .collect();
    say(&format!(
        "{n} meshed pods started without the chain in {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    let start = Instant::now();
    node.start_installer();
    node.installer().wait_ready();
    let ready = start.elapsed();
    for p in &pods {
        assert!(has_table(&p.netns), "{} not repaired", p.name);
    }
    let pass = agent_lines(&node, "reconcile pass")
        .into_iter()
        .find(|l| l["repaired"].as_u64().unwrap_or(0) > 0)
        .expect("a pass that repaired");
    let last = agent_lines(&node, "repaired a pod")
        .iter()
        .filter_map(|l| l["sinceStartMs"].as_u64())
        .max()
        .unwrap_or(0);
    say(&format!(
        "BENCH repair: pods={n} repaired_in_first_pass={} pass_ms={:.1} agent_start_to_last_repair_ms={last} ready_ms={:.0}",
        pass["repaired"],
        pass["durationMs"].as_f64().unwrap_or(f64::NAN),
        ready.as_secs_f64() * 1e3
    ));
    assert_eq!(pass["repaired"].as_u64(), Some(n as u64));
    for p in &pods {
        node.remove_pod(p);
    }
    assert!(node.stop_installer().success());
}
