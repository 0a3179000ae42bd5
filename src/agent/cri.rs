//! The CRI client the agent (and the node e2e test) use: `k8s-cri`'s generated `runtime.v1`
//! client over the runtime's unix socket, behind a small blocking API. The agent works in
//! plain threads (setns is per thread); each call runs to completion on a private
//! current-thread tokio runtime.

use hyper_util::rt::TokioIo;
pub use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ListPodSandboxRequest, PodSandbox, PodSandboxFilter, PodSandboxState, PodSandboxStateValue,
    PodSandboxStatusRequest, PodSandboxStatusResponse,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where runtimes serve the CRI, in the order crictl tries them.
pub const DEFAULT_SOCKETS: [&str; 3] = [
    "/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/var/run/cri-dockerd.sock",
];

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to the CRI socket {0}: {1}")]
    Connect(PathBuf, String),
    #[error("CRI call {0} failed: {1}")]
    Call(&'static str, tonic::Status),
    #[error("cannot start an async runtime: {0}")]
    Runtime(std::io::Error),
}

impl CriError {
    /// The conversation broke (no answer from the runtime), as opposed to the runtime
    /// answering with an error. tonic reports a broken connection as a status too, with the
    /// transport error as its source; a runtime's own error status has none.
    pub fn is_transport(&self) -> bool {
        match self {
            CriError::Call(_, s) => {
                std::error::Error::source(s).is_some() || s.code() == tonic::Code::Unavailable
            }
            CriError::Connect(..) | CriError::Runtime(_) => true,
        }
    }

    /// The object is gone (a sandbox removed while we looked at it).
    pub fn is_not_found(&self) -> bool {
        matches!(self, CriError::Call(_, s) if s.code() == tonic::Code::NotFound)
    }

    /// The gRPC status, for callers that expect a refusal (a RunPodSandbox the CNI failed).
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            CriError::Call(_, s) => Some(s),
            _ => None,
        }
    }
}

/// A connected CRI client (runtime and image services over one channel).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    pub socket: PathBuf,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// The first of `DEFAULT_SOCKETS` that exists.
pub fn find_socket() -> Option<PathBuf> {
    DEFAULT_SOCKETS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Cri {
    /// Connects to the runtime's socket (and fails fast when nothing listens there).
    pub fn connect(socket: &Path) -> Result<Cri, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_path_buf();
        let connect_path = path.clone();
        let channel = rt
            .block_on(async move {
                // The URI only fills :authority; the connector dials the socket.
                Endpoint::from_static("http://localhost")
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(30))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let p = connect_path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(p).await?,
                            ))
                        }
                    }))
                    .await
            })
            .map_err(|e| CriError::Connect(path.clone(), error_chain(&e)))?;
        // kubelet's limit: a node's list of containers can exceed tonic's default 4 MiB.
        let runtime =
            RuntimeServiceClient::new(channel.clone()).max_decoding_message_size(16 << 20);
        let images = ImageServiceClient::new(channel).max_decoding_message_size(16 << 20);
        Ok(Cri {
            rt,
            socket: path,
            runtime,
            images,
        })
    }

    /// Runs one call on the runtime service (any RPC: tests run pods and containers through
    /// it as the kubelet does).
    pub fn call<T, F>(
        &self,
        what: &'static str,
        f: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T, CriError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.runtime.clone();
        self.rt
            .block_on(f(client))
            .map(tonic::Response::into_inner)
            .map_err(|s| CriError::Call(what, s))
    }

    /// Runs one call on the image service.
    pub fn call_images<T, F>(
        &self,
        what: &'static str,
        f: impl FnOnce(ImageServiceClient<Channel>) -> F,
    ) -> Result<T, CriError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.images.clone();
        self.rt
            .block_on(f(client))
            .map(tonic::Response::into_inner)
            .map_err(|s| CriError::Call(what, s))
    }

    /// The runtime's name and version.
    pub fn version(&self) -> Result<api::VersionResponse, CriError> {
        self.call("Version", |mut c| async move {
            c.version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
        })
    }

    /// The pod sandboxes in state READY.
    pub fn ready_sandboxes(&self) -> Result<Vec<PodSandbox>, CriError> {
        let filter = PodSandboxFilter {
            state: Some(PodSandboxStateValue {
                state: PodSandboxState::SandboxReady as i32,
            }),
            ..Default::default()
        };
        self.call("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(filter),
            })
            .await
        })
        .map(|r| r.items)
    }

    /// A sandbox's status with the runtime's verbose info (where its netns is).
    pub fn sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse, CriError> {
        let id = id.to_string();
        self.call("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            })
            .await
        })
    }
}

/// What a sandbox's status says about its network, as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNet {
    /// The pod uses the node's network (no CNI, nothing to capture).
    pub host_network: bool,
    /// The network namespace's path, as the runtime gives it (its runtime spec).
    pub netns: Option<PathBuf>,
    /// The sandbox process's pid, where the runtime reports it (older runtimes give only that).
    pub pid: Option<u32>,
    /// The pod has an IPv6 address.
    pub ipv6: bool,
}

