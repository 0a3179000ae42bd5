//! Why a pod is not captured: a decision, not an error, with the rule that made it. `plan`
//! prints it, ADD logs it, and the agent's reconcile makes the same decision from the same
//! annotations, so a pod the plugin left alone is never "repaired".

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The pod's namespace is in `excludeNamespaces`.
    Namespace(String),
    /// No annotations at all, and not a Kubernetes pod (no `K8S_POD_NAME`).
    NotAPod,
    /// The mesh's marker annotation is absent (or, `want` given, not that value).
    NoSidecar {
        mesh: &'static str,
        annotation: &'static str,
        want: Option<&'static str>,
    },
    /// An opt-out annotation (`sidecar.istio.io/inject: "false"`).
    OptedOut {
        annotation: &'static str,
        value: String,
    },
    /// `interceptionMode: NONE`: the mesh captures nothing for this pod.
    NoInterception { annotation: &'static str },
    /// The injector used templates other than `sidecar` (Istio's gateways: the proxy runs as a
    /// router and must see traffic as it arrives).
    NotASidecarTemplate {
        annotation: &'static str,
        templates: String,
    },
    /// The mesh's own init container writes this pod's rules; a second capture layer would
    /// fight it.
    InitContainerMode {
        container: &'static str,
        /// What shows it (the annotation and what it says).
        evidence: String,
    },
    /// The injector names the containers it added, and the proxy is not among them: nothing
    /// would receive the captured traffic.
    NoProxyContainer {
        container: &'static str,
        annotation: &'static str,
    },
    /// The proxy is configured not to run (`DISABLE_ENVOY` in the proxy's metadata).
    ProxyDisabled { annotation: &'static str },
    /// The mesh's config says to apply nothing (Kuma's `dryRun`).
    DryRun { annotation: &'static str },
}

impl Skip {
    /// A short, stable name for the rule (for `plan`, logs and tests).
    pub fn rule(&self) -> &'static str {
        match self {
            Skip::Namespace(_) => "excluded-namespace",
            Skip::NotAPod => "not-a-pod",
            Skip::NoSidecar { .. } => "no-sidecar",
            Skip::OptedOut { .. } => "opted-out",
            Skip::NoInterception { .. } => "interception-none",
            Skip::NotASidecarTemplate { .. } => "gateway-template",
            Skip::InitContainerMode { .. } => "init-container-mode",
            Skip::NoProxyContainer { .. } => "no-proxy-container",
            Skip::ProxyDisabled { .. } => "proxy-disabled",
            Skip::DryRun { .. } => "dry-run",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Namespace(ns) => write!(f, "namespace {ns:?} is excluded"),
            Skip::NotAPod => {
                f.write_str("no pod annotations and not a Kubernetes pod (no K8S_POD_NAME)")
            }
            Skip::NoSidecar {
                mesh,
                annotation,
                want: None,
            } => write!(
                f,
                "no {annotation} annotation: no {mesh} sidecar was injected"
            ),
            Skip::NoSidecar {
                mesh,
                annotation,
                want: Some(w),
            } => write!(
                f,
                "{annotation} is not {w:?}: no {mesh} sidecar was injected"
            ),
            Skip::OptedOut { annotation, value } => write!(f, "{annotation}={value:?}"),
            Skip::NoInterception { annotation } => write!(f, "{annotation}=NONE"),
            Skip::NotASidecarTemplate {
                annotation,
                templates,
            } => write!(
                f,
                "{annotation}={templates:?} names no sidecar template: a gateway's proxy runs as \
                 a router and receives traffic as it arrives (istio-cni skips it too)"
            ),
            Skip::InitContainerMode {
                container,
                evidence,
            } => write!(
                f,
                "{evidence}: a {container} init container writes this pod's capture rules, and \
                 two capture layers in one pod fight each other"
            ),
            Skip::NoProxyContainer {
                container,
                annotation,
            } => write!(
                f,
                "{annotation} names the injected containers and {container} is not among them: \
                 nothing would receive captured traffic"
            ),
            Skip::ProxyDisabled { annotation } => write!(
                f,
                "{annotation} sets DISABLE_ENVOY: no proxy runs in this pod"
            ),
            Skip::DryRun { annotation } => {
                write!(
                    f,
                    "{annotation} has dryRun: true (the mesh's CNI applies nothing)"
                )
            }
        }
    }
}
