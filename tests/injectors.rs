//! Pods as the meshes' injectors really write them (issue 21), through the real chain (the
//! reference `bridge` + `host-local`, then mesh-redirect, run as libcni runs them), proven with
//! traffic. Each pod's annotations are taken from the mesh's own injector goldens:
//! - Istio (istio/istio 86c9f01, `pkg/kube/inject/testdata/inject/*.injected`): the gateway
//!   template, init-container mode, CNI mode with `istio-validation` (classic and native
//!   sidecars), KubeVirt's rerouted interfaces, and per-pod proxy metadata;
//! - Kuma 2.x (kumahq/kuma v2.14.3 = 0c7aaec, the injector's `inject.34` golden with the
//!   control plane's defaults, other ports and uid): per-key annotations only;
//! - Linkerd (linkerd/linkerd2 b24cd40, the proxy injector's `pod.patch.json` golden and the
//!   multicluster gateway's template).

use common::vm::{self, Vm};
use common::*;
use serde_json::{Value, json};

const TEMPLATES: &str = "inject.istio.io/templates";
const REROUTE: &str = "istio.io/reroute-virtual-interfaces";
const KUBEVIRT: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
const PROXY_CONFIG: &str = "proxy.istio.io/config";
const INCLUDE_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";

/// `sidecar.istio.io/status` as the injector writes it.
fn status(init: &str, containers: &str) -> String {
    format!(
        r#"{{"initContainers":{init},"containers":{containers},"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}}"#
    )
}

/// The annotations Istio's injector writes in CNI mode (`hello.yaml.cni.injected`), with the
/// status `st` and `extra` added.
fn istio_cni(st: &str, extra: &[(&str, &str)]) -> Value {
    let mut a = json!({
        STATUS: st,
        "sidecar.istio.io/interceptionMode": "REDIRECT",
        "traffic.sidecar.istio.io/excludeInboundPorts": "15020",
        "traffic.sidecar.istio.io/includeInboundPorts": "*",
        INCLUDE_RANGES: "*",
    });
    for (k, v) in extra {
        a[*k] = json!(v);
    }
    a
}

fn pod(ann: Value, entry: Value) -> Pod {
    Pod::with(Some(ann), entry).unwrap_or_else(|e| panic!("ADD: {e}"))
}

/// Istio's `istio-validation`, as the init container runs it (uid 1337): its exit code.
fn istio_validation(p: &Pod) -> i32 {
    std::process::Command::new(probe())
        .args(["--netns", &p.pod.path(), "--uid", "1337", "--gid", "1337"])
        .args(["validate", "istio"])
        .status()
        .expect("capture-probe validate")
        .code()
        .unwrap_or(-1)
}

/// An app's connection from the pod and one from the node to the app: (out, in).
fn outcomes(p: &Pod) -> (String, String) {
    let _proxy = p.proxy();
    let _app = p.app_server(&[8080]);
    let _node = p.node_server(&[8080]);
    (
        vm::describe(p.dial_from_pod(APP, &hp(GW4, 8080))),
        vm::describe(p.dial_from_node(&hp(&p.ip4, 8080))),
    )
}

fn captured(p: &Pod) {
    let (out, inb) = outcomes(p);
    assert_eq!(out, format!("proxy:15001 orig={}", hp(GW4, 8080)));
    assert_eq!(inb, format!("proxy:15006 orig={}", hp(&p.ip4, 8080)));
}

fn left_alone(p: &Pod) {
    assert!(!p.pod.has_table(), "{}", p.pod.ruleset());
    let (out, inb) = outcomes(p);
    assert_eq!((out.as_str(), inb.as_str()), ("node:8080", "app:8080"));
    // CHECK agrees: not captured, no table.
    p.check().expect("CHECK");
}

