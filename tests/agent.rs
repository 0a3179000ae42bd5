//! The node agent's metrics from the plugin's events, and what bad input does to them: counts
//! exact under a burst of 100 concurrent ADDs, garbage and oversized or endless messages
//! rejected and counted as such, a flood of connections, the socket file removed or replaced.
//! The agent runs for real (chaining into throwaway CNI dirs, no reconciling here) with its
//! metrics in a network namespace of the test's; the plugin runs as the runtime runs it.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_mesh-redirect-agent");
const METRICS_PORT: u16 = 15701;

struct Agent {
    child: Child,
    ns: Netns,
    tmp: TempDir,
    socket: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        require_root();
        let tmp = TempDir::new();
        for d in ["bin", "net.d"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        std::fs::write(
            tmp.path().join("net.d/10-bridge.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        let ns = Netns::new("mrt-agent-");
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        let socket = tmp.path().join("run/events.sock");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, AGENT, "install"])
            .arg("--cni-bin-dir")
            .arg(tmp.path().join("bin"))
            .arg("--cni-conf-dir")
            .arg(tmp.path().join("net.d"))
            .args(["--reconcile-period", "0"])
            .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])
            .arg("--event-socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("agent.log")).unwrap())
            .spawn()
            .expect("start the agent");
        let a = Agent {
            child,
            ns,
            tmp,
            socket,
        };
        let t = Instant::now();
        while a.metrics().is_none() || !a.socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "agent did not start:\n{}",
                a.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("agent.log")).unwrap_or_default()
    }

    fn metrics(&self) -> Option<String> {
        http_get_in(&self.ns.path(), METRICS_PORT, "/metrics")
            .filter(|(c, _)| *c == 200)
            .map(|(_, b)| b)
    }

    /// A sample's value (0 when absent), `name{labels}` written as in the text format.
    fn value(&self, series: &str) -> f64 {
        let text = self.metrics().unwrap_or_default();
        sample(&text, series)
    }

    /// Waits until `series` reaches `want`.
    fn wait_value(&self, series: &str, want: f64) {
        let t = Instant::now();
        loop {
            let v = self.value(series);
            if v == want {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{series} = {v}, want {want}\n{}",
                self.metrics().unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series in Prometheus text (labels in any order).
fn sample(text: &str, series: &str) -> f64 {
    let (name, labels) = match series.split_once('{') {
        Some((n, l)) => (n, l.trim_end_matches('}')),
        None => (series, ""),
    };
    let want: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            let (n, ls) = match s.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (s, ""),
            };
            let have: Vec<&str> = ls.split(',').filter(|s| !s.is_empty()).collect();
            (n == name && want.len() == have.len() && want.iter().all(|w| have.contains(w)))
                .then(|| v.parse().ok())
                .flatten()
        })
        .next()
        .unwrap_or(0.0)
}

/// The plugin's ADD for a pod in a fresh netns, with the events going to `socket`.
fn add(ns: &Netns, socket: &Path, annotations: Value) -> (bool, Value) {
    let conf = plugin_conf(annotations, json!({"eventSocket": socket}));
    invoke("ADD", &ns.path(), conf.to_string().as_bytes(), &[])
}

