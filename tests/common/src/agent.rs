//! The node agent run for real by a test, in a network namespace of the test's: the one
//! harness for starting it (as `mesh-redirect-agent install`, as `mesh-redirect install` the
//! way the DaemonSet runs it, or the release build), talking to its readiness and metrics
//! ports, reading its log, stopping it with SIGTERM as the kubelet does, or killing it.
//!
//! [`Launch`] starts one on CNI dirs the caller owns (the installer tests' and the node e2e's
//! nodes); [`Agent`] is one with throwaway dirs and a namespace of its own (chaining a stand-in
//! conflist, not reconciling), for the tests of the agent itself.

use crate::http::{http_get_in, sample};
use crate::netns::Netns;
use crate::paths::{agent, plugin, release_bins};
use crate::sys::{TempDir, die_with_parent, require_root, wait_for};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// [`Agent`]'s readiness (`/readyz`, `/healthz`) and metrics ports.
pub const PROBE_PORT: u16 = 15700;
pub const METRICS_PORT: u16 = 15701;

/// Which binary runs the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// `mesh-redirect-agent install` (the debug build).
    Agent,
    /// `mesh-redirect install`, which execs the agent beside it: what the DaemonSet runs.
    Plugin,
    /// `mesh-redirect-agent install` from the release build (what the image ships).
    Release,
}

/// How to start an agent on CNI dirs the caller owns.
pub struct Launch<'a> {
    pub program: Program,
    /// The network namespace it runs in (a path; hostNetwork: the node's); its ports live
    /// there.
    pub netns: &'a str,
    pub bin_dir: &'a Path,
    pub conf_dir: &'a Path,
    pub event_socket: &'a Path,
    /// `--readiness-addr 127.0.0.1:PORT`.
    pub ready_port: u16,
    /// `--metrics-addr 127.0.0.1:PORT` (None: the agent's default).
    pub metrics_port: Option<u16>,
    /// `--reconcile-period` in seconds ("0": chaining only, no container runtime).
    pub reconcile_period: &'a str,
    /// More arguments, after the ones above.
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    /// Run inside the cgroup whose `cgroup.procs` this is (a memory cgroup with the
    /// manifest's limit, a cgroup with BPF programs attached).
    pub procs: Option<&'a Path>,
    /// Its stderr (the agent logs there).
    pub log: PathBuf,
    /// How long [`AgentProc::wait_ready`] waits for `/readyz` to answer 200.
    pub ready_within: Duration,
}

impl<'a> Launch<'a> {
    /// `mesh-redirect-agent install` on these dirs, in `netns`, chaining only, its log `log`.
    pub fn new(
        netns: &'a str,
        bin_dir: &'a Path,
        conf_dir: &'a Path,
        event_socket: &'a Path,
        log: PathBuf,
    ) -> Launch<'a> {
        Launch {
            program: Program::Agent,
            netns,
            bin_dir,
            conf_dir,
            event_socket,
            ready_port: PROBE_PORT,
            metrics_port: None,
            reconcile_period: "0",
            args: &[],
            env: &[],
            procs: None,
            log,
            ready_within: Duration::from_secs(20),
        }
    }

    /// Starts it (without waiting for anything); it is killed when the result is dropped, and
    /// when the thread that started it ends without dropping it (a test process that died).
    pub fn spawn(self) -> AgentProc {
        let program = match self.program {
            Program::Agent => PathBuf::from(agent()),
            Program::Plugin => PathBuf::from(plugin()),
            Program::Release => release_bins().join("mesh-redirect-agent"),
        };
        // `sh` joins the cgroup, then execs nsenter, which execs the program (which, as
        // `mesh-redirect install`, execs the agent): the child's pid is the agent's.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"[ -z "$MRT_PROCS" ] || echo $$ > "$MRT_PROCS"; exec "$@""#)
            .arg("sh")
            .arg("nsenter")
            .arg(format!("--net={}", self.netns))
            .arg("--")
            .arg(&program)
            .arg("install")
            .arg("--cni-bin-dir")
            .arg(self.bin_dir)
            .arg("--cni-conf-dir")
            .arg(self.conf_dir)
            .arg(format!("--readiness-addr=127.0.0.1:{}", self.ready_port))
            .args(["--reconcile-period", self.reconcile_period])
            .arg("--event-socket")
            .arg(self.event_socket);
        if let Some(port) = self.metrics_port {
            cmd.arg(format!("--metrics-addr=127.0.0.1:{port}"));
        }
        cmd.args(self.args)
            .env("MRT_PROCS", self.procs.unwrap_or(Path::new("")))
            .envs(self.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).expect("the agent's log file"));
        die_with_parent(&mut cmd);
        AgentProc {
            child: cmd.spawn().expect("start the agent"),
            netns: self.netns.to_string(),
            ready_port: self.ready_port,
            metrics_port: self.metrics_port,
            event_socket: self.event_socket.to_path_buf(),
            log: self.log,
            ready_within: self.ready_within,
        }
    }
}

