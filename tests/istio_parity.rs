//! Where a pod must behave as the same pod does under istio-cni (issue 10), proven with
//! traffic: the IPv6 passthrough source in REDIRECT mode, an included loopback range
//! (`HasLoopBackIP`), annotation values istio-cni reads differently, interface wildcards, and
//! Istio's own `istio-validation` check.

use common::*;
use serde_json::{Value, json};
use std::process::Command;

const INCLUDE_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
const EXCLUDE_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
const INCLUDE_IN_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
const EXCLUDE_IFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";

/// The port the answering server saw the connection on.
fn port_of(line: &str) -> u16 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// `::6/128` on the pod's `lo`, as `ip` shows it.
fn passthrough6(pod: &Netns) -> Option<String> {
    let out = pod.exec(&["ip", "-6", "-d", "addr", "show", "dev", "lo"]);
    out.lines()
        .find(|l| l.trim_start().starts_with("inet6 ::6/128"))
        .map(|l| l.trim().to_string())
}

#[test]
fn an_ipv6_pod_in_redirect_mode_gets_the_passthrough_source_and_inbound_works() {
    let pod = Pod::meshed(&[]);
    assert!(!pod.ip6.is_empty(), "the test pod is dual-stack");
    let _app = pod.app_server(&[8080]);
    let _proxy = pod.proxy();
    // Envoy's inbound passthrough: from ::6 (and 127.0.0.6) to the app, never re-captured.
    let v6 = connect_from(&pod.pod.path(), PROXY, &hp(&pod.ip6, 8080), "::6");
    assert_answer(v6, "app", None);
    let v4 = connect_from(&pod.pod.path(), PROXY, &hp(&pod.ip4, 8080), "127.0.0.6");
    assert_answer(v4, "app", None);
    assert!(passthrough6(&pod.pod).is_some(), "::6 on lo");
    // CHECK verifies it; removed by hand, CHECK names it.
    pod.check().expect("CHECK");
    pod.pod
        .exec(&["ip", "-6", "addr", "del", "::6/128", "dev", "lo"]);
    let e = pod.check().expect_err("CHECK without ::6");
    let json = e.json.expect("error JSON");
    assert_eq!(json["code"], 103);
    assert!(json["msg"].as_str().unwrap().contains("::6/128"), "{json}");
    // ADD puts it back; DEL removes it, since we added it.
    pod.plugin("ADD", &pod.mesh_conf()).expect("re-ADD");
    assert!(passthrough6(&pod.pod).is_some());
    pod.del().expect("DEL");
    assert_eq!(passthrough6(&pod.pod), None, "DEL removes the ::6 it added");
}

#[test]
fn a_passthrough_address_that_was_there_before_stays_after_del() {
    let pod = Pod::meshed(&[]);
    pod.del().expect("DEL");
    pod.pod
        .exec(&["ip", "-6", "addr", "add", "::6/128", "dev", "lo"]);
    pod.plugin("ADD", &pod.mesh_conf()).expect("ADD");
    pod.plugin("CHECK", &pod.mesh_conf()).expect("CHECK");
    pod.plugin("DEL", &pod.mesh_conf()).expect("DEL");
    assert!(!pod.pod.has_table());
    assert!(
        passthrough6(&pod.pod).is_some(),
        "not ours: DEL leaves it (istio-cni does not remove it either)"
    );
}

#[test]
fn an_ipv4_only_pod_gets_no_passthrough6() {
    let tmp = TempDir::new();
    let mut list = conflist(tmp.path(), "1.0.0", json!({}));
    list["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": SUBNET4}]]);
    list["plugins"][0]["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}]);
    let pod = Pod::from_list(list, tmp, Some(json!({STATUS: "{}"})), "default")
        .unwrap_or_else(|e| panic!("ADD: {e}"));
    assert!(pod.ip6.is_empty());
    assert!(pod.pod.has_table());
    assert_eq!(passthrough6(&pod.pod), None);
    pod.check().expect("CHECK");
}

