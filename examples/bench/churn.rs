//! Section `churn`: ADD under churn (other pods being deleted meanwhile).

use crate::Opts;
use crate::agent::start_agent;
use crate::netns::Ns;
use crate::payloads::{Policy, plugin_conf, plugin_step, table_exists, variant_conf};
use crate::spawn::run_step;
use crate::stats::{Csv, Rng, emit_md, ms, progress, ratio, stats, stats_json, write_json};
use mesh_redirect::kernel::Kernel;
use mesh_redirect::netns::Netns;
use mesh_redirect::ruleset;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Installs `rs` in `ns` in-process (the churn's refill: not measured).
pub(crate) fn install(ns: &Ns, rs: &ruleset::Ruleset) -> bool {
    Netns::open(Path::new(&ns.path))
        .ok()
        .and_then(|n| n.run(Kernel::open).ok())
        .and_then(|k| k.ok())
        .is_some_and(|mut k| k.replace(rs).is_ok())
}

/// How long closing an uninvolved netfilter socket takes right after another namespace
/// committed a table deletion, `trials` times (µs). The socket only asked (no commit of its
/// own), so on kernels with per-namespace destroy work (Linux 6.14, fb8286562ecf, and the
/// stable kernels it was backported to) its close is immediate; on kernels that flush one
/// global work item it waits for the other namespace's grace period.
pub(crate) fn uninvolved_close_after_foreign_delete(
    o: &Opts,
    rs: &ruleset::Ruleset,
    trials: usize,
) -> Vec<f64> {
    let mut v = Vec::new();
    let bystander = Ns::new(&o.prefix);
    for _ in 0..trials {
        let victim = Ns::new(&o.prefix);
        if !install(&victim, rs) {
            continue;
        }
        let (Ok(vn), Ok(bn)) = (
            Netns::open(Path::new(&victim.path)),
            Netns::open(Path::new(&bystander.path)),
        ) else {
            continue;
        };
        let (Ok(Ok(mut kv)), Ok(Ok(mut kb))) = (vn.run(Kernel::open), bn.run(Kernel::open)) else {
            continue;
        };
        let _ = kb.table_exists();
        // The deletion's commit queues its destroy work; its own socket stays open.
        if kv.delete(None).is_err() {
            continue;
        }
        let t = Instant::now();
        drop(kb);
        v.push(t.elapsed().as_secs_f64() * 1e6);
        drop(kv);
    }
    v
}

/// ADD latency while other pods on the node are deleted at a steady rate, against quiet ADDs
/// in the same run: without the agent, and with the agent taking the plugin's socket.
pub(crate) fn section_churn(o: &Opts) -> bool {
    let n = o.n.unwrap_or(if o.smoke { 4 } else { 300 });
    let rate_hz = 50.0;
    let pol = Policy::new("default", &[], &[]);
    let dir = o.out.join(format!(".agent-churn-{}", std::process::id()));
    let listening = dir.join("events.sock");
    let agent = start_agent(&o.plugin, &dir, &listening);
    let with_agent = json!({"eventSocket": listening.display().to_string()});

    // The churn: a DEL of another captured pod every 1/rate s (exec'd as the runtime would,
    // without an agent, so each DEL's destroy work is pending in the kernel), its table
    // reinstalled in-process afterwards so that the pool never runs dry.
    let active = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let dels = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (active, stop, dels) = (active.clone(), stop.clone(), dels.clone());
        let (prefix, plugin, ann, rs) = (
            o.prefix.clone(),
            o.plugin.clone(),
            pol.annotations.clone(),
            pol.rs.clone(),
        );
        std::thread::spawn(move || {
            let pool: Vec<Ns> = (0..8).map(|_| Ns::new(&prefix)).collect();
            for p in &pool {
                install(p, &rs);
            }
            let period = Duration::from_secs_f64(1.0 / rate_hz);
            let mut next = Instant::now();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                if !active.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                    next = Instant::now();
                    continue;
                }
                let p = &pool[i % pool.len()];
                i += 1;
                let conf = Arc::new(plugin_conf(&p.path, &ann));
                if run_step(&plugin_step(&plugin, "DEL", p, &conf), None).ok {
                    dels.fetch_add(1, Ordering::SeqCst);
                }
                install(p, &rs);
                next += period;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        })
    };

    #[derive(Clone, Copy, PartialEq)]
    enum Cfg {
        Quiet,
        Churn,
        ChurnAgent,
    }
    let cfgs: Vec<Cfg> = if agent.is_some() {
        vec![Cfg::Quiet, Cfg::Churn, Cfg::ChurnAgent]
    } else {
        progress("churn: the agent did not start; no 'agent listening' row");
        vec![Cfg::Quiet, Cfg::Churn]
    };
    let mut csv = Csv::new(&o.file("csv"), "section,label,iter,config,us,ok");
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cfgs.len()];
    let mut all_ok = true;
    let block = if o.smoke { 2 } else { 20 };
    let mut rng = Rng(o.seed ^ 0xc4);
    progress(&format!(
        "churn: {n} ADDs per configuration in blocks of {block}, DELs of other pods at {rate_hz}/s"
    ));
    let t0 = Instant::now();
    let mut done = 0;
    while done < n {
        let mut order: Vec<usize> = (0..cfgs.len()).collect();
        rng.shuffle(&mut order);
        for k in order {
            let cfg = cfgs[k];
            let churning = cfg != Cfg::Quiet;
            if active.swap(churning, Ordering::SeqCst) != churning {
                // Let the churn reach (or leave) its steady state.
                std::thread::sleep(Duration::from_millis(200));
            }
            for j in 0..block.min(n - done) {
                let ns = Ns::new(&o.prefix);
                let extra = if cfg == Cfg::ChurnAgent {
                    with_agent.clone()
                } else {
                    json!({})
                };
                let conf = Arc::new(variant_conf(
                    &ns.path,
                    &serde_json::to_value(&pol.annotations).unwrap_or_default(),
                    &extra,
                ));
                let r = run_step(&plugin_step(&o.plugin, "ADD", &ns, &conf), None);
                let ok = r.ok && table_exists(&ns);
                all_ok &= ok;
                csv.row(&[
                    "churn".into(),
                    o.label.clone(),
                    (done + j).to_string(),
                    ["quiet", "churn", "churn-agent"][k].into(),
                    format!("{:.1}", r.us),
                    ok.to_string(),
                ]);
                if ok {
                    samples[k].push(r.us);
                }
            }
        }
        done += block;
    }
    active.store(false, Ordering::SeqCst);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let _ = churn.join();
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);

    let probe = uninvolved_close_after_foreign_delete(o, &pol.rs, if o.smoke { 3 } else { 30 });
    let ps = stats(&probe);
    // A grace period here is milliseconds; an immediate close, microseconds.
    let per_netns = ps.median < 1000.0;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let quiet = stats(&samples[0]);
    let mut md = format!(
        "\n### {}\n\nFresh pods ADDed while other captured pods on the node are DELeted at \
         {rate_hz:.0}/s ({} DELs in {elapsed:.0} s), against quiet ADDs; configurations \
         interleaved in blocks of {block}, {n} ADDs each. Spawn → exit reaped, ms.\n\n\
         | configuration | median | p90 | p99 | p99 × quiet p99 | ok |\n|---|---:|---:|---:|---:|---:|\n",
        o.title("ADD under churn"),
        dels.load(Ordering::SeqCst)
    );
    let labels = [
        "quiet: no DELs meanwhile",
        "churn: DELs meanwhile, no agent",
        "churn: DELs meanwhile, the agent takes the plugin's socket",
    ];
    let mut summary = serde_json::Map::new();
    for (k, v) in samples.iter().enumerate() {
        let s = stats(v);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {}/{n} |",
            labels[k],
            ms(s.median),
            ms(s.p90),
            ms(s.p99),
            ratio(s.p99, quiet.p99),
            v.len()
        );
        summary.insert(
            ["quiet", "churn", "churn-agent"][k].into(),
            json!({"label": labels[k], "us": stats_json(&s)}),
        );
    }
    let _ = write!(
        md,
        "\nKernel {}: closing an uninvolved netfilter socket right after another namespace \
         deleted a table took {} µs (median of {}; p90 {} µs): {}.\n",
        kernel.trim(),
        ps.median.round(),
        ps.n,
        ps.p90.round(),
        if per_netns {
            "this kernel keeps destroy work per namespace (fb8286562ecf), so other pods' DELs \
             cannot make an ADD's close wait"
        } else {
            "this kernel flushes one global destroy work item on every netfilter socket \
             release (before fb8286562ecf), so an ADD's close waits for other pods' DELs"
        }
    );
    summary.insert("uninvolved_close_us".into(), stats_json(&ps));
    summary.insert("per_netns_destroy_work".into(), json!(per_netns));
    summary.insert("kernel".into(), json!(kernel.trim()));
    summary.insert("dels".into(), json!(dels.load(Ordering::SeqCst)));
    emit_md(o, &md);
    write_json(&o.file("json"), &Value::Object(summary));
    all_ok
}
