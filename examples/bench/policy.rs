//! Section `policy`: latency against the number of excluded CIDRs and ports.

use crate::Opts;
use crate::netns::Ns;
use crate::payloads::{Alt, Policy, cidrs, plugin_conf, steps_for};
use crate::spawn::{have_time, mib, rss_probe, run_seq};
use crate::stats::{Csv, Rng, emit_md, ms, progress, stats, stats_json, write_json};
use mesh_redirect::kernel::Kernel;
use mesh_redirect::netns::Netns;
use mesh_redirect::ruleset;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The library path of an ADD, in-process: apply (build batch, send, commit, acks) and close.
pub(crate) fn apply_in_process(ns: &Ns, rs: &ruleset::Ruleset) -> Option<(f64, f64)> {
    let n = Netns::open(Path::new(&ns.path)).ok()?;
    let mut k = n.run(Kernel::open).ok()?.ok()?;
    let t0 = Instant::now();
    let r = k.replace(rs);
    let apply = t0.elapsed().as_secs_f64() * 1e6;
    let t1 = Instant::now();
    drop(k);
    let close = t1.elapsed().as_secs_f64() * 1e6;
    if let Err(e) = r {
        progress(&format!("FAILED: in-process replace: {e}"));
        return None;
    }
    Some((apply, close))
}

