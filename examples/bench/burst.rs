//! Section `burst`: N pods ADDed at once.

use crate::Opts;
use crate::netns::Ns;
use crate::payloads::{Alt, Policy, plugin_conf, steps_for, table_exists};
use crate::spawn::run_seq;
use crate::stats::{Csv, Rng, emit_md, ms, progress, stats, stats_json, write_json};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Barrier};
use std::time::Instant;

pub(crate) fn section_burst(o: &Opts) -> bool {
    let pods = o.pods.unwrap_or(if o.smoke { 5 } else { 100 });
    let rounds = o.rounds.unwrap_or(if o.smoke { 1 } else { 3 });
    let pol = Policy::new("default", &[], &[]);
    let alts = [
        Alt::Plugin,
        Alt::NftFile,
        Alt::LegacyRestore,
        Alt::NftRestore,
        Alt::IstioNft,
    ];
    let mut csv = Csv::new(
        &o.file("csv"),
        "section,label,round,alt,pod,start_us,end_us,us,ru_maxrss_kb_incl_spawner,ok",
    );
    let mut rng = Rng(o.seed ^ 0xb0b);
    let mut walls: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut lat: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut oks: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    progress(&format!(
        "burst: {pods} pods at once, {rounds} round(s), {} alternatives",
        alts.len()
    ));
    for round in 0..rounds {
        let mut order = alts.to_vec();
        rng.shuffle(&mut order);
        for alt in order {
            let nss: Vec<Arc<Ns>> = (0..pods).map(|_| Arc::new(Ns::new(&o.prefix))).collect();
            let barrier = Arc::new(Barrier::new(pods + 1));
            let mut handles = Vec::new();
            for ns in &nss {
                let conf = Arc::new(plugin_conf(&ns.path, &pol.annotations));
                let steps = steps_for(alt, &o.plugin, ns, &pol, &conf);
                let (ns, barrier) = (ns.clone(), barrier.clone());
                handles.push(std::thread::spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let r = run_seq(&steps, Some(ns.fd()));
                    (start, Instant::now(), r)
                }));
            }
            // Let every thread reach the barrier, then release them together.
            barrier.wait();
            let start = Instant::now();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let end = results.iter().map(|r| r.1).max().unwrap_or(start);
            let mut results = results;
            if alt == Alt::Plugin {
                // Exit status 0 must mean the table is there.
                for ((_, _, r), ns) in results.iter_mut().zip(&nss) {
                    if r.ok && !table_exists(ns) {
                        progress("FAILED: burst: mesh-redirect exited 0 but the table is missing");
                        r.ok = false;
                    }
                }
            }
            let wall = end.duration_since(start).as_secs_f64() * 1e6;
            walls.entry(alt.key()).or_default().push(wall);
            let e = oks.entry(alt.key()).or_default();
            for (k, (s, t, r)) in results.iter().enumerate() {
                e.1 += 1;
                if r.ok {
                    e.0 += 1;
                    lat.entry(alt.key()).or_default().push(r.us);
                }
                csv.row(&[
                    "burst".into(),
                    o.label.clone(),
                    round.to_string(),
                    alt.key().into(),
                    k.to_string(),
                    format!(
                        "{:.1}",
                        s.saturating_duration_since(start).as_secs_f64() * 1e6
                    ),
                    format!(
                        "{:.1}",
                        t.saturating_duration_since(start).as_secs_f64() * 1e6
                    ),
                    format!("{:.1}", r.us),
                    r.rss_kb.to_string(),
                    r.ok.to_string(),
                ]);
            }
            progress(&format!(
                "burst: round {} {}: {pods} pods in {} ms",
                round + 1,
                alt.key(),
                ms(wall)
            ));
            drop(nss);
        }
    }
    let mut md = format!(
        "\n### {}\n\n{pods} pods (fresh netns each) started at once from {pods} threads; wall = \
         release → last exit; {rounds} round(s), alternatives interleaved. ms.\n\n\
         | alternative | wall (median of rounds) | per-pod median | p90 | p99 | max | ok |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        o.title("2. Burst: pods ADDed concurrently")
    );
    let mut summary = serde_json::Map::new();
    let mut all_ok = true;
    for alt in alts {
        let w = stats(&walls[alt.key()]);
        let l = stats(lat.get(alt.key()).map(|v| v.as_slice()).unwrap_or(&[]));
        let (okn, tot) = oks[alt.key()];
        all_ok &= okn == tot;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {okn}/{tot} |",
            alt.label(),
            ms(w.median),
            ms(l.median),
            ms(l.p90),
            ms(l.p99),
            ms(l.max),
        );
        summary.insert(
            alt.key().into(),
            json!({"label": alt.label(), "wall_us": stats_json(&w), "per_pod_us": stats_json(&l),
                   "ok": okn, "n": tot}),
        );
    }
    write_json(
        &o.file("json"),
        &json!({"section": "burst", "label": o.label, "pods": pods, "rounds": rounds,
                "results": summary}),
    );
    emit_md(o, &md);
    all_ok
}
