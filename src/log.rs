//! One JSON line per invocation, to `logFile` or stderr.
//!
//! Lines are bounded (long messages are cut) and never carry annotation values beyond what an
//! error message quotes, nor stdin: configs can hold credentials for other plugins.

use crate::config::LogLevel;
use serde_json::{Map, Value, json};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The most a message field may take in a log line.
const MAX_FIELD: usize = 1024;

/// Which long-running part of the node agent a log line comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Installer,
    Agent,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Installer => "installer",
            Component::Agent => "agent",
        }
    }
}

/// One JSON log line on stderr for the node agent (installer and agent alike): time, level,
/// component, message, and `extra`'s fields.
pub fn line(component: Component, level: &str, msg: &str, extra: Value) {
    let mut l = Map::new();
    l.insert("ts".into(), json!(rfc3339(SystemTime::now())));
    l.insert("level".into(), json!(level));
    l.insert("component".into(), json!(component.as_str()));
    l.insert("msg".into(), json!(msg));
    if let Value::Object(e) = extra {
        l.extend(e);
    }
    eprintln!("{}", Value::Object(l));
}

/// What one invocation did.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub command: String,
    pub container_id: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub netns: String,
    /// "captured", "skipped: …", "deleted", "checked", …
    pub decision: String,
    pub rules: Option<usize>,
    pub set_elements: Option<usize>,
    pub error_code: Option<u32>,
    pub error: Option<String>,
}

impl Record {
    fn level(&self) -> LogLevel {
        if self.error.is_some() {
            LogLevel::Error
        } else {
            LogLevel::Info
        }
    }

    pub fn to_json(&self, elapsed: Duration) -> Value {
        let mut m = Map::new();
        m.insert("ts".into(), json!(rfc3339(SystemTime::now())));
        m.insert("level".into(), json!(self.level().as_str()));
        m.insert("plugin".into(), json!("mesh-redirect"));
        let fields = [
            ("command", &self.command),
            ("containerID", &self.container_id),
            ("podNamespace", &self.pod_namespace),
            ("podName", &self.pod_name),
            ("netns", &self.netns),
            ("decision", &self.decision),
        ];
        for (k, v) in fields {
            if !v.is_empty() {
                m.insert(k.into(), json!(crate::protocol::truncate(v, MAX_FIELD)));
            }
        }
        if let Some(n) = self.rules {
            m.insert("rules".into(), json!(n));
        }
        if let Some(n) = self.set_elements {
            m.insert("setElements".into(), json!(n));
        }
        m.insert("durationUs".into(), json!(elapsed.as_micros() as u64));
        if let Some(c) = self.error_code {
            m.insert("code".into(), json!(c));
        }
        if let Some(e) = &self.error {
            m.insert(
                "error".into(),
                json!(crate::protocol::truncate(e, MAX_FIELD)),
            );
        }
        Value::Object(m)
    }
}

/// Writes the record if its level passes `min`. One `write` per line: lines from concurrent
/// invocations appending to the same file do not interleave.
pub fn emit(file: Option<&Path>, min: LogLevel, rec: &Record, elapsed: Duration) {
    if rec.level() < min {
        return;
    }
    let mut line = rec.to_json(elapsed).to_string();
    line.push('\n');
    if let Some(path) = file {
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path);
        if let Ok(mut f) = opened
            && f.write_all(line.as_bytes()).is_ok()
        {
            return;
        }
    }
    // Logging must never fail the invocation.
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// UTC timestamp with microseconds, e.g. `2026-11-23T18:42:05.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_459_325) + Duration::from_micros(7);
        assert_eq!(rfc3339(t), "2026-11-23T18:42:05.000007Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(rfc3339(leap).starts_with("2000-02-29T"));
    }

    #[test]
    fn record_is_bounded_and_has_the_fields() {
        let rec = Record {
            command: "ADD".into(),
            container_id: "abc".into(),
            pod_namespace: "default".into(),
            pod_name: "web-0".into(),
            netns: "/run/netns/x".into(),
            decision: "captured".into(),
            rules: Some(20),
            error: Some("e".repeat(100_000)),
            error_code: Some(102),
            ..Record::default()
        };
        let v = rec.to_json(Duration::from_micros(1234));
        assert_eq!(v["durationUs"], 1234);
        assert_eq!(v["level"], "error");
        assert_eq!(v["podName"], "web-0");
        assert!(v.to_string().len() < 2000);
    }
}
