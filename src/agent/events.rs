//! The agent's end of the plugin's events: a unix stream socket in a host directory only root
//! can reach, one event per connection, counted into the metrics; a netlink socket that comes
//! with an event is closed on a thread of its own (see [`Release`]). Anything else that arrives —
//! garbage, an oversized or endless stream, a flood of connections — is counted as rejected and
//! never blocks or stops the agent; a socket file removed or replaced is put back. One agent
//! owns the socket (see [`Owner`]).

use super::Shared;
use super::health::Worker;
use super::log;
use super::metrics::{Command, Invocation, Kind};
use crate::events::MAX_EVENT;
use crate::install::files;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use serde_json::{Value, json};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UnixListener;

/// How long a connection may take to deliver its event.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections handled at once; more wait in the backlog.
const MAX_CONCURRENT: usize = 256;

/// Binds the socket at `path` (the caller owns it): its directory made (0700) if missing, a
/// stale socket or a file in its place removed, the socket itself 0600.
pub fn bind(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    files::private_parent(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(std::io::Error::other(format!(
                "{} is a directory",
                path.display()
            )));
        }
        Ok(_) => std::fs::remove_file(path)?,
        Err(_) => {}
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn reject(st: &Shared, why: &str) {
    st.metrics
        .events_rejected
        .get_or_create(&Kind { kind: why.into() })
        .inc();
}

/// Counts one event (or rejects it).
pub fn count(st: &Shared, bytes: &[u8]) {
    let reject = |why: &str| reject(st, why);
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return reject("malformed");
    };
    let command = v["command"].as_str().unwrap_or_default();
    let outcome = v["outcome"].as_str().unwrap_or_default();
    let known = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"].contains(&command)
        && ["captured", "skipped", "error", "ok"].contains(&outcome);
    let code = match &v["code"] {
        Value::Null => Some(String::new()),
        c => c.as_u64().filter(|&c| c < 1000).map(|c| c.to_string()),
    };
    let seconds = v["seconds"].as_f64().filter(|s| s.is_finite() && *s >= 0.0);
    let (true, Some(code), Some(seconds)) = (known && v["v"] == 1, code, seconds) else {
        return reject("malformed");
    };
    st.metrics
        .invocations
        .get_or_create(&Invocation {
            command: command.into(),
            outcome: outcome.into(),
            code,
        })
        .inc();
    if ["ADD", "DEL", "CHECK"].contains(&command) {
        st.metrics
            .duration
            .get_or_create(&Command {
                command: command.into(),
            })
            .observe(seconds);
    }
}

/// Descriptors one event may carry (the plugin sends at most one); more are dropped by the
/// kernel (`MSG_CTRUNC`).
const MAX_FDS: usize = 4;

/// One `recvmsg` on the event connection: the bytes read, and the descriptors that came with
/// them (close-on-exec).
fn recv_with_fds(s: &tokio::net::UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<RawFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(f) = c {
            fds.extend(f);
        }
    }
    Ok((msg.bytes, fds))
}

