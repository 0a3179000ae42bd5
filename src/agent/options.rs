//! The agent's command line: every flag declared once (parsing, its environment variable and
//! the usage text all come from that declaration), and what the flags mean together.

use crate::args::{self, CliError, Spec};
use crate::install;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Where the runtimes bind-mount pods' netns files (containerd and CRI-O by default).
pub const NETNS_DIR: &str = "/var/run/netns";
/// Default reconcile period.
pub const PERIOD: Duration = Duration::from_secs(5);
/// The metrics port with `--metrics-host` and no `--metrics-port`.
pub const METRICS_PORT: u16 = 15701;

/// The agent's own flags (it also takes `install::SPECS`).
pub const SPECS: &[Spec] = &[
    Spec::value(
        "--cri-socket",
        "MESH_REDIRECT_CRI_SOCKET",
        "PATH",
        "the runtime's CRI socket (default: the first of /run/containerd/containerd.sock, \
         /run/crio/crio.sock, /var/run/cri-dockerd.sock that exists)",
    ),
    Spec::value(
        "--reconcile-period",
        "MESH_REDIRECT_RECONCILE_PERIOD",
        "SECONDS",
        "check every ready pod sandbox this often and install the table in place where a \
         meshed pod lacks it or has a different one (default 5; 0: never)",
    ),
    Spec::value(
        "--metrics-addr",
        "MESH_REDIRECT_METRICS_ADDR",
        "HOST:PORT",
        "serve /metrics (and nothing else) here; must differ from --readiness-addr",
    ),
    Spec::value(
        "--metrics-host",
        "MESH_REDIRECT_METRICS_HOST",
        "IP",
        "instead of --metrics-addr: serve /metrics on this address (IPv4 or IPv6, brackets \
         optional: a node's status.hostIP as it comes)",
    ),
    Spec::value(
        "--metrics-port",
        "MESH_REDIRECT_METRICS_PORT",
        "PORT",
        "with --metrics-host: the port (default 15701)",
    ),
    Spec::value(
        "--event-socket",
        "MESH_REDIRECT_EVENT_SOCKET",
        "PATH",
        "count the plugin's invocations from events on this unix socket (default \
         /run/mesh-redirect/events.sock; written into the chained entry; one agent owns it)",
    ),
    Spec::value(
        "--netns-dir",
        "MESH_REDIRECT_NETNS_DIR",
        "DIR",
        "where a pod's netns file is looked for when the path the runtime reports is not \
         visible here (the agent in a container: the host's netns dir mounted there; default \
         /var/run/netns)",
    ),
    Spec::value(
        "--bypass-check",
        "MESH_REDIRECT_BYPASS_CHECK",
        "true|false",
        "probe whether connects to the cluster's service address \
         ($KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT) reach capture unchanged, and stay \
         not ready while connect-time load balancing rewrites them (default true)",
    ),
    Spec::value(
        "--bypass-check-period",
        "MESH_REDIRECT_BYPASS_CHECK_PERIOD",
        "SECONDS",
        "how often that probe runs (default 60)",
    ),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub install: install::Options,
    pub cri_socket: Option<PathBuf>,
    /// Zero: no reconciling (chaining only).
    pub reconcile_period: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub event_socket: PathBuf,
    /// Where to look for a netns file the runtime reports at a path not visible here.
    pub netns_dir: PathBuf,
    /// `None`: no capture-bypass probe.
    pub bypass_period: Option<Duration>,
}

/// The agent's usage text, from the declarations.
pub fn usage() -> String {
    let all: Vec<Spec> = install::SPECS.iter().chain(SPECS).copied().collect();
    format!(
        "mesh-redirect-agent install --cni-bin-dir DIR --cni-conf-dir DIR [FLAGS]
    (also as `mesh-redirect install …`, which runs this)
    The node agent: installs the plugin beside this binary into the CNI bin dir, chains it last
    into the runtime's primary network config and keeps it there, reconciles every meshed pod
    on the node through the CRI, counts the plugin's invocations, probes for capture bypass,
    serves /readyz and /healthz (--readiness-addr) and /metrics (--metrics-addr). On
    SIGTERM/SIGINT removes the entry and the binary unless --keep-on-exit.
{}
mesh-redirect-agent check-bypass [--target IP:PORT] [--netns PATH] [--timeout SECONDS]
    (also as `mesh-redirect check-bypass …`) The capture-bypass probe, once, printing what it saw.",
        args::usage(&all)
    )
}

/// A flag's boolean, as Go's `strconv.ParseBool` spells it.
fn boolean(v: &str) -> Option<bool> {
    crate::values::lists::go_bool(v.trim())
}

