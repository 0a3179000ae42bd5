//! Differential testing against a mesh's own rules: a twin pod, attached by the same reference
//! plugins but without mesh-redirect, gets the mesh's reference iptables rules (written out in
//! each test from that mesh's rule generator, loaded with iptables-restore, as the mesh's own
//! init container or CNI plugin would), and every connection of a probe list must end the same
//! way in both pods: answered by the same party, on the same port, with the same original
//! destination.

use crate::pod::{Pod, SUBNET4, conflist};
use crate::probe::{APP, Ident, ROOT, connect, serve, udp};
use crate::sys::{Proc, TempDir, write_file};
use serde_json::json;

/// A mesh's stand-in proxy: its uid/gid and the ports it listens on.
#[derive(Clone, Copy, Debug)]
pub struct ProxySpec {
    pub who: Ident,
    pub outbound: u16,
    pub inbound: u16,
    /// UDP DNS port, when DNS is captured.
    pub dns: Option<u16>,
}

/// TCP ports the node and the app serve in both worlds.
pub const NODE_TCP: [u16; 13] = [
    8080, 443, 6443, 3306, 53, 4190, 4191, 5005, 9001, 9902, 15020, 15021, 20001,
];
pub const APP_TCP: [u16; 9] = [8080, 4190, 4191, 5005, 9001, 9902, 15020, 15021, 3306];

/// Servers for one world: the proxy, the app, the node (TCP, and UDP 53).
pub fn servers(pod: &Pod, p: ProxySpec) -> Vec<Proc> {
    let mut proxy_ports = vec![p.outbound, p.inbound];
    proxy_ports.dedup();
    let mut extra: Vec<String> = Vec::new();
    if let Some(d) = p.dns {
        extra.extend(["--udp".to_string(), d.to_string()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    vec![
        serve(&pod.pod.path(), p.who, "proxy", &proxy_ports, &extra),
        serve(&pod.pod.path(), APP, "app", &APP_TCP, &[]),
        serve(&pod.node.path(), ROOT, "node", &NODE_TCP, &["--udp", "53"]),
    ]
}

/// One connection to try.
#[derive(Clone, Debug)]
pub enum Probe {
    /// TCP from inside the pod.
    Out(Ident, String),
    /// UDP from inside the pod (one datagram, one answer).
    Udp(Ident, String),
    /// TCP from the node to the pod.
    In(String),
}

/// How a probe ended: who answered on which port (and, for the proxy, the original
/// destination), or that nothing did.
pub fn outcome(pod: &Pod, probe: &Probe) -> String {
    let res = match probe {
        Probe::Out(who, dst) => connect(&pod.pod.path(), *who, dst),
        Probe::In(dst) => connect(&pod.node.path(), ROOT, dst),
        Probe::Udp(who, dst) => {
            return match udp(&pod.pod.path(), *who, dst) {
                Ok(line) => line
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                Err(_) => "no answer".into(),
            };
        }
    };
    crate::vm::describe(res)
}

/// A pod attached by the reference plugins alone (no mesh-redirect), on the same subnets.
pub fn unmeshed_pod(v6: bool) -> Pod {
    let tmp = TempDir::new();
    let mut list = conflist(tmp.path(), "1.0.0", json!({}));
    if let Some(p) = list["plugins"].as_array_mut() {
        p.truncate(1);
    }
    if !v6 {
        list["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": SUBNET4}]]);
        list["plugins"][0]["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}]);
    }
    Pod::from_list(list, tmp, None, "default").unwrap_or_else(|e| panic!("twin ADD: {e}"))
}

/// Loads reference rules into the pod as the mesh's tooling does (`iptables-restore` of the
/// given text for IPv4, and for IPv6 when `v6` is given), plus `::6` on `lo` if asked.
pub fn load_reference(pod: &Pod, v4: &str, v6: Option<&str>, passthrough6: bool) {
    let dir = TempDir::new();
    let f4 = write_file(dir.path(), "rules.v4", v4);
    pod.pod.exec(&["iptables-restore", &f4.to_string_lossy()]);
    if let Some(v6) = v6 {
        let f6 = write_file(dir.path(), "rules.v6", v6);
        pod.pod.exec(&["ip6tables-restore", &f6.to_string_lossy()]);
    }
    if passthrough6 {
        pod.pod
            .exec(&["ip", "-6", "addr", "add", "::6/128", "dev", "lo"]);
    }
}

/// Runs every probe in both worlds; panics listing every probe that ended differently.
/// Returns the outcomes (ours), for the caller's written-down expectations.
pub fn compare(
    ours: &Pod,
    theirs: &Pod,
    proxy: ProxySpec,
    probes: &[Probe],
) -> Vec<(Probe, String)> {
    let _a = servers(ours, proxy);
    let _b = servers(theirs, proxy);
    let mut diffs = Vec::new();
    let mut out = Vec::new();
    for p in probes {
        let (a, b) = (outcome(ours, p), outcome(theirs, p));
        if a != b {
            diffs.push(format!("{p:?}: mesh-redirect {a:?}, reference {b:?}"));
        }
        out.push((p.clone(), a));
    }
    assert!(
        diffs.is_empty(),
        "{} of {} connections end differently:\n  {}\nour ruleset:\n{}",
        diffs.len(),
        probes.len(),
        diffs.join("\n  "),
        ours.pod.ruleset()
    );
    out
}

/// The outcome recorded for a probe in `compare`'s result.
pub fn of<'a>(outcomes: &'a [(Probe, String)], probe: &Probe) -> &'a str {
    outcomes
        .iter()
        .find(|(p, _)| format!("{p:?}") == format!("{probe:?}"))
        .map(|(_, o)| o.as_str())
        .unwrap_or("not probed")
}
