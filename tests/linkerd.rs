//! The linkerd profile, proven with traffic against Linkerd's own rules. The reference is what
//! linkerd2-proxy-init's `pkg/iptables/iptables.go` (183e791) generates for the same pod —
//! written out below, loaded with iptables-restore into a twin pod — and every connection of
//! the probe list must end the same way in both pods. What each connection should do is also
//! written down and asserted.

use common::twin::{Probe, ProxySpec, compare, load_reference, of, unmeshed_pod};
use common::*;
use serde_json::{Value, json};

const PROXY_VERSION: &str = "linkerd.io/proxy-version";
const SKIP_IN: &str = "config.linkerd.io/skip-inbound-ports";
const SKIP_OUT: &str = "config.linkerd.io/skip-outbound-ports";
const SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
const LINKERD_UID: u32 = 2102;

fn proxy(uid: u32) -> ProxySpec {
    ProxySpec {
        who: Ident { uid, gid: uid },
        outbound: 4140,
        inbound: 4143,
        dns: None,
    }
}

/// The linkerd2-cni chart's pod settings, and what annotations change in them.
struct Opts<'a> {
    uid: u32,
    gid: Option<u32>,
    /// `inbound-ports-to-ignore`: the chart's "4191","4190", then skip-inbound-ports.
    skip_in: &'a str,
    skip_out: Option<&'a str>,
    subnets: &'a [&'a str],
}

/// linkerd2-proxy-init's nat rules for one family (`ConfigureFirewall`: addIncomingTrafficRules,
/// then addOutgoingTrafficRules), as `iptables-save` shows them.
fn reference(o: &Opts) -> String {
    let mut r = String::from(
        "*nat\n:PROXY_INIT_OUTPUT - [0:0]\n:PROXY_INIT_REDIRECT - [0:0]\n\
         -A PREROUTING -j PROXY_INIT_REDIRECT\n-A OUTPUT -j PROXY_INIT_OUTPUT\n",
    );
    r += &format!(
        "-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports {} -j RETURN\n",
        o.skip_in.replace('-', ":")
    );
    for s in o.subnets {
        r += &format!("-A PROXY_INIT_REDIRECT -s {s} -j RETURN\n");
    }
    r += "-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-ports 4143\n";
    r += &format!(
        "-A PROXY_INIT_OUTPUT -m owner --uid-owner {} -j RETURN\n",
        o.uid
    );
    if let Some(g) = o.gid {
        r += &format!("-A PROXY_INIT_OUTPUT -m owner --gid-owner {g} -j RETURN\n");
    }
    r += "-A PROXY_INIT_OUTPUT -o lo -j RETURN\n";
    if let Some(p) = o.skip_out {
        r += &format!(
            "-A PROXY_INIT_OUTPUT -p tcp -m multiport --dports {} -j RETURN\n",
            p.replace('-', ":")
        );
    }
    r += "-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-ports 4140\nCOMMIT\n";
    r
}

fn linkerd_pod(ann: Value, conf: Value) -> Pod {
    let mut c = json!({"mesh": "linkerd"});
    if let (Some(c), Value::Object(e)) = (c.as_object_mut(), conf) {
        c.extend(e);
    }
    Pod::with(Some(ann), c).unwrap_or_else(|e| panic!("ADD: {e}"))
}

fn probes(pod: &Pod, who_proxy: Ident) -> Vec<Probe> {
    let (p4, p6) = (pod.ip4.clone(), pod.ip6.clone());
    let out = |w: Ident, d: String| Probe::Out(w, d);
    vec![
        out(APP, hp(GW4, 8080)),
        out(APP, hp(GW4, 443)),
        out(APP, hp(GW4, 6443)),
        out(APP, hp(GW4, 5005)),
        out(APP, "203.0.113.9:443".into()),
        out(who_proxy, hp(GW4, 8080)),
        out(APP, "127.0.0.1:8080".into()),
        out(APP, "127.0.0.2:8080".into()),
        out(APP, hp(&p4, 8080)),
        out(who_proxy, hp(&p4, 8080)),
        out(APP, hp(GW6, 8080)),
        out(who_proxy, hp(GW6, 8080)),
        out(APP, hp(&p6, 8080)),
        Probe::In(hp(&p4, 8080)),
        Probe::In(hp(&p4, 4190)),
        Probe::In(hp(&p4, 4191)),
        Probe::In(hp(&p4, 5005)),
        Probe::In(hp(&p6, 8080)),
        Probe::Udp(APP, hp(GW4, 53)),
    ]
}

#[test]
fn a_default_linkerd_pod_behaves_as_under_linkerd_cni() {
    let ours = linkerd_pod(json!({PROXY_VERSION: "stable-2.18.0"}), json!({}));
    let twin = unmeshed_pod(true);
    let r = Opts {
        uid: LINKERD_UID,
        gid: None,
        skip_in: "4191,4190",
        skip_out: None,
        subnets: &[],
    };
    // linkerd2-cni's chart has IPv6 off: IPv4 rules only.
    load_reference(&twin, &reference(&r), None, false);
    let px = proxy(LINKERD_UID);
    let probes = probes(&ours, px.who);
    let got = compare(&ours, &twin, px, &probes);
    let p4 = &ours.ip4;
    // Written down from the rules above.
    for (probe, want) in [
        (&probes[0], format!("proxy:4140 orig={}", hp(GW4, 8080))),
        (&probes[4], "proxy:4140 orig=203.0.113.9:443".to_string()),
        (&probes[5], "node:8080".into()),
        (&probes[6], "app:8080".into()),
        (&probes[8], "app:8080".into()),
        (&probes[9], "app:8080".into()),
        (&probes[10], "node:8080".into()),
        (&probes[13], format!("proxy:4143 orig={}", hp(p4, 8080))),
        (&probes[14], "app:4190".into()),
        (&probes[15], "app:4191".into()),
        (&probes[17], "app:8080".into()),
        (&probes[18], "node".into()),
    ] {
        assert_eq!(of(&got, probe), want, "{probe:?}");
    }
    ours.check().expect("CHECK");
}