#[test]
fn istio_gateways_and_init_container_pods_are_left_alone() {
    // gateway.yaml.injected: the gateway template; the proxy runs as a router.
    left_alone(&pod(
        json!({TEMPLATES: "gateway", STATUS: status("null", r#"["istio-proxy"]"#)}),
        json!({}),
    ));
    // hello-old-version.yaml.injected: istio-init writes the pod's own rules.
    left_alone(&pod(
        json!({STATUS: status(r#"["istio-init"]"#, r#"["istio-proxy"]"#)}),
        json!({}),
    ));
    // hello.yaml.injected (native, no CNI): istio-init among the init containers too.
    left_alone(&pod(
        json!({STATUS: status(r#"["istio-init","istio-proxy"]"#, "null")}),
        json!({}),
    ));
    // custom-template.yaml.injected: the injector added no proxy.
    left_alone(&pod(
        json!({STATUS: status("null", r#"["hello"]"#)}),
        json!({}),
    ));
}

#[test]
fn istio_cni_mode_pods_are_captured_and_pass_istio_validation() {
    // hello.yaml.cni.injected@1.26.0 (classic sidecar) and @86c9f01 (native sidecar: the
    // proxy among the init containers, `containers: null`).
    for st in [
        status(r#"["istio-validation"]"#, r#"["istio-proxy"]"#),
        status(r#"["istio-validation","istio-proxy"]"#, "null"),
    ] {
        let p = pod(istio_cni(&st, &[]), json!({}));
        assert_eq!(istio_validation(&p), 0, "{st}");
        captured(&p);
        p.check().expect("CHECK");
    }
}

/// KubeVirt: a VM's connection entering the virt-launcher pod on a rerouted interface reaches
/// the proxy's outbound port with its original destination; the interface did not exist at ADD.
#[test]
fn a_vm_connection_on_a_rerouted_interface_reaches_the_proxy() {
    let st = status(r#"["istio-validation"]"#, r#"["istio-proxy"]"#);
    for key in [REROUTE, KUBEVIRT] {
        let p = pod(istio_cni(&st, &[(key, "k6t-eth0")]), json!({}));
        let vm = Vm::attach(&p, "k6t-eth0", 1);
        {
            let _proxy = p.proxy();
            let _node = p.node_server(&[8080]);
            assert_eq!(
                vm.dial(&hp(GW4, 8080)),
                format!("proxy:15001 orig={}", hp(GW4, 8080)),
                "{key}"
            );
            assert_eq!(
                vm.dial(&hp(GW6, 8080)),
                format!("proxy:15001 orig={}", hp(GW6, 8080)),
                "{key}"
            );
        }
        // The pod's own traffic is as ever.
        captured(&p);
        p.check().expect("CHECK");
    }
    // Include ranges narrowed: only those destinations go to the proxy; the VM's other
    // traffic is forwarded as it is (and never captured as inbound).
    let p = pod(
        istio_cni(
            &st,
            &[(REROUTE, "k6t-eth0"), (INCLUDE_RANGES, "10.96.0.0/12")],
        ),
        json!({}),
    );
    let vm = Vm::attach(&p, "k6t-eth0", 1);
    let _proxy = p.proxy();
    let _node = p.node_server(&[8080]);
    assert_eq!(vm.dial("10.96.0.10:80"), "proxy:15001 orig=10.96.0.10:80");
    assert_eq!(vm.dial(&hp(GW4, 8080)), "node:8080");
    // A rerouted interface that is not there: nothing else changes.
    let none = pod(istio_cni(&st, &[(REROUTE, "net9")]), json!({}));
    captured(&none);
}

#[test]
fn proxy_config_turns_dns_capture_on_or_off_for_the_pod() {
    let st = status(r#"["istio-validation"]"#, r#"["istio-proxy"]"#);
    let dns = |p: &Pod| {
        let _proxy = serve(
            &p.pod.path(),
            PROXY,
            "proxy",
            &[15001, 15006],
            &["--udp", "15053"],
        );
        let _node = serve(&p.node.path(), ROOT, "node", &[8080], &["--udp", "53"]);
        udp(&p.pod.path(), APP, &hp(GW4, 53))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .unwrap_or_else(|e| e)
    };
    // On for this pod (the entry says nothing): the app's DNS goes to the proxy.
    let on = pod(
        istio_cni(
            &st,
            &[(
                PROXY_CONFIG,
                "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
            )],
        ),
        json!({}),
    );
    assert_eq!(dns(&on), "proxy");
    // Off for this pod, though the entry turns it on mesh-wide: the pod wins.
    let off = pod(
        istio_cni(
            &st,
            &[(
                PROXY_CONFIG,
                "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"false\"}",
            )],
        ),
        json!({"captureDNS": true}),
    );
    assert_eq!(dns(&off), "node");
    // The entry alone.
    let mesh_wide = pod(istio_cni(&st, &[]), json!({"captureDNS": true}));
    assert_eq!(dns(&mesh_wide), "proxy");
    // ISTIO_DUAL_STACK false: IPv6 left alone for this pod.
    let v4 = pod(
        istio_cni(
            &st,
            &[(PROXY_CONFIG, "proxyMetadata: {ISTIO_DUAL_STACK: \"false\"}")],
        ),
        json!({}),
    );
    let _proxy = v4.proxy();
    let _node = v4.node_server(&[8080]);
    assert_eq!(
        vm::describe(v4.dial_from_pod(APP, &hp(GW6, 8080))),
        "node:8080"
    );
    assert!(vm::describe(v4.dial_from_pod(APP, &hp(GW4, 8080))).starts_with("proxy:15001"));
}

/// Kuma 2.x, per-key annotations only (no YAML), with ports and a uid of its own: the pod
/// starts, and its ports, uid and DNS settings are honoured.
#[test]
fn a_kuma_2x_pod_with_only_per_key_annotations_is_captured_with_its_settings() {
    let ann = json!({
        "k8s.v1.cni.cncf.io/networks": "kuma-cni",
        "kuma.io/application-probe-proxy-port": "9001",
        "kuma.io/builtin-dns": "enabled",
        "kuma.io/builtin-dns-logging": "false",
        "kuma.io/builtin-dns-port": "25053",
        "kuma.io/envoy-admin-port": "9901",
        "kuma.io/sidecar-injected": "true",
        "kuma.io/sidecar-uid": "2345",
        "kuma.io/transparent-proxying": "enabled",
        "kuma.io/transparent-proxying-inbound-port": "15055",
        "kuma.io/transparent-proxying-ip-family-mode": "ipv4",
        "kuma.io/transparent-proxying-outbound-port": "15001",
        "kuma.io/virtual-probes": "disabled",
        "kuma.io/virtual-probes-port": "9000",
    });
    let p = pod(ann, json!({"mesh": "kuma"}));
    let kuma_dp = Ident {
        uid: 2345,
        gid: 2345,
    };
    let _proxy = serve(
        &p.pod.path(),
        kuma_dp,
        "proxy",
        &[15001, 15055],
        &["--udp", "25053"],
    );
    let _app = p.app_server(&[8080, 9001]);
    let _node = serve(
        &p.node.path(),
        ROOT,
        "node",
        &[8080, 9901],
        &["--udp", "53"],
    );
    let out = vm::describe(p.dial_from_pod(APP, &hp(GW4, 8080)));
    assert_eq!(out, format!("proxy:15001 orig={}", hp(GW4, 8080)));
    // The sidecar's uid goes out as it is.
    assert_eq!(
        vm::describe(p.dial_from_pod(kuma_dp, &hp(GW4, 8080))),
        "node:8080"
    );
    // kuma-cni's default outbound exclusion (the admin port 9901) and the probe proxy port.
    assert_eq!(
        vm::describe(p.dial_from_pod(APP, &hp(GW4, 9901))),
        "node:9901"
    );
    assert_eq!(
        vm::describe(p.dial_from_node(&hp(&p.ip4, 8080))),
        format!("proxy:15055 orig={}", hp(&p.ip4, 8080))
    );
    assert_eq!(
        vm::describe(p.dial_from_node(&hp(&p.ip4, 9001))),
        "app:9001"
    );
    // DNS to the builtin DNS port; IPv6 left alone (ipv4 mode).
    let dns = udp(&p.pod.path(), APP, &hp(GW4, 53)).unwrap_or_default();
    assert!(dns.starts_with("proxy"), "{dns}");
    assert_eq!(
        vm::describe(p.dial_from_pod(APP, &hp(GW6, 8080))),
        "node:8080"
    );
    p.check().expect("CHECK");
}

/// Linkerd: a meshed pod as the proxy injector writes it (`pod.patch.json`), and the
/// multicluster gateway (its template's annotations plus the injector's): both captured, as
/// linkerd-cni captures any pod with a proxy.
#[test]
fn linkerd_pods_and_the_multicluster_gateway_are_captured() {
    let injected = json!({
        "linkerd.io/proxy-version": "dev-undefined",
        "linkerd.io/trust-root-sha256": "5090806b32d5a9e7a4b7e79a9b8bb0f1c2fbd8f5b3e5cdb4fd1c6f1a9b1e2c3d",
    });
    let mut gateway = injected.clone();
    for (k, v) in [
        ("linkerd.io/inject", "enabled"),
        (
            "config.linkerd.io/proxy-require-identity-inbound-ports",
            "4143",
        ),
        ("config.linkerd.io/enable-gateway", "true"),
        (
            "config.linkerd.io/default-inbound-policy",
            "all-authenticated",
        ),
        ("cluster-autoscaler.kubernetes.io/safe-to-evict", "true"),
    ] {
        gateway[k] = json!(v);
    }
    for ann in [injected, gateway] {
        let p = pod(ann.clone(), json!({"mesh": "linkerd"}));
        let l5d = Ident {
            uid: 2102,
            gid: 2102,
        };
        let _proxy = serve(&p.pod.path(), l5d, "proxy", &[4140, 4143], &[]);
        let _node = p.node_server(&[8080]);
        let _app = p.app_server(&[8080]);
        assert_eq!(
            vm::describe(p.dial_from_pod(APP, &hp(GW4, 8080))),
            format!("proxy:4140 orig={}", hp(GW4, 8080)),
            "{ann}"
        );
        assert_eq!(
            vm::describe(p.dial_from_node(&hp(&p.ip4, 8080))),
            format!("proxy:4143 orig={}", hp(&p.ip4, 8080)),
            "{ann}"
        );
        p.check().expect("CHECK");
    }
}
