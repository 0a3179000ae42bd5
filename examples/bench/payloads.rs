//! What is applied: the pod's policy, as our ruleset, as nft text, as Istio's iptables
//! payloads; the plugin's stdin; each alternative's steps.

use crate::STATUS_VALUE;
use crate::netns::Ns;
use crate::spawn::Step;
use mesh_redirect::config::{Annotations, PluginConfig};
use mesh_redirect::kernel::Kernel;
use mesh_redirect::netns::Netns;
use mesh_redirect::policy::{self, Decision, Pod};
use mesh_redirect::{nft_text, ruleset};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One pod policy, in every form the alternatives need.
pub(crate) struct Policy {
    pub(crate) name: String,
    pub(crate) annotations: Annotations,
    pub(crate) rs: ruleset::Ruleset,
    pub(crate) nft: Arc<Vec<u8>>,
    pub(crate) v4: Arc<Vec<u8>>,
    pub(crate) v6: Arc<Vec<u8>>,
    pub(crate) rules_v4: usize,
    pub(crate) rules_v6: usize,
}

/// `n` distinct, non-adjacent IPv4 /24s (adjacent ones could merge into fewer intervals).
pub(crate) fn cidrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.0/24", i / 128, (i % 128) * 2))
        .collect()
}

impl Policy {
    pub(crate) fn new(name: &str, excluded_cidrs: &[String], excluded_out_ports: &[u16]) -> Policy {
        let mut ann = Annotations::new();
        ann.insert("sidecar.istio.io/status".into(), STATUS_VALUE.into());
        if !excluded_cidrs.is_empty() {
            ann.insert(
                "traffic.sidecar.istio.io/excludeOutboundIPRanges".into(),
                excluded_cidrs.join(","),
            );
        }
        if !excluded_out_ports.is_empty() {
            let p: Vec<String> = excluded_out_ports.iter().map(|p| p.to_string()).collect();
            ann.insert(
                "traffic.sidecar.istio.io/excludeOutboundPorts".into(),
                p.join(","),
            );
        }
        let pod = Pod {
            namespace: Some("default"),
            name: Some("web-0"),
            annotations: Some(&ann),
            ipv6: false,
        };
        let rs = match policy::decide(&PluginConfig::default(), &pod) {
            Ok(Decision::Capture(p)) => ruleset::build(&p),
            other => panic!("policy {name}: expected a capture, got {other:?}"),
        };
        let nft = nft_text::render(&rs).into_bytes();
        // Istio's outbound-port default (15020) is replaced by the annotation, as here.
        let ports: Vec<u16> = if excluded_out_ports.is_empty() {
            vec![15020]
        } else {
            excluded_out_ports.to_vec()
        };
        let (v4, rules_v4) = istio_restore(false, excluded_cidrs, &ports);
        let (v6, rules_v6) = istio_restore(true, excluded_cidrs, &ports);
        Policy {
            name: name.into(),
            annotations: ann,
            rs,
            nft: Arc::new(nft),
            v4: Arc::new(v4.into_bytes()),
            v6: Arc::new(v6.into_bytes()),
            rules_v4,
            rules_v6,
        }
    }
}

