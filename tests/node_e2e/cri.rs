//! A minimal CRI client, as the kubelet talks to the container runtime: unary gRPC calls
//! (HTTP/2 with prior knowledge over the runtime's unix socket) to `runtime.v1`.
//!
//! Only the messages and fields this test needs are declared, by hand, with the field numbers
//! of Kubernetes' `api.proto` (`k8s.io/cri-api/pkg/apis/runtime/v1`); protobuf skips the fields
//! a side does not know, so a subset is wire-compatible. No protoc, no generated code.

use bytes::{Bytes, BytesMut};
use prost::Message;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

// ---- messages (runtime.v1) ----

#[derive(Clone, PartialEq, Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct StatusRequest {
    #[prost(bool, tag = "1")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct RuntimeCondition {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(bool, tag = "2")]
    pub status: bool,
    #[prost(string, tag = "3")]
    pub reason: String,
    #[prost(string, tag = "4")]
    pub message: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RuntimeStatus {
    #[prost(message, repeated, tag = "1")]
    pub conditions: Vec<RuntimeCondition>,
}

#[derive(Clone, PartialEq, Message)]
pub struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<RuntimeStatus>,
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ImageStatusRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Image {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, repeated, tag = "2")]
    pub repo_tags: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ImageStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub image: Option<Image>,
}

/// `NamespaceMode`: POD = 0, CONTAINER = 1, NODE = 2, TARGET = 3.
pub const NAMESPACE_POD: i32 = 0;
pub const NAMESPACE_CONTAINER: i32 = 1;

#[derive(Clone, PartialEq, Message)]
pub struct NamespaceOption {
    #[prost(int32, tag = "1")]
    pub network: i32,
    #[prost(int32, tag = "2")]
    pub pid: i32,
    #[prost(int32, tag = "3")]
    pub ipc: i32,
}

/// `SecurityProfile.ProfileType`: RuntimeDefault = 0, Unconfined = 1, Localhost = 2.
pub const PROFILE_UNCONFINED: i32 = 1;

#[derive(Clone, PartialEq, Message)]
pub struct SecurityProfile {
    #[prost(int32, tag = "1")]
    pub profile_type: i32,
    #[prost(string, tag = "2")]
    pub localhost_ref: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct LinuxSandboxSecurityContext {
    #[prost(message, optional, tag = "1")]
    pub namespace_options: Option<NamespaceOption>,
    #[prost(bool, tag = "6")]
    pub privileged: bool,
    #[prost(message, optional, tag = "9")]
    pub seccomp: Option<SecurityProfile>,
}

#[derive(Clone, PartialEq, Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxSandboxSecurityContext>,
    #[prost(map = "string, string", tag = "3")]
    pub sysctls: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct DnsConfig {
    #[prost(string, repeated, tag = "1")]
    pub servers: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub searches: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    pub options: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(message, optional, tag = "4")]
    pub dns_config: Option<DnsConfig>,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

/// Stop and Remove take the same request shape.
#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxIdRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxStatusRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodIp {
    #[prost(string, tag = "1")]
    pub ip: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxNetworkStatus {
    #[prost(string, tag = "1")]
    pub ip: String,
    #[prost(message, repeated, tag = "2")]
    pub additional_ips: Vec<PodIp>,
}

/// `PodSandboxState`: SANDBOX_READY = 0 (SANDBOX_NOTREADY = 1).
pub const SANDBOX_READY: i32 = 0;

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(message, optional, tag = "5")]
    pub network: Option<PodSandboxNetworkStatus>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ListPodSandboxRequest {}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

// ---- the client ----

/// A failed call: the gRPC status (`None`: the call never got one, e.g. no connection) and
/// message, which is what the kubelet reports as the pod's event (`kubectl describe pod`).
#[derive(Debug, Clone)]
pub struct CallError {
    pub code: Option<u32>,
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(
                f,
                "rpc error: code = {} desc = {}",
                code_name(c),
                self.message
            ),
            None => write!(f, "{}", self.message),
        }
    }
}

fn code_name(c: u32) -> String {
    let names = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    names
        .get(c as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("Code({c})"))
}

fn transport(what: &str, e: impl std::fmt::Display) -> CallError {
    CallError {
        code: None,
        message: format!("{what}: {e}"),
    }
}

/// A CRI client on one socket. Each call opens its own connection: simple, and a call that
/// fails or times out leaves nothing behind for the next one.
pub struct Cri {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
    /// For `RuntimeService` calls (the kubelet's default is 2 minutes).
    pub timeout: Duration,
}

