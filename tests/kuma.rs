//! The kuma profile, proven with traffic against Kuma's own rules. The reference is what
//! kumahq/kuma's transparent-proxy builder (`pkg/transparentproxy/iptables/builder`, 348b652,
//! 2026-08-21) generates for the same `traffic.kuma.io/transparent-proxy-config` — written
//! out below, loaded with iptables-restore into a twin pod, with `::6` on `lo` as Kuma adds it
//! — and every connection of the probe list must end the same way in both pods. What each
//! connection should do is also written down and asserted. Kuma 2.x's per-key annotations
//! (the release line's default) are proven the same way against what kuma-cni 2.x (v2.14.3 =
//! 0c7aaec, `app/cni/pkg/cni`) builds from them: its builder there is byte for byte the one at
//! 348b652 but for the module path, so one reference writer serves both.

use common::twin::{Probe, ProxySpec, compare, load_reference, of, unmeshed_pod};
use common::*;
use serde_json::json;

const INJECTED: &str = "kuma.io/sidecar-injected";
const CONFIG: &str = "traffic.kuma.io/transparent-proxy-config";
const KUMA_UID: u32 = 5678;

fn proxy() -> ProxySpec {
    ProxySpec {
        who: Ident {
            uid: KUMA_UID,
            gid: KUMA_UID,
        },
        outbound: 15001,
        inbound: 15006,
        dns: Some(15053),
    }
}

/// What the injector writes with Helm's defaults: DNS on (capture all, zones split), the probe
/// proxy and readiness ports excluded inbound, dual stack.
const HELM_DEFAULTS: &str = "cniMode: true
ipFamilyMode: dualstack
kumaDPUser: \"5678\"
redirect:
  dns:
    captureAll: true
    enabled: true
    port: 15053
    resolvConfigPath: /etc/resolv.conf
    skipConntrackZoneSplit: false
  inbound:
    enabled: true
    excludePorts:
    - 9001
    - 9902
    port: 15006
  outbound:
    enabled: true
    port: 15001
retry:
  maxRetries: 4
  sleepBetweenRetries: 2s
wait: 5
waitInterval: 0
";

/// The config knobs the reference writer knows.
#[derive(Default)]
struct Opts<'a> {
    /// outbound.excludePortsForUIDs, already as (protocol, ports, uids) for iptables.
    uid_exclusions: &'a [(&'a str, &'a str, &'a str)],
    exclude_out_ips: &'a [&'a str],
    exclude_out_ports: &'a [u16],
    exclude_in_ips: &'a [&'a str],
    drop_invalid: bool,
    /// A delegated gateway: inbound redirection disabled (KUMA_MESH_INBOUND only returns).
    no_inbound: bool,
}

