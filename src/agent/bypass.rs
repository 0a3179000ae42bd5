//! Detecting connect-time load balancing that bypasses capture (`check-bypass`, issue 19).
//!
//! Cilium's socket-LB and Calico eBPF's connect-time load balancing attach cgroup/connect4|6
//! BPF programs at the root cgroup. They rewrite an app's `connect()` to a ClusterIP into a
//! backend's address before any packet exists, so the pod's capture sees a pod address as the
//! original destination, and the mesh treats the connection as one to an unknown pod: bypassed.
//!
//! The probe asks the kernel what happened. In a network namespace (by default a scratch one
//! of its own, which dies with the probe's thread) it redirects every TCP connection of its
//! own, marked, socket to its own listener, connects to the service, and reads
//! `SO_ORIGINAL_DST` on the accepted connection: the address the first packet carried at the
//! nat hook. The service's address when nothing rewrote `connect()`, a backend's when
//! something did. The probe links no CRI or HTTP code; only the agent binary carries it.

use crate::args::{self, CliError, Spec};
use crate::kernel::{Kernel, KernelError};
use crate::netns::{Netns, NetnsError};
use crate::policy::Passthrough6;
use crate::route::Rtnl;
use crate::ruleset::{self, Action, Chain, ChainKind, Cmp, Hook, HookPoint, L4, Match, Ruleset};
use nix::errno::Errno;
use nix::sched::{CloneFlags, unshare};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, connect, getsockopt, setsockopt, socket,
    sockopt,
};
use nix::sys::time::TimeVal;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The probe's table: never `mesh_redirect`, so it cannot touch a pod's capture.
pub const TABLE: &str = "mesh_redirect_probe";

/// The probe's socket mark: its redirect matches this, so in a namespace it shares (a pod's)
/// it takes the probe's own connection and nobody else's. ASCII "mrpb".
pub const MARK: u32 = 0x6d72_7062;

/// Ahead of every nat chain at the usual -100 (a pod's own capture among them): the first nat
/// chain that maps a connection decides, and it must be the probe's.
pub const PRIORITY: i32 = ruleset::NAT_PRIORITY - 10;

/// The default time the probe's connection has to arrive.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The scratch namespace's own addresses (documentation ranges), the probe connection's source.
/// They exist only in that namespace, and nothing leaves it.
const ADDR4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

#[derive(Debug, thiserror::Error)]
pub enum BypassError {
    #[error("{0:?} is not IP:PORT (an IPv6 address in brackets: [fd00::1]:443)")]
    BadTarget(String),
    #[error("{var}={value:?} is not {want}")]
    BadEnv {
        var: &'static str,
        value: String,
        want: &'static str,
    },
    #[error("KUBERNETES_SERVICE_HOST is set but KUBERNETES_SERVICE_PORT is not")]
    NoPort,
    #[error("cannot create the probe's scratch network namespace (needs CAP_SYS_ADMIN): {0}")]
    Unshare(nix::Error),
    #[error("cannot set up the probe's scratch network namespace: {what}: {err}")]
    Scratch { what: &'static str, err: io::Error },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot listen on {addr} (is lo up in this namespace?): {err}")]
    Listen { addr: SocketAddr, err: io::Error },
    #[error("cannot install the probe's table inet {TABLE}: {0}")]
    Table(KernelError),
    #[error(
        "table inet {TABLE} already exists here: another check-bypass is running in this \
         namespace, or one was killed before it removed its table (then: nft delete table inet \
         {TABLE}); nothing was changed"
    )]
    TableExists,
    #[error(
        "cannot remove the probe's table inet {TABLE}: {0} (remove it by hand: nft delete \
         table inet {TABLE})"
    )]
    Cleanup(KernelError),
    #[error("cannot prepare the probe's socket: {0}")]
    Socket(nix::Error),
    #[error("connect to {target} failed{}: {err}", hint(*.err))]
    Connect { target: SocketAddr, err: nix::Error },
    #[error("cannot accept the probe's connection: {0}")]
    Accept(io::Error),
    #[error("cannot read the original destination (SO_ORIGINAL_DST): {0}")]
    OriginalDst(nix::Error),
    #[error("cannot start the probe's thread: {0}")]
    Thread(io::Error),
    #[error("the probe's thread panicked (a bug, please report)")]
    Panicked,
}

