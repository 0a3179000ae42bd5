//! A throwaway Kubernetes node without the kubelet, its host side: a network namespace with
//! no uplink, every directory of the node (CNI bin and conf dirs, IPAM state, the runtime's
//! dirs) under a temp dir, the primary network's conflist, and the node installer run as the
//! DaemonSet runs it. The container runtime on it is in `containerd.rs`.
//!
//! Everything is undone on drop, also when the test panics: sandboxes (through the runtime, so
//! CNI DEL runs), the installer, containerd, shims and containers, every mount below the temp
//! dir, the cgroups, the shim sockets containerd 1.6 puts in /run/containerd/s, the node
//! namespace and the temp dir. The host's root network namespace is never touched.

use crate::containerd;
use crate::cri::Cri;
use common::agent::{AgentProc, Launch, Program};
use common::{Netns, REFERENCE_PLUGINS, TempDir, run_cmd, tail, unique};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const READY_PORT: u16 = 15700;
pub const METRICS_PORT: u16 = 15701;
/// The installer's `--reconcile-period`: often, for a test's patience.
pub const RECONCILE_PERIOD: Duration = Duration::from_secs(1);
/// The primary network's name and bridge subnet (inside the node namespace only).
pub const NETWORK: &str = "k8s-pod-network";
pub const SUBNET: &str = "10.88.0.0/24";
pub const GATEWAY: &str = "10.88.0.1";
/// A second node address on `lo`: "somewhere else in the cluster", for the excluded range.
pub const OTHER: &str = "10.99.0.1";
pub const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Prints one line of the report.
pub fn say(line: &str) {
    println!("[node-e2e] {line}");
}

