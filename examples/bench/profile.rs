//! Section `profile`: where an ADD spends its time.

use crate::Opts;
use crate::netns::Ns;
use crate::payloads::{Policy, plugin_conf, plugin_conf_log, plugin_step};
use crate::spawn::{FORK_MODE, Step, run_step, run_step_mode};
use crate::stats::{Csv, Rng, emit_md, ms, progress, stats, stats_json, write_json};
use mesh_redirect::config::{self, PluginConfig};
use mesh_redirect::kernel::Kernel;
use mesh_redirect::netns::Netns;
use mesh_redirect::policy::{self, Decision, Pod};
use mesh_redirect::{protocol, ruleset};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Samples kernel stacks while `busy` is set: thread `tid` of this process (keeps the deepest
/// one inside a close()), and the kernel workers (keeps one running nf_tables' transaction
/// destroy work).
pub(crate) fn stack_sampler(
    tid: i32,
    busy: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    out: Arc<Mutex<String>>,
    worker: Arc<Mutex<String>>,
) {
    let path = format!("/proc/self/task/{tid}/stack");
    let kworkers = || -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let p = e.path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            if comm.starts_with("kworker") {
                v.push(p.join("stack"));
            }
        }
        v
    };
    let mut workers: Vec<PathBuf> = Vec::new();
    let mut was_busy = false;
    while !done.load(Ordering::SeqCst) {
        let is_busy = busy.load(Ordering::SeqCst);
        if is_busy && !was_busy {
            workers = kworkers();
        }
        was_busy = is_busy;
        if is_busy {
            if let Ok(s) = std::fs::read_to_string(&path)
                && s.contains("close")
            {
                let mut g = out.lock().unwrap();
                if s.lines().count() > g.lines().count() {
                    *g = s;
                }
            }
            for w in &workers {
                if let Ok(s) = std::fs::read_to_string(w)
                    && s.contains("nf_tables_trans_destroy")
                {
                    let mut g = worker.lock().unwrap();
                    if s.lines().count() > g.lines().count() {
                        *g = s;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub(crate) fn strace_step(step: &Step, out_file: &Path) -> Step {
    let mut s = step.clone();
    let mut argv = vec![
        "strace".to_string(),
        "-qq".into(),
        "-f".into(),
        "--seccomp-bpf".into(),
        "-T".into(),
        "-e".into(),
        "trace=execve,setns,socket,sendto,sendmsg,close,exit_group".into(),
        "-o".into(),
        out_file.display().to_string(),
        "--".into(),
    ];
    argv.extend(step.argv.iter().cloned());
    s.argv = argv;
    s
}

/// The syscall durations that matter, from `strace -T` output: (sendmsg of the batch,
/// the slowest close).
pub(crate) fn parse_strace(text: &str) -> (f64, f64) {
    let dur = |l: &str| -> f64 {
        l.rsplit_once('<')
            .and_then(|(_, d)| d.trim_end_matches('>').parse::<f64>().ok())
            .map(|s| s * 1e6)
            .unwrap_or(0.0)
    };
    let mut send = 0.0f64;
    let mut close = 0.0f64;
    for l in text.lines() {
        if l.contains("sendmsg(") || l.contains("sendto(") {
            send = send.max(dur(l));
        } else if l.contains("close(") {
            close = close.max(dur(l));
        }
    }
    (send, close)
}

pub(crate) fn section_profile(o: &Opts) -> bool {
    let n = o.n.unwrap_or(if o.smoke { 3 } else { 200 });
    let traced = if o.smoke { 2 } else { 30 };
    let fork = FORK_MODE.load(Ordering::Relaxed);
    let pol = Policy::new("default", &[], &[]);
    // The same ruleset without `add table; delete table` first: an add-only transaction.
    let add_only: Arc<Vec<u8>> = Arc::new(
        String::from_utf8_lossy(&pol.nft)
            .lines()
            .filter(|l| !l.starts_with("add table") && !l.starts_with("delete table"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .into_bytes(),
    );
    let log = o.file("plugin-log.json");
    let mut csv = Csv::new(&o.file("csv"), "section,label,iter,phase,us");
    let mut ph: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut all_ok = true;
    let tid = nix::unistd::gettid().as_raw();
    let busy = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let stack = Arc::new(Mutex::new(String::new()));
    let worker = Arc::new(Mutex::new(String::new()));
    let sampler = {
        let (b, d, s, w) = (busy.clone(), done.clone(), stack.clone(), worker.clone());
        std::thread::spawn(move || stack_sampler(tid, b, d, s, w))
    };
    let version = {
        let mut s = Step::new(&[&o.plugin.display().to_string(), "version"]);
        s.in_netns = false;
        s
    };
    const ADD: &str = "exec: mesh-redirect ADD (whole process)";
    const RUN: &str = "exec: … of which inside plugin::run (the plugin's logged durationUs)";
    const OUTSIDE: &str = "exec: … of which outside plugin::run (ADD − durationUs, paired)";
    const VERSION: &str = "exec: mesh-redirect version (exec, dynamic loading, init, exit)";
    const TRUE_SPAWN: &str = "exec: /bin/true, posix_spawn after setns in the spawning thread";
    const TRUE_FORK: &str = "exec: /bin/true, fork + setns in the child (pre_exec) + exec";
    const NFT_REPLACE: &str = "exec: nft -f, add table + delete table + table {…} (replace)";
    const NFT_ADD: &str = "exec: nft -f, table {…} only (add-only transaction)";
    const PARSE: &str = "in-process: parse stdin + config + policy + ruleset";
    const OPEN: &str = "in-process: open + verify the netns";
    const SETNS: &str = "in-process: setns in + back (alone)";
    const SOCK: &str = "in-process: setns + netlink socket + setns back";
    const REPLACE: &str = "in-process: replace (build batch, sendmsg, commit, acks)";
    const PASSTHROUGH6: &str =
        "in-process: `::6` on lo (an rtnetlink socket in the netns, the address added)";
    const CLOSE: &str = "in-process: close the socket after the commit";
    const CLOSE_RO: &str = "contrast: close after a read-only query (no commit)";
    const CLOSE_LATE: &str = "contrast: close 50 ms after the commit";
    progress(&format!("profile: {n} iterations"));
    let mut rng = Rng(o.seed ^ 0x9f);
    for i in 0..n {
        let mut rec = |phase: &'static str, us: f64| {
            ph.entry(phase).or_default().push(us);
            csv.row(&[
                "profile".into(),
                o.label.clone(),
                i.to_string(),
                phase.into(),
                format!("{us:.2}"),
            ]);
        };
        // Whole-process measurements, in a shuffled order, each on a fresh netns.
        let mut order = [0, 1, 2, 3, 4, 5];
        rng.shuffle(&mut order);
        for which in order {
            let ns = Ns::new(&o.prefix);
            match which {
                0 => {
                    let _ = std::fs::remove_file(&log);
                    let conf = Arc::new(plugin_conf_log(&ns.path, &pol.annotations, Some(&log)));
                    let r = run_step(&plugin_step(&o.plugin, "ADD", &ns, &conf), None);
                    if !r.ok {
                        progress("FAILED: mesh-redirect ADD (with logFile)");
                        all_ok = false;
                    }
                    rec(ADD, r.us);
                    let inside = std::fs::read_to_string(&log)
                        .ok()
                        .and_then(|t| serde_json::from_str::<Value>(t.trim()).ok())
                        .and_then(|v| v["durationUs"].as_f64());
                    if let Some(d) = inside {
                        rec(RUN, d);
                        rec(OUTSIDE, r.us - d);
                    }
                }
                1 => {
                    let r = run_step(&version, None);
                    if !r.ok {
                        progress("FAILED (profile, line 2012)");
                        all_ok = false;
                    }
                    rec(VERSION, r.us);
                }
                2 => rec(
                    TRUE_SPAWN,
                    run_step_mode(&Step::new(&["/bin/true"]), Some(ns.fd()), false).us,
                ),
                3 => rec(
                    TRUE_FORK,
                    run_step_mode(&Step::new(&["/bin/true"]), Some(ns.fd()), true).us,
                ),
                4 => {
                    let r = run_step(
                        &Step::new(&["nft", "-f", "-"]).stdin(&pol.nft),
                        Some(ns.fd()),
                    );
                    if !r.ok {
                        progress("FAILED (profile, line 2028)");
                        all_ok = false;
                    }
                    rec(NFT_REPLACE, r.us);
                }
                _ => {
                    let r = run_step(
                        &Step::new(&["nft", "-f", "-"]).stdin(&add_only),
                        Some(ns.fd()),
                    );
                    if !r.ok {
                        progress("FAILED (profile, line 2036)");
                        all_ok = false;
                    }
                    rec(NFT_ADD, r.us);
                }
            }
        }

        // The plugin's own work, in-process, phase by phase (the calls plugin::add makes).
        let ns = Ns::new(&o.prefix);
        let stdin = plugin_conf(&ns.path, &pol.annotations);
        let t = Instant::now();
        let conf = protocol::parse_stdin(&stdin).expect("parse");
        let cfg = PluginConfig::from_conf(&conf).expect("config");
        let ann = config::pod_annotations(&conf).expect("annotations");
        let pod = Pod {
            namespace: Some("default"),
            name: Some("web-0"),
            annotations: ann.as_ref(),
            ipv6: false,
        };
        let rs = match policy::decide(&cfg, &pod) {
            Ok(Decision::Capture(p)) => ruleset::build(&p),
            other => panic!("{other:?}"),
        };
        rec(PARSE, t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let netns = Netns::open(Path::new(&ns.path)).expect("open netns");
        rec(OPEN, t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        netns.run(|| ()).expect("setns");
        rec(SETNS, t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let mut k = netns.run(Kernel::open).expect("setns").expect("socket");
        rec(SOCK, t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let r = k.replace(&rs);
        rec(REPLACE, t.elapsed().as_secs_f64() * 1e6);
        if let Err(e) = r {
            progress(&format!("FAILED (profile, line 2071): {e}"));
            all_ok = false;
        }
        // What a dual-stack Istio pod adds beside the table (the driver's pod above has no IPv6).
        let t = Instant::now();
        let six = netns
            .run(mesh_redirect::route::Rtnl::open)
            .expect("setns")
            .and_then(|mut r| {
                r.add(
                    &mesh_redirect::ruleset::Routing::default(),
                    mesh_redirect::route::Obj::Passthrough6,
                )
            });
        rec(PASSTHROUGH6, t.elapsed().as_secs_f64() * 1e6);
        if let Err(e) = six {
            progress(&format!("FAILED (profile): ::6: {e}"));
            all_ok = false;
        }
        busy.store(i < 40, Ordering::SeqCst);
        let t = Instant::now();
        drop(k);
        busy.store(false, Ordering::SeqCst);
        rec(CLOSE, t.elapsed().as_secs_f64() * 1e6);
        // Contrast 1: a socket that only asked (no commit) closes at once.
        let mut k = netns.run(Kernel::open).expect("setns").expect("socket");
        let _ = k.table_exists();
        let t = Instant::now();
        drop(k);
        rec(CLOSE_RO, t.elapsed().as_secs_f64() * 1e6);
        // Contrast 2: commit, let the grace period pass, then close.
        let mut k = netns.run(Kernel::open).expect("setns").expect("socket");
        if let Err(e) = k.replace(&rs) {
            progress(&format!("FAILED (profile, line 2085): {e}"));
            all_ok = false;
        }
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        drop(k);
        rec(CLOSE_LATE, t.elapsed().as_secs_f64() * 1e6);
    }
    done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::write(
        o.file("stack.txt"),
        format!("{}\n{}", stack.lock().unwrap(), worker.lock().unwrap()),
    );

    // strace -T of real ADDs: the kernel's time in the batch's send and in close().
    let mut sends = Vec::new();
    let mut closes = Vec::new();
    let have_strace = Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if have_strace {
        for i in 0..traced {
            let ns = Ns::new(&o.prefix);
            let conf = Arc::new(plugin_conf(&ns.path, &pol.annotations));
            let f = o.file(&format!("strace{i}.txt"));
            let r = run_step(
                &strace_step(&plugin_step(&o.plugin, "ADD", &ns, &conf), &f),
                None,
            );
            if !r.ok {
                progress("FAILED (profile, line 2117)");
                all_ok = false;
            }
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let (s, c) = parse_strace(&text);
            sends.push(s);
            closes.push(c);
            if i > 0 {
                let _ = std::fs::remove_file(&f);
            }
        }
    }
    // The dynamic loader's own statistics for one exec.
    let ld = Command::new(&o.plugin)
        .arg("version")
        .env_clear()
        .env("LD_DEBUG", "statistics")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stderr).to_string())
        .unwrap_or_default();
    let _ = std::fs::write(o.file("ld-statistics.txt"), &ld);

    let m = |k: &str| stats(ph.get(k).map(|v| v.as_slice()).unwrap_or(&[])).median;
    let mut md = format!(
        "\n### {}\n\n{n} iterations, a fresh netns for each measurement, whole-process \
         measurements in a shuffled order. Whole-process rows: spawn → exit reaped (spawn \
         mechanism of this run: {}). In-process rows: the library's ADD path run step by step \
         in the driver. µs.\n\n| phase | median µs | p90 µs | p99 µs |\n|---|---:|---:|---:|\n",
        o.title("5. Profile: where an ADD spends its time"),
        if fork {
            "fork + setns in the child"
        } else {
            "setns in the spawning thread + posix_spawn"
        }
    );
    let mut summary = serde_json::Map::new();
    let order = [
        ADD,
        RUN,
        OUTSIDE,
        VERSION,
        TRUE_SPAWN,
        TRUE_FORK,
        NFT_REPLACE,
        NFT_ADD,
        PARSE,
        OPEN,
        SETNS,
        SOCK,
        REPLACE,
        PASSTHROUGH6,
        CLOSE,
        CLOSE_RO,
        CLOSE_LATE,
    ];
    for k in order {
        let s = stats(ph.get(k).map(|v| v.as_slice()).unwrap_or(&[]));
        let _ = writeln!(
            md,
            "| {k} | {:.0} | {:.0} | {:.0} |",
            s.median, s.p90, s.p99
        );
        summary.insert(k.to_string(), stats_json(&s));
    }
    if have_strace {
        let s = stats(&sends);
        let c = stats(&closes);
        let _ = writeln!(
            md,
            "| strace -T ({traced} ADDs): the batch's send (kernel validates and commits) | {:.0} | {:.0} | {:.0} |",
            s.median, s.p90, s.p99
        );
        let _ = writeln!(
            md,
            "| strace -T ({traced} ADDs): the slowest close() (the netlink socket's) | {:.0} | {:.0} | {:.0} |",
            c.median, c.p90, c.p99
        );
        summary.insert("strace_send_us".into(), stats_json(&s));
        summary.insert("strace_close_us".into(), stats_json(&c));
    }
    let add = m(ADD);
    let floor = m(if fork { TRUE_FORK } else { TRUE_SPAWN });
    let work = m(PARSE) + m(OPEN) + m(SOCK) + m(REPLACE) + m(PASSTHROUGH6);
    let parts = [
        ("ADD, whole process", add),
        (
            "outside plugin::run (paired: ADD − the plugin's durationUs)",
            m(OUTSIDE),
        ),
        (
            "  spawn + exec + exit + wait of `/bin/true` (the floor)",
            floor,
        ),
        (
            "  mesh-redirect's exec beyond the floor: a larger binary, loading libmnl (`version` − floor)",
            m(VERSION) - floor,
        ),
        ("inside plugin::run (the plugin's durationUs)", m(RUN)),
        ("  parse stdin, config, policy, build the ruleset", m(PARSE)),
        ("  open and verify the netns", m(OPEN)),
        ("  setns in, open the netlink socket, setns back", m(SOCK)),
        (
            "  replace: build the batch, send it (kernel validates + commits), read the acks",
            m(REPLACE),
        ),
        (
            "  `::6` on lo: an rtnetlink socket and the address (dual-stack pods)",
            m(PASSTHROUGH6),
        ),
        (
            "  close the netlink socket after the commit (in-process median)",
            m(CLOSE),
        ),
        (
            "  the rest, paired estimate: durationUs − the five above (logging, plan, closes)",
            m(RUN) - work,
        ),
    ];
    let _ = write!(
        md,
        "\nBreakdown of the median ADD (medians of separately measured parts, so they add up \
         only roughly):\n\n| part | ms | share of the ADD |\n|---|---:|---:|\n"
    );
    let mut bj = Vec::new();
    for (what, us) in parts {
        let _ = writeln!(md, "| {what} | {} | {:.0}% |", ms(us), us / add * 100.0);
        bj.push(json!({"part": what.trim(), "us": us}));
    }
    summary.insert("breakdown".into(), Value::Array(bj));
    if let Some(l) = ld.lines().find(|l| l.contains("total startup time")) {
        let _ = writeln!(
            md,
            "\n`LD_DEBUG=statistics mesh-redirect version`: `{}`",
            l.split_once(':').map(|x| x.1).unwrap_or(l).trim()
        );
    }
    let st = stack.lock().unwrap().clone();
    if !st.is_empty() {
        let _ = write!(
            md,
            "\nKernel stack of the thread sitting in close() after the commit (sampled from \
             /proc/self/task/TID/stack):\n\n```\n{st}```\n"
        );
    }
    let wk = worker.lock().unwrap().clone();
    if !wk.is_empty() {
        let _ = write!(
            md,
            "\nMeanwhile, the kernel worker it waits for (a kworker's /proc/PID/stack):\n\n\
             ```\n{wk}```\n"
        );
    }
    write_json(
        &o.file("json"),
        &json!({"section": "profile", "label": o.label, "iterations": n, "fork_mode": fork,
                "results": summary}),
    );
    emit_md(o, &md);
    all_ok
}
