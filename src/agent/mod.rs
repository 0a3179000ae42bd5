//! The node agent: the DaemonSet's process (`mesh-redirect install`, which execs
//! `mesh-redirect-agent install`). It chains the plugin (the installer), keeps every meshed
//! pod on its node captured by reconciling through the CRI, counts the plugin's invocations
//! from its events, and serves `/readyz`, `/healthz` and `/metrics`.
//!
//! Threads, each with one job: the installer's poll loop (main thread; it also takes the
//! signals), the reconciler, the event socket, the HTTP server. They share [`Shared`]. The
//! plugin's policy, ruleset and kernel code do the work (`crate::pod`); nothing here is
//! `unsafe`.

pub mod bypass;
pub mod cri;
pub mod events;
pub mod http;
pub mod metrics;
pub mod reconcile;

use crate::args::{self, CliError, Spec};
use crate::install;
use metrics::{Kind, Metrics, POD_STATES, Result_, State};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const USAGE: &str =
    "mesh-redirect-agent install --cni-bin-dir DIR --cni-conf-dir DIR [--conf-name FILE]
                        [--plugin-config FILE] [--readiness-addr HOST:PORT] [--keep-binary]
                        [--keep-on-exit] [--cri-socket PATH] [--reconcile-period SECONDS]
                        [--metrics-addr HOST:PORT] [--event-socket PATH] [--netns-dir DIR]
    (also as `mesh-redirect install …`, which runs this)
    Installs the plugin beside this binary into the CNI bin dir, chains it last into the
    runtime's primary network config and keeps it there; then, through the CRI, checks every
    ready pod sandbox on the node every --reconcile-period seconds (default 5; 0: never) and
    installs the capture table in place where a meshed pod lacks it or has a different one.
    Serves /readyz and /healthz on --readiness-addr and /metrics on --metrics-addr (each
    address serves all three). Counts the plugin's invocations from events on --event-socket
    (default /run/mesh-redirect/events.sock; written into the chained entry). On
    SIGTERM/SIGINT removes the entry and the binary unless --keep-on-exit. --cri-socket
    defaults to the first of /run/containerd/containerd.sock, /run/crio/crio.sock,
    /var/run/cri-dockerd.sock that exists. A pod's netns is the path the runtime reports; where
    that path is not visible (the agent in a container), the file of the same name in
    --netns-dir (default /var/run/netns, the host's dir mounted there). Every flag has its variable: MESH_REDIRECT_CNI_BIN_DIR,
    MESH_REDIRECT_CNI_CONF_DIR, MESH_REDIRECT_CONF_NAME, MESH_REDIRECT_PLUGIN_CONFIG,
    MESH_REDIRECT_READINESS_ADDR, MESH_REDIRECT_KEEP_BINARY=true, MESH_REDIRECT_KEEP_ON_EXIT=true,
    MESH_REDIRECT_CRI_SOCKET, MESH_REDIRECT_RECONCILE_PERIOD, MESH_REDIRECT_METRICS_ADDR,
    MESH_REDIRECT_EVENT_SOCKET, MESH_REDIRECT_NETNS_DIR.";

const AGENT_SPECS: [Spec; 5] = [
    Spec {
        flag: "--cri-socket",
        env: "MESH_REDIRECT_CRI_SOCKET",
        switch: false,
    },
    Spec {
        flag: "--reconcile-period",
        env: "MESH_REDIRECT_RECONCILE_PERIOD",
        switch: false,
    },
    Spec {
        flag: "--metrics-addr",
        env: "MESH_REDIRECT_METRICS_ADDR",
        switch: false,
    },
    Spec {
        flag: "--event-socket",
        env: "MESH_REDIRECT_EVENT_SOCKET",
        switch: false,
    },
    Spec {
        flag: "--netns-dir",
        env: "MESH_REDIRECT_NETNS_DIR",
        switch: false,
    },
];

/// Where the runtimes bind-mount pods' netns files (containerd and CRI-O by default).
pub const NETNS_DIR: &str = "/var/run/netns";

/// Default reconcile period.
pub const PERIOD: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub install: install::Options,
    pub cri_socket: Option<PathBuf>,
    /// Zero: no reconciling (chaining only).
    pub reconcile_period: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub event_socket: PathBuf,
    /// Where to look for a netns file the runtime reports at a path not visible here.
    pub netns_dir: PathBuf,
}

