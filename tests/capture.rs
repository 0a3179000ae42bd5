//! Capture proven with traffic: a pod set up by the real reference plugins with mesh-redirect
//! chained after them, a stand-in proxy (uid 1337) reading `SO_ORIGINAL_DST`, an app (uid
//! 1000) and the "rest of the cluster" in the node namespace.

use common::*;

/// The node's server answers for destinations that are not captured.
const NODE_PORTS: [u16; 4] = [8080, 8081, 15020, 3306];

#[test]
fn app_outbound_is_captured_with_its_original_destination() {
    let pod = Pod::meshed(&[]);
    let _proxy = pod.proxy();
    let _node = pod.node_server(&NODE_PORTS);
    assert_answer(
        pod.dial_from_pod(APP, &hp(GW4, 8080)),
        "proxy",
        Some("10.88.0.1:8080"),
    );
    // A destination with no route at all is captured too: the proxy decides.
    assert_answer(
        pod.dial_from_pod(APP, "203.0.113.9:443"),
        "proxy",
        Some("203.0.113.9:443"),
    );
    assert_answer(
        pod.dial_from_pod(APP, &hp(GW6, 8080)),
        "proxy",
        Some("[fd88::1]:8080"),
    );
}

#[test]
fn proxy_uid_and_gid_traffic_is_not_captured() {
    let pod = Pod::meshed(&[]);
    let _proxy = pod.proxy();
    let _node = pod.node_server(&NODE_PORTS);
    assert_answer(pod.dial_from_pod(PROXY, &hp(GW4, 8080)), "node", None);
    assert_answer(pod.dial_from_pod(PROXY, &hp(GW6, 8080)), "node", None);
    // Another uid in the proxy's group (Istio's TPROXY-mode proxy runs that way).
    let by_gid = Ident {
        uid: 2000,
        gid: PROXY_UID,
    };
    assert_answer(pod.dial_from_pod(by_gid, &hp(GW4, 8080)), "node", None);
    assert_answer(pod.dial_from_pod(by_gid, &hp(GW6, 8080)), "node", None);
}

#[test]
fn excluded_cidr_excluded_port_and_localhost_are_not_captured() {
    let pod = Pod::meshed(&[
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.88.0.1/32, fd88::1",
        ),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "3306"),
    ]);
    let _proxy = pod.proxy();
    let _node = pod.node_server(&NODE_PORTS);
    let _app = pod.app_server(&[9000]);
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 8080)), "node", None);
    assert_answer(pod.dial_from_pod(APP, &hp(GW6, 8080)), "node", None);
    // Not excluded: captured.
    assert_answer(
        pod.dial_from_pod(APP, "203.0.113.9:443"),
        "proxy",
        Some("203.0.113.9:443"),
    );
    // Localhost.
    assert_answer(pod.dial_from_pod(APP, "127.0.0.1:9000"), "app", None);
    assert_answer(pod.dial_from_pod(APP, "[::1]:9000"), "app", None);
}

#[test]
fn excluded_outbound_port_goes_straight_out() {
    let pod = Pod::meshed(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "3306")]);
    let _proxy = pod.proxy();
    let _node = pod.node_server(&NODE_PORTS);
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 3306)), "node", None);
    assert_answer(pod.dial_from_pod(APP, &hp(GW6, 3306)), "node", None);
    // The annotation replaced the default: 15020 is captured now.
    assert_answer(
        pod.dial_from_pod(APP, &hp(GW4, 15020)),
        "proxy",
        Some("10.88.0.1:15020"),
    );
}

#[test]
fn default_excluded_outbound_port_15020() {
    let pod = Pod::meshed(&[]);
    let _proxy = pod.proxy();
    let _node = pod.node_server(&NODE_PORTS);
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 15020)), "node", None);
}

#[test]
fn include_outbound_ranges_limits_capture_and_include_ports_reach_past_it() {
    let pod = Pod::meshed(&[
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.96.0.0/12, fd99::/64",
        ),
        ("traffic.sidecar.istio.io/includeOutboundPorts", "8081"),
    ]);
    let _proxy = pod.proxy();
    let _node = pod.node_server(&NODE_PORTS);
    // Inside the included ranges: captured.
    assert_answer(
        pod.dial_from_pod(APP, "10.96.0.10:80"),
        "proxy",
        Some("10.96.0.10:80"),
    );
    assert_answer(
        pod.dial_from_pod(APP, "[fd99::10]:80"),
        "proxy",
        Some("[fd99::10]:80"),
    );
    // Outside: straight to the node.
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 8080)), "node", None);
    assert_answer(pod.dial_from_pod(APP, &hp(GW6, 8080)), "node", None);
    // An included port is captured whatever the destination.
    assert_answer(
        pod.dial_from_pod(APP, &hp(GW4, 8081)),
        "proxy",
        Some("10.88.0.1:8081"),
    );
    assert_answer(
        pod.dial_from_pod(APP, &hp(GW6, 8081)),
        "proxy",
        Some("[fd88::1]:8081"),
    );
}

#[test]
fn empty_include_outbound_ranges_captures_no_outbound() {
    let pod = Pod::meshed(&[("traffic.sidecar.istio.io/includeOutboundIPRanges", "")]);
    let _proxy = pod.proxy();
    let _node = pod.node_server(&NODE_PORTS);
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 8080)), "node", None);
    assert_answer(pod.dial_from_pod(APP, &hp(GW6, 8080)), "node", None);
}

