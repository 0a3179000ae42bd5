//! TPROXY interception and DNS capture, proven with traffic in namespaces the test makes.

use common::*;
use serde_json::json;
use std::process::Command;

const TPROXY: (&str, &str) = ("sidecar.istio.io/interceptionMode", "TPROXY");

/// The inbound side of a TPROXY proxy: an `IP_TRANSPARENT` listener on 15006. It needs
/// CAP_NET_ADMIN (Istio gives its proxy that in TPROXY mode), so it keeps root here.
fn transparent_proxy(pod: &Pod) -> Proc {
    serve(
        &pod.pod.path(),
        ROOT,
        "proxy-in",
        &[15006],
        &["--transparent"],
    )
}

fn outbound_proxy(pod: &Pod) -> Proc {
    serve(&pod.pod.path(), PROXY, "proxy", &[15001], &[])
}

fn peer_ip(line: &str) -> String {
    let peer = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .unwrap_or_default();
    let ip = peer.rsplit_once(':').map(|(ip, _)| ip).unwrap_or_default();
    ip.trim_matches(['[', ']']).to_string()
}

fn routing(pod: &Pod) -> String {
    [
        pod.pod.exec(&["ip", "-4", "rule"]),
        pod.pod.exec(&["ip", "-6", "rule"]),
        pod.pod.exec(&["ip", "-4", "route", "show", "table", "all"]),
        pod.pod.exec(&["ip", "-6", "route", "show", "table", "all"]),
        pod.pod.exec(&["ip", "-6", "addr", "show", "dev", "lo"]),
    ]
    .join("\n")
}

#[test]
fn tproxy_delivers_inbound_with_original_source_and_destination() {
    let pod = Pod::meshed(&[
        TPROXY,
        ("traffic.sidecar.istio.io/excludeInboundPorts", "9000"),
    ]);
    let _in = transparent_proxy(&pod);
    let _out = outbound_proxy(&pod);
    let _app = pod.app_server(&[8080, 9000, 15008]);
    let _node = pod.node_server(&[8080]);
    for (ip, client) in [(&pod.ip4, GW4), (&pod.ip6, GW6)] {
        let dst = hp(ip, 8080);
        let line = pod.dial_from_node(&dst).unwrap();
        let (who, orig) = answer(&line);
        assert_eq!(who, "proxy-in", "{line}");
        // getsockname on the transparent socket: the address the client dialled.
        assert_eq!(orig, dst, "{line}");
        // The client's real address, not a NATed one.
        assert_eq!(peer_ip(&line), client, "{line}");
        // Excluded inbound ports and the tunnel port (Istio's HBONE 15008) still bypass.
        assert_answer(pod.dial_from_node(&hp(ip, 9000)), "app", None);
        assert_answer(pod.dial_from_node(&hp(ip, 15008)), "app", None);
    }
    // Outbound is as in REDIRECT mode.
    assert_answer(
        pod.dial_from_pod(APP, &hp(GW4, 8080)),
        "proxy",
        Some("10.88.0.1:8080"),
    );
    assert_answer(pod.dial_from_pod(PROXY, &hp(GW4, 8080)), "node", None);
    // A second connection on the same established flow path works too (ct mark/divert).
    assert_answer(pod.dial_from_node(&hp(&pod.ip4, 8080)), "proxy-in", None);
}

#[test]
fn tproxy_routing_brings_replies_to_a_proxy_keeping_the_clients_address() {
    // Istio's original_src: the proxy connects to the app from the client's address, its
    // socket marked 1337. The app's replies are addressed to the client; only the saved
    // connection mark and table 133 bring them back to the proxy instead of out to eth0.
    let pod = Pod::meshed(&[TPROXY]);
    let _app = pod.app_server(&[8080]);
    let out = std::process::Command::new(probe())
        .args(["--netns", &pod.pod.path(), "connect", &hp(&pod.ip4, 8080)])
        .args(["--from", GW4, "--mark", "1337", "--timeout-ms", "1500"])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(answer(&line).0, "app", "{line}");
    assert_eq!(
        peer_ip(&line),
        GW4,
        "the app sees the client's address: {line}"
    );
}