#[test]
fn an_included_loopback_range_captures_what_istio_captures() {
    let pod = Pod::meshed(&[(INCLUDE_RANGES, "127.0.0.0/8,10.88.0.0/24")]);
    let _proxy = pod.proxy();
    let _app = pod.app_server(&[8080]);
    // Istio drops "out lo, not the proxy → return": the app's connection to an included
    // loopback address reaches the proxy...
    let r = pod.dial_from_pod(APP, "127.0.0.2:8080");
    assert_answer(r.clone(), "proxy", Some("127.0.0.2:8080"));
    assert_eq!(port_of(&r.unwrap()), 15001);
    // ...localhost itself still returns (its rule comes first, in Istio too)...
    assert_answer(pod.dial_from_pod(APP, "127.0.0.1:8080"), "app", None);
    // ...and a process with only the proxy's gid calling the pod's own address is inbound.
    let by_gid = Ident {
        uid: 2000,
        gid: PROXY_UID,
    };
    let own = hp(&pod.ip4, 8080);
    let r = pod.dial_from_pod(by_gid, &own);
    assert_answer(r.clone(), "proxy", Some(&own));
    assert_eq!(port_of(&r.unwrap()), 15006);

    // Without a loopback address in the list, both go straight to the app.
    let pod = Pod::meshed(&[(INCLUDE_RANGES, "10.88.0.0/24")]);
    let _proxy = pod.proxy();
    let _app = pod.app_server(&[8080]);
    assert_answer(pod.dial_from_pod(APP, "127.0.0.2:8080"), "app", None);
    assert_answer(pod.dial_from_pod(by_gid, &hp(&pod.ip4, 8080)), "app", None);
    // An IPv6 loopback in the list drops the rule for IPv4 too (Istio's condition covers both).
    let pod = Pod::meshed(&[(INCLUDE_RANGES, "::1/128,10.88.0.0/24")]);
    let _proxy = pod.proxy();
    let _app = pod.app_server(&[8080]);
    let own = hp(&pod.ip4, 8080);
    assert_answer(pod.dial_from_pod(by_gid, &own), "proxy", Some(&own));
}

#[test]
fn inject_is_read_with_gos_parse_bool_so_odd_spellings_are_captured() {
    for v in ["fALSE", " false ", "no", "off"] {
        let pod = Pod::with(
            Some(json!({STATUS: "{}", "sidecar.istio.io/inject": v})),
            json!({}),
        )
        .unwrap_or_else(|e| panic!("{v}: {e}"));
        assert!(
            pod.pod.has_table(),
            "inject={v:?}: istio-cni captures this pod"
        );
    }
    for v in ["false", "False", "FALSE", "f", "F", "0"] {
        let pod = Pod::with(
            Some(json!({STATUS: "{}", "sidecar.istio.io/inject": v})),
            json!({}),
        )
        .unwrap();
        assert!(!pod.pod.has_table(), "inject={v:?} opts out");
    }
}

#[test]
fn a_star_counts_only_as_the_whole_value_of_an_include_list() {
    for (name, value) in [
        (INCLUDE_RANGES, "10.0.0.0/8,*"),
        (EXCLUDE_RANGES, "*"),
        (EXCLUDE_RANGES, "10.0.0.0/8, *"),
        (INCLUDE_IN_PORTS, "80,*"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "*"),
    ] {
        let e = match Pod::with(Some(json!({STATUS: "{}", name: value})), json!({})) {
            Ok(_) => panic!("{name}={value:?} was accepted"),
            Err(e) => e,
        };
        let json: Value = e.json.map(|b| *b).expect("error JSON");
        assert_eq!(json["code"], 100, "{name}={value:?}: {json}");
        let msg = json["msg"].as_str().unwrap();
        assert!(msg.contains(name) && msg.contains(value), "{msg}");
    }
    // As the whole value it means everything.
    let pod = Pod::meshed(&[(INCLUDE_RANGES, " * "), (INCLUDE_IN_PORTS, "*")]);
    let _proxy = pod.proxy();
    assert_answer(
        pod.dial_from_pod(APP, "203.0.113.9:443"),
        "proxy",
        Some("203.0.113.9:443"),
    );
}

