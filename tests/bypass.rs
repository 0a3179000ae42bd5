//! `check-bypass` against real connect-time load balancing: cgroup/connect4|6 BPF programs
//! (tests/bpf/connect_lb.c, compiled here with clang, loaded and attached with bpftool) that
//! rewrite connect() to a service VIP into a backend, as Cilium's socket-LB and Calico eBPF's
//! connect-time LB do, attached to a cgroup v2 directory of the test's own, in which the probe
//! runs. The VIPs and backends are never reached: the probe redirects its connection to its own
//! listener, inside a namespace it (or the test) made.

use common::agent::{Agent, Start};
use common::{Netns, TempDir, plugin, probe, run, sample, unique};
use mesh_redirect::agent::bypass::{self, Outcome};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bpf/connect_lb.c");

const VIP4: &str = "10.96.0.1:443";
const BACKEND4: &str = "10.244.1.7:6443";
const VIP6: &str = "[fd00:96::1]:443";
const BACKEND6: &str = "[fd00:244::7]:6443";

const CILIUM_FIX: &str = "socketLB.hostNamespaceOnly=true";
const CILIUM_FLAG: &str = "bpf-lb-sock-hostns-only";
const CALICO_FIX: &str = "bpfConnectTimeLoadBalancing=Disabled";
const CALICO_TOO: &str = "bpfHostNetworkedNATWithoutCTLB=Enabled";

fn require_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (cgroups, BPF, network namespaces); run scripts/test.sh as root"
    );
    for tool in ["clang", "bpftool", "nft", "ip"] {
        assert!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is missing: run scripts/deps.sh"
        );
    }
}

/// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup when it is cgroup2 itself (a
/// unified host), else the hybrid layout's cgroup2 mount (/sys/fs/cgroup/unified).
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    let v2: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1])
        })
        .collect();
    let pick = v2
        .iter()
        .find(|m| **m == "/sys/fs/cgroup")
        .or_else(|| v2.iter().find(|m| **m == "/sys/fs/cgroup/unified"))
        .or(v2.first())
        .expect("no cgroup2 hierarchy mounted (see /proc/mounts)");
    PathBuf::from(pick)
}

/// One address rewrite, for both families or one.
struct Mapping {
    v4: Option<(SocketAddr, SocketAddr)>,
    v6: Option<(SocketAddr, SocketAddr)>,
    /// Rewrite only in the initial network namespace (Cilium's hostNamespaceOnly).
    hostns_only: bool,
}

impl Mapping {
    fn service(hostns_only: bool) -> Mapping {
        Mapping {
            v4: Some((sa(VIP4), sa(BACKEND4))),
            v6: Some((sa(VIP6), sa(BACKEND6))),
            hostns_only,
        }
    }

