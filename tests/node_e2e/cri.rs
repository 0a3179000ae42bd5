//! The node e2e's CRI calls, as the kubelet makes them, through the agent's own CRI client
//! (`mesh_redirect::agent::cri`, k8s-cri's generated `runtime.v1`): the project has one CRI
//! client. Each call connects anew, so a call that fails or times out leaves nothing behind.

#![allow(dead_code)]

pub use mesh_redirect::agent::cri::api::*;
use mesh_redirect::agent::cri::{Cri as Client, CriError};
use std::path::PathBuf;
use std::time::Duration;

pub const NAMESPACE_POD: i32 = NamespaceMode::Pod as i32;
pub const NAMESPACE_CONTAINER: i32 = NamespaceMode::Container as i32;
pub const NAMESPACE_NODE: i32 = NamespaceMode::Node as i32;
pub const PROFILE_UNCONFINED: i32 = security_profile::ProfileType::Unconfined as i32;
pub const PROFILE_RUNTIME_DEFAULT: i32 = security_profile::ProfileType::RuntimeDefault as i32;
pub const SANDBOX_READY: i32 = PodSandboxState::SandboxReady as i32;
pub const CONTAINER_RUNNING: i32 = ContainerState::ContainerRunning as i32;
pub const CONTAINER_EXITED: i32 = ContainerState::ContainerExited as i32;

/// A failed call as the kubelet reports it (`kubectl describe pod` shows this text).
#[derive(Debug, Clone)]
pub struct CallError {
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<CriError> for CallError {
    fn from(e: CriError) -> CallError {
        let message = match e.status() {
            Some(s) => format!("rpc error: code = {:?} desc = {}", s.code(), s.message()),
            None => e.to_string(),
        };
        CallError { message }
    }
}

/// A CRI client on one socket.
pub struct Cri {
    socket: PathBuf,
    /// For `RuntimeService` calls (the kubelet's default is 2 minutes).
    pub timeout: Duration,
}

impl Cri {
    pub fn new(socket: PathBuf) -> Cri {
        Cri {
            socket,
            timeout: Duration::from_secs(120),
        }
    }

    pub fn client(&self) -> Result<Client, CallError> {
        Ok(Client::connect(&self.socket)?)
    }

    pub fn version(&self) -> Result<VersionResponse, CallError> {
        Ok(self.client()?.version()?)
    }

    pub fn status(&self) -> Result<StatusResponse, CallError> {
        Ok(self.client()?.call("Status", |mut c| async move {
            c.status(StatusRequest { verbose: true }).await
        })?)
    }

    pub fn image_status(&self, image: &str) -> Result<ImageStatusResponse, CallError> {
        let image = image.to_string();
        Ok(self
            .client()?
            .call_images("ImageStatus", |mut c| async move {
                c.image_status(ImageStatusRequest {
                    image: Some(ImageSpec {
                        image,
                        ..Default::default()
                    }),
                    verbose: false,
                })
                .await
            })?)
    }

    pub fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String, CallError> {
        let timeout = self.timeout;
        Ok(self
            .client()?
            .call("RunPodSandbox", |mut c| async move {
                let mut req = tonic::Request::new(RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                });
                req.set_timeout(timeout);
                c.run_pod_sandbox(req).await
            })?
            .pod_sandbox_id)
    }

    pub fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse, CallError> {
        Ok(self.client()?.sandbox_status(id)?)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CallError> {
        let id = id.to_string();
        self.client()?.call("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id })
                .await
        })?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CallError> {
        let id = id.to_string();
        self.client()?
            .call("RemovePodSandbox", |mut c| async move {
                c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await
            })?;
        Ok(())
    }

    pub fn list_pod_sandbox(&self) -> Result<Vec<PodSandbox>, CallError> {
        Ok(self
            .client()?
            .call("ListPodSandbox", |mut c| async move {
                c.list_pod_sandbox(ListPodSandboxRequest { filter: None })
                    .await
            })?
            .items)
    }

    pub fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> Result<String, CallError> {
        let pod_sandbox_id = sandbox_id.to_string();
        Ok(self
            .client()?
            .call("CreateContainer", |mut c| async move {
                c.create_container(CreateContainerRequest {
                    pod_sandbox_id,
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                })
                .await
            })?
            .container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), CallError> {
        let container_id = id.to_string();
        self.client()?.call("StartContainer", |mut c| async move {
            c.start_container(StartContainerRequest { container_id })
                .await
        })?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace` seconds (the pod's terminationGracePeriodSeconds).
    pub fn stop_container(&self, id: &str, grace: i64) -> Result<(), CallError> {
        let container_id = id.to_string();
        self.client()?.call("StopContainer", |mut c| async move {
            c.stop_container(StopContainerRequest {
                container_id,
                timeout: grace,
            })
            .await
        })?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), CallError> {
        let container_id = id.to_string();
        self.client()?.call("RemoveContainer", |mut c| async move {
            c.remove_container(RemoveContainerRequest { container_id })
                .await
        })?;
        Ok(())
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, CallError> {
        let container_id = id.to_string();
        self.client()?
            .call("ContainerStatus", |mut c| async move {
                c.container_status(ContainerStatusRequest {
                    container_id,
                    verbose: false,
                })
                .await
            })?
            .status
            .ok_or_else(|| CallError {
                message: "ContainerStatus: no status".into(),
            })
    }

    /// The container's init process, from the runtime's verbose status (`info.pid`).
    pub fn container_pid(&self, id: &str) -> Option<i32> {
        let container_id = id.to_string();
        let r = self
            .client()
            .ok()?
            .call("ContainerStatus", |mut c| async move {
                c.container_status(ContainerStatusRequest {
                    container_id,
                    verbose: true,
                })
                .await
            })
            .ok()?;
        let info: serde_json::Value = serde_json::from_str(r.info.get("info")?).ok()?;
        Some(info["pid"].as_i64()? as i32)
    }
}
