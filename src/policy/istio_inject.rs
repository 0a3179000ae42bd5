//! What Istio's injector writes about how it injected a pod, read as istio-cni reads the pod
//! spec it describes (istio/istio 86c9f01: `cni/pkg/plugin/plugin.go`, `kubernetes.go`,
//! `sidecar_redirect.go`; the injector in `pkg/kube/inject`):
//!
//! - `inject.istio.io/templates`: the templates used (comma-separated; default `sidecar`).
//!   Istio's gateway template runs the proxy as a router (`proxy router`), which istio-cni
//!   skips; so does this, for any template list without `sidecar`.
//! - `sidecar.istio.io/status`: JSON naming the init containers and containers the injector
//!   added (`null` for none). `istio-init` among them: the pod writes its own rules (no CNI
//!   mode); no `istio-proxy` in either list: no proxy. Native sidecars list `istio-proxy` among
//!   the init containers and `containers: null`.
//! - `proxy.istio.io/config`: ProxyConfig YAML; its `proxyMetadata` becomes the proxy's
//!   environment, where istio-cni reads `ISTIO_META_DNS_CAPTURE`, `ISTIO_DUAL_STACK`,
//!   `INVALID_DROP` and `DISABLE_ENVOY`.

use super::skip::Skip;
use serde::Deserialize;
use std::collections::BTreeMap;

pub const TEMPLATES: &str = "inject.istio.io/templates";
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
pub const SIDECAR_TEMPLATE: &str = "sidecar";
const INIT: &str = "istio-init";
const PROXY: &str = "istio-proxy";