/// Kuma's iptables-restore document for one family (tables raw, nat, mangle, in the builder's
/// order; DNS on with capture-all and the conntrack zone split; inbound excludes 9001, 9902).
fn reference(o: &Opts, v6: bool) -> String {
    let (passthrough, localhost) = if v6 {
        ("::6/128", "::1/128")
    } else {
        ("127.0.0.6/32", "127.0.0.1/32")
    };
    let fam = |a: &&&str| a.contains(':') == v6;
    let mut r = String::from("*raw\n");
    r += "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 5678 -j CT --zone 1\n";
    r += "-A OUTPUT -p udp -m udp --sport 15053 -m owner --uid-owner 5678 -j CT --zone 2\n";
    r += "-A OUTPUT -p udp -m udp --dport 53 -j CT --zone 2\n";
    r += "-A PREROUTING -p udp -m udp --sport 53 -j CT --zone 1\nCOMMIT\n";
    r += "*nat\n:KUMA_MESH_INBOUND - [0:0]\n:KUMA_MESH_INBOUND_REDIRECT - [0:0]\n";
    r += ":KUMA_MESH_OUTBOUND - [0:0]\n:KUMA_MESH_OUTBOUND_REDIRECT - [0:0]\n";
    r += "-A PREROUTING -p tcp -j KUMA_MESH_INBOUND\n";
    for (proto, ports, uids) in o.uid_exclusions {
        r += &format!(
            "-A OUTPUT -p {proto} -m multiport --dports {ports} -m owner --uid-owner {uids} -j RETURN\n"
        );
    }
    for ip in o.exclude_out_ips.iter().filter(fam) {
        r += &format!("-A OUTPUT -d {ip} -j RETURN\n");
    }
    r += "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 5678 -j RETURN\n";
    r += "-A OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053\n";
    r += "-A OUTPUT -p tcp -m tcp --dport 53 -m owner ! --uid-owner 5678 -j RETURN\n";
    r += "-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND\n";
    if o.no_inbound {
        // builder_table_nat.go: "inbound traffic redirection is disabled".
        r += "-A KUMA_MESH_INBOUND -p tcp -j RETURN\n";
    } else {
        for ip in o.exclude_in_ips.iter().filter(fam) {
            r += &format!("-A KUMA_MESH_INBOUND -s {ip} -j RETURN\n");
        }
        for p in [9001, 9902] {
            r += &format!("-A KUMA_MESH_INBOUND -p tcp -m tcp --dport {p} -j RETURN\n");
        }
        r += "-A KUMA_MESH_INBOUND -p tcp -j KUMA_MESH_INBOUND_REDIRECT\n";
    }
    r += "-A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n";
    for p in o.exclude_out_ports {
        r += &format!("-A KUMA_MESH_OUTBOUND -p tcp -m tcp --dport {p} -j RETURN\n");
    }
    r += &format!("-A KUMA_MESH_OUTBOUND -s {passthrough} -o lo -j RETURN\n");
    r += &format!(
        "-A KUMA_MESH_OUTBOUND ! -d {localhost} -o lo -p tcp -m owner --uid-owner 5678 -j KUMA_MESH_INBOUND_REDIRECT\n"
    );
    r += "-A KUMA_MESH_OUTBOUND -o lo -p tcp -m owner ! --uid-owner 5678 -j RETURN\n";
    r += "-A KUMA_MESH_OUTBOUND -m owner --uid-owner 5678 -j RETURN\n";
    r += &format!("-A KUMA_MESH_OUTBOUND -d {localhost} -j RETURN\n");
    r += "-A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT\n";
    r += "-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
    if o.drop_invalid {
        r += "*mangle\n-A PREROUTING -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n";
    }
    r
}

fn kuma_pod(yaml: &str) -> Pod {
    Pod::with(
        Some(json!({INJECTED: "true", CONFIG: yaml})),
        json!({"mesh": "kuma"}),
    )
    .unwrap_or_else(|e| panic!("ADD: {e}"))
}

fn probes(pod: &Pod) -> Vec<Probe> {
    let (p4, p6) = (pod.ip4.clone(), pod.ip6.clone());
    let px = proxy().who;
    let out = |w: Ident, d: String| Probe::Out(w, d);
    vec![
        out(APP, hp(GW4, 8080)),            // 0
        out(APP, hp(GW4, 3306)),            // 1
        out(APP, "203.0.113.9:443".into()), // 2
        out(px, hp(GW4, 8080)),             // 3
        out(APP, "127.0.0.1:8080".into()),  // 4
        out(APP, hp(&p4, 8080)),            // 5
        out(px, hp(&p4, 8080)),             // 6
        out(APP, hp(GW6, 8080)),            // 7
        out(px, hp(&p6, 8080)),             // 8
        out(APP, hp(GW4, 53)),              // 9: TCP DNS
        Probe::Udp(APP, hp(GW4, 53)),       // 10
        Probe::Udp(px, hp(GW4, 53)),        // 11
        Probe::Udp(APP, hp(GW6, 53)),       // 12
        Probe::In(hp(&p4, 8080)),           // 13
        Probe::In(hp(&p4, 9001)),           // 14
        Probe::In(hp(&p4, 9902)),           // 15
        Probe::In(hp(&p6, 8080)),           // 16
        out(px, "127.0.0.6:25000".into()),  // 17: the validator's dial
        out(
            Ident {
                uid: 2005,
                gid: 2005,
            },
            hp(GW4, 5005),
        ), // 18
        out(APP, hp(GW4, 5005)),            // 19
    ]
}

/// Kuma's rules for `o`, both families, in the twin pod.
fn load_dual_stack_reference(twin: &Pod, o: &Opts) {
    load_reference(twin, &reference(o, false), Some(&reference(o, true)), true);
}

