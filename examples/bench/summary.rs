//! `summary`: the headline figures of one run, read back from the sections' JSON files in the
//! run's directory and written as `summary.md` there. README and docs/PERFORMANCE.md quote this
//! table, so every figure they give comes from one run and none is typed by hand. A section that
//! did not run leaves its rows out.

use crate::Opts;
use serde_json::Value;
use std::fmt::Write as _;

fn read(o: &Opts, section: &str) -> Option<Value> {
    let text = std::fs::read_to_string(o.out.join(format!("{section}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// A median (µs) under `v` (a `stats_json` object).
fn median(v: &Value) -> Option<f64> {
    v["median"].as_f64().filter(|m| *m > 0.0)
}

fn p99(v: &Value) -> Option<f64> {
    v["p99"].as_f64().filter(|m| *m > 0.0)
}

fn ms(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

pub(crate) fn section_summary(o: &Opts) -> bool {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |what: &str, value: String| rows.push((what.to_string(), value));

    if let Some(add) = read(o, "add") {
        let r = &add["results"];
        let us = |k: &str| median(&r[k]["us"]);
        if let (Some(ours), Some(floor)) = (us("mesh-redirect"), us("exec-floor")) {
            row(
                "ADD, Istio pod, dual-stack (median, p99)",
                format!(
                    "{} (p99 {})",
                    ms(ours),
                    p99(&r["mesh-redirect"]["us"]).map_or("-".into(), ms)
                ),
            );
            row("floor: `/bin/true` spawned into the pod netns", ms(floor));
            row("ADD above the floor", ms(ours - floor));
            for (k, what) in [
                (
                    "iptables-legacy-restore",
                    "iptables-legacy-restore, v4 + v6",
                ),
                ("iptables-nft-restore", "iptables-nft-restore, v4 + v6"),
                ("nft-f", "`nft -f` of the same ruleset"),
                ("istio-cni-nft", "istio-cni's per-ADD sequence, nft backend"),
                (
                    "istio-cni-legacy",
                    "istio-cni's per-ADD sequence, legacy backend",
                ),
            ] {
                if let Some(t) = us(k) {
                    row(
                        what,
                        format!("{} ({:.1}× mesh-redirect's ADD)", ms(t), t / ours),
                    );
                }
            }
            if let Some(kb) = r["mesh-redirect"]["maxrss_kb"].as_f64() {
                row("ADD peak RSS", format!("{:.1} MiB", kb / 1024.0));
            }
        }
        if let Some(d) = us("mesh-redirect-del") {
            row("DEL, no agent (the kernel's release waits)", ms(d));
        }
        if let Some(d) = us("mesh-redirect-del-agent") {
            row("DEL, the agent listening (as deployed)", ms(d));
        }
    }

    if let Some(v) = read(o, "variants") {
        let us = |k: &str| median(&v[k]["us"]);
        for (k, what) in [
            ("istio-v4", "ADD, Istio pod, IPv4 only"),
            ("linkerd", "ADD, Linkerd pod"),
            ("kuma", "ADD, Kuma pod (YAML config, DNS captured)"),
            ("istio-events-agent", "ADD, Istio pod, the agent listening"),
        ] {
            if let Some(t) = us(k) {
                row(what, ms(t));
            }
        }
        if let (Some(new), Some(old)) = (us("istio"), us("istio-old-build")) {
            row(
                "ADD, Istio pod: this build against BENCH_PLUGIN_OLD (same run)",
                format!("{} against {} ({:.2}×)", ms(new), ms(old), new / old),
            );
        }
    }

    if let Some(p) = read(o, "profile") {
        let r = &p["results"];
        let m = |k: &str| {
            r.as_object().and_then(|m| {
                m.iter()
                    .find(|(name, _)| name.starts_with(k))
                    .and_then(|(_, v)| median(v))
            })
        };
        if let (Some(version), Some(floor)) = (
            m("exec: mesh-redirect version"),
            m("exec: /bin/true, posix_spawn"),
        ) {
            row(
                "start-up beyond the floor (`mesh-redirect version` − `/bin/true`)",
                ms(version - floor),
            );
        }
        if let Some(run) = m("exec: … of which inside plugin::run") {
            row(
                "inside `plugin::run` (the plugin's own durationUs)",
                ms(run),
            );
        }
    }

    if let Some(c) = read(o, "churn") {
        let q = |k: &str| {
            let s = &c[k]["us"];
            median(s).zip(p99(s))
        };
        for (k, what) in [
            ("quiet", "ADD, quiet (median / p99)"),
            (
                "churn",
                "ADD while other pods are DELeted at 50/s, no agent",
            ),
            (
                "churn-agent",
                "ADD while other pods are DELeted, the agent listening",
            ),
        ] {
            if let Some((m, p)) = q(k) {
                row(what, format!("{} / {}", ms(m), ms(p)));
            }
        }
        if let Some(per) = c["per_netns_destroy_work"].as_bool() {
            row(
                "this kernel's nf_tables destroy work",
                format!(
                    "{} ({}; an uninvolved close after another netns's delete: {:.0} µs)",
                    if per {
                        "per namespace"
                    } else {
                        "one global work item"
                    },
                    c["kernel"].as_str().unwrap_or("?"),
                    median(&c["uninvolved_close_us"]).unwrap_or(0.0)
                ),
            );
        }
    }

    if let Some(p) = read(o, "policy") {
        for cell in p["results"].as_array().into_iter().flatten() {
            let name = cell["policy"].as_str().unwrap_or("");
            if name == "10,000 CIDRs"
                && let Some(t) = median(&cell["results"]["mesh-redirect"]["total_us"])
            {
                row("ADD with 10,000 excluded CIDRs", ms(t));
            }
        }
    }

    if let Some(d) = read(o, "datapath") {
        let res = d["results"].as_array().cloned().unwrap_or_default();
        let lat = |prefix: &str| {
            res.iter()
                .find(|c| c["config"].as_str().is_some_and(|n| n.starts_with(prefix)))
                .and_then(|c| median(&c["latency_us"]))
        };
        if let (Some(zero), Some(big)) = (
            lat("mesh-redirect, 0 excluded"),
            res.iter()
                .find(|c| {
                    c["config"].as_str().is_some_and(|n| {
                        n.starts_with("mesh-redirect,") && !n.contains(" 0 excluded")
                    })
                })
                .and_then(|c| median(&c["latency_us"])),
        ) {
            row(
                "new-connection latency through the redirect, many excluded CIDRs against none",
                format!("{:+.1}%", (big / zero - 1.0) * 100.0),
            );
        }
    }

    if let Some(b) = read(o, "burst")
        && let Some(w) = median(&b["results"]["mesh-redirect"]["wall_us"])
    {
        row(
            &format!(
                "{} pods ADDed at once, wall time",
                b["pods"].as_u64().unwrap_or(0)
            ),
            ms(w),
        );
    }

    if let Ok(line) = std::fs::read_to_string(o.out.join("repair.csv"))
        && let Some(pass) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pass_ms="))
    {
        row(
            "the agent's first pass, repairing 100 pods started before it",
            format!("{pass} ms"),
        );
    }

    let machine = std::fs::read_to_string(o.out.join("machine.txt")).unwrap_or_default();
    let when = machine
        .lines()
        .find_map(|l| l.strip_prefix("date: "))
        .unwrap_or("?");
    let rev = machine
        .lines()
        .find_map(|l| l.strip_prefix("mesh-redirect: "))
        .unwrap_or("?");
    let mut md = format!(
        "\n### Summary of this run\n\n{when}, {rev}. Medians unless said otherwise; every figure \
         from this run's tables above.\n\n| figure | this run |\n|---|---:|\n"
    );
    for (what, value) in &rows {
        let _ = writeln!(md, "| {what} | {value} |");
    }
    print!("{md}");
    let _ = std::fs::write(o.out.join("summary.md"), &md);
    !rows.is_empty()
}
