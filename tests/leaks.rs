//! ADD/DEL 1,000 times on one namespace, in-process through the library (so file descriptors
//! and memory are this process's own: this file holds one test, so nothing else runs beside
//! it), then through the binary: nothing leaks, nothing is left in the kernel.

mod common;

use common::*;
use mesh_redirect::kernel::Kernel;
use mesh_redirect::netns::Netns as PodNetns;
use mesh_redirect::ruleset::Ruleset;
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn add_conf(extra: &[(&str, &str)]) -> Value {
    let mut ann = json!({STATUS: "{}"});
    for (k, v) in extra {
        ann[*k] = json!(v);
    }
    json!({"cniVersion": "1.0.0", "name": "k8s", "type": "mesh-redirect",
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": ann},
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}})
}

fn plugin(cmd: &str, netns: &str, conf: &Value) -> bool {
    let mut child = Command::new(PLUGIN)
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", "leak-test")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let _ = pipe.write_all(conf.to_string().as_bytes());
    drop(pipe);
    child.wait().unwrap().success()
}

fn add(netns: &str, conf: &Value) -> (bool, Value) {
    (plugin("ADD", netns, conf), Value::Null)
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn add_del_loop_1000_times_leaks_nothing() {
    require_root();
    let ns = Netns::new("mrt-loop-");
    let pod = PodNetns::open(Path::new(&ns.path())).unwrap();
    let rs = mesh_redirect::plugin::default_ruleset();
    let many: Vec<String> = (0..2000)
        .map(|i| format!("10.{}.{}.0/24", i / 128, (i % 128) * 2))
        .collect();
    let big = {
        let conf = add_conf(&[(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            &many.join(","),
        )]);
        let ann = mesh_redirect::config::pod_annotations(conf.as_object().unwrap())
            .unwrap()
            .unwrap();
        let pod = mesh_redirect::policy::Pod {
            annotations: Some(&ann),
            ..Default::default()
        };
        match mesh_redirect::policy::decide(&Default::default(), &pod).unwrap() {
            mesh_redirect::policy::Decision::Capture(p) => mesh_redirect::ruleset::build(&p),
            _ => unreachable!(),
        }
    };
    let cycle = |rs: &Ruleset| {
        pod.run(|| {
            let mut k = Kernel::open()?;
            k.replace(rs)?;
            k.delete(None, false)
        })
        .unwrap()
        .unwrap()
    };
    // Warm up (allocator pools, lazily loaded modules), then measure.
    for _ in 0..20 {
        cycle(&big);
    }
    let (fds, rss) = (fd_count(), rss_kib());
    for i in 0..1000 {
        assert!(
            cycle(if i % 2 == 0 { &rs } else { &big }),
            "the table existed before DEL"
        );
    }
    assert_eq!(fd_count(), fds, "file descriptors leaked");
    let grown = rss_kib().saturating_sub(rss);
    assert!(
        grown < 2048,
        "RSS grew by {grown} KiB over 1,000 ADD/DEL cycles"
    );
    eprintln!(
        "1,000 in-process ADD/DEL cycles: fds {fds} -> {}, RSS {rss} KiB -> {} KiB",
        fd_count(),
        rss_kib()
    );
    // And nothing is left in the kernel.
    assert_eq!(ns.exec(&["nft", "list", "ruleset"]).trim(), "");
    // The binary, the way the runtime runs it, 200 more times (each a fresh process).
    let conf = add_conf(&[]);
    for _ in 0..100 {
        assert!(add(&ns.path(), &conf).0);
        assert!(plugin("DEL", &ns.path(), &conf));
    }
    assert_eq!(ns.exec(&["nft", "list", "ruleset"]).trim(), "");
}