impl Cri {
    pub fn new(socket: PathBuf) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Cri {
            socket,
            rt,
            timeout: Duration::from_secs(60),
        }
    }

    /// One unary call on `service` (`RuntimeService`, `ImageService`), bounded by `timeout`.
    pub fn call<Req: Message, Resp: Message + Default>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let path = format!("/runtime.v1.{service}/{method}");
        let body = req.encode_to_vec();
        let fut = unary(self.socket.clone(), path.clone(), body);
        let out = self
            .rt
            .block_on(async { tokio::time::timeout(timeout, fut).await })
            .map_err(|_| transport(&path, format!("no answer within {timeout:?}")))??;
        Resp::decode(out).map_err(|e| transport(&path, format!("bad response: {e}")))
    }

    pub fn runtime<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, CallError> {
        self.call("RuntimeService", method, req, self.timeout)
    }

    pub fn version(&self) -> Result<VersionResponse, CallError> {
        self.call(
            "RuntimeService",
            "Version",
            &VersionRequest {
                version: "v1".into(),
            },
            Duration::from_secs(2),
        )
    }

    pub fn status(&self) -> Result<StatusResponse, CallError> {
        self.runtime("Status", &StatusRequest { verbose: true })
    }

    pub fn image_status(&self, image: &str) -> Result<ImageStatusResponse, CallError> {
        self.call(
            "ImageService",
            "ImageStatus",
            &ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                }),
                verbose: false,
            },
            Duration::from_secs(10),
        )
    }

    pub fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String, CallError> {
        let r: RunPodSandboxResponse = self.runtime(
            "RunPodSandbox",
            &RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            },
        )?;
        Ok(r.pod_sandbox_id)
    }

    pub fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse, CallError> {
        self.runtime(
            "PodSandboxStatus",
            &PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            },
        )
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CallError> {
        let _: Empty = self.runtime(
            "StopPodSandbox",
            &PodSandboxIdRequest {
                pod_sandbox_id: id.into(),
            },
        )?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CallError> {
        let _: Empty = self.runtime(
            "RemovePodSandbox",
            &PodSandboxIdRequest {
                pod_sandbox_id: id.into(),
            },
        )?;
        Ok(())
    }

    pub fn list_pod_sandbox(&self) -> Result<Vec<PodSandbox>, CallError> {
        let r: ListPodSandboxResponse =
            self.runtime("ListPodSandbox", &ListPodSandboxRequest {})?;
        Ok(r.items)
    }
}

/// gRPC's unary call: a length-prefixed message as the request body; the answer's body, and
/// `grpc-status` / `grpc-message` in the trailers (or in the headers, for a trailers-only
/// error).
async fn unary(socket: PathBuf, path: String, body: Vec<u8>) -> Result<Bytes, CallError> {
    let io = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| transport(&format!("connect {}", socket.display()), e))?;
    let (client, conn) = h2::client::handshake(io)
        .await
        .map_err(|e| transport("HTTP/2 handshake", e))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = exchange(client, &path, body).await;
    conn.abort();
    result
}

async fn exchange(
    client: h2::client::SendRequest<Bytes>,
    path: &str,
    body: Vec<u8>,
) -> Result<Bytes, CallError> {
    let mut client = client.ready().await.map_err(|e| transport(path, e))?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "mesh-redirect-node-e2e")
        .body(())
        .expect("request");
    let (resp, mut send) = client
        .send_request(req, false)
        .map_err(|e| transport(path, e))?;
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0); // not compressed
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    send.send_data(Bytes::from(framed), true)
        .map_err(|e| transport(path, e))?;
    let resp = resp.await.map_err(|e| transport(path, e))?;
    let (parts, mut recv) = resp.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(transport(path, format!("HTTP status {}", parts.status)));
    }
    let mut data = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(|e| transport(path, e))?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await.map_err(|e| transport(path, e))?;
    let meta = match &trailers {
        Some(t) if t.contains_key("grpc-status") => t,
        _ => &parts.headers,
    };
    let code: u32 = meta
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| transport(path, "no grpc-status in the answer"))?;
    if code != 0 {
        let message = meta
            .get("grpc-message")
            .map(|v| percent_decode(v.as_bytes()))
            .unwrap_or_default();
        return Err(CallError {
            code: Some(code),
            message,
        });
    }
    // One length-prefixed message.
    if data.len() < 5 || data[0] != 0 {
        return Err(transport(path, "malformed or compressed message"));
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    if data.len() != 5 + len {
        return Err(transport(
            path,
            format!("message of {} bytes, prefix says {len}", data.len() - 5),
        ));
    }
    Ok(data.freeze().slice(5..))
}

/// `grpc-message` is percent-encoded UTF-8.
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            let hex = std::str::from_utf8(&v[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
