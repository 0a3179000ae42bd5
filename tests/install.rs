//! The node installer against real files in temporary directories, run as the DaemonSet runs
//! it: a long-lived `mesh-redirect install` process, probed over HTTP and stopped by SIGTERM.
//! Its readiness port lives in a network namespace the test makes.

mod common;

use common::*;
use mesh_redirect::install::files;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_PORT: u16 = 9099;

/// Waits for `cond`, polling; panics with `what` after `secs`.
#[track_caller]
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Temporary CNI bin and conf dirs, plus a namespace for the readiness port.
struct Node {
    tmp: TempDir,
    ns: Netns,
}

impl Node {
    fn new() -> Node {
        require_root();
        let tmp = TempDir::new();
        for d in ["bin", "net.d"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        let ns = Netns::new("mrt-inst-");
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        Node { tmp, ns }
    }

    fn bin(&self) -> PathBuf {
        self.tmp.path().join("bin")
    }

    fn conf(&self) -> PathBuf {
        self.tmp.path().join("net.d")
    }

    fn write(&self, name: &str, text: &str, mode: u32) -> Vec<u8> {
        let p = self.conf().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        text.as_bytes().to_vec()
    }

    fn read(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.conf().join(name)).ok()
    }

    fn json(&self, name: &str) -> Value {
        serde_json::from_slice(&self.read(name).unwrap_or_default()).unwrap_or(Value::Null)
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.conf())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn start(&self, extra: &[&str]) -> Installer {
        let log = self
            .tmp
            .path()
            .join(format!("installer-{}.log", unique("")));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name, PLUGIN, "install"])
            .arg("--cni-bin-dir")
            .arg(self.bin())
            .arg("--cni-conf-dir")
            .arg(self.conf())
            .args(["--readiness-addr", &format!("127.0.0.1:{READY_PORT}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Installer {
            child: cmd.spawn().unwrap(),
            log,
            ns: self.ns.path(),
        }
    }

    fn uninstall(&self) {
        uninstall(&self.bin(), &self.conf());
    }
}

struct Installer {
    child: Child,
    log: PathBuf,
    ns: String,
}