#[test]
fn a_kuma_pod_with_helms_defaults_behaves_as_under_kuma_cni() {
    let ours = kuma_pod(HELM_DEFAULTS);
    let twin = unmeshed_pod(true);
    let o = Opts::default();
    load_dual_stack_reference(&twin, &o);
    let probes = probes(&ours);
    let got = compare(&ours, &twin, proxy(), &probes);
    let (p4, p6) = (&ours.ip4, &ours.ip6);
    for (i, want) in [
        (0, format!("proxy:15001 orig={}", hp(GW4, 8080))),
        (3, "node:8080".to_string()),
        (4, "app:8080".into()),
        (5, "app:8080".into()),
        (6, format!("proxy:15006 orig={}", hp(p4, 8080))),
        (7, format!("proxy:15001 orig={}", hp(GW6, 8080))),
        (8, format!("proxy:15006 orig={}", hp(p6, 8080))),
        // The app's TCP DNS goes out as it is; its UDP DNS goes to the proxy, the proxy's not.
        (9, "node:53".into()),
        (10, "proxy".into()),
        (11, "node".into()),
        (13, format!("proxy:15006 orig={}", hp(p4, 8080))),
        (14, "app:9001".into()),
        (15, "app:9902".into()),
        (17, "proxy:15006 orig=127.0.0.6:25000".into()),
    ] {
        assert_eq!(of(&got, &probes[i]), want, "{:?}", probes[i]);
    }
    ours.check().expect("CHECK");
}

#[test]
fn kumas_exclusions_behave_as_under_kuma_cni() {
    let yaml = "cniMode: true
kumaDPUser: '5678'
dropInvalidPackets: true
redirect:
  dns: {enabled: true, port: 15053, captureAll: true}
  inbound: {port: 15006, excludePorts: [9001, 9902], excludePortsForIPs: ['10.88.0.1/32,fd88::1']}
  outbound:
    port: 15001
    excludePorts: '3306'
    excludePortsForIPs: ['10.88.0.1']
    excludePortsForUIDs: ['tcp:5005:2000-2010']
";
    let ours = kuma_pod(yaml);
    let twin = unmeshed_pod(true);
    let o = Opts {
        uid_exclusions: &[("tcp", "5005", "2000-2010")],
        exclude_out_ips: &["10.88.0.1/32"],
        exclude_out_ports: &[3306],
        exclude_in_ips: &["10.88.0.1/32", "fd88::1/128"],
        drop_invalid: true,
        no_inbound: false,
    };
    load_dual_stack_reference(&twin, &o);
    let probes = probes(&ours);
    let got = compare(&ours, &twin, proxy(), &probes);
    // An excluded destination returns before DNS capture too (Kuma's order), for every uid.
    assert_eq!(of(&got, &probes[0]), "node:8080");
    assert_eq!(of(&got, &probes[10]), "node");
    // Excluded sources (the node) are not captured inbound, on both families.
    assert_eq!(of(&got, &probes[13]), "app:8080");
    assert_eq!(of(&got, &probes[16]), "app:8080");
    // The excluded uid range, only for its port.
    assert_eq!(of(&got, &probes[18]), "node:5005");
    assert_eq!(
        of(&got, &probes[2]),
        "proxy:15001 orig=203.0.113.9:443",
        "not excluded"
    );
}

