//! The node agent's metrics from the plugin's events, and what bad input does to them: counts
//! exact under a burst of 100 concurrent ADDs, garbage and oversized or endless messages
//! rejected and counted as such, a flood of connections, the socket file removed or replaced.
//! The agent runs for real (chaining into throwaway CNI dirs, no reconciling here) with its
//! metrics in a network namespace of the test's; the plugin runs as the runtime runs it.

use common::agent::*;
use common::memcg;
use common::*;
use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The plugin's ADD for a pod in a fresh netns, with the events going to `socket`.
fn add(ns: &Netns, socket: &Path, annotations: Value) -> (bool, Value) {
    let conf = plugin_conf(annotations, json!({"eventSocket": socket}));
    invoke("ADD", &ns.path(), conf.to_string().as_bytes(), &[])
}

#[test]
fn a_burst_of_100_concurrent_adds_is_counted_exactly() {
    let a = Agent::start();
    // As on many nodes: 10 datagrams at most per unix socket. Events are not datagrams.
    run(&[
        "ip",
        "netns",
        "exec",
        &a.ns_name,
        "sysctl",
        "-qw",
        "net.unix.max_dgram_qlen=10",
    ]);
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

/// How many of `pid`'s descriptors are netlink sockets of `ns` (their inodes, from
/// `/proc/PID/fd`, listed in the namespace's `/proc/net/netlink`).
fn netlink_fds_of(pid: u32, ns: &Netns) -> usize {
    let table = ns.exec(&["cat", "/proc/net/netlink"]);
    let inodes: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy().to_string();
                    Some(
                        t.strip_prefix("socket:[")?
                            .trim_end_matches(']')
                            .to_string(),
                    )
                })
                .filter(|i| inodes.contains(&i.as_str()))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_plugin_hands_its_netlink_socket_to_the_agent_which_closes_it() {
    let a = Agent::start();
    let released = "mesh_redirect_plugin_sockets_released_total";
    let ns = Netns::new("mrt-linger-");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    let conf = plugin_conf(json!({STATUS: "{}"}), json!({"eventSocket": &a.socket}));
    let call = |cmd: &str| invoke(cmd, &ns.path(), conf.to_string().as_bytes(), &[]);
    // Every run that used a netfilter socket hands it over: an ADD, a re-ADD that replaces
    // the table, a DEL that deletes it (the two whose release waits on every kernel).
    assert!(call("ADD").0);
    assert!(call("ADD").0);
    let (ok, out) = call("DEL");
    assert!(ok, "{out}");
    assert!(!ns.has_table(), "the table is gone when DEL returns");
    a.wait_value(released, 3.0);
    // And the agent closes what it took.
    let deadline = Instant::now() + Duration::from_secs(10);
    while netlink_fds_of(a.child.id(), &ns) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        netlink_fds_of(a.child.id(), &ns),
        0,
        "the agent keeps none of the pod's sockets"
    );
    // With nobody listening, DEL closes its socket itself and still succeeds.
    assert!(call("ADD").0);
    let gone = plugin_conf(
        json!({STATUS: "{}"}),
        json!({"eventSocket": "/nonexistent/events.sock"}),
    );
    let (ok, out) = invoke("DEL", &ns.path(), gone.to_string().as_bytes(), &[]);
    assert!(ok && !ns.has_table(), "{out}");
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
    // Removed altogether: the same, and its event counted once it is back.
    let rebinds = || a.log().matches("binding it again").count();
    let before = rebinds();
    std::fs::remove_file(&a.socket).unwrap();
    let p = Netns::new("mrt-ev-");
    assert!(add(&p, &a.socket, json!({STATUS: "{}"})).0);
    let t = Instant::now();
    while rebinds() == before {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "not rebound:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = Netns::new("mrt-ev-");
    assert!(add(&p, &a.socket, json!({STATUS: "{}"})).0);
    a.wait_value(captured, 7.0);
    // The agent is still whole: health and metrics answer.
    assert_eq!(a.get("/healthz").map(|(c, _)| c), Some(200));
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
    let (netns, port) = (a.netns.clone(), METRICS_PORT);
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

/// `n` connections to `127.0.0.1:port` inside `netns`, each sending a request head that never
/// ends, `chunk` bytes per round, for `dur` (a connection the agent closes is opened again).
/// Returns how many connections were opened in all.
fn slow_flood(netns: &str, port: u16, n: usize, chunk: usize, dur: Duration) -> usize {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        use std::io::ErrorKind;
        let f = std::fs::File::open(&netns).expect("netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let pad = format!("X-Pad: {}\r\n", "a".repeat(chunk.saturating_sub(10)));
        let open = || {
            let s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_nonblocking(true).ok()?;
            (&s).write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .ok()?;
            Some(s)
        };
        let mut opened = 0;
        let mut conns: Vec<Option<std::net::TcpStream>> = (0..n).map(|_| None).collect();
        let t = Instant::now();
        while t.elapsed() < dur {
            for c in conns.iter_mut() {
                if c.is_none() {
                    *c = open();
                    opened += c.is_some() as usize;
                }
                if let Some(s) = c {
                    match (&*s).write(pad.as_bytes()) {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => *c = None,
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        opened
    })
    .join()
    .unwrap()
}

/// Issue 18.1: the metrics port is on the node's address, which every pod can reach. Without
/// limits, slow connections each buffering a large request head OOM-killed the agent at the
/// manifest's 64 MiB. Here 1,000 such connections hit the metrics port and 200 the probe port
/// for 8 s, with the agent in a memory cgroup at that limit.
#[test]
fn a_flood_of_slow_connections_cannot_kill_the_agent() {
    let cg = memcg::MemCgroup::new(&unique("mrt-agent-mem-"), 64 << 20);
    let mut a = Agent::with(Start {
        procs: Some(cg.procs()),
        release: true,
        ..Start::default()
    });
    let base = cg.usage();
    let t = Instant::now();
    let (m, p) = std::thread::scope(|s| {
        let m = s.spawn(|| slow_flood(&a.netns, METRICS_PORT, 1000, 8192, Duration::from_secs(8)));
        let p = s.spawn(|| slow_flood(&a.netns, PROBE_PORT, 200, 8192, Duration::from_secs(8)));
        (m.join().unwrap(), p.join().unwrap())
    });
    let flood = t.elapsed();
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "the agent died under the flood:\n{}",
        a.log()
    );
    assert_eq!(cg.oom_kills(), 0, "OOM kills in the agent's cgroup");
    // It serves again at once.
    let t = Instant::now();
    while a.metrics().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no /metrics after the flood"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(a.get("/healthz").map(|(c, _)| c), Some(200));
    let rejected = sample(
        &a.metrics().unwrap(),
        r#"mesh_redirect_http_connections_rejected_total{listener="metrics"}"#,
    );
    assert!(rejected > 0.0, "the flood was never turned away");
    println!(
        "flood: {m} + {p} connections over {:.1} s; agent memory before {:.1} MiB, peak {:.1} MiB \
         (limit 64 MiB), {rejected} metrics connections turned away, 0 OOM kills",
        flood.as_secs_f64(),
        base as f64 / (1 << 20) as f64,
        cg.peak() as f64 / (1 << 20) as f64
    );
}

/// Issue 18.2: the metrics address answers /metrics only; readiness (which names pods) and
/// health stay on the probe address.
#[test]
fn the_metrics_address_serves_metrics_only() {
    let a = Agent::start();
    for path in ["/readyz", "/healthz", "/", "/metrics/../readyz"] {
        let (code, body) = a
            .get_at(METRICS_PORT, path)
            .expect("metrics address answers");
        assert_eq!(code, 404, "{path}: {body}");
    }
    assert_eq!(
        a.get_at(METRICS_PORT, "/metrics").map(|(c, _)| c),
        Some(200)
    );
    a.wait_value("mesh_redirect_ready", 1.0);
    assert_eq!(a.get("/readyz").map(|(c, _)| c), Some(200));
    assert_eq!(a.get("/healthz").map(|(c, _)| c), Some(200));
    assert_eq!(a.get("/metrics").map(|(c, _)| c), Some(404));
    // One address for both is refused at start, saying why.
    let out = Command::new(agent())
        .args(["install", "--cni-bin-dir", "/b", "--cni-conf-dir", "/c"])
        .args([
            "--readiness-addr",
            "127.0.0.1:9",
            "--metrics-addr",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must differ"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 18.6: a second agent with the same event socket (a surge rollout, a second
/// DaemonSet, a debug run) neither unlinks nor rebinds it: it waits for the owner to go, and
/// every event is counted exactly once, by the owner.
#[test]
fn two_agents_never_fight_over_one_event_socket() {
    let a = Agent::start();
    let ino =
        || std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(&a.socket).unwrap());
    let first = ino();
    let mut b = Agent::with(Start {
        beside: Some(&a),
        ..Start::default()
    });
    let owned = |ag: &Agent, port: u16| {
        sample(
            &ag.metrics_at(port).unwrap_or_default(),
            "mesh_redirect_event_socket_owned",
        )
    };
    let t = Instant::now();
    while !b.log().contains("another agent owns the event socket") {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let pods: Vec<Netns> = (0..10).map(|_| Netns::new("mrt-two-")).collect();
    for p in &pods {
        assert!(add(p, &a.socket, json!({STATUS: "{}"})).0);
        std::thread::sleep(Duration::from_millis(300));
    }
    let captured =
        r#"mesh_redirect_plugin_invocations_total{command="ADD",outcome="captured",code=""}"#;
    a.wait_value(captured, 10.0);
    assert_eq!(
        sample(&b.metrics_at(METRICS_PORT + 10).unwrap(), captured),
        0.0
    );
    assert_eq!(ino(), first, "the socket was rebound while its owner lived");
    assert_eq!(
        (owned(&a, METRICS_PORT), owned(&b, METRICS_PORT + 10)),
        (1.0, 0.0)
    );
    // The owner goes: the other takes over and counts from then on.
    let mut a = a;
    let _ = a.child.kill();
    let _ = a.child.wait();
    let t = Instant::now();
    while owned(&b, METRICS_PORT + 10) != 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = Netns::new("mrt-two-");
    assert!(add(&p, &a.socket, json!({STATUS: "{}"})).0);
    let t = Instant::now();
    while sample(
        &b.metrics_at(METRICS_PORT + 10).unwrap_or_default(),
        captured,
    ) != 1.0
    {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b.child.try_wait().unwrap().is_none());
}

/// The tid of the agent's thread named `name`.
fn thread_of(pid: u32, name: &str) -> i32 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no thread {name} in {pid}"))
}

/// Issue 18.9: a worker thread that stops making progress makes /healthz fail (so the kubelet
/// restarts the agent), and a panic in any thread ends the process. The events thread is
/// stopped for real (ptrace stops that one thread, nothing else).
#[test]
fn a_stalled_or_panicking_thread_is_not_healthy() {
    use nix::sys::ptrace;
    let a = Agent::start();
    assert_eq!(a.get("/healthz").map(|(c, _)| c), Some(200));
    let tid = nix::unistd::Pid::from_raw(thread_of(a.child.id(), "events"));
    ptrace::seize(tid, ptrace::Options::empty()).expect("PTRACE_SEIZE the events thread");
    ptrace::interrupt(tid).expect("PTRACE_INTERRUPT");
    // Let the thread go however the test ends: a traced thread left stopped would keep the
    // agent from being reaped.
    struct Release(nix::unistd::Pid);
    impl Drop for Release {
        fn drop(&mut self) {
            let _ = nix::sys::wait::waitpid(
                self.0,
                Some(nix::sys::wait::WaitPidFlag::__WALL | nix::sys::wait::WaitPidFlag::WNOHANG),
            );
            let _ = nix::sys::ptrace::detach(self.0, None);
        }
    }
    let release = Release(tid);
    let t = Instant::now();
    let body = loop {
        match a.get("/healthz") {
            Some((503, b)) => break b,
            _ => {
                assert!(t.elapsed() < Duration::from_secs(45), "still healthy");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    assert!(body.contains("events thread"), "{body}");
    println!(
        "/healthz 503 {:.0} s after the events thread stopped: {}",
        t.elapsed().as_secs_f64(),
        body.trim()
    );
    drop(release);
    drop(a);

    // A panic in the reconcile or events thread: the process exits with 70 at once.
    for worker in ["events", "installer"] {
        let mut a = Agent::with(Start {
            env: &[("MESH_REDIRECT_TEST_PANIC", worker)],
            no_wait: true,
            ..Start::default()
        });
        let t = Instant::now();
        let status = loop {
            if let Some(s) = a.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{worker}: still running"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(70), "{worker}: {}", a.log());
        assert!(
            a.log().contains("a thread panicked") && a.log().contains(worker),
            "{}",
            a.log()
        );
    }
}