#[test]
fn linkerd_annotations_behave_as_under_linkerd_cni() {
    let ann = json!({
        PROXY_VERSION: "stable-2.18.0",
        SKIP_IN: "5000-5010",
        SKIP_OUT: "443,6443",
        // The node's own address: inbound from it is left alone (a source match).
        SKIP_SUBNETS: "10.88.0.1/32",
        "config.linkerd.io/proxy-uid": "3000",
        "config.linkerd.io/proxy-gid": "3001",
    });
    let ours = linkerd_pod(ann, json!({}));
    let twin = unmeshed_pod(true);
    let r = Opts {
        uid: 3000,
        gid: Some(3001),
        skip_in: "4191,4190,5000-5010",
        skip_out: Some("443,6443"),
        subnets: &["10.88.0.1/32"],
    };
    load_reference(&twin, &reference(&r), None, false);
    let px = proxy(3000);
    let mut probes = probes(&ours, px.who);
    let by_gid = Ident {
        uid: 2000,
        gid: 3001,
    };
    probes.push(Probe::Out(by_gid, hp(GW4, 8080)));
    let got = compare(&ours, &twin, px, &probes);
    assert_eq!(of(&got, &probes[1]), "node:443", "skip-outbound-ports");
    assert_eq!(of(&got, &probes[2]), "node:6443", "skip-outbound-ports");
    assert_eq!(of(&got, &probes[13]), "app:8080", "skip-subnets");
    assert_eq!(
        of(&got, &probes[16]),
        "app:5005",
        "skip-inbound-ports range"
    );
    assert_eq!(of(&got, &probes[19]), "node:8080", "proxy-gid");
}

/// linkerd-cni adds the API server's ports to a control-plane pod's outbound skips (found by
/// label, which a chained plugin never sees); the same comes from the pod's own
/// `config.linkerd.io/skip-outbound-ports` (README: "Linkerd").
#[test]
fn control_plane_pods_skip_the_api_server_ports_by_annotation() {
    let ours = linkerd_pod(
        json!({PROXY_VERSION: "stable-2.18.0", SKIP_OUT: "443,6443",
               "linkerd.io/created-by": "linkerd/helm stable-2.18.0"}),
        json!({}),
    );
    let _servers = common::twin::servers(&ours, proxy(LINKERD_UID));
    for port in [443, 6443] {
        assert_answer(ours.dial_from_pod(APP, &hp(GW4, port)), "node", None);
    }
    assert_answer(
        ours.dial_from_pod(APP, &hp(GW4, 8080)),
        "proxy",
        Some(&hp(GW4, 8080)),
    );
}

#[test]
fn the_ipv6_key_turns_ipv6_capture_on() {
    let ours = linkerd_pod(
        json!({PROXY_VERSION: "stable-2.18.0"}),
        json!({"ipv6": true}),
    );
    let twin = unmeshed_pod(true);
    let r = reference(&Opts {
        uid: LINKERD_UID,
        gid: None,
        skip_in: "4191,4190",
        skip_out: None,
        subnets: &[],
    });
    load_reference(&twin, &r, Some(&r), false);
    let px = proxy(LINKERD_UID);
    let probes = probes(&ours, px.who);
    let got = compare(&ours, &twin, px, &probes);
    assert_eq!(
        of(&got, &probes[10]),
        format!("proxy:4140 orig={}", hp(GW6, 8080))
    );
    assert_eq!(
        of(&got, &probes[17]),
        format!("proxy:4143 orig={}", hp(&ours.ip6, 8080))
    );
}

/// Linkerd's network-validator as its init container runs it (uid and gid 65534).
fn linkerd_validator(netns: &str, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(probe())
        .args(["--netns", netns, "--gid", "65534", "--uid", "65534"])
        .args(extra)
        .args(["validate", "linkerd"])
        .output()
        .expect("run capture-probe validate linkerd")
}

#[test]
fn linkerds_own_network_validator_passes() {
    let ours = linkerd_pod(json!({PROXY_VERSION: "stable-2.18.0"}), json!({}));
    // The validator runs as 65534 and needs a route to 1.1.1.1 (the pod's default route).
    let out = linkerd_validator(&ours.pod.path(), &[]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ours.del().unwrap();
    let out = linkerd_validator(&ours.pod.path(), &["--timeout-ms", "2000"]);
    assert_eq!(
        out.status.code(),
        Some(95),
        "uncaptured: the validator's code"
    );
}

#[test]
fn a_pod_without_the_proxy_version_is_not_touched_and_bad_values_fail() {
    let pod = linkerd_pod(json!({"linkerd.io/inject": "enabled"}), json!({}));
    assert!(!pod.pod.has_table());
    for (k, v) in [
        (SKIP_OUT, "443,abc"),
        (SKIP_SUBNETS, "10.0.0.0/40"),
        ("config.linkerd.io/proxy-uid", "root"),
    ] {
        let e = Pod::with(
            Some(json!({PROXY_VERSION: "stable-2.18.0", k: v})),
            json!({"mesh": "linkerd"}),
        )
        .err()
        .unwrap_or_else(|| panic!("{k}={v} accepted"));
        let j = e.json.expect("error JSON");
        assert_eq!(j["code"], 100, "{j}");
        assert!(j["msg"].as_str().unwrap().contains(k), "{j}");
    }
}
