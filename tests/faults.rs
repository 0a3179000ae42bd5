//! Faults and load against the real kernel: namespaces that vanish, kernels that refuse half a
//! batch, concurrent and repeated invocations, bad stdin and environment.

use common::*;
use mesh_redirect::kernel::Kernel;
use mesh_redirect::netns::Netns as PodNetns;
use mesh_redirect::ruleset::{Action, Chain, ChainKind, Hook, HookPoint, Match, Rule, Ruleset};
use serde_json::Value;
use std::path::Path;

fn plugin(cmd: &str, netns: &str, stdin: &[u8], env: &[(&str, &str)]) -> (bool, Value) {
    invoke(cmd, netns, stdin, env)
}

fn add(netns: &str, conf: &Value) -> (bool, Value) {
    plugin("ADD", netns, conf.to_string().as_bytes(), &[])
}

#[test]
fn netns_vanishing_during_add_is_success_or_101_never_half() {
    require_root();
    let conf = meshed_conf(&[]);
    let mut outcomes = (0, 0);
    for i in 0..60u64 {
        let ns = Netns::new("mrt-vanish-");
        let path = ns.path();
        let adder = {
            let (path, conf) = (path.clone(), conf.clone());
            std::thread::spawn(move || add(&path, &conf))
        };
        // Delete it at a different moment each time (0-6 ms after the exec), so the race falls
        // before the open, between the open and the commit, and after the commit.
        std::thread::sleep(std::time::Duration::from_micros(i * 100));
        drop(ns); // ip netns del, racing the ADD
        let (ok, out) = adder.join().unwrap();
        if ok {
            outcomes.0 += 1;
        } else {
            assert_eq!(out["code"], 101, "{out}");
            outcomes.1 += 1;
        }
    }
    // Both sides of the race happen on this machine often enough to mean something.
    eprintln!(
        "vanishing netns: {} ADDs won the race, {} got 101",
        outcomes.0, outcomes.1
    );
}

#[test]
fn dangling_symlink_and_directory_netns_paths_are_101() {
    require_root();
    let tmp = TempDir::new();
    let link = tmp.path().join("ns-link");
    std::os::unix::fs::symlink("/run/netns/definitely-gone", &link).unwrap();
    let dir = tmp.path().join("a-dir");
    std::fs::create_dir(&dir).unwrap();
    for p in [link, dir] {
        let (ok, out) = add(&p.to_string_lossy(), &meshed_conf(&[]));
        assert!(!ok);
        assert_eq!(out["code"], 101, "{}: {out}", p.display());
        assert!(
            out["msg"].as_str().unwrap().contains(&*p.to_string_lossy()),
            "{out}"
        );
    }
    let (ok, _) = add("relative/path", &meshed_conf(&[]));
    assert!(!ok);
}

/// A ruleset the kernel accepts up to its last rule, which it refuses: `redirect` is only
/// allowed in nat chains, and this one sits in a filter chain after sets, chains and rules.
fn refused_halfway() -> Ruleset {
    let mut rs = mesh_redirect::plugin::default_ruleset();
    rs.chains.push(Chain {
        name: "bogus",
        hook: Some(Hook {
            kind: ChainKind::Filter,
            point: HookPoint::Output,
            priority: 0,
        }),
        rules: vec![
            Rule {
                matches: vec![Match::L4Proto(mesh_redirect::ruleset::L4::Tcp)],
                action: Action::Accept,
                comment: "fine",
            },
            Rule {
                matches: vec![],
                action: Action::Redirect(1),
                comment: "refused: nat statement in a filter chain",
            },
        ],
    });
    rs
}

#[test]
fn kernel_refusing_the_batch_halfway_leaves_no_partial_table() {
    require_root();
    let ns = Netns::new("mrt-half-");
    let pod = PodNetns::open(Path::new(&ns.path())).unwrap();
    // Into an empty namespace: nothing at all is left.
    let err = pod
        .run(|| Kernel::open().and_then(|mut k| k.replace(&refused_halfway())))
        .unwrap()
        .expect_err("the kernel must refuse");
    let msg = err.to_string();
    assert!(msg.contains("rule 2 of chain bogus"), "{msg}");
    assert!(!ns.has_table(), "no partial table: {}", ns.ruleset());
    // Over a good table: the good table is untouched (same handles, same content).
    let good = mesh_redirect::plugin::default_ruleset();
    pod.run(|| Kernel::open().and_then(|mut k| k.replace(&good)))
        .unwrap()
        .unwrap();
    let before = ns.ruleset();
    pod.run(|| Kernel::open().and_then(|mut k| k.replace(&refused_halfway())))
        .unwrap()
        .expect_err("refused again");
    assert_eq!(ns.ruleset(), before);
}

