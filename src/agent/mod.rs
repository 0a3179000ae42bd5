//! The node agent: the DaemonSet's process (`mesh-redirect install`, which execs
//! `mesh-redirect-agent install`). It chains the plugin (the installer), keeps every meshed
//! pod on its node captured by reconciling through the CRI, counts the plugin's invocations
//! from its events, and serves `/readyz`, `/healthz` and `/metrics`.
//!
//! Threads, each with one job: the installer's poll loop (main thread; it also takes the
//! signals), the reconciler, the event socket, the release of the netlink sockets the plugin
//! hands over with its events, the connect-time load-balancing probe, the HTTP server. They
//! share [`Shared`]. The
//! plugin's policy, ruleset and kernel code do the work (`crate::pod`); nothing here is
//! `unsafe`.

pub mod bypass;
pub mod cri;
pub mod events;
pub mod health;
pub mod http;
pub mod installer;
pub mod metrics;
pub mod options;
pub mod readiness;
pub mod reconcile;
pub mod sandbox_netns;

use crate::args::CliError;
use health::{Health, Worker};
use metrics::Metrics;
use prometheus_client::registry::Registry;
use readiness::Readiness;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use options::{NETNS_DIR, Options, PERIOD};

/// One JSON log line on stderr.
pub(crate) fn log(level: &str, msg: &str, extra: Value) {
    crate::log::line(crate::log::Component::Agent, level, msg, extra);
}

/// What the threads share.
pub struct Shared {
    pub metrics: Metrics,
    pub registry: Registry,
    pub readiness: Readiness,
    pub health: Health,
}

impl Shared {
    fn new(reconciling: bool) -> Shared {
        let (metrics, registry) = Metrics::new();
        Shared {
            metrics,
            registry,
            readiness: Readiness::new(reconciling),
            health: Health::new(),
        }
    }

    /// The `ready` gauge follows readiness.
    pub fn refresh_ready(&self) {
        self.metrics.ready.set(self.readiness.is_ready() as i64);
    }

    fn set_install(&self, s: &installer::Status) {
        let m = &self.metrics;
        m.chain_in_place.set(s.chained.is_some() as i64);
        m.flapping.set(s.flapping as i64);
        m.binary_current.set(s.binary_current as i64);
        // The installer's count is the truth; the counter catches up to it.
        let seen = m.rechains.get();
        if s.rechains > seen {
            m.rechains.inc_by(s.rechains - seen);
        }
        self.readiness.set_chain(s.ready.clone());
        self.readiness.set_warnings(s.warnings.clone());
        self.refresh_ready();
    }
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot find my own binary: {0}")]
    OwnBinary(std::io::Error),
    #[error("the plugin binary {0} is not beside the agent")]
    NoPlugin(PathBuf),
    #[error("block signals: {0}")]
    Signals(nix::Error),
    #[error(transparent)]
    PluginConfig(crate::install::InstallError),
    #[error("listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("event socket {0}: {1}")]
    EventSocket(PathBuf, std::io::Error),
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
    #[error(transparent)]
    Install(crate::install::InstallError),
}

/// Asks the runtime who it is before anything is chained: one that passes no pod annotations
/// to CNI (cri-dockerd) would see every pod's ADD fail. A runtime that does not answer yet is
/// no reason to wait: the reconciler reports it.
fn runtime_refusal(socket: Option<&std::path::Path>) -> Option<installer::Refusal> {
    let socket = socket.map(PathBuf::from).or_else(cri::find_socket)?;
    let v = cri::Cri::connect(&socket).ok()?.version().ok()?;
    installer::runtime_refusal(&v.runtime_name, &v.runtime_version)
}

/// The plugin binary this agent installs: `mesh-redirect` beside it.
fn plugin_binary() -> Result<PathBuf, AgentError> {
    let me = std::env::current_exe().map_err(AgentError::OwnBinary)?;
    let p = me.with_file_name(crate::install::files::BINARY);
    if p.exists() {
        Ok(p)
    } else {
        Err(AgentError::NoPlugin(p))
    }
}