pub(crate) fn section_policy(o: &Opts) -> bool {
    let n = o.n.unwrap_or(if o.smoke { 2 } else { 25 });
    let sizes: Vec<(String, usize, usize)> = if o.smoke {
        vec![
            ("0 CIDRs".into(), 0, 0),
            ("100 CIDRs".into(), 100, 0),
            ("100 ports".into(), 0, 100),
        ]
    } else {
        vec![
            ("0 CIDRs".into(), 0, 0),
            ("100 CIDRs".into(), 100, 0),
            ("1,000 CIDRs".into(), 1000, 0),
            ("10,000 CIDRs".into(), 10000, 0),
            ("1,000 ports".into(), 0, 1000),
        ]
    };
    let policies: Vec<Policy> = sizes
        .iter()
        .map(|(name, c, p)| {
            let ports: Vec<u16> = (0..*p as u16).map(|i| 20000 + i).collect();
            Policy::new(name, &cidrs(*c), &ports)
        })
        .collect();
    // In-process apply is not an exec; it is a separate "alternative" here.
    #[derive(Clone, Copy, PartialEq)]
    enum PAlt {
        Exec(Alt),
        InProcess,
    }
    let alts = [
        PAlt::Exec(Alt::Plugin),
        PAlt::InProcess,
        PAlt::Exec(Alt::NftFile),
        PAlt::Exec(Alt::LegacyRestore),
        PAlt::Exec(Alt::NftRestore),
    ];
    let key = |a: PAlt| match a {
        PAlt::Exec(a) => a.key(),
        PAlt::InProcess => "in-process-apply",
    };
    let mut csv = Csv::new(
        &o.file("csv"),
        "section,label,iter,policy,alt,us,apply_us,close_us,v4_us,ru_maxrss_kb_incl_spawner,ok",
    );
    // (policy index, alt key) -> samples
    let mut total: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    let mut apply: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    let mut close: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    let mut v4only: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    let mut fails: BTreeMap<(usize, &str), usize> = BTreeMap::new();
    let mut rss: BTreeMap<(usize, &str), i64> = BTreeMap::new();
    let mut rng = Rng(o.seed ^ 0x9011c7);
    progress(&format!(
        "policy: {} sizes × {} alternatives × {n} iterations, interleaved",
        policies.len(),
        alts.len()
    ));
    let t_start = Instant::now();
    for i in 0..n {
        let mut order: Vec<(usize, PAlt)> = (0..policies.len())
            .flat_map(|p| alts.iter().map(move |a| (p, *a)))
            .collect();
        rng.shuffle(&mut order);
        for (pi, alt) in order {
            let p = &policies[pi];
            let ns = Ns::new(&o.prefix);
            let k = (pi, key(alt));
            let (us, ap, cl, v4, r_rss, ok) = match alt {
                PAlt::InProcess => match apply_in_process(&ns, &p.rs) {
                    Some((a, c)) => (a + c, a, c, 0.0, 0, true),
                    None => (0.0, 0.0, 0.0, 0.0, 0, false),
                },
                PAlt::Exec(a) => {
                    let conf = Arc::new(plugin_conf(&ns.path, &p.annotations));
                    let steps = steps_for(a, &o.plugin, &ns, p, &conf);
                    let r = run_seq(&steps, Some(ns.fd()));
                    let v4 = r.steps.first().map(|s| s.us).unwrap_or(0.0);
                    (r.us, 0.0, 0.0, v4, r.rss_kb, r.ok)
                }
            };
            if ok {
                total.entry(k).or_default().push(us);
                apply.entry(k).or_default().push(ap);
                close.entry(k).or_default().push(cl);
                v4only.entry(k).or_default().push(v4);
            } else {
                *fails.entry(k).or_default() += 1;
            }
            csv.row(&[
                "policy".into(),
                o.label.clone(),
                i.to_string(),
                p.name.clone(),
                key(alt).into(),
                format!("{us:.1}"),
                format!("{ap:.1}"),
                format!("{cl:.1}"),
                format!("{v4:.1}"),
                r_rss.to_string(),
                ok.to_string(),
            ]);
        }
        progress(&format!(
            "policy: {}/{n} ({:.0} s)",
            i + 1,
            t_start.elapsed().as_secs_f64()
        ));
    }
    // Peak RSS of each exec alternative, from separate runs (see rss_probe).
    if have_time() {
        let probes = if o.smoke { 1 } else { 2 };
        progress(&format!("policy: peak RSS, {probes} run(s) per cell"));
        for _ in 0..probes {
            for (pi, p) in policies.iter().enumerate() {
                for alt in alts {
                    let PAlt::Exec(a) = alt else { continue };
                    let ns = Ns::new(&o.prefix);
                    let conf = Arc::new(plugin_conf(&ns.path, &p.annotations));
                    let steps = steps_for(a, &o.plugin, &ns, p, &conf);
                    if let Some(kb) = rss_probe(&steps, Some(ns.fd()), &o.out) {
                        let m = rss.entry((pi, a.key())).or_default();
                        *m = (*m).max(kb);
                    }
                }
            }
        }
    }
    let med = |m: &BTreeMap<(usize, &str), Vec<f64>>, k: (usize, &str)| {
        stats(m.get(&k).map(|v| v.as_slice()).unwrap_or(&[])).median
    };
    let mut md = format!(
        "\n### {}\n\nMedian ms over {n} fresh pod netns per cell, all cells interleaved. CIDRs are \
         distinct IPv4 /24s in `excludeOutboundIPRanges` (mesh-redirect: one interval set; \
         Istio: one `-d CIDR -j RETURN` rule each); ports are `excludeOutboundPorts` (a set; \
         Istio: a tcp and a udp rule each). *apply* = `Kernel::replace` in-process (build the \
         batch, send, kernel commit, acks); *close* = closing the netlink socket afterwards.\n\n\
         | policy | iptables rules (v4+v6) | mesh-redirect ADD | apply (in-process) | close | `nft -f` | iptables-legacy-restore v4+v6 (v4) | iptables-nft-restore v4+v6 (v4) | peak RSS MiB: ours / `nft` / iptables-nft-restore |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        o.title("3. Policy size")
    );
    let mut summary = Vec::new();
    let mut all_ok = true;
    for (pi, p) in policies.iter().enumerate() {
        for a in alts {
            if let Some(f) = fails.get(&(pi, key(a))) {
                all_ok = false;
                progress(&format!("policy {}: {} failures for {}", p.name, f, key(a)));
            }
        }
        let pk = |a: Alt| (pi, a.key());
        let ipk = (pi, "in-process-apply");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {} ({}) | {} / {} / {} |",
            p.name,
            p.rules_v4 + p.rules_v6,
            ms(med(&total, pk(Alt::Plugin))),
            ms(med(&apply, ipk)),
            ms(med(&close, ipk)),
            ms(med(&total, pk(Alt::NftFile))),
            ms(med(&total, pk(Alt::LegacyRestore))),
            ms(med(&v4only, pk(Alt::LegacyRestore))),
            ms(med(&total, pk(Alt::NftRestore))),
            ms(med(&v4only, pk(Alt::NftRestore))),
            mib(rss.get(&pk(Alt::Plugin)).copied()),
            mib(rss.get(&pk(Alt::NftFile)).copied()),
            mib(rss.get(&pk(Alt::NftRestore)).copied()),
        );
        let mut cell = serde_json::Map::new();
        for a in alts {
            let k = (pi, key(a));
            cell.insert(
                key(a).into(),
                json!({
                    "total_us": stats_json(&stats(total.get(&k).map(|v| v.as_slice()).unwrap_or(&[]))),
                    "apply_us": stats_json(&stats(apply.get(&k).map(|v| v.as_slice()).unwrap_or(&[]))),
                    "close_us": stats_json(&stats(close.get(&k).map(|v| v.as_slice()).unwrap_or(&[]))),
                    "first_command_us": stats_json(&stats(v4only.get(&k).map(|v| v.as_slice()).unwrap_or(&[]))),
                    "maxrss_kb": rss.get(&k).copied().unwrap_or(0),
                    "failures": fails.get(&k).copied().unwrap_or(0),
                }),
            );
        }
        summary.push(json!({"policy": p.name, "iptables_rules_v4": p.rules_v4,
                            "iptables_rules_v6": p.rules_v6,
                            "set_elements": p.rs.sets.iter().map(|s| s.elems.len()).sum::<usize>(),
                            "results": cell}));
    }
    write_json(
        &o.file("json"),
        &json!({"section": "policy", "label": o.label, "iterations": n, "results": summary}),
    );
    emit_md(o, &md);
    all_ok
}
