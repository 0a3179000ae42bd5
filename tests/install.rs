//! The node installer against real files in temporary directories, run as the DaemonSet runs
//! it: a long-lived `mesh-redirect install` process, probed over HTTP and stopped by SIGTERM.
//! Its readiness port lives in a network namespace the test makes.

use common::agent::{AgentProc, Launch, Program};
use common::*;
use mesh_redirect::install::files;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const READY_PORT: u16 = 9099;

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
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// `mesh-redirect install` as the DaemonSet runs it, chaining only (no container runtime
    /// here), with an event socket of its own.
    fn start(&self, extra: &[&str]) -> AgentProc {
        let log = self
            .tmp
            .path()
            .join(format!("installer-{}.log", unique("")));
        let (netns, bin, conf) = (self.ns.path(), self.bin(), self.conf());
        let events = self.tmp.path().join("events.sock");
        Launch {
            program: Program::Plugin,
            ready_port: READY_PORT,
            args: extra,
            ready_within: Duration::from_secs(10),
            ..Launch::new(&netns, &bin, &conf, &events, log)
        }
        .spawn()
    }

    fn uninstall(&self) {
        uninstall(&self.bin(), &self.conf());
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

/// The plugin types of a conflist (none for anything else, e.g. a file caught mid-write).
fn plugins(v: &Value) -> Vec<String> {
    v["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["type"].as_str().unwrap_or_default().to_string())
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
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(plugin()).unwrap()
    );
    let ldd = Command::new("ldd").arg(&bin).output().unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let libs = node.bin().join("mesh-redirect.libs");
    // libnftnl is linked in (build.rs): only libmnl is a shared library to ship.
    assert!(!ldd.contains("libnftnl"), "{ldd}");
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

/// containerd loads only the first file in libcni's order and refuses the whole dir while it
/// is invalid: then the installer waits for it (not ready, saying why) and touches no other
/// file, instead of chaining a later one nobody reads.
#[test]
fn an_invalid_first_file_is_waited_for_and_no_other_file_is_touched() {
    let node = Node::new();
    let half = &BRIDGE_LIST[..BRIDGE_LIST.len() / 2];
    node.write("05-calico.conflist", half, 0o644);
    let no_name = node.write("07-noname.conf", r#"{"type": "bridge"}"#, 0o644);
    let bridge = node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
    let inst = node.start(&[]);
    let (code, body) = inst.wait_not_ready_because("05-calico.conflist");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not valid"), "{body}");
    assert_eq!(node.read("05-calico.conflist").unwrap(), half.as_bytes());
    assert_eq!(node.read("07-noname.conf").unwrap(), no_name);
    assert_eq!(node.read("10-bridge.conflist").unwrap(), bridge);
    assert!(inst.log().contains("05-calico.conflist"), "{}", inst.log());
    // The primary plugin finishes writing its file: that one is chained, no other.
    let calico = BRIDGE_LIST.replace("k8s-pod-network", "calico");
    node.write("05-calico.conflist", &calico, 0o644);
    inst.wait_ready();
    assert_eq!(
        plugins(&node.json("05-calico.conflist")).last().unwrap(),
        "mesh-redirect"
    );
    assert_eq!(node.read("07-noname.conf").unwrap(), no_name);
    assert_eq!(node.read("10-bridge.conflist").unwrap(), bridge);
}

/// The primary is the file the runtime uses: libcni keeps names that are not UTF-8, takes the
/// extension as Go's `filepath.Ext` does (so `.conflist` alone is a config), and sorts bytes.
#[test]
fn the_primary_is_the_file_libcni_picks() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    for first in [&b"00-\xff.conflist"[..], b".conflist", b"0\x80.json"] {
        let node = Node::new();
        let first = OsStr::from_bytes(first);
        let text = BRIDGE_LIST.replace("k8s-pod-network", "first");
        std::fs::write(node.conf().join(first), &text).unwrap();
        let bridge = node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
        let inst = node.start(&[]);
        inst.wait_ready();
        let v: Value =
            serde_json::from_slice(&std::fs::read(node.conf().join(first)).unwrap()).unwrap();
        assert_eq!(v["name"], "first", "{first:?}");
        assert_eq!(plugins(&v).last().unwrap(), "mesh-redirect", "{first:?}");
        assert_eq!(
            node.read("10-bridge.conflist").unwrap(),
            bridge,
            "{first:?}"
        );
        assert!(inst.stop().success());
        assert_eq!(
            std::fs::read(node.conf().join(first)).unwrap(),
            text.as_bytes(),
            "{first:?} given back"
        );
    }
}

/// Any name the runtime can read is chained: temporary and backup names never exceed
/// NAME_MAX. Only a `.conf` whose `.conflist` twin cannot exist fails, and says why.
#[test]
fn names_up_to_name_max_are_chained() {
    for len in [200usize, 255] {
        let node = Node::new();
        let name = format!("{}.conflist", "a".repeat(len - ".conflist".len()));
        let original = node.write(&name, BRIDGE_LIST, 0o644);
        let inst = node.start(&[]);
        inst.wait_ready();
        assert_eq!(
            plugins(&node.json(&name)).last().unwrap(),
            "mesh-redirect",
            "{len}"
        );
        assert!(inst.stop().success());
        assert_eq!(node.read(&name).unwrap(), original, "{len}: given back");
        assert_eq!(node.names(), [name], "{len}: no backup left");
    }
    // A 251-byte .conf: turned into a 255-byte .conflist, with our entry.
    let node = Node::new();
    let name = format!("{}.conf", "b".repeat(251 - ".conf".len()));
    let conf = r#"{"cniVersion": "0.4.0", "name": "k8s", "type": "bridge"}"#;
    let original = node.write(&name, conf, 0o644);
    let inst = node.start(&[]);
    inst.wait_ready();
    let list = format!("{name}list");
    assert_eq!(list.len(), 255);
    assert_eq!(
        plugins(&node.json(&list)),
        ["bridge", "mesh-redirect"],
        "the 255-byte .conflist is chained"
    );
    assert!(node.read(&name).is_none(), "the .conf became the .conflist");
    assert!(inst.stop().success());
    assert_eq!(node.read(&name).unwrap(), original);
    // A 252-byte .conf cannot have a .conflist twin: not ready, saying why, file untouched.
    let node = Node::new();
    let name = format!("{}.conf", "c".repeat(252 - ".conf".len()));
    let original = node.write(&name, conf, 0o644);
    let inst = node.start(&[]);
    let (code, body) = inst.wait_not_ready_because("longer than 255");
    assert_eq!(code, 503, "{body}");
    assert!(inst.log().contains("longer than 255"), "{}", inst.log());
    assert_eq!(node.read(&name).unwrap(), original);
}

/// How the primary plugin writes its file in the race harness.
#[derive(Clone, Copy, Debug)]
enum Writer {
    /// A new file renamed over the name (atomic writers: Calico, Cilium, kindnet).
    Rename,
    /// Truncate and write into whatever inode the name has when opened.
    InPlace,
}

fn write_version(conf: &Path, name: &str, text: &str, how: Writer) {
    use std::io::Write;
    match how {
        Writer::Rename => {
            let tmp = conf.join(format!("{name}.writer-tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, conf.join(name)).unwrap();
        }
        Writer::InPlace => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(conf.join(name))
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
    }
}

/// The primary plugin rewrites its file 20 times, 0–4 ms apart, the last write timed to the
/// installer's own temp-file creation (seen with inotify), i.e. after it read the file and
/// before it replaced it. Once the writer stops, the file must hold the last version with our
/// entry and the backup the last version as written: no trial may lose it.
fn race(how: Writer) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    const TRIALS: usize = 200;
    const WRITES: usize = 20;
    let node = Node::new();
    let name = "10-bridge.conflist";
    node.write(name, BRIDGE_LIST, 0o644);
    let inst = node.start(&[]);
    inst.wait_ready();
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    watch
        .add_watch(&node.conf(), AddWatchFlags::IN_CREATE)
        .unwrap();
    let backup = format!("{name}.mesh-redirect-orig");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut hits, mut lost) = (0, Vec::new());
    for trial in 0..TRIALS {
        let mut last = String::new();
        for k in 1..=WRITES {
            last = BRIDGE_LIST.replace("k8s-pod-network", &format!("net-{trial}-{k}"));
            if k == WRITES {
                // Wait for the installer to start writing (its reaction to write 19), then
                // write at once: inside its read-then-replace window.
                let deadline = Instant::now() + Duration::from_secs(2);
                let mut hit = false;
                while !hit && Instant::now() < deadline {
                    hit = watch.read_events().is_ok_and(|evs| {
                        evs.iter().any(|e| {
                            e.name.as_ref().is_some_and(|n| {
                                n.to_string_lossy().starts_with(".mesh-redirect-tmp-")
                                    || n.to_string_lossy().contains(".tmp-")
                            })
                        })
                    });
                }
                hits += hit as usize;
            } else {
                std::thread::sleep(Duration::from_micros(next() % 4000));
                // Forget earlier temp files: only the reaction to the latest write counts.
                let _ = watch.read_events();
            }
            write_version(&node.conf(), name, &last, how);
        }
        let want = format!("net-{trial}-{WRITES}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let ok = loop {
            let v = node.json(name);
            if v["name"] == want.as_str()
                && plugins(&v).last().map(String::as_str) == Some("mesh-redirect")
                && node.read(&backup).as_deref() == Some(last.as_bytes())
            {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if !ok {
            let b: Value =
                serde_json::from_slice(&node.read(&backup).unwrap_or_default()).unwrap_or_default();
            println!(
                "trial {trial}: file {} (plugins {:?}), backup {}",
                node.json(name)["name"],
                plugins(&node.json(name)),
                b["name"]
            );
            lost.push(trial);
        }
    }
    println!(
        "race {how:?}: {TRIALS} trials x {WRITES} writes, last write inside the installer's window in {hits}, lost in {}",
        lost.len()
    );
    assert!(
        hits >= TRIALS * 9 / 10,
        "the harness hit the window in only {hits} trials"
    );
    assert!(
        lost.is_empty(),
        "{how:?}: the last version was lost in {} of {TRIALS} trials ({lost:?}); file: {:?}",
        lost.len(),
        node.json(name)["name"]
    );
    // No temp files left behind once the installer let go of the inodes it displaced (it
    // keeps each linked while it watches it for late writes, 10 s, so that an installer
    // started after a crash finds them).
    let deadline = Instant::now() + Duration::from_secs(14);
    while node.names().iter().any(|n| n.contains("tmp")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        node.names().iter().all(|n| !n.contains("tmp")),
        "{:?}",
        node.names()
    );
}

#[test]
fn no_primary_version_is_lost_to_a_writer_renaming_over_it() {
    race(Writer::Rename);
}

#[test]
fn no_primary_version_is_lost_to_a_writer_writing_in_place() {
    race(Writer::InPlace);
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
    let (code, body) = inst.wait_not_ready_because("no primary");
    assert_eq!(code, 503, "{body}");
    node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
    inst.wait_ready();
    std::fs::remove_file(node.bin().join("mesh-redirect")).unwrap();
    wait_for(5, "binary back", || {
        node.bin().join("mesh-redirect").exists()
    });
    inst.wait_ready();
    // Its libraries too: without them every ADD would fail to start the plugin.
    let libs = node.bin().join("mesh-redirect.libs");
    std::fs::remove_dir_all(&libs).unwrap();
    wait_for(5, "libraries back", || libs.join("libmnl.so.0").is_file());
    inst.wait_ready();
    let v = Command::new(node.bin().join("mesh-redirect"))
        .arg("version")
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "the plugin starts with what is beside it"
    );
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
    inst.kill();
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
    files::install_file(Path::new(plugin()), &dir, "mesh-redirect", 0o755).unwrap();
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
        let src = if i % 2 == 0 { probe() } else { plugin() };
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

/// The primary with a generation marker in its network name.
fn version_text(generation: u64) -> String {
    BRIDGE_LIST.replace("k8s-pod-network", &format!("generation-{generation}"))
}

/// A crashed agent's state, written as the agent writes it: `name` holds `text` with our entry
/// last, the backup holds `text` as the primary wrote it.
fn chained_by_a_dead_agent(node: &Node, name: &str, text: &str) {
    use mesh_redirect::install::conflist;
    let list = conflist::as_list(&conflist::parse(text.as_bytes(), true).unwrap());
    let chained = conflist::render(&conflist::chain(&list, &conflist::entry(None)));
    std::fs::write(node.conf().join(format!("{name}.mesh-redirect-orig")), text).unwrap();
    std::fs::write(node.conf().join(name), chained).unwrap();
}

/// Issue 18.8: `uninstall` restored the original with a plain rename, so a version the
/// primary plugin wrote between its read and its rename was lost. Each trial writes a new
/// version the moment uninstall creates its temporary file (seen with inotify): the file must
/// end as that version, byte for byte.
fn uninstall_race(how: Writer) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    const TRIALS: u64 = 100;
    let node = Node::new();
    let name = "10-bridge.conflist";
    let mut lost = Vec::new();
    let mut hits = 0;
    for trial in 0..TRIALS {
        chained_by_a_dead_agent(&node, name, &version_text(trial * 2));
        let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
        watch
            .add_watch(&node.conf(), AddWatchFlags::IN_CREATE)
            .unwrap();
        let newer = version_text(trial * 2 + 1);
        let mut un = Command::new(plugin())
            .arg("uninstall")
            .arg("--cni-bin-dir")
            .arg(node.bin())
            .arg("--cni-conf-dir")
            .arg(node.conf())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut hit = false;
        while !hit && Instant::now() < deadline {
            hit = watch.read_events().is_ok_and(|evs| {
                evs.iter().any(|e| {
                    e.name
                        .as_ref()
                        .is_some_and(|n| n.to_string_lossy().starts_with(".mesh-redirect-tmp-"))
                })
            });
        }
        hits += hit as usize;
        write_version(&node.conf(), name, &newer, how);
        assert!(un.wait().unwrap().success());
        if node.read(name).as_deref() != Some(newer.as_bytes()) {
            lost.push(trial);
        }
        // No debris a runtime would load, nothing of ours left.
        assert_eq!(node.names(), [name], "trial {trial}");
    }
    println!(
        "uninstall race {how:?}: {TRIALS} trials, a write inside uninstall's window in {hits}, lost in {}",
        lost.len()
    );
    assert!(
        hits as u64 >= TRIALS * 9 / 10,
        "the window was hit in {hits} trials only"
    );
    assert!(lost.is_empty(), "{how:?}: lost in {lost:?}");
}

#[test]
fn uninstall_loses_no_version_written_meanwhile_by_rename() {
    uninstall_race(Writer::Rename);
}

#[test]
fn uninstall_loses_no_version_written_meanwhile_in_place() {
    uninstall_race(Writer::InPlace);
}

/// Issue 18, chaos: the agent is SIGKILLed at random moments while the primary plugin keeps
/// rewriting its file (renaming over it or writing in place, at random). After each kill:
/// nothing a runtime would load is left besides the primary; a new agent comes up ready with
/// exactly one mesh-redirect entry in the writer's last version (recovering a version the dead
/// agent had exchanged out); and uninstall gives back that version byte for byte.
#[test]
fn sigkill_while_chaining_loses_no_primary_version() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const TRIALS: u64 = 100;
    let node = Node::new();
    let name = "10-bridge.conflist";
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let generation = Arc::new(AtomicU64::new(0));
    std::fs::write(node.conf().join(name), version_text(0)).unwrap();
    let (mut recovered, mut writes) = (0, 0);
    for trial in 0..TRIALS {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, generation, conf) = (stop.clone(), generation.clone(), node.conf());
            let seed = next();
            std::thread::spawn(move || {
                let mut r = seed | 1;
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    let g = generation.fetch_add(1, Ordering::SeqCst) + 1;
                    let how = if r % 2 == 0 {
                        Writer::Rename
                    } else {
                        Writer::InPlace
                    };
                    write_version(&conf, name, &version_text(g), how);
                    n += 1;
                    std::thread::sleep(Duration::from_micros(r % 3000));
                }
                n
            })
        };
        let mut inst = node.start(&[]);
        std::thread::sleep(Duration::from_millis(5 + next() % 60));
        inst.kill();
        std::thread::sleep(Duration::from_millis(next() % 10));
        stop.store(true, Ordering::SeqCst);
        writes += writer.join().unwrap();
        let last = version_text(generation.load(Ordering::SeqCst));
        let loadable: Vec<String> = node
            .names()
            .into_iter()
            .filter(|n| mesh_redirect::install::confdir::is_conf(std::ffi::OsStr::new(n)))
            .collect();
        assert_eq!(
            loadable,
            [name],
            "trial {trial}: debris a runtime would load"
        );
        let inst = node.start(&[]);
        inst.wait_ready();
        recovered += inst.log().matches("recovered a version").count();
        let v = node.json(name);
        assert_eq!(
            v["name"],
            node_name(&last),
            "trial {trial}: the writer's last version was lost\n{}",
            inst.log()
        );
        assert_eq!(
            plugins(&v).iter().filter(|p| *p == "mesh-redirect").count(),
            1,
            "trial {trial}: {v}"
        );
        assert_eq!(
            plugins(&v).last().map(String::as_str),
            Some("mesh-redirect")
        );
        drop(inst);
        node.uninstall();
        assert_eq!(
            node.read(name).as_deref(),
            Some(last.as_bytes()),
            "trial {trial}: uninstall did not give back the last version"
        );
        assert_eq!(node.names(), [name], "trial {trial}");
    }
    println!(
        "chaos: {TRIALS} SIGKILLs while chaining under {writes} primary rewrites; {recovered} \
         versions recovered from a dead agent's temporary files; none lost"
    );
}

