//! Node installer (SPEC §5): `mesh-redirect install`, the DaemonSet's command, and
//! `mesh-redirect uninstall`.
//!
//! `install` copies the plugin into the host's CNI bin dir, chains it into the primary network
//! config (the lexically first valid `.conf`/`.conflist`/`.json`, as runtimes pick it), keeps it
//! chained when the primary plugin rewrites its file, serves `/readyz` while all that holds, and
//! undoes it on SIGTERM/SIGINT. One thread, one `poll` loop over inotify, a signalfd and the
//! readiness socket.

pub mod conflist;
pub mod files;

use crate::cli::CliError;
use conflist::Conf;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Config file extensions runtimes read (libcni's).
const EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];
/// Re-chaining this often within FLAP_WINDOW means something else fights over the file.
const FLAP_LIMIT: usize = 5;
const FLAP_WINDOW: Duration = Duration::from_secs(60);

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

const FLAGS: [(&str, &str); 7] = [
    ("--cni-bin-dir", "MESH_REDIRECT_CNI_BIN_DIR"),
    ("--cni-conf-dir", "MESH_REDIRECT_CNI_CONF_DIR"),
    ("--conf-name", "MESH_REDIRECT_CONF_NAME"),
    ("--plugin-config", "MESH_REDIRECT_PLUGIN_CONFIG"),
    ("--readiness-addr", "MESH_REDIRECT_READINESS_ADDR"),
    ("--keep-binary", "MESH_REDIRECT_KEEP_BINARY"),
    ("--keep-on-exit", "MESH_REDIRECT_KEEP_ON_EXIT"),
];

/// Flags that take no value on the command line.
const SWITCHES: [&str; 2] = ["--keep-binary", "--keep-on-exit"];

impl Options {
    /// Flags win over the environment (`env` is normally `std::env::var`).
    pub fn parse(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Options, CliError> {
        let switched = |flag: &str| args.iter().any(|a| a == flag);
        let rest: Vec<String> = args
            .iter()
            .filter(|a| !SWITCHES.contains(&a.as_str()))
            .cloned()
            .collect();
        let names: Vec<&str> = FLAGS.iter().map(|(f, _)| *f).collect();
        let flags = crate::cli::flags(&rest, &names)?;
        let get = |flag: &str| -> Option<String> {
            let from_flag = flags
                .iter()
                .rev()
                .find(|(n, _)| n == flag)
                .map(|(_, v)| v.clone());
            let var = FLAGS
                .iter()
                .find(|(f, _)| *f == flag)
                .map(|(_, v)| *v)
                .unwrap_or_default();
            from_flag.or_else(|| env(var)).filter(|v| !v.is_empty())
        };
        let dir = |flag: &str| -> Result<PathBuf, CliError> {
            let d = PathBuf::from(
                get(flag).ok_or_else(|| CliError::Usage(format!("{flag} is required")))?,
            );
            if !d.is_absolute() {
                return Err(CliError::Usage(format!("{flag} must be an absolute path")));
            }
            Ok(d)
        };
        let readiness_addr = match get("--readiness-addr") {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| {
                CliError::Usage(format!("--readiness-addr {a:?} is not HOST:PORT"))
            })?),
        };
        let conf_name = get("--conf-name");
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
            plugin_config: get("--plugin-config").map(PathBuf::from),
            readiness_addr,
            keep_binary: switched("--keep-binary")
                || get("--keep-binary").is_some_and(|v| v == "true" || v == "1"),
            keep_on_exit: switched("--keep-on-exit")
                || get("--keep-on-exit").is_some_and(|v| v == "true" || v == "1"),
        })
    }
}

/// One JSON log line on stderr.
fn log(level: &str, msg: &str, extra: Value) {
    let mut line = json!({"ts": crate::log::rfc3339(std::time::SystemTime::now()), "level": level,
        "component": "installer", "msg": msg});
    if let (Some(l), Value::Object(e)) = (line.as_object_mut(), extra) {
        l.extend(e);
    }
    eprintln!("{line}");
}