fn hint(e: nix::Error) -> &'static str {
    match e {
        Errno::ENETUNREACH | Errno::EHOSTUNREACH => {
            " (no route to it in this namespace: give it one, or probe from the default scratch \
             namespace)"
        }
        _ => "",
    }
}

/// What became of the probe's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The probe's listener took it; `SO_ORIGINAL_DST` said it was dialled to this.
    Dialled(SocketAddr),
    /// `connect()` did not complete within the timeout: something dropped the probe's packets.
    Timeout,
    /// `connect()` completed, but not at the probe's listener: a rule ahead of the probe's took
    /// the connection, so what it dialled cannot be seen.
    Elsewhere,
}

/// The three answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The capture hook saw the target: connect() reached it unchanged.
    Intact,
    /// The capture hook saw another address: connect() was rewritten.
    Rewritten,
    /// The connection never reached the probe's listener.
    Inconclusive,
}

/// A probe's result: what was dialled and what the capture hook saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub target: SocketAddr,
    pub seen: Seen,
}

/// How to stop the rewriting in a pod's namespace, for each CNI known to do it.
pub const FIXES: &str = "\
Cilium (socket-LB): keep socket load balancing to the host namespace: Helm value
  socketLB.hostNamespaceOnly=true (cilium-agent flag bpf-lb-sock-hostns-only=true), then
  restart the Cilium agents.
Calico eBPF (connect-time load balancing): set bpfConnectTimeLoadBalancing=Disabled together
  with bpfHostNetworkedNATWithoutCTLB=Enabled:
  kubectl patch felixconfiguration default --type merge -p \
'{\"spec\":{\"bpfConnectTimeLoadBalancing\":\"Disabled\",\"bpfHostNetworkedNATWithoutCTLB\":\"Enabled\"}}'";

impl Verdict {
    /// The original destination the listener saw, if the connection arrived.
    pub fn seen_addr(&self) -> Option<SocketAddr> {
        match self.seen {
            Seen::Dialled(a) => Some(a),
            Seen::Timeout | Seen::Elsewhere => None,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self.seen {
            // Address and port: flow label and scope id are no part of what was dialled.
            Seen::Dialled(a) if a.ip() == self.target.ip() && a.port() == self.target.port() => {
                Outcome::Intact
            }
            Seen::Dialled(_) => Outcome::Rewritten,
            Seen::Timeout | Seen::Elsewhere => Outcome::Inconclusive,
        }
    }

    pub fn rewritten(&self) -> bool {
        self.outcome() == Outcome::Rewritten
    }

    /// The fixes, when there is something to fix.
    pub fn fixes(&self) -> Option<&'static str> {
        self.rewritten().then_some(FIXES)
    }
}

/// `target:`, `seen:`, `verdict:` lines, and the fixes when rewritten.
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.target;
        writeln!(f, "target:  {t}")?;
        match self.seen {
            Seen::Dialled(a) => writeln!(
                f,
                "seen:    {a} (the original destination at the capture hook)"
            )?,
            Seen::Timeout | Seen::Elsewhere => writeln!(f, "seen:    nothing")?,
        }
        match (self.outcome(), self.seen) {
            (Outcome::Intact, _) => write!(
                f,
                "verdict: not rewritten: capture sees the service address, as a mesh needs"
            ),
            (Outcome::Rewritten, Seen::Dialled(a)) => {
                writeln!(
                    f,
                    "verdict: REWRITTEN: connect() to {t} became {a} before any packet existed.\n\
                     \x20        Connect-time load balancing (a cgroup/connect BPF program of the\n\
                     \x20        primary CNI) bypasses the mesh: capture sees a pod, not the service."
                )?;
                write!(f, "fix (for whichever is the primary CNI):")?;
                FIXES.lines().try_for_each(|l| write!(f, "\n  {l}"))
            }
            (_, Seen::Timeout) => write!(
                f,
                "verdict: inconclusive: the probe's connection did not complete in time \
                 (something drops its packets)"
            ),
            _ => write!(
                f,
                "verdict: inconclusive: a nat rule ahead of the probe's (priority below \
                 {PRIORITY}) took the connection, so what it dialled cannot be seen"
            ),
        }
    }
}

