//! Statistics and output: percentiles, the Markdown tables' number formats, the CSV and
//! JSON files, progress lines, and the deterministic shuffle.

use crate::Opts;
use serde_json::{Value, json};
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Stats {
    pub(crate) n: usize,
    pub(crate) min: f64,
    pub(crate) median: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

pub(crate) fn stats(v: &[f64]) -> Stats {
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

pub(crate) fn stats_json(s: &Stats) -> Value {
    json!({"n": s.n, "min": s.min, "median": s.median, "p90": s.p90, "p99": s.p99,
           "max": s.max, "mean": s.mean})
}

pub(crate) fn ms(us: f64) -> String {
    if us >= 100_000.0 {
        format!("{:.0}", us / 1000.0)
    } else if us >= 10_000.0 {
        format!("{:.1}", us / 1000.0)
    } else {
        format!("{:.2}", us / 1000.0)
    }
}

pub(crate) fn ratio(x: f64, base: f64) -> String {
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
pub(crate) struct Csv {
    pub(crate) f: File,
}

impl Csv {
    pub(crate) fn new(path: &Path, header: &str) -> Csv {
        let mut f = File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let _ = writeln!(f, "{header}");
        Csv { f }
    }
    pub(crate) fn row(&mut self, fields: &[String]) {
        let line: Vec<String> = fields.iter().map(|f| f.replace(',', ";")).collect();
        let _ = writeln!(self.f, "{}", line.join(","));
    }
}

pub(crate) fn write_json(path: &Path, v: &Value) {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    std::fs::write(path, text + "\n").unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

pub(crate) fn emit_md(o: &Opts, md: &str) {
    print!("{md}");
    let _ = io::stdout().flush();
    let _ = std::fs::write(o.file("md"), md);
}

/// The 1-minute load average (other work on the machine shows up here).
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

pub(crate) fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// xorshift64*: a deterministic shuffle of the order alternatives run in, per round.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}