impl Options {
    pub fn parse(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Options, CliError> {
        let specs: Vec<Spec> = install::SPECS.iter().chain(&AGENT_SPECS).copied().collect();
        let f = args::parse(args, &specs, env)?;
        let abs = |flag: &str, p: String| -> Result<PathBuf, CliError> {
            if p.starts_with('/') {
                Ok(PathBuf::from(p))
            } else {
                Err(CliError::Usage(format!("{flag} must be an absolute path")))
            }
        };
        let event_socket = abs(
            "--event-socket",
            f.get("--event-socket")
                .unwrap_or_else(|| crate::events::DEFAULT_SOCKET.into()),
        )?;
        if event_socket.as_os_str().len() >= 108 {
            return Err(CliError::Usage(
                "--event-socket is longer than a unix socket path may be".into(),
            ));
        }
        Ok(Options {
            install: install::Options::from_parsed(&f)?,
            cri_socket: f
                .get("--cri-socket")
                .map(|p| abs("--cri-socket", p))
                .transpose()?,
            reconcile_period: f
                .parsed("--reconcile-period", "a number of seconds", |v| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 86400.0)
                })?
                .map_or(PERIOD, Duration::from_secs_f64),
            metrics_addr: f.parsed("--metrics-addr", "HOST:PORT", |a| {
                a.parse::<SocketAddr>().ok()
            })?,
            event_socket,
            netns_dir: abs(
                "--netns-dir",
                f.get("--netns-dir").unwrap_or_else(|| NETNS_DIR.into()),
            )?,
        })
    }
}

/// One JSON log line on stderr.
pub(crate) fn log(level: &str, msg: &str, extra: Value) {
    let mut line = json!({"ts": crate::log::rfc3339(std::time::SystemTime::now()), "level": level,
        "component": "agent", "msg": msg});
    if let (Some(l), Value::Object(e)) = (line.as_object_mut(), extra) {
        l.extend(e);
    }
    eprintln!("{line}");
}

/// Where reconciling stands, for readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reconcile {
    Off,
    /// No full pass yet (or the last failed): why.
    NotYet(String),
    Done,
}

/// What the threads share.
pub struct Shared {
    pub metrics: Metrics,
    pub registry: Registry,
    install: Mutex<Option<install::Status>>,
    reconcile: Mutex<Reconcile>,
}

impl Shared {
    fn new(reconciling: bool) -> Shared {
        let (metrics, registry) = Metrics::new();
        Shared {
            metrics,
            registry,
            install: Mutex::new(None),
            reconcile: Mutex::new(if reconciling {
                Reconcile::NotYet("no reconcile pass yet".into())
            } else {
                Reconcile::Off
            }),
        }
    }

    /// Ready: chained, the binary current, and (when reconciling) a full pass done since the
    /// chain is in place, the runtime reachable at the last one.
    pub fn ready(&self) -> Result<(), String> {
        let install = self.install.lock().map(|g| g.clone()).unwrap_or(None);
        match install {
            None => return Err("starting".into()),
            Some(s) => s.ready?,
        }
        match self.reconcile.lock().map(|g| g.clone()) {
            Ok(Reconcile::Off | Reconcile::Done) => Ok(()),
            Ok(Reconcile::NotYet(why)) => Err(why),
            Err(_) => Err("internal state poisoned".into()),
        }
    }

