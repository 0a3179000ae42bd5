//! A throwaway Kubernetes node without the kubelet: a network namespace with no uplink, a real
//! `containerd` (its CRI plugin, the `runc` shim) running inside it with every directory, socket
//! and config of its own under a temp dir, a locally built pause image, and the node installer
//! run as the DaemonSet runs it.
//!
//! Everything is undone on drop, also when the test panics: sandboxes (through the runtime, so
//! CNI DEL runs), the installer, containerd, shims and containers, every mount below the temp
//! dir, the cgroups, the shim sockets containerd 1.6 puts in /run/containerd/s, the node
//! namespace and the temp dir. The host's root network namespace is never touched.

use crate::cri::{self, Cri, PodSandboxConfig};
use common::agent::{AgentProc, Launch, Program};
use common::{Netns, REFERENCE_PLUGINS, TempDir, die_with_parent, run_cmd, tail, unique, wait_for};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "localhost/mesh-redirect-e2e/pause:e2e";
pub const READY_PORT: u16 = 15700;
pub const METRICS_PORT: u16 = 15701;
pub const PROMETHEUS_PORT: u16 = 19090;
/// The primary network's name and bridge subnet (inside the node namespace only).
pub const NETWORK: &str = "k8s-pod-network";
pub const SUBNET: &str = "10.88.0.0/24";
pub const GATEWAY: &str = "10.88.0.1";
/// A second node address on `lo`: "somewhere else in the cluster", for the excluded range.
pub const OTHER: &str = "10.99.0.1";
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
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