#[test]
fn ipv4_mode_leaves_ipv6_alone_and_the_validator_passes() {
    let yaml = HELM_DEFAULTS.replace("ipFamilyMode: dualstack", "ipFamilyMode: ipv4");
    let ours = kuma_pod(&yaml);
    let twin = unmeshed_pod(true);
    load_reference(&twin, &reference(&Opts::default(), false), None, false);
    let probes = probes(&ours);
    let got = compare(&ours, &twin, proxy(), &probes);
    assert_eq!(of(&got, &probes[7]), "node:8080");
    assert_eq!(of(&got, &probes[16]), "app:8080");
    // Kuma's own validator, as the kuma-validation init container runs it.
    let pod = kuma_pod(HELM_DEFAULTS);
    for v6 in [false, true] {
        let out = kuma_validation(&pod.pod.path(), v6);
        assert!(
            out.status.success(),
            "ipv6={v6}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The control: the same pod without its capture fails the validator, so a pass means the
    // capture is there.
    pod.pod
        .exec(&["nft", "delete", "table", "inet", "mesh_redirect"]);
    for v6 in [false, true] {
        let out = kuma_validation(&pod.pod.path(), v6);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "ipv6={v6}: the validator must fail without capture: {}{said}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(said.contains("kuma validation failed"), "ipv6={v6}: {said}");
    }
}

/// Kuma's transparent-proxy validator in the pod at `netns`, as kuma-dp's uid runs it.
fn kuma_validation(netns: &str, v6: bool) -> std::process::Output {
    let mut c = std::process::Command::new(probe());
    c.args(["--netns", netns, "--gid", "5678", "--uid", "5678"]);
    c.args(["validate", "kuma"]);
    if v6 {
        c.arg("--ipv6");
    }
    c.output().expect("run capture-probe validate kuma")
}

#[test]
fn pods_kuma_cni_would_not_capture_are_left_alone_and_bad_config_fails() {
    for ann in [
        json!({INJECTED: "false", CONFIG: HELM_DEFAULTS}),
        json!({INJECTED: "True", CONFIG: HELM_DEFAULTS}),
        // kuma-init applies this pod's rules itself.
        json!({INJECTED: "true", CONFIG: "cniMode: false"}),
        json!({"kuma.io/transparent-proxying-inbound-port": "15006"}),
        // Kuma 2.x's per-key annotations without kuma-cni in the network list: init mode
        // (the injector added kuma-init), as inject.01's golden.
        json!({INJECTED: "true"}),
        json!(per_key(&[("k8s.v1.cni.cncf.io/networks", "")])),
    ] {
        let pod = Pod::with(Some(ann.clone()), json!({"mesh": "kuma"}))
            .unwrap_or_else(|e| panic!("{ann}: {e}"));
        assert!(!pod.pod.has_table(), "{ann}");
    }
    for (ann, what) in [
        (
            json!(per_key(&[(
                "kuma.io/transparent-proxying-ip-family-mode",
                "ipv6"
            )])),
            "kuma.io/transparent-proxying-ip-family-mode",
        ),
        (
            json!({INJECTED: "true", CONFIG: "cniMode: true\nkumaDPUser: kuma-dp"}),
            "kumaDPUser",
        ),
        (
            json!({INJECTED: "true", CONFIG: "{cniMode: true, redirect: {dns: {enabled: true, captureAll: false}}}"}),
            "captureAll",
        ),
    ] {
        let e = Pod::with(Some(ann.clone()), json!({"mesh": "kuma"}))
            .err()
            .unwrap_or_else(|| panic!("{ann} accepted"));
        let j = e.json.expect("error JSON");
        assert_eq!(j["code"], 100, "{j}");
        let msg = j["msg"].as_str().unwrap();
        assert!(msg.contains(what), "{msg}");
    }
}

/// The annotations Kuma 2.x's injector writes on a CNI-mode pod with Helm's defaults
/// (kumahq/kuma v2.14.3 = 0c7aaec: `injector.go` NewAnnotations; the CNI-mode golden
/// `inject.34.golden.yaml`, with the control plane's defaults of builtin DNS on, the probe
/// proxy on 9001 and, with the admin port on a unix socket, 9902 excluded inbound), with
/// `extra` added or replacing.
fn per_key(extra: &[(&str, &str)]) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    for (k, v) in [
        ("k8s.v1.cni.cncf.io/networks", "kuma-cni"),
        ("kubectl.kubernetes.io/default-container", "app"),
        ("kuma.io/application-probe-proxy-port", "9001"),
        ("kuma.io/builtin-dns", "enabled"),
        ("kuma.io/builtin-dns-logging", "false"),
        ("kuma.io/builtin-dns-port", "15053"),
        ("kuma.io/envoy-admin-port", "9901"),
        (INJECTED, "true"),
        ("kuma.io/sidecar-uid", "5678"),
        ("kuma.io/transparent-proxying", "enabled"),
        ("kuma.io/transparent-proxying-inbound-port", "15006"),
        ("kuma.io/transparent-proxying-ip-family-mode", "dualstack"),
        ("kuma.io/transparent-proxying-outbound-port", "15001"),
        ("kuma.io/virtual-probes", "disabled"),
        ("kuma.io/virtual-probes-port", "9000"),
        ("traffic.kuma.io/exclude-inbound-ports", "9902"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        m.insert(k.into(), json!(v));
    }
    m
}

/// Issue 21: Kuma 2.x's default install writes per-key annotations, not the YAML; such pods
/// used to fail ADD. Read as kuma-cni 2.x reads them (v2.14.3 `app/cni/pkg/cni`), they get
/// kuma-cni 2.x's rules: inbound 9902 and 9001 excluded, outbound 9901 excluded (its default
/// when the key is absent), DNS captured with the zone split, dual stack.
#[test]
fn a_kuma_2x_pod_with_per_key_annotations_behaves_as_under_kuma_cni_2x() {
    let ours = Pod::with(Some(json!(per_key(&[]))), json!({"mesh": "kuma"}))
        .unwrap_or_else(|e| panic!("ADD: {e}"));
    let twin = unmeshed_pod(true);
    let o = Opts {
        exclude_out_ports: &[9901],
        ..Opts::default()
    };
    load_dual_stack_reference(&twin, &o);
    let mut probes = probes(&ours);
    probes.push(Probe::Out(APP, hp(GW4, 9901))); // 20: kuma-cni's default outbound exclusion
    let got = compare(&ours, &twin, proxy(), &probes);
    let (p4, p6) = (&ours.ip4, &ours.ip6);
    for (i, want) in [
        (0, format!("proxy:15001 orig={}", hp(GW4, 8080))),
        (3, "node:8080".to_string()),
        (6, format!("proxy:15006 orig={}", hp(p4, 8080))),
        (8, format!("proxy:15006 orig={}", hp(p6, 8080))),
        (10, "proxy".into()),
        (11, "node".into()),
        (13, format!("proxy:15006 orig={}", hp(p4, 8080))),
        (14, "app:9001".into()),
        (15, "app:9902".into()),
        (17, "proxy:15006 orig=127.0.0.6:25000".into()),
        (20, "no answer".into()),
    ] {
        assert_eq!(of(&got, &probes[i]), want, "{:?}", probes[i]);
    }
    ours.check().expect("CHECK");
    // kuma-validation, as the injector's CNI-mode init container runs it.
    for v6 in [false, true] {
        let out = kuma_validation(&ours.pod.path(), v6);
        assert!(
            out.status.success(),
            "ipv6={v6}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A delegated gateway (`kuma.io/gateway: enabled`, the CNI-mode golden inject.41): outbound
/// and DNS captured, inbound not, as kuma-cni 2.x.
#[test]
fn a_kuma_2x_delegated_gateway_captures_outbound_and_dns_only() {
    let ann = per_key(&[
        ("kuma.io/gateway", "enabled"),
        ("kuma.io/application-probe-proxy-port", "0"),
    ]);
    let ours =
        Pod::with(Some(json!(ann)), json!({"mesh": "kuma"})).unwrap_or_else(|e| panic!("ADD: {e}"));
    let twin = unmeshed_pod(true);
    let o = Opts {
        exclude_out_ports: &[9901],
        no_inbound: true,
        ..Opts::default()
    };
    load_dual_stack_reference(&twin, &o);
    let probes = probes(&ours);
    let got = compare(&ours, &twin, proxy(), &probes);
    let p4 = &ours.ip4;
    assert_eq!(
        of(&got, &probes[0]),
        format!("proxy:15001 orig={}", hp(GW4, 8080))
    );
    assert_eq!(of(&got, &probes[10]), "proxy");
    assert_eq!(of(&got, &probes[13]), "app:8080", "inbound not captured");
    // The proxy calling the pod's own address still goes to its inbound port (Kuma keeps the
    // loopback rule and its inbound redirect chain).
    assert_eq!(
        of(&got, &probes[6]),
        format!("proxy:15006 orig={}", hp(p4, 8080))
    );
}

#[test]
fn ipv6_off_in_the_pods_namespace_means_no_passthrough6_and_every_verb_agrees() {
    // Kuma's dual-stack mode asks for `::6` when IPv6 is on in the pod: the plugin learns that
    // from the kernel's answer to the add, so a namespace with IPv6 off must still ADD cleanly.
    let tmp = TempDir::new();
    let mut list = conflist(tmp.path(), "1.0.0", json!({"mesh": "kuma"}));
    list["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": SUBNET4}]]);
    list["plugins"][0]["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}]);
    let ann = json!({INJECTED: "true", CONFIG: HELM_DEFAULTS});
    let pod = Pod::from_list(list, tmp, Some(ann), "default").unwrap_or_else(|e| panic!("{e}"));
    let lo6 = |p: &Pod| p.pod.exec(&["ip", "-6", "addr", "show", "dev", "lo"]);
    assert!(lo6(&pod).contains("::6/128"), "IPv6 on: `::6` added");
    pod.del().expect("DEL");
    assert!(!lo6(&pod).contains("::6/128"), "DEL removes it");
    for k in ["all", "default", "lo"] {
        pod.pod.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{k}.disable_ipv6=1"),
        ]);
    }
    pod.plugin("ADD", &pod.mesh_conf())
        .expect("ADD with IPv6 off in the pod");
    assert!(pod.pod.has_table());
    assert!(!lo6(&pod).contains("::6"), "{}", lo6(&pod));
    pod.plugin("CHECK", &pod.mesh_conf())
        .expect("CHECK agrees: no `::6` expected");
    pod.plugin("DEL", &pod.mesh_conf()).expect("DEL");
    assert!(!pod.pod.has_table());
}
