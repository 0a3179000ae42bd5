//! Where a pod sandbox's network namespace is, as the agent (possibly in a container) sees it.
//!
//! The runtime reports a path (containerd and CRI-O: the netns bind mount in the runtime spec),
//! or, from older runtimes, only the sandbox's pid. A wrong answer writes a pod's ruleset into
//! someone else's namespace, so each fallback must prove itself:
//! - the runtime's path, when it is visible here;
//! - else the file of the same name in `--netns-dir` (the host's netns dir mounted into the
//!   agent's container), and only if that file is itself a network namespace and the runtime's
//!   path is not a `/proc` path (`/proc/PID/ns/net` has the basename `net`);
//! - else `/proc/PID/ns/net`, only for a pid proven to be the sandbox's: its cgroup names the
//!   sandbox, and its start time is the same before and after the namespace is opened (a pid
//!   reused meanwhile belongs to a process that started later).

use super::cri::SandboxNet;
use crate::netns::{Netns, NetnsError};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("no network namespace in the sandbox's status")]
    NotInStatus,
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(
        "the runtime gave only the sandbox's pid {0}, and /proc/{0} is not visible here (the \
         agent needs hostPID for that, or a runtime that reports the netns path)"
    )]
    PidNotVisible(u32),
    #[error("pid {pid} is not the sandbox's process: its cgroup does not name sandbox {sandbox}")]
    PidNotSandbox { pid: u32, sandbox: String },
    #[error(
        "pid {0} changed while its namespace was opened: the process exited, the pid was reused"
    )]
    PidReused(u32),
}

impl LocateError {
    /// The namespace (or its process) is gone: the sandbox is probably being torn down.
    pub fn is_gone(&self) -> bool {
        match self {
            LocateError::Netns(e) => e.is_gone(),
            LocateError::PidNotVisible(_) | LocateError::PidReused(_) => true,
            _ => false,
        }
    }
}

/// Opens the sandbox's network namespace (see the module comment for the rules). Returns it
/// with the path it was opened at.
pub fn locate(
    net: &SandboxNet,
    sandbox: &str,
    netns_dir: &Path,
) -> Result<(Netns, PathBuf), LocateError> {
    if let Some(p) = &net.netns {
        let at = visible(p, netns_dir);
        return Ok((Netns::open(&at)?, at));
    }
    match net.pid {
        Some(pid) => by_pid(pid, sandbox),
        None => Err(LocateError::NotInStatus),
    }
}

/// The runtime's path if it exists here, else its namesake in `netns_dir` if that exists;
/// else the runtime's path (whose open then says it is missing).
fn visible(p: &Path, netns_dir: &Path) -> PathBuf {
    if p.symlink_metadata().is_ok() || p.starts_with("/proc") {
        return p.to_path_buf();
    }
    match p.file_name() {
        Some(name) if netns_dir.join(name).symlink_metadata().is_ok() => netns_dir.join(name),
        _ => p.to_path_buf(),
    }
}

/// `/proc/PID/ns/net`, pinned to the sandbox's own process.
fn by_pid(pid: u32, sandbox: &str) -> Result<(Netns, PathBuf), LocateError> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let before = start_time(&proc).ok_or(LocateError::PidNotVisible(pid))?;
    let cgroup = std::fs::read_to_string(proc.join("cgroup")).unwrap_or_default();
    if sandbox.is_empty() || !cgroup.contains(sandbox) {
        return Err(LocateError::PidNotSandbox {
            pid,
            sandbox: sandbox.to_string(),
        });
    }
    let path = proc.join("ns/net");
    let ns = Netns::open(&path)?;
    if start_time(&proc) != Some(before) {
        return Err(LocateError::PidReused(pid));
    }
    Ok((ns, path))
}

/// A process's start time (clock ticks after boot, field 22 of `/proc/PID/stat`).
fn start_time(proc: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(proc.join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_paths_never_map_into_the_netns_dir() {
        let dir = std::env::temp_dir().join(format!("mr-locate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("net"), b"").unwrap();
        std::fs::write(dir.join("cni-1"), b"").unwrap();
        // Not visible, so its namesake: only for a non-/proc path.
        assert_eq!(
            visible(Path::new("/var/run/netns-elsewhere/cni-1"), &dir),
            dir.join("cni-1")
        );
        assert_eq!(
            visible(Path::new("/proc/999999999/ns/net"), &dir),
            PathBuf::from("/proc/999999999/ns/net")
        );
        // The namesake must be a network namespace: a plain file is refused.
        let net = SandboxNet {
            host_network: false,
            netns: Some(PathBuf::from("/var/run/netns-elsewhere/cni-1")),
            pid: None,
            ipv6: false,
        };
        let e = locate(&net, "abc", &dir).unwrap_err();
        assert!(
            matches!(e, LocateError::Netns(NetnsError::TornDown(_))),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pid_must_be_the_sandboxs() {
        let me = std::process::id();
        assert!(start_time(Path::new(&format!("/proc/{me}"))).is_some());
        let e = by_pid(me, "0123456789abcdef0123456789abcdef").unwrap_err();
        assert!(matches!(e, LocateError::PidNotSandbox { .. }), "{e}");
        let e = by_pid(u32::MAX - 1, "x").unwrap_err();
        assert!(matches!(e, LocateError::PidNotVisible(_)), "{e}");
        assert!(e.is_gone());
    }
}
