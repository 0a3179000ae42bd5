//! The node agent run for real by a test: chaining into throwaway CNI dirs (no reconciling),
//! its HTTP ports in a network namespace of the test's (or of another agent's), its log in a
//! file, optionally inside a cgroup.

use super::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const AGENT: &str = env!("CARGO_BIN_EXE_mesh-redirect-agent");
pub const PROBE_PORT: u16 = 15700;
pub const METRICS_PORT: u16 = 15701;

pub struct Agent {
    pub child: Child,
    /// The namespace its ports live in (owned unless borrowed from another agent).
    pub netns: String,
    pub ns_name: String,
    _ns: Option<Netns>,
    _tmp: TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
}

/// How a test starts its agent.
#[derive(Default)]
pub struct Start<'a> {
    /// Another agent's dirs and namespace to share (its event socket, its network).
    pub beside: Option<&'a Agent>,
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    /// Run inside the cgroup whose `cgroup.procs` this is (a memory cgroup with the
    /// manifest's limit, a cgroup with BPF programs attached).
    pub procs: Option<PathBuf>,
    /// Do not wait for the metrics and the socket.
    pub no_wait: bool,
    /// Run the release build (what the image ships) instead of the debug one.
    pub release: bool,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::with(Start::default())
    }

    pub fn with(o: Start) -> Agent {
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
        let (ns, ns_name, socket) = match o.beside {
            Some(a) => (None, a.ns_name.clone(), a.socket.clone()),
            None => {
                let ns = Netns::new("mrt-agent-");
                ns.exec(&["ip", "link", "set", "lo", "up"]);
                let name = ns.name.clone();
                (Some(ns), name, tmp.path().join("run/events.sock"))
            }
        };
        // A second agent beside another shares its namespace: other ports.
        let off = if o.beside.is_some() { 10 } else { 0 };
        let log = tmp.path().join("agent.log");
        let agent = if o.release {
            release_bins().join("mesh-redirect-agent")
        } else {
            PathBuf::from(AGENT)
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"[ -z "$MRT_PROCS" ] || echo $$ > "$MRT_PROCS"; exec "$@""#)
            .arg("sh")
            .args(["ip", "netns", "exec", &ns_name])
            .arg(&agent)
            .arg("install")
            .arg("--cni-bin-dir")
            .arg(tmp.path().join("bin"))
            .arg("--cni-conf-dir")
            .arg(tmp.path().join("net.d"))
            .args(["--reconcile-period", "0"])
            .args([
                "--readiness-addr",
                &format!("127.0.0.1:{}", PROBE_PORT + off),
            ])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", METRICS_PORT + off),
            ])
            .arg("--event-socket")
            .arg(&socket)
            .args(o.args)
            .env("MRT_PROCS", o.procs.clone().unwrap_or_default())
            .envs(o.env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("start the agent");
        let a = Agent {
            child,
            netns: format!("/run/netns/{ns_name}"),
            ns_name,
            _ns: ns,
            _tmp: tmp,
            socket,
            log,
        };
        let t = Instant::now();
        while !o.no_wait && (a.metrics_at(METRICS_PORT + off).is_none() || !a.socket.exists()) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "agent did not start:\n{}",
                a.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    pub fn metrics_at(&self, port: u16) -> Option<String> {
        http_get_in(&self.netns, port, "/metrics")
            .filter(|(c, _)| *c == 200)
            .map(|(_, b)| b)
    }

    pub fn get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.netns, port, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> Option<String> {
        self.metrics_at(METRICS_PORT)
    }

    /// A sample's value (0 when absent), `name{labels}` written as in the text format.
    pub fn value(&self, series: &str) -> f64 {
        let text = self.metrics().unwrap_or_default();
        sample(&text, series)
    }

    /// Waits until `series` reaches `want`.
    pub fn wait_value(&self, series: &str, want: f64) {
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
        // `sh` execs `ip`, which execs the agent: the child's pid is the agent's.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