/// Istio's `iptables-restore --noflush` payload for a sidecar pod with istio-cni's defaults
/// (REDIRECT, include `*` inbound and outbound, inbound excludes 15020,15021,15090), the newest
/// generation of istio-iptables' output, plus one RETURN rule per excluded CIDR and a tcp and a
/// udp RETURN per excluded outbound port, where Istio puts them.
pub(crate) fn istio_restore(v6: bool, cidrs: &[String], out_ports: &[u16]) -> (String, usize) {
    let (src6, lo) = if v6 {
        ("::6/128", "::1/128")
    } else {
        ("127.0.0.6/32", "127.0.0.1/32")
    };
    let mut rules: Vec<String> = vec![
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN".into(),
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001".into(),
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006".into(),
        "-A PREROUTING -p tcp -j ISTIO_INBOUND".into(),
    ];
    for p in [15020, 15021, 15090] {
        rules.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"));
    }
    rules.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
    rules.push("-A OUTPUT -j ISTIO_OUTPUT".into());
    for p in out_ports {
        rules.push(format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN"));
        rules.push(format!("-A ISTIO_OUTPUT -p udp --dport {p} -j RETURN"));
    }
    rules.push(format!("-A ISTIO_OUTPUT -o lo -s {src6} -j RETURN"));
    for (kind, id) in [("uid", 1337), ("gid", 1337)] {
        rules.push(format!(
            "-A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp ! --dport 15008 -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT"
        ));
        rules.push(format!(
            "-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"
        ));
        rules.push(format!(
            "-A ISTIO_OUTPUT -m owner --{kind}-owner {id} -j RETURN"
        ));
    }
    rules.push(format!("-A ISTIO_OUTPUT -d {lo} -j RETURN"));
    for c in cidrs.iter().filter(|c| c.contains(':') == v6) {
        rules.push(format!("-A ISTIO_OUTPUT -d {c} -j RETURN"));
    }
    rules.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into());
    let mut s = String::from(
        "* nat\n-N ISTIO_INBOUND\n-N ISTIO_REDIRECT\n-N ISTIO_IN_REDIRECT\n-N ISTIO_OUTPUT\n",
    );
    for r in &rules {
        s.push_str(r);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    (s, rules.len())
}

/// The network config a runtime gives mesh-redirect: the chain's last entry, with the
/// bridge plugin's result as prevResult and the pod's annotations.
pub(crate) fn plugin_conf(netns: &str, ann: &Annotations) -> Vec<u8> {
    plugin_conf_log(netns, ann, None)
}

/// The same, with the plugin's log (one JSON line per invocation, with its own duration)
/// going to `log` instead of stderr.
pub(crate) fn plugin_conf_log(netns: &str, ann: &Annotations, log: Option<&Path>) -> Vec<u8> {
    let mut v = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "mesh-redirect",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": ann},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "6a:5f:2c:1e:9b:01"},
                {"name": "veth1c2d3e4f", "mac": "6a:5f:2c:1e:9b:02"},
                {"name": "eth0", "mac": "6a:5f:2c:1e:9b:03", "sandbox": netns}
            ],
            "ips": [
                {"address": "10.244.0.7/24", "gateway": "10.244.0.1", "interface": 2},
                {"address": "fd00:10:244::7/64", "gateway": "fd00:10:244::1", "interface": 2}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            "dns": {}
        }
    });
    if let Some(l) = log {
        v["logFile"] = json!(l.display().to_string());
    }
    v.to_string().into_bytes()
}

/// The plugin's stdin for a pod with annotations `ann` and extra conflist-entry keys `extra`.
pub(crate) fn variant_conf(netns: &str, ann: &Value, extra: &Value) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&plugin_conf(netns, &Annotations::new())).unwrap_or_default();
    v["runtimeConfig"]["io.kubernetes.cri.pod-annotations"] = ann.clone();
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    v.to_string().into_bytes()
}

pub(crate) static POD_COUNTER: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn plugin_step(plugin: &Path, verb: &str, ns: &Ns, conf: &Arc<Vec<u8>>) -> Step {
    let n = POD_COUNTER.fetch_add(1, Ordering::SeqCst);
    let cid = format!("{:064x}", 0xbe7c_0000_u64 + n as u64);
    let plugin_dir = plugin
        .parent()
        .unwrap_or(Path::new("/"))
        .display()
        .to_string();
    let mut s = Step::new(&[&plugin.display().to_string()]).stdin(conf);
    s.in_netns = false;
    s.env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", &cid)
        .env("CNI_NETNS", &ns.path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &format!("/opt/cni/bin:{plugin_dir}"))
        .env(
            "CNI_ARGS",
            &format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-{n};K8S_POD_INFRA_CONTAINER_ID={cid}"
            ),
        )
}

/// The alternatives, each applying the same policy to a fresh netns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alt {
    Plugin,
    NftFile,
    LegacyRestore,
    NftRestore,
    IstioNft,
    IstioLegacy,
    ExecFloor,
}