#[test]
fn tproxy_routing_is_installed_checked_and_removed() {
    let pod = Pod::meshed(&[TPROXY]);
    let r = routing(&pod);
    assert!(r.contains("fwmark 0x539 lookup 133"), "{r}");
    assert!(r.contains("local default dev lo table 133"), "{r}");
    assert!(r.contains("::6/128"), "{r}");
    pod.check().expect("CHECK after ADD");
    // ADD again: nothing duplicated.
    pod.plugin("ADD", &pod.mesh_conf()).unwrap();
    let again = routing(&pod);
    assert_eq!(
        again.matches("fwmark 0x539 lookup 133").count(),
        2,
        "one rule per family: {again}"
    );
    // An ip rule removed by hand: CHECK names it.
    pod.pod
        .exec(&["ip", "-4", "rule", "del", "fwmark", "1337", "lookup", "133"]);
    let e = pod.plugin("CHECK", &pod.mesh_conf()).unwrap_err();
    let msg = e.json.unwrap()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("ip rule fwmark 1337 lookup 133 is missing"),
        "{msg}"
    );
    // DEL leaves no rule, route, address or table behind.
    pod.plugin("ADD", &pod.mesh_conf()).unwrap();
    pod.del().expect("DEL");
    let r = routing(&pod);
    assert!(
        !r.contains("0x539") && !r.contains("table 133") && !r.contains("::6/128"),
        "{r}"
    );
    assert!(!pod.pod.has_table());
}

#[test]
fn tproxy_refused_table_rolls_the_routing_back() {
    // Someone else owns a table of our name, so the nftables half is refused; the routing half
    // must not stay behind.
    let pod = Pod::with(Some(json!({"app": "x"})), json!({})).unwrap();
    let _held = OwnedTable::hold(&pod.pod);
    let before = routing(&pod);
    let mut conf = pod.mesh_conf();
    conf["runtimeConfig"]["io.kubernetes.cri.pod-annotations"] =
        json!({STATUS: "{}", "sidecar.istio.io/interceptionMode": "TPROXY"});
    let e = pod.plugin("ADD", &conf).unwrap_err();
    assert_eq!(e.json.unwrap()["code"], 102);
    assert_eq!(
        routing(&pod),
        before,
        "routing left behind after a refused ADD"
    );
}

const DNS: (&str, &str) = ("traffic.mesh-redirect.io/captureDNS", "true");

fn dns_proxy(pod: &Pod) -> Proc {
    serve(
        &pod.pod.path(),
        PROXY,
        "dnsproxy",
        &[15053],
        &["--udp", "15053", "--loopback"],
    )
}

fn resolver(pod: &Pod) -> Proc {
    serve(&pod.node.path(), ROOT, "resolver", &[53], &["--udp", "53"])
}

#[test]
fn dns_udp_and_tcp_from_the_app_reach_the_dns_proxy_and_answers_return() {
    let pod = Pod::meshed(&[DNS]);
    let _dns = dns_proxy(&pod);
    let _resolver = resolver(&pod);
    let _proxy = pod.proxy();
    for server in [GW4, GW6] {
        let line = udp(&pod.pod.path(), APP, &hp(server, 53)).unwrap();
        assert!(
            line.starts_with("dnsproxy udp-port=15053 got=query"),
            "{line}"
        );
        // The answer comes back as if from the server the app asked.
        assert!(
            line.ends_with(&format!("from={}", hp(server, 53))),
            "{line}"
        );
        assert_answer(
            pod.dial_from_pod(APP, &hp(server, 53)),
            "dnsproxy",
            Some(&hp(server, 53)),
        );
    }
    // A local resolver address (127.0.0.53) is captured too.
    let line = udp(&pod.pod.path(), APP, "127.0.0.53:53").unwrap();
    assert!(line.starts_with("dnsproxy"), "{line}");
}