/// `KUBERNETES_SERVICE_HOST` and `_PORT`, as the kubelet sets them in every pod (a bare IPv6
/// address, no brackets). `None` when the host is unset.
pub fn target_from_env(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<SocketAddr>, BypassError> {
    const HOST: &str = "KUBERNETES_SERVICE_HOST";
    const PORT: &str = "KUBERNETES_SERVICE_PORT";
    let Some(host) = get(HOST).filter(|h| !h.is_empty()) else {
        return Ok(None);
    };
    let port = get(PORT)
        .filter(|p| !p.is_empty())
        .ok_or(BypassError::NoPort)?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&host);
    let ip: IpAddr = bare
        .parse()
        .ok()
        .filter(|ip: &IpAddr| !ip.is_unspecified())
        .ok_or_else(|| BypassError::BadEnv {
            var: HOST,
            value: host.clone(),
            want: "an IP address",
        })?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| BypassError::BadEnv {
            var: PORT,
            value: port.clone(),
            want: "a port number",
        })?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// `IP:PORT` or `[IPv6]:PORT`: an address to dial, not a name to resolve.
pub fn parse_target(s: &str) -> Result<SocketAddr, BypassError> {
    s.parse::<SocketAddr>()
        .ok()
        .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
        .ok_or_else(|| BypassError::BadTarget(s.to_string()))
}

/// Probes whether `connect()` to `target` is rewritten before capture sees it.
///
/// `netns: None`: in a scratch network namespace the probe makes and removes. `Some(path)`: in
/// that existing namespace (never the caller's own), where it adds table `inet
/// mesh_redirect_probe` for the duration (affecting only its own marked socket) and removes it
/// again, on error too. Runs on a thread of its own: the caller's thread never changes
/// namespace. Needs CAP_SYS_ADMIN and CAP_NET_ADMIN.
pub fn probe(
    target: SocketAddr,
    netns: Option<&Path>,
    timeout: Duration,
) -> Result<Verdict, BypassError> {
    // Opened (and checked not to be ours) here, so a bad path fails before any thread starts.
    let ns = netns.map(Netns::open).transpose()?;
    let thread = std::thread::Builder::new()
        .name("bypass-probe".into())
        .spawn(move || match ns {
            None => in_scratch(target, timeout),
            Some(ns) => ns.run(|| measure(target, timeout, Leave::AsItWas))?,
        })
        .map_err(BypassError::Thread)?;
    thread.join().map_err(|_| BypassError::Panicked)?
}

/// On the probe's own thread: a new network namespace, which dies with the thread (nothing
/// else holds it once the probe's sockets are closed).
fn in_scratch(target: SocketAddr, timeout: Duration) -> Result<Verdict, BypassError> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(BypassError::Unshare)?;
    scratch_network(target.is_ipv6())?;
    measure(target, timeout, Leave::ToDie)
}