/// A second interface in the pod, `veth1`, to a server in the node namespace on 10.77.0.1.
fn add_veth1(pod: &Pod) {
    let peer = unique("mrv");
    pod.pod.exec(&[
        "ip",
        "link",
        "add",
        "veth1",
        "type",
        "veth",
        "peer",
        "name",
        &peer,
        "netns",
        &pod.node.name,
    ]);
    pod.pod
        .exec(&["ip", "addr", "add", "10.77.0.2/24", "dev", "veth1"]);
    pod.pod.exec(&["ip", "link", "set", "veth1", "up"]);
    pod.node
        .exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", &peer]);
    pod.node.exec(&["ip", "link", "set", &peer, "up"]);
}

#[test]
fn an_interface_wildcard_excludes_every_interface_it_names() {
    for (value, excluded) in [
        ("veth+", true),
        ("veth1", true),
        ("vet+", true),
        ("eth9+", false),
    ] {
        let pod = Pod::meshed(&[(EXCLUDE_IFACES, value)]);
        add_veth1(&pod);
        let _proxy = pod.proxy();
        let _app = pod.app_server(&[8080]);
        let _node = pod.node_server(&[8080]);
        let out = pod.dial_from_pod(APP, "10.77.0.1:8080");
        let inbound = pod.dial_from_node("10.77.0.2:8080");
        if excluded {
            assert_answer(out, "node", None);
            assert_answer(inbound, "app", None);
        } else {
            assert_answer(out, "proxy", Some("10.77.0.1:8080"));
            assert_answer(inbound, "proxy", Some("10.77.0.2:8080"));
        }
        // eth0 is not matched by any of them.
        assert_answer(
            pod.dial_from_pod(APP, &hp(GW4, 8080)),
            "proxy",
            Some("10.88.0.1:8080"),
        );
        pod.check().unwrap_or_else(|e| panic!("{value}: CHECK {e}"));
    }
}

/// What Istio's `istio-validation` init container runs when Istio uses its CNI plugin.
fn istio_validation(netns: &str, ipv6: bool) -> (i32, String) {
    let mut c = Command::new(probe());
    c.args([
        "--netns", netns, "--gid", "1337", "--uid", "1337", "validate", "istio",
    ]);
    if ipv6 {
        c.arg("--ipv6");
    }
    let out = c.output().expect("run capture-probe validate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn istios_own_validation_passes_in_a_captured_pod_and_fails_in_an_uncaptured_one() {
    let pod = Pod::meshed(&[]);
    for ipv6 in [false, true] {
        let (code, out) = istio_validation(&pod.pod.path(), ipv6);
        assert_eq!(code, 0, "ipv6={ipv6}: {out}");
    }
    let tproxy = Pod::meshed(&[("sidecar.istio.io/interceptionMode", "TPROXY")]);
    let (code, out) = istio_validation(&tproxy.pod.path(), false);
    assert_eq!(code, 0, "TPROXY: {out}");
    pod.del().expect("DEL");
    let (code, out) = istio_validation(&pod.pod.path(), false);
    assert_eq!(code, 126, "uncaptured: {out}");
}

/// The Istio settings the reference writer knows (istio-iptables' inputs).
struct IstioOpts<'a> {
    exclude_ifaces: &'a [&'a str],
    /// `None`: `*` with these exclusions (15020, 15021, 15090 added).
    include_in_ports: Option<&'a [u16]>,
    exclude_in_ports: &'a [u16],
    exclude_out_ports: &'a [u16],
    include_out_ports: &'a [u16],
    /// `None`: `*`.
    include_ranges: Option<&'a [&'a str]>,
    exclude_ranges: &'a [&'a str],
    /// `istio.io/reroute-virtual-interfaces` (KubeVirt).
    reroute: &'a [&'a str],
}

