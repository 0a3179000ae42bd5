//! Section `add`: ADD latency, side by side, round-robin.

use crate::Opts;
use crate::agent::start_agent;
use crate::netns::Ns;
use crate::payloads::{
    Alt, Policy, plugin_conf, plugin_step, steps_for, table_exists, variant_conf,
};
use crate::spawn::{Outcome, SeqOutcome, have_time, mib, rss_probe, run_seq, run_step};
use crate::stats::{Csv, Rng, emit_md, ms, progress, ratio, stats, stats_json, write_json};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

pub(crate) fn section_add(o: &Opts) -> bool {
    let n = o.n.unwrap_or(if o.smoke { 3 } else { 200 });
    let pol = Policy::new("default", &[], &[]);
    let alts = [
        Alt::Plugin,
        Alt::NftFile,
        Alt::LegacyRestore,
        Alt::NftRestore,
        Alt::IstioNft,
        Alt::IstioLegacy,
        Alt::ExecFloor,
    ];
    let mut csv = Csv::new(
        &o.file("csv"),
        "section,label,iter,alt,step,command,us,ru_maxrss_kb_incl_spawner,ok",
    );
    let mut samples: BTreeMap<&str, Vec<SeqOutcome>> = BTreeMap::new();
    let mut dels: Vec<Outcome> = Vec::new();
    // DELs with the agent listening on the event socket (as deployed: it takes the socket
    // whose release waits), alternating with those above.
    let mut dels_agent: Vec<Outcome> = Vec::new();
    let agent_dir = o.out.join(format!(".agent-add-{}", std::process::id()));
    let listening = agent_dir.join("events.sock");
    let agent = start_agent(&o.plugin, &agent_dir, &listening);
    if agent.is_none() {
        progress("add: the agent did not start; DEL is measured without it only");
    }
    let mut step_names: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut rng = Rng(o.seed);
    let mut all_ok = true;
    progress(&format!(
        "add: {n} pods per alternative, {} alternatives, round-robin",
        alts.len()
    ));
    let t_start = Instant::now();
    for i in 0..n {
        let mut order = alts.to_vec();
        rng.shuffle(&mut order);
        for alt in order {
            let ns = Ns::new(&o.prefix);
            let conf = Arc::new(plugin_conf(&ns.path, &pol.annotations));
            let steps = steps_for(alt, &o.plugin, &ns, &pol, &conf);
            let r = run_seq(&steps, Some(ns.fd()));
            all_ok &= r.ok;
            for (k, (s, out)) in steps.iter().zip(&r.steps).enumerate() {
                csv.row(&[
                    "add".into(),
                    o.label.clone(),
                    i.to_string(),
                    alt.key().into(),
                    k.to_string(),
                    s.text(),
                    format!("{:.1}", out.us),
                    out.rss_kb.to_string(),
                    out.ok.to_string(),
                ]);
            }
            csv.row(&[
                "add".into(),
                o.label.clone(),
                i.to_string(),
                alt.key().into(),
                "total".into(),
                format!("{} commands", steps.len()),
                format!("{:.1}", r.us),
                r.rss_kb.to_string(),
                r.ok.to_string(),
            ]);
            step_names
                .entry(alt.key())
                .or_insert_with(|| steps.iter().map(|s| s.text()).collect());
            if alt == Alt::Plugin && r.ok {
                // The table must be there; then DEL it, as the runtime would at teardown.
                if !table_exists(&ns) {
                    progress("FAILED: mesh-redirect ADD exited 0 but the table is missing");
                    all_ok = false;
                }
                let via_agent = agent.is_some() && i % 2 == 1;
                let del_conf = if via_agent {
                    let extra = json!({"eventSocket": listening.display().to_string()});
                    let ann = serde_json::to_value(&pol.annotations).unwrap_or_default();
                    Arc::new(variant_conf(&ns.path, &ann, &extra))
                } else {
                    conf.clone()
                };
                let del = run_step(&plugin_step(&o.plugin, "DEL", &ns, &del_conf), None);
                let del = Outcome {
                    ok: del.ok && !table_exists(&ns),
                    ..del
                };
                all_ok &= del.ok;
                let key = if via_agent {
                    "mesh-redirect-del-agent"
                } else {
                    "mesh-redirect-del"
                };
                csv.row(&[
                    "add".into(),
                    o.label.clone(),
                    i.to_string(),
                    key.into(),
                    "0".into(),
                    "mesh-redirect DEL".into(),
                    format!("{:.1}", del.us),
                    del.rss_kb.to_string(),
                    del.ok.to_string(),
                ]);
                if via_agent {
                    dels_agent.push(del);
                } else {
                    dels.push(del);
                }
            }
            samples.entry(alt.key()).or_default().push(r);
        }
        if (i + 1) % 50 == 0 {
            progress(&format!(
                "add: {}/{n} ({:.0} s)",
                i + 1,
                t_start.elapsed().as_secs_f64()
            ));
        }
    }

    drop(agent);
    let _ = std::fs::remove_dir_all(&agent_dir);
    // Peak RSS, from separate runs (see rss_probe).
    let probes = if o.smoke { 1 } else { 5 };
    let mut peak: BTreeMap<String, Option<i64>> = BTreeMap::new();
    if have_time() {
        progress(&format!("add: peak RSS, {probes} pods per alternative"));
        for _ in 0..probes {
            for alt in alts {
                let ns = Ns::new(&o.prefix);
                let conf = Arc::new(plugin_conf(&ns.path, &pol.annotations));
                let steps = steps_for(alt, &o.plugin, &ns, &pol, &conf);
                let mut put = |k: String, v: Option<i64>| {
                    let e = peak.entry(k).or_insert(Some(0));
                    *e = match (*e, v) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                };
                put(alt.key().into(), rss_probe(&steps, Some(ns.fd()), &o.out));
                if matches!(alt, Alt::LegacyRestore | Alt::NftRestore) {
                    let ns4 = Ns::new(&o.prefix);
                    put(
                        format!("{}-v4", alt.key()),
                        rss_probe(&steps[..1], Some(ns4.fd()), &o.out),
                    );
                }
                if alt == Alt::Plugin {
                    // The table is there now: DEL deletes it.
                    let del = plugin_step(&o.plugin, "DEL", &ns, &conf);
                    put("mesh-redirect-del".into(), rss_probe(&[del], None, &o.out));
                }
            }
        }
    }
    let peak_of = |k: &str| peak.get(k).copied().flatten();
    let ok_us =
        |v: &[SeqOutcome]| -> Vec<f64> { v.iter().filter(|r| r.ok).map(|r| r.us).collect() };
    let base = stats(&ok_us(&samples[Alt::Plugin.key()])).median;
    let mut md = format!(
        "\n### {}\n\nEach alternative applies the same policy (Istio defaults, dual-stack) to a fresh \
         pod netns; {n} pods each, alternatives interleaved in a shuffled order per round. Times \
         are spawn → exit reaped, in ms. Peak RSS: the largest `ru_maxrss` of the commands, \
         from separate runs under `/usr/bin/time` (a minimal parent), {probes} pods each.\n\n\
         | alternative | commands | median | p90 | p99 | × mesh-redirect (median) | peak RSS MiB | ok |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        o.title("1. ADD latency, whole process")
    );
    let mut summary = serde_json::Map::new();
    let mut row = |label: &str,
                   key: String,
                   cmds: String,
                   v: &[f64],
                   rss: Option<i64>,
                   ok: usize,
                   total: usize| {
        let s = stats(v);
        let _ = writeln!(
            md,
            "| {label} | {cmds} | {} | {} | {} | {} | {} | {ok}/{total} |",
            ms(s.median),
            ms(s.p90),
            ms(s.p99),
            ratio(s.median, base),
            mib(rss)
        );
        summary.insert(
            key,
            json!({"label": label, "commands": cmds, "us": stats_json(&s), "maxrss_kb": rss,
                   "ok": ok, "n": total, "ratio_to_mesh_redirect": s.median / base}),
        );
    };
    for alt in alts {
        let v = &samples[alt.key()];
        let okn = v.iter().filter(|r| r.ok).count();
        let rss = peak_of(alt.key());
        let cmds = step_names[alt.key()].len();
        row(
            alt.label(),
            alt.key().into(),
            cmds.to_string(),
            &ok_us(v),
            rss,
            okn,
            v.len(),
        );
        if alt == Alt::Plugin {
            let dv: Vec<f64> = dels.iter().filter(|d| d.ok).map(|d| d.us).collect();
            let drss = peak_of("mesh-redirect-del");
            let dok = dels.iter().filter(|d| d.ok).count();
            row(
                "mesh-redirect DEL (table present), no agent: it waits for the kernel",
                "mesh-redirect-del".into(),
                "1".into(),
                &dv,
                drss,
                dok,
                dels.len(),
            );
            if !dels_agent.is_empty() {
                let av: Vec<f64> = dels_agent.iter().filter(|d| d.ok).map(|d| d.us).collect();
                let aok = dels_agent.iter().filter(|d| d.ok).count();
                row(
                    "mesh-redirect DEL (table present), the agent listening (as deployed)",
                    "mesh-redirect-del-agent".into(),
                    "1".into(),
                    &av,
                    None,
                    aok,
                    dels_agent.len(),
                );
            }
        }
        if matches!(alt, Alt::LegacyRestore | Alt::NftRestore) {
            // The IPv4 command alone (the first of the two), the most generous comparison.
            let v4: Vec<f64> = v.iter().filter(|r| r.ok).map(|r| r.steps[0].us).collect();
            let rss4 = peak_of(&format!("{}-v4", alt.key()));
            let label = if alt == Alt::LegacyRestore {
                "  ↳ `iptables-legacy-restore` (IPv4 only)"
            } else {
                "  ↳ `iptables-nft-restore` (IPv4 only)"
            };
            row(
                label,
                format!("{}-v4", alt.key()),
                "1".into(),
                &v4,
                rss4,
                okn,
                v.len(),
            );
        }
    }
    // Where the istio-cni sequences spend their time, by command.
    let _ = write!(
        md,
        "\nistio-cni sequences by command (median ms per command; n = {n}):\n\n\
         | # | command (nft backend) | median | | command (legacy backend) | median |\n\
         |---:|---|---:|---|---|---:|\n"
    );
    let per_step = |key: &str| -> Vec<(String, f64)> {
        let names = &step_names[key];
        (0..names.len())
            .map(|k| {
                let v: Vec<f64> = samples[key]
                    .iter()
                    .filter(|r| r.ok && r.steps.len() > k)
                    .map(|r| r.steps[k].us)
                    .collect();
                (names[k].clone(), stats(&v).median)
            })
            .collect()
    };
    let a = per_step(Alt::IstioNft.key());
    let b = per_step(Alt::IstioLegacy.key());
    let mut steps_json = Vec::new();
    for k in 0..a.len().max(b.len()) {
        let (an, am) = a.get(k).cloned().unwrap_or_default();
        let (bn, bm) = b.get(k).cloned().unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | `{an}` | {} | | {} | {} |",
            k + 1,
            ms(am),
            if bn.is_empty() {
                String::new()
            } else {
                format!("`{bn}`")
            },
            if bn.is_empty() { String::new() } else { ms(bm) }
        );
        steps_json.push(json!({"nft": [an, am], "legacy": [bn, bm]}));
    }
    summary.insert("istio_steps_median_us".into(), Value::Array(steps_json));
    write_json(
        &o.file("json"),
        &json!({"section": "add", "label": o.label, "pods": n, "results": summary}),
    );
    emit_md(o, &md);
    all_ok
}
