//! HTTP/1.1 GETs from inside a network namespace (the agent's probes and metrics, Prometheus),
//! and reading Prometheus' text format.

use std::io::Write;
use std::time::Duration;

/// `GET path` over HTTP/1.1 to 127.0.0.1:`port` inside the network namespace at `netns`
/// (the installer's readiness endpoint): (status code, body).
pub fn http_get_in(netns: &str, port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at(netns, "127.0.0.1", port, path)
}

/// An HTTP GET from inside `netns` to `host:port` (as the kubelet probes a hostNetwork pod):
/// the status code and body, or None when nothing answers.
pub fn http_get_at(netns: &str, host: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let (netns, host, path) = (netns.to_string(), host.to_string(), path.to_string());
    // setns is per thread: a thread of its own enters the namespace and ends there.
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).ok()?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let mut s = std::net::TcpStream::connect((host.as_str(), port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        std::io::Read::read_to_string(&mut s, &mut resp).ok()?;
        let code = resp.split_whitespace().nth(1)?.parse().ok()?;
        Some((
            code,
            resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
        ))
    })
    .join()
    .ok()
    .flatten()
}

/// The value of one series in Prometheus text (labels in any order; 0 when absent).
pub fn sample(text: &str, series: &str) -> f64 {
    let (name, labels) = match series.split_once('{') {
        Some((n, l)) => (n, l.trim_end_matches('}')),
        None => (series, ""),
    };
    let want: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            let (n, ls) = match s.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (s, ""),
            };
            let have: Vec<&str> = ls.split(',').filter(|s| !s.is_empty()).collect();
            (n == name && want.len() == have.len() && want.iter().all(|w| have.contains(w)))
                .then(|| v.parse().ok())
                .flatten()
        })
        .next()
        .unwrap_or(0.0)
}