/// `lo` up, with an address and a default route of the target's family: for connect() to find
/// a route and a source address, as in a pod. All on `lo`, no other link: a new link's carrier
/// comes up asynchronously (the kernel's link watch, up to a second later), and until then
/// IPv6 keeps an address on it tentative, which delays the probe's connection by a SYN
/// retransmission. Nothing goes out by that route: the probe's connection is redirected to
/// its listener at the nat hook, before routing sends it anywhere.
fn scratch_network(v6: bool) -> Result<(), BypassError> {
    let step = |what: &'static str| move |err: io::Error| BypassError::Scratch { what, err };
    let mut rt = Rtnl::open().map_err(step("open rtnetlink"))?;
    let lo = rt.lo();
    rt.link_up(lo).map_err(step("set lo up"))?;
    let addr = if v6 {
        IpAddr::V6(ADDR6)
    } else {
        IpAddr::V4(ADDR4)
    };
    rt.add_addr(lo, addr, if v6 { 128 } else { 32 })
        .map_err(step("add the source address"))?;
    rt.add_default_route(lo, v6)
        .map_err(step("add the default route"))?;
    // IPv6 routes the new address locally only a moment later (from a work queue): a reply
    // to it before then is lost, and the connection waits a second for a retransmission.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !rt.is_local(addr).map_err(step("read the routes back"))? {
        if Instant::now() > deadline {
            return Err(BypassError::Scratch {
                what: "wait for the source address's local route",
                err: io::Error::from(io::ErrorKind::TimedOut),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The probe's table: its listener's port takes every TCP connection of the marked socket.
fn probe_ruleset(port: u16) -> Ruleset {
    Ruleset {
        sets: Vec::new(),
        chains: vec![Chain {
            name: "output",
            hook: Some(Hook {
                kind: ChainKind::Nat,
                point: HookPoint::Output,
                priority: PRIORITY,
            }),
            rules: vec![ruleset::Rule {
                matches: vec![Match::Mark(Cmp::Eq, MARK), Match::L4Proto(L4::Tcp)],
                action: Action::Redirect(port),
                comment: "mesh-redirect check-bypass: the probe's own connection",
            }],
        }],
        routing: None,
        passthrough6: Passthrough6::No,
    }
}

/// Removes the probe's table when dropped (a panic, an early return); `remove` reports.
struct ProbeTable(Option<Kernel>);

impl ProbeTable {
    fn install(port: u16) -> Result<ProbeTable, BypassError> {
        let mut k = Kernel::open_table(TABLE).map_err(BypassError::Table)?;
        match k.create(&probe_ruleset(port)) {
            Ok(()) => Ok(ProbeTable(Some(k))),
            Err(KernelError::Refused { err, .. }) if err.raw_os_error() == Some(libc::EEXIST) => {
                Err(BypassError::TableExists)
            }
            Err(e) => Err(BypassError::Table(e)),
        }
    }

    /// Leaves the table to the namespace's end.
    fn forget(mut self) {
        self.0.take();
    }

    fn remove(mut self) -> Result<(), BypassError> {
        match self.0.take() {
            Some(mut k) => k.delete(None).map(drop).map_err(BypassError::Cleanup),
            None => Ok(()),
        }
    }
}

impl Drop for ProbeTable {
    fn drop(&mut self) {
        if let Some(mut k) = self.0.take() {
            // Unwinding or returning an error already: that one is the one to report.
            let _ = k.delete(None);
        }
    }
}

/// What becomes of the namespace the probe measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// Someone else's: the probe's table is removed again.
    AsItWas,
    /// The scratch one, which goes with everything in it when the thread ends. Not deleting
    /// the table spares the probe the ~10 ms a deleting commit costs at socket close (the
    /// kernel waits for an RCU grace period there; see docs/PERFORMANCE.md).
    ToDie,
}

/// In the calling thread's namespace: listen, install the table, connect, see, clean up.
fn measure(target: SocketAddr, timeout: Duration, leave: Leave) -> Result<Verdict, BypassError> {
    let at: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::LOCALHOST, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::LOCALHOST, 0).into(),
    };
    let listener = TcpListener::bind(at).map_err(|err| BypassError::Listen { addr: at, err })?;
    let port = listener
        .local_addr()
        .map_err(|err| BypassError::Listen { addr: at, err })?
        .port();
    let table = ProbeTable::install(port)?;
    let seen = connect_and_see(target, &listener, timeout);
    // Closed before the table goes: no connection of the probe outlives its rule.
    drop(listener);
    match leave {
        Leave::AsItWas => table.remove()?,
        Leave::ToDie => table.forget(),
    }
    Ok(Verdict {
        target,
        seen: seen?,
    })
}

fn connect_and_see(
    target: SocketAddr,
    listener: &TcpListener,
    timeout: Duration,
) -> Result<Seen, BypassError> {
    let started = Instant::now();
    let family = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(BypassError::Socket)?;
    setsockopt(&fd, sockopt::Mark, &MARK).map_err(BypassError::Socket)?;
    // A blocking connect waits at most the send timeout, then says EINPROGRESS.
    setsockopt(&fd, sockopt::SendTimeout, &timeval(timeout)).map_err(BypassError::Socket)?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(target)) {
        Ok(()) => {}
        Err(Errno::EINPROGRESS | Errno::ETIMEDOUT | Errno::EAGAIN) => return Ok(Seen::Timeout),
        Err(err) => return Err(BypassError::Connect { target, err }),
    }
    let client = TcpStream::from(fd);
    let me = client.local_addr().map_err(BypassError::Accept)?;
    // Connected means the handshake is done: if it was with our listener, the connection is
    // already in its queue. Anyone else's connection there is not the probe's: skip it.
    let left = timeout.saturating_sub(started.elapsed());
    setsockopt(
        listener,
        sockopt::ReceiveTimeout,
        &timeval(left.max(Duration::from_millis(100))),
    )
    .map_err(BypassError::Socket)?;
    loop {
        match listener.accept() {
            Ok((conn, peer)) if peer == me => return original_dst(&conn).map(Seen::Dialled),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Seen::Elsewhere),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BypassError::Accept(e)),
        }
    }
}

