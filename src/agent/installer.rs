//! The installer's loop, the node agent's main thread: copies the plugin into the host's CNI
//! bin dir, chains it into the primary network config (the runtime's first file, as libcni
//! picks it), keeps it chained when the primary plugin rewrites its file, reports its status
//! after every step (served as readiness and metrics), and undoes it all on SIGTERM/SIGINT.
//! One thread, one `poll` loop over inotify and a signalfd. What each step writes, and how, is
//! `crate::install`'s (docs/DESIGN.md, "The installer's write protocol").

use crate::install::confdir::{self, ConfDir, Waiting};
use crate::install::error::Cause;
use crate::install::{InstallError, Options, cleanup, files, log};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::{Value, json};
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

/// Why the chain is not ready, as `/readyz` says it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainNotReady {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The last write or read failed; it is retried every second.
    #[error("{message}")]
    Failed { cause: Cause, message: String },
    #[error("the plugin binary is not in place")]
    BinaryNotInPlace,
    #[error("not chained: {0}")]
    NotChained(Waiting),
}

/// Why the plugin must not be installed on this node at all: it would fail every pod's ADD.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    NodeTooOld(#[from] NodeTooOld),
    /// cri-dockerd (its CRI name is `docker`, cri-dockerd 246bd657 `core/docker_service.go`)
    /// passes no pod annotations to CNI plugins, and the plugin fails closed without them.
    #[error(
        "not installing: the container runtime is {runtime} {version} (cri-dockerd), which \
         passes no pod annotations to CNI plugins; mesh-redirect refuses a pod it cannot see \
         the annotations of, so every pod's ADD on this node would fail. Use containerd or \
         CRI-O (minikube: --container-runtime=containerd)"
    )]
    NoAnnotations { runtime: String, version: String },
}

/// The refusal a runtime calls for, by its CRI `Version` (name, version).
pub fn runtime_refusal(name: &str, version: &str) -> Option<Refusal> {
    (name == "docker").then(|| Refusal::NoAnnotations {
        runtime: name.to_string(),
        version: version.to_string(),
    })
}

/// A node whose glibc cannot run the plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not installing: the node's glibc is {}.{} (its loader {}), and the plugin needs {}.{}: \
     every pod's ADD would fail to start the plugin. Build the image on an older glibc, or run \
     nodes with a newer one",
    have.0, have.1, loader.display(), need.0, need.1
)]
pub struct NodeTooOld {
    pub have: (u32, u32),
    pub need: (u32, u32),
    pub loader: PathBuf,
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
    /// The last failure, until a step succeeds (logged once per cause).
    last_error: Option<(Cause, String)>,
    /// Why the plugin must not be installed on this node at all.
    refused: Option<Refusal>,
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

    fn ready(&self) -> Result<(), ChainNotReady> {
        if let Some(r) = &self.refused {
            return Err(r.clone().into());
        }
        if let Some((cause, message)) = &self.last_error {
            return Err(ChainNotReady::Failed {
                cause: cause.clone(),
                message: message.clone(),
            });
        }
        if !self.binary_current {
            return Err(ChainNotReady::BinaryNotInPlace);
        }
        if self.conf.chained.is_none() {
            return Err(ChainNotReady::NotChained(
                self.conf.waiting.clone().unwrap_or(Waiting::NoPrimary),
            ));
        }
        Ok(())
    }

    /// Whether the installed binary is still ours, and the libraries it needs beside it:
    /// cheap (a stat per file) unless the binary changed.
    fn check_binary(&mut self) {
        let stamp = files::stamp(&self.opts.bin_dir.join(files::BINARY));
        if !files::libs_installed(&self.opts.bin_dir) {
            // Removed by hand or by a node cleanup: every ADD would fail to start the plugin.
            self.binary_current = false;
            self.binary_stamp = None;
        } else if stamp.is_none() || stamp != self.binary_stamp {
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

    /// Records the outcome of a conf dir operation (logging a new cause once).
    fn outcome(&mut self, r: Result<(), InstallError>) {
        match r {
            Ok(()) => self.last_error = None,
            Err(e) => {
                let cause = e.cause();
                if self.last_error.as_ref().map(|(c, _)| c) != Some(&cause) {
                    log(
                        "error",
                        "cannot chain mesh-redirect",
                        json!({"error": e.to_string()}),
                    );
                }
                self.last_error = Some((cause, e.to_string()));
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
    pub ready: Result<(), ChainNotReady>,
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
    refused: Option<Refusal>,
    mut report: impl FnMut(&Status),
) -> Result<(), InstallError> {
    let setup = |what: &str| {
        let what = what.to_string();
        move |err| InstallError::Setup { what, err }
    };
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT] {
        mask.add(s);
    }
    mask.thread_block().map_err(setup("block signals"))?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).map_err(setup("signalfd"))?;
    let inotify =
        Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).map_err(setup("inotify"))?;
    let watch = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    for d in [&opts.conf_dir, &opts.bin_dir] {
        inotify
            .add_watch(d, watch)
            .map_err(setup(&format!("watch {}", d.display())))?;
    }
    let mut inst = Installer::new(opts.clone(), plugin.clone(), entry);
    let needs = files::glibc_requirement_of(&plugin).ok().flatten();
    log(
        "info",
        "starting",
        json!({"binDir": opts.bin_dir, "confDir": opts.conf_dir, "plugin": plugin,
            "nodeNeeds": needs.map(|(a, b)| format!("glibc >= {a}.{b} (libmnl ships in {})", files::LIBS_DIR))}),
    );
    if let (Some(loader), Some(need)) = (&opts.node_loader, needs) {
        match files::node_glibc(loader) {
            Ok(have) if have < need => {
                let refused = NodeTooOld {
                    have,
                    need,
                    loader: loader.clone(),
                };
                log(
                    "error",
                    "the node's glibc cannot run the plugin",
                    json!({"error": refused.to_string()}),
                );
                inst.refused = Some(refused.into());
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
    if let Some(r) = refused {
        log(
            "error",
            "the container runtime cannot run the plugin",
            json!({"error": r.to_string()}),
        );
        inst.refused = Some(r);
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
            Err(e) => return Err(setup("poll")(e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_runtime_that_passes_no_annotations_is_refused() {
        let r = runtime_refusal("docker", "0.3.21").expect("cri-dockerd is refused");
        assert!(r.to_string().contains("cri-dockerd"), "{r}");
        for ok in ["containerd", "cri-o"] {
            assert_eq!(runtime_refusal(ok, "2.3.4"), None, "{ok}");
        }
    }
}