/// The `name` field of a conflist text.
fn node_name(text: &str) -> Value {
    serde_json::from_str::<Value>(text).unwrap()["name"].clone()
}

/// The worst moment to die: the agent has just exchanged its chained version in and taken out
/// a newer one the primary wrote meanwhile. The agent is stopped the moment it creates its
/// temporary file, the primary writes a new version, and the agent is SIGKILLed the moment the
/// exchange happens (it then syncs the directory, which takes far longer than the kill). The
/// next agent must find that version in the dead one's temporary file and chain it.
#[test]
fn a_version_exchanged_out_by_an_agent_that_died_is_recovered() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use nix::sys::signal::{Signal, kill};
    const TRIALS: u64 = 20;
    let node = Node::new();
    let name = "10-bridge.conflist";
    let (mut recovered, mut lost) = (0, Vec::new());
    for trial in 0..TRIALS {
        std::fs::write(node.conf().join(name), version_text(trial * 10)).unwrap();
        let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
        watch
            .add_watch(
                &node.conf(),
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
            )
            .unwrap();
        let mut inst = node.start(&[]);
        let pid = nix::unistd::Pid::from_raw(inst.pid() as i32);
        let seen = |what: &dyn Fn(&str, AddWatchFlags) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if watch.read_events().is_ok_and(|evs| {
                    evs.iter().any(|e| {
                        e.name
                            .as_ref()
                            .is_some_and(|n| what(&n.to_string_lossy(), e.mask))
                    })
                }) {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
            }
        };
        // Its exchange temp for our name appears: stop it there.
        assert!(seen(
            &|n, m| n.contains("-x-") && m.contains(AddWatchFlags::IN_CREATE)
        ));
        kill(pid, Signal::SIGSTOP).unwrap();
        let newer = version_text(trial * 10 + 1);
        write_version(&node.conf(), name, &newer, Writer::Rename);
        let _ = watch.read_events();
        kill(pid, Signal::SIGCONT).unwrap();
        // The exchange renames into our name: kill at once.
        let hit = seen(&|n, m| n == name && m.contains(AddWatchFlags::IN_MOVED_TO));
        inst.kill();
        assert!(hit, "trial {trial}: no exchange seen");
        let inst = node.start(&[]);
        inst.wait_ready();
        recovered += inst.log().matches("recovered a version").count();
        if node.json(name)["name"] != node_name(&newer) {
            lost.push(trial);
        }
        drop(inst);
        node.uninstall();
        assert_eq!(node.names(), [name], "trial {trial}");
    }
    println!(
        "killed right after the exchange: {TRIALS} trials, {recovered} recovered, lost {lost:?}"
    );
    assert!(lost.is_empty(), "lost in {lost:?}");
    assert!(
        recovered > 0,
        "the kill never landed between the exchange and its check"
    );
}