fn ext_of(name: &str) -> Option<&str> {
    let ext = Path::new(name).extension()?.to_str()?;
    EXTENSIONS.contains(&ext).then_some(ext)
}

/// The config files of `dir`, lexically ordered, as runtimes list them.
fn config_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| ext_of(n).is_some())
        .collect();
    names.sort();
    Ok(names)
}

/// The primary config: `conf_name` if given, else the lexically first valid file. Invalid ones
/// are reported (once per content) and skipped.
fn find_primary(
    opts: &Options,
    reported: &mut Vec<(String, String)>,
) -> io::Result<Option<Primary>> {
    let names = match &opts.conf_name {
        // A single-plugin file we turned into a list lives on under the list's name.
        Some(n) => vec![n.clone(), format!("{}.conflist", stem(n))],
        None => config_files(&opts.conf_dir)?,
    };
    for name in names {
        let path = opts.conf_dir.join(&name);
        // Runtimes follow symlinks when they read; a FIFO or device would block or mislead.
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let stamp = files::stamp(&path);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        match conflist::parse(&bytes, ext_of(&name) == Some("conflist")) {
            Ok(conf) => {
                return Ok(Some(Primary {
                    name,
                    conf,
                    bytes,
                    stamp,
                }));
            }
            Err(why) => {
                let key = (name.clone(), why.clone());
                if !reported.contains(&key) {
                    log(
                        "error",
                        "invalid network config left untouched",
                        json!({"file": name, "error": why}),
                    );
                    reported.push(key);
                }
            }
        }
    }
    Ok(None)
}

/// The primary config as read once: everything chain() decides and writes comes from these
/// bytes, and `stamp` tells whether the file changed before we replace it.
struct Primary {
    name: String,
    conf: Conf,
    bytes: Vec<u8>,
    stamp: Option<files::Stamp>,
}

/// The installer's state between events.
struct Installer {
    opts: Options,
    entry: Value,
    /// The file our entry is in, once chained.
    chained: Option<String>,
    binary_current: bool,
    /// (inode, mtime, size) of the binary when last found current: re-read only when it changes.
    binary_stamp: Option<files::Stamp>,
    last_error: Option<String>,
    rewrites: VecDeque<Instant>,
    reported: Vec<(String, String)>,
    waiting_logged: bool,
}