    fn chained(&self) -> bool {
        self.install
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|s| s.ready.is_ok()))
            .unwrap_or(false)
    }

    fn set_install(&self, s: &install::Status) {
        let m = &self.metrics;
        m.chain_in_place.set(s.chained.is_some() as i64);
        m.flapping.set(s.flapping as i64);
        m.binary_current.set(s.binary_current as i64);
        // The installer's count is the truth; the counter catches up to it.
        let seen = m.rechains.get();
        if s.rechains > seen {
            m.rechains.inc_by(s.rechains - seen);
        }
        if let Ok(mut g) = self.install.lock() {
            *g = Some(s.clone());
        }
        m.ready.set(self.ready().is_ok() as i64);
    }

    fn set_reconcile(&self, r: Reconcile) {
        if let Ok(mut g) = self.reconcile.lock() {
            *g = r;
        }
        self.metrics.ready.set(self.ready().is_ok() as i64);
    }

    fn record_pass(&self, p: &reconcile::Pass) {
        let m = &self.metrics;
        for (state, n) in POD_STATES
            .iter()
            .zip([p.captured, p.repaired, p.skipped, p.invalid, p.failed])
        {
            m.pods
                .get_or_create(&State {
                    state: state.to_string(),
                })
                .set(n as i64);
        }
        let kind = |k: &str| Kind { kind: k.into() };
        m.drift
            .get_or_create(&kind("missing"))
            .inc_by(p.missing as u64);
        m.drift
            .get_or_create(&kind("differs"))
            .inc_by(p.differing as u64);
        let res = |r: &str| Result_ { result: r.into() };
        m.repairs
            .get_or_create(&res("ok"))
            .inc_by(p.repaired as u64);
        m.repairs
            .get_or_create(&res("failed"))
            .inc_by(p.repair_failures as u64);
        m.passes.get_or_create(&res("ok")).inc();
        m.pass_duration.observe(p.duration.as_secs_f64());
    }
}

/// The plugin binary this agent installs: `mesh-redirect` beside it.
fn plugin_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let p = me.with_file_name(crate::install::files::BINARY);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "the plugin binary {} is not beside the agent",
            p.display()
        ))
    }
}

/// `mesh-redirect-agent install …`: runs until SIGTERM/SIGINT.
pub fn main(args: Vec<String>) -> ExitCode {
    let usage = |m: &str| {
        eprintln!("mesh-redirect-agent: {m}\n\n{USAGE}");
        ExitCode::from(2)
    };
    match args.split_first() {
        Some((cmd, rest)) if cmd == "install" => {
            match Options::parse(rest, |k| std::env::var(k).ok()) {
                Ok(o) => match run(o) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        log("error", "agent failed", json!({"error": e}));
                        ExitCode::FAILURE
                    }
                },
                Err(CliError::Usage(m)) => usage(&m),
                Err(CliError::Failed(m)) => {
                    log("error", "agent failed", json!({"error": m}));
                    ExitCode::FAILURE
                }
            }
        }
        Some((cmd, rest)) if cmd == "check-bypass" => bypass::main(rest),
        Some((cmd, _)) if cmd == "help" || cmd == "--help" || cmd == "-h" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => usage("expected `install`"),
    }
}

