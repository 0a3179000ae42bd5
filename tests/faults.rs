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

/// How an ADD that raced the deletion of its netns may end; nothing else is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raced {
    /// It entered the namespace first: success, prevResult printed unchanged, and the whole
    /// planned table in the namespace (CHECK there passes).
    Added,
    /// The namespace was gone first: code 101 naming the path as gone, and no table in it.
    Gone,
}

/// Which allowed outcome an ADD on `path` had, given its result; panics on anything else.
/// `held` is the namespace, opened by the test before its path went away, so that what the
/// ADD left inside can still be looked at.
#[track_caller]
fn raced(path: &str, held: &std::fs::File, conf: &Value, (ok, out): (bool, Value)) -> Raced {
    use std::os::fd::AsRawFd;
    let inside = format!("/proc/{}/fd/{}", std::process::id(), held.as_raw_fd());
    let table = PodNetns::open(Path::new(&inside))
        .expect("the held namespace")
        .run(|| Kernel::open().and_then(|mut k| k.table_exists()))
        .expect("enter the held namespace")
        .expect("ask its kernel for the table");
    if ok {
        assert_eq!(
            out, conf["prevResult"],
            "a successful ADD prints prevResult"
        );
        assert!(table, "ADD succeeded but left no table in {path}");
        let (whole, why) = plugin("CHECK", &inside, conf.to_string().as_bytes(), &[]);
        assert!(whole, "ADD succeeded but left half a table: {why}");
        Raced::Added
    } else {
        assert_eq!(out["code"], 101, "{out}");
        let msg = out["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains(path) && (msg.contains("does not exist") || msg.contains("torn down")),
            "101 must name the netns and say it is gone: {out}"
        );
        assert!(!table, "ADD failed with 101 but left a table: half an ADD");
        Raced::Gone
    }
}

#[test]
fn netns_vanishing_during_add_is_success_or_101_never_half() {
    require_root();
    let conf = meshed_conf(&[]);
    // One trial: the namespace is deleted (`ip netns del`: unmount, unlink) `delay` after the
    // ADD starts, or before it starts (None), and the ADD's outcome classified.
    let trial = |delay: Option<std::time::Duration>| -> Raced {
        let ns = Netns::new("mrt-vanish-");
        let path = ns.path();
        let held = std::fs::File::open(&path).expect("hold the namespace");
        let Some(delay) = delay else {
            drop(ns);
            return raced(&path, &held, &conf, add(&path, &conf));
        };
        let adder = {
            let (path, conf) = (path.clone(), conf.clone());
            std::thread::spawn(move || add(&path, &conf))
        };
        std::thread::sleep(delay);
        drop(ns); // ip netns del, racing the ADD
        raced(&path, &held, &conf, adder.join().unwrap())
    };
    // The two ends, where the outcome is known: gone before the ADD, and after it.
    assert_eq!(trial(None), Raced::Gone, "deleted before the ADD");
    let ns = Netns::new("mrt-vanish-");
    let held = std::fs::File::open(ns.path()).unwrap();
    let after = raced(&ns.path(), &held, &conf, add(&ns.path(), &conf));
    drop(ns);
    assert_eq!(after, Raced::Added, "deleted after the ADD");
    // In between, at a different moment each time (0-6 ms after the exec), so that the race
    // falls before the open, between the open and the commit, and after the commit: each
    // outcome is one of the two, exactly.
    let mut outcomes = (0, 0);
    for i in 0..60u64 {
        match trial(Some(std::time::Duration::from_micros(i * 100))) {
            Raced::Added => outcomes.0 += 1,
            Raced::Gone => outcomes.1 += 1,
        }
    }
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
    // A relative path is refused before anything is opened: 101, naming it and why.
    let (ok, out) = add("relative/path", &meshed_conf(&[]));
    assert!(!ok);
    assert_eq!(out["code"], 101, "{out}");
    let msg = out["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("relative/path") && msg.contains("not an absolute path"),
        "{out}"
    );
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