impl Installer {
    /// GET `path` on the readiness port, from inside the namespace: (status code, body).
    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.ns, READY_PORT, path)
    }

    fn wait_ready(&self) {
        wait_for(10, "/readyz 200", || {
            self.get("/readyz").is_some_and(|(c, _)| c == 200)
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as the kubelet stops a DaemonSet pod; returns the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "installer did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const BRIDGE_LIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.0.0/24"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

fn plugins(v: &Value) -> Vec<String> {
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn conflist_primary_is_chained_and_given_back_byte_for_byte() {
    let node = Node::new();
    let original = node.write("10-bridge.conflist", BRIDGE_LIST, 0o640);
    let other = node.write(
        "20-other.conflist",
        &BRIDGE_LIST.replace("k8s-pod-network", "other"),
        0o644,
    );
    let inst = node.start(&[]);
    inst.wait_ready();
    let v = node.json("10-bridge.conflist");
    assert_eq!(plugins(&v), ["bridge", "portmap", "mesh-redirect"]);
    assert_eq!(
        v["plugins"][2]["capabilities"]["io.kubernetes.cri.pod-annotations"],
        true
    );
    assert_eq!(
        files::mode_of(&node.conf().join("10-bridge.conflist")),
        0o640,
        "mode kept"
    );
    assert_eq!(
        node.read("20-other.conflist").unwrap(),
        other,
        "only the primary is touched"
    );
    // The binary is there, executable, and finds its libraries beside it.
    let bin = node.bin().join("mesh-redirect");
    assert_eq!(files::mode_of(&bin), 0o755);
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(PLUGIN).unwrap());
    let ldd = Command::new("ldd").arg(&bin).output().unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let libs = node.bin().join("mesh-redirect.libs");
    assert!(
        ldd.lines()
            .any(|l| l.contains("libnftnl") && l.contains(&*libs.to_string_lossy())),
        "{ldd}"
    );
    assert!(
        ldd.lines()
            .any(|l| l.contains("libmnl") && l.contains(&*libs.to_string_lossy())),
        "{ldd}"
    );
    let v = Command::new(&bin).arg("version").output().unwrap();
    assert!(v.status.success());
    assert_eq!(inst.get("/healthz").unwrap().0, 200);
    assert!(inst.stop().success());
    assert_eq!(
        node.read("10-bridge.conflist").unwrap(),
        original,
        "original bytes back"
    );
    assert_eq!(
        files::mode_of(&node.conf().join("10-bridge.conflist")),
        0o640
    );
    assert_eq!(
        node.names(),
        ["10-bridge.conflist", "20-other.conflist"],
        "no backups or temp files left"
    );
    assert!(
        !bin.exists() && !libs.exists(),
        "binary removed on shutdown"
    );
}

#[test]
fn keep_on_exit_leaves_everything_in_place_for_the_next_installer() {
    let node = Node::new();
    let original = node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
    let inst = node.start(&["--keep-on-exit"]);
    inst.wait_ready();
    let chained = node.read("10-bridge.conflist").unwrap();
    assert!(inst.stop().success());
    assert_eq!(
        node.read("10-bridge.conflist").unwrap(),
        chained,
        "entry kept"
    );
    assert!(node.bin().join("mesh-redirect").exists(), "binary kept");
    // The next installer takes over without a write; uninstall still gives the original back.
    let inst = node.start(&[]);
    inst.wait_ready();
    assert_eq!(node.read("10-bridge.conflist").unwrap(), chained);
    assert!(inst.stop().success());
    assert_eq!(node.read("10-bridge.conflist").unwrap(), original);
}

#[test]
fn conf_primary_becomes_a_conflist_and_comes_back() {
    let node = Node::new();
    let conf = r#"{"cniVersion": "0.4.0", "name": "k8s", "type": "bridge", "bridge": "cni0"}"#;
    let original = node.write("10-bridge.conf", conf, 0o600);
    let inst = node.start(&["--keep-binary"]);
    inst.wait_ready();
    assert!(node.read("10-bridge.conf").is_none());
    let v = node.json("10-bridge.conflist");
    assert_eq!(v["name"], "k8s");
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(plugins(&v), ["bridge", "mesh-redirect"]);
    assert_eq!(v["plugins"][0]["bridge"], "cni0");
    assert!(inst.stop().success());
    assert_eq!(node.read("10-bridge.conf").unwrap(), original);
    assert_eq!(files::mode_of(&node.conf().join("10-bridge.conf")), 0o600);
    assert_eq!(node.names(), ["10-bridge.conf"]);
    assert!(
        node.bin().join("mesh-redirect").exists(),
        "--keep-binary keeps it"
    );
}

#[test]
fn lexically_first_valid_file_wins_and_a_malformed_one_is_left_untouched() {
    let node = Node::new();
    let bad = node.write("05-broken.conflist", "{ this is not json", 0o644);
    let no_name = node.write("07-noname.conf", r#"{"type": "bridge"}"#, 0o644);
    node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
    let later = node.write(
        "99-loopback.conf",
        r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        0o644,
    );
    let inst = node.start(&[]);
    inst.wait_ready();
    assert_eq!(
        plugins(&node.json("10-bridge.conflist")).last().unwrap(),
        "mesh-redirect"
    );
    assert_eq!(node.read("05-broken.conflist").unwrap(), bad);
    assert_eq!(node.read("07-noname.conf").unwrap(), no_name);
    assert_eq!(node.read("99-loopback.conf").unwrap(), later);
    let log = inst.log();
    assert!(
        log.contains("05-broken.conflist") && log.contains("invalid network config"),
        "{log}"
    );
    assert!(log.contains("07-noname.conf"), "{log}");
}

#[test]
fn conf_name_picks_the_file() {
    let node = Node::new();
    let first = node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
    node.write(
        "20-calico.conflist",
        &BRIDGE_LIST.replace("k8s-pod-network", "calico"),
        0o644,
    );
    let inst = node.start(&["--conf-name", "20-calico.conflist"]);
    inst.wait_ready();
    assert_eq!(node.read("10-bridge.conflist").unwrap(), first);
    assert_eq!(
        plugins(&node.json("20-calico.conflist")).last().unwrap(),
        "mesh-redirect"
    );
}

#[test]
fn an_older_entry_is_replaced_by_the_configured_one() {
    let node = Node::new();
    let mut v: Value = serde_json::from_str(BRIDGE_LIST).unwrap();
    v["plugins"]
        .as_array_mut()
        .unwrap()
        .insert(1, json!({"type": "mesh-redirect", "proxyUID": 1}));
    node.write("10-bridge.conflist", &v.to_string(), 0o644);
    let cfg = write_file(
        node.tmp.path(),
        "entry.json",
        r#"{"type": "mesh-redirect", "proxyUID": 4242, "logLevel": "debug"}"#,
    );
    let inst = node.start(&["--plugin-config", &cfg.to_string_lossy()]);
    inst.wait_ready();
    let v = node.json("10-bridge.conflist");
    assert_eq!(plugins(&v), ["bridge", "portmap", "mesh-redirect"]);
    assert_eq!(v["plugins"][2]["proxyUID"], 4242);
    // Shutdown removes it (no backup of a file that already had us: the entry is cut out).
    assert!(inst.stop().success());
    assert_eq!(
        plugins(&node.json("10-bridge.conflist")),
        ["bridge", "portmap"]
    );
}

#[test]
fn a_rewritten_primary_is_rechained_quickly_and_flapping_is_reported() {
    let node = Node::new();
    node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
    let inst = node.start(&[]);
    inst.wait_ready();
    for i in 0..6 {
        // The primary plugin rewrites its file (new content, without us), as Calico/Cilium do.
        let text = BRIDGE_LIST.replace("cni0", &format!("cni{i}"));
        node.write("10-bridge.conflist", &text, 0o644);
        let start = Instant::now();
        wait_for(3, "re-chain", || {
            let v = node.json("10-bridge.conflist");
            v["plugins"][0]["bridge"] == format!("cni{i}")
                && plugins(&v).last().map(String::as_str) == Some("mesh-redirect")
        });
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "re-chained in {:?}",
            start.elapsed()
        );
    }
    inst.wait_ready();
    let log = inst.log();
    assert!(log.contains("flapping"), "{log}");
    // Shutdown gives back the primary's latest version.
    assert!(inst.stop().success());
    assert_eq!(
        node.read("10-bridge.conflist").unwrap(),
        BRIDGE_LIST.replace("cni0", "cni5").into_bytes()
    );
}

#[test]
fn waits_for_a_primary_and_reinstalls_a_removed_binary() {
    let node = Node::new();
    let inst = node.start(&[]);
    wait_for(10, "installer up", || inst.get("/readyz").is_some());
    let (code, body) = inst.get("/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no primary"), "{body}");
    node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
    inst.wait_ready();
    std::fs::remove_file(node.bin().join("mesh-redirect")).unwrap();
    wait_for(5, "binary back", || {
        node.bin().join("mesh-redirect").exists()
    });
    inst.wait_ready();
}

#[test]
fn uninstall_after_a_crash_restores_the_original_bytes() {
    let node = Node::new();
    let original = node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
    let conf_original = node.write(
        "30-single.conf",
        r#"{"cniVersion":"1.0.0","name":"x","type":"bridge"}"#,
        0o644,
    );
    let mut inst = node.start(&["--conf-name", "30-single.conf"]);
    inst.wait_ready();
    let _ = inst.child.kill();
    let _ = inst.child.wait();
    assert!(node.read("30-single.conf").is_none());
    node.uninstall();
    assert_eq!(node.read("10-bridge.conflist").unwrap(), original);
    assert_eq!(node.read("30-single.conf").unwrap(), conf_original);
    assert_eq!(node.names(), ["10-bridge.conflist", "30-single.conf"]);
    assert!(!node.bin().join("mesh-redirect").exists());
}

#[test]
fn binary_updates_are_atomic_for_concurrent_execs() {
    // Two different, valid executables swapped in over and over while another process keeps
    // executing the target: every exec must run one or the other, never a torn file (a torn
    // one fails with ENOEXEC or crashes; one still open for writing fails with ETXTBSY).
    require_root();
    let tmp = TempDir::new();
    let dir = tmp.path().to_path_buf();
    files::install_file(Path::new(PLUGIN), &dir, "mesh-redirect", 0o755).unwrap();
    let target = dir.join("mesh-redirect");
    let script = format!(
        "n=0; while [ ! -e {stop} ]; do {bin} version >/dev/null 2>&1; rc=$?; \
         if [ $rc -ne 0 ] && [ $rc -ne 1 ]; then echo \"rc=$rc after $n\"; exit 1; fi; n=$((n+1)); done; echo $n",
        stop = dir.join("stop").display(),
        bin = target.display()
    );
    let runner = Command::new("bash")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    for i in 0..60 {
        let src = if i % 2 == 0 { PROBE } else { PLUGIN };
        assert!(files::install_file(Path::new(src), &dir, "mesh-redirect", 0o755).unwrap());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::write(dir.join("stop"), b"").unwrap();
    let out = runner.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "an exec saw a bad binary: {text}");
    assert!(
        text.trim().parse::<u32>().unwrap_or(0) > 10,
        "too few execs to mean anything: {text}"
    );
}

#[test]
fn the_installed_chain_captures_a_pod() {
    // install into a conf dir holding the real reference chain, then run that dir's chain.
    let node = Node::new();
    let ipam = TempDir::new();
    let mut list = conflist(ipam.path(), "1.0.0", json!({}));
    list["plugins"].as_array_mut().unwrap().pop(); // the primary config, without us
    node.write(
        "10-mrtest.conflist",
        &serde_json::to_string_pretty(&list).unwrap(),
        0o644,
    );
    let inst = node.start(&["--keep-binary"]);
    inst.wait_ready();
    let chained = common::cnichain::load_list(&node.conf().join("10-mrtest.conflist")).unwrap();
    assert_eq!(plugins(&chained), ["bridge", "mesh-redirect"]);
    // The runtime finds mesh-redirect in the installed bin dir.
    let ann = json!({STATUS: "{}"});
    let pod = Pod::from_list_in(
        chained,
        ipam,
        Some(ann),
        "default",
        vec![PathBuf::from(REFERENCE_PLUGINS), node.bin()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let _proxy = pod.proxy();
    let _node = pod.node_server(&[8080]);
    assert_answer(
        pod.dial_from_pod(APP, &hp(GW4, 8080)),
        "proxy",
        Some("10.88.0.1:8080"),
    );
    drop(inst);
}

#[test]
fn a_chain_mesh_redirect_cannot_speak_is_not_touched() {
    // cniVersion 0.2.0: every ADD on the node would fail if mesh-redirect were chained in.
    let node = Node::new();
    let old = BRIDGE_LIST.replace("\"1.0.0\"", "\"0.2.0\"");
    let before = node.write("10-bridge.conflist", &old, 0o644);
    let inst = node.start(&[]);
    wait_for(10, "the installer to report it", || {
        inst.log().contains("not chaining")
    });
    assert_eq!(node.read("10-bridge.conflist").unwrap(), before);
    assert_eq!(inst.get("/readyz").unwrap().0, 503);
}