impl Options {
    pub fn parse(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Options, CliError> {
        let specs: Vec<Spec> = install::SPECS.iter().chain(SPECS).copied().collect();
        let f = args::parse(args, &specs, env)?;
        let abs = |flag: &str, p: String| -> Result<PathBuf, CliError> {
            if p.starts_with('/') {
                Ok(PathBuf::from(p))
            } else {
                Err(CliError::Usage(format!("{flag} must be an absolute path")))
            }
        };
        let event_socket = abs(
            "--event-socket",
            f.get("--event-socket")
                .unwrap_or_else(|| crate::events::DEFAULT_SOCKET.into()),
        )?;
        if event_socket.as_os_str().len() >= 108 {
            return Err(CliError::Usage(
                "--event-socket is longer than a unix socket path may be".into(),
            ));
        }
        let install = install::Options::from_parsed(&f)?;
        let metrics_addr = metrics_addr(&f)?;
        if metrics_addr.is_some() && metrics_addr == install.readiness_addr {
            return Err(CliError::Usage(
                "--metrics-addr must differ from --readiness-addr: the metrics address serves \
                 /metrics only (pods can reach it), the readiness address /readyz and /healthz"
                    .into(),
            ));
        }
        let seconds = |flag: &str, max: f64| {
            f.parsed(flag, "a number of seconds", |v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0 && *s <= max)
            })
        };
        let bypass = f
            .parsed("--bypass-check", "true or false", boolean)?
            .unwrap_or(true);
        let bypass_period = seconds("--bypass-check-period", 3600.0)?
            .map(Duration::from_secs_f64)
            .unwrap_or(crate::agent::bypass::PERIOD);
        if bypass_period.is_zero() {
            return Err(CliError::Usage(
                "--bypass-check-period must be above 0 (use --bypass-check=false to turn the \
                 probe off)"
                    .into(),
            ));
        }
        Ok(Options {
            install,
            cri_socket: f
                .get("--cri-socket")
                .map(|p| abs("--cri-socket", p))
                .transpose()?,
            reconcile_period: seconds("--reconcile-period", 86400.0)?
                .map_or(PERIOD, Duration::from_secs_f64),
            metrics_addr,
            event_socket,
            netns_dir: abs(
                "--netns-dir",
                f.get("--netns-dir").unwrap_or_else(|| NETNS_DIR.into()),
            )?,
            bypass_period: bypass.then_some(bypass_period),
        })
    }
}

/// `--metrics-addr HOST:PORT`, or `--metrics-host IP` with `--metrics-port PORT`: a bare IP
/// (what `status.hostIP` gives, IPv6 without brackets) cannot be glued to a port in a manifest.
fn metrics_addr(f: &args::Parsed<'_>) -> Result<Option<SocketAddr>, CliError> {
    let addr = f.parsed("--metrics-addr", "HOST:PORT", |a| {
        a.parse::<SocketAddr>().ok()
    })?;
    let host = f.parsed("--metrics-host", "an IP address", |h| {
        let h = h.trim();
        let bare = h
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(h);
        bare.parse::<IpAddr>().ok()
    })?;
    let port = f.parsed("--metrics-port", "a port 1-65535", |p| {
        p.trim().parse::<u16>().ok().filter(|&p| p != 0)
    })?;
    match (addr, host, port) {
        (Some(_), Some(_), _) => Err(CliError::Usage(
            "give --metrics-addr or --metrics-host, not both".into(),
        )),
        (Some(_), None, Some(_)) => Err(CliError::Usage(
            "--metrics-port goes with --metrics-host, not --metrics-addr".into(),
        )),
        (Some(a), None, None) => Ok(Some(a)),
        (None, Some(h), p) => Ok(Some(SocketAddr::new(h, p.unwrap_or(METRICS_PORT)))),
        (None, None, Some(_)) => Err(CliError::Usage(
            "--metrics-port needs --metrics-host".into(),
        )),
        (None, None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Options, CliError> {
        let mut v: Vec<String> = ["--cni-bin-dir", "/b", "--cni-conf-dir", "/c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(a.iter().map(|s| s.to_string()));
        Options::parse(&v, |_| None)
    }

    #[test]
    fn metrics_address_from_an_address_or_a_bare_host() {
        assert_eq!(parse(&[]).unwrap().metrics_addr, None);
        let a = |x: &[&str]| parse(x).unwrap().metrics_addr.unwrap().to_string();
        assert_eq!(a(&["--metrics-addr", "10.0.0.1:15701"]), "10.0.0.1:15701");
        assert_eq!(a(&["--metrics-host", "10.0.0.1"]), "10.0.0.1:15701");
        // An IPv6-only node's status.hostIP, as the kubelet expands $(HOST_IP).
        assert_eq!(
            a(&["--metrics-host", "fd00::7", "--metrics-port", "9100"]),
            "[fd00::7]:9100"
        );
        assert_eq!(a(&["--metrics-host=[fd00::7]"]), "[fd00::7]:15701");
        for bad in [
            &["--metrics-addr", "fd00::7:15701"][..],
            &["--metrics-host", "node-1"],
            &["--metrics-port", "1"],
            &["--metrics-host", "10.0.0.1", "--metrics-port", "0"],
            &["--metrics-addr", "10.0.0.1:1", "--metrics-host", "10.0.0.1"],
            &["--metrics-addr", "10.0.0.1:1", "--metrics-port", "2"],
        ] {
            assert!(matches!(parse(bad), Err(CliError::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn bypass_check_switch_and_period() {
        assert_eq!(
            parse(&[]).unwrap().bypass_period,
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse(&["--bypass-check=false"]).unwrap().bypass_period,
            None
        );
        assert_eq!(
            parse(&["--bypass-check", "true", "--bypass-check-period", "5"])
                .unwrap()
                .bypass_period,
            Some(Duration::from_secs(5))
        );
        let env = |k: &str| (k == "MESH_REDIRECT_BYPASS_CHECK").then(|| "0".to_string());
        let v: Vec<String> = ["--cni-bin-dir", "/b", "--cni-conf-dir", "/c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(Options::parse(&v, env).unwrap().bypass_period, None);
        for bad in [
            &["--bypass-check", "maybe"][..],
            &["--bypass-check-period", "0"],
        ] {
            assert!(matches!(parse(bad), Err(CliError::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn usage_names_every_flag_and_variable() {
        let u = usage();
        for s in install::SPECS.iter().chain(SPECS) {
            assert!(u.contains(s.flag), "{}", s.flag);
            assert!(s.env.is_empty() || u.contains(s.env), "{}", s.env);
        }
    }
}
