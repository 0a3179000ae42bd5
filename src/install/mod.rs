//! Node installer (SPEC §5): the chaining half of the node agent (`mesh-redirect install`, the
//! DaemonSet's command), and `mesh-redirect uninstall`.
//!
//! [`run`] copies the plugin into the host's CNI bin dir, chains it into the primary network
//! config (the runtime's first file, as libcni picks it), keeps it chained when the primary
//! plugin rewrites its file, reports its status after every step (the agent serves it as
//! readiness and metrics), and undoes it all on SIGTERM/SIGINT. One thread, one `poll` loop
//! over inotify and a signalfd.

pub mod confdir;
pub mod conflist;
pub mod files;

use crate::args::{self, CliError, Spec};
use confdir::ConfDir;
pub use confdir::unchain_dir;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::{Value, json};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

/// `install`/`uninstall` options; every flag also reads an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// Chain into this file instead of the lexically first valid one.
    pub conf_name: Option<String>,
    /// The mesh-redirect entry (JSON object) to chain.
    pub plugin_config: Option<PathBuf>,
    pub readiness_addr: Option<SocketAddr>,
    pub keep_binary: bool,
    /// On SIGTERM/SIGINT leave the entry and the binary in place (for rollouts; see README).
    pub keep_on_exit: bool,
    /// The node's dynamic loader (mounted), to check the node's glibc can run the plugin.
    pub node_loader: Option<PathBuf>,
}

/// The plugin binary's summary of `install` and `uninstall` (the agent's `help` lists every
/// flag, from the same declarations).
pub const USAGE: &str = "  mesh-redirect install --cni-bin-dir DIR --cni-conf-dir DIR [FLAGS]
      The node agent (this execs `mesh-redirect-agent install`, beside this binary): copy the
      plugin into DIR, chain it last into the primary network config, keep it there, repair
      meshed pods that lack their table, serve /readyz, /healthz and /metrics, and undo the
      chain on SIGTERM/SIGINT unless --keep-on-exit. `mesh-redirect-agent help` lists every
      flag and its environment variable.
  mesh-redirect uninstall --cni-bin-dir DIR --cni-conf-dir DIR [--keep-binary]
      Remove the chain entry (restoring the original files) and the binary, once.";

/// The flags `install` and `uninstall` take (the agent adds its own).
pub const SPECS: &[Spec] = &[
    Spec::value(
        "--cni-bin-dir",
        "MESH_REDIRECT_CNI_BIN_DIR",
        "DIR",
        "the node's CNI bin dir (as mounted): the plugin and its libraries go there",
    ),
    Spec::value(
        "--cni-conf-dir",
        "MESH_REDIRECT_CNI_CONF_DIR",
        "DIR",
        "the node's CNI conf dir (as mounted): the entry is chained into the runtime's first file",
    ),
    Spec::value(
        "--conf-name",
        "MESH_REDIRECT_CONF_NAME",
        "FILE",
        "chain into this file instead of the runtime's first one",
    ),
    Spec::value(
        "--plugin-config",
        "MESH_REDIRECT_PLUGIN_CONFIG",
        "FILE",
        "the mesh-redirect entry as JSON (type and the annotations capability are forced)",
    ),
    Spec::value(
        "--readiness-addr",
        "MESH_REDIRECT_READINESS_ADDR",
        "HOST:PORT",
        "serve /readyz and /healthz here (keep it on loopback: the readiness body names pods)",
    ),
    Spec::switch(
        "--keep-binary",
        "MESH_REDIRECT_KEEP_BINARY",
        "leave the plugin binary in place on exit or uninstall",
    ),
    Spec::value(
        "--node-loader",
        "MESH_REDIRECT_NODE_LOADER",
        "PATH",
        "the node's dynamic loader (its /lib64/ld-linux-x86-64.so.2, mounted read-only): asked \
         for the node's glibc, and the plugin is not installed if it needs a newer one (every \
         ADD would fail)",
    ),
    Spec::switch(
        "--keep-on-exit",
        "MESH_REDIRECT_KEEP_ON_EXIT",
        "on SIGTERM/SIGINT leave the entry and the binary in place (a rollout has no window \
         in which new pods go uncaptured)",
    ),
];

