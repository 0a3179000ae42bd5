//! What the kubelet does with deploy/'s DaemonSet pod, without the kubelet: the manifests read
//! as shipped, deploy/ or one of its overlays rendered as `kubectl kustomize` renders them
//! (tests/node_e2e/kustomize.rs: resources, the generated ConfigMap, patches, namespace,
//! images), and the pod template translated into the CRI requests the kubelet would send —
//! host network, command and args with `$(VAR)` expanded, env with field references resolved,
//! the ConfigMap's data as a mounted file, each hostPath volume as a mount with its
//! propagation, resources, and the security context as the kubelet maps it (capabilities,
//! read-only root, user and group, `no_new_privs` from `allowPrivilegeEscalation`, seccomp,
//! the default masked and read-only /proc paths).
//!
//! A field this translation does not know fails the test by name: the manifest cannot grow a
//! line that the test silently ignores.

use crate::cri::{self, ContainerConfig, PodSandboxConfig};
use crate::node::Node;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The manifests as `kubectl apply -k deploy/` (or `deploy/overlays/NAME`) would send them.
pub struct Deploy {
    /// `deploy` or `deploy/overlays/NAME`, relative to the repository.
    pub dir: String,
    pub namespace: String,
    pub daemonset: Value,
    /// By name, as rendered (a generated one with its content hash in its name).
    configmaps: HashMap<String, Value>,
    /// daemonset.yaml's text, for the line a failure points at.
    text: String,
}

const DS_FILE: &str = "deploy/base/daemonset.yaml";

impl Deploy {
    /// deploy/ as shipped.
    pub fn load() -> Deploy {
        Deploy::render("deploy")
    }

    /// deploy/overlays/`name` as shipped.
    pub fn overlay(name: &str) -> Deploy {
        Deploy::render(&format!("deploy/overlays/{name}"))
    }

    fn render(dir: &str) -> Deploy {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join(DS_FILE)).expect("read the DaemonSet");
        let mut d = Deploy {
            dir: dir.to_string(),
            namespace: String::new(),
            daemonset: Value::Null,
            configmaps: HashMap::new(),
            text,
        };
        for v in crate::kustomize::build(&root.join(dir)) {
            match v["kind"].as_str() {
                Some("DaemonSet") => {
                    assert!(d.daemonset.is_null(), "two DaemonSets in {dir}");
                    d.namespace = v["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_string();
                    d.daemonset = v;
                }
                Some("ConfigMap") => {
                    let name = v["metadata"]["name"].as_str().expect("name").to_string();
                    d.configmaps.insert(name, v);
                }
                _ => {}
            }
        }
        assert!(!d.daemonset.is_null(), "no DaemonSet in {dir}");
        d
    }

    /// (volume name, path) of each hostPath volume.
    pub fn host_paths(&self) -> Vec<(String, String)> {
        self.pod_spec()["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                Some((
                    v["name"].as_str()?.to_string(),
                    v["hostPath"]["path"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    pub fn pod_spec(&self) -> &Value {
        &self.daemonset["spec"]["template"]["spec"]
    }

    /// The one container (the test knows no other).
    pub fn container(&self) -> &Value {
        let c = self.pod_spec()["containers"]
            .as_array()
            .expect("containers");
        assert_eq!(c.len(), 1, "the DaemonSet has one container");
        assert!(
            self.pod_spec()["initContainers"].is_null(),
            "init containers are not translated"
        );
        &c[0]
    }

    pub fn container_mut(&mut self) -> &mut Value {
        &mut self.daemonset["spec"]["template"]["spec"]["containers"][0]
    }

    /// The container's image (kustomize's `images:` transform applied).
    pub fn image(&self) -> String {
        self.container()["image"]
            .as_str()
            .expect("image")
            .to_string()
    }

    /// `--flag=value` from the container's args.
    pub fn arg(&self, flag: &str) -> Option<String> {
        self.container()["args"]
            .as_array()?
            .iter()
            .filter_map(Value::as_str)
            .find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_string))
    }

    /// `deploy/daemonset.yaml:N: `line`` for the first line containing `needle`.
    pub fn line(&self, needle: &str) -> String {
        match self
            .text
            .lines()
            .enumerate()
            .find(|(_, l)| l.contains(needle))
        {
            Some((n, l)) => format!("{DS_FILE}:{}: `{}`", n + 1, l.trim()),
            None => format!("{DS_FILE} (no line with `{needle}`)"),
        }
    }

    /// (host, port, path) of an httpGet probe, the port resolved by name if named.
    pub fn probe(&self, which: &str) -> (String, u16, String) {
        let p = &self.container()[which]["httpGet"];
        assert!(p.is_object(), "{which} is not an httpGet probe");
        let port = match &p["port"] {
            Value::String(name) => self.port(name),
            v => v.as_u64().expect("probe port") as u16,
        };
        (
            p["host"].as_str().unwrap_or("").to_string(),
            port,
            p["path"].as_str().unwrap_or("/").to_string(),
        )
    }

    pub fn port(&self, name: &str) -> u16 {
        self.container()["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port named {name}")) as u16
    }

