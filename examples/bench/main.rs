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
//!   variants  ADD by mesh, event socket and build
//!   churn     ADD while other pods are being deleted
//!   summary   the headline figures, read back from the JSON files in DIR (summary.md)
//!
//! Every network namespace it makes is `ip netns add PREFIX-N`, deleted when done (bench.sh
//! also deletes any `PREFIX-*` left behind). It never touches the caller's own namespace.
//!
//! One module per section (`add`, `variants`, `burst`, `policy`, `datapath`, `profile`,
//! `churn`), and the ones they share: `stats` (statistics, tables, CSV/JSON output), `netns`
//! (the namespaces), `spawn` (running commands and timing them), `payloads` (the pod's policy
//! as each alternative applies it, the plugin's stdin) and `agent` (the real node agent).

mod add;
mod agent;
mod burst;
mod churn;
mod datapath;
mod netns;
mod payloads;
mod policy;
mod profile;
mod spawn;
mod stats;
mod summary;
mod variants;

use crate::add::section_add;
use crate::burst::section_burst;
use crate::churn::section_churn;
use crate::datapath::section_datapath;
use crate::policy::section_policy;
use crate::profile::section_profile;
use crate::spawn::FORK_MODE;
use crate::summary::section_summary;
use crate::variants::section_variants;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

pub(crate) const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// A realistic `sidecar.istio.io/status` value (what the injector writes).
pub(crate) const STATUS_VALUE: &str = r#"{"initContainers":null,"containers":["istio-proxy"],"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#;

// ---------------------------------------------------------------------------------------------
// Options

pub(crate) struct Opts {
    pub(crate) section: String,
    pub(crate) plugin: PathBuf,
    pub(crate) out: PathBuf,
    pub(crate) prefix: String,
    pub(crate) label: String,
    pub(crate) smoke: bool,
    pub(crate) seed: u64,
    pub(crate) n: Option<usize>,
    pub(crate) pods: Option<usize>,
    pub(crate) rounds: Option<usize>,
    pub(crate) conns: Option<usize>,
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

    pub(crate) fn file(&self, ext: &str) -> PathBuf {
        let mut name = self.section.clone();
        if !self.label.is_empty() {
            name.push('-');
            name.push_str(&self.label);
        }
        self.out.join(format!("{name}.{ext}"))
    }

    pub(crate) fn title(&self, t: &str) -> String {
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
        "summary" => section_summary(&o),
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