#[test]
fn concurrent_adds_on_one_netns_end_with_one_whole_table() {
    require_root();
    let a = meshed_conf(&[(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "10.0.0.0/8",
    )]);
    let b = meshed_conf(&[("traffic.sidecar.istio.io/includeInboundPorts", "80,443")]);
    for _ in 0..25 {
        let ns = Netns::new("mrt-race-");
        let path = ns.path();
        let ta = {
            let (p, c) = (path.clone(), a.clone());
            std::thread::spawn(move || add(&p, &c))
        };
        let tb = {
            let (p, c) = (path.clone(), b.clone());
            std::thread::spawn(move || add(&p, &c))
        };
        assert!(
            ta.join().unwrap().0 && tb.join().unwrap().0,
            "both ADDs succeed"
        );
        assert_eq!(ns.ruleset().matches("table inet mesh_redirect").count(), 1);
        // Whichever committed last, the table is exactly that one's plan.
        let check = |c: &Value| plugin("CHECK", &path, c.to_string().as_bytes(), &[]).0;
        assert!(
            check(&a) ^ check(&b),
            "exactly one plan matches: {}",
            ns.ruleset()
        );
    }
}

#[test]
fn two_hundred_concurrent_adds_on_distinct_netns_all_land() {
    require_root();
    let conf = meshed_conf(&[(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "169.254.169.254",
    )]);
    let namespaces: Vec<Netns> = (0..200).map(|_| Netns::new("mrt-many-")).collect();
    let handles: Vec<_> = namespaces
        .iter()
        .map(|ns| {
            let (p, c) = (ns.path(), conf.clone());
            std::thread::spawn(move || add(&p, &c))
        })
        .collect();
    let results: Vec<(bool, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let failed: Vec<&Value> = results
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, v)| v)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 failed: {:?}",
        failed.len(),
        failed.first()
    );
    for ns in &namespaces {
        assert!(
            plugin("CHECK", &ns.path(), conf.to_string().as_bytes(), &[]).0,
            "{}",
            ns.name
        );
    }
}

#[test]
fn stdin_closed_early_or_huge_is_a_clear_decode_error() {
    require_root();
    let ns = Netns::new("mrt-stdin-");
    let (ok, out) = plugin("ADD", &ns.path(), b"", &[]);
    assert!(!ok);
    assert_eq!(out["code"], 6, "{out}");
    let (ok, out) = plugin("ADD", &ns.path(), br#"{"cniVersion":"1.0.0","name":"#, &[]);
    assert!(!ok);
    assert_eq!(out["code"], 6);
    // 64 MiB of JSON whitespace: read no further than the bound, then say so.
    let huge = vec![b' '; 64 << 20];
    let (ok, out) = plugin("ADD", &ns.path(), &huge, &[]);
    assert!(!ok);
    assert_eq!(out["code"], 6, "{out}");
    assert!(
        out["msg"].as_str().unwrap().contains("larger than 8 MiB"),
        "{out}"
    );
    assert!(!ns.has_table());
}

#[test]
fn cni_path_and_ifname_oddities() {
    require_root();
    let ns = Netns::new("mrt-env-");
    let conf = meshed_conf(&[]).to_string();
    // CNI_PATH is required but never used to run anything: odd values are fine.
    for path in ["/nonexistent", "/a:/b::/c", " "] {
        assert!(
            plugin("ADD", &ns.path(), conf.as_bytes(), &[("CNI_PATH", path)]).0,
            "{path:?}"
        );
    }
    let (ok, out) = plugin("ADD", &ns.path(), conf.as_bytes(), &[("CNI_PATH", "")]);
    assert!(!ok);
    assert_eq!(out["code"], 4);
    for ifname in ["", "a/b", "x".repeat(16).as_str(), "eth 0", "..", "eth0:1"] {
        let (ok, out) = plugin(
            "ADD",
            &ns.path(),
            conf.as_bytes(),
            &[("CNI_IFNAME", ifname)],
        );
        assert!(!ok, "{ifname:?}");
        assert_eq!(out["code"], 4, "{ifname:?}: {out}");
    }
    // A chained plugin's CNI_IFNAME is the primary's interface; any valid name works.
    assert!(
        plugin(
            "ADD",
            &ns.path(),
            conf.as_bytes(),
            &[("CNI_IFNAME", "net1")]
        )
        .0
    );
}
