//! The plugin's per-invocation event for the node agent's metrics: one small JSON document on
//! a fresh connection to the agent's unix socket (`eventSocket` in the conflist entry; the
//! agent writes it there when it chains). Never blocks and never fails an invocation: a
//! non-blocking connect (a full backlog or no agent is `EAGAIN`/`ENOENT`/`ECONNREFUSED`, and
//! the event is dropped), one write into the new connection's empty buffer, close.
//!
//! After a DEL (or a re-ADD) the write also carries the netfilter socket whose release would
//! make the plugin wait for the kernel to free the deleted table (`kernel::Linger`): the
//! agent closes it, so the runtime does not wait. With no agent, the plugin waits as before.
//!
//! A stream socket rather than datagrams: a connection waits in the listen backlog (up to
//! `somaxconn`, 4096 by default) with its bytes queued, so a burst of concurrent ADDs is not cut
//! at `net.unix.max_dgram_qlen` (10 on many nodes) as datagrams would be.

use crate::log::Record;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, connect, sendmsg, socket,
};
use serde_json::{Value, json};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

/// Where the agent listens unless configured otherwise (a host directory only root can use).
pub const DEFAULT_SOCKET: &str = "/run/mesh-redirect/events.sock";

/// The most an event may take; the agent rejects anything longer.
pub const MAX_EVENT: usize = 4096;

/// The event for one invocation: what the agent counts (command, outcome, code, duration) and
/// what helps an operator (rules, set elements, pod), bounded.
pub fn event(rec: &Record, elapsed: Duration) -> Value {
    let outcome = match (&rec.error_code, rec.command.as_str()) {
        (Some(_), _) => "error",
        (None, "ADD") if rec.decision == "captured" => "captured",
        (None, "ADD") => "skipped",
        (None, _) => "ok",
    };
    let cut = |s: &str| crate::protocol::truncate(s, 253).to_string();
    json!({
        "v": 1,
        "command": cut(&rec.command),
        "outcome": outcome,
        "code": rec.error_code,
        "seconds": elapsed.as_secs_f64(),
        "rules": rec.rules,
        "setElements": rec.set_elements,
        "pod": format!("{}/{}", cut(&rec.pod_namespace), cut(&rec.pod_name)),
    })
}

/// Sends `ev` to the agent at `path`, if it listens, with `fd` attached (`SCM_RIGHTS`): a
/// netlink socket for the agent to close (see `kernel::Linger`). Ignores every failure; `fd`
/// is closed here either way, last of all if it could not be sent.
pub fn send_event(path: &str, ev: &Value, fd: Option<OwnedFd>) {
    let _ = try_send(path, ev, fd);
}

fn try_send(path: &str, ev: &Value, fd: Option<OwnedFd>) -> nix::Result<()> {
    let bytes = serde_json::to_vec(ev).unwrap_or_default();
    if bytes.is_empty() || bytes.len() > MAX_EVENT {
        return Ok(());
    }
    let passing = fd;
    let addr = UnixAddr::new(path)?;
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(sock.as_raw_fd(), &addr)?;
    // A new connection's send buffer is empty: a few hundred bytes go in whole, at once. An
    // attached descriptor travels with them; from here on the agent's end holds the socket.
    let attached = passing.as_ref().map(|p| [p.as_raw_fd()]);
    let cmsg: Vec<ControlMessage> = attached
        .as_ref()
        .map(|a| ControlMessage::ScmRights(a))
        .into_iter()
        .collect();
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    // Ours closes first, then the connection: the agent releases what it got only at the
    // connection's end, so its descriptor is the last one and the wait is the agent's.
    drop(passing);
    drop(sock);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        let mut r = Record {
            command: "ADD".into(),
            decision: "captured".into(),
            ..Record::default()
        };
        assert_eq!(event(&r, Duration::from_millis(2))["outcome"], "captured");
        r.decision = "skipped: no sidecar".into();
        assert_eq!(event(&r, Duration::ZERO)["outcome"], "skipped");
        r.error_code = Some(100);
        let e = event(&r, Duration::ZERO);
        assert_eq!(
            (e["outcome"].as_str(), e["code"].as_u64()),
            (Some("error"), Some(100))
        );
        r.command = "DEL".into();
        r.error_code = None;
        assert_eq!(event(&r, Duration::ZERO)["outcome"], "ok");
        // No agent: nothing happens, nothing fails.
        send_event("/nonexistent/events.sock", &event(&r, Duration::ZERO), None);
    }
}