#[test]
fn a_burst_of_100_concurrent_adds_is_counted_exactly() {
    let a = Agent::start();
    // As on many nodes: 10 datagrams at most per unix socket. Events are not datagrams.
    a.ns.exec(&["sysctl", "-qw", "net.unix.max_dgram_qlen=10"]);
    let pods: Vec<Netns> = (0..100).map(|_| Netns::new("mrt-burst-")).collect();
    for p in &pods {
        p.exec(&["ip", "link", "set", "lo", "up"]);
    }
    let socket = a.socket.clone();
    let results: Vec<(bool, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let socket = socket.clone();
                s.spawn(move || {
                    // 80 meshed, 20 without a sidecar.
                    let ann = if i < 80 {
                        json!({STATUS: "{}"})
                    } else {
                        json!({"app": "x"})
                    };
                    // The plugin runs inside the agent's namespace's peer: the socket is a
                    // path, so the netns does not matter.
                    add(p, &socket, ann)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|(ok, _)| *ok), "every ADD succeeded");
    a.wait_value(
        r#"mesh_redirect_plugin_invocations_total{command="ADD",outcome="captured",code=""}"#,
        80.0,
    );
    a.wait_value(
        r#"mesh_redirect_plugin_invocations_total{command="ADD",outcome="skipped",code=""}"#,
        20.0,
    );
    a.wait_value(
        r#"mesh_redirect_plugin_duration_seconds_count{command="ADD"}"#,
        100.0,
    );
    let m = a.metrics().unwrap();
    assert_eq!(
        sample(
            &m,
            r#"mesh_redirect_plugin_events_rejected_total{kind="malformed"}"#
        ),
        0.0
    );
    // An error is counted with its code.
    let ns = Netns::new("mrt-bad-");
    let (ok, out) = add(
        &ns,
        &socket,
        json!({STATUS: "{}", "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"}),
    );
    assert!(!ok && out["code"] == 100);
    a.wait_value(
        r#"mesh_redirect_plugin_invocations_total{command="ADD",outcome="error",code="100"}"#,
        1.0,
    );
}

#[test]
fn garbage_floods_and_a_replaced_socket_change_no_count_and_block_nothing() {
    let a = Agent::start();
    let send = |bytes: &[u8]| {
        if let Ok(mut s) = UnixStream::connect(&a.socket) {
            let _ = s.write_all(bytes);
        }
    };
    let captured =
        r#"mesh_redirect_plugin_invocations_total{command="ADD",outcome="captured",code=""}"#;
    let rejected = |k: &str| format!(r#"mesh_redirect_plugin_events_rejected_total{{kind="{k}"}}"#);
    // Garbage, wrong shapes, values out of range.
    for g in [
        &b"\x00\xff garbage"[..],
        b"{}",
        b"[1,2,3]",
        br#"{"v":1,"command":"ADD","outcome":"captured","code":null,"seconds":-1}"#,
        br#"{"v":1,"command":"HACK","outcome":"captured","code":null,"seconds":0.001}"#,
        br#"{"v":2,"command":"ADD","outcome":"captured","code":null,"seconds":0.001}"#,
        br#"{"v":1,"command":"ADD","outcome":"pwned","code":null,"seconds":0.001}"#,
        br#"{"v":1,"command":"ADD","outcome":"error","code":99999,"seconds":0.001}"#,
    ] {
        send(g);
    }
    a.wait_value(&rejected("malformed"), 8.0);
    // Oversized: more than an event may be.
    send(&vec![b'x'; 100_000]);
    a.wait_value(&rejected("oversized"), 1.0);
    // A connection that never finishes is cut after its timeout, and blocks nobody meanwhile.
    let hold = UnixStream::connect(&a.socket).unwrap();
    (&hold).write_all(b"{\"v\":1,").unwrap();
    // A flood of connections.
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..250 {
                    send(b"flood");
                }
            });
        }
    });
    let flood = t.elapsed();
    // Real events still counted, exactly.
    let pods: Vec<Netns> = (0..5).map(|_| Netns::new("mrt-ev-")).collect();
    for p in &pods {
        assert!(add(p, &a.socket, json!({STATUS: "{}"})).0);
    }
    a.wait_value(captured, 5.0);
    assert_eq!(a.value(&rejected("oversized")), 1.0);
    a.wait_value(&rejected("malformed"), 2008.0);
    a.wait_value(&rejected("incomplete"), 1.0);
    drop(hold);
    println!(
        "2,000 garbage connections sent in {:.0} ms",
        flood.as_secs_f64() * 1e3
    );

    // The socket file replaced by a regular file: the plugin neither blocks nor fails, and the
    // agent binds its socket again.
    std::fs::remove_file(&a.socket).unwrap();
    std::fs::write(&a.socket, b"not a socket").unwrap();
    let p = Netns::new("mrt-ev-");
    let t = Instant::now();
    assert!(add(&p, &a.socket, json!({STATUS: "{}"})).0);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "ADD took {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    while !std::fs::symlink_metadata(&a.socket)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "socket not rebound:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = Netns::new("mrt-ev-");
    assert!(add(&p, &a.socket, json!({STATUS: "{}"})).0);
    a.wait_value(captured, 6.0);
    // Removed altogether: the same.
    std::fs::remove_file(&a.socket).unwrap();
    let p = Netns::new("mrt-ev-");
    assert!(add(&p, &a.socket, json!({STATUS: "{}"})).0);
    assert!(a.log().contains("binding it again"), "{}", a.log());
    // The agent is still whole: health and metrics answer.
    assert_eq!(
        http_get_in(&a.ns.path(), METRICS_PORT, "/healthz").map(|(c, _)| c),
        Some(200)
    );
}

#[test]
fn metrics_are_prometheus_text_and_openmetrics_on_request() {
    let a = Agent::start();
    a.wait_value("mesh_redirect_chain_in_place", 1.0);
    let m = a.metrics().unwrap();
    for want in [
        "# TYPE mesh_redirect_plugin_invocations_total counter",
        "# TYPE mesh_redirect_plugin_duration_seconds histogram",
        "# TYPE mesh_redirect_pods gauge",
        "# TYPE mesh_redirect_repairs_total counter",
        "# TYPE mesh_redirect_drift_total counter",
        "# TYPE mesh_redirect_reconcile_pass_duration_seconds histogram",
        "mesh_redirect_chain_in_place 1",
        "mesh_redirect_binary_current 1",
        "mesh_redirect_flapping 0",
        "mesh_redirect_build_info{",
    ] {
        assert!(m.contains(want), "{want:?} missing:\n{m}");
    }
    assert!(
        m.contains("libnftnl=\"") && m.contains("git_commit=\""),
        "{m}"
    );
    assert!(!m.contains("# EOF"), "the classic format has no EOF marker");
    // A scraper asking for OpenMetrics gets it.
    let (netns, port) = (a.ns.path(), METRICS_PORT);
    let open = std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).ok()?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        std::io::Read::read_to_string(&mut s, &mut resp).ok()?;
        Some(resp)
    })
    .join()
    .unwrap()
    .unwrap();
    assert!(open.contains("application/openmetrics-text"), "{open}");
    assert!(open.trim_end().ends_with("# EOF"), "{open}");
}