/// Reads a sandbox's network from its status. containerd (1.6 to 2.x) and CRI-O both put a
/// JSON document under the verbose info's `info` key whose `runtimeSpec.linux.namespaces`
/// entry of type `network` holds the netns path; an old runtime gives only the sandbox's `pid`
/// (see `sandbox_netns` for how that is used safely).
pub fn sandbox_net(st: &PodSandboxStatusResponse) -> SandboxNet {
    let status = st.status.as_ref();
    let host_network = status
        .and_then(|s| s.linux.as_ref())
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .is_some_and(|o| o.network == api::NamespaceMode::Node as i32);
    let ipv6 = status.and_then(|s| s.network.as_ref()).is_some_and(|n| {
        std::iter::once(&n.ip)
            .chain(n.additional_ips.iter().map(|i| &i.ip))
            .any(|ip| ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_ipv6()))
    });
    let info: Option<serde_json::Value> = st
        .info
        .get("info")
        .and_then(|i| serde_json::from_str(i).ok());
    let from_spec = info.as_ref().and_then(|i| {
        i.pointer("/runtimeSpec/linux/namespaces")?
            .as_array()?
            .iter()
            .find(|n| n["type"] == "network")?
            .get("path")?
            .as_str()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    });
    let pid = info
        .as_ref()
        .and_then(|i| i.get("pid")?.as_u64())
        .filter(|&p| p > 0)
        .and_then(|p| u32::try_from(p).ok());
    SandboxNet {
        host_network,
        netns: from_spec,
        pid,
        ipv6,
    }
}

/// A transport error with its causes (tonic's Display stops at "transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn status(info: &str, network: i32, ips: &[&str]) -> PodSandboxStatusResponse {
        let mut m = HashMap::new();
        m.insert("info".to_string(), info.to_string());
        PodSandboxStatusResponse {
            status: Some(api::PodSandboxStatus {
                network: Some(api::PodSandboxNetworkStatus {
                    ip: ips.first().unwrap_or(&"").to_string(),
                    additional_ips: ips[1.min(ips.len())..]
                        .iter()
                        .map(|i| api::PodIp { ip: i.to_string() })
                        .collect(),
                }),
                linux: Some(api::LinuxPodSandboxStatus {
                    namespaces: Some(api::Namespace {
                        options: Some(api::NamespaceOption {
                            network,
                            ..Default::default()
                        }),
                    }),
                }),
                ..Default::default()
            }),
            info: m,
            ..Default::default()
        }
    }

    /// CRI-O's verbose sandbox status, built from its own structs (cri-o v1.36.3 = b24632ab,
    /// `server/sandbox_status.go` `createSandboxInfo`): one key, `info`, whose JSON holds
    /// `runtimeSpec` (an OCI spec; CRI-O pins the netns at `<namespaces_dir>/netns/<uuid>`,
    /// `internal/config/nsmgr/nsmgr_linux.go`), plus `image` and `pid` only when the infra
    /// container is real (it is dropped by default, `DropInfraCtr`). A host-network pod has a
    /// network path too (pinns pins the host's namespace); the status's namespace mode tells.
    #[test]
    fn cri_o_shaped_status() {
        // The dropped-infra (default) shape: `struct { RuntimeSpec spec.Spec json:"runtimeSpec" }`.
        let spoofed = r#"{"runtimeSpec":{"ociVersion":"1.2.0","process":{"user":{"uid":0,"gid":0},"args":["/pause"],"cwd":"/"},"root":{"path":"/var/lib/containers/storage/overlay/abc/merged"},"hostname":"web-0","annotations":{"io.kubernetes.cri-o.HostNetwork":"false","io.kubernetes.cri-o.SandboxID":"7f3a"},"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/5a3c2f0e-9d7b-4c1e-8f6a-2b4d6e8f0a1c"},{"type":"ipc","path":"/var/run/ipcns/5a3c2f0e-9d7b-4c1e-8f6a-2b4d6e8f0a1c"},{"type":"uts","path":"/var/run/utsns/5a3c2f0e-9d7b-4c1e-8f6a-2b4d6e8f0a1c"},{"type":"mount"}],"cgroupsPath":"kubepods-besteffort-pod123.slice:crio:7f3a"}}}"#;
        let n = sandbox_net(&status(spoofed, 0, &["10.85.0.7", "1100:200::7"]));
        assert_eq!(
            n.netns,
            Some(PathBuf::from(
                "/var/run/netns/5a3c2f0e-9d7b-4c1e-8f6a-2b4d6e8f0a1c"
            ))
        );
        assert_eq!(n.pid, None);
        assert!(n.ipv6 && !n.host_network);
        // A real infra container: `struct { Image, Pid, RuntimeSpec }`.
        let real = r#"{"image":"registry.k8s.io/pause:3.10","pid":4242,"runtimeSpec":{"linux":{"namespaces":[{"type":"network","path":"/var/run/netns/0b1e"}]}}}"#;
        let n = sandbox_net(&status(real, 0, &["10.85.0.8"]));
        assert_eq!(
            (n.netns, n.pid),
            (Some(PathBuf::from("/var/run/netns/0b1e")), Some(4242))
        );
        // Host network: a pinned path, but the status's mode says NODE.
        let host = r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"network","path":"/var/run/netns/host-pin"}]}}}"#;
        assert!(sandbox_net(&status(host, api::NamespaceMode::Node as i32, &[])).host_network);
    }

    #[test]
    fn netns_from_the_runtime_spec_or_the_pid() {
        let containerd = r#"{"pid": 42, "runtimeSpec": {"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1234"}]}}}"#;
        let n = sandbox_net(&status(containerd, 0, &["10.0.0.5", "fd00::5"]));
        assert_eq!(n.netns, Some(PathBuf::from("/var/run/netns/cni-1234")));
        assert!(n.ipv6 && !n.host_network);
        assert_eq!(n.pid, Some(42));
        let old = r#"{"pid": 42}"#;
        let n = sandbox_net(&status(old, 0, &["10.0.0.5"]));
        assert_eq!((n.netns, n.pid), (None, Some(42)));
        assert!(!sandbox_net(&status(old, 0, &["10.0.0.5"])).ipv6);
        let host = sandbox_net(&status("{}", api::NamespaceMode::Node as i32, &[]));
        assert!(host.host_network && host.netns.is_none());
        assert_eq!(sandbox_net(&status("not json", 0, &[])).netns, None);
    }
}