fn run(opts: Options) -> Result<(), String> {
    let started = Instant::now();
    // Blocked before any thread starts, so every thread inherits it and only the installer's
    // signalfd takes SIGTERM/SIGINT.
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGTERM);
    mask.add(nix::sys::signal::Signal::SIGINT);
    mask.thread_block()
        .map_err(|e| format!("block signals: {e}"))?;
    let plugin = plugin_binary()?;
    // The plugin sends its events where the agent listens: the entry says so.
    let mut entry = opts.install.entry()?;
    if let Some(m) = entry.as_object_mut() {
        m.insert(
            "eventSocket".into(),
            json!(opts.event_socket.to_string_lossy()),
        );
    }
    let cfg = entry
        .as_object()
        .map(crate::config::PluginConfig::from_conf)
        .transpose()
        .map_err(|e| format!("plugin config: {}", e.msg))?
        .unwrap_or_default();

    let reconciling = !opts.reconcile_period.is_zero();
    let shared = Arc::new(Shared::new(reconciling));
    // Listeners first: a port in use fails the start.
    let mut listeners = Vec::new();
    for a in [opts.install.readiness_addr, opts.metrics_addr]
        .into_iter()
        .flatten()
    {
        if listeners
            .iter()
            .any(|l: &std::net::TcpListener| l.local_addr().ok() == Some(a))
        {
            continue;
        }
        listeners.push(std::net::TcpListener::bind(a).map_err(|e| format!("listen on {a}: {e}"))?);
    }
    let events = events::bind(&opts.event_socket)
        .map_err(|e| format!("event socket {}: {e}", opts.event_socket.display()))?;
    log(
        "info",
        "starting",
        json!({"readiness": opts.install.readiness_addr, "metrics": opts.metrics_addr,
            "events": opts.event_socket, "criSocket": opts.cri_socket,
            "reconcilePeriodSeconds": opts.reconcile_period.as_secs_f64(), "mesh": cfg.mesh.name()}),
    );
    if !listeners.is_empty() {
        let st = shared.clone();
        std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                if let Err(e) = http::serve(st, listeners) {
                    log(
                        "error",
                        "HTTP server stopped",
                        json!({"error": e.to_string()}),
                    );
                }
            })
            .map_err(|e| e.to_string())?;
    }
    {
        let st = shared.clone();
        let path = opts.event_socket.clone();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || events::serve(st, path, events))
            .map_err(|e| e.to_string())?;
    }
    if reconciling {
        let st = shared.clone();
        let period = opts.reconcile_period;
        let r = reconcile::Reconciler::new(
            cfg,
            opts.cri_socket.clone(),
            opts.netns_dir.clone(),
            started,
        );
        std::thread::Builder::new()
            .name("reconcile".into())
            .spawn(move || reconcile_loop(st, r, period, started))
            .map_err(|e| e.to_string())?;
    }
    let st = shared.clone();
    install::run(opts.install.clone(), plugin, entry, move |s| {
        st.set_install(s)
    })
}

/// Passes every `period` once the chain is in place (so that every pod starting meanwhile goes
/// through the plugin), for as long as the process lives.
fn reconcile_loop(
    st: Arc<Shared>,
    mut r: reconcile::Reconciler,
    period: Duration,
    started: Instant,
) {
    let mut last_error: Option<String> = None;
    let mut first = true;
    loop {
        if !st.chained() {
            st.set_reconcile(Reconcile::NotYet(
                "waiting for the chain to be in place before reconciling".into(),
            ));
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        match r.pass() {
            Ok(p) => {
                st.record_pass(&p);
                if first || p.repaired > 0 || last_error.is_some() {
                    log(
                        "info",
                        "reconcile pass",
                        json!({"captured": p.captured, "repaired": p.repaired, "skipped": p.skipped,
                            "invalidAnnotation": p.invalid, "failed": p.failed,
                            "durationMs": p.duration.as_secs_f64() * 1e3,
                            "sinceStartMs": started.elapsed().as_millis() as u64}),
                    );
                }
                first = false;
                last_error = None;
                // Not ready while a pod that must be captured is known not to be: the
                // operator sees the node, the pods and the reason in the probe's body.
                st.set_reconcile(if p.uncaptured.is_empty() {
                    Reconcile::Done
                } else {
                    Reconcile::NotYet(format!(
                        "{} meshed pod(s) not captured: {}",
                        p.uncaptured.len(),
                        p.uncaptured.join("; ")
                    ))
                });
            }
            Err(e) => {
                st.metrics
                    .passes
                    .get_or_create(&Result_ {
                        result: "failed".into(),
                    })
                    .inc();
                if last_error.as_ref() != Some(&e) {
                    log(
                        "error",
                        "cannot reconcile: the container runtime is not reachable (retrying)",
                        json!({"error": e}),
                    );
                }
                st.set_reconcile(Reconcile::NotYet(format!("cannot reconcile: {e}")));
                last_error = Some(e);
            }
        }
        std::thread::sleep(period);
    }
}
