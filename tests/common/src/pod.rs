//! A pod as a node's runtime makes one: a node namespace (no uplink) with a pod namespace
//! attached by the real chain, `loopback`, then `bridge` + `host-local` + mesh-redirect from
//! one conflist.

use crate::cnichain::{Attachment, PluginError, Runtime};
use crate::netns::Netns;
use crate::paths::default_cni_path;
use crate::probe::{APP, Ident, PROXY, ROOT, connect, serve};
use crate::sys::{Proc, TempDir, require_root, unique};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Istio's sidecar marker annotation.
pub const STATUS: &str = "sidecar.istio.io/status";

pub const SUBNET4: &str = "10.88.0.0/24";
pub const GW4: &str = "10.88.0.1";
pub const SUBNET6: &str = "fd88::/64";
pub const GW6: &str = "fd88::1";

/// A node namespace (no uplink) with a pod namespace attached by the real chain:
/// `loopback`, then `bridge` + `host-local` + mesh-redirect from one conflist.
pub struct Pod {
    pub pod: Netns,
    pub node: Netns,
    pub tmp: TempDir,
    pub list: Value,
    pub att: Attachment,
    /// The chain's result: what the runtime caches and gives CHECK and DEL.
    pub result: Option<Value>,
    /// Each plugin's own ADD result, in the chain's order (the last is `result`).
    pub results: Vec<Value>,
    pub ip4: String,
    pub ip6: String,
    pub cni_path: Vec<PathBuf>,
}

/// How the runtime runs plugins for a pod on `node`.
pub fn runtime(node: &Netns) -> Runtime {
    Runtime {
        cni_path: default_cni_path(),
        exec_netns: Some(node.name.clone()),
    }
}

/// The test conflist: bridge with dual-stack host-local, then mesh-redirect.
pub fn conflist(data_dir: &Path, version: &str, mesh: Value) -> Value {
    let mut entry = json!({"type": "mesh-redirect", "capabilities": {"io.kubernetes.cri.pod-annotations": true}});
    if let (Some(e), Value::Object(extra)) = (entry.as_object_mut(), mesh) {
        e.extend(extra);
    }
    json!({
        "cniVersion": version,
        "name": "mrtest",
        "plugins": [
            {
                "type": "bridge", "bridge": "mr0", "isGateway": true,
                "ipam": {
                    "type": "host-local", "dataDir": data_dir.to_string_lossy(),
                    "ranges": [[{"subnet": SUBNET4}], [{"subnet": SUBNET6}]],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
                }
            },
            entry
        ]
    })
}

impl Pod {
    /// A pod with these annotations (`None`: the runtime passes none) and plugin-config keys.
    pub fn with(annotations: Option<Value>, mesh: Value) -> Result<Pod, PluginError> {
        Self::build(annotations, mesh, "1.0.0", "default")
    }

    /// A pod with a sidecar (the status annotation) plus these annotations.
    pub fn meshed(extra: &[(&str, &str)]) -> Pod {
        let mut ann = json!({STATUS: "{}"});
        for (k, v) in extra {
            ann[*k] = json!(v);
        }
        Self::with(Some(ann), json!({})).unwrap_or_else(|e| panic!("ADD failed: {e}"))
    }

    pub fn build(
        annotations: Option<Value>,
        mesh: Value,
        version: &str,
        namespace: &str,
    ) -> Result<Pod, PluginError> {
        let tmp = TempDir::new();
        let list = conflist(tmp.path(), version, mesh);
        Self::from_list(list, tmp, annotations, namespace)
    }

    /// A pod attached by the chain of `list` (whose host-local state lives in `tmp`).
    pub fn from_list(
        list: Value,
        tmp: TempDir,
        annotations: Option<Value>,
        namespace: &str,
    ) -> Result<Pod, PluginError> {
        Self::from_list_in(list, tmp, annotations, namespace, default_cni_path())
    }