fn stem(name: &str) -> &str {
    Path::new(name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(name)
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
        Ok(Installer {
            opts,
            entry,
            chained: None,
            binary_current: false,
            binary_stamp: None,
            last_error: None,
            rewrites: VecDeque::new(),
            reported: Vec::new(),
            waiting_logged: false,
        })
    }

    fn ready(&self) -> Result<(), String> {
        if let Some(e) = &self.last_error {
            return Err(e.clone());
        }
        if !self.binary_current {
            return Err("the plugin binary is not in place".into());
        }
        if self.chained.is_none() {
            return Err("not chained yet: no primary network config".into());
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

    /// Brings the conf dir to "our entry last in the primary, nowhere else".
    fn reconcile(&mut self) {
        match self.chain() {
            Ok(()) => self.last_error = None,
            Err(e) => {
                if self.last_error.as_ref() != Some(&e) {
                    log("error", "cannot chain mesh-redirect", json!({"error": e}));
                }
                self.last_error = Some(e);
            }
        }
    }

    fn chain(&mut self) -> Result<(), String> {
        let dir = self.opts.conf_dir.clone();
        let Some(Primary {
            name,
            conf,
            bytes,
            stamp,
        }) = find_primary(&self.opts, &mut self.reported)
            .map_err(|e| format!("{}: {e}", dir.display()))?
        else {
            if !self.waiting_logged {
                log(
                    "info",
                    "waiting for a primary network config",
                    json!({"dir": dir}),
                );
                self.waiting_logged = true;
            }
            self.chained = None;
            return Ok(());
        };
        self.waiting_logged = false;
        let path = dir.join(&name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "primary config {name} is a symlink; refusing to replace it"
            ));
        }
        let list = conflist::as_list(&conf);
        // A chain mesh-redirect cannot speak would fail every pod's ADD on the node.
        crate::protocol::negotiate_version(&list, crate::protocol::Command::Add)
            .map_err(|e| format!("primary config {name}: {}; not chaining into it", e.msg))?;
        let target = match conf {
            Conf::List(_) => name.clone(),
            Conf::Single(_) => format!("{}.conflist", stem(&name)),
        };
        if matches!(conf, Conf::List(_)) && conflist::is_chained(&list, &self.entry) {
            self.chained = Some(target);
            return self.unchain_others(&name);
        }
        if target != name && dir.join(&target).exists() && !self.is_ours_converted(&target, &name) {
            return Err(format!(
                "cannot turn {name} into a list: {target} exists and is not ours"
            ));
        }
        let mode = files::mode_of(&path);
        let backup = format!("{name}{}", files::BACKUP_SUFFIX);
        // Keep the file as the primary plugin wrote it, to give it back byte for byte.
        if !conflist::has_ours(&list) {
            files::write_atomic(&dir, &backup, &bytes, mode)
                .map_err(|e| format!("{backup}: {e}"))?;
        }
        // Rewritten since we read it: replacing it now would lose that version. Its own
        // inotify event brings us back to chain the new one.
        if files::stamp(&path) != stamp {
            return Ok(());
        }
        files::write_atomic(
            &dir,
            &target,
            &conflist::render(&conflist::chain(&list, &self.entry)),
            mode,
        )
        .map_err(|e| format!("{target}: {e}"))?;
        if target != name {
            std::fs::remove_file(&path).map_err(|e| format!("{name}: {e}"))?;
        }
        let rewritten = self.chained.as_deref() == Some(target.as_str());
        log(
            "info",
            if rewritten {
                "re-chained after the file was rewritten"
            } else {
                "chained"
            },
            json!({"file": target}),
        );
        if rewritten {
            self.note_rewrite(&target);
        }
        self.chained = Some(target.clone());
        self.unchain_others(&target)
    }

    /// Whether `target` (a `.conflist`) is the one we made from `single_name`.
    fn is_ours_converted(&self, target: &str, single_name: &str) -> bool {
        let backup = self
            .opts
            .conf_dir
            .join(format!("{single_name}{}", files::BACKUP_SUFFIX));
        backup.exists()
            && files::read_regular(&self.opts.conf_dir.join(target))
                .ok()
                .and_then(|b| conflist::parse(&b, true).ok())
                .is_some_and(|c| conflist::has_ours(&conflist::as_list(&c)))
    }

    /// Another component rewrote our file: fine once, a fight if it keeps happening.
    fn note_rewrite(&mut self, file: &str) {
        let now = Instant::now();
        self.rewrites.push_back(now);
        while self
            .rewrites
            .front()
            .is_some_and(|t| now.duration_since(*t) > FLAP_WINDOW)
        {
            self.rewrites.pop_front();
        }
        if self.rewrites.len() >= FLAP_LIMIT {
            log(
                "warn",
                "flapping: another component keeps rewriting the network config without mesh-redirect",
                json!({"file": file, "rewrites": self.rewrites.len(), "windowSeconds": FLAP_WINDOW.as_secs()}),
            );
            self.rewrites.clear();
        }
    }

    /// Removes our entry from every config file but `keep`.
    fn unchain_others(&mut self, keep: &str) -> Result<(), String> {
        unchain_dir(&self.opts.conf_dir, Some(keep))
    }
}

