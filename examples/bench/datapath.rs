//! Section `datapath`: new-connection latency and rate through the redirect.

use crate::Opts;
use crate::netns::Ns;
use crate::payloads::{Policy, cidrs, plugin_conf, plugin_step};
use crate::spawn::{Step, run_seq};
use crate::stats::{Csv, Rng, emit_md, loadavg, progress, stats, stats_json, write_json};
use nix::sys::socket::{self, sockopt};
use serde_json::json;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const PROXY_PORT: u16 = 15001;
pub(crate) const APP_DST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 80);

pub(crate) enum Job {
    Run(usize),
    Stop,
}

/// CPU time the calling thread has used, in ns.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The stand-in proxy: accept, read SO_ORIGINAL_DST (as Envoy does), answer one byte, close.
/// Publishes its thread's CPU time after each connection.
pub(crate) fn proxy_thread(
    ns: Arc<Ns>,
    ready: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    orig: Arc<Mutex<Option<String>>>,
    cpu: Arc<AtomicU64>,
) {
    ns.enter();
    let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, PROXY_PORT)).expect("bind proxy");
    cpu.store(thread_cpu_ns(), Ordering::SeqCst);
    let _ = ready.send(());
    for conn in l.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut c) = conn else { continue };
        if let Ok(a) = socket::getsockopt(&c.as_fd(), sockopt::OriginalDst) {
            let mut g = orig.lock().unwrap();
            if g.is_none() {
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                *g = Some(format!("{ip}:{}", u16::from_be(a.sin_port)));
            }
        }
        let _ = c.write_all(b"x");
        drop(c);
        cpu.store(thread_cpu_ns(), Ordering::SeqCst);
    }
}

/// One batch of connections: latencies (µs), wall seconds, failures, client CPU ns.
pub(crate) type Batch = (Vec<f64>, f64, usize, u64);

/// The app: short connections, one at a time; each timed from connect() to the proxy's byte.
pub(crate) fn client_thread(
    ns: Arc<Ns>,
    dst: SocketAddrV4,
    jobs: mpsc::Receiver<Job>,
    results: mpsc::Sender<Batch>,
) {
    ns.enter();
    let linger0 = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    while let Ok(Job::Run(count)) = jobs.recv() {
        let mut lat = Vec::with_capacity(count);
        let mut failed = 0;
        let cpu0 = thread_cpu_ns();
        let t0 = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            let mut s =
                match TcpStream::connect_timeout(&SocketAddr::V4(dst), Duration::from_secs(2)) {
                    Ok(s) => s,
                    Err(_) => {
                        failed += 1;
                        continue;
                    }
                };
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(1) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                _ => failed += 1,
            }
            // Abortive close: no TIME_WAIT, so a bounded port range never runs out.
            let _ = socket::setsockopt(&s, sockopt::Linger, &linger0);
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let _ = results.send((lat, elapsed, failed, thread_cpu_ns() - cpu0));
    }
}

pub(crate) struct DpConfig {
    pub(crate) name: String,
    /// Keeps the namespace until the end.
    pub(crate) _ns: Arc<Ns>,
    pub(crate) dst: SocketAddrV4,
    /// The configuration with the same ruleset kind and no exclusions (for this one's delta).
    pub(crate) base: Option<usize>,
    pub(crate) jobs: mpsc::Sender<Job>,
    pub(crate) results: mpsc::Receiver<Batch>,
    pub(crate) first_orig: Arc<Mutex<Option<String>>>,
    pub(crate) proxy_cpu: Arc<AtomicU64>,
    pub(crate) stop: Arc<AtomicBool>,
}