fn timeval(d: Duration) -> TimeVal {
    // At least 1 µs: zero would mean "wait forever".
    let d = d.max(Duration::from_micros(1));
    TimeVal::new(
        d.as_secs().min(i64::MAX as u64) as _,
        d.subsec_micros() as _,
    )
}

/// `SO_ORIGINAL_DST` (`IP6T_SO_ORIGINAL_DST` for IPv6): the destination before the redirect.
fn original_dst(conn: &TcpStream) -> Result<SocketAddr, BypassError> {
    match conn.local_addr().map_err(BypassError::Accept)? {
        SocketAddr::V4(_) => {
            let sa = getsockopt(conn, sockopt::OriginalDst).map_err(BypassError::OriginalDst)?;
            Ok(SocketAddr::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)).into(),
                u16::from_be(sa.sin_port),
            ))
        }
        SocketAddr::V6(_) => {
            let sa =
                getsockopt(conn, sockopt::Ip6tOriginalDst).map_err(BypassError::OriginalDst)?;
            Ok(SocketAddr::new(
                Ipv6Addr::from(sa.sin6_addr.s6_addr).into(),
                u16::from_be(sa.sin6_port),
            ))
        }
    }
}

const SPECS: &[Spec] = &[
    Spec::value(
        "--netns",
        "",
        "PATH",
        "probe from this network namespace instead of a scratch one",
    ),
    Spec::value(
        "--target",
        "",
        "IP:PORT",
        "the service address to dial (default: $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)",
    ),
    Spec::value(
        "--timeout",
        "",
        "SECONDS",
        "how long the connection has to arrive (default 2)",
    ),
];

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub target: SocketAddr,
    pub netns: Option<PathBuf>,
    pub timeout: Duration,
}

impl Options {
    pub fn parse(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Options, CliError> {
        let f = args::parse(args, SPECS, |_| None)?;
        let usage = |e: BypassError| CliError::Usage(e.to_string());
        let target = match f.get("--target") {
            Some(t) => parse_target(&t).map_err(|e| CliError::Usage(format!("--target {e}")))?,
            None => target_from_env(env).map_err(usage)?.ok_or_else(|| {
                CliError::Usage(
                    "no target: give --target IP:PORT, or set KUBERNETES_SERVICE_HOST and \
                     KUBERNETES_SERVICE_PORT (as every pod has them)"
                        .into(),
                )
            })?,
        };
        let netns = f.get("--netns").map(PathBuf::from);
        if netns.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(CliError::Usage("--netns must be an absolute path".into()));
        }
        let timeout = f
            .parsed("--timeout", "a number of seconds (0 < s <= 60)", |v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= 60.0)
            })?
            .map_or(TIMEOUT, Duration::from_secs_f64);
        Ok(Options {
            target,
            netns,
            timeout,
        })
    }
}

/// Exit codes beside 0 (not rewritten), 1 (rewritten) and 2 (usage).
pub const EXIT_INCONCLUSIVE: u8 = 3;
pub const EXIT_FAILED: u8 = crate::cli::CHECK_BYPASS_FAILED;

