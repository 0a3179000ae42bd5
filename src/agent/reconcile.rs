//! Reconciling the node's pods through the CRI: every ready pod sandbox is decided with the
//! same policy code as ADD, its table compared with the plan by the same code as CHECK, and, if
//! it should be captured and is not (a pod that started before the plugin was chained, a table
//! someone removed or changed), installed in place with ADD's atomic batch. Pods are never
//! deleted, pods that must not be captured never touched, the API server never called.
//!
//! A pass that could not look at every listed sandbox has failed: readiness must never say
//! "every meshed pod is captured" about pods it did not see. A pod that holds its own table
//! (`flags owner`) is reported and left alone: the kernel lets nobody else change that table,
//! and one such pod must not hold the node (and so a DaemonSet rollout) not ready.

use super::Shared;
use super::cri::{self, Cri, CriError};
use super::health::Worker;
use super::log;
use super::metrics::{Kind, POD_STATES, Result_, State};
use super::readiness::{NotReady, Reconcile};
use super::sandbox_netns::{self, LocateError};
use crate::config::{Annotations, PluginConfig};
use crate::kernel::Sockets;
use crate::pod::{self, PodPlan};
use crate::policy::Pod;
use crate::protocol::code;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Logged with a netns that cannot be entered: the usual cause when the agent is in a container.
const NETNS_HINT: &str = "the agent in a container sees pods' netns files only through the host's \
    netns dir mounted (--netns-dir) with mountPropagation HostToContainer, and enters them only \
    with CAP_SYS_ADMIN";

/// A meshed pod the pass could not vouch for, or that defends its own table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIssue {
    /// "namespace/name".
    pub pod: String,
    pub sandbox: String,
    pub why: String,
}

/// Why a pass failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    #[error("no CRI socket: none of {0} exists (set --cri-socket)")]
    NoSocket(String),
    #[error("the container runtime is not reachable: {0}")]
    Unreachable(String),
    #[error(
        "the pass looked at {looked} of {listed} pod sandbox(es): the container runtime went \
         away mid-pass ({why})"
    )]
    Incomplete {
        listed: usize,
        looked: usize,
        why: String,
    },
}

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
    /// Could not be checked or repaired (netns not enterable, kernel refused, status unread).
    pub failed: usize,
    /// Hold a table of their own under our name (`flags owner`): reported, not gating.
    pub defended: Vec<PodIssue>,
    /// Captured by their mesh's own rules (istio-cni, an init container) and not by us:
    /// left alone while migrating, reported, not gating.
    pub foreign: Vec<PodIssue>,
    /// Differences found: table missing, table differing.
    pub missing: usize,
    pub differing: usize,
    pub repair_failures: usize,
    /// Meshed pods that may not be captured: could not be checked or repaired.
    pub uncaptured: Vec<PodIssue>,
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
    Defended(PodIssue),
    Foreign(PodIssue),
    Failed {
        repairing: bool,
    },
    /// Meshed and not vouched for.
    Uncaptured {
        repairing: bool,
        issue: PodIssue,
    },
    /// Stopped or removed while we looked.
    Gone,
}

/// The runtime stopped answering in the middle of a pass.
struct Lost(String);