/// A running agent: killed and reaped on drop.
pub struct AgentProc {
    pub child: Child,
    /// The network namespace its ports live in (a path).
    pub netns: String,
    pub ready_port: u16,
    pub metrics_port: Option<u16>,
    pub event_socket: PathBuf,
    pub log: PathBuf,
    ready_within: Duration,
}

impl AgentProc {
    /// Its pid (every exec on the way kept the child's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path` on its readiness port, from inside its namespace: (status code, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.netns, self.ready_port, path)
    }

    /// GET `path` on another port of its namespace (its metrics port, another agent's).
    pub fn get_at(&self, port: u16, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.netns, port, path)
    }

    /// Waits until `/readyz` answers 200.
    #[track_caller]
    pub fn wait_ready(&self) {
        wait_for(
            self.ready_within.as_secs(),
            "the agent's /readyz to answer 200",
            || self.get("/readyz").is_some_and(|(c, _)| c == 200),
        );
    }

    /// Waits until `/readyz` answers with `why` in its body (the agent's first steps take a
    /// moment after the endpoint is up); returns that answer.
    #[track_caller]
    pub fn wait_not_ready_because(&self, why: &str) -> (u16, String) {
        wait_for(10, why, || {
            self.get("/readyz").is_some_and(|(_, b)| b.contains(why))
        });
        self.get("/readyz").expect("/readyz answered a moment ago")
    }

    /// Waits until its metrics answer and its event socket exists (what a test of the agent
    /// itself needs before it sends events); panics with the log after 20 s.
    #[track_caller]
    pub fn wait_serving(&self) {
        let t = Instant::now();
        while self.metrics().is_none() || !self.event_socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "agent did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics` from its metrics port (None: not answering, or not 200).
    pub fn metrics(&self) -> Option<String> {
        let port = self.metrics_port.expect("started with a metrics port");
        self.metrics_at(port)
    }

    /// `/metrics` from `port` in its namespace.
    pub fn metrics_at(&self, port: u16) -> Option<String> {
        self.get_at(port, "/metrics")
            .filter(|(c, _)| *c == 200)
            .map(|(_, b)| b)
    }

    /// A sample's value (0 when absent), `name{labels}` written as in the text format.
    pub fn value(&self, series: &str) -> f64 {
        sample(&self.metrics().unwrap_or_default(), series)
    }

    /// Waits until `series` reaches `want`.
    #[track_caller]
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

    /// SIGTERM, as the kubelet stops a DaemonSet pod; waits (15 s at most) for the exit.
    #[track_caller]
    pub fn stop(mut self) -> ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM the agent");
        let mut status = None;
        wait_for(15, "the agent to exit on SIGTERM", || {
            status = self.child.try_wait().expect("wait for the agent");
            status.is_some()
        });
        status.expect("exited")
    }

    /// SIGKILL: a crash, an OOM kill. Reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent with throwaway CNI dirs (a stand-in bridge conflist to chain) and, unless it
/// shares another's, a network namespace of its own; it does not reconcile.
pub struct Agent {
    pub proc: AgentProc,
    /// The name of the namespace its ports live in (its own, or the agent's it was started
    /// beside).
    pub ns_name: String,
    /// Its event socket (shared with the agent it was started beside).
    pub socket: PathBuf,
    // Dropped after `proc` (fields drop in order): the process goes before its dirs.
    _ns: Option<Netns>,
    _tmp: TempDir,
}

/// How a test starts its [`Agent`].
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
        let (own_ns, ns_name, socket) = match o.beside {
            Some(a) => (None, a.ns_name.clone(), a.socket.clone()),
            None => {
                let ns = Netns::new("mrt-agent-");
                ns.exec(&["ip", "link", "set", "lo", "up"]);
                let name = ns.name.clone();
                (Some(ns), name, tmp.path().join("run/events.sock"))
            }
        };
        let netns = format!("/run/netns/{ns_name}");
        // A second agent beside another shares its namespace: other ports.
        let off = if o.beside.is_some() { 10 } else { 0 };
        let (bin, conf) = (tmp.path().join("bin"), tmp.path().join("net.d"));
        let proc = Launch {
            program: if o.release {
                Program::Release
            } else {
                Program::Agent
            },
            ready_port: PROBE_PORT + off,
            metrics_port: Some(METRICS_PORT + off),
            args: o.args,
            env: o.env,
            procs: o.procs.as_deref(),
            ..Launch::new(&netns, &bin, &conf, &socket, tmp.path().join("agent.log"))
        }
        .spawn();
        if !o.no_wait {
            proc.wait_serving();
        }
        Agent {
            proc,
            ns_name,
            socket,
            _ns: own_ns,
            _tmp: tmp,
        }
    }
}

impl Deref for Agent {
    type Target = AgentProc;
    fn deref(&self) -> &AgentProc {
        &self.proc
    }
}

impl DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut AgentProc {
        &mut self.proc
    }
}