impl Default for IstioOpts<'_> {
    fn default() -> Self {
        IstioOpts {
            exclude_ifaces: &[],
            include_in_ports: None,
            exclude_in_ports: &[],
            exclude_out_ports: &[15020],
            include_out_ports: &[],
            include_ranges: None,
            exclude_ranges: &[],
            reroute: &[],
        }
    }
}

/// istio-iptables' nat rules for one family in REDIRECT mode (`capture/run.go`, as in
/// istio-cni's golden `basic.txt.golden`), with `HasLoopBackIP` taken over both families.
fn istio_reference(o: &IstioOpts, v6: bool) -> String {
    let (passthrough, localhost) = if v6 {
        ("::6/128", "::1/128")
    } else {
        ("127.0.0.6/32", "127.0.0.1/32")
    };
    let fam = |a: &&&str| a.contains(':') == v6;
    let has_loopback = o
        .include_ranges
        .unwrap_or(&[])
        .iter()
        .any(|c| c.starts_with("127.") || c.starts_with("::1/"));
    let mut r = String::from(
        "*nat\n:ISTIO_INBOUND - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
         :ISTIO_REDIRECT - [0:0]\n",
    );
    for i in o.exclude_ifaces {
        let i = i.replace('*', "+");
        r += &format!("-A PREROUTING -i {i} -j RETURN\n-A OUTPUT -o {i} -j RETURN\n");
    }
    r += "-A PREROUTING -p tcp -j ISTIO_INBOUND\n-A OUTPUT -j ISTIO_OUTPUT\n";
    r += "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN\n";
    match o.include_in_ports {
        None => {
            for p in o.exclude_in_ports.iter().chain(&[15020, 15021, 15090]) {
                r += &format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN\n");
            }
            r += "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n";
        }
        Some(ports) => {
            for p in ports {
                r += &format!("-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_IN_REDIRECT\n");
            }
        }
    }
    r += "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n";
    r += "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n";
    for p in o.exclude_out_ports {
        r += &format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN\n");
        r += &format!("-A ISTIO_OUTPUT -p udp --dport {p} -j RETURN\n");
    }
    r += &format!("-A ISTIO_OUTPUT -o lo -s {passthrough} -j RETURN\n");
    for owner in ["--uid-owner", "--gid-owner"] {
        r += &format!(
            "-A ISTIO_OUTPUT -o lo ! -d {localhost} -p tcp ! --dport 15008 -m owner {owner} 1337 -j ISTIO_IN_REDIRECT\n"
        );
        if !has_loopback {
            r += &format!("-A ISTIO_OUTPUT -o lo -m owner ! {owner} 1337 -j RETURN\n");
        }
        r += &format!("-A ISTIO_OUTPUT -m owner {owner} 1337 -j RETURN\n");
    }
    r += &format!("-A ISTIO_OUTPUT -d {localhost} -j RETURN\n");
    for c in o.exclude_ranges.iter().filter(fam) {
        r += &format!("-A ISTIO_OUTPUT -d {c} -j RETURN\n");
    }
    for p in o.include_out_ports {
        r += &format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j ISTIO_REDIRECT\n");
    }
    match o.include_ranges {
        None => r += "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
        Some(list) => {
            for c in list.iter().filter(fam) {
                r += &format!("-A ISTIO_OUTPUT -d {c} -j ISTIO_REDIRECT\n");
            }
        }
    }
    // KubeVirt (`shortCircuitKubeInternalInterface`, then `handleOutboundIncludeRules`): each
    // rerouted interface returns before inbound capture, and its included destinations go
    // to ISTIO_REDIRECT ahead of that, as in the goldens `kube-virt-interfaces` and
    // `ipnets-with-kube-virt-interfaces`.
    for i in o.reroute {
        r += &format!("-I PREROUTING 1 -i {i} -j RETURN\n");
    }
    for i in o.reroute {
        match o.include_ranges {
            None => r += &format!("-I PREROUTING 1 -i {i} -j ISTIO_REDIRECT\n"),
            Some(list) => {
                for c in list.iter().filter(fam) {
                    r += &format!("-I PREROUTING 1 -i {i} -d {c} -j ISTIO_REDIRECT\n");
                }
            }
        }
    }
    r + "COMMIT\n"
}