impl Options {
    /// Flags win over the environment (`env` is normally `std::env::var`).
    pub fn parse(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Options, CliError> {
        Options::from_parsed(&args::parse(args, SPECS, env)?)
    }

    /// From flags parsed against a spec list that includes [`SPECS`].
    pub fn from_parsed(f: &args::Parsed<'_>) -> Result<Options, CliError> {
        let dir = |flag: &str| -> Result<PathBuf, CliError> {
            let d = PathBuf::from(
                f.get(flag)
                    .ok_or_else(|| CliError::Usage(format!("{flag} is required")))?,
            );
            if !d.is_absolute() {
                return Err(CliError::Usage(format!("{flag} must be an absolute path")));
            }
            Ok(d)
        };
        let readiness_addr = f.parsed("--readiness-addr", "HOST:PORT", |a| {
            a.parse::<SocketAddr>().ok()
        })?;
        let conf_name = f.get("--conf-name");
        if let Some(n) = &conf_name
            && (n.contains('/') || n.starts_with('.'))
        {
            return Err(CliError::Usage(format!(
                "--conf-name {n:?} must be a file name in the conf dir"
            )));
        }
        Ok(Options {
            bin_dir: dir("--cni-bin-dir")?,
            conf_dir: dir("--cni-conf-dir")?,
            conf_name,
            plugin_config: f.get("--plugin-config").map(PathBuf::from),
            readiness_addr,
            keep_binary: f.on("--keep-binary"),
            keep_on_exit: f.on("--keep-on-exit"),
            node_loader: f.get("--node-loader").map(PathBuf::from),
        })
    }

    /// The mesh-redirect entry to chain: the operator's `--plugin-config` with `type` and the
    /// annotations capability forced.
    pub fn entry(&self) -> Result<Value, String> {
        let plugin_config = match &self.plugin_config {
            None => None,
            Some(p) => {
                let text = std::fs::read(p)
                    .map_err(|e| format!("cannot read --plugin-config {}: {e}", p.display()))?;
                match serde_json::from_slice::<Value>(&text) {
                    Ok(Value::Object(m)) => Some(m),
                    _ => {
                        return Err(format!(
                            "--plugin-config {} is not a JSON object",
                            p.display()
                        ));
                    }
                }
            }
        };
        let entry = conflist::entry(plugin_config.as_ref());
        // Fail early on a config the plugin itself would reject at every ADD.
        if let Some(m) = entry.as_object() {
            crate::config::PluginConfig::from_conf(m)
                .map_err(|e| format!("plugin config: {}", e.msg))?;
        }
        Ok(entry)
    }
}

/// One JSON log line on stderr.
pub(crate) fn log(level: &str, msg: &str, extra: Value) {
    crate::log::line(crate::log::Component::Installer, level, msg, extra);
}

/// The installer's state between events.
struct Installer {
    opts: Options,
    /// The plugin binary to install (beside the agent's own).
    plugin: PathBuf,
    conf: ConfDir,
    binary_current: bool,
    /// (inode, mtime, size) of the binary when last found current: re-read only when it changes.
    binary_stamp: Option<files::Stamp>,
    last_error: Option<String>,
    /// Why the plugin must not be installed on this node at all (its glibc is too old).
    refused: Option<String>,
}

impl Installer {
    fn new(opts: Options, plugin: PathBuf, entry: Value) -> Installer {
        let conf = ConfDir::new(
            opts.conf_dir.clone(),
            opts.conf_name.as_ref().map(OsString::from),
            entry,
        );
        Installer {
            opts,
            plugin,
            conf,
            binary_current: false,
            binary_stamp: None,
            last_error: None,
            refused: None,
        }
    }

    fn status(&self) -> Status {
        let mut warnings = Vec::new();
        if self.conf.flapping() {
            warnings.push(format!("flapping: {}", self.conf.flap_hint()));
        }
        let conflicts = self.conf.conflicts();
        if !conflicts.is_empty() {
            warnings.push(format!(
                "{} in the chain too: new pods get two capture layers until it is removed \
                 (migrating: install mesh-redirect, roll the pods, then remove it)",
                conflicts.join(", ")
            ));
        }
        Status {
            ready: self.ready(),
            chained: self.conf.chained.as_ref().map(|c| confdir::show(c)),
            binary_current: self.binary_current,
            rechains: self.conf.rechains,
            flapping: self.conf.flapping(),
            warnings,
        }
    }

    fn ready(&self) -> Result<(), String> {
        if let Some(e) = &self.refused {
            return Err(e.clone());
        }
        if let Some(e) = &self.last_error {
            return Err(e.clone());
        }
        if !self.binary_current {
            return Err("the plugin binary is not in place".into());
        }
        if self.conf.chained.is_none() {
            return Err(format!(
                "not chained: {}",
                self.conf
                    .waiting
                    .as_deref()
                    .unwrap_or("no primary network config")
            ));
        }
        Ok(())
    }

    /// Whether the installed binary is still ours: cheap unless the file changed.
    fn check_binary(&mut self) {
        let stamp = files::stamp(&self.opts.bin_dir.join(files::BINARY));
        if stamp.is_none() || stamp != self.binary_stamp {
            self.binary_current = files::binary_is_current(&self.opts.bin_dir, &self.plugin);
            self.binary_stamp = if self.binary_current { stamp } else { None };
        }
    }

