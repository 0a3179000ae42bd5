//! Reconciling the node's pods through the CRI: every ready pod sandbox is decided with the
//! same policy code as ADD, its table compared with the plan by the same code as CHECK, and, if
//! it should be captured and is not (a pod that started before the plugin was chained, a table
//! someone removed or changed), installed in place with ADD's atomic batch. Pods are never
//! deleted, pods that must not be captured never touched, the API server never called.

use super::cri::{self, Cri, CriError};
use super::log;
use crate::config::PluginConfig;
use crate::pod;
use crate::policy::Pod;
use crate::protocol::code;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Logged with a netns that cannot be entered: the usual cause when the agent is in a container.
const NETNS_HINT: &str = "the agent in a container sees pods' netns files only through the host's \
    netns dir mounted (--netns-dir) with mountPropagation HostToContainer, and enters them only \
    with CAP_SYS_ADMIN";

/// What one pass found, pod by pod.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Captured as planned.
    pub captured: usize,
    /// Were not, and are now.
    pub repaired: usize,
    /// Must not be captured (no sidecar, opted out, excluded namespace, host network).
    pub skipped: usize,
    /// A malformed annotation: reported, left alone.
    pub invalid: usize,
    /// Could not be checked or repaired (netns not enterable, kernel refused).
    pub failed: usize,
    /// Differences found: table missing, table differing.
    pub missing: usize,
    pub differing: usize,
    pub repair_failures: usize,
    /// Pods that must be captured and could not be checked or repaired: "ns/name: why".
    pub uncaptured: Vec<String>,
    pub duration: Duration,
}

/// One sandbox's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Captured,
    Repaired {
        missing: bool,
    },
    Skipped,
    Invalid,
    Failed {
        repairing: bool,
        /// A pod that must be captured and may not be: "ns/name: why".
        uncaptured: Option<String>,
    },
    /// Removed while we looked.
    Gone,
}

pub struct Reconciler {
    cfg: PluginConfig,
    /// `--cri-socket`, or the first of the usual paths that exists.
    socket: Option<PathBuf>,
    cri: Option<Cri>,
    /// `--netns-dir`: where a netns reported at a path not visible here is looked for.
    netns_dir: PathBuf,
    /// Logged the runtime's name since the last failure.
    announced: bool,
    /// What was last reported per sandbox (an invalid annotation or a failure is logged once,
    /// not every pass).
    reported: HashMap<String, String>,
    started: Instant,
}

impl Reconciler {
    pub fn new(
        cfg: PluginConfig,
        socket: Option<PathBuf>,
        netns_dir: PathBuf,
        started: Instant,
    ) -> Reconciler {
        Reconciler {
            cfg,
            socket,
            cri: None,
            netns_dir,
            announced: false,
            reported: HashMap::new(),
            started,
        }
    }

    fn client(&mut self) -> Result<&mut Cri, String> {
        if self.cri.is_none() {
            let socket = match &self.socket {
                Some(s) => s.clone(),
                None => cri::find_socket().ok_or_else(|| {
                    format!(
                        "no CRI socket: none of {} exists (set --cri-socket)",
                        cri::DEFAULT_SOCKETS.join(", ")
                    )
                })?,
            };
            let c = Cri::connect(&socket).map_err(|e| e.to_string())?;
            if !self.announced {
                let v = c.version().map_err(|e| e.to_string())?;
                log(
                    "info",
                    "connected to the container runtime",
                    json!({"socket": socket, "runtime": v.runtime_name, "version": v.runtime_version}),
                );
                self.announced = true;
            }
            self.cri = Some(c);
        }
        self.cri.as_mut().ok_or_else(|| "no CRI client".to_string())
    }

    /// One pass over every ready sandbox. `Err` when the runtime could not be asked at all.
    pub fn pass(&mut self) -> Result<Pass, String> {
        let start = Instant::now();
        // A connection per pass: a runtime that restarted (a new socket) or went away is seen
        // at once, and a unix-socket connection costs next to nothing.
        self.cri = None;
        let listed = self
            .client()
            .and_then(|c| c.ready_sandboxes().map_err(|e| e.to_string()));
        let sandboxes = match listed {
            Ok(s) => s,
            Err(e) => {
                self.cri = None;
                self.announced = false;
                return Err(e);
            }
        };
        let mut p = Pass::default();
        let mut seen = Vec::new();
        for sb in sandboxes {
            seen.push(sb.id.clone());
            match self.sandbox(&sb) {
                Outcome::Captured => p.captured += 1,
                Outcome::Repaired { missing } => {
                    p.repaired += 1;
                    if missing {
                        p.missing += 1;
                    } else {
                        p.differing += 1;
                    }
                }
                Outcome::Skipped => p.skipped += 1,
                Outcome::Invalid => p.invalid += 1,
                Outcome::Failed {
                    repairing,
                    uncaptured,
                } => {
                    p.failed += 1;
                    if repairing {
                        p.repair_failures += 1;
                    }
                    p.uncaptured.extend(uncaptured);
                }
                Outcome::Gone => {}
            }
        }
        self.reported.retain(|id, _| seen.contains(id));
        p.duration = start.elapsed();
        Ok(p)
    }