    pub fn grace_seconds(&self) -> i64 {
        self.pod_spec()["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30)
    }
}

/// The kubelet's part: where hostPaths are on this test node, the node's address.
pub struct Kubelet {
    /// `status.hostIP`.
    pub host_ip: String,
    /// A manifest hostPath → the path on this test node that stands for it.
    pub host_paths: Vec<(String, PathBuf)>,
    /// Where volumes (ConfigMap files) and termination logs are written.
    pub dir: PathBuf,
}

/// A DaemonSet pod the kubelet started.
pub struct PodRun {
    pub sandbox: String,
    pub container: String,
    pub log: PathBuf,
}

const KNOWN_CONTAINER_FIELDS: &[&str] = &[
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "ports",
    "readinessProbe",
    "livenessProbe",
    "resources",
    "securityContext",
    "volumeMounts",
];
const KNOWN_SECURITY_FIELDS: &[&str] = &[
    "runAsUser",
    "runAsGroup",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "capabilities",
    "seccompProfile",
    "privileged",
];
/// The kubelet's defaults for a non-privileged container (`procMount: Default`).
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The `kubernetes` service's ClusterIP the kubelet tells containers about (never reached: the
/// agent's bypass probe redirects its own connection to itself).
pub const SERVICE_HOST: &str = "10.96.0.1";

/// `$(VAR)` expanded from `env` (unknown references stay as written; `$$` escapes), as the
/// kubelet expands command, args and env values.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(close) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let name = &after[1..=close];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &after[close + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A CPU quantity in millicores ("5m", "1", "0.5").
fn millicores(q: &str) -> i64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse().expect("cpu quantity"),
        None => (q.parse::<f64>().expect("cpu quantity") * 1000.0) as i64,
    }
}

/// A memory quantity in bytes ("64Mi", "1G", "1024").
fn bytes(q: &str) -> i64 {
    for (suffix, mult) in [
        ("Ki", 1i64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<i64>().expect("memory quantity") * mult;
        }
    }
    q.parse().expect("memory quantity")
}