/// Whether overlayfs mounts work on the filesystem holding `dir` (else: the native snapshotter).
fn overlay_works(dir: &Path) -> bool {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let base = dir.join("overlay-check");
    let [l, u, w, m] = ["l", "u", "w", "m"].map(|d| base.join(d));
    for d in [&l, &u, &w, &m] {
        std::fs::create_dir_all(d).expect("overlay check dir");
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        l.display(),
        u.display(),
        w.display()
    );
    let ok = mount(
        Some("overlay"),
        &m,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .is_ok();
    if ok {
        let _ = umount2(&m, MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(&base);
    ok
}

/// One sandbox the test started: what the runtime says about it.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    /// The pod's network namespace, from the runtime spec in the verbose status.
    pub netns: String,
    pub ip: String,
}

pub struct Node {
    pub tmp: TempDir,
    pub ns: Netns,
    pub cri: Cri,
    pub snapshotter: &'static str,
    containerd: Option<Child>,
    installer: Option<AgentProc>,
    /// Every sandbox id the runtime gave us (for the shim sockets left in /run/containerd/s).
    ids: Vec<String>,
    /// The top cgroup of our pods (`cgroup_parent`), below every cgroup hierarchy.
    pub cgroup_root: String,
    /// /run/netns before the runtime started (nothing must appear there).
    pub run_netns_before: Vec<String>,
}

impl Node {
    pub fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    /// In a dir of its own, as /run/containerd on a node: the DaemonSet mounts the dir.
    pub fn socket(&self) -> PathBuf {
        self.dir("run/containerd.sock")
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
    pub fn netns_dir(&self) -> PathBuf {
        self.dir("state/io.containerd.grpc.v1.cri/netns")
    }
    pub fn containerd_log(&self) -> String {
        std::fs::read_to_string(self.dir("containerd.log")).unwrap_or_default()
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
        run_containerd_users(1);
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
        let snapshotter = if overlay_works(&root) {
            "overlayfs"
        } else {
            "native"
        };
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

    fn write_config(&self) {
        let r = self.tmp.path().display().to_string();
        let config = format!(
            r#"# containerd for mesh-redirect's node e2e test: everything below {r}.
version = 2
root = "{r}/root"
state = "{r}/state"
temp = "{r}/tmp"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{r}/run/containerd.sock"

# Unused (pods run on the v2 shim) but required by the tasks service; keep its runc root here.
[plugins."io.containerd.runtime.v1.linux"]
  runtime_root = "{r}/runc-v1"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  enable_selinux = false
  # CI machines here lack CAP_SYS_RESOURCE: the sandbox may not lower its oom_score_adj below
  # containerd's own (runc would fail with "can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  # The pods' netns mounts live under the state dir, not in the host's /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snap}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{r}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{r}/bin"
    conf_dir = "{r}/net.d"
    max_conf_num = 1
"#,
            snap = self.snapshotter
        );
        std::fs::write(self.dir("config.toml"), config).expect("write containerd config");
    }

    /// Kills containerd (SIGKILL: no clean shutdown) and starts it again on the same state,
    /// as a runtime crash and restart does on a node; the pods' shims and netns stay.
    pub fn restart_containerd(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start_containerd();
    }

    /// `StopPodSandbox` only (the runtime's CNI DEL runs, the sandbox stays listed NOTREADY).
    pub fn stop_pod(&self, sb: &Sandbox) {
        self.cri
            .stop_pod_sandbox(&sb.id)
            .unwrap_or_else(|e| panic!("StopPodSandbox {}: {e}", sb.name));
    }

    pub fn start_containerd(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir("containerd.log"))
            .expect("containerd log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.path()))
            .arg("--")
            .arg("containerd")
            .arg("--config")
            .arg(self.dir("config.toml"))
            .env("PATH", PATH_ENV)
            .env("TMPDIR", self.dir("tmp"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        die_with_parent(&mut cmd);
        self.containerd = Some(cmd.spawn().expect("start containerd"));
        let socket = self.socket();
        wait_for(30, "containerd's CRI socket to answer Version", || {
            if let Some(st) = self
                .containerd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "containerd exited ({st}) during start:\n{}",
                    tail(&self.containerd_log(), 30)
                );
            }
            let log = self.containerd_log();
            if let Some(l) = log
                .lines()
                .find(|l| l.contains("failed to load plugin io.containerd.grpc.v1.cri"))
            {
                panic!("containerd's CRI plugin did not load:\n{l}");
            }
            socket.exists() && self.cri.version().is_ok()
        });
    }

    /// Builds the pause image (a static binary in a one-layer OCI image) and imports it into
    /// the CRI's namespace; waits until the CRI's image service reports it.
    pub fn import_pause_image(&self) -> String {
        let dir = self.dir("image");
        let layer_dir = dir.join("layer");
        let blobs = dir.join("oci/blobs/sha256");
        std::fs::create_dir_all(&layer_dir).unwrap();
        std::fs::create_dir_all(&blobs).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node_e2e/pause.c");
        run_cmd(
            Command::new("cc")
                .args(["-static", "-Os", "-s", "-o"])
                .arg(layer_dir.join("pause"))
                .arg(&src),
        );
        let layer = dir.join("layer.tar");
        run_cmd(
            Command::new("tar")
                .args([
                    "--numeric-owner",
                    "--owner=0",
                    "--group=0",
                    "--mtime=@0",
                    "-C",
                ])
                .arg(&layer_dir)
                .arg("-cf")
                .arg(&layer)
                .arg("pause"),
        );
        let blob = |bytes: &[u8]| -> (String, usize) {
            let d = sha256_hex(bytes);
            std::fs::write(blobs.join(&d), bytes).expect("write blob");
            (format!("sha256:{d}"), bytes.len())
        };
        let (layer_digest, layer_size) = blob(&std::fs::read(&layer).unwrap());
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        });
        let (config_digest, config_size) = blob(config.to_string().as_bytes());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}],
        });
        let (manifest_digest, manifest_size) = blob(manifest.to_string().as_bytes());
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_size,
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {"io.containerd.image.name": IMAGE,
                                "org.opencontainers.image.ref.name": "e2e"},
            }],
        });
        std::fs::write(dir.join("oci/index.json"), index.to_string()).unwrap();
        std::fs::write(
            dir.join("oci/oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let tarball = dir.join("pause-image.tar");
        run_cmd(
            Command::new("tar")
                .arg("-C")
                .arg(dir.join("oci"))
                .arg("-cf")
                .arg(&tarball)
                .args(["oci-layout", "index.json", "blobs"]),
        );
        self.import_image(&tarball, IMAGE)
    }

    /// `ctr images import` of an image archive into the CRI's namespace (as a pull would put
    /// it there); waits until the CRI's image service knows `reference`. Its id.
    pub fn import_image(&self, tarball: &Path, reference: &str) -> String {
        run_cmd(
            Command::new("ctr")
                .arg("--address")
                .arg(self.socket())
                .args([
                    "--namespace",
                    "k8s.io",
                    "images",
                    "import",
                    "--snapshotter",
                    self.snapshotter,
                ])
                .arg(tarball),
        );
        let mut id = String::new();
        wait_for(
            30,
            &format!("the CRI image service to know {reference}"),
            || match self.cri.image_status(reference) {
                Ok(r) => match r.image {
                    Some(img) => {
                        id = img.id;
                        true
                    }
                    None => false,
                },
                Err(_) => false,
            },
        );
        id
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
        let mut args = vec!["--plugin-config", &cfg, "--cri-socket", &cri_socket];
        args.extend_from_slice(extra);
        self.installer = Some(
            Launch {
                program: Program::Plugin,
                ready_port: READY_PORT,
                metrics_port: Some(METRICS_PORT),
                // The agent reconciles through this node's containerd, often (a test's
                // patience).
                reconcile_period: "1",
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

    /// The network config the CRI plugin has loaded for pods (`eth0`), from `Status`.
    pub fn loaded_network(&self) -> Option<Value> {
        let st = self.cri.status().ok()?;
        let ready = st
            .status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.r#type == "NetworkReady" && c.status);
        if !ready {
            return None;
        }
        let cni: Value = serde_json::from_str(st.info.get("cniconfig")?).ok()?;
        let net = cni["Networks"]
            .as_array()?
            .iter()
            .find(|n| n["IFName"] == "eth0")?;
        serde_json::from_str(net["Config"]["Source"].as_str()?).ok()
    }

    /// Waits until the runtime has loaded exactly what the conf file holds now (containerd
    /// reloads its CNI config on inotify events, asynchronously).
    pub fn wait_runtime_loaded(&self, file: &Path) -> Value {
        let mut loaded = Value::Null;
        wait_for(20, "containerd to load the current CNI config", || {
            let Ok(text) = std::fs::read(file) else {
                return false;
            };
            let Ok(want) = serde_json::from_slice::<Value>(&text) else {
                return false;
            };
            match self.loaded_network() {
                Some(have) if have == want => {
                    loaded = have;
                    true
                }
                _ => false,
            }
        });
        loaded
    }

    /// A pod sandbox config exactly as the kubelet builds it (cgroupfs driver) for a pod with
    /// `annotations`; `kubelet_annotations` adds the two the kubelet puts on every pod it gets
    /// from the API server.
    pub fn pod_config(
        &self,
        name: &str,
        namespace: &str,
        annotations: &[(&str, &str)],
        kubelet_annotations: bool,
    ) -> PodSandboxConfig {
        let n = unique("");
        let uid = format!("7e1c0de5-0000-4000-8000-{:012x}", uid48(&n));
        let mut ann: HashMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if kubelet_annotations {
            ann.insert(
                "kubernetes.io/config.seen".into(),
                "2025-01-01T00:00:00.000000000Z".into(),
            );
            ann.insert("kubernetes.io/config.source".into(), "api".into());
        }
        let labels = HashMap::from([
            ("app".to_string(), name.to_string()),
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                namespace.to_string(),
            ),
            ("io.kubernetes.pod.uid".to_string(), uid.clone()),
        ]);
        let log_dir = self.dir("pods").join(format!("{namespace}_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir).unwrap();
        PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.display().to_string(),
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec![
                    format!("{namespace}.svc.cluster.local"),
                    "svc.cluster.local".into(),
                    "cluster.local".into(),
                ],
                options: vec!["ndots:5".into()],
            }),
            labels,
            annotations: ann,
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}/besteffort/pod{uid}", self.cgroup_root),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NAMESPACE_POD,
                        pid: cri::NAMESPACE_CONTAINER,
                        ipc: cri::NAMESPACE_POD,
                        ..Default::default()
                    }),
                    privileged: false,
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: cri::PROFILE_UNCONFINED,
                        localhost_ref: String::new(),
                    }),
                    ..Default::default()
                }),
                sysctls: HashMap::new(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `RunPodSandbox`; on success, the sandbox with its netns and IP from `PodSandboxStatus`.
    pub fn run_pod(&mut self, config: PodSandboxConfig) -> Result<Sandbox, cri::CallError> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self.cri.run_pod_sandbox(config)?;
        self.ids.push(id.clone());
        let st = self
            .cri
            .pod_sandbox_status(&id)
            .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e}"));
        let status = st.status.expect("sandbox status");
        assert_eq!(status.state, cri::SANDBOX_READY, "sandbox {name} not ready");
        let info: Value =
            serde_json::from_str(st.info.get("info").expect("verbose info")).expect("info is JSON");
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .unwrap_or_else(|| panic!("no network namespace path in the runtime spec: {info}"))
            .to_string();
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        assert!(!ip.is_empty(), "sandbox {name} has no IP");
        Ok(Sandbox {
            id,
            name,
            netns,
            ip,
        })
    }

    /// `RunPodSandbox` for a pod on the host network (no netns, no IP of its own): its id.
    pub fn run_host_sandbox(&mut self, config: PodSandboxConfig) -> Result<String, cri::CallError> {
        let id = self.cri.run_pod_sandbox(config)?;
        self.ids.push(id.clone());
        Ok(id)
    }

    /// `StopPodSandbox` then `RemovePodSandbox`, as the kubelet deletes a pod.
    pub fn remove_pod(&self, sb: &Sandbox) {
        self.cri
            .stop_pod_sandbox(&sb.id)
            .unwrap_or_else(|e| panic!("StopPodSandbox {}: {e}", sb.name));
        self.cri
            .remove_pod_sandbox(&sb.id)
            .unwrap_or_else(|e| panic!("RemovePodSandbox {}: {e}", sb.name));
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

    /// Shim processes serving this containerd.
    pub fn shims(&self) -> Vec<i32> {
        let sock = self.socket().display().to_string();
        procs_with(|argv| {
            argv.first()
                .is_some_and(|a| a.ends_with("containerd-shim-runc-v2"))
                && argv.windows(2).any(|w| w[0] == "-address" && w[1] == sock)
        })
    }

    /// Mount points below the temp dir.
    pub fn mounts(&self) -> Vec<String> {
        mounts_below(self.tmp.path())
    }

    fn cleanup(&mut self) {
        // 1. Through the runtime while it is up: stop and remove what is left (CNI DEL).
        self.cri.timeout = Duration::from_secs(10);
        if self
            .containerd
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        {
            if let Ok(items) = self.cri.list_pod_sandbox() {
                for sb in items {
                    let _ = self.cri.stop_pod_sandbox(&sb.id);
                    let _ = self.cri.remove_pod_sandbox(&sb.id);
                }
            }
        }
        // 2. The installer, then containerd (SIGTERM, then SIGKILL).
        if let Some(mut inst) = self.installer.take() {
            inst.kill();
        }
        if let Some(mut c) = self.containerd.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // 3. Containers and shims it left (only after a failure).
        let runc_root = self.dir("runc/k8s.io");
        for id in list_dir(&runc_root) {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force", &id])
                .env("PATH", PATH_ENV)
                .output();
        }
        for pid in self.shims() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // 4. Every mount below the temp dir (rootfs overlays, shm, the pods' netns), deepest
        // first, lazily.
        for m in self.mounts() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = nix::mount::umount2(self.tmp.path(), nix::mount::MntFlags::MNT_DETACH);
        // 5. The shim sockets containerd 1.6 keeps in /run/containerd/s: sha256 of
        // "<grpc address>/<namespace>/<sandbox id>".
        let sock = self.socket().display().to_string();
        for id in &self.ids {
            let h = sha256_hex(format!("{sock}/k8s.io/{id}").as_bytes());
            let _ = std::fs::remove_file(Path::new("/run/containerd/s").join(h));
        }
        run_containerd_users(-1);
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

/// A real Prometheus (Debian's) in the node namespace, scraping the agent every second.
pub struct Prometheus {
    child: Child,
    ns: String,
    pub log: PathBuf,
}

impl Prometheus {
    pub fn start(node: &Node) -> Prometheus {
        let dir = node.dir("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: mesh-redirect\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{METRICS_PORT}']\n"
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.ns.path()))
            .arg("--")
            .arg("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        die_with_parent(&mut cmd);
        let p = Prometheus {
            child: cmd.spawn().expect("start prometheus"),
            ns: node.ns.path(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while common::http_get_in(&p.ns, PROMETHEUS_PORT, "/-/ready").is_none_or(|(c, _)| c != 200)
        {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                tail(&std::fs::read_to_string(&p.log).unwrap_or_default(), 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// An instant query's result vector, or Prometheus's error.
    pub fn instant(&self, expr: &str) -> Result<Vec<Value>, String> {
        let enc: String = expr
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let (code, body) = common::http_get_in(
            &self.ns,
            PROMETHEUS_PORT,
            &format!("/api/v1/query?query={enc}"),
        )
        .ok_or("Prometheus did not answer")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if code != 200 || v["status"] != "success" {
            return Err(format!("{code}: {}", v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// An instant query's single value (None: no result).
    pub fn query(&self, expr: &str) -> Option<f64> {
        let r = self.instant(expr).ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until the query gives `want` (Prometheus scrapes every second).
    pub fn wait(&self, expr: &str, want: f64) {
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            last = self.query(expr);
            if last == Some(want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "Prometheus: {expr} = {last:?}, want {want}\n{}",
            tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 20)
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 48 bits of a name's FNV-1a hash: the last group of a pod UID made from it.
pub fn uid48(s: &str) -> u64 {
    mesh_redirect::install::files::fnv1a(s.as_bytes()) & 0xffff_ffff_ffff
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
fn mountinfo() -> Vec<(String, String)> {
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

/// Host dirs containerd makes outside the node's temp dir: its shim sockets (1.6) and libcni's
/// result cache (go-cni has no setting for it).
const HOST_DIRS: [&str; 2] = ["/run/containerd", "/var/lib/cni"];

/// Counts the nodes alive in this process (tests run in parallel): the first notes which of
/// HOST_DIRS existed, the last removes the empty dirs left in the others.
fn run_containerd_users(delta: i32) {
    use std::sync::Mutex;
    static STATE: Mutex<(i32, [bool; 2])> = Mutex::new((0, [false; 2]));
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if delta > 0 && st.0 == 0 {
        st.1 = HOST_DIRS.map(|d| !Path::new(d).exists());
    }
    st.0 += delta;
    if st.0 == 0 {
        for (d, made) in HOST_DIRS.iter().zip(st.1) {
            if made {
                remove_empty_dirs(Path::new(d));
            }
        }
    }
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
fn remove_empty_dirs(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