/// Issue 22: a primary CNI that keeps putting back its own file without our entry (Cilium's
/// `cni.exclusive`, true by default) is named, with the fix, in the log and the /readyz body
/// within 15 s; another primary is named by its type.
#[test]
fn a_primary_that_fights_the_chain_is_named_with_the_fix() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    for (file, kind, want) in [
        ("05-cilium.conflist", "cilium-cni", "cni.exclusive=false"),
        ("10-kindnet.conflist", "ptp", "(ptp) keeps rewriting"),
    ] {
        let node = Node::new();
        let list = format!(
            r#"{{"cniVersion":"1.0.0","name":"primary","plugins":[{{"type":"{kind}"}},{{"type":"portmap","capabilities":{{"portMappings":true}}}}]}}"#
        );
        node.write(file, &list, 0o644);
        let inst = node.start(&[]);
        inst.wait_ready();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, conf, list) = (stop.clone(), node.conf(), list.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    write_version(&conf, file, &list, Writer::Rename);
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        };
        let t = Instant::now();
        wait_for(15, "the fight named in /readyz", || {
            inst.get("/readyz").is_some_and(|(_, b)| b.contains(want))
        });
        println!("{kind}: named after {:.1} s", t.elapsed().as_secs_f64());
        assert!(inst.log().contains(want), "{}", inst.log());
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
    }
}