    /// clang's -D arguments: host-order numbers, as the C converts them.
    fn defines(&self) -> Vec<String> {
        let mut d = Vec::new();
        let mut ports = None;
        if let Some((vip, backend)) = self.v4 {
            let word = |a: SocketAddr| match a.ip() {
                std::net::IpAddr::V4(ip) => u32::from(ip),
                std::net::IpAddr::V6(_) => panic!("{a} is not IPv4"),
            };
            d.push(format!("-DVIP4={:#x}", word(vip)));
            d.push(format!("-DBACKEND4={:#x}", word(backend)));
            ports = Some((vip.port(), backend.port()));
        }
        if let Some((vip, backend)) = self.v6 {
            let words = |a: SocketAddr| match a.ip() {
                std::net::IpAddr::V6(ip) => ip
                    .octets()
                    .chunks(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<_>>(),
                std::net::IpAddr::V4(_) => panic!("{a} is not IPv6"),
            };
            for (i, (v, b)) in words(vip).into_iter().zip(words(backend)).enumerate() {
                d.push(format!("-DVIP6_{i}={v:#x}"));
                d.push(format!("-DBACKEND6_{i}={b:#x}"));
            }
            assert!(
                ports.is_none_or(|p| p == (vip.port(), backend.port())),
                "one port pair per program"
            );
            ports = Some((vip.port(), backend.port()));
        }
        let (vp, bp) = ports.expect("a mapping rewrites at least one family");
        d.push(format!("-DVIP_PORT={vp}"));
        d.push(format!("-DBACKEND_PORT={bp}"));
        if self.hostns_only {
            d.push("-DHOSTNS_ONLY".into());
        }
        d
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// A cgroup v2 directory of the test's own with connect-time LB programs attached, pinned in
/// a bpffs mounted for it. Dropping detaches the programs, removes the cgroup, unmounts the
/// bpffs (which frees the programs) and removes the temp dir, also when the test panics.
struct ConnectLb {
    cgroup: PathBuf,
    bpffs: PathBuf,
    mounted: bool,
    attached: Vec<(&'static str, PathBuf)>,
    tmp: TempDir,
}

impl ConnectLb {
    fn new() -> ConnectLb {
        let tmp = TempDir::new();
        let cgroup = cgroup2_root().join(unique("mesh-redirect-test-"));
        std::fs::create_dir(&cgroup).expect("create the test's cgroup");
        let bpffs = tmp.path().join("bpffs");
        std::fs::create_dir(&bpffs).expect("bpffs dir");
        let mut lb = ConnectLb {
            cgroup,
            bpffs,
            mounted: false,
            attached: Vec::new(),
            tmp,
        };
        run(&["mount", "-t", "bpf", "bpf", path(&lb.bpffs)]);
        lb.mounted = true;
        lb
    }

    /// Compiles the program for `m`, loads it and attaches both hooks (`multi`: programs
    /// loaded before keep running, in order).
    fn load(&mut self, m: &Mapping) -> &mut ConnectLb {
        let n = self.attached.len();
        let obj = self.tmp.path().join(format!("lb{n}.o"));
        let mut cc = Command::new("clang");
        cc.args(["-target", "bpf", "-O2", "-Wall", "-Werror"]);
        // linux/bpf.h wants asm/types.h, which Debian keeps under the multiarch triplet.
        let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
        if Path::new(&multiarch).is_dir() {
            cc.arg(format!("-I{multiarch}"));
        }
        cc.args(m.defines()).args(["-c", SOURCE, "-o", path(&obj)]);
        let out = cc.output().expect("run clang");
        assert!(
            out.status.success(),
            "clang: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pins = self.bpffs.join(format!("lb{n}"));
        run(&["bpftool", "prog", "loadall", path(&obj), path(&pins)]);
        for (hook, prog) in [("connect4", "connect4"), ("connect6", "connect6")] {
            let pin = pins.join(prog);
            run(&[
                "bpftool",
                "cgroup",
                "attach",
                path(&self.cgroup),
                hook,
                "pinned",
                path(&pin),
                "multi",
            ]);
            self.attached.push((hook, pin));
        }
        self
    }

    /// Runs `cmd` inside the cgroup: a shell moves itself there, then execs it.
    fn run(&self, cmd: &[&str]) -> Output {
        inside(&self.cgroup, cmd, &[])
    }
}

fn inside(cgroup: &Path, cmd: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("sh")
        .args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
        .arg(cgroup)
        .args(cmd)
        .envs(env.iter().copied())
        .output()
        .expect("run in the cgroup")
}

impl ConnectLb {
    /// Detaches every program (the rewriting stops; the cgroup stays).
    fn detach(&mut self) {
        for (hook, pin) in self.attached.drain(..).rev() {
            let _ = Command::new("bpftool")
                .args(["cgroup", "detach", path(&self.cgroup), hook, "pinned"])
                .arg(&pin)
                .output();
        }
    }
}

impl Drop for ConnectLb {
    fn drop(&mut self) {
        self.detach();
        let _ = std::fs::remove_dir(&self.cgroup);
        if self.mounted {
            let _ = Command::new("umount").arg(&self.bpffs).status();
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `mesh-redirect check-bypass ARGS`, as given (the plugin execs the agent beside it).
fn check(args: &[&str]) -> Vec<String> {
    let mut v = vec![plugin().to_string(), "check-bypass".into()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Exit code, stdout, stderr.
fn result(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn outside(cmd: &[&str]) -> (i32, String, String) {
    result(
        Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .expect("run check-bypass"),
    )
}

fn assert_rewritten((code, out, err): (i32, String, String), target: &str, backend: &str) {
    assert_eq!(code, 1, "expected exit 1 (rewritten)\n{out}{err}");
    assert!(out.contains(&format!("target:  {target}")), "{out}");
    assert!(out.contains(&format!("seen:    {backend}")), "{out}");
    assert!(out.contains("REWRITTEN"), "{out}");
    for fix in [CILIUM_FIX, CILIUM_FLAG, CALICO_FIX, CALICO_TOO] {
        assert!(out.contains(fix), "the fix {fix} is not named:\n{out}");
    }
}

fn assert_intact((code, out, err): (i32, String, String), target: &str) {
    assert_eq!(code, 0, "expected exit 0 (not rewritten)\n{out}{err}");
    assert!(out.contains(&format!("seen:    {target} ")), "{out}");
    assert!(out.contains("not rewritten"), "{out}");
    assert!(
        !out.contains("REWRITTEN") && !out.contains(CILIUM_FIX),
        "{out}"
    );
}

#[test]
fn socket_lb_rewrite_is_detected_ipv4() {
    require_tools();
    let mut lb = ConnectLb::new();
    lb.load(&Mapping::service(false));
    assert_rewritten(
        result(lb.run(&strs(&check(&["--target", VIP4])))),
        VIP4,
        BACKEND4,
    );
    // The kubelet's variables are the default target.
    assert_rewritten(
        result(inside(
            &lb.cgroup,
            &strs(&check(&[])),
            &[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ],
        )),
        VIP4,
        BACKEND4,
    );
    // Another port of the VIP is no service: left alone.
    assert_intact(
        result(lb.run(&strs(&check(&["--target", "10.96.0.1:80"])))),
        "10.96.0.1:80",
    );
    // Outside the cgroup nothing rewrites.
    assert_intact(outside(&strs(&check(&["--target", VIP4]))), VIP4);
}

#[test]
fn socket_lb_rewrite_is_detected_ipv6() {
    require_tools();
    let mut lb = ConnectLb::new();
    lb.load(&Mapping::service(false));
    assert_rewritten(
        result(lb.run(&strs(&check(&["--target", VIP6])))),
        VIP6,
        BACKEND6,
    );
    // KUBERNETES_SERVICE_HOST holds a bare IPv6 address.
    assert_rewritten(
        result(inside(
            &lb.cgroup,
            &strs(&check(&[])),
            &[
                ("KUBERNETES_SERVICE_HOST", "fd00:96::1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ],
        )),
        VIP6,
        BACKEND6,
    );
    assert_intact(outside(&strs(&check(&["--target", VIP6]))), VIP6);
}

#[test]
fn host_namespace_only_lb_is_not_reported() {
    require_tools();
    let mut lb = ConnectLb::new();
    lb.load(&Mapping::service(true));
    // A second hostns-only program proves the variant does rewrite in the initial namespace:
    // there, a connect to 127.0.0.2:P reaches this test's listener on 127.0.0.1 (loopback only).
    let backend = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen on loopback");
    let backend_addr = backend.local_addr().expect("listener address");
    let vip: SocketAddr = (Ipv4Addr::new(127, 0, 0, 2), backend_addr.port()).into();
    lb.load(&Mapping {
        v4: Some((vip, backend_addr)),
        v6: None,
        hostns_only: true,
    });
    backend.set_nonblocking(true).expect("nonblocking");
    let answer = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match backend.accept() {
                Ok((mut c, _)) => {
                    let _ = c.write_all(b"backend answered\n");
                    return true;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        false
    });
    let (code, out, err) =
        result(lb.run(&[probe(), "--timeout-ms", "3000", "connect", &vip.to_string()]));
    assert!(answer.join().unwrap_or(false), "nobody reached the backend");
    assert_eq!(
        (code, out.trim()),
        (0, "backend answered"),
        "the hostns-only program did not rewrite in the initial namespace: {err}"
    );

    // From the probe's own namespace, as from a pod's: left alone, nothing to report.
    assert_intact(result(lb.run(&strs(&check(&["--target", VIP4])))), VIP4);
    assert_intact(result(lb.run(&strs(&check(&["--target", VIP6])))), VIP6);
}

/// A pod-like namespace: lo up, a veth pair with addresses and default routes, and a capture
/// table of its own redirecting all outbound TCP at the usual nat priority (as a mesh does).
fn pod_like() -> Netns {
    let ns = Netns::new("mrbp");
    for cmd in [
        "ip link set lo up",
        "ip link add eth0 type veth peer name peer0",
        "ip link set eth0 up",
        "ip link set peer0 up",
        "ip addr add 10.88.0.5/24 dev eth0",
        "ip -6 addr add fd88::5/64 dev eth0 nodad",
        "ip route add default dev eth0",
        "ip -6 route add default dev eth0",
        "nft add table inet capture",
        "nft add chain inet capture output { type nat hook output priority -100 ; }",
        "nft add rule inet capture output meta l4proto tcp redirect to :15001",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>());
    }
    ns
}

#[test]
fn netns_flag_probes_there_and_leaves_it_as_it_was() {
    require_tools();
    let ns = pod_like();
    let before = ns.ruleset();
    let p = ns.path();
    for target in [VIP4, VIP6] {
        let r = outside(&strs(&check(&["--netns", &p, "--target", target])));
        assert!(r.1.contains(&format!("netns:   {p}")), "{}", r.1);
        assert_intact(r, target);
        assert_eq!(ns.ruleset(), before, "the namespace's ruleset changed");
    }
    let mut lb = ConnectLb::new();
    lb.load(&Mapping::service(false));
    assert_rewritten(
        result(lb.run(&strs(&check(&["--netns", &p, "--target", VIP4])))),
        VIP4,
        BACKEND4,
    );
    assert_rewritten(
        result(lb.run(&strs(&check(&["--netns", &p, "--target", VIP6])))),
        VIP6,
        BACKEND6,
    );
    assert_eq!(ns.ruleset(), before, "the namespace's ruleset changed");
}

/// In a pod made by the real chain with mesh-redirect's own capture (both Istio modes): the
/// probe's chain wins over the pod's, and the pod's table is as it was afterwards.
#[test]
fn netns_flag_in_a_meshed_pod() {
    require_tools();
    common::require_root();
    let mut lb = ConnectLb::new();
    lb.load(&Mapping::service(false));
    for extra in [
        vec![],
        vec![("sidecar.istio.io/interceptionMode", "TPROXY")],
    ] {
        let pod = common::Pod::meshed(&extra);
        assert!(pod.pod.has_table(), "{extra:?}: no capture table");
        let before = pod.pod.ruleset();
        let p = pod.pod.path();
        for target in [VIP4, VIP6] {
            assert_intact(
                outside(&strs(&check(&["--netns", &p, "--target", target]))),
                target,
            );
        }
        assert_rewritten(
            result(lb.run(&strs(&check(&["--netns", &p, "--target", VIP4])))),
            VIP4,
            BACKEND4,
        );
        assert_rewritten(
            result(lb.run(&strs(&check(&["--netns", &p, "--target", VIP6])))),
            VIP6,
            BACKEND6,
        );
        assert_eq!(
            pod.pod.ruleset(),
            before,
            "{extra:?}: the pod's ruleset changed"
        );
    }
}

#[test]
fn netns_failures_leave_it_as_it_was() {
    require_tools();
    // `ip netns add` alone (lo down, no routes), then with lo up: the probe's table is in
    // when connect() fails, and goes again.
    let bare = Netns::new("mrbp");
    let before = bare.ruleset();
    for step in 0..2 {
        if step == 1 {
            bare.exec(&["ip", "link", "set", "lo", "up"]);
        }
        let (code, _, err) = outside(&strs(&check(&["--netns", &bare.path(), "--target", VIP4])));
        assert_eq!(code, 4, "{err}");
        assert!(err.contains("no route"), "{err}");
        assert_eq!(bare.ruleset(), before);
    }

    // A namespace that drops the probe's SYN (a filter ahead of nat): inconclusive, exit 3.
    let ns = pod_like();
    for cmd in [
        "nft add chain inet capture early { type filter hook output priority -200 ; }",
        "nft add rule inet capture early ip daddr 10.96.0.1 drop",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>());
    }
    let before = ns.ruleset();
    let (code, out, err) = outside(&strs(&check(&[
        "--netns",
        &ns.path(),
        "--target",
        VIP4,
        "--timeout",
        "0.3",
    ])));
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains("inconclusive") && out.contains("seen:    nothing"),
        "{out}"
    );
    assert_eq!(ns.ruleset(), before);

    // The probe's table already there (another probe, or one killed): refused, untouched.
    ns.exec(&["nft", "add", "table", "inet", bypass::TABLE]);
    let before = ns.ruleset();
    let (code, _, err) = outside(&strs(&check(&["--netns", &ns.path(), "--target", VIP4])));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(ns.ruleset(), before);

    // Never the agent's own namespace (the host's).
    let (code, _, err) = outside(&strs(&check(&[
        "--netns",
        "/proc/self/ns/net",
        "--target",
        VIP4,
    ])));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("refusing"), "{err}");
}

#[test]
fn bad_targets_are_usage_errors() {
    for (args, says) in [
        (vec!["--target", "kubernetes.default:443"], "is not IP:PORT"),
        (vec!["--target", "10.96.0.1"], "is not IP:PORT"),
        (vec!["--target", "fd00:96::1:443"], "is not IP:PORT"),
        (vec!["--target", "10.96.0.1:0"], "is not IP:PORT"),
        (vec!["--target"], "needs a value"),
        (vec!["--bogus"], "unknown option"),
        (vec!["--target", VIP4, "--netns", "relative"], "absolute"),
        (vec!["--target", VIP4, "--timeout", "-1"], "--timeout"),
        (vec![], "no target"),
    ] {
        let out = Command::new(plugin())
            .arg("check-bypass")
            .args(&args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .output()
            .expect("run check-bypass");
        let (code, stdout, err) = result(out);
        assert_eq!(code, 2, "{args:?}: {stdout}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(err.contains("usage:"), "{args:?}: {err}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    }
    let out = Command::new(plugin())
        .arg("check-bypass")
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "https")
        .output()
        .expect("run check-bypass");
    let (code, _, err) = result(out);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("KUBERNETES_SERVICE_PORT=\"https\""), "{err}");
}

/// The library call the agent makes, and what one probe costs.
#[test]
fn probe_api_and_timing() {
    require_tools();
    let mut took = Vec::new();
    for target in [VIP4, VIP6].iter().cycle().take(10) {
        let t = Instant::now();
        let v = bypass::probe(sa(target), None, bypass::TIMEOUT).expect("probe");
        took.push(t.elapsed());
        assert_eq!(v.outcome(), Outcome::Intact, "{v}");
        assert_eq!(v.seen_addr(), Some(sa(target)));
        assert_eq!(v.fixes(), None);
    }
    took.sort();
    eprintln!(
        "check-bypass probe (scratch namespace): median {:.1} ms, min {:.1} ms, max {:.1} ms",
        took[took.len() / 2].as_secs_f64() * 1e3,
        took[0].as_secs_f64() * 1e3,
        took[took.len() - 1].as_secs_f64() * 1e3
    );
    // A path that is not a namespace fails before anything is made.
    let err = bypass::probe(sa(VIP4), Some(Path::new("/nonexistent")), bypass::TIMEOUT)
        .expect_err("no such namespace");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// The agent started in `cgroup` (or outside any test cgroup), with the cluster's service
/// address in its environment as the kubelet sets it.
fn agent_with_service(cgroup: Option<&Path>, host: &str, port: &str) -> Agent {
    Agent::with(Start {
        env: &[
            ("KUBERNETES_SERVICE_HOST", host),
            ("KUBERNETES_SERVICE_PORT", port),
        ],
        procs: cgroup.map(|c| c.join("cgroup.procs")),
        ..Start::default()
    })
}

/// Waits up to `secs` for /readyz to answer `code`; returns the body.
fn wait_readyz(a: &Agent, code: u16, secs: u64) -> String {
    let t = Instant::now();
    loop {
        if let Some((c, b)) = a.get("/readyz")
            && c == code
        {
            return b;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "/readyz never answered {code} within {secs} s:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 19, the agent's side: in a cgroup where connects to the service are rewritten it is
/// not ready within 15 s, saying why and naming both fixes, with `capture_bypass` 1; the same
/// agent outside is ready; once the program is detached it is ready again within 75 s (its
/// default period is 60 s); a program that rewrites only in the host namespace (Cilium's
/// recommended `hostNamespaceOnly`) is not reported.
#[test]
fn the_agent_is_not_ready_while_connects_to_services_are_rewritten() {
    require_tools();
    let mut lb = ConnectLb::new();
    lb.load(&Mapping::service(false));
    let (vip, port) = ("10.96.0.1", "443");
    let bypassed = agent_with_service(Some(&lb.cgroup), vip, port);
    let v6 = agent_with_service(Some(&lb.cgroup), "fd00:96::1", port);
    let clean = agent_with_service(None, vip, port);
    let t = Instant::now();
    let body = wait_readyz(&bypassed, 503, 15);
    println!(
        "not ready {:.1} s after start: {}",
        t.elapsed().as_secs_f64(),
        body.trim()
    );
    for want in [
        "capture is bypassed",
        "10.96.0.1:443",
        BACKEND4,
        CILIUM_FIX,
        CILIUM_FLAG,
        CALICO_FIX,
        CALICO_TOO,
    ] {
        assert!(body.contains(want), "{want:?} not in {body}");
    }
    let log = bypassed.log();
    let line = log
        .lines()
        .find(|l| l.contains("capture bypassed"))
        .unwrap_or_else(|| panic!("no log line:\n{log}"));
    for want in [CILIUM_FIX, CILIUM_FLAG, CALICO_FIX, CALICO_TOO] {
        assert!(line.contains(want), "{want:?} not in {line}");
    }
    assert_eq!(
        sample(&bypassed.metrics().unwrap(), "mesh_redirect_capture_bypass"),
        1.0
    );
    let body6 = wait_readyz(&v6, 503, 15);
    assert!(
        body6.contains(BACKEND6) && body6.contains(CALICO_FIX),
        "{body6}"
    );
    // The same agent outside the cgroup: nothing rewrites its connects.
    wait_readyz(&clean, 200, 15);
    assert_eq!(
        sample(&clean.metrics().unwrap(), "mesh_redirect_capture_bypass"),
        0.0
    );
    // The program goes: ready again within a period.
    lb.detach();
    let t = Instant::now();
    wait_readyz(&bypassed, 200, 75);
    println!(
        "ready again {:.1} s after the program was detached",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        sample(&bypassed.metrics().unwrap(), "mesh_redirect_capture_bypass"),
        0.0
    );
    drop((bypassed, v6, clean));

    // Cilium's recommended setting: socket-LB only in the host's namespace. Connects from the
    // agent's own namespace are rewritten (shown), the probe's scratch namespace is not.
    let mut lb = ConnectLb::new();
    lb.load(&Mapping::service(true));
    let hostns = agent_with_service(Some(&lb.cgroup), vip, port);
    wait_readyz(&hostns, 200, 15);
    // Give it a probe's time, then: nothing reported.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hostns.get("/readyz").map(|(c, _)| c), Some(200));
    assert!(
        !hostns.log().contains("capture bypassed"),
        "{}",
        hostns.log()
    );
    assert!(
        hostns.log().contains("reach capture unchanged"),
        "{}",
        hostns.log()
    );
    // Without the service variables: the probe is skipped, said once, and the agent is ready.
    let none = Agent::with(Start::default());
    wait_readyz(&none, 200, 15);
    assert_eq!(
        none.log()
            .matches("the capture-bypass check is skipped")
            .count(),
        1,
        "{}",
        none.log()
    );
    // Turned off: no probe at all, even where connects are rewritten.
    let mut lb2 = ConnectLb::new();
    lb2.load(&Mapping::service(false));
    let off = Agent::with(Start {
        env: &[
            ("KUBERNETES_SERVICE_HOST", vip),
            ("KUBERNETES_SERVICE_PORT", port),
            ("MESH_REDIRECT_BYPASS_CHECK", "false"),
        ],
        procs: Some(lb2.cgroup.join("cgroup.procs")),
        ..Start::default()
    });
    wait_readyz(&off, 200, 15);
    assert!(!off.log().contains("capture-bypass"), "{}", off.log());
    drop(off);
    drop(lb2);
    drop(hostns);
    drop(lb);
}