/// A program on the usual root PATH, or `None`.
pub fn which(name: &str) -> Option<PathBuf> {
    PATH_ENV
        .split(':')
        .chain(std::env::var("PATH").unwrap_or_default().split(':'))
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Runs `cmd` inside the network namespace at `netns` (nsenter: nothing else changes).
pub fn in_netns(netns: &str, cmd: &[&str]) -> String {
    run_cmd(
        Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .arg("--")
            .args(cmd),
    )
}

/// The nftables tables in a namespace.
pub fn tables(netns: &str) -> String {
    in_netns(netns, &["nft", "list", "tables"])
}

/// What the test needs on the machine; a clear failure (never a skip) when something lacks.
pub fn preflight() {
    common::require_root();
    let mut missing = Vec::new();
    for (bin, pkg) in [
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("runc", "runc"),
        ("cc", "gcc"),
        ("nsenter", "util-linux"),
        ("nft", "nftables"),
        ("tar", "tar"),
        ("sha256sum", "coreutils"),
        ("prometheus", "prometheus"),
        ("promtool", "prometheus"),
        ("buildah", "buildah"),
    ] {
        if which(bin).is_none() {
            missing.push(format!("{bin} (package {pkg})"));
        }
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists()
        && !Path::new("/usr/lib/aarch64-linux-gnu/libc.a").exists()
        && !Path::new("/usr/lib/libc.a").exists()
    {
        missing.push("libc.a for a static pause binary (package libc6-dev)".into());
    }
    assert!(
        missing.is_empty(),
        "the node e2e test needs: {}.\nInstall them with: \
         MESH_REDIRECT_DEPS_EXTRA=\"containerd runc prometheus buildah\" scripts/deps.sh (or run scripts/node-e2e.sh)",
        missing.join(", ")
    );
}

pub struct Node {
    pub tmp: TempDir,
    pub ns: Netns,
    pub cri: Cri,
    pub snapshotter: &'static str,
    /// The runtime's process (containerd.rs starts and stops it).
    pub(crate) containerd: Option<Child>,
    installer: Option<AgentProc>,
    /// Every sandbox id the runtime gave us (for the shim sockets left in /run/containerd/s).
    pub(crate) ids: Vec<String>,
    /// The top cgroup of our pods (`cgroup_parent`), below every cgroup hierarchy.
    pub cgroup_root: String,
    /// /run/netns before the runtime started (nothing must appear there).
    pub run_netns_before: Vec<String>,
}

impl Node {
    pub fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    pub fn conf_dir(&self) -> PathBuf {
        self.dir("net.d")
    }
    pub fn bin_dir(&self) -> PathBuf {
        self.dir("bin")
    }
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir("ipam").join(NETWORK)
    }
    pub fn plugin_log_path(&self) -> PathBuf {
        self.dir("mesh-redirect.log")
    }
    /// mesh-redirect's JSON log lines (one per invocation).
    pub fn plugin_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.plugin_log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Makes the node and starts containerd in it; waits until the CRI answers.
    pub fn start() -> Node {
        preflight();
        containerd::users(1);
        let run_netns_before = list_dir(Path::new("/run/netns"));
        let tmp = TempDir::new();
        let ns = Netns::new("mrt-node-");
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{OTHER}/32"), "dev", "lo"]);
        let root = tmp.path().to_path_buf();
        for d in [
            "root", "state", "tmp", "bin", "net.d", "ipam", "runc", "pods", "image", "run",
        ] {
            std::fs::create_dir_all(root.join(d)).expect("node dir");
        }
        for p in ["bridge", "host-local", "portmap", "loopback"] {
            std::os::unix::fs::symlink(
                Path::new(REFERENCE_PLUGINS).join(p),
                root.join("bin").join(p),
            )
            .expect("link reference plugin");
        }
        let snapshotter = containerd::snapshotter_for(&root);
        let cgroup_root = unique("mrt-kubepods-");
        let mut node = Node {
            cri: Cri::new(root.join("run/containerd.sock")),
            tmp,
            ns,
            snapshotter,
            containerd: None,
            installer: None,
            ids: Vec::new(),
            cgroup_root,
            run_netns_before,
        };
        // A shared mount, as / is on a systemd node: a container's HostToContainer mount of a
        // dir below then sees the mounts made there later (the pods' netns files). Made once
        // the node owns the dir, so that its drop unmounts it.
        make_shared(node.tmp.path());
        node.write_config();
        node.start_containerd();
        node
    }

    /// Writes the primary network's conflist, as a primary CNI's DaemonSet would.
    pub fn write_primary_conflist(&self) -> PathBuf {
        let list = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "dataDir": self.dir("ipam").display().to_string(),
                          "ranges": [[{"subnet": SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        let path = self.conf_dir().join("10-k8s-pod-network.conflist");
        // A temp file in the conf dir (an extension runtimes ignore), renamed over: containerd
        // 1.6 reloads on WRITE/RENAME/REMOVE events but ignores CREATE, so a file moved in
        // from elsewhere would go unnoticed.
        let tmp = self.conf_dir().join(".10-k8s-pod-network.conflist.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&list).unwrap()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// `mesh-redirect install` as the DaemonSet runs it (host network: the node namespace).
    pub fn start_installer(&mut self) {
        let socket = self.socket();
        self.start_installer_with(&socket, &[]);
    }

    /// The same, talking CRI at `cri_socket` (a proxy in front of containerd) with `extra`
    /// flags.
    pub fn start_installer_with(&mut self, cri_socket: &Path, extra: &[&str]) {
        assert!(self.installer.is_none(), "an installer is already running");
        let cfg = self.dir("plugin.json");
        std::fs::write(
            &cfg,
            json!({"type": "mesh-redirect", "logFile": self.plugin_log_path().display().to_string(),
                   "logLevel": "debug"})
            .to_string(),
        )
        .unwrap();
        let log = self.dir(&format!("installer-{}.log", unique("")));
        let (netns, bin, conf, events) = (
            self.ns.path(),
            self.bin_dir(),
            self.conf_dir(),
            self.dir("events.sock"),
        );
        let (cfg, cri_socket) = (cfg.display().to_string(), cri_socket.display().to_string());
        let period = RECONCILE_PERIOD.as_secs().to_string();
        let mut args = vec!["--plugin-config", &cfg, "--cri-socket", &cri_socket];
        args.extend_from_slice(extra);
        self.installer = Some(
            Launch {
                program: Program::Plugin,
                ready_port: READY_PORT,
                metrics_port: Some(METRICS_PORT),
                // The agent reconciles through this node's containerd, often (a test's
                // patience).
                reconcile_period: &period,
                args: &args,
                // As deploy/daemonset.yaml runs it: a rollout leaves the chain in place.
                env: &[("MESH_REDIRECT_KEEP_ON_EXIT", "true")],
                ..Launch::new(&netns, &bin, &conf, &events, log)
            }
            .spawn(),
        );
    }

    pub fn installer(&self) -> &AgentProc {
        self.installer.as_ref().expect("installer running")
    }

    /// The agent's pid.
    pub fn installer_pid(&self) -> u32 {
        self.installer().pid()
    }

    /// SIGKILL to the agent: a crash, an OOM kill.
    pub fn kill_installer(&mut self) {
        if let Some(mut inst) = self.installer.take() {
            inst.kill();
        }
    }

    /// SIGTERM to the installer, as the kubelet stops a DaemonSet pod in a rollout.
    pub fn stop_installer(&mut self) -> std::process::ExitStatus {
        self.installer.take().expect("installer running").stop()
    }

    /// Pod interfaces (veths) on the node's bridge.
    pub fn veths(&self) -> Vec<String> {
        self.ns
            .exec(&["ip", "-o", "link", "show", "type", "veth"])
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_string()))
            .collect()
    }

    /// Addresses host-local still holds.
    pub fn leased_ips(&self) -> Vec<String> {
        list_dir(&self.ipam_dir())
            .into_iter()
            .filter(|f| f.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    /// Mount points below the temp dir.
    pub fn mounts(&self) -> Vec<String> {
        mounts_below(self.tmp.path())
    }

    fn cleanup(&mut self) {
        // 1. Through the runtime while it is up: stop and remove what is left (CNI DEL).
        self.remove_sandboxes();
        // 2. The installer, then containerd (SIGTERM, then SIGKILL).
        if let Some(mut inst) = self.installer.take() {
            inst.kill();
        }
        self.stop_containerd();
        // 3. Containers and shims it left (only after a failure).
        self.remove_containers();
        // 4. Every mount below the temp dir (rootfs overlays, shm, the pods' netns), deepest
        // first, lazily.
        for m in self.mounts() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = nix::mount::umount2(self.tmp.path(), nix::mount::MntFlags::MNT_DETACH);
        // 5. What containerd keeps outside the temp dir: its shim sockets, and the host dirs.
        self.remove_shim_sockets();
        containerd::users(-1);
        // 6. The pods' cgroups (cgroupfs driver: one tree per hierarchy); a cgroup can be
        // removed once its last process is reaped.
        for mp in cgroup_mounts() {
            let top = Path::new(&mp).join(&self.cgroup_root);
            if top.exists() {
                let deadline = Instant::now() + Duration::from_secs(5);
                while top.exists() && Instant::now() < deadline {
                    remove_empty_dirs(&top);
                    if top.exists() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        // The node namespace and the temp dir go with the fields.
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[node-e2e] FAILED; containerd log (last lines):\n{}",
                tail(&self.containerd_log(), 40)
            );
            eprintln!(
                "[node-e2e] mesh-redirect log:\n{}",
                std::fs::read_to_string(self.plugin_log_path()).unwrap_or_default()
            );
            if let Some(i) = &self.installer {
                eprintln!("[node-e2e] installer log:\n{}", i.log());
            }
        }
        self.cleanup();
    }
}

pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Processes whose argv matches.
pub fn procs_with(pred: impl Fn(&[String]) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if pred(&argv) {
            out.push(pid);
        }
    }
    out
}

/// (mount point, fs type) of every mount, from mountinfo.
pub(crate) fn mountinfo() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let mp = f.get(4)?.replace("\\040", " ");
            let sep = f.iter().position(|x| *x == "-")?;
            Some((mp, f.get(sep + 1)?.to_string()))
        })
        .collect()
}

/// Bind-mounts `dir` onto itself and makes it a shared mount (its own peer group).
fn make_shared(dir: &Path) {
    use nix::mount::{MsFlags, mount};
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .expect("bind-mount the node dir onto itself");
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .expect("make the node dir a shared mount");
}

/// Mount points strictly below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    let mut v: Vec<String> = mountinfo()
        .into_iter()
        .map(|(mp, _)| mp)
        .filter(|mp| mp.starts_with(&prefix))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.len()));
    v.dedup();
    v
}

pub fn cgroup_mounts() -> Vec<String> {
    mountinfo()
        .into_iter()
        .filter(|(_, t)| t == "cgroup" || t == "cgroup2")
        .map(|(mp, _)| mp)
        .collect()
}

/// Removes `dir` and every directory below it that is empty (rmdir only: never a file).
pub(crate) fn remove_empty_dirs(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