    fn install_binary(&mut self) {
        match files::install_binary(&self.opts.bin_dir, &self.plugin) {
            Ok(wrote) => {
                self.binary_current = true;
                if wrote {
                    log(
                        "info",
                        "installed the plugin binary",
                        json!({"dir": self.opts.bin_dir}),
                    );
                }
            }
            Err(e) => {
                self.binary_current = false;
                log(
                    "error",
                    "cannot install the plugin binary",
                    json!({"dir": self.opts.bin_dir, "error": e.to_string()}),
                );
            }
        }
    }

    /// Records the outcome of a conf dir operation (logging a new error once).
    fn outcome(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => self.last_error = None,
            Err(e) => {
                if self.last_error.as_ref() != Some(&e) {
                    log("error", "cannot chain mesh-redirect", json!({"error": e}));
                }
                self.last_error = Some(e);
            }
        }
    }

    fn reconcile(&mut self, inotify: &Inotify) {
        let r = self.conf.reconcile(inotify).map(|_| ());
        self.outcome(r);
    }

    /// Handles inotify events in order: a write into an inode we displaced is a version of the
    /// primary older than any change to the dir queued after it, so it goes first.
    fn on_events(&mut self, inotify: &Inotify) {
        let mut dirty = false;
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for ev in events {
                if self.conf.watches(ev.wd) {
                    if dirty {
                        self.reconcile(inotify);
                        dirty = false;
                    }
                    let r = self.conf.on_displaced_write(inotify, ev.wd);
                    self.outcome(r);
                } else {
                    dirty = true;
                }
            }
        }
        if dirty {
            self.reconcile(inotify);
        }
    }
}

/// What the installer reports after each step: readiness, and what the agent's metrics show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub ready: Result<(), String>,
    /// The file our entry is in.
    pub chained: Option<String>,
    /// The installed binary is byte for byte the plugin beside the agent.
    pub binary_current: bool,
    /// Times the entry was put back after another component rewrote the file without it.
    pub rechains: u64,
    /// That happened `FLAP_LIMIT` times within a minute.
    pub flapping: bool,
    /// What the operator should know while chaining works: a fight over the file (naming the
    /// plugin, and the fix for Cilium), another mesh's capture plugin in the chain.
    pub warnings: Vec<String>,
}

/// Installs `plugin` and keeps `entry` (see [`Options::entry`]) chained until SIGTERM/SIGINT
/// (which the caller must have blocked in every thread: the loop takes them from a signalfd),
/// calling `report` after every step. On the signal, removes everything (unless
/// `keep_on_exit`) and returns.
pub fn run(
    opts: Options,
    plugin: PathBuf,
    entry: Value,
    mut report: impl FnMut(&Status),
) -> Result<(), String> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| format!("block signals: {e}"))?;
    let sigfd =
        SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).map_err(|e| format!("signalfd: {e}"))?;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| format!("inotify: {e}"))?;
    let watch = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    for d in [&opts.conf_dir, &opts.bin_dir] {
        inotify
            .add_watch(d, watch)
            .map_err(|e| format!("watch {}: {e}", d.display()))?;
    }
    let mut inst = Installer::new(opts.clone(), plugin.clone(), entry);
    let needs = files::glibc_requirement_of(&plugin).ok().flatten();
    log(
        "info",
        "starting",
        json!({"binDir": opts.bin_dir, "confDir": opts.conf_dir, "plugin": plugin,
            "nodeNeeds": needs.map(|(a, b)| format!("glibc >= {a}.{b} (libnftnl and libmnl ship in {})", files::LIBS_DIR))}),
    );
    if let (Some(loader), Some(need)) = (&opts.node_loader, needs) {
        match files::node_glibc(loader) {
            Ok(have) if have < need => {
                let msg = format!(
                    "not installing: the node's glibc is {}.{} (its loader {}), and the plugin \
                     needs {}.{}: every pod's ADD would fail to start the plugin. Build the image \
                     on an older glibc, or run nodes with a newer one",
                    have.0,
                    have.1,
                    loader.display(),
                    need.0,
                    need.1
                );
                log(
                    "error",
                    "the node's glibc cannot run the plugin",
                    json!({"error": msg}),
                );
                inst.refused = Some(msg);
            }
            Ok(have) => log(
                "info",
                "the node's glibc runs the plugin",
                json!({"node": format!("{}.{}", have.0, have.1), "needs": format!("{}.{}", need.0, need.1)}),
            ),
            Err(e) => log(
                "warn",
                "cannot tell the node's glibc from its loader (installing anyway)",
                json!({"loader": loader, "error": e.to_string()}),
            ),
        }
    }
    if inst.refused.is_none() {
        inst.install_binary();
        inst.reconcile(&inotify);
    }
    report(&inst.status());
    loop {
        let mut fds = [
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
        ];
        // Retry soon while something is wrong, or while displaced inodes are watched (to let
        // them go in time); otherwise rely on events (plus a slow safety net).
        let timeout = if inst.ready().is_ok() && !inst.conf.watching() {
            30_000u16
        } else {
            1_000
        };
        match poll(&mut fds, PollTimeout::from(timeout)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready = |i: usize| {
            fds[i]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
        };
        let (sig, changed) = (ready(0), ready(1));
        if sig {
            let _ = sigfd.read_signal();
            inst.conf.release(&inotify);
            if inst.opts.keep_on_exit {
                log(
                    "info",
                    "signalled: leaving mesh-redirect installed (keep-on-exit)",
                    json!({}),
                );
                return Ok(());
            }
            log(
                "info",
                "signalled: removing mesh-redirect from the node",
                json!({}),
            );
            return cleanup(&inst.opts);
        }
        if inst.refused.is_some() {
            // Nothing to do but say why; the events are read so that poll waits again.
            while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
            report(&inst.status());
            continue;
        }
        inst.check_binary();
        if !inst.binary_current {
            inst.install_binary();
            inst.check_binary();
        }
        if changed {
            inst.on_events(&inotify);
        } else {
            inst.reconcile(&inotify);
        }
        inst.conf.expire(&inotify, Instant::now());
        report(&inst.status());
    }
}