/// A template list without `sidecar` (Istio: a gateway, or another non-sidecar proxy).
pub fn templates(annotation: &'static str, v: &str) -> Option<Skip> {
    let sidecar = v.split(',').any(|t| t.trim() == SIDECAR_TEMPLATE);
    (!sidecar).then(|| Skip::NotASidecarTemplate {
        annotation,
        templates: v.to_string(),
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Status {
    #[serde(rename = "initContainers")]
    init_containers: Option<Vec<String>>,
    containers: Option<Vec<String>>,
}

/// What the status says: init-container mode, or no proxy. A value that is not the
/// injector's JSON (`"{}"`, `"true"` in Istio's own tests) names nothing: captured, as
/// istio-cni, which checks only that the annotation is there.
pub fn status(annotation: &'static str, v: &str) -> Option<Skip> {
    let s: Status = serde_json::from_str(v).unwrap_or_default();
    let has = |l: &Option<Vec<String>>, name: &str| l.iter().flatten().any(|c| c == name);
    if has(&s.init_containers, INIT) {
        return Some(Skip::InitContainerMode {
            container: INIT,
            evidence: format!("{annotation} lists {INIT} among the injected init containers"),
        });
    }
    let named = s.init_containers.is_some() || s.containers.is_some();
    if named && !has(&s.init_containers, PROXY) && !has(&s.containers, PROXY) {
        return Some(Skip::NoProxyContainer {
            container: PROXY,
            annotation,
        });
    }
    None
}

/// A `proxyMetadata` value: the ProxyConfig proto types it as a string; anything else makes
/// Istio drop the whole annotation (its YAML → JSON → proto decode fails).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Value {
    Str(String),
    Other(serde::de::IgnoredAny),
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ProxyConfig {
    proxy_metadata: BTreeMap<String, Value>,
}

/// The proxy's environment from `proxyMetadata`, as the injector sets it; `None` when Istio
/// would ignore the annotation (not ProxyConfig YAML, or a metadata value that is not a
/// string), and then the proxy gets none of it either.
pub fn proxy_metadata(v: &str) -> Option<BTreeMap<String, String>> {
    let pc: ProxyConfig = serde_saphyr::from_str(v).ok()?;
    pc.proxy_metadata
        .into_iter()
        .map(|(k, v)| match v {
            Value::Str(s) => Some((k, s)),
            Value::Other(_) => None,
        })
        .collect()
}

/// What this pod's proxy metadata says, as istio-cni reads the proxy's environment: booleans
/// with Go's `ParseBool`; a value that does not parse counts as false (istio-cni only warns).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Metadata {
    pub dns_capture: Option<bool>,
    pub dual_stack: Option<bool>,
    pub invalid_drop: Option<bool>,
    pub disable_envoy: bool,
}

pub fn metadata(v: &str) -> Metadata {
    let Some(m) = proxy_metadata(v) else {
        return Metadata::default();
    };
    let b = |k: &str| {
        m.get(k)
            .map(|v| crate::values::lists::go_bool(v) == Some(true))
    };
    Metadata {
        dns_capture: b("ISTIO_META_DNS_CAPTURE"),
        dual_stack: b("ISTIO_DUAL_STACK"),
        invalid_drop: b("INVALID_DROP"),
        disable_envoy: b("DISABLE_ENVOY") == Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "sidecar.istio.io/status";

    #[test]
    fn templates_without_sidecar_are_skipped() {
        assert!(templates(TEMPLATES, "gateway").is_some());
        assert!(templates(TEMPLATES, "grpc-agent").is_some());
        assert!(templates(TEMPLATES, "").is_some());
        assert!(templates(TEMPLATES, "sidecar").is_none());
        assert!(templates(TEMPLATES, " sidecar , custom").is_none());
        assert!(templates(TEMPLATES, "sidecar,sidecar,sidecar").is_none());
    }

    /// The injector's goldens (istio/istio 86c9f01 `pkg/kube/inject/testdata/inject/`).
    #[test]
    fn status_as_the_injector_writes_it() {
        let vols = r#""volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default""#;
        // hello-old-version.yaml.injected: istio-init mode.
        let init =
            format!(r#"{{"initContainers":["istio-init"],"containers":["istio-proxy"],{vols}}}"#);
        assert_eq!(
            status(S, &init).map(|s| s.rule()),
            Some("init-container-mode")
        );
        // hello.yaml.injected (native, no CNI): istio-init first, the proxy as init container.
        let native_init = format!(
            r#"{{"initContainers":["istio-init","istio-proxy"],"containers":null,{vols}}}"#
        );
        assert!(status(S, &native_init).is_some());
        // hello.yaml.cni.injected (CNI, native): captured.
        let cni_native = format!(
            r#"{{"initContainers":["istio-validation","istio-proxy"],"containers":null,{vols}}}"#
        );
        assert_eq!(status(S, &cni_native), None);
        // hello.yaml.cni.injected@1.26.0 (CNI, classic sidecar): captured.
        let cni = format!(
            r#"{{"initContainers":["istio-validation"],"containers":["istio-proxy"],{vols}}}"#
        );
        assert_eq!(status(S, &cni), None);
        // gateway.yaml.injected: the proxy only (the template check skips it).
        let gw = format!(r#"{{"initContainers":null,"containers":["istio-proxy"],{vols}}}"#);
        assert_eq!(status(S, &gw), None);
        // custom-template.yaml.injected: containers named, no proxy.
        let custom = format!(r#"{{"initContainers":null,"containers":["hello"],{vols}}}"#);
        assert_eq!(
            status(S, &custom).map(|s| s.rule()),
            Some("no-proxy-container")
        );
        // Nothing named: captured as today.
        for v in [
            "{}",
            "true",
            "",
            r#"{"initContainers":null,"containers":null}"#,
        ] {
            assert_eq!(status(S, v), None, "{v}");
        }
    }

    #[test]
    fn proxy_metadata_as_the_injector_reads_it() {
        let m = metadata(
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  ISTIO_DUAL_STACK: \"false\"\n",
        );
        assert_eq!((m.dns_capture, m.dual_stack), (Some(true), Some(false)));
        let m = metadata(
            "{concurrency: 2, proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'True', INVALID_DROP: '1'}}",
        );
        assert_eq!((m.dns_capture, m.invalid_drop), (Some(true), Some(true)));
        // Go's ParseBool: anything else is false (istio-cni logs a warning).
        assert_eq!(
            metadata("proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'yes'}").dns_capture,
            Some(false)
        );
        assert!(metadata("proxyMetadata: {DISABLE_ENVOY: 'true'}").disable_envoy);
        // Istio drops the whole annotation when a value is not a string, or it is not YAML.
        for v in [
            "proxyMetadata: {ISTIO_META_DNS_CAPTURE: true}",
            "proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'true', X: 1}",
            "proxyMetadata: [unclosed",
            "proxyMetadata: 5",
        ] {
            assert_eq!(metadata(v), Metadata::default(), "{v}");
        }
        assert_eq!(metadata("concurrency: 2"), Metadata::default());
    }
}