impl Alt {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Alt::Plugin => "mesh-redirect",
            Alt::NftFile => "nft-f",
            Alt::LegacyRestore => "iptables-legacy-restore",
            Alt::NftRestore => "iptables-nft-restore",
            Alt::IstioNft => "istio-cni-nft",
            Alt::IstioLegacy => "istio-cni-legacy",
            Alt::ExecFloor => "exec-floor",
        }
    }
    pub(crate) fn label(self) -> &'static str {
        match self {
            Alt::Plugin => "**mesh-redirect ADD** (exec, netlink batch)",
            Alt::NftFile => "`nft -f` of the same ruleset (`mesh-redirect plan`)",
            Alt::LegacyRestore => {
                "`iptables-legacy-restore` + `ip6tables-legacy-restore` (Istio payload)"
            }
            Alt::NftRestore => "`iptables-nft-restore` + `ip6tables-nft-restore` (Istio payload)",
            Alt::IstioNft => "istio-cni per-ADD sequence, nft backend (auto-detected)",
            Alt::IstioLegacy => "istio-cni per-ADD sequence, legacy backend (forced)",
            Alt::ExecFloor => "floor: `/bin/true` in the netns (spawn, exec, exit, wait)",
        }
    }
}

pub(crate) fn istio_detect(family6: bool, variant: &str) -> Vec<Step> {
    let bin = format!(
        "{}-{variant}",
        if family6 { "ip6tables" } else { "iptables" }
    );
    let save = format!(
        "{}-{variant}-save",
        if family6 { "ip6tables" } else { "iptables" }
    );
    vec![
        Step::new(&[&save]),
        Step::new(&[&save, "--version"]),
        Step::new(&[
            &bin, "-t", "filter", "-A", "INPUT", "-p", "255", "-j", "DROP",
        ]),
        Step::new(&[
            &bin, "-t", "filter", "-D", "INPUT", "-p", "255", "-j", "DROP",
        ])
        .may_fail(),
    ]
}

pub(crate) fn steps_for(
    alt: Alt,
    plugin: &Path,
    ns: &Ns,
    p: &Policy,
    conf: &Arc<Vec<u8>>,
) -> Vec<Step> {
    let restore = |fam6: bool, variant: &str| -> Step {
        let bin = format!(
            "{}-{variant}-restore",
            if fam6 { "ip6tables" } else { "iptables" }
        );
        let data = if fam6 { &p.v6 } else { &p.v4 };
        if variant == "legacy" {
            // istio-cni: legacy ≥ 1.6.2 write commands get --wait=30, and ≥ 1.8.6 a pod-scoped
            // lock file (the netns path).
            Step::new(&[&bin, "--noflush", "--wait=30"])
                .stdin(data)
                .env("XTABLES_LOCKFILE", &ns.path)
        } else {
            Step::new(&[&bin, "--noflush"]).stdin(data)
        }
    };
    let save = |fam6: bool, variant: &str| -> Step {
        Step::new(&[&format!(
            "{}-{variant}-save",
            if fam6 { "ip6tables" } else { "iptables" }
        )])
    };
    match alt {
        Alt::Plugin => vec![plugin_step(plugin, "ADD", ns, conf)],
        Alt::NftFile => vec![Step::new(&["nft", "-f", "-"]).stdin(&p.nft)],
        Alt::LegacyRestore => vec![restore(false, "legacy"), restore(true, "legacy")],
        Alt::NftRestore => vec![restore(false, "nft"), restore(true, "nft")],
        Alt::IstioNft | Alt::IstioLegacy => {
            let v = if alt == Alt::IstioNft {
                "nft"
            } else {
                "legacy"
            };
            let mut s = Vec::new();
            // A. DetectIptablesVersion(v4): legacy is tried first; on a fresh netns it has no
            // rules, so (auto mode) nft is tried next and chosen. Forced legacy probes legacy only.
            s.extend(istio_detect(false, "legacy"));
            if v == "nft" {
                s.extend(istio_detect(false, "nft"));
            }
            // B. The same for IPv6.
            s.extend(istio_detect(true, "legacy"));
            if v == "nft" {
                s.extend(istio_detect(true, "nft"));
            }
            // D. VerifyIptablesState; F. apply; G. the deferred final dump (dual-stack pod).
            s.push(save(false, v));
            s.push(save(true, v));
            s.push(restore(false, v));
            s.push(restore(true, v));
            s.push(save(false, v));
            s.push(save(true, v));
            s
        }
        Alt::ExecFloor => vec![Step::new(&["/bin/true"])],
    }
}

/// Whether the pod netns has our table (a read-only query: no commit, so no wait on close).
pub(crate) fn table_exists(ns: &Ns) -> bool {
    Netns::open(Path::new(&ns.path))
        .ok()
        .and_then(|n| n.run(Kernel::open).ok())
        .and_then(|k| k.ok())
        .and_then(|mut k| k.table_exists().ok())
        .unwrap_or(false)
}