/// Undoes everything: our entries (original files back) and, unless kept, the binary.
pub fn cleanup(opts: &Options) -> Result<(), String> {
    unchain_dir(&opts.conf_dir, None)?;
    files::release_claims(&opts.conf_dir);
    if !opts.keep_binary {
        files::remove_binary(&opts.bin_dir)
            .map_err(|e| format!("{}: {e}", opts.bin_dir.display()))?;
    }
    log(
        "info",
        "mesh-redirect removed",
        json!({"keptBinary": opts.keep_binary}),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options_from_flags_and_env() {
        let o = Options::parse(
            &args(&["--cni-bin-dir", "/b", "--cni-conf-dir=/c", "--keep-binary"]),
            |_| None,
        )
        .unwrap();
        assert_eq!(o.bin_dir, PathBuf::from("/b"));
        assert_eq!(o.conf_dir, PathBuf::from("/c"));
        assert!(o.keep_binary);
        assert!(!o.keep_on_exit);
        assert_eq!(o.readiness_addr, None);
        let env = |k: &str| match k {
            "MESH_REDIRECT_CNI_BIN_DIR" => Some("/eb".to_string()),
            "MESH_REDIRECT_CNI_CONF_DIR" => Some("/ec".to_string()),
            "MESH_REDIRECT_READINESS_ADDR" => Some("0.0.0.0:8000".to_string()),
            "MESH_REDIRECT_KEEP_BINARY" => Some("true".to_string()),
            "MESH_REDIRECT_KEEP_ON_EXIT" => Some("true".to_string()),
            "MESH_REDIRECT_CONF_NAME" => Some("10-calico.conflist".to_string()),
            _ => None,
        };
        let o = Options::parse(&args(&["--cni-bin-dir", "/flag-wins"]), env).unwrap();
        assert_eq!(o.bin_dir, PathBuf::from("/flag-wins"));
        assert_eq!(o.conf_dir, PathBuf::from("/ec"));
        assert_eq!(o.readiness_addr, Some("0.0.0.0:8000".parse().unwrap()));
        assert!(o.keep_binary);
        assert!(o.keep_on_exit);
        assert_eq!(o.conf_name.as_deref(), Some("10-calico.conflist"));
    }

    #[test]
    fn options_errors() {
        for bad in [
            vec!["--cni-conf-dir", "/c"],
            vec!["--cni-bin-dir", "rel", "--cni-conf-dir", "/c"],
            vec![
                "--cni-bin-dir",
                "/b",
                "--cni-conf-dir",
                "/c",
                "--readiness-addr",
                "nope",
            ],
            vec![
                "--cni-bin-dir",
                "/b",
                "--cni-conf-dir",
                "/c",
                "--conf-name",
                "../x",
            ],
            vec![
                "--cni-bin-dir",
                "/b",
                "--cni-conf-dir",
                "/c",
                "--bogus",
                "1",
            ],
        ] {
            assert!(
                matches!(
                    Options::parse(&args(&bad), |_| None),
                    Err(CliError::Usage(_))
                ),
                "{bad:?}"
            );
        }
    }
}
