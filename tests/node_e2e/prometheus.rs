//! A real Prometheus (Debian's) in the node namespace, scraping the node agent.

use crate::node::{METRICS_PORT, Node};
use common::{die_with_parent, http_get_in, tail};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PROMETHEUS_PORT: u16 = 19090;

/// A real Prometheus (Debian's) in the node namespace, scraping the agent every second.
pub struct Prometheus {
    child: Child,
    ns: String,
    pub log: PathBuf,
}

impl Prometheus {
    pub fn start(node: &Node) -> Prometheus {
        let dir = node.dir("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: mesh-redirect\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{METRICS_PORT}']\n"
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.ns.path()))
            .arg("--")
            .arg("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        die_with_parent(&mut cmd);
        let p = Prometheus {
            child: cmd.spawn().expect("start prometheus"),
            ns: node.ns.path(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get_in(&p.ns, PROMETHEUS_PORT, "/-/ready").is_none_or(|(c, _)| c != 200) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                tail(&std::fs::read_to_string(&p.log).unwrap_or_default(), 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// An instant query's result vector, or Prometheus's error.
    pub fn instant(&self, expr: &str) -> Result<Vec<Value>, String> {
        let enc: String = expr
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let (code, body) = http_get_in(
            &self.ns,
            PROMETHEUS_PORT,
            &format!("/api/v1/query?query={enc}"),
        )
        .ok_or("Prometheus did not answer")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if code != 200 || v["status"] != "success" {
            return Err(format!("{code}: {}", v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// An instant query's single value (None: no result).
    pub fn query(&self, expr: &str) -> Option<f64> {
        let r = self.instant(expr).ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until the query gives `want` (Prometheus scrapes every second).
    pub fn wait(&self, expr: &str, want: f64) {
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            last = self.query(expr);
            if last == Some(want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "Prometheus: {expr} = {last:?}, want {want}\n{}",
            tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 20)
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
