//! Benchmark driver for `scripts/bench.sh` (see docs/PERFORMANCE.md for the method).
//!
//! `bench SECTION --plugin PATH --out DIR --prefix NAME [--smoke] [--label L] [--n N] ...`
//!
//! Sections (each prints a Markdown table on stdout, writes DIR/SECTION[-LABEL].csv with every
//! sample and DIR/SECTION[-LABEL].json with the summary):
//!   add       ADD latency, whole process, mesh-redirect vs the alternatives, round-robin
//!   burst     N pods ADDed at once
//!   policy    latency vs. number of excluded CIDRs / ports
//!   datapath  new-connection latency and rate through the redirect, loopback in a pod netns
//!   profile   where an ADD spends its time (in-process phases, exec floors, syscalls)
//!
//! Every network namespace it makes is `ip netns add PREFIX-N`, deleted when done (bench.sh
//! also deletes any `PREFIX-*` left behind). It never touches the caller's own namespace.

use mesh_redirect::config::{self, Annotations, PluginConfig};
use mesh_redirect::kernel::Kernel;
use mesh_redirect::netns::Netns;
use mesh_redirect::policy::{self, Decision, Pod};
use mesh_redirect::{nft_text, protocol, ruleset};
use nix::sys::socket::{self, sockopt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// A realistic `sidecar.istio.io/status` value (what the injector writes).
const STATUS_VALUE: &str = r#"{"initContainers":null,"containers":["istio-proxy"],"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#;

// ---------------------------------------------------------------------------------------------
// Options

struct Opts {
    section: String,
    plugin: PathBuf,
    out: PathBuf,
    prefix: String,
    label: String,
    smoke: bool,
    seed: u64,
    n: Option<usize>,
    pods: Option<usize>,
    rounds: Option<usize>,
    conns: Option<usize>,
}

impl Opts {
    fn parse() -> Result<Opts, String> {
        let mut args = std::env::args().skip(1);
        let section = args
            .next()
            .ok_or("usage: bench SECTION --plugin PATH --out DIR ...")?;
        let mut o = Opts {
            section,
            plugin: PathBuf::from("target/release/mesh-redirect"),
            out: PathBuf::from("bench-results"),
            prefix: format!("bench-{}", std::process::id()),
            label: String::new(),
            smoke: false,
            seed: 0x5eed,
            n: None,
            pods: None,
            rounds: None,
            conns: None,
        };
        while let Some(a) = args.next() {
            let mut val = || args.next().ok_or(format!("{a} needs a value"));
            let num = |s: String| s.parse::<usize>().map_err(|_| format!("bad number {s:?}"));
            match a.as_str() {
                "--plugin" => o.plugin = PathBuf::from(val()?),
                "--out" => o.out = PathBuf::from(val()?),
                "--prefix" => o.prefix = val()?,
                "--label" => o.label = val()?,
                "--smoke" => o.smoke = true,
                "--spawn" => match val()?.as_str() {
                    "fork" => FORK_MODE.store(true, Ordering::Relaxed),
                    "spawn" => FORK_MODE.store(false, Ordering::Relaxed),
                    m => return Err(format!("--spawn: fork or spawn, not {m}")),
                },
                "--seed" => o.seed = num(val()?)? as u64,
                "--n" => o.n = Some(num(val()?)?),
                "--pods" => o.pods = Some(num(val()?)?),
                "--rounds" => o.rounds = Some(num(val()?)?),
                "--conns" => o.conns = Some(num(val()?)?),
                _ => return Err(format!("unknown option {a}")),
            }
        }
        o.plugin = std::fs::canonicalize(&o.plugin)
            .map_err(|e| format!("plugin {}: {e}", o.plugin.display()))?;
        std::fs::create_dir_all(&o.out).map_err(|e| e.to_string())?;
        // Absolute: the plugin's logFile must be.
        o.out = std::fs::canonicalize(&o.out).map_err(|e| e.to_string())?;
        Ok(o)
    }

    fn file(&self, ext: &str) -> PathBuf {
        let mut name = self.section.clone();
        if !self.label.is_empty() {
            name.push('-');
            name.push_str(&self.label);
        }
        self.out.join(format!("{name}.{ext}"))
    }

    fn title(&self, t: &str) -> String {
        if self.label.is_empty() {
            t.to_string()
        } else {
            format!("{t} [{}]", self.label)
        }
    }
}

fn main() -> ExitCode {
    let o = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    assert!(
        nix::unistd::geteuid().is_root(),
        "bench: run as root (it creates network namespaces)"
    );
    let ok = match o.section.as_str() {
        "add" => section_add(&o),
        "variants" => section_variants(&o),
        "burst" => section_burst(&o),
        "policy" => section_policy(&o),
        "datapath" => section_datapath(&o),
        "profile" => section_profile(&o),
        "churn" => section_churn(&o),
        s => {
            eprintln!("bench: unknown section {s}");
            return ExitCode::from(2);
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "bench: {}: some operations FAILED (see the table)",
            o.section
        );
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics, output

#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    n: usize,
    min: f64,
    median: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn stats(v: &[f64]) -> Stats {
    if v.is_empty() {
        return Stats::default();
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    // Nearest rank.
    let pct = |p: f64| s[((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    Stats {
        n: s.len(),
        min: s[0],
        median: if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
        },
        p90: pct(90.0),
        p99: pct(99.0),
        max: s[s.len() - 1],
        mean: s.iter().sum::<f64>() / s.len() as f64,
    }
}

fn stats_json(s: &Stats) -> Value {
    json!({"n": s.n, "min": s.min, "median": s.median, "p90": s.p90, "p99": s.p99,
           "max": s.max, "mean": s.mean})
}

fn ms(us: f64) -> String {
    if us >= 100_000.0 {
        format!("{:.0}", us / 1000.0)
    } else if us >= 10_000.0 {
        format!("{:.1}", us / 1000.0)
    } else {
        format!("{:.2}", us / 1000.0)
    }
}

fn ratio(x: f64, base: f64) -> String {
    if base <= 0.0 {
        return "-".into();
    }
    let r = x / base;
    if r >= 10.0 {
        format!("{r:.0}×")
    } else {
        format!("{r:.1}×")
    }
}

/// Raw samples, one CSV line each.
struct Csv {
    f: File,
}

impl Csv {
    fn new(path: &Path, header: &str) -> Csv {
        let mut f = File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let _ = writeln!(f, "{header}");
        Csv { f }
    }
    fn row(&mut self, fields: &[String]) {
        let line: Vec<String> = fields.iter().map(|f| f.replace(',', ";")).collect();
        let _ = writeln!(self.f, "{}", line.join(","));
    }
}

fn write_json(path: &Path, v: &Value) {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    std::fs::write(path, text + "\n").unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn emit_md(o: &Opts, md: &str) {
    print!("{md}");
    let _ = io::stdout().flush();
    let _ = std::fs::write(o.file("md"), md);
}

/// The 1-minute load average (other work on the machine shows up here).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// xorshift64*: a deterministic shuffle of the order alternatives run in, per round.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

static NS_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `ip netns add PREFIX-N`, deleted on drop.
struct Ns {
    name: String,
    path: String,
    file: File,
}

impl Ns {
    fn new(prefix: &str) -> Ns {
        let name = format!("{prefix}-{}", NS_COUNTER.fetch_add(1, Ordering::SeqCst));
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip netns add {name} failed");
        let path = format!("/run/netns/{name}");
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Ns { name, path, file }
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// `ip -n NAME ARGS...` (setup only, never timed).
    fn ip(&self, args: &str) {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        let st = Command::new("ip").args(&full).status().expect("run ip");
        assert!(st.success(), "ip {full:?} failed");
    }

    /// Enters this namespace with the calling thread (for threads that live in it).
    fn enter(&self) {
        nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", self.path));
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// Variants: ADD of the same kind of pod by builds, meshes and event-socket setups, interleaved

/// One variant of an ADD to time.
struct Variant {
    key: &'static str,
    label: String,
    plugin: PathBuf,
    annotations: Value,
    /// Extra conflist-entry keys.
    conf: Value,
}

/// A running node agent (the real one), serving only its event socket here.
struct AgentProc {
    child: std::process::Child,
    _dir: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// Starts `mesh-redirect-agent install` (beside `plugin`) on throwaway CNI dirs, chaining only,
/// with its event socket at `socket`; waits until the socket is there.
fn start_agent(plugin: &Path, dir: &Path, socket: &Path) -> Option<AgentProc> {
    let agent = plugin.with_file_name("mesh-redirect-agent");
    if !agent.exists() {
        return None;
    }
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    for d in [&bin, &conf] {
        std::fs::create_dir_all(d).ok()?;
    }
    std::fs::write(
        conf.join("10-bridge.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
    )
    .ok()?;
    let child = Command::new(&agent)
        .arg("install")
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .args(["--reconcile-period", "0", "--event-socket"])
        .arg(socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let a = AgentProc {
        child,
        _dir: dir.to_path_buf(),
    };
    let t = Instant::now();
    while !socket.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    socket.exists().then_some(a)
}

fn variant_conf(netns: &str, ann: &Value, extra: &Value) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&plugin_conf(netns, &Annotations::new())).unwrap_or_default();
    v["runtimeConfig"]["io.kubernetes.cri.pod-annotations"] = ann.clone();
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    v.to_string().into_bytes()
}

const KUMA_YAML: &str = "cniMode: true\nipFamilyMode: dualstack\nkumaDPUser: \"5678\"\nredirect:\n  dns:\n    captureAll: true\n    enabled: true\n    port: 15053\n  inbound:\n    enabled: true\n    excludePorts:\n    - 9001\n    - 9902\n    port: 15006\n  outbound:\n    enabled: true\n    port: 15001\n";

/// ADD of one pod by: this build for Istio, Linkerd and Kuma pods; this build with the event
/// socket served by the real agent, with nobody listening, and without the key; and, with
/// `BENCH_PLUGIN_OLD`, another build (e.g. the one before the agent existed) for the same pod.
fn section_variants(o: &Opts) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Running commands: fork, setns in the child (pre_exec), exec, wait4 (for ru_maxrss)

#[derive(Clone, Debug)]
struct Step {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<Arc<Vec<u8>>>,
    /// Enter the pod netns in the child before exec (the alternatives). The plugin is run
    /// from the caller's namespace with CNI_NETNS, as a runtime does.
    in_netns: bool,
    /// Istio ignores this command's failure (the probe-rule delete).
    may_fail: bool,
}

impl Step {
    fn new(argv: &[&str]) -> Step {
        Step {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            stdin: None,
            in_netns: true,
            may_fail: false,
        }
    }
    fn stdin(mut self, data: &Arc<Vec<u8>>) -> Step {
        self.stdin = Some(data.clone());
        self
    }
    fn env(mut self, k: &str, v: &str) -> Step {
        self.env.push((k.into(), v.into()));
        self
    }
    fn may_fail(mut self) -> Step {
        self.may_fail = true;
        self
    }
    fn text(&self) -> String {
        self.argv.join(" ")
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    us: f64,
    rss_kb: i64,
    ok: bool,
}

/// How a command is put into the pod netns.
static FORK_MODE: AtomicBool = AtomicBool::new(false);

/// The driver's own network namespace, to come back to after a spawn.
fn home_netns() -> &'static File {
    static HOME: OnceLock<File> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").expect("open /proc/self/ns/net"))
}

/// `fork`: the child enters the netns itself (pre_exec hook: fork, setns, exec). Otherwise
/// (the default) the spawning thread enters the netns, posix_spawns (a vfork-style clone: the
/// child inherits the thread's netns) and goes back: cheaper, and what istio-cni itself does
/// (`netNs.Do(...)` around Go's exec, which clones with CLONE_VFORK).
fn command(step: &Step, netns_fd: Option<RawFd>, fork: bool) -> Command {
    let mut cmd = Command::new(&step.argv[0]);
    cmd.args(&step.argv[1..])
        .env_clear()
        .env("PATH", PATH_ENV)
        .envs(step.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if fork {
        let fd = if step.in_netns { netns_fd } else { None };
        // SAFETY: only async-signal-safe work between fork and exec: one setns(2) syscall.
        // Every command gets the hook, so all take the same fork+exec path.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

/// Spawns `cmd`, in `netns_fd` if given (thread setns around a posix_spawn, or the pre_exec
/// hook in fork mode).
fn spawn_in(
    cmd: &mut Command,
    netns_fd: Option<RawFd>,
    fork: bool,
) -> io::Result<std::process::Child> {
    match netns_fd {
        Some(fd) if !fork => {
            // SAFETY: setns on this thread with a valid namespace fd; we always go back.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let child = cmd.spawn();
            // SAFETY: as above, back to the driver's namespace.
            if unsafe { libc::setns(home_netns().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "cannot return to the driver's netns: {}",
                    io::Error::last_os_error()
                );
            }
            child
        }
        _ => cmd.spawn(),
    }
}

fn wait4(pid: i32) -> (i32, libc::rusage) {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            return (status, ru);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            panic!("wait4 {pid}: {e}");
        }
    }
}

/// Runs one command, timed from before the spawn to the return of wait4 (exit reaped).
fn run_step(step: &Step, netns_fd: Option<RawFd>) -> Outcome {
    run_step_mode(step, netns_fd, FORK_MODE.load(Ordering::Relaxed))
}

fn run_step_mode(step: &Step, netns_fd: Option<RawFd>, fork: bool) -> Outcome {
    let mut cmd = command(step, netns_fd, fork);
    cmd.stdin(if step.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let fd = if step.in_netns { netns_fd } else { None };
    let t0 = Instant::now();
    let mut child = match spawn_in(&mut cmd, fd, fork) {
        Ok(c) => c,
        Err(e) => {
            progress(&format!("spawn {}: {e}", step.text()));
            return Outcome::default();
        }
    };
    if let (Some(data), Some(mut pipe)) = (&step.stdin, child.stdin.take()) {
        let _ = pipe.write_all(data);
    }
    let (status, ru) = wait4(child.id() as i32);
    let us = t0.elapsed().as_secs_f64() * 1e6;
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Outcome {
        us,
        rss_kb: ru.ru_maxrss,
        ok: exited_ok || step.may_fail,
    }
}

/// Re-runs a failed command with its output captured, for the error message.
fn diagnose(step: &Step, netns_fd: Option<RawFd>) -> String {
    let mut cmd = command(step, netns_fd, true);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let Ok(mut child) = cmd.spawn() else {
        return "cannot spawn".into();
    };
    if let (Some(data), Some(mut pipe)) = (&step.stdin, child.stdin.take()) {
        let _ = pipe.write_all(data);
    }
    drop(child.stdin.take());
    match child.wait_with_output() {
        Ok(out) => format!(
            "{}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => e.to_string(),
    }
}

#[derive(Clone, Debug, Default)]
struct SeqOutcome {
    us: f64,
    steps: Vec<Outcome>,
    rss_kb: i64,
    ok: bool,
}

/// Runs steps one after the other (stops at the first failure), timed as one unit.
fn run_seq(steps: &[Step], netns_fd: Option<RawFd>) -> SeqOutcome {
    let t0 = Instant::now();
    let mut out = SeqOutcome {
        ok: true,
        ..SeqOutcome::default()
    };
    for s in steps {
        let r = run_step(s, netns_fd);
        out.rss_kb = out.rss_kb.max(r.rss_kb);
        out.steps.push(r);
        if !r.ok {
            out.ok = false;
            progress(&format!(
                "FAILED: {} -> {}",
                s.text(),
                diagnose(s, netns_fd)
            ));
            break;
        }
    }
    out.us = t0.elapsed().as_secs_f64() * 1e6;
    out
}

static PROBE_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Peak RSS of each command, as `wait4`'s `ru_maxrss`, measured by a minimal parent:
/// `/usr/bin/time -f %M CMD`. (`ru_maxrss` of a child spawned straight from this driver would
/// include the driver's own pages: exec carries the old mm's high-water mark into the new
/// image's `maxrss`, for fork and vfork alike.) Returns the largest over the steps, in KiB.
fn rss_probe(steps: &[Step], netns_fd: Option<RawFd>, dir: &Path) -> Option<i64> {
    let mut max = 0;
    for step in steps {
        let f = dir.join(format!(
            ".rss-{}-{}",
            std::process::id(),
            PROBE_COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let mut s = step.clone();
        let mut argv: Vec<String> = ["/usr/bin/time", "-f", "%M", "-o"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        argv.push(f.display().to_string());
        argv.push("--".into());
        argv.extend(step.argv.iter().cloned());
        s.argv = argv;
        let r = run_step(&s, netns_fd);
        let kb = std::fs::read_to_string(&f)
            .ok()
            .and_then(|t| t.lines().last().and_then(|l| l.trim().parse::<i64>().ok()));
        let _ = std::fs::remove_file(&f);
        if !r.ok {
            return None;
        }
        max = max.max(kb?);
    }
    Some(max)
}

fn have_time() -> bool {
    Path::new("/usr/bin/time").exists()
}

fn mib(kb: Option<i64>) -> String {
    kb.map(|k| format!("{:.1}", k as f64 / 1024.0))
        .unwrap_or_else(|| "-".into())
}

// ---------------------------------------------------------------------------------------------
// What is applied: the pod's policy, as our ruleset, as nft text, as Istio's iptables payloads

/// One pod policy, in every form the alternatives need.
struct Policy {
    name: String,
    annotations: Annotations,
    rs: ruleset::Ruleset,
    nft: Arc<Vec<u8>>,
    v4: Arc<Vec<u8>>,
    v6: Arc<Vec<u8>>,
    rules_v4: usize,
    rules_v6: usize,
}

/// `n` distinct, non-adjacent IPv4 /24s (adjacent ones could merge into fewer intervals).
fn cidrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.0/24", i / 128, (i % 128) * 2))
        .collect()
}

impl Policy {
    fn new(name: &str, excluded_cidrs: &[String], excluded_out_ports: &[u16]) -> Policy {
        let mut ann = Annotations::new();
        ann.insert("sidecar.istio.io/status".into(), STATUS_VALUE.into());
        if !excluded_cidrs.is_empty() {
            ann.insert(
                "traffic.sidecar.istio.io/excludeOutboundIPRanges".into(),
                excluded_cidrs.join(","),
            );
        }
        if !excluded_out_ports.is_empty() {
            let p: Vec<String> = excluded_out_ports.iter().map(|p| p.to_string()).collect();
            ann.insert(
                "traffic.sidecar.istio.io/excludeOutboundPorts".into(),
                p.join(","),
            );
        }
        let pod = Pod {
            namespace: Some("default"),
            name: Some("web-0"),
            annotations: Some(&ann),
            ipv6: false,
        };
        let rs = match policy::decide(&PluginConfig::default(), &pod) {
            Ok(Decision::Capture(p)) => ruleset::build(&p),
            other => panic!("policy {name}: expected a capture, got {other:?}"),
        };
        let nft = nft_text::render(&rs).into_bytes();
        // Istio's outbound-port default (15020) is replaced by the annotation, as here.
        let ports: Vec<u16> = if excluded_out_ports.is_empty() {
            vec![15020]
        } else {
            excluded_out_ports.to_vec()
        };
        let (v4, rules_v4) = istio_restore(false, excluded_cidrs, &ports);
        let (v6, rules_v6) = istio_restore(true, excluded_cidrs, &ports);
        Policy {
            name: name.into(),
            annotations: ann,
            rs,
            nft: Arc::new(nft),
            v4: Arc::new(v4.into_bytes()),
            v6: Arc::new(v6.into_bytes()),
            rules_v4,
            rules_v6,
        }
    }
}

/// Istio's `iptables-restore --noflush` payload for a sidecar pod with istio-cni's defaults
/// (REDIRECT, include `*` inbound and outbound, inbound excludes 15020,15021,15090), the newest
/// generation of istio-iptables' output, plus one RETURN rule per excluded CIDR and a tcp and a
/// udp RETURN per excluded outbound port, where Istio puts them.
fn istio_restore(v6: bool, cidrs: &[String], out_ports: &[u16]) -> (String, usize) {
    let (src6, lo) = if v6 {
        ("::6/128", "::1/128")
    } else {
        ("127.0.0.6/32", "127.0.0.1/32")
    };
    let mut rules: Vec<String> = vec![
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN".into(),
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001".into(),
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006".into(),
        "-A PREROUTING -p tcp -j ISTIO_INBOUND".into(),
    ];
    for p in [15020, 15021, 15090] {
        rules.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"));
    }
    rules.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
    rules.push("-A OUTPUT -j ISTIO_OUTPUT".into());
    for p in out_ports {
        rules.push(format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN"));
        rules.push(format!("-A ISTIO_OUTPUT -p udp --dport {p} -j RETURN"));
    }
    rules.push(format!("-A ISTIO_OUTPUT -o lo -s {src6} -j RETURN"));
    for (kind, id) in [("uid", 1337), ("gid", 1337)] {
        rules.push(format!(
            "-A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp ! --dport 15008 -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT"
        ));
        rules.push(format!(
            "-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"
        ));
        rules.push(format!(
            "-A ISTIO_OUTPUT -m owner --{kind}-owner {id} -j RETURN"
        ));
    }
    rules.push(format!("-A ISTIO_OUTPUT -d {lo} -j RETURN"));
    for c in cidrs.iter().filter(|c| c.contains(':') == v6) {
        rules.push(format!("-A ISTIO_OUTPUT -d {c} -j RETURN"));
    }
    rules.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into());
    let mut s = String::from(
        "* nat\n-N ISTIO_INBOUND\n-N ISTIO_REDIRECT\n-N ISTIO_IN_REDIRECT\n-N ISTIO_OUTPUT\n",
    );
    for r in &rules {
        s.push_str(r);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    (s, rules.len())
}

/// The network config a runtime gives mesh-redirect: the chain's last entry, with the
/// bridge plugin's result as prevResult and the pod's annotations.
fn plugin_conf(netns: &str, ann: &Annotations) -> Vec<u8> {
    plugin_conf_log(netns, ann, None)
}

/// The same, with the plugin's log (one JSON line per invocation, with its own duration)
/// going to `log` instead of stderr.
fn plugin_conf_log(netns: &str, ann: &Annotations, log: Option<&Path>) -> Vec<u8> {
    let mut v = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "mesh-redirect",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": ann},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "6a:5f:2c:1e:9b:01"},
                {"name": "veth1c2d3e4f", "mac": "6a:5f:2c:1e:9b:02"},
                {"name": "eth0", "mac": "6a:5f:2c:1e:9b:03", "sandbox": netns}
            ],
            "ips": [
                {"address": "10.244.0.7/24", "gateway": "10.244.0.1", "interface": 2},
                {"address": "fd00:10:244::7/64", "gateway": "fd00:10:244::1", "interface": 2}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            "dns": {}
        }
    });
    if let Some(l) = log {
        v["logFile"] = json!(l.display().to_string());
    }
    v.to_string().into_bytes()
}

static POD_COUNTER: AtomicUsize = AtomicUsize::new(0);

fn plugin_step(plugin: &Path, verb: &str, ns: &Ns, conf: &Arc<Vec<u8>>) -> Step {
    let n = POD_COUNTER.fetch_add(1, Ordering::SeqCst);
    let cid = format!("{:064x}", 0xbe7c_0000_u64 + n as u64);
    let plugin_dir = plugin
        .parent()
        .unwrap_or(Path::new("/"))
        .display()
        .to_string();
    let mut s = Step::new(&[&plugin.display().to_string()]).stdin(conf);
    s.in_netns = false;
    s.env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", &cid)
        .env("CNI_NETNS", &ns.path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &format!("/opt/cni/bin:{plugin_dir}"))
        .env(
            "CNI_ARGS",
            &format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-{n};K8S_POD_INFRA_CONTAINER_ID={cid}"
            ),
        )
}

/// The alternatives, each applying the same policy to a fresh netns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alt {
    Plugin,
    NftFile,
    LegacyRestore,
    NftRestore,
    IstioNft,
    IstioLegacy,
    ExecFloor,
}

impl Alt {
    fn key(self) -> &'static str {
        match self {
            Alt::Plugin => "mesh-redirect",
            Alt::NftFile => "nft-f",
            Alt::LegacyRestore => "iptables-legacy-restore",
            Alt::NftRestore => "iptables-nft-restore",
            Alt::IstioNft => "istio-cni-nft",
            Alt::IstioLegacy => "istio-cni-legacy",
            Alt::ExecFloor => "exec-floor",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Alt::Plugin => "**mesh-redirect ADD** (exec, netlink batch)",
            Alt::NftFile => "`nft -f` of the same ruleset (`mesh-redirect plan`)",
            Alt::LegacyRestore => {
                "`iptables-legacy-restore` + `ip6tables-legacy-restore` (Istio payload)"
            }
            Alt::NftRestore => "`iptables-nft-restore` + `ip6tables-nft-restore` (Istio payload)",
            Alt::IstioNft => "istio-cni per-ADD sequence, nft backend (auto-detected)",
            Alt::IstioLegacy => "istio-cni per-ADD sequence, legacy backend (forced)",
            Alt::ExecFloor => "floor: `/bin/true` in the netns (spawn, exec, exit, wait)",
        }
    }
}

fn istio_detect(family6: bool, variant: &str) -> Vec<Step> {
    let bin = format!(
        "{}-{variant}",
        if family6 { "ip6tables" } else { "iptables" }
    );
    let save = format!(
        "{}-{variant}-save",
        if family6 { "ip6tables" } else { "iptables" }
    );
    vec![
        Step::new(&[&save]),
        Step::new(&[&save, "--version"]),
        Step::new(&[
            &bin, "-t", "filter", "-A", "INPUT", "-p", "255", "-j", "DROP",
        ]),
        Step::new(&[
            &bin, "-t", "filter", "-D", "INPUT", "-p", "255", "-j", "DROP",
        ])
        .may_fail(),
    ]
}

fn steps_for(alt: Alt, plugin: &Path, ns: &Ns, p: &Policy, conf: &Arc<Vec<u8>>) -> Vec<Step> {
    let restore = |fam6: bool, variant: &str| -> Step {
        let bin = format!(
            "{}-{variant}-restore",
            if fam6 { "ip6tables" } else { "iptables" }
        );
        let data = if fam6 { &p.v6 } else { &p.v4 };
        if variant == "legacy" {
            // istio-cni: legacy ≥ 1.6.2 write commands get --wait=30, and ≥ 1.8.6 a pod-scoped
            // lock file (the netns path).
            Step::new(&[&bin, "--noflush", "--wait=30"])
                .stdin(data)
                .env("XTABLES_LOCKFILE", &ns.path)
        } else {
            Step::new(&[&bin, "--noflush"]).stdin(data)
        }
    };
    let save = |fam6: bool, variant: &str| -> Step {
        Step::new(&[&format!(
            "{}-{variant}-save",
            if fam6 { "ip6tables" } else { "iptables" }
        )])
    };
    match alt {
        Alt::Plugin => vec![plugin_step(plugin, "ADD", ns, conf)],
        Alt::NftFile => vec![Step::new(&["nft", "-f", "-"]).stdin(&p.nft)],
        Alt::LegacyRestore => vec![restore(false, "legacy"), restore(true, "legacy")],
        Alt::NftRestore => vec![restore(false, "nft"), restore(true, "nft")],
        Alt::IstioNft | Alt::IstioLegacy => {
            let v = if alt == Alt::IstioNft {
                "nft"
            } else {
                "legacy"
            };
            let mut s = Vec::new();
            // A. DetectIptablesVersion(v4): legacy is tried first; on a fresh netns it has no
            // rules, so (auto mode) nft is tried next and chosen. Forced legacy probes legacy only.
            s.extend(istio_detect(false, "legacy"));
            if v == "nft" {
                s.extend(istio_detect(false, "nft"));
            }
            // B. The same for IPv6.
            s.extend(istio_detect(true, "legacy"));
            if v == "nft" {
                s.extend(istio_detect(true, "nft"));
            }
            // D. VerifyIptablesState; F. apply; G. the deferred final dump (dual-stack pod).
            s.push(save(false, v));
            s.push(save(true, v));
            s.push(restore(false, v));
            s.push(restore(true, v));
            s.push(save(false, v));
            s.push(save(true, v));
            s
        }
        Alt::ExecFloor => vec![Step::new(&["/bin/true"])],
    }
}

/// Whether the pod netns has our table (a read-only query: no commit, so no wait on close).
fn table_exists(ns: &Ns) -> bool {
    Netns::open(Path::new(&ns.path))
        .ok()
        .and_then(|n| n.run(Kernel::open).ok())
        .and_then(|k| k.ok())
        .and_then(|mut k| k.table_exists().ok())
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Section 1: ADD latency, side by side, round-robin

fn section_add(o: &Opts) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Section: ADD under churn (other pods being deleted meanwhile)

/// Installs `rs` in `ns` in-process (the churn's refill: not measured).
fn install(ns: &Ns, rs: &ruleset::Ruleset) -> bool {
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
fn uninvolved_close_after_foreign_delete(
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
fn section_churn(o: &Opts) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Section 2: burst

fn section_burst(o: &Opts) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Section 3: policy size

/// The library path of an ADD, in-process: apply (build batch, send, commit, acks) and close.
fn apply_in_process(ns: &Ns, rs: &ruleset::Ruleset) -> Option<(f64, f64)> {
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

fn section_policy(o: &Opts) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Section 4: data path

const PROXY_PORT: u16 = 15001;
const APP_DST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 80);

enum Job {
    Run(usize),
    Stop,
}

/// CPU time the calling thread has used, in ns.
fn thread_cpu_ns() -> u64 {
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
fn proxy_thread(
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
type Batch = (Vec<f64>, f64, usize, u64);

/// The app: short connections, one at a time; each timed from connect() to the proxy's byte.
fn client_thread(
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

struct DpConfig {
    name: String,
    /// Keeps the namespace until the end.
    _ns: Arc<Ns>,
    dst: SocketAddrV4,
    /// The configuration with the same ruleset kind and no exclusions (for this one's delta).
    base: Option<usize>,
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Batch>,
    first_orig: Arc<Mutex<Option<String>>>,
    proxy_cpu: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn section_datapath(o: &Opts) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Section 5: profile

/// Samples kernel stacks while `busy` is set: thread `tid` of this process (keeps the deepest
/// one inside a close()), and the kernel workers (keeps one running nf_tables' transaction
/// destroy work).
fn stack_sampler(
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

fn strace_step(step: &Step, out_file: &Path) -> Step {
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
fn parse_strace(text: &str) -> (f64, f64) {
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

fn section_profile(o: &Opts) -> bool {
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
    let work = m(PARSE) + m(OPEN) + m(SOCK) + m(REPLACE);
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
            "  mesh-redirect's exec beyond the floor: larger binary, loading libnftnl + libmnl, Rust init (`version` − floor)",
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
            "  close the netlink socket after the commit (in-process median)",
            m(CLOSE),
        ),
        (
            "  close, paired estimate: durationUs − the four above",
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
