//! The agent on a hostile or faulty node (issue 18), through the real containerd: a pod that
//! defends its own table, a runtime that goes away or pauses mid-pass (a byte forwarder in
//! front of containerd's socket cuts or holds one request), a sandbox stopped between the
//! list and the visit, containerd restarted and the agent SIGKILLed mid-pass, and a soak of
//! pod churn.

use crate::containerd::Sandbox;
use crate::criproxy::{CriProxy, Fault};
use crate::node::{self, METRICS_PORT, Node, say};
use crate::{MESHED, has_table, types};
use common::{sample, unique, wait_for};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Someone else's `table inet mesh_redirect { flags owner; }` in a pod's netns, held by an
/// `nft -i` session inside it (a pod with NET_ADMIN can do this). Released on drop.
struct Defended(Child);

impl Defended {
    fn hold(netns: &str) -> Defended {
        use std::io::Write;
        let _ = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["nft", "delete", "table", "inet", "mesh_redirect"])
            .status();
        let mut child = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nft -i");
        let stdin = child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "add table inet mesh_redirect {{ flags owner; }}").unwrap();
        writeln!(stdin, "add chain inet mesh_redirect mine").unwrap();
        stdin.flush().unwrap();
        wait_for(5, "the pod's own table", || {
            ruleset(netns).contains("chain mine")
        });
        Defended(child)
    }
}

