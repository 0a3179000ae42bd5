//! The node's container runtime: a real `containerd` (its CRI plugin, the `runc` shim) run in
//! the node's network namespace with its root, state, socket and config under the node's temp
//! dir; the CRI calls the kubelet makes (sandboxes, images); a locally built pause image
//! (no registry is reachable); and taking it all down again.

use crate::cri::{self, PodSandboxConfig};
use crate::node::{Node, PATH_ENV, list_dir, procs_with, remove_empty_dirs};
use common::{die_with_parent, run_cmd, tail, unique, wait_for};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "localhost/mesh-redirect-e2e/pause:e2e";

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

/// The snapshotter for a node whose dirs are on the filesystem holding `root`.
pub fn snapshotter_for(root: &Path) -> &'static str {
    if overlay_works(root) {
        "overlayfs"
    } else {
        "native"
    }
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

impl Node {
    /// In a dir of its own, as /run/containerd on a node: the DaemonSet mounts the dir.
    pub fn socket(&self) -> PathBuf {
        self.dir("run/containerd.sock")
    }
    pub fn netns_dir(&self) -> PathBuf {
        self.dir("state/io.containerd.grpc.v1.cri/netns")
    }
    pub fn containerd_log(&self) -> String {
        std::fs::read_to_string(self.dir("containerd.log")).unwrap_or_default()
    }
    pub(crate) fn write_config(&self) {
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

    /// Shim processes serving this containerd.
    pub fn shims(&self) -> Vec<i32> {
        let sock = self.socket().display().to_string();
        procs_with(|argv| {
            argv.first()
                .is_some_and(|a| a.ends_with("containerd-shim-runc-v2"))
                && argv.windows(2).any(|w| w[0] == "-address" && w[1] == sock)
        })
    }

    /// Stops and removes, through the runtime while it is up, every sandbox left (CNI DEL).
    pub(crate) fn remove_sandboxes(&mut self) {
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
    }

    /// containerd: SIGTERM, then SIGKILL after 10 s.
    pub(crate) fn stop_containerd(&mut self) {
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
    }

    /// Containers and shims a stopped containerd left (only after a failure).
    pub(crate) fn remove_containers(&mut self) {
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
    }

    /// The shim sockets containerd 1.6 keeps in /run/containerd/s: sha256 of
    /// "<grpc address>/<namespace>/<sandbox id>".
    pub(crate) fn remove_shim_sockets(&mut self) {
        let sock = self.socket().display().to_string();
        for id in &self.ids {
            let h = sha256_hex(format!("{sock}/k8s.io/{id}").as_bytes());
            let _ = std::fs::remove_file(Path::new("/run/containerd/s").join(h));
        }
    }
}

/// 48 bits of a name's FNV-1a hash: the last group of a pod UID made from it.
pub fn uid48(s: &str) -> u64 {
    mesh_redirect::install::files::fnv1a(s.as_bytes()) & 0xffff_ffff_ffff
}

/// Host dirs containerd makes outside the node's temp dir: its shim sockets (1.6) and libcni's
/// result cache (go-cni has no setting for it).
const HOST_DIRS: [&str; 2] = ["/run/containerd", "/var/lib/cni"];

/// Counts the nodes alive in this process (tests run in parallel): the first notes which of
/// HOST_DIRS existed, the last removes the empty dirs left in the others.
pub fn users(delta: i32) {
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