/// What was last logged for a sandbox (logged again only when it changes).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reported {
    StatusUnread(String),
    Invalid(String),
    CannotLocate(String),
    CannotCheck(String),
    CannotRepair(String),
    Defended,
    Foreign,
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
    reported: HashMap<String, Reported>,
    started: Instant,
    shared: Option<Arc<Shared>>,
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
            shared: None,
        }
    }

    fn beat(&self) {
        if let Some(s) = &self.shared {
            s.health.beat(Worker::Reconcile);
        }
    }

    fn client(&mut self) -> Result<&mut Cri, PassError> {
        if self.cri.is_none() {
            let socket = match &self.socket {
                Some(s) => s.clone(),
                None => cri::find_socket()
                    .ok_or_else(|| PassError::NoSocket(cri::DEFAULT_SOCKETS.join(", ")))?,
            };
            let c = Cri::connect(&socket).map_err(|e| PassError::Unreachable(e.to_string()))?;
            if !self.announced {
                let v = c
                    .version()
                    .map_err(|e| PassError::Unreachable(e.to_string()))?;
                log(
                    "info",
                    "connected to the container runtime",
                    json!({"socket": socket, "runtime": v.runtime_name, "version": v.runtime_version}),
                );
                self.announced = true;
            }
            self.cri = Some(c);
        }
        self.cri
            .as_mut()
            .ok_or_else(|| PassError::Unreachable("no CRI client".into()))
    }

    /// One pass over every ready sandbox.
    pub fn pass(&mut self) -> Result<Pass, PassError> {
        let start = Instant::now();
        // A connection per pass: a runtime that restarted (a new socket) or went away is seen
        // at once, and a unix-socket connection costs next to nothing.
        self.cri = None;
        let listed = self.client().and_then(|c| {
            c.ready_sandboxes()
                .map_err(|e| PassError::Unreachable(e.to_string()))
        });
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
        for (looked, sb) in sandboxes.iter().enumerate() {
            self.beat();
            seen.push(sb.id.clone());
            let outcome = match self.sandbox(sb) {
                Ok(o) => o,
                Err(Lost(why)) => {
                    self.cri = None;
                    self.announced = false;
                    return Err(PassError::Incomplete {
                        listed: sandboxes.len(),
                        looked,
                        why,
                    });
                }
            };
            match outcome {
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
                Outcome::Defended(i) => p.defended.push(i),
                Outcome::Foreign(i) => p.foreign.push(i),
                Outcome::Failed { repairing } => {
                    p.failed += 1;
                    p.repair_failures += repairing as usize;
                }
                Outcome::Uncaptured { repairing, issue } => {
                    p.failed += 1;
                    p.repair_failures += repairing as usize;
                    p.uncaptured.push(issue);
                }
                Outcome::Gone => {}
            }
        }
        self.reported.retain(|id, _| seen.contains(id));
        p.duration = start.elapsed();
        Ok(p)
    }

    /// Logs for a sandbox unless the same was last logged for it.
    fn report_once(&mut self, id: &str, what: Reported, level: &str, msg: &str, extra: Value) {
        if self.reported.get(id) != Some(&what) {
            log(level, msg, extra);
            self.reported.insert(id.to_string(), what);
        }
    }

    /// Reads a sandbox's status; a transport failure reconnects and asks once more. `Err`:
    /// the runtime is gone (the pass cannot go on).
    fn status(
        &mut self,
        id: &str,
    ) -> Result<Result<cri::api::PodSandboxStatusResponse, CriError>, Lost> {
        for attempt in 0..2 {
            // Each call may take the client's whole timeout (30 s): beat before every one, so
            // that a slow runtime never adds up to the stall limit within one sandbox.
            self.beat();
            let cri = match self.client() {
                Ok(c) => c,
                Err(e) => return Err(Lost(e.to_string())),
            };
            match cri.sandbox_status(id) {
                Ok(s) => return Ok(Ok(s)),
                Err(e) if !e.is_transport() => return Ok(Err(e)),
                Err(e) => {
                    // A transport error drops the connection; the retry reconnects.
                    self.cri = None;
                    if attempt == 1 {
                        return Err(Lost(e.to_string()));
                    }
                }
            }
        }
        Err(Lost("unreachable".into()))
    }

    /// Whether the sandbox is still ready now (a stop or removal since the list, or since we
    /// looked at it, makes it `Gone`).
    fn still_ready(&mut self, id: &str) -> Result<bool, Lost> {
        Ok(match self.status(id)? {
            Ok(s) => s
                .status
                .is_some_and(|st| st.state == cri::api::PodSandboxState::SandboxReady as i32),
            Err(_) => false,
        })
    }

    fn sandbox(&mut self, sb: &cri::api::PodSandbox) -> Result<Outcome, Lost> {
        let meta = sb.metadata.clone().unwrap_or_default();
        let who = format!("{}/{}", meta.namespace, meta.name);
        let issue = |why: String| PodIssue {
            pod: who.clone(),
            sandbox: sb.id.clone(),
            why,
        };
        let status = match self.status(&sb.id)? {
            Ok(s) => s,
            Err(e) if e.is_not_found() => return Ok(Outcome::Gone),
            Err(e) => {
                let msg = e.to_string();
                self.report_once(
                    &sb.id,
                    Reported::StatusUnread(msg.clone()),
                    "warn",
                    "cannot read a pod sandbox's status",
                    json!({"pod": who, "sandbox": sb.id, "error": msg}),
                );
                // The list says enough to know whether it is meshed: a meshed pod we cannot
                // look at is unchecked.
                let list_ann: Annotations = sb.annotations.clone().into_iter().collect();
                let meshed = matches!(
                    pod::plan(&self.cfg, &self.pod(&meta, &list_ann, false)),
                    Ok(PodPlan::Capture(_))
                );
                return Ok(if meshed {
                    Outcome::Uncaptured {
                        repairing: false,
                        issue: issue(format!("status not readable: {msg}")),
                    }
                } else {
                    Outcome::Failed { repairing: false }
                });
            }
        };
        if status
            .status
            .as_ref()
            .is_some_and(|s| s.state != cri::api::PodSandboxState::SandboxReady as i32)
        {
            return Ok(Outcome::Gone);
        }
        let net = cri::sandbox_net(&status);
        if net.host_network {
            return Ok(Outcome::Skipped);
        }
        // The annotations as the runtime passes them to ADD (the status has them too).
        let annotations: Annotations = status
            .status
            .as_ref()
            .map(|s| s.annotations.clone())
            .unwrap_or_else(|| sb.annotations.clone())
            .into_iter()
            .collect();
        let rs = match pod::plan(&self.cfg, &self.pod(&meta, &annotations, net.ipv6)) {
            Ok(PodPlan::Capture(rs)) => rs,
            Ok(PodPlan::Skip(_)) => return Ok(Outcome::Skipped),
            Err(e) => {
                // The message names the annotation and the value (as ADD's code 100 does).
                self.report_once(
                    &sb.id,
                    Reported::Invalid(e.msg.clone()),
                    "warn",
                    "pod left alone: invalid annotation",
                    json!({"pod": who, "sandbox": sb.id, "code": e.code, "error": e.msg}),
                );
                return Ok(Outcome::Invalid);
            }
        };
        let (ns, netns) = match sandbox_netns::locate(&net, &sb.id, &self.netns_dir) {
            Ok(found) => found,
            Err(e) => {
                if e.is_gone() && !self.still_ready(&sb.id)? {
                    return Ok(Outcome::Gone);
                }
                let msg = e.to_string();
                let mut extra =
                    json!({"pod": who, "sandbox": sb.id, "netns": net.netns, "error": msg});
                if matches!(e, LocateError::Netns(_)) {
                    extra["hint"] = json!(NETNS_HINT);
                }
                self.report_once(
                    &sb.id,
                    Reported::CannotLocate(msg.clone()),
                    "warn",
                    "cannot check a pod",
                    extra,
                );
                return Ok(Outcome::Uncaptured {
                    repairing: false,
                    issue: issue(msg),
                });
            }
        };
        let drift = match pod::in_netns(&ns, Sockets::to_compare(&rs), |k| k.diff(&rs)) {
            Ok(d) => d,
            Err(e) => {
                let mut extra =
                    json!({"pod": who, "sandbox": sb.id, "netns": netns, "error": e.msg});
                if e.code == code::NETNS {
                    extra["hint"] = json!(NETNS_HINT);
                }
                self.report_once(
                    &sb.id,
                    Reported::CannotCheck(e.msg.clone()),
                    "warn",
                    "cannot check a pod",
                    extra,
                );
                return Ok(Outcome::Uncaptured {
                    repairing: false,
                    issue: issue(e.msg),
                });
            }
        };
        if drift.is_empty() {
            self.reported.remove(&sb.id);
            return Ok(Outcome::Captured);
        }
        if drift.owned_by_another() {
            return Ok(self.defended(sb, &who, &netns, issue));
        }
        // A pod its mesh's own CNI or init container captured (before mesh-redirect was
        // installed, while migrating) keeps those rules: adding ours would make two layers.
        if drift.table_missing()
            && let Ok(Some(f)) = pod::in_netns(&ns, Sockets::Netfilter, |k| k.foreign_capture())
        {
            let why = format!(
                "captured by {}'s own rules ({}): left alone, as a second capture layer would \
                 fight them; the pod is captured by mesh-redirect once it is recreated",
                f.mesh, f.evidence
            );
            self.report_once(
                &sb.id,
                Reported::Foreign,
                "info",
                "pod captured by its mesh's own rules: left alone",
                json!({"pod": who, "sandbox": sb.id, "netns": netns, "mesh": f.mesh, "evidence": f.evidence}),
            );
            return Ok(Outcome::Foreign(issue(why)));
        }
        // The runtime stops a sandbox (NOTREADY) before its CNI DEL removes the table: a
        // sandbox that stopped since the list is gone, not drift to repair.
        if !self.still_ready(&sb.id)? {
            return Ok(Outcome::Gone);
        }
        match pod::in_netns(&ns, Sockets::to_install(&rs), |k| k.replace(&rs)) {
            Ok(()) => {
                self.reported.remove(&sb.id);
                log(
                    "info",
                    "repaired a pod",
                    json!({"pod": who, "sandbox": sb.id, "netns": netns,
                        "why": drift.differences.iter().take(5).collect::<Vec<_>>(),
                        "differences": drift.differences.len(),
                        "sinceStartMs": self.started.elapsed().as_millis() as u64}),
                );
                Ok(Outcome::Repaired {
                    missing: drift.table_missing(),
                })
            }
            Err(e) => {
                // The table may have become someone's own between the look and the write.
                if matches!(pod::in_netns(&ns, Sockets::to_compare(&rs), |k| k.diff(&rs)), Ok(d) if d.owned_by_another())
                {
                    return Ok(self.defended(sb, &who, &netns, issue));
                }
                self.report_once(
                    &sb.id,
                    Reported::CannotRepair(e.msg.clone()),
                    "error",
                    "cannot repair a pod",
                    json!({"pod": who, "sandbox": sb.id, "netns": netns, "error": e.msg}),
                );
                Ok(Outcome::Uncaptured {
                    repairing: true,
                    issue: issue(e.msg),
                })
            }
        }
    }

    fn defended(
        &mut self,
        sb: &cri::api::PodSandbox,
        who: &str,
        netns: &std::path::Path,
        issue: impl Fn(String) -> PodIssue,
    ) -> Outcome {
        let why = format!(
            "holds its own table inet {} (flags owner): the kernel lets nobody else change it, \
             and the pod's traffic may bypass its proxy",
            crate::ruleset::TABLE
        );
        self.report_once(
            &sb.id,
            Reported::Defended,
            "warn",
            "pod defends its own capture table: left alone, not holding the node not ready",
            json!({"pod": who, "sandbox": sb.id, "netns": netns, "why": why}),
        );
        Outcome::Defended(issue(why))
    }

    fn pod<'a>(
        &self,
        meta: &'a cri::api::PodSandboxMetadata,
        annotations: &'a Annotations,
        ipv6: bool,
    ) -> Pod<'a> {
        Pod {
            namespace: Some(&meta.namespace),
            name: Some(&meta.name),
            annotations: Some(annotations),
            ipv6,
        }
    }
}

