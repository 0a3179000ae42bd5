//! Running commands: fork, setns in the child (pre_exec), exec, wait4 (for ru_maxrss).

use crate::PATH_ENV;
use crate::stats::progress;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) stdin: Option<Arc<Vec<u8>>>,
    /// Enter the pod netns in the child before exec (the alternatives). The plugin is run
    /// from the caller's namespace with CNI_NETNS, as a runtime does.
    pub(crate) in_netns: bool,
    /// Istio ignores this command's failure (the probe-rule delete).
    pub(crate) may_fail: bool,
}

impl Step {
    pub(crate) fn new(argv: &[&str]) -> Step {
        Step {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            stdin: None,
            in_netns: true,
            may_fail: false,
        }
    }
    pub(crate) fn stdin(mut self, data: &Arc<Vec<u8>>) -> Step {
        self.stdin = Some(data.clone());
        self
    }
    pub(crate) fn env(mut self, k: &str, v: &str) -> Step {
        self.env.push((k.into(), v.into()));
        self
    }
    pub(crate) fn may_fail(mut self) -> Step {
        self.may_fail = true;
        self
    }
    pub(crate) fn text(&self) -> String {
        self.argv.join(" ")
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) us: f64,
    pub(crate) rss_kb: i64,
    pub(crate) ok: bool,
}

/// How a command is put into the pod netns.
pub(crate) static FORK_MODE: AtomicBool = AtomicBool::new(false);

/// The driver's own network namespace, to come back to after a spawn.
pub(crate) fn home_netns() -> &'static File {
    static HOME: OnceLock<File> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").expect("open /proc/self/ns/net"))
}