fn istio_probes(pod: &Pod) -> Vec<common::twin::Probe> {
    use common::twin::Probe;
    let (p4, p6) = (pod.ip4.clone(), pod.ip6.clone());
    let by_gid = Ident {
        uid: 2000,
        gid: PROXY_UID,
    };
    let out = |w: Ident, d: String| Probe::Out(w, d);
    vec![
        out(APP, hp(GW4, 8080)),
        out(APP, hp(GW4, 3306)),
        out(APP, hp(GW4, 15020)),
        out(APP, "203.0.113.9:443".into()),
        out(PROXY, hp(GW4, 8080)),
        out(by_gid, hp(GW4, 8080)),
        out(APP, "127.0.0.1:8080".into()),
        out(APP, "127.0.0.2:8080".into()),
        out(APP, hp(&p4, 8080)),
        out(PROXY, hp(&p4, 8080)),
        out(by_gid, hp(&p4, 8080)),
        out(PROXY, hp(&p4, 15008)),
        out(APP, hp(GW6, 8080)),
        out(PROXY, hp(&p6, 8080)),
        out(APP, hp(&p6, 8080)),
        out(PROXY, "127.0.0.6:15002".into()),
        Probe::In(hp(&p4, 8080)),
        Probe::In(hp(&p4, 15020)),
        Probe::In(hp(&p4, 15021)),
        Probe::In(hp(&p4, 3306)),
        Probe::In(hp(&p6, 8080)),
    ]
}

fn istio_twin(ann: Value, o: &IstioOpts) -> Vec<(common::twin::Probe, String)> {
    let ours = Pod::with(Some(ann), json!({})).unwrap_or_else(|e| panic!("ADD: {e}"));
    let twin = common::twin::unmeshed_pod(true);
    common::twin::load_reference(
        &twin,
        &istio_reference(o, false),
        Some(&istio_reference(o, true)),
        true,
    );
    let px = common::twin::ProxySpec {
        who: PROXY,
        outbound: 15001,
        inbound: 15006,
        dns: None,
    };
    let probes = istio_probes(&ours);
    common::twin::compare(&ours, &twin, px, &probes)
}

#[test]
fn a_default_istio_pod_behaves_as_under_istio_cni() {
    let got = istio_twin(json!({STATUS: "{}"}), &IstioOpts::default());
    assert!(got[0].1.starts_with("proxy:15001"), "{got:?}");
    assert_eq!(got[2].1, "node:15020", "{got:?}");
}

#[test]
fn istio_annotations_behave_as_under_istio_cni() {
    let got = istio_twin(
        json!({
            STATUS: "{}",
            INCLUDE_RANGES: "127.0.0.0/8,10.88.0.0/24,fd88::/64",
            EXCLUDE_RANGES: "10.88.0.1/32",
            "traffic.sidecar.istio.io/excludeOutboundPorts": "3306",
            "traffic.sidecar.istio.io/includeOutboundPorts": "443",
            "traffic.sidecar.istio.io/excludeInboundPorts": "3306",
        }),
        &IstioOpts {
            include_ranges: Some(&["127.0.0.0/8", "10.88.0.0/24", "fd88::/64"]),
            exclude_ranges: &["10.88.0.1/32"],
            exclude_out_ports: &[3306],
            include_out_ports: &[443],
            exclude_in_ports: &[3306],
            ..IstioOpts::default()
        },
    );
    assert_eq!(got[0].1, "node:8080", "excluded: {got:?}");
    assert_eq!(got[3].1, "proxy:15001 orig=203.0.113.9:443", "{got:?}");
    assert!(
        got[7].1.starts_with("proxy:15001"),
        "loopback include: {got:?}"
    );
    let got = istio_twin(
        json!({STATUS: "{}", INCLUDE_IN_PORTS: "8080", EXCLUDE_IFACES: "veth+"}),
        &IstioOpts {
            include_in_ports: Some(&[8080]),
            exclude_ifaces: &["veth+"],
            ..IstioOpts::default()
        },
    );
    assert_eq!(got[19].1, "app:3306", "not included: {got:?}");
}