#[test]
fn inbound_is_captured_to_15006_with_its_original_destination() {
    let pod = Pod::meshed(&[]);
    let _proxy = pod.proxy();
    let _app = pod.app_server(&[8080]);
    let orig4 = hp(&pod.ip4, 8080);
    assert_answer(pod.dial_from_node(&orig4), "proxy", Some(&orig4));
    let line = pod.dial_from_node(&orig4).unwrap();
    assert!(line.contains("port=15006"), "{line}");
    let orig6 = hp(&pod.ip6, 8080);
    assert_answer(pod.dial_from_node(&orig6), "proxy", Some(&orig6));
}

#[test]
fn excluded_and_istio_inbound_ports_are_not_captured() {
    let pod = Pod::meshed(&[("traffic.sidecar.istio.io/excludeInboundPorts", "9000")]);
    let _proxy = pod.proxy();
    let _app = pod.app_server(&[8080, 9000, 15008, 15020, 15021, 15090]);
    for port in [9000, 15008, 15020, 15021, 15090] {
        assert_answer(pod.dial_from_node(&hp(&pod.ip4, port)), "app", None);
        assert_answer(pod.dial_from_node(&hp(&pod.ip6, port)), "app", None);
    }
    assert_answer(pod.dial_from_node(&hp(&pod.ip4, 8080)), "proxy", None);
}

#[test]
fn include_inbound_ports_list_captures_only_those() {
    let pod = Pod::meshed(&[("traffic.sidecar.istio.io/includeInboundPorts", "8080")]);
    let _proxy = pod.proxy();
    let _app = pod.app_server(&[8080, 8081]);
    assert_answer(
        pod.dial_from_node(&hp(&pod.ip4, 8080)),
        "proxy",
        Some(&hp(&pod.ip4, 8080)),
    );
    assert_answer(
        pod.dial_from_node(&hp(&pod.ip6, 8080)),
        "proxy",
        Some(&hp(&pod.ip6, 8080)),
    );
    assert_answer(pod.dial_from_node(&hp(&pod.ip4, 8081)), "app", None);
    assert_answer(pod.dial_from_node(&hp(&pod.ip6, 8081)), "app", None);
}

#[test]
fn empty_include_inbound_ports_captures_no_inbound() {
    let pod = Pod::meshed(&[("traffic.sidecar.istio.io/includeInboundPorts", "")]);
    let _proxy = pod.proxy();
    let _app = pod.app_server(&[8080]);
    let _node = pod.node_server(&NODE_PORTS);
    assert_answer(pod.dial_from_node(&hp(&pod.ip4, 8080)), "app", None);
    assert_answer(pod.dial_from_node(&hp(&pod.ip6, 8080)), "app", None);
    // Outbound is still captured.
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 8080)), "proxy", None);
}

#[test]
fn excluded_interface_bypasses_capture_both_ways() {
    let pod = Pod::meshed(&[("traffic.sidecar.istio.io/excludeInterfaces", "eth0")]);
    let _proxy = pod.proxy();
    let _app = pod.app_server(&[8080]);
    let _node = pod.node_server(&NODE_PORTS);
    assert_answer(pod.dial_from_node(&hp(&pod.ip4, 8080)), "app", None);
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 8080)), "node", None);
    assert_answer(pod.dial_from_pod(APP, &hp(GW6, 8080)), "node", None);
}

#[test]
fn proxy_calling_the_pods_own_address_goes_to_inbound() {
    let pod = Pod::meshed(&[]);
    let _proxy = pod.proxy();
    let _app = pod.app_server(&[8080]);
    // The proxy (uid 1337) dialling the pod IP leaves on lo: redirected to the inbound port.
    let line = pod.dial_from_pod(PROXY, &hp(&pod.ip4, 8080)).unwrap();
    assert!(line.starts_with("proxy port=15006"), "{line}");
    // The app dialling its own pod IP is not captured.
    assert_answer(pod.dial_from_pod(APP, &hp(&pod.ip4, 8080)), "app", None);
}

#[test]
fn pod_without_sidecar_gets_no_table() {
    let pod = Pod::with(
        Some(serde_json::json!({"app": "web"})),
        serde_json::json!({}),
    )
    .unwrap();
    assert!(!pod.pod.has_table());
    let _node = pod.node_server(&NODE_PORTS);
    assert_answer(pod.dial_from_pod(APP, &hp(GW4, 8080)), "node", None);
}

#[test]
fn excluded_namespace_gets_no_table() {
    let ann = serde_json::json!({STATUS: "{}"});
    let pod = Pod::build(
        Some(ann.clone()),
        serde_json::json!({}),
        "1.0.0",
        "kube-system",
    )
    .unwrap();
    assert!(!pod.pod.has_table());
    let pod = Pod::build(
        Some(ann),
        serde_json::json!({"excludeNamespaces": ["tools"]}),
        "1.0.0",
        "tools",
    )
    .unwrap();
    assert!(!pod.pod.has_table());
}

#[test]
fn custom_proxy_ids_and_ports_from_plugin_config() {
    let mesh = serde_json::json!({"proxyUID": 4242, "proxyGID": 4242, "outboundPort": 7001, "inboundPort": 7006});
    let pod = Pod::with(Some(serde_json::json!({STATUS: "{}"})), mesh).unwrap();
    let proxy = Ident {
        uid: 4242,
        gid: 4242,
    };
    let _proxy = serve(&pod.pod.path(), proxy, "proxy", &[7001, 7006], &[]);
    let _node = pod.node_server(&NODE_PORTS);
    assert_answer(
        pod.dial_from_pod(APP, &hp(GW4, 8080)),
        "proxy",
        Some("10.88.0.1:8080"),
    );
    assert_answer(pod.dial_from_pod(proxy, &hp(GW4, 8080)), "node", None);
    let line = pod.dial_from_node(&hp(&pod.ip4, 8080)).unwrap();
    assert!(line.starts_with("proxy port=7006"), "{line}");
}