#[test]
fn dns_from_the_proxy_goes_to_the_real_resolver() {
    let pod = Pod::meshed(&[DNS]);
    let _dns = dns_proxy(&pod);
    let _resolver = resolver(&pod);
    for server in [GW4, GW6] {
        let line = udp(&pod.pod.path(), PROXY, &hp(server, 53)).unwrap();
        assert!(line.starts_with("resolver udp-port=53"), "{line}");
        assert_answer(pod.dial_from_pod(PROXY, &hp(server, 53)), "resolver", None);
    }
}

#[test]
fn dns_conntrack_zones_keep_the_proxys_upstream_query_apart_from_the_apps() {
    // The proxy forwards upstream from the very source port the app used. Without zones the
    // proxy's packet would match the app's (redirected) conntrack entry and loop back to the
    // proxy; with them it reaches the resolver.
    let pod = Pod::meshed(&[DNS]);
    let _dns = dns_proxy(&pod);
    let _resolver = resolver(&pod);
    let q = |who: Ident| {
        let out = Command::new(probe())
            .args([
                "--netns",
                &pod.pod.path(),
                "--gid",
                &who.gid.to_string(),
                "--uid",
                &who.uid.to_string(),
            ])
            .args([
                "--timeout-ms",
                "1500",
                "udp",
                &hp(GW4, 53),
                "--from-port",
                "40053",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(q(APP).starts_with("dnsproxy"), "app query");
    assert!(
        q(PROXY).starts_with("resolver"),
        "proxy query from the same port"
    );
}

#[test]
fn dns_capture_off_by_default_and_excluded_port_53_disables_it() {
    let pod = Pod::meshed(&[]);
    let _resolver = resolver(&pod);
    let line = udp(&pod.pod.path(), APP, &hp(GW4, 53)).unwrap();
    assert!(line.starts_with("resolver"), "{line}");
    let pod = Pod::meshed(&[DNS, ("traffic.sidecar.istio.io/excludeOutboundPorts", "53")]);
    let _resolver = resolver(&pod);
    let line = udp(&pod.pod.path(), APP, &hp(GW4, 53)).unwrap();
    assert!(line.starts_with("resolver"), "{line}");
    assert!(!pod.pod.ruleset().contains("dns_zone"));
}

#[test]
fn dns_with_tproxy_and_plugin_config_switch() {
    let pod = Pod::with(
        Some(json!({STATUS: "{}", "sidecar.istio.io/interceptionMode": "TPROXY"})),
        json!({"captureDNS": true}),
    )
    .unwrap();
    let _dns = dns_proxy(&pod);
    let _resolver = resolver(&pod);
    let line = udp(&pod.pod.path(), APP, &hp(GW4, 53)).unwrap();
    assert!(line.starts_with("dnsproxy"), "{line}");
    pod.check().expect("CHECK with TPROXY and DNS");
}

#[test]
fn tproxy_with_lo_down_says_why_and_leaves_nothing() {
    // Runtimes bring lo up (the loopback plugin) before the pod's network; if not, the IPv6
    // local route cannot be added, and the message says what is wrong.
    require_root();
    let ns = Netns::new("mrt-lodown-");
    let conf = meshed_conf(&[TPROXY]);
    let (ok, out) = invoke("ADD", &ns.path(), conf.to_string().as_bytes(), &[]);
    assert!(!ok);
    assert_eq!(out["code"], 102, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("lo is down"), "{out}");
    assert!(!ns.has_table());
    assert!(
        !ns.exec(&["ip", "-4", "rule"]).contains("0x539"),
        "rule left behind"
    );
    let table = ns.exec(&["ip", "-4", "route", "show", "table", "133"]);
    assert_eq!(table.trim(), "", "route left behind");
}