/// `fork`: the child enters the netns itself (pre_exec hook: fork, setns, exec). Otherwise
/// (the default) the spawning thread enters the netns, posix_spawns (a vfork-style clone: the
/// child inherits the thread's netns) and goes back: cheaper, and what istio-cni itself does
/// (`netNs.Do(...)` around Go's exec, which clones with CLONE_VFORK).
pub(crate) fn command(step: &Step, netns_fd: Option<RawFd>, fork: bool) -> Command {
    let mut cmd = Command::new(&step.argv[0]);
    cmd.args(&step.argv[1..])
        .env_clear()
        .env("PATH", PATH_ENV)
        .envs(step.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if fork {
        let fd = if step.in_netns { netns_fd } else { None };
        // SAFETY: only async-signal-safe work between fork and exec: one setns(2) syscall.
        // Every command gets the hook, so all take the same fork+exec path.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

/// Spawns `cmd`, in `netns_fd` if given (thread setns around a posix_spawn, or the pre_exec
/// hook in fork mode).
pub(crate) fn spawn_in(
    cmd: &mut Command,
    netns_fd: Option<RawFd>,
    fork: bool,
) -> io::Result<std::process::Child> {
    match netns_fd {
        Some(fd) if !fork => {
            // SAFETY: setns on this thread with a valid namespace fd; we always go back.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let child = cmd.spawn();
            // SAFETY: as above, back to the driver's namespace.
            if unsafe { libc::setns(home_netns().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "cannot return to the driver's netns: {}",
                    io::Error::last_os_error()
                );
            }
            child
        }
        _ => cmd.spawn(),
    }
}

pub(crate) fn wait4(pid: i32) -> (i32, libc::rusage) {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            return (status, ru);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            panic!("wait4 {pid}: {e}");
        }
    }
}

/// Runs one command, timed from before the spawn to the return of wait4 (exit reaped).
pub(crate) fn run_step(step: &Step, netns_fd: Option<RawFd>) -> Outcome {
    run_step_mode(step, netns_fd, FORK_MODE.load(Ordering::Relaxed))
}

pub(crate) fn run_step_mode(step: &Step, netns_fd: Option<RawFd>, fork: bool) -> Outcome {
    let mut cmd = command(step, netns_fd, fork);
    cmd.stdin(if step.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let fd = if step.in_netns { netns_fd } else { None };
    let t0 = Instant::now();
    let mut child = match spawn_in(&mut cmd, fd, fork) {
        Ok(c) => c,
        Err(e) => {
            progress(&format!("spawn {}: {e}", step.text()));
            return Outcome::default();
        }
    };
    if let (Some(data), Some(mut pipe)) = (&step.stdin, child.stdin.take()) {
        let _ = pipe.write_all(data);
    }
    let (status, ru) = wait4(child.id() as i32);
    let us = t0.elapsed().as_secs_f64() * 1e6;
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Outcome {
        us,
        rss_kb: ru.ru_maxrss,
        ok: exited_ok || step.may_fail,
    }
}

/// Re-runs a failed command with its output captured, for the error message.
pub(crate) fn diagnose(step: &Step, netns_fd: Option<RawFd>) -> String {
    let mut cmd = command(step, netns_fd, true);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let Ok(mut child) = cmd.spawn() else {
        return "cannot spawn".into();
    };
    if let (Some(data), Some(mut pipe)) = (&step.stdin, child.stdin.take()) {
        let _ = pipe.write_all(data);
    }
    drop(child.stdin.take());
    match child.wait_with_output() {
        Ok(out) => format!(
            "{}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => e.to_string(),
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct SeqOutcome {
    pub(crate) us: f64,
    pub(crate) steps: Vec<Outcome>,
    pub(crate) rss_kb: i64,
    pub(crate) ok: bool,
}

/// Runs steps one after the other (stops at the first failure), timed as one unit.
pub(crate) fn run_seq(steps: &[Step], netns_fd: Option<RawFd>) -> SeqOutcome {
    let t0 = Instant::now();
    let mut out = SeqOutcome {
        ok: true,
        ..SeqOutcome::default()
    };
    for s in steps {
        let r = run_step(s, netns_fd);
        out.rss_kb = out.rss_kb.max(r.rss_kb);
        out.steps.push(r);
        if !r.ok {
            out.ok = false;
            progress(&format!(
                "FAILED: {} -> {}",
                s.text(),
                diagnose(s, netns_fd)
            ));
            break;
        }
    }
    out.us = t0.elapsed().as_secs_f64() * 1e6;
    out
}

pub(crate) static PROBE_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Peak RSS of each command, as `wait4`'s `ru_maxrss`, measured by a minimal parent:
/// `/usr/bin/time -f %M CMD`. (`ru_maxrss` of a child spawned straight from this driver would
/// include the driver's own pages: exec carries the old mm's high-water mark into the new
/// image's `maxrss`, for fork and vfork alike.) Returns the largest over the steps, in KiB.
pub(crate) fn rss_probe(steps: &[Step], netns_fd: Option<RawFd>, dir: &Path) -> Option<i64> {
    let mut max = 0;
    for step in steps {
        let f = dir.join(format!(
            ".rss-{}-{}",
            std::process::id(),
            PROBE_COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let mut s = step.clone();
        let mut argv: Vec<String> = ["/usr/bin/time", "-f", "%M", "-o"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        argv.push(f.display().to_string());
        argv.push("--".into());
        argv.extend(step.argv.iter().cloned());
        s.argv = argv;
        let r = run_step(&s, netns_fd);
        let kb = std::fs::read_to_string(&f)
            .ok()
            .and_then(|t| t.lines().last().and_then(|l| l.trim().parse::<i64>().ok()));
        let _ = std::fs::remove_file(&f);
        if !r.ok {
            return None;
        }
        max = max.max(kb?);
    }
    Some(max)
}

pub(crate) fn have_time() -> bool {
    Path::new("/usr/bin/time").exists()
}

pub(crate) fn mib(kb: Option<i64>) -> String {
    kb.map(|k| format!("{:.1}", k as f64 / 1024.0))
        .unwrap_or_else(|| "-".into())
}