impl Drop for Defended {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metrics(node: &Node) -> String {
    common::http_get_in(&node.ns.path(), METRICS_PORT, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

fn readyz(node: &Node) -> (u16, String) {
    node.installer()
        .get("/readyz")
        .unwrap_or((0, String::new()))
}

/// /readyz sampled every 50 ms for `d`: how many samples, and the non-200 answers.
fn sample_readyz(node: &Node, d: Duration) -> (usize, Vec<String>) {
    let t = Instant::now();
    let (mut n, mut bad) = (0, Vec::new());
    while t.elapsed() < d {
        let (c, b) = readyz(node);
        n += 1;
        if c != 200 {
            bad.push(format!("{c} {}", b.trim()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (n, bad)
}

fn unready_during(node: &Node, d: Duration) -> Vec<String> {
    sample_readyz(node, d).1
}

/// The namespace's whole ruleset.
fn ruleset(netns: &str) -> String {
    node::in_netns(netns, &["nft", "list", "ruleset"])
}

/// A node with the primary network loaded and the agent running through a CRI proxy.
fn node_with_agent() -> (Node, CriProxy) {
    let mut node = Node::start();
    node.import_pause_image();
    let conflist = node.write_primary_conflist();
    assert_eq!(
        types(&node.wait_runtime_loaded(&conflist)),
        ["bridge", "portmap"]
    );
    let proxy = CriProxy::start(&node.dir("cri-proxy.sock"), &node.socket());
    node.start_installer_with(&proxy.socket.clone(), &[]);
    node.installer().wait_ready();
    (node, proxy)
}

fn run(node: &mut Node, name: &str, ann: &[(&str, &str)]) -> Sandbox {
    node.run_pod(node.pod_config(name, "default", ann, true))
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"))
}

#[test]
fn hostile_pods_and_a_flaky_runtime_do_not_fool_readiness() {
    let (mut node, proxy) = node_with_agent();
    let web_a = run(&mut node, "web-a", MESHED);
    let web_b = run(&mut node, "web-b", MESHED);
    let plain = run(&mut node, "plain", &[("app", "x")]);
    assert!(has_table(&web_a.netns) && has_table(&web_b.netns));
    node.installer().wait_ready();

    say("== 18.3: a pod defends its own table: reported, not holding the node not ready");
    let held = Defended::hold(&web_b.netns);
    wait_for(10, "the agent to report web-b", || {
        node.installer()
            .log()
            .lines()
            .any(|l| l.contains("pod defends its own capture table") && l.contains("default/web-b"))
    });
    wait_for(5, "pods{state=defended} 1", || {
        sample(&metrics(&node), r#"mesh_redirect_pods{state="defended"}"#) == 1.0
    });
    let bad = unready_during(&node, Duration::from_secs(3));
    assert!(
        bad.is_empty(),
        "not ready while a pod defends its table: {bad:?}"
    );
    say("   web-b logged and counted as defended; /readyz 200 throughout 3 periods");
    drop(held);
    wait_for(10, "web-b repaired once it let go", || {
        ruleset(&web_b.netns).contains("redirect to :15001")
    });
    wait_for(5, "defended back to 0", || {
        sample(&metrics(&node), r#"mesh_redirect_pods{state="defended"}"#) == 0.0
    });

    say("== 18.4: the runtime goes away after listing the sandboxes: the pass fails");
    let passes_ok = |n: &Node| {
        sample(
            &metrics(n),
            r#"mesh_redirect_reconcile_passes_total{result="ok"}"#,
        )
    };
    let before = passes_ok(&node);
    // Request 1 of a pass's connection lists the sandboxes; 2 reads the first one's status.
    proxy.arm(
        2,
        Fault::Cut {
            refuse_for: Duration::from_secs(3),
        },
    );
    proxy.wait_fired(10);
    std::thread::sleep(Duration::from_millis(150));
    let (code, body) = readyz(&node);
    let (n, bad) = sample_readyz(&node, Duration::from_millis(2500));
    assert_eq!(code, 503, "ready after a pass the runtime left: {body}");
    assert!(
        body.contains("mid-pass") || body.contains("not reachable"),
        "{body}"
    );
    assert_eq!(
        bad.len(),
        n,
        "ready at some point while the runtime was away"
    );
    assert_eq!(
        passes_ok(&node),
        before,
        "a pass that missed sandboxes counted as ok"
    );
    say(&format!("   /readyz: {}", body.trim()));
    node.installer().wait_ready();

    say("== 18.7: sandboxes stopped between the list and the visit are gone, not uncaptured");
    let repairs = |n: &Node| sample(&metrics(n), r#"mesh_redirect_repairs_total{result="ok"}"#);
    let repairs_before = repairs(&node);
    proxy.arm(2, Fault::Hold);
    proxy.wait_fired(10);
    // The kubelet deletes the pods now: DEL removes their tables, the runtime their netns.
    for p in [&web_a, &web_b, &plain] {
        node.stop_pod(p);
    }
    proxy.release();
    let bad = unready_during(&node, Duration::from_millis(2500));
    assert!(bad.is_empty(), "not ready because of stopped pods: {bad:?}");
    assert_eq!(
        repairs(&node),
        repairs_before,
        "a stopped pod was \"repaired\""
    );
    for p in [&web_a, &web_b, &plain] {
        node.remove_pod(p);
    }
    node.installer().wait_ready();
    say("   held the first status read while 3 pods stopped: no repair, /readyz 200 throughout");
    assert!(node.stop_installer().success());
}

#[test]
fn containerd_restarts_and_agent_kills_mid_pass_leave_every_pod_captured() {
    let (mut node, proxy) = node_with_agent();
    let pods: Vec<Sandbox> = (0..12)
        .map(|i| run(&mut node, &format!("web-{i}"), MESHED))
        .collect();
    node.installer().wait_ready();
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };

    say("== containerd SIGKILLed and restarted at random moments, 5 times");
    let repairs = |n: &Node| sample(&metrics(n), r#"mesh_redirect_repairs_total{result="ok"}"#);
    let before = repairs(&node);
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(next() % 1200));
        node.restart_containerd();
        node.installer().wait_ready();
        for p in &pods {
            assert!(
                has_table(&p.netns),
                "restart {i}: {} lost its table",
                p.name
            );
        }
    }
    assert_eq!(
        repairs(&node),
        before,
        "a runtime restart made the agent repair pods"
    );
    say("   ready again after each restart; no pod lost its table; nothing repaired");

    say("== the agent SIGKILLed at random moments of a repair pass, 20 times");
    drop(proxy);
    let _ = node.stop_installer();
    let socket = node.socket();
    for trial in 0..20 {
        for p in &pods {
            node::in_netns(
                &p.netns,
                &["nft", "delete", "table", "inet", "mesh_redirect"],
            );
        }
        node.start_installer_with(&socket, &[]);
        std::thread::sleep(Duration::from_millis(50 + next() % 400));
        node.kill_installer();
        node.start_installer_with(&socket, &[]);
        node.installer().wait_ready();
        for p in &pods {
            assert!(
                ruleset(&p.netns).contains("redirect to :15001"),
                "trial {trial}: {} not captured",
                p.name
            );
        }
        let m = metrics(&node);
        assert_eq!(
            sample(&m, r#"mesh_redirect_pods{state="captured"}"#)
                + sample(&m, r#"mesh_redirect_pods{state="repaired"}"#),
            12.0,
            "trial {trial}"
        );
        node.kill_installer();
    }
    say("   after each kill a new agent was ready with all 12 pods captured");
    for p in &pods {
        node.remove_pod(p);
    }
}

/// Pod churn with the agent running: `MESH_REDIRECT_SOAK_CYCLES` create/delete cycles (100 in
/// `cargo test`; `scripts/soak.sh` runs 1,000). The agent's RSS and open fds stay flat, its
/// counts are exact, and /readyz never flips.
#[test]
fn pod_churn_keeps_the_agent_flat_and_its_counts_exact() {
    let cycles: usize = std::env::var("MESH_REDIRECT_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let (mut node, proxy) = node_with_agent();
    let pid = node.installer_pid();
    let rss = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches(" kB")
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, ns) = (stop.clone(), node.ns.path());
        std::thread::spawn(move || {
            let (mut n, mut bad) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match common::http_get_in(&ns, node::READY_PORT, "/readyz") {
                    Some((200, _)) => {}
                    other => bad.push(format!("{other:?}")),
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (n, bad)
        })
    };
    let mut samples = Vec::new();
    let t = Instant::now();
    for i in 0..cycles {
        let name = unique("churn-");
        let p = run(&mut node, &name, MESHED);
        node.remove_pod(&p);
        if i % (cycles / 10).max(1) == 0 {
            samples.push((i, rss(), fds()));
        }
    }
    let took = t.elapsed();
    // Let the agent take in the last events and a last pass.
    std::thread::sleep(Duration::from_secs(2));
    samples.push((cycles, rss(), fds()));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (n, bad) = sampler.join().unwrap();
    let m = metrics(&node);
    let inv = |c: &str, o: &str| {
        sample(
            &m,
            &format!(
                r#"mesh_redirect_plugin_invocations_total{{command="{c}",outcome="{o}",code=""}}"#
            ),
        )
    };
    say(&format!(
        "   soak: {cycles} cycles in {:.0} s; RSS kB / fds by cycle: {samples:?}; /readyz sampled {n} times, {} not 200",
        took.as_secs_f64(),
        bad.len()
    ));
    assert_eq!(inv("ADD", "captured"), cycles as f64, "ADDs counted");
    assert!(
        inv("DEL", "ok") >= cycles as f64,
        "DELs counted: {}",
        inv("DEL", "ok")
    );
    assert!(
        bad.is_empty(),
        "/readyz flipped: {:?}",
        &bad[..bad.len().min(5)]
    );
    let (first, last) = (samples[1], samples[samples.len() - 1]);
    assert!(last.2 <= first.2 + 2, "fds grew: {samples:?}");
    assert!(
        last.1 <= first.1 + 2048,
        "RSS grew by more than 2 MiB: {samples:?}"
    );
    drop(proxy);
    assert!(node.stop_installer().success());
}

/// Istio's rules for a default pod, as istio-cni loads them (istio/istio 86c9f01
/// `cni/pkg/plugin/testdata/basic.txt.golden`, IPv4).
const ISTIO_BASIC: &str = "*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -p tcp --dport 15020 -j RETURN
-A ISTIO_OUTPUT -p udp --dport 15020 -j RETURN
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

/// Issue 22, migration: pods istio-cni captured before mesh-redirect was installed keep their
/// rules (a second layer would fight them) and are reported; pods with nothing are captured;
/// readiness holds.
#[test]
fn pods_their_mesh_captured_are_left_alone_while_migrating() {
    let mut node = Node::start();
    node.import_pause_image();
    let conflist = node.write_primary_conflist();
    node.wait_runtime_loaded(&conflist);
    // Before mesh-redirect: one pod captured by istio-cni (its golden rules, loaded with
    // iptables-restore as istio-cni does), one not captured at all.
    let by_istio = run(&mut node, "by-istio", MESHED);
    let nothing = run(&mut node, "nothing", MESHED);
    let rules = node.dir("istio-basic.rules");
    std::fs::write(&rules, ISTIO_BASIC).unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", by_istio.netns))
        .args(["iptables-restore"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = node.socket();
    node.start_installer_with(&socket, &[]);
    node.installer().wait_ready();
    assert!(has_table(&nothing.netns), "the uncaptured pod is repaired");
    assert!(
        !has_table(&by_istio.netns),
        "istio-cni's pod got a second layer"
    );
    wait_for(5, "the agent to report by-istio", || {
        node.installer().log().lines().any(|l| {
            l.contains("pod captured by its mesh's own rules") && l.contains("default/by-istio")
        })
    });
    wait_for(5, "pods{state=foreign_capture} 1", || {
        sample(
            &metrics(&node),
            r#"mesh_redirect_pods{state="foreign_capture"}"#,
        ) == 1.0
    });
    let bad = unready_during(&node, Duration::from_secs(2));
    assert!(bad.is_empty(), "{bad:?}");
    // Its traffic still goes through Istio's rules to the proxy.
    let _cluster = common::serve(&node.ns.path(), common::ROOT, "node", &[8080], &[]);
    let _proxy = common::serve(
        &by_istio.netns,
        common::PROXY,
        "proxy",
        &[15001, 15006],
        &[],
    );
    let r = common::connect(
        &by_istio.netns,
        common::APP,
        &common::hp(node::GATEWAY, 8080),
    );
    assert!(r.as_deref().is_ok_and(|l| l.starts_with("proxy")), "{r:?}");
    say("   istio-cni's pod left alone (reported, counted), the other repaired, ready throughout");
    for p in [&by_istio, &nothing] {
        node.remove_pod(p);
    }
    assert!(node.stop_installer().success());
}
