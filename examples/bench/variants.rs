//! Section `variants`: ADD of the same kind of pod by builds, meshes and event-socket setups,
//! interleaved.

use crate::agent::start_agent;
use crate::netns::Ns;
use crate::payloads::{plugin_step, table_exists, variant_conf};
use crate::spawn::{Outcome, run_step};
use crate::stats::{Csv, Rng, emit_md, ms, progress, ratio, stats, stats_json, write_json};
use crate::{Opts, STATUS_VALUE};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

/// One variant of an ADD to time.
pub(crate) struct Variant {
    pub(crate) key: &'static str,
    pub(crate) label: String,
    pub(crate) plugin: PathBuf,
    pub(crate) annotations: Value,
    /// Extra conflist-entry keys.
    pub(crate) conf: Value,
}

pub(crate) const KUMA_YAML: &str = "cniMode: true\nipFamilyMode: dualstack\nkumaDPUser: \"5678\"\nredirect:\n  dns:\n    captureAll: true\n    enabled: true\n    port: 15053\n  inbound:\n    enabled: true\n    excludePorts:\n    - 9001\n    - 9902\n    port: 15006\n  outbound:\n    enabled: true\n    port: 15001\n";

/// ADD of one pod by: this build for Istio, Linkerd and Kuma pods; this build with the event
/// socket served by the real agent, with nobody listening, and without the key; and, with
/// `BENCH_PLUGIN_OLD`, another build (e.g. the one before the agent existed) for the same pod.
pub(crate) fn section_variants(o: &Opts) -> bool {
    let n = o.n.unwrap_or(if o.smoke { 3 } else { 200 });
    let istio = json!({"sidecar.istio.io/status": STATUS_VALUE});
    let dir = o.out.join(format!(".agent-{}", std::process::id()));
    let listening = dir.join("events.sock");
    let agent = start_agent(&o.plugin, &dir, &listening);
    let mut variants = vec![
        Variant {
            key: "istio",
            label: "Istio pod (no event socket configured)".into(),
            plugin: o.plugin.clone(),
            annotations: istio.clone(),
            conf: json!({}),
        },
        Variant {
            key: "linkerd",
            label: "Linkerd pod (`mesh: linkerd`)".into(),
            plugin: o.plugin.clone(),
            annotations: json!({"linkerd.io/proxy-version": "stable-2.18.0",
                "config.linkerd.io/skip-outbound-ports": "443,6443"}),
            conf: json!({"mesh": "linkerd"}),
        },
        Variant {
            key: "kuma",
            label: "Kuma pod (`mesh: kuma`, YAML config)".into(),
            plugin: o.plugin.clone(),
            annotations: json!({"kuma.io/sidecar-injected": "true",
                "traffic.kuma.io/transparent-proxy-config": KUMA_YAML}),
            conf: json!({"mesh": "kuma"}),
        },
        Variant {
            key: "istio-dns",
            label: "Istio pod, DNS captured (as the Kuma pod)".into(),
            plugin: o.plugin.clone(),
            annotations: json!({"sidecar.istio.io/status": STATUS_VALUE,
                "traffic.mesh-redirect.io/captureDNS": "true"}),
            conf: json!({}),
        },
        Variant {
            key: "istio-v4",
            label: "Istio pod, IPv4 only (no `::6` to add)".into(),
            plugin: o.plugin.clone(),
            annotations: istio.clone(),
            conf: json!({"prevResult": {"cniVersion": "1.0.0",
                "ips": [{"address": "10.244.0.7/24", "gateway": "10.244.0.1"}]}}),
        },
        Variant {
            key: "istio-events-nobody",
            label: "Istio pod, event socket configured, nobody listening".into(),
            plugin: o.plugin.clone(),
            annotations: istio.clone(),
            conf: json!({"eventSocket": dir.join("nobody.sock").display().to_string()}),
        },
    ];
    if agent.is_some() {
        variants.push(Variant {
            key: "istio-events-agent",
            label: "Istio pod, the agent listening on the event socket".into(),
            plugin: o.plugin.clone(),
            annotations: istio.clone(),
            conf: json!({"eventSocket": listening.display().to_string()}),
        });
    } else {
        progress("variants: the agent did not start; no 'agent listening' variant");
    }
    if let Some(old) = std::env::var_os("BENCH_PLUGIN_OLD").filter(|v| !v.is_empty()) {
        match std::fs::canonicalize(&old) {
            Ok(p) => {
                variants.push(Variant {
                    key: "istio-old-build",
                    label: format!("Istio pod, BENCH_PLUGIN_OLD ({})", p.display()),
                    plugin: p.clone(),
                    annotations: istio.clone(),
                    conf: json!({}),
                });
                variants.push(Variant {
                    key: "istio-v4-old-build",
                    label: "Istio pod, IPv4 only, BENCH_PLUGIN_OLD".into(),
                    plugin: p,
                    annotations: istio.clone(),
                    conf: json!({"prevResult": {"cniVersion": "1.0.0",
                        "ips": [{"address": "10.244.0.7/24", "gateway": "10.244.0.1"}]}}),
                });
            }
            Err(e) => progress(&format!("variants: BENCH_PLUGIN_OLD: {e}")),
        }
    }
    let mut csv = Csv::new(&o.file("csv"), "section,label,iter,variant,us,ok");
    let mut samples: BTreeMap<&str, Vec<Outcome>> = BTreeMap::new();
    let mut rng = Rng(o.seed);
    let mut all_ok = true;
    progress(&format!(
        "variants: {n} pods per variant, {} variants, round-robin",
        variants.len()
    ));
    for i in 0..n {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        rng.shuffle(&mut order);
        for k in order {
            let v = &variants[k];
            let ns = Ns::new(&o.prefix);
            let conf = Arc::new(variant_conf(&ns.path, &v.annotations, &v.conf));
            let r = run_step(&plugin_step(&v.plugin, "ADD", &ns, &conf), None);
            let ok = r.ok && table_exists(&ns);
            all_ok &= ok;
            csv.row(&[
                "variants".into(),
                o.label.clone(),
                i.to_string(),
                v.key.into(),
                format!("{:.1}", r.us),
                ok.to_string(),
            ]);
            samples.entry(v.key).or_default().push(Outcome { ok, ..r });
        }
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    let us = |k: &str| -> Vec<f64> {
        samples
            .get(k)
            .map(|v| v.iter().filter(|r| r.ok).map(|r| r.us).collect())
            .unwrap_or_default()
    };
    let base = stats(&us("istio")).median;
    let mut md = format!(
        "\n### {}\n\nThe same kind of pod ADDed by each variant into a fresh netns, {n} pods each, \
         variants interleaved in a shuffled order per round. Times are spawn → exit reaped, in ms.\n\n\
         | variant | median | p90 | p99 | × Istio pod (median) | ok |\n|---|---:|---:|---:|---:|---:|\n",
        o.title("ADD latency by mesh, build and event socket")
    );
    let mut summary = serde_json::Map::new();
    for v in &variants {
        let s = stats(&us(v.key));
        let total = samples.get(v.key).map_or(0, Vec::len);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {}/{total} |",
            v.label,
            ms(s.median),
            ms(s.p90),
            ms(s.p99),
            ratio(s.median, base),
            us(v.key).len()
        );
        summary.insert(
            v.key.into(),
            json!({"label": v.label, "us": stats_json(&s), "ratio_to_istio": s.median / base}),
        );
    }
    emit_md(o, &md);
    write_json(&o.file("json"), &Value::Object(summary));
    all_ok
}