    /// The runtime's netns path, or where the host's netns dir is mounted when that path is not
    /// visible here (the agent in a container, the runtime keeping netns files elsewhere).
    fn visible(&self, netns: PathBuf) -> PathBuf {
        if netns.exists() {
            return netns;
        }
        match netns.file_name() {
            Some(name) if self.netns_dir.join(name).exists() => self.netns_dir.join(name),
            _ => netns,
        }
    }

    /// Logs `msg` for a sandbox unless the same was last logged for it.
    fn report_once(&mut self, id: &str, level: &str, msg: &str, extra: serde_json::Value) {
        let key = format!("{msg}{extra}");
        if self.reported.get(id) != Some(&key) {
            log(level, msg, extra);
            self.reported.insert(id.to_string(), key);
        }
    }

    fn sandbox(&mut self, sb: &cri::api::PodSandbox) -> Outcome {
        let cri = match self.client() {
            Ok(c) => c,
            Err(_) => return Outcome::Gone,
        };
        let status = match cri.sandbox_status(&sb.id) {
            Ok(s) => s,
            Err(e) if e.is_not_found() => return Outcome::Gone,
            Err(e) => {
                // A call the runtime refused keeps the connection; a transport error drops it
                // (the next sandbox reconnects).
                if !matches!(e, CriError::Call(..)) {
                    self.cri = None;
                }
                let msg = e.to_string();
                self.report_once(
                    &sb.id,
                    "warn",
                    "cannot read a pod sandbox's status",
                    json!({"sandbox": sb.id, "error": msg}),
                );
                return Outcome::Failed {
                    repairing: false,
                    uncaptured: None,
                };
            }
        };
        let meta = sb.metadata.clone().unwrap_or_default();
        let who = format!("{}/{}", meta.namespace, meta.name);
        let net = cri::sandbox_net(&status);
        if net.host_network {
            return Outcome::Skipped;
        }
        // The annotations as the runtime passes them to ADD (the status has them too).
        let annotations: crate::config::Annotations = status
            .status
            .as_ref()
            .map(|s| s.annotations.clone())
            .unwrap_or_else(|| sb.annotations.clone())
            .into_iter()
            .collect();
        let planned = pod::plan(
            &self.cfg,
            &Pod {
                namespace: Some(&meta.namespace),
                name: Some(&meta.name),
                annotations: Some(&annotations),
                ipv6: net.ipv6,
            },
        );
        let rs = match planned {
            Ok(Ok(rs)) => rs,
            Ok(Err(_)) => return Outcome::Skipped,
            Err(e) => {
                // The message names the annotation and the value (as ADD's code 100 does).
                self.report_once(
                    &sb.id,
                    "warn",
                    "pod left alone: invalid annotation",
                    json!({"pod": who, "sandbox": sb.id, "code": e.code, "error": e.msg}),
                );
                return Outcome::Invalid;
            }
        };
        let Some(netns) = net.netns else {
            self.report_once(
                &sb.id,
                "warn",
                "cannot find a pod's network namespace in its sandbox status",
                json!({"pod": who, "sandbox": sb.id}),
            );
            return Outcome::Failed {
                repairing: false,
                uncaptured: Some(format!("{who}: no network namespace in its status")),
            };
        };
        let netns = self.visible(netns);
        let diffs = match pod::diff(&netns, &rs) {
            Ok(d) => d,
            Err(e) => {
                let mut extra =
                    json!({"pod": who, "sandbox": sb.id, "netns": netns, "error": e.msg});
                if e.code == code::NETNS {
                    extra["hint"] = json!(NETNS_HINT);
                }
                self.report_once(&sb.id, "warn", "cannot check a pod", extra);
                return Outcome::Failed {
                    repairing: false,
                    uncaptured: Some(format!("{who}: {}", e.msg)),
                };
            }
        };
        if diffs.is_empty() {
            self.reported.remove(&sb.id);
            return Outcome::Captured;
        }
        let missing = diffs
            .iter()
            .any(|d| d.ends_with("is missing") && d.starts_with("table"));
        match pod::apply(&netns, &rs) {
            Ok(()) => {
                self.reported.remove(&sb.id);
                log(
                    "info",
                    "repaired a pod",
                    json!({"pod": who, "sandbox": sb.id, "netns": netns,
                        "why": diffs.iter().take(5).collect::<Vec<_>>(),
                        "differences": diffs.len(),
                        "sinceStartMs": self.started.elapsed().as_millis() as u64}),
                );
                Outcome::Repaired { missing }
            }
            Err(e) => {
                self.report_once(
                    &sb.id,
                    "error",
                    "cannot repair a pod",
                    json!({"pod": who, "sandbox": sb.id, "netns": netns, "error": e.msg}),
                );
                Outcome::Failed {
                    repairing: true,
                    uncaptured: Some(format!("{who}: {}", e.msg)),
                }
            }
        }
    }
}