pub(crate) fn section_datapath(o: &Opts) -> bool {
    let per_config = o.conns.unwrap_or(if o.smoke { 400 } else { 20_000 });
    let rounds = o.rounds.unwrap_or(if o.smoke { 2 } else { 40 });
    let per_round = per_config.div_ceil(rounds);
    let big = if o.smoke { 1000 } else { 10_000 };
    let big_name = if big == 10_000 {
        "10,000".to_string()
    } else {
        big.to_string()
    };
    let empty = Policy::new("0", &[], &[]);
    let full = Policy::new(&big_name, &cidrs(big), &[]);
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Floor,
        Ours,
        Legacy,
        IptNft,
    }
    // (name, ruleset kind, policy, index of the same kind without exclusions)
    let specs: Vec<(String, Kind, &Policy, Option<usize>)> = vec![
        (
            "floor: no ruleset, connect straight to the listener".into(),
            Kind::Floor,
            &empty,
            None,
        ),
        (
            "mesh-redirect, 0 excluded CIDRs".into(),
            Kind::Ours,
            &empty,
            None,
        ),
        (
            format!("mesh-redirect, {big_name} excluded CIDRs"),
            Kind::Ours,
            &full,
            Some(1),
        ),
        (
            "iptables-legacy (Istio rules), 0 excluded CIDRs".into(),
            Kind::Legacy,
            &empty,
            None,
        ),
        (
            format!("iptables-legacy (Istio rules), {big_name} excluded CIDRs"),
            Kind::Legacy,
            &full,
            Some(3),
        ),
        (
            "iptables-nft (Istio rules), 0 excluded CIDRs".into(),
            Kind::IptNft,
            &empty,
            None,
        ),
        (
            format!("iptables-nft (Istio rules), {big_name} excluded CIDRs"),
            Kind::IptNft,
            &full,
            Some(5),
        ),
    ];
    progress(&format!(
        "datapath: {} configurations × {per_config} connections ({rounds} rounds of {per_round})",
        specs.len()
    ));
    let load0 = loadavg();
    let mut configs = Vec::new();
    for (name, kind, pol, base) in &specs {
        let ns = Arc::new(Ns::new(&o.prefix));
        ns.ip("link set lo up");
        // Inside the pod's own network only: lo, plus a veth pair with both ends in the pod
        // netns, "eth0" carrying the default route so an outbound destination routes (no packet
        // goes out on it: the redirect sends them to lo).
        ns.ip("link add eth0 type veth peer name eth0-peer");
        ns.ip("link set eth0-peer up");
        ns.ip("addr add 10.0.0.2/24 dev eth0");
        ns.ip("link set eth0 up");
        ns.ip("route add default dev eth0");
        let install = match kind {
            Kind::Floor => None,
            Kind::Ours => {
                let conf = Arc::new(plugin_conf(&ns.path, &pol.annotations));
                Some(plugin_step(&o.plugin, "ADD", &ns, &conf))
            }
            Kind::Legacy => Some(
                Step::new(&["iptables-legacy-restore", "--noflush", "--wait=30"]).stdin(&pol.v4),
            ),
            Kind::IptNft => Some(Step::new(&["iptables-nft-restore", "--noflush"]).stdin(&pol.v4)),
        };
        if let Some(step) = install
            && !run_seq(&[step], Some(ns.fd())).ok
        {
            progress(&format!("FAILED: datapath: installing {name}"));
            return false;
        }
        let dst = if *kind == Kind::Floor {
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, PROXY_PORT)
        } else {
            APP_DST
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let orig = Arc::new(Mutex::new(None));
        let proxy_cpu = Arc::new(AtomicU64::new(0));
        {
            let (ns, stop, orig, cpu) = (ns.clone(), stop.clone(), orig.clone(), proxy_cpu.clone());
            std::thread::spawn(move || proxy_thread(ns, ready_tx, stop, orig, cpu));
        }
        ready_rx.recv().expect("proxy ready");
        let (job_tx, job_rx) = mpsc::channel();
        let (res_tx, res_rx) = mpsc::channel();
        {
            let ns = ns.clone();
            std::thread::spawn(move || client_thread(ns, dst, job_rx, res_tx));
        }
        configs.push(DpConfig {
            name: name.clone(),
            _ns: ns,
            dst,
            base: *base,
            jobs: job_tx,
            results: res_rx,
            first_orig: orig,
            proxy_cpu,
            stop,
        });
    }
    let mut all_ok = true;
    // Warm-up: a few connections each, and check the redirect really happened.
    for c in &configs {
        let _ = c.jobs.send(Job::Run(50));
        let (_, _, failed, _) = c.results.recv().expect("client");
        let orig = c.first_orig.lock().unwrap().clone();
        let want_orig = c.dst != SocketAddrV4::new(Ipv4Addr::LOCALHOST, PROXY_PORT);
        let good = failed == 0 && (!want_orig || orig.as_deref() == Some("198.51.100.1:80"));
        if !good {
            progress(&format!(
                "FAILED: {}: {failed} failed warm-up connections, original destination {orig:?}",
                c.name
            ));
            all_ok = false;
        }
    }
    let mut csv = Csv::new(&o.file("csv"), "section,label,round,config,conn,latency_us");
    let mut rate_csv = Csv::new(
        &o.out.join(if o.label.is_empty() {
            "datapath-rounds.csv".to_string()
        } else {
            format!("datapath-rounds-{}.csv", o.label)
        }),
        "section,label,round,config,connections,elapsed_s,conn_per_s,cpu_us_per_conn,failed",
    );
    let n = configs.len();
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut failed = vec![0usize; n];
    let mut rng = Rng(o.seed ^ 0xda7a);
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        for ci in order {
            let c = &configs[ci];
            let p0 = c.proxy_cpu.load(Ordering::SeqCst);
            let _ = c.jobs.send(Job::Run(per_round));
            let (l, secs, f, client_ns) = c.results.recv().expect("client");
            // The proxy publishes after each connection; give it a moment for the last one.
            std::thread::sleep(Duration::from_millis(2));
            let proxy_ns = c.proxy_cpu.load(Ordering::SeqCst) - p0;
            for (k, v) in l.iter().enumerate() {
                csv.row(&[
                    "datapath".into(),
                    o.label.clone(),
                    round.to_string(),
                    c.name.clone(),
                    k.to_string(),
                    format!("{v:.2}"),
                ]);
            }
            let rate = l.len() as f64 / secs;
            let cpu = (client_ns + proxy_ns) as f64 / 1000.0 / per_round as f64;
            rate_csv.row(&[
                "datapath".into(),
                o.label.clone(),
                round.to_string(),
                c.name.clone(),
                l.len().to_string(),
                format!("{secs:.4}"),
                format!("{rate:.0}"),
                format!("{cpu:.2}"),
                f.to_string(),
            ]);
            rates[ci].push(rate);
            cpus[ci].push(cpu);
            failed[ci] += f;
            lat[ci].extend(l);
        }
        if (round + 1) % 10 == 0 || round + 1 == rounds {
            progress(&format!("datapath: round {}/{rounds}", round + 1));
        }
    }
    for c in &configs {
        c.stop.store(true, Ordering::SeqCst);
        let _ = c.jobs.send(Job::Run(1));
        let _ = c.results.recv();
        let _ = c.jobs.send(Job::Stop);
    }
    let load1 = loadavg();
    let floor = stats(&lat[0]).median;
    let floor_cpu = stats(&cpus[0]).median;
    let mut md = format!(
        "\n### {}\n\nInside one fresh pod netns per configuration: an app thread (uid 0) makes \
         short TCP connections, one at a time, to {APP_DST} (routed out `eth0`, one end of a veth \
         pair whose both ends are in the pod netns), redirected to a stand-in proxy on \
         127.0.0.1:{PROXY_PORT} that reads `SO_ORIGINAL_DST`, answers one byte and closes; the \
         floor connects to the listener directly. Latency = connect() → the proxy's byte. \
         CPU = the app's and the proxy's thread CPU time per connection (median over rounds; \
         less sensitive than latency to other load on the machine). {per_config} connections \
         per configuration, in {rounds} interleaved rounds of {per_round}. Load average at \
         start / end: {load0} / {load1}.\n\n\
         | configuration | median µs | p90 µs | p99 µs | conn/s | CPU µs/conn | latency vs floor | latency vs 0 CIDRs | CPU vs 0 CIDRs |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        o.title("4. Data path: new connections through the redirect")
    );
    let mut summary = Vec::new();
    for (ci, c) in configs.iter().enumerate() {
        let s = stats(&lat[ci]);
        let r = stats(&rates[ci]);
        let cpu = stats(&cpus[ci]);
        let (vs_lat, vs_cpu) = match c.base {
            Some(b) => (
                format!("{:+.1}%", (s.median / stats(&lat[b]).median - 1.0) * 100.0),
                format!(
                    "{:+.1}%",
                    (cpu.median / stats(&cpus[b]).median - 1.0) * 100.0
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        if failed[ci] > 0 {
            all_ok = false;
            progress(&format!(
                "datapath: {}: {} failed connections",
                c.name, failed[ci]
            ));
        }
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:+.1}% | {vs_lat} | {vs_cpu} |",
            c.name,
            s.median,
            s.p90,
            s.p99,
            r.median,
            cpu.median,
            (s.median / floor - 1.0) * 100.0,
        );
        summary.push(json!({"config": c.name, "latency_us": stats_json(&s),
                            "conn_per_s": stats_json(&r), "cpu_us_per_conn": stats_json(&cpu),
                            "failed": failed[ci],
                            "original_dst_seen": *c.first_orig.lock().unwrap()}));
    }
    let _ = writeln!(md, "\n(floor CPU per connection: {floor_cpu:.1} µs)");
    write_json(
        &o.file("json"),
        &json!({"section": "datapath", "label": o.label, "connections_per_config": per_config,
                "rounds": rounds, "excluded_cidrs": big, "loadavg_start": load0,
                "loadavg_end": load1, "results": summary}),
    );
    emit_md(o, &md);
    all_ok
}