    /// The same, finding plugins in `cni_path`.
    pub fn from_list_in(
        list: Value,
        tmp: TempDir,
        annotations: Option<Value>,
        namespace: &str,
        cni_path: Vec<PathBuf>,
    ) -> Result<Pod, PluginError> {
        require_root();
        let version = list["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
        let node = Netns::new("mrt-node-");
        let pod = Netns::new("mrt-pod-");
        let mut att = Attachment {
            container_id: unique("ctr"),
            netns: pod.path(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), namespace.into()),
                ("K8S_POD_NAME".into(), "web-0".into()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), "x".into()),
            ],
            ..Attachment::default()
        };
        if let Some(a) = annotations {
            att.cap_args
                .insert("io.kubernetes.cri.pod-annotations".into(), a);
        }
        let rt = Runtime {
            cni_path: cni_path.clone(),
            exec_netns: Some(node.name.clone()),
        };
        // The runtime brings lo up with the loopback plugin, outside the pod's conflist.
        let lo = json!({"cniVersion": version, "name": "cni-loopback", "type": "loopback"});
        rt.exec(
            "ADD",
            &lo,
            &Attachment {
                ifname: "lo".into(),
                ..att.clone()
            },
        )?;
        let mut p = Pod {
            pod,
            node,
            tmp,
            list,
            att,
            result: None,
            results: Vec::new(),
            ip4: String::new(),
            ip6: String::new(),
            cni_path,
        };
        let results = rt.add_each(&p.list, &p.att)?;
        let result = results.last().cloned().unwrap_or(Value::Null);
        for ip in result["ips"].as_array().into_iter().flatten() {
            let a = ip["address"].as_str().unwrap_or_default();
            let addr = a.split('/').next().unwrap_or_default().to_string();
            if addr.contains(':') {
                p.ip6 = addr;
            } else {
                p.ip4 = addr;
            }
        }
        p.result = Some(result);
        p.results = results;
        Ok(p)
    }

    pub fn runtime(&self) -> Runtime {
        Runtime {
            cni_path: self.cni_path.clone(),
            exec_netns: Some(self.node.name.clone()),
        }
    }

    /// The stand-in proxy: uid/gid 1337, outbound 15001, inbound 15006.
    pub fn proxy(&self) -> Proc {
        serve(&self.pod.path(), PROXY, "proxy", &[15001, 15006], &[])
    }

    /// An app server in the pod (uid 1000).
    pub fn app_server(&self, ports: &[u16]) -> Proc {
        serve(&self.pod.path(), APP, "app", ports, &[])
    }

    /// A server in the node namespace: the "rest of the cluster".
    pub fn node_server(&self, ports: &[u16]) -> Proc {
        serve(&self.node.path(), ROOT, "node", ports, &[])
    }

    /// A connection from inside the pod.
    pub fn dial_from_pod(&self, who: Ident, addr: &str) -> Result<String, String> {
        connect(&self.pod.path(), who, addr)
    }

    /// A connection from the node to the pod.
    pub fn dial_from_node(&self, addr: &str) -> Result<String, String> {
        connect(&self.node.path(), ROOT, addr)
    }

    /// Runs mesh-redirect alone with this pod's env and the given full config.
    pub fn plugin(&self, command: &str, conf: &Value) -> Result<Option<Value>, PluginError> {
        self.runtime().exec(command, conf, &self.att)
    }

    /// The config the runtime gives mesh-redirect (the chain's last entry) for this pod.
    pub fn mesh_conf(&self) -> Value {
        let entries = self.list["plugins"].as_array().cloned().unwrap_or_default();
        let entry = entries.last().cloned().unwrap_or_default();
        Runtime::plugin_conf(&self.list, &entry, self.result.as_ref(), &self.att)
    }

    pub fn check(&self) -> Result<(), PluginError> {
        self.runtime().check(
            &self.list,
            &self.att,
            self.result.as_ref().unwrap_or(&Value::Null),
        )
    }

    pub fn del(&self) -> Result<(), PluginError> {
        self.runtime()
            .del(&self.list, &self.att, self.result.as_ref())
    }
}
