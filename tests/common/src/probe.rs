//! Traffic through `capture-probe`: servers that say who they are and the original
//! destination they saw, clients as a given uid/gid, and the assertions on their answers.

use crate::paths::probe;
use crate::sys::Proc;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

pub const PROXY_UID: u32 = 1337;
pub const APP_UID: u32 = 1000;

/// Who runs a probe command.
#[derive(Clone, Copy, Debug)]
pub struct Ident {
    pub uid: u32,
    pub gid: u32,
}

pub const APP: Ident = Ident {
    uid: APP_UID,
    gid: APP_UID,
};
pub const PROXY: Ident = Ident {
    uid: PROXY_UID,
    gid: PROXY_UID,
};
pub const ROOT: Ident = Ident { uid: 0, gid: 0 };

fn probe_cmd(netns: &str, who: Ident) -> Command {
    let mut c = Command::new(probe());
    c.args([
        "--netns",
        netns,
        "--gid",
        &who.gid.to_string(),
        "--uid",
        &who.uid.to_string(),
    ]);
    c
}

/// Starts `capture-probe serve` and waits until it listens.
pub fn serve(netns: &str, who: Ident, name: &str, ports: &[u16], extra: &[&str]) -> Proc {
    let mut c = probe_cmd(netns, who);
    c.args(["serve", "--name", name]);
    for p in ports {
        c.args(["--port", &p.to_string()]);
    }
    c.args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = c.spawn().expect("spawn capture-probe");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("probe stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read probe readiness");
    let proc = Proc(child);
    assert_eq!(line.trim(), "ready", "capture-probe {name} did not start");
    proc
}

/// `capture-probe connect`: the answering server's line, or the failure.
pub fn connect(netns: &str, who: Ident, addr: &str) -> Result<String, String> {
    connect_cmd(probe_cmd(netns, who).args(["--timeout-ms", "1500", "connect", addr]))
}

/// `capture-probe connect --bind`: a connection from a local source address (as Envoy's
/// inbound passthrough connects to the app from 127.0.0.6 / ::6, or a node address).
pub fn connect_from(netns: &str, who: Ident, addr: &str, bind: &str) -> Result<String, String> {
    connect_cmd(probe_cmd(netns, who).args([
        "--timeout-ms",
        "1500",
        "connect",
        addr,
        "--bind",
        bind,
    ]))
}

fn connect_cmd(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().expect("run capture-probe");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// `capture-probe udp`.
pub fn udp(netns: &str, who: Ident, addr: &str) -> Result<String, String> {
    let out = probe_cmd(netns, who)
        .args(["--timeout-ms", "1500", "udp", addr])
        .output()
        .expect("run capture-probe");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Who answered a connection, and the original destination it saw.
pub fn answer(line: &str) -> (String, String) {
    let name = line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let orig = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("orig="))
        .unwrap_or_default()
        .to_string();
    (name, orig)
}

/// `host:port` for an address that may be IPv6.
pub fn hp(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Asserts `line` came from `who` and saw `orig` as the original destination.
#[track_caller]
pub fn assert_answer(res: Result<String, String>, who: &str, orig: Option<&str>) {
    let line = res.unwrap_or_else(|e| panic!("expected {who} to answer, got error: {e}"));
    let (name, o) = answer(&line);
    assert_eq!(name, who, "answered by the wrong party: {line}");
    if let Some(orig) = orig {
        assert_eq!(o, orig, "wrong original destination: {line}");
    }
}