/// `mesh-redirect-agent check-bypass …` (also as `mesh-redirect check-bypass …`).
pub fn main(args: &[String]) -> ExitCode {
    let opts = match Options::parse(args, |k| std::env::var(k).ok()) {
        Ok(o) => o,
        Err(CliError::Usage(m) | CliError::Failed(m)) => {
            eprintln!(
                "mesh-redirect check-bypass: {m}\n\nusage:\n{}",
                crate::cli::CHECK_BYPASS_USAGE
            );
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let verdict = match probe(opts.target, opts.netns.as_deref(), opts.timeout) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("mesh-redirect check-bypass: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let took = started.elapsed();
    match &opts.netns {
        None => println!("netns:   a scratch namespace of the probe's own (removed)"),
        Some(p) => println!(
            "netns:   {} (table inet {TABLE} added and removed)",
            p.display()
        ),
    }
    println!("{verdict}");
    println!("took:    {:.1} ms", took.as_secs_f64() * 1e3);
    ExitCode::from(match verdict.outcome() {
        Outcome::Intact => 0,
        Outcome::Rewritten => 1,
        Outcome::Inconclusive => EXIT_INCONCLUSIVE,
    })
}

/// How often the agent probes (at start, then every period) unless told otherwise.
pub const PERIOD: Duration = Duration::from_secs(60);

/// The readiness reason for a rewritten verdict: what was seen, and both fixes on one line.
pub fn not_ready_reason(v: &Verdict) -> String {
    let seen = v.seen_addr().map(|a| a.to_string()).unwrap_or_default();
    format!(
        "capture is bypassed on this node: connect() to the service {} reaches capture as {seen} \
         (connect-time load balancing by the primary CNI rewrites it before any packet exists; \
         meshed pods' service traffic skips their proxies). Fix: Cilium: Helm \
         socketLB.hostNamespaceOnly=true (bpf-lb-sock-hostns-only); Calico eBPF: \
         bpfConnectTimeLoadBalancing=Disabled with bpfHostNetworkedNATWithoutCTLB=Enabled",
        v.target
    )
}

/// The agent's side: probes at start and every `period` from a scratch namespace of its own,
/// and keeps readiness, the `capture_bypass` gauge and the log in step with what it sees.
/// `target` is `KUBERNETES_SERVICE_HOST:PORT` (`None`: unset, nothing to probe, said once).
pub fn watch(st: std::sync::Arc<super::Shared>, target: Option<SocketAddr>, period: Duration) {
    use super::health::Worker;
    use super::log;
    use serde_json::json;
    let Some(target) = target else {
        log(
            "warn",
            "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT unset: the capture-bypass check is skipped",
            json!({}),
        );
        // Nothing to watch: the thread ends, and with it its heartbeat duty.
        st.health.unwatch(Worker::Bypass);
        return;
    };
    // What was last reported: the outcome, or the kind of error (one log line per change of
    // cause, not per changed errno or address in its text).
    let mut last: Option<Result<Outcome, std::mem::Discriminant<BypassError>>> = None;
    loop {
        st.health.beat(Worker::Bypass);
        let now = probe(target, None, TIMEOUT).map(|v| (v.outcome(), v));
        let key = now
            .as_ref()
            .map(|(o, _)| *o)
            .map_err(std::mem::discriminant);
        let changed = last.as_ref() != Some(&key);
        match &now {
            Ok((Outcome::Rewritten, v)) => {
                st.metrics.capture_bypass.set(1);
                st.readiness.set_bypass(Some(not_ready_reason(v)));
                if changed {
                    log(
                        "error",
                        "capture bypassed: connect-time load balancing rewrites connects to \
                         services before capture sees them; not ready until it stops",
                        json!({"target": target.to_string(), "seen": v.seen_addr().map(|a| a.to_string()),
                            "fixCilium": "Helm socketLB.hostNamespaceOnly=true (cilium-agent --bpf-lb-sock-hostns-only=true)",
                            "fixCalico": "FelixConfiguration bpfConnectTimeLoadBalancing=Disabled with bpfHostNetworkedNATWithoutCTLB=Enabled"}),
                    );
                }
            }
            Ok((Outcome::Intact, _)) => {
                st.metrics.capture_bypass.set(0);
                st.readiness.set_bypass(None);
                if changed {
                    log(
                        "info",
                        "capture-bypass check: connects to the service reach capture unchanged",
                        json!({"target": target.to_string()}),
                    );
                }
            }
            // Says nothing either way: readiness keeps what the last conclusive probe said.
            Ok((Outcome::Inconclusive, v)) => {
                if changed {
                    log(
                        "warn",
                        "capture-bypass check inconclusive",
                        json!({"target": target.to_string(), "verdict": v.to_string()}),
                    );
                }
            }
            Err(e) => {
                if changed {
                    log(
                        "warn",
                        "capture-bypass check could not run (retrying)",
                        json!({"target": target.to_string(), "error": e.to_string()}),
                    );
                }
            }
        }
        st.refresh_ready();
        last = Some(key);
        st.health.beat(Worker::Bypass);
        std::thread::sleep(period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn target_from_the_kubelets_variables() {
        let t = |vars: &[(&str, &str)]| target_from_env(env(vars));
        assert_eq!(t(&[]).ok(), Some(None));
        assert_eq!(
            t(&[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443")
            ])
            .ok(),
            Some(Some("10.96.0.1:443".parse().unwrap()))
        );
        // A bare IPv6 address, as the kubelet writes it (and a bracketed one, by hand).
        for host in ["fd00:96::1", "[fd00:96::1]"] {
            assert_eq!(
                t(&[
                    ("KUBERNETES_SERVICE_HOST", host),
                    ("KUBERNETES_SERVICE_PORT", "443")
                ])
                .ok(),
                Some(Some("[fd00:96::1]:443".parse().unwrap()))
            );
        }
        assert!(matches!(
            t(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1")]),
            Err(BypassError::NoPort)
        ));
        for (h, p) in [
            ("kubernetes.default", "443"),
            ("0.0.0.0", "443"),
            ("10.96.0.1", "https"),
            ("10.96.0.1", "0"),
            ("10.96.0.1", "65536"),
        ] {
            assert!(
                matches!(
                    t(&[
                        ("KUBERNETES_SERVICE_HOST", h),
                        ("KUBERNETES_SERVICE_PORT", p)
                    ]),
                    Err(BypassError::BadEnv { .. })
                ),
                "{h} {p}"
            );
        }
    }

    #[test]
    fn targets_on_the_command_line() {
        assert!(parse_target("10.96.0.1:443").is_ok());
        assert!(parse_target("[fd00:96::1]:443").is_ok());
        for bad in [
            "10.96.0.1",
            "fd00:96::1:443",
            "kubernetes:443",
            "10.96.0.1:0",
            "",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = Options::parse(&args(&["--target", "[fd00:96::1]:443"]), |_| None).unwrap();
        assert_eq!(o.timeout, TIMEOUT);
        assert_eq!(o.netns, None);
        assert!(matches!(
            Options::parse(&args(&[]), |_| None),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            Options::parse(&args(&["--target", "1.2.3.4:1", "--netns", "x"]), |_| None),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            Options::parse(&args(&["--target", "1.2.3.4:1", "--timeout", "0"]), |_| {
                None
            }),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn verdicts_and_their_text() {
        let target: SocketAddr = "10.96.0.1:443".parse().unwrap();
        let v = |seen| Verdict { target, seen };
        let intact = v(Seen::Dialled(target));
        assert_eq!(intact.outcome(), Outcome::Intact);
        assert_eq!(intact.fixes(), None);
        let backend = "10.244.1.7:6443".parse().unwrap();
        let rewritten = v(Seen::Dialled(backend));
        assert!(rewritten.rewritten());
        let text = rewritten.to_string();
        for needle in [
            "10.244.1.7:6443",
            "socketLB.hostNamespaceOnly=true",
            "bpf-lb-sock-hostns-only",
            "bpfConnectTimeLoadBalancing=Disabled",
            "bpfHostNetworkedNATWithoutCTLB=Enabled",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        for s in [Seen::Timeout, Seen::Elsewhere] {
            assert_eq!(v(s).outcome(), Outcome::Inconclusive);
            assert_eq!(v(s).seen_addr(), None);
            assert!(v(s).to_string().contains("inconclusive"));
        }
    }
}