/// Reads one connection's event: up to `MAX_EVENT` bytes until EOF, within `READ_TIMEOUT`.
/// A descriptor that comes with it (a netlink socket whose release waits for the kernel, see
/// `kernel::Linger`) goes to `release`, whatever becomes of the event.
async fn one(st: Arc<Shared>, s: tokio::net::UnixStream, release: Release) {
    let mut buf = Vec::with_capacity(512);
    // Released once the connection is over: the plugin closes its own copy first, so ours is
    // the last and its wait is ours, not the plugin's.
    let mut received = Vec::new();
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            s.readable().await?;
            let (n, fds) = match s.try_io(Interest::READABLE, || recv_with_fds(&s, &mut chunk)) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            received.extend(fds);
            if n == 0 {
                return Ok::<bool, io::Error>(true);
            }
            if buf.len() + n > MAX_EVENT {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let outcome = tokio::time::timeout(READ_TIMEOUT, read).await;
    drop(s);
    for fd in received {
        release.take(&st, fd);
    }
    match outcome {
        Ok(Ok(true)) => count(&st, &buf),
        Ok(Ok(false)) => reject(&st, "oversized"),
        Ok(Err(_)) | Err(_) => reject(&st, "incomplete"),
    }
}

/// Closes the descriptors the plugin hands over, on a thread of its own: each close may wait
/// for an RCU grace period (milliseconds), which must hold up neither the event loop nor the
/// plugin. One after another is enough: once one wait is over, the sockets that queued behind
/// it mostly find their kernel work done and close at once.
#[derive(Clone)]
struct Release(std::sync::mpsc::Sender<RawFd>);

impl Release {
    fn start() -> Release {
        let (tx, rx) = std::sync::mpsc::channel::<RawFd>();
        let spawned = std::thread::Builder::new()
            .name("release".into())
            .spawn(move || {
                for fd in rx {
                    let _ = nix::unistd::close(fd);
                }
            });
        if let Err(e) = spawned {
            log(
                "warn",
                "no thread to release the plugin's sockets: they are closed on the event loop",
                json!({"error": e.to_string()}),
            );
        }
        Release(tx)
    }

    fn take(&self, st: &Shared, fd: RawFd) {
        st.metrics.sockets_released.inc();
        if let Err(std::sync::mpsc::SendError(fd)) = self.0.send(fd) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// The lock beside the socket: `<socket>.lock`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// The event socket, owned by exactly one agent on the node: the one holding an exclusive
/// `flock` on the lock file beside it (held for the process's life, released by the kernel when
/// the process dies). Without it, two agents (a surge rollout, a second DaemonSet, a debug run)
/// take turns unlinking and rebinding each other's socket, and each counts part of the events.
/// An agent that finds the lock held waits for it, doing everything else meanwhile.
pub struct Owner {
    path: PathBuf,
    /// `None` only while it moves from waiting to held.
    lock: Option<Lock>,
}

enum Lock {
    /// Never read: holding it is the point (the kernel releases it when the process dies).
    #[allow(dead_code)]
    Held(Flock<File>),
    Waiting(File),
}

fn try_lock(f: File) -> io::Result<Lock> {
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Lock::Held(l)),
        Err((f, nix::errno::Errno::EWOULDBLOCK)) => Ok(Lock::Waiting(f)),
        Err((_, e)) => Err(e.into()),
    }
}

impl Owner {
    /// Opens (creating) the lock file, its directory made 0700 if missing, and tries the lock.
    pub fn new(path: &Path) -> io::Result<Owner> {
        files::private_parent(path)?;
        let f = files::open_lock_file(&lock_path(path))?;
        Ok(Owner {
            path: path.to_path_buf(),
            lock: Some(try_lock(f)?),
        })
    }

    pub fn held(&self) -> bool {
        matches!(self.lock, Some(Lock::Held(_)))
    }

    /// Tries the lock again if waiting.
    fn retry(&mut self) -> io::Result<()> {
        self.lock = match self.lock.take() {
            Some(Lock::Waiting(f)) => Some(try_lock(f)?),
            other => other,
        };
        Ok(())
    }

    /// Serves the socket until the process ends (waiting for the lock first if another agent
    /// holds it); puts the socket back if its file disappears or is replaced.
    pub fn serve(mut self, st: Arc<Shared>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                log(
                    "error",
                    "event socket: no async runtime",
                    json!({"error": e.to_string()}),
                );
                return;
            }
        };
        let mut said = false;
        loop {
            st.health.beat(Worker::Events);
            if let Err(e) = self.retry() {
                log(
                    "error",
                    "event socket: cannot take its lock",
                    json!({"path": self.path, "error": e.to_string()}),
                );
                return;
            }
            if self.held() {
                break;
            }
            if !said {
                log(
                    "warn",
                    "another agent owns the event socket: waiting for it to exit (until then the \
                     plugin's events are counted by that agent)",
                    json!({"path": self.path, "lock": lock_path(&self.path)}),
                );
                said = true;
            }
            st.metrics.event_socket_owned.set(0);
            std::thread::sleep(Duration::from_secs(1));
        }
        if said {
            log(
                "info",
                "event socket taken over",
                json!({"path": self.path}),
            );
        }
        st.metrics.event_socket_owned.set(1);
        let path = self.path.clone();
        rt.block_on(serve_owned(st, path));
        // The lock lives as long as the loop above, i.e. the process.
        drop(self);
    }
}

async fn serve_owned(st: Arc<Shared>, path: PathBuf) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    let release = Release::start();
    loop {
        let listener = match bind(&path).and_then(UnixListener::from_std) {
            Ok(l) => l,
            Err(e) => {
                log(
                    "error",
                    "cannot bind the event socket (retrying)",
                    json!({"path": path, "error": e.to_string()}),
                );
                st.health.beat(Worker::Events);
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let ino = std::fs::symlink_metadata(&path).map(|m| m.ino()).ok();
        let mut check = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                conn = listener.accept() => match conn {
                    Ok((s, _)) => {
                        let Ok(permit) = slots.clone().acquire_owned().await else { break };
                        let (st, release) = (st.clone(), release.clone());
                        tokio::spawn(async move {
                            one(st, s, release).await;
                            drop(permit);
                        });
                    }
                    // Out of fds: back off rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
                _ = check.tick() => {
                    st.health.beat(Worker::Events);
                    let now = std::fs::symlink_metadata(&path)
                        .ok()
                        .filter(|m| m.file_type().is_socket())
                        .map(|m| m.ino());
                    if now.is_none() || now != ino {
                        // We own the socket (the lock says so): whoever replaced it is not an
                        // agent, and the plugin must reach us.
                        log("warn", "event socket was removed or replaced: binding it again", json!({"path": path}));
                        break;
                    }
                }
            }
        }
    }
}
