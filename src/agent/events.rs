//! The agent's end of the plugin's events: a unix stream socket in a host directory only root
//! can reach, one event per connection, counted into the metrics. Anything else that arrives —
//! garbage, an oversized or endless stream, a flood of connections — is counted as rejected and
//! never blocks or stops the agent; a socket file removed or replaced is put back.

use super::Shared;
use super::log;
use super::metrics::{Command, Invocation, Kind};
use crate::events::MAX_EVENT;
use serde_json::{Value, json};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

/// How long a connection may take to deliver its event.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections handled at once; more wait in the backlog.
const MAX_CONCURRENT: usize = 256;

/// Binds the socket at `path`: its directory made (0700) if missing, a stale socket or a file
/// in its place removed, the socket itself 0600.
pub fn bind(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
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

/// Reads one connection's event: up to `MAX_EVENT` bytes until EOF, within `READ_TIMEOUT`.
async fn one(st: Arc<Shared>, mut s: tokio::net::UnixStream) {
    let mut buf = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(true);
            }
            if buf.len() + n > MAX_EVENT {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(true)) => count(&st, &buf),
        Ok(Ok(false)) => reject(&st, "oversized"),
        Ok(Err(_)) | Err(_) => reject(&st, "incomplete"),
    }
}

/// Serves the socket until the process ends; puts it back if its file disappears or is
/// replaced.
pub fn serve(st: Arc<Shared>, path: PathBuf, first: std::os::unix::net::UnixListener) {
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
    rt.block_on(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
        let mut std_listener = Some(first);
        loop {
            let listener = match std_listener.take().map(UnixListener::from_std) {
                Some(Ok(l)) => l,
                _ => match bind(&path).and_then(UnixListener::from_std) {
                    Ok(l) => {
                        log("info", "event socket bound again", json!({"path": path}));
                        l
                    }
                    Err(e) => {
                        log(
                            "error",
                            "cannot bind the event socket (retrying)",
                            json!({"path": path, "error": e.to_string()}),
                        );
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        continue;
                    }
                },
            };
            let ino = std::fs::symlink_metadata(&path).map(|m| m.ino()).ok();
            let mut check = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    conn = listener.accept() => match conn {
                        Ok((s, _)) => {
                            let Ok(permit) = slots.clone().acquire_owned().await else { break };
                            let st = st.clone();
                            tokio::spawn(async move {
                                one(st, s).await;
                                drop(permit);
                            });
                        }
                        // Out of fds: back off rather than spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    },
                    _ = check.tick() => {
                        let now = std::fs::symlink_metadata(&path)
                            .ok()
                            .filter(|m| m.file_type().is_socket())
                            .map(|m| m.ino());
                        if now.is_none() || now != ino {
                            log("warn", "event socket was removed or replaced: binding it again", json!({"path": path}));
                            break;
                        }
                    }
                }
            }
        }
    });
}