/// Istio's golden `kube-virt-interfaces` (reroute `eth1,eth2`, include `*`) and
/// `ipnets-with-kube-virt-interfaces` (include narrowed), istio/istio 86c9f01
/// `tools/istio-iptables/pkg/capture/testdata`: VMs behind the pod on `eth1` and `eth2`
/// (made after ADD, as KubeVirt makes them), and the pod's own probes, end the same way under
/// Istio's rules and ours.
#[test]
fn kubevirt_goldens_behave_as_under_istio_cni() {
    use common::twin::{ProxySpec, servers};
    use common::vm::Vm;
    let px = ProxySpec {
        who: PROXY,
        outbound: 15001,
        inbound: 15006,
        dns: None,
    };
    for include in [None, Some(&["10.96.0.0/12", "fd88::/64"][..])] {
        let o = IstioOpts {
            include_ranges: include,
            reroute: &["eth1", "eth2"],
            ..IstioOpts::default()
        };
        let mut ann = json!({STATUS: "{}", "istio.io/reroute-virtual-interfaces": "eth1,eth2"});
        if let Some(list) = include {
            ann[INCLUDE_RANGES] = json!(list.join(","));
        }
        let ours = Pod::with(Some(ann.clone()), json!({})).unwrap_or_else(|e| panic!("ADD: {e}"));
        let twin = common::twin::unmeshed_pod(true);
        common::twin::load_reference(
            &twin,
            &istio_reference(&o, false),
            Some(&istio_reference(&o, true)),
            true,
        );
        let vms = |p: &Pod| [Vm::attach(p, "eth1", 1), Vm::attach(p, "eth2", 2)];
        let (ours_vms, twin_vms) = (vms(&ours), vms(&twin));
        // The pod's own connections.
        let probes = istio_probes(&ours);
        common::twin::compare(&ours, &twin, px, &probes);
        // The VMs'.
        let _a = servers(&ours, px);
        let _b = servers(&twin, px);
        let mut diffs = Vec::new();
        let mut seen = Vec::new();
        for (i, dst) in [
            hp(GW4, 8080),
            hp(GW6, 8080),
            "10.96.0.10:80".to_string(),
            "203.0.113.9:443".to_string(),
        ]
        .iter()
        .enumerate()
        {
            for v in 0..2 {
                let (a, b) = (ours_vms[v].dial(dst), twin_vms[v].dial(dst));
                if a != b {
                    diffs.push(format!("vm {v} -> {dst}: mesh-redirect {a:?}, Istio {b:?}"));
                }
                seen.push((i, v, a));
            }
        }
        assert!(diffs.is_empty(), "{ann}:\n  {}", diffs.join("\n  "));
        let of = |i: usize| {
            seen.iter()
                .find(|(j, v, _)| *j == i && *v == 0)
                .map(|t| t.2.clone())
        };
        match include {
            None => {
                assert_eq!(of(0), Some(format!("proxy:15001 orig={}", hp(GW4, 8080))));
                assert_eq!(of(1), Some(format!("proxy:15001 orig={}", hp(GW6, 8080))));
            }
            Some(_) => {
                assert_eq!(of(0), Some("node:8080".into()), "not included: forwarded");
                assert_eq!(of(1), Some(format!("proxy:15001 orig={}", hp(GW6, 8080))));
                assert_eq!(of(2), Some("proxy:15001 orig=10.96.0.10:80".into()));
            }
        }
    }
}
