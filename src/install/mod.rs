//! Node installer (SPEC §5): `mesh-redirect install`, the DaemonSet's command, and
//! `mesh-redirect uninstall`.
//!
//! `install` copies the plugin into the host's CNI bin dir, chains it into the primary network
//! config (the lexically first valid `.conf`/`.conflist`/`.json`, as runtimes pick it), keeps it
//! chained when the primary plugin rewrites its file, serves `/readyz` while all that holds, and
//! undoes it on SIGTERM/SIGINT. One thread, one `poll` loop over inotify, a signalfd and the
//! readiness socket.

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
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
}

pub const USAGE: &str =
    "  mesh-redirect install --cni-bin-dir DIR --cni-conf-dir DIR [--conf-name FILE]
                        [--plugin-config FILE] [--readiness-addr HOST:PORT] [--keep-binary]
                        [--keep-on-exit]
      Copy the plugin into DIR, chain it last into the primary network config, keep it there,
      serve /readyz, and undo all of it on SIGTERM/SIGINT (unless --keep-on-exit: then leave
      it all in place, so a rollout has no window in which new pods go uncaptured). Flags also
      come from the env: MESH_REDIRECT_CNI_BIN_DIR, MESH_REDIRECT_CNI_CONF_DIR,
      MESH_REDIRECT_CONF_NAME, MESH_REDIRECT_PLUGIN_CONFIG, MESH_REDIRECT_READINESS_ADDR,
      MESH_REDIRECT_KEEP_BINARY=true, MESH_REDIRECT_KEEP_ON_EXIT=true.
  mesh-redirect uninstall --cni-bin-dir DIR --cni-conf-dir DIR [--keep-binary]
      Remove the chain entry (restoring the original files) and the binary, once.";

const fn value(flag: &'static str, env: &'static str) -> Spec {
    Spec {
        flag,
        env,
        switch: false,
    }
}

const fn switch(flag: &'static str, env: &'static str) -> Spec {
    Spec {
        flag,
        env,
        switch: true,
    }
}

const SPECS: &[Spec] = &[
    value("--cni-bin-dir", "MESH_REDIRECT_CNI_BIN_DIR"),
    value("--cni-conf-dir", "MESH_REDIRECT_CNI_CONF_DIR"),
    value("--conf-name", "MESH_REDIRECT_CONF_NAME"),
    value("--plugin-config", "MESH_REDIRECT_PLUGIN_CONFIG"),
    value("--readiness-addr", "MESH_REDIRECT_READINESS_ADDR"),
    switch("--keep-binary", "MESH_REDIRECT_KEEP_BINARY"),
    switch("--keep-on-exit", "MESH_REDIRECT_KEEP_ON_EXIT"),
];

impl Options {
    /// Flags win over the environment (`env` is normally `std::env::var`).
    pub fn parse(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Options, CliError> {
        let f = args::parse(args, SPECS, env)?;
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
        })
    }
}

/// One JSON log line on stderr.
pub(crate) fn log(level: &str, msg: &str, extra: Value) {
    let mut line = json!({"ts": crate::log::rfc3339(std::time::SystemTime::now()), "level": level,
        "component": "installer", "msg": msg});
    if let (Some(l), Value::Object(e)) = (line.as_object_mut(), extra) {
        l.extend(e);
    }
    eprintln!("{line}");
}

/// The installer's state between events.
struct Installer {
    opts: Options,
    conf: ConfDir,
    binary_current: bool,
    /// (inode, mtime, size) of the binary when last found current: re-read only when it changes.
    binary_stamp: Option<files::Stamp>,
    last_error: Option<String>,
}

impl Installer {
    fn new(opts: Options) -> Result<Installer, String> {
        let plugin_config = match &opts.plugin_config {
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
        let conf = ConfDir::new(
            opts.conf_dir.clone(),
            opts.conf_name.as_ref().map(OsString::from),
            entry,
        );
        Ok(Installer {
            opts,
            conf,
            binary_current: false,
            binary_stamp: None,
            last_error: None,
        })
    }

    fn ready(&self) -> Result<(), String> {
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
            self.binary_current = files::binary_is_current(&self.opts.bin_dir);
            self.binary_stamp = if self.binary_current { stamp } else { None };
        }
    }

    fn install_binary(&mut self) {
        match files::install_binary(&self.opts.bin_dir) {
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

/// Answers one readiness probe (HTTP/1.x GET /readyz or /healthz).
fn serve_probe(listener: &TcpListener, state: Result<(), String>) {
    let Ok((mut conn, _)) = listener.accept() else {
        return;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 1024];
    let mut len = 0;
    while len < buf.len() {
        match conn.read(&mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                len += n;
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match (path, state) {
        ("/readyz", Ok(())) | ("/healthz", _) => ("200 OK", "ok\n".to_string()),
        ("/readyz", Err(why)) => ("503 Service Unavailable", format!("not ready: {why}\n")),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// `mesh-redirect install`: runs until SIGTERM/SIGINT.
pub fn run_install(opts: Options) -> ExitCode {
    match install_loop(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log("error", "installer failed", json!({"error": e}));
            ExitCode::FAILURE
        }
    }
}

fn install_loop(opts: Options) -> Result<(), String> {
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
    let listener = match opts.readiness_addr {
        None => None,
        Some(a) => {
            let l = TcpListener::bind(a).map_err(|e| format!("readiness {a}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            Some(l)
        }
    };
    let mut inst = Installer::new(opts.clone())?;
    let needs = std::fs::read("/proc/self/exe")
        .ok()
        .and_then(|b| files::glibc_requirement(&b));
    log(
        "info",
        "starting",
        json!({"binDir": opts.bin_dir, "confDir": opts.conf_dir,
            "nodeNeeds": needs.map(|(a, b)| format!("glibc >= {a}.{b} (libnftnl and libmnl ship in {})", files::LIBS_DIR))}),
    );
    inst.install_binary();
    inst.reconcile(&inotify);
    loop {
        let mut fds = vec![
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(l) = &listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
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
            fds.get(i)
                .and_then(|f| f.revents())
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
        };
        let (sig, changed, probe) = (ready(0), ready(1), ready(2));
        if sig {
            let _ = sigfd.read_signal();
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
        if probe && let Some(l) = &listener {
            serve_probe(l, inst.ready());
        }
    }
}

/// Undoes everything: our entries (original files back) and, unless kept, the binary.
pub fn cleanup(opts: &Options) -> Result<(), String> {
    unchain_dir(&opts.conf_dir, None)?;
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