/// Records a pass in the metrics.
fn record(st: &Shared, p: &Pass) {
    let m = &st.metrics;
    for (state, n) in POD_STATES.iter().zip([
        p.captured,
        p.repaired,
        p.skipped,
        p.invalid,
        p.failed,
        p.defended.len(),
        p.foreign.len(),
    ]) {
        m.pods
            .get_or_create(&State {
                state: state.to_string(),
            })
            .set(n as i64);
    }
    let kind = |k: &str| Kind { kind: k.into() };
    m.drift
        .get_or_create(&kind("missing"))
        .inc_by(p.missing as u64);
    m.drift
        .get_or_create(&kind("differs"))
        .inc_by(p.differing as u64);
    let res = |r: &str| Result_ { result: r.into() };
    m.repairs
        .get_or_create(&res("ok"))
        .inc_by(p.repaired as u64);
    m.repairs
        .get_or_create(&res("failed"))
        .inc_by(p.repair_failures as u64);
    m.passes.get_or_create(&res("ok")).inc();
    m.pass_duration.observe(p.duration.as_secs_f64());
}

/// How long the reconciler may go without a beat: a pass beats before every CRI call (each
/// bounded by the client's 30 s timeout), and between two calls does only netlink work.
pub fn stall_limit(period: Duration) -> Duration {
    period + Duration::from_secs(90)
}

