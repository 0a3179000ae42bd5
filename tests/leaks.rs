//! ADD/DEL 1,000 times on one namespace, in-process through the library (so file descriptors
//! and memory are this process's own: this file holds one test, so nothing else runs beside
//! it), then through the binary: nothing leaks, nothing is left in the kernel.

use common::*;
use mesh_redirect::kernel::Kernel;
use mesh_redirect::netns::Netns as PodNetns;
use mesh_redirect::ruleset::Ruleset;
use serde_json::Value;
use std::path::Path;

fn plugin(cmd: &str, netns: &str, conf: &Value) -> bool {
    invoke(cmd, netns, conf.to_string().as_bytes(), &[]).0
}

fn add(netns: &str, conf: &Value) -> (bool, Value) {
    invoke("ADD", netns, conf.to_string().as_bytes(), &[])
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
        let conf = meshed_conf(&[(
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
            k.delete(None)
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
    let conf = meshed_conf(&[]);
    for _ in 0..100 {
        assert!(add(&ns.path(), &conf).0);
        assert!(plugin("DEL", &ns.path(), &conf));
    }
    assert_eq!(ns.exec(&["nft", "list", "ruleset"]).trim(), "");
}