impl Kubelet {
    fn host_path(&self, path: &str) -> Result<PathBuf, String> {
        self.host_paths
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, local)| local.clone())
            .ok_or_else(|| {
                format!("hostPath {path}: the test node has no stand-in for it (tests/node_e2e/kubelet.rs)")
            })
    }

    /// The pod sandbox: host network, the template's labels and annotations.
    pub fn sandbox_config(&self, node: &Node, d: &Deploy, name: &str) -> PodSandboxConfig {
        let spec = d.pod_spec();
        assert_eq!(
            spec["hostNetwork"],
            Value::Bool(true),
            "the test runs a hostNetwork pod"
        );
        // Unique per pod, as the API server's uids are (the cgroup parent and log dir use it).
        let uid = format!(
            "da3a5e70-0000-4000-8000-{:012x}",
            crate::containerd::uid48(&common::unique(name))
        );
        let meta = &d.daemonset["spec"]["template"]["metadata"];
        let strings = |v: &Value| -> HashMap<String, String> {
            v.as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        };
        let mut labels = strings(&meta["labels"]);
        labels.insert("io.kubernetes.pod.name".into(), name.into());
        labels.insert("io.kubernetes.pod.namespace".into(), d.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
        let mut annotations = strings(&meta["annotations"]);
        annotations.insert("kubernetes.io/config.source".into(), "api".into());
        let log_dir = node
            .dir("pods")
            .join(format!("{}_{name}_{uid}", d.namespace));
        std::fs::create_dir_all(&log_dir).expect("pod log dir");
        let port_mappings = d.container()["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let port = p["containerPort"].as_i64().expect("containerPort") as i32;
                cri::PortMapping {
                    protocol: cri::Protocol::Tcp as i32,
                    container_port: port,
                    // hostNetwork: the host port is the container port.
                    host_port: port,
                    host_ip: String::new(),
                }
            })
            .collect();
        PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: d.namespace.clone(),
                attempt: 0,
            }),
            log_directory: log_dir.display().to_string(),
            port_mappings,
            labels,
            annotations,
            linux: Some(cri::LinuxPodSandboxConfig {
                // requests < limits: a Burstable pod.
                cgroup_parent: format!("/{}/burstable/pod{uid}", node.cgroup_root),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NAMESPACE_NODE,
                        pid: cri::NAMESPACE_CONTAINER,
                        ipc: cri::NAMESPACE_POD,
                        ..Default::default()
                    }),
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: cri::PROFILE_UNCONFINED,
                        localhost_ref: String::new(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The container, as the kubelet translates it. `Err` where the kubelet itself would
    /// refuse (a hostPath of type Directory that does not exist).
    pub fn container_config(&self, d: &Deploy, pod: &str) -> Result<ContainerConfig, String> {
        let c = d.container();
        for k in c.as_object().expect("container").keys() {
            assert!(
                KNOWN_CONTAINER_FIELDS.contains(&k.as_str()),
                "{}: the test does not translate the container field `{k}` \
                 (teach tests/node_e2e/kubelet.rs)",
                d.line(&format!("{k}:"))
            );
        }
        let name = c["name"].as_str().expect("container name").to_string();
        // The kubelet puts the cluster's `kubernetes` service in every container's env (host
        // network too), then the container's own env, in order, each value expanded from the
        // ones before.
        let mut env: Vec<(String, String)> = [
            ("KUBERNETES_SERVICE_HOST", SERVICE_HOST),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for e in c["env"].as_array().into_iter().flatten() {
            let k = e["name"].as_str().expect("env name").to_string();
            let v = if let Some(v) = e["value"].as_str() {
                expand(v, &env)
            } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match f {
                    "status.hostIP" | "status.podIP" => self.host_ip.clone(),
                    "spec.nodeName" => "node-e2e".into(),
                    "metadata.name" => pod.into(),
                    "metadata.namespace" => d.namespace.clone(),
                    other => panic!("env {k}: fieldRef {other} is not translated"),
                }
            } else {
                panic!("env {k}: only value and valueFrom.fieldRef are translated")
            };
            env.push((k, v));
        }
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|s| expand(s.as_str().expect("a string"), &env))
                .collect()
        };
        let command = strings(&c["command"]);
        let args = strings(&c["args"]);

        let mut mounts = Vec::new();
        let volumes = d.pod_spec()["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().expect("volumeMount name");
            let vol = volumes
                .iter()
                .find(|v| v["name"] == vname)
                .unwrap_or_else(|| panic!("volumeMount {vname} has no volume"));
            let mut readonly = m["readOnly"].as_bool().unwrap_or(false);
            let host = if let Some(p) = vol["hostPath"]["path"].as_str() {
                let local = self.host_path(p)?;
                match vol["hostPath"]["type"].as_str().unwrap_or("") {
                    "DirectoryOrCreate" => {
                        std::fs::create_dir_all(&local).map_err(|e| e.to_string())?
                    }
                    "Directory" if !local.is_dir() => {
                        return Err(format!(
                            "MountVolume.SetUp failed for volume \"{vname}\": hostPath type check failed: {p} is not a directory"
                        ));
                    }
                    "File" if !local.is_file() => {
                        return Err(format!(
                            "MountVolume.SetUp failed for volume \"{vname}\": hostPath type check failed: {p} is not a file"
                        ));
                    }
                    "Directory" | "File" | "" => {}
                    t => panic!("hostPath type {t} is not translated"),
                }
                local
            } else if let Some(cm) = vol["configMap"]["name"].as_str() {
                let data = &d
                    .configmaps
                    .get(cm)
                    .unwrap_or_else(|| panic!("ConfigMap {cm} is not in {}", d.dir))["data"];
                let dir = self.dir.join(pod).join("volumes").join(vname);
                std::fs::create_dir_all(&dir).expect("configmap volume dir");
                for (k, v) in data.as_object().into_iter().flatten() {
                    std::fs::write(dir.join(k), v.as_str().expect("configmap data"))
                        .expect("write configmap file");
                }
                // ConfigMap volumes are always mounted read-only.
                readonly = true;
                dir
            } else {
                panic!("volume {vname}: only hostPath and configMap are translated")
            };
            let propagation = match m["mountPropagation"].as_str().unwrap_or("None") {
                "None" => cri::MountPropagation::PropagationPrivate,
                "HostToContainer" => cri::MountPropagation::PropagationHostToContainer,
                "Bidirectional" => cri::MountPropagation::PropagationBidirectional,
                other => panic!("mountPropagation {other}"),
            } as i32;
            mounts.push(cri::Mount {
                container_path: m["mountPath"].as_str().expect("mountPath").into(),
                host_path: host.display().to_string(),
                readonly,
                propagation,
                ..Default::default()
            });
        }
        // The termination message file the kubelet mounts in every container.
        let term = self.dir.join(pod).join("termination-log");
        std::fs::create_dir_all(term.parent().unwrap()).expect("pod dir");
        std::fs::write(&term, "").expect("termination log");
        mounts.push(cri::Mount {
            container_path: "/dev/termination-log".into(),
            host_path: term.display().to_string(),
            ..Default::default()
        });

        let sc = &c["securityContext"];
        for k in sc.as_object().into_iter().flatten().map(|(k, _)| k) {
            assert!(
                KNOWN_SECURITY_FIELDS.contains(&k.as_str()),
                "{}: securityContext.{k} is not translated (teach tests/node_e2e/kubelet.rs)",
                d.line(&format!("{k}:"))
            );
        }
        let int = |v: &Value| v.as_i64().map(|value| cri::Int64Value { value });
        let add_capabilities = strings(&sc["capabilities"]["add"]);
        let drop_capabilities = strings(&sc["capabilities"]["drop"]);
        let seccomp = match sc["seccompProfile"]["type"].as_str() {
            Some("RuntimeDefault") => cri::PROFILE_RUNTIME_DEFAULT,
            Some("Unconfined") | None => cri::PROFILE_UNCONFINED,
            Some(other) => panic!("seccompProfile {other} is not translated"),
        };
        let res = &c["resources"];
        let cpu_req = res["requests"]["cpu"].as_str().map_or(0, millicores);
        let cpu_lim = res["limits"]["cpu"].as_str().map_or(0, millicores);
        let resources = cri::LinuxContainerResources {
            cpu_period: if cpu_lim > 0 { 100_000 } else { 0 },
            cpu_quota: cpu_lim * 100_000 / 1000,
            cpu_shares: (cpu_req * 1024 / 1000).max(2),
            memory_limit_in_bytes: res["limits"]["memory"].as_str().map_or(0, bytes),
            // The kubelet's score for a system-node-critical pod; containerd (configured with
            // restrict_oom_score_adj) raises it to its own.
            oom_score_adj: -997,
            ..Default::default()
        };
        Ok(ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: d.image(),
                ..Default::default()
            }),
            command,
            args,
            envs: env
                .into_iter()
                .map(|(key, value)| cri::KeyValue { key, value })
                .collect(),
            mounts,
            log_path: format!("{name}/0.log"),
            labels: HashMap::from([
                ("io.kubernetes.container.name".to_string(), name.clone()),
                ("io.kubernetes.pod.name".to_string(), pod.to_string()),
                (
                    "io.kubernetes.pod.namespace".to_string(),
                    d.namespace.clone(),
                ),
            ]),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(resources),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability {
                        add_capabilities,
                        drop_capabilities,
                        ..Default::default()
                    }),
                    privileged: sc["privileged"].as_bool().unwrap_or(false),
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NAMESPACE_NODE,
                        pid: cri::NAMESPACE_CONTAINER,
                        ipc: cri::NAMESPACE_POD,
                        ..Default::default()
                    }),
                    run_as_user: int(&sc["runAsUser"]),
                    run_as_group: int(&sc["runAsGroup"]),
                    readonly_rootfs: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
                    // The kubelet: no_new_privs = !allowPrivilegeEscalation, when set.
                    no_new_privs: sc["allowPrivilegeEscalation"] == Value::Bool(false),
                    masked_paths: MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
                    readonly_paths: READONLY_PATHS.iter().map(|s| s.to_string()).collect(),
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: seccomp,
                        localhost_ref: String::new(),
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        })
    }

    /// RunPodSandbox, CreateContainer, StartContainer. `Err`: what `kubectl describe` would show.
    pub fn run(&self, node: &mut Node, d: &Deploy, pod: &str) -> Result<PodRun, String> {
        let sb_config = self.sandbox_config(node, d, pod);
        let log_dir = PathBuf::from(&sb_config.log_directory);
        let config = self.container_config(d, pod)?;
        let log = log_dir.join(&config.log_path);
        let sandbox = node
            .run_host_sandbox(sb_config.clone())
            .map_err(|e| format!("RunPodSandbox: {e}"))?;
        let run = |sandbox: &str| -> Result<String, String> {
            let id = node
                .cri
                .create_container(sandbox, config, sb_config)
                .map_err(|e| format!("CreateContainer: {e}"))?;
            node.cri
                .start_container(&id)
                .map_err(|e| format!("StartContainer: {e}"))?;
            Ok(id)
        };
        match run(&sandbox) {
            Ok(container) => Ok(PodRun {
                sandbox,
                container,
                log,
            }),
            Err(e) => {
                let _ = node.cri.stop_pod_sandbox(&sandbox);
                let _ = node.cri.remove_pod_sandbox(&sandbox);
                Err(e)
            }
        }
    }

    /// Deletes the pod as the kubelet does: StopContainer with the grace period, then the
    /// sandbox. The container's exit code.
    pub fn delete(&self, node: &Node, d: &Deploy, run: &PodRun) -> i32 {
        node.cri
            .stop_container(&run.container, d.grace_seconds())
            .unwrap_or_else(|e| panic!("StopContainer: {e}"));
        let code = node
            .cri
            .container_status(&run.container)
            .map(|s| s.exit_code)
            .unwrap_or(-1);
        let _ = node.cri.remove_container(&run.container);
        let _ = node.cri.stop_pod_sandbox(&run.sandbox);
        let _ = node.cri.remove_pod_sandbox(&run.sandbox);
        code
    }
}

/// The container's log lines (CRI format: `TIME STREAM TAG MESSAGE`): the messages.
pub fn log_messages(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_string))
        .collect()
}

#[test]
fn kubelet_expansion() {
    let env = vec![("A".to_string(), "1".to_string())];
    assert_eq!(expand("x=$(A):$(B)$$(A)$", &env), "x=1:$(B)$(A)$");
    assert_eq!(millicores("5m"), 5);
    assert_eq!(millicores("1.5"), 1500);
    assert_eq!(bytes("64Mi"), 64 << 20);
}