/// Passes every `period` once the chain is in place (so that every pod starting meanwhile goes
/// through the plugin), for as long as the process lives.
pub fn run(st: Arc<Shared>, mut r: Reconciler, period: Duration, started: Instant) {
    r.shared = Some(st.clone());
    let mut last_error: Option<PassError> = None;
    let mut first = true;
    loop {
        st.health.beat(Worker::Reconcile);
        if !st.readiness.chained() {
            st.readiness
                .set_reconcile(Reconcile::NotYet(NotReady::WaitingForChain));
            st.refresh_ready();
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        match r.pass() {
            Ok(p) => {
                record(&st, &p);
                if first || p.repaired > 0 || last_error.is_some() {
                    log(
                        "info",
                        "reconcile pass",
                        json!({"captured": p.captured, "repaired": p.repaired, "skipped": p.skipped,
                            "invalidAnnotation": p.invalid, "failed": p.failed,
                            "defended": p.defended.len(), "foreign": p.foreign.len(),
                            "durationMs": p.duration.as_secs_f64() * 1e3,
                            "sinceStartMs": started.elapsed().as_millis() as u64}),
                    );
                }
                first = false;
                last_error = None;
                // Not ready while a pod that must be captured is known not to be, or was not
                // looked at: the operator sees the node, the pods and the reason in the body.
                st.readiness.set_reconcile(Reconcile::Done(p.uncaptured));
            }
            Err(e) => {
                st.metrics
                    .passes
                    .get_or_create(&Result_ {
                        result: "failed".into(),
                    })
                    .inc();
                if last_error.as_ref() != Some(&e) {
                    log(
                        "error",
                        "cannot reconcile (retrying)",
                        json!({"error": e.to_string()}),
                    );
                }
                st.readiness
                    .set_reconcile(Reconcile::NotYet(NotReady::Reconcile(e.clone())));
                last_error = Some(e);
            }
        }
        st.refresh_ready();
        st.health.beat(Worker::Reconcile);
        std::thread::sleep(period);
    }
}