/// Issue 22: another mesh's capture plugin in the chain we join (istio-cni left in place while
/// migrating) is named in the log and in the /readyz body, without holding the node not
/// ready (the migration installs ours first, then rolls pods, then removes theirs).
#[test]
fn another_meshs_capture_plugin_in_the_chain_is_reported() {
    let node = Node::new();
    node.write(
        "10-calico.conflist",
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"portmap"},{"type":"istio-cni","kubernetes":{"kubeconfig":"/etc/cni/net.d/ZZZ-istio-cni-kubeconfig"}}]}"#,
        0o644,
    );
    let inst = node.start(&[]);
    inst.wait_ready();
    let (code, body) = inst.get("/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("warning: istio-cni in the chain too"),
        "{body}"
    );
    assert!(
        inst.log()
            .contains("another mesh's capture plugin is in the chain"),
        "{}",
        inst.log()
    );
    assert_eq!(
        plugins(&node.json("10-calico.conflist"))
            .last()
            .map(String::as_str),
        Some("mesh-redirect")
    );
}

/// Issue 22: a node whose glibc is older than the plugin needs would fail every pod's ADD:
/// asked through the node's loader (`--node-loader`), the installer refuses, says why, and
/// touches nothing. With this machine's own loader it installs as usual.
#[test]
fn a_node_glibc_too_old_for_the_plugin_is_refused() {
    let node = Node::new();
    let original = node.write("10-bridge.conflist", BRIDGE_LIST, 0o644);
    // A stand-in for an old node's loader: it answers --version as glibc 2.17's does.
    let old = node.tmp.path().join("old-ld.so");
    std::fs::write(
        &old,
        "#!/bin/sh\necho 'ld.so (GNU libc) stable release version 2.17, by Roland McGrath et al.'\n",
    )
    .unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let inst = node.start(&["--node-loader", old.to_str().unwrap()]);
    let (code, body) = inst.wait_not_ready_because("the node's glibc is 2.17");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("every pod's ADD would fail"), "{body}");
    assert_eq!(
        node.read("10-bridge.conflist").unwrap(),
        original,
        "chained anyway"
    );
    assert!(
        !node.bin().join("mesh-redirect").exists(),
        "installed anyway"
    );
    drop(inst);
    let here = "/lib64/ld-linux-x86-64.so.2";
    if Path::new(here).exists() {
        let inst = node.start(&["--node-loader", here]);
        inst.wait_ready();
        assert!(
            inst.log().contains("the node's glibc runs the plugin"),
            "{}",
            inst.log()
        );
    }
}