/// Removes our entries from the conf dir's files (except `keep`), giving back the original
/// bytes where we kept them and the file is otherwise unchanged; restores `.conf` files we
/// turned into lists.
pub fn unchain_dir(dir: &Path, keep: Option<&str>) -> Result<(), String> {
    let err = |n: &str, e: io::Error| format!("{n}: {e}");
    // Backups first: they say which files we changed and what they were.
    let backups: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| err(&dir.display().to_string(), e))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(files::BACKUP_SUFFIX))
        .collect();
    for backup in backups {
        let orig = backup
            .strip_suffix(files::BACKUP_SUFFIX)
            .unwrap_or(&backup)
            .to_string();
        let converted = format!("{}.conflist", stem(&orig));
        let current = if dir.join(&orig).exists() {
            orig.clone()
        } else {
            converted
        };
        if Some(current.as_str()) == keep {
            continue;
        }
        let saved = files::read_regular(&dir.join(&backup)).map_err(|e| err(&backup, e))?;
        if let Ok(now) = files::read_regular(&dir.join(&current))
            && let Ok(now) = conflist::parse(&now, ext_of(&current) == Some("conflist"))
        {
            let now = conflist::as_list(&now);
            let saved_list = conflist::parse(&saved, ext_of(&orig) == Some("conflist"))
                .map(|c| conflist::as_list(&c));
            let mode = files::mode_of(&dir.join(&current));
            if saved_list
                .as_ref()
                .is_ok_and(|s| *s == conflist::unchain(&now))
            {
                // Unchanged but for us: the original bytes, under the original name.
                files::write_atomic(dir, &orig, &saved, mode).map_err(|e| err(&orig, e))?;
                if current != orig {
                    std::fs::remove_file(dir.join(&current)).map_err(|e| err(&current, e))?;
                }
            } else if conflist::has_ours(&now) {
                files::write_atomic(
                    dir,
                    &current,
                    &conflist::render(&conflist::unchain(&now)),
                    mode,
                )
                .map_err(|e| err(&current, e))?;
            }
        }
        std::fs::remove_file(dir.join(&backup)).map_err(|e| err(&backup, e))?;
        log(
            "info",
            "removed mesh-redirect from a network config",
            json!({"file": orig}),
        );
    }
    // Entries without a backup (e.g. written by hand or by an older installer).
    for name in config_files(dir).map_err(|e| err(&dir.display().to_string(), e))? {
        if Some(name.as_str()) == keep {
            continue;
        }
        let Ok(bytes) = files::read_regular(&dir.join(&name)) else {
            continue;
        };
        if let Ok(c) = conflist::parse(&bytes, ext_of(&name) == Some("conflist")) {
            let list = conflist::as_list(&c);
            if matches!(c, Conf::List(_)) && conflist::has_ours(&list) {
                let mode = files::mode_of(&dir.join(&name));
                files::write_atomic(
                    dir,
                    &name,
                    &conflist::render(&conflist::unchain(&list)),
                    mode,
                )
                .map_err(|e| err(&name, e))?;
                log(
                    "info",
                    "removed mesh-redirect from a network config",
                    json!({"file": name}),
                );
            }
        }
    }
    Ok(())
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
    inst.reconcile();
    loop {
        let mut fds = vec![
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(l) = &listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        // Retry soon while something is wrong; otherwise rely on events (plus a slow safety net).
        let timeout = if inst.ready().is_ok() {
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
        if changed {
            // Drain; what changed is re-read below whatever it was.
            let _ = inotify.read_events();
        }
        inst.check_binary();
        if !inst.binary_current {
            inst.install_binary();
            inst.check_binary();
        }
        inst.reconcile();
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

    #[test]
    fn extensions_are_libcnis() {
        assert_eq!(ext_of("10-bridge.conf"), Some("conf"));
        assert_eq!(ext_of("10-bridge.conflist"), Some("conflist"));
        assert_eq!(ext_of("99.json"), Some("json"));
        assert_eq!(ext_of("10-bridge.conf.mesh-redirect-orig"), None);
        assert_eq!(ext_of(".10-bridge.conflist.tmp-12"), None);
        assert_eq!(stem("10-bridge.conf"), "10-bridge");
    }
}