/// `mesh-redirect-agent install …`: runs until SIGTERM/SIGINT.
pub fn main(args: Vec<String>) -> ExitCode {
    health::exit_on_panic();
    let usage = |m: &str| {
        eprintln!("mesh-redirect-agent: {m}\n\n{}", options::usage());
        ExitCode::from(2)
    };
    match args.split_first() {
        Some((cmd, rest)) if cmd == "install" => {
            match Options::parse(rest, |k| std::env::var(k).ok()) {
                Ok(o) => match run(o) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        log("error", "agent failed", json!({"error": e.to_string()}));
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
            println!("{}", options::usage());
            ExitCode::SUCCESS
        }
        _ => usage("expected `install`, `check-bypass` or `help`"),
    }
}

/// How long the installer's loop (which wakes at least every 30 s) may go without a beat.
const INSTALLER_STALL: Duration = Duration::from_secs(90);
/// The event loop ticks every 2 s.
const EVENTS_STALL: Duration = Duration::from_secs(30);

fn spawn(name: &'static str, f: impl FnOnce() + Send + 'static) -> Result<(), AgentError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| AgentError::Thread(name, e))
}

fn run(opts: Options) -> Result<(), AgentError> {
    let started = Instant::now();
    // Blocked before any thread starts, so every thread inherits it and only the installer's
    // signalfd takes SIGTERM/SIGINT.
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGTERM);
    mask.add(nix::sys::signal::Signal::SIGINT);
    mask.thread_block().map_err(AgentError::Signals)?;
    let plugin = plugin_binary()?;
    // The plugin sends its events where the agent listens: the entry says so.
    let mut entry = opts.install.entry().map_err(AgentError::PluginConfig)?;
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
        .map_err(|e| AgentError::PluginConfig(crate::install::InstallError::PluginConfig(e.msg)))?
        .unwrap_or_default();

    let reconciling = !opts.reconcile_period.is_zero();
    let shared = Arc::new(Shared::new(reconciling));
    // Listeners first: a port in use fails the start.
    let bind = |a: SocketAddr| std::net::TcpListener::bind(a).map_err(|e| AgentError::Listen(a, e));
    let probes = opts.install.readiness_addr.map(bind).transpose()?;
    let metrics = opts.metrics_addr.map(bind).transpose()?;
    let events = events::Owner::new(&opts.event_socket)
        .map_err(|e| AgentError::EventSocket(opts.event_socket.clone(), e))?;
    log(
        "info",
        "starting",
        json!({"readiness": opts.install.readiness_addr, "metrics": opts.metrics_addr,
            "events": opts.event_socket, "criSocket": opts.cri_socket,
            "reconcilePeriodSeconds": opts.reconcile_period.as_secs_f64(), "mesh": cfg.mesh.name()}),
    );
    shared.health.watch(Worker::Installer, INSTALLER_STALL);
    shared.health.watch(Worker::Events, EVENTS_STALL);
    if probes.is_some() || metrics.is_some() {
        let st = shared.clone();
        spawn("http", move || {
            if let Err(e) = http::serve(st, probes, metrics) {
                log(
                    "error",
                    "HTTP server stopped",
                    json!({"error": e.to_string()}),
                );
            }
        })?;
    }
    {
        let st = shared.clone();
        spawn("events", move || events.serve(st))?;
    }
    if let Some(period) = opts.bypass_period {
        let target = match bypass::target_from_env(|k| std::env::var(k).ok()) {
            Ok(t) => t,
            Err(e) => {
                log(
                    "warn",
                    "the capture-bypass check cannot run: the service address in the environment is not usable",
                    json!({"error": e.to_string()}),
                );
                None
            }
        };
        let st = shared.clone();
        st.health.watch(
            Worker::Bypass,
            period + bypass::TIMEOUT + Duration::from_secs(60),
        );
        spawn("bypass", move || bypass::watch(st, target, period))?;
    }
    if reconciling {
        let st = shared.clone();
        let period = opts.reconcile_period;
        st.health
            .watch(Worker::Reconcile, reconcile::stall_limit(period));
        let r = reconcile::Reconciler::new(
            cfg,
            opts.cri_socket.clone(),
            opts.netns_dir.clone(),
            started,
        );
        spawn("reconcile", move || reconcile::run(st, r, period, started))?;
    }
    let refused = runtime_refusal(opts.cri_socket.as_deref());
    let st = shared.clone();
    installer::run(opts.install.clone(), plugin, entry, refused, move |s| {
        st.health.beat(Worker::Installer);
        st.set_install(s)
    })
    .map_err(AgentError::Install)
}
