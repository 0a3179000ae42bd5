//! capture-probe: a stand-in proxy, app server and client for proving capture with traffic.
//!
//! Used by the tests, the demo and by operators checking a pod by hand. Every server answers
//! each TCP connection with one line saying who answered and what the connection looked like:
//!
//!   NAME port=LOCAL_PORT orig=ORIGINAL_DST peer=PEER
//!
//! `orig` is `SO_ORIGINAL_DST` (`IP6T_SO_ORIGINAL_DST` for IPv6): for a redirected connection,
//! the address the client dialled. With `--transparent` (TPROXY) the listener is
//! `IP_TRANSPARENT` and `orig` is the socket's own address, which TPROXY keeps original.
//!
//! Options common to all commands, applied in this order before anything else:
//!   --netns PATH   enter this network namespace
//!   --gid N        become this group (also the only supplementary group)
//!   --uid N        become this user

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{self, sockopt};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "\
capture-probe [--netns PATH] [--gid N] [--uid N] COMMAND
  serve --name NAME --port P [--port P...] [--transparent] [--udp P...] [--loopback]
        answer TCP connections (IPv4 and IPv6) with one line, until killed; prints `ready`
        once listening. --udp also echoes UDP datagrams, prefixed with NAME. --loopback
        listens on 127.0.0.1 and ::1 only (as Istio's DNS proxy does).
  connect ADDR:PORT [--timeout-ms N] [--from IP [--mark N]] [--bind IP]
        connect, print the server's line; exit 1 if nothing answered. --from binds a
        non-local source address (IP_TRANSPARENT, needs CAP_NET_ADMIN), --mark sets SO_MARK.
        --bind binds a local source address first, as Envoy's inbound passthrough binds
        127.0.0.6 or ::6 (fails with EADDRNOTAVAIL if the address is not on the pod).
  validate istio|linkerd|kuma [--ipv6] [--timeout-ms N]
        what each mesh's own init-container validator checks, exit codes included: istio's
        istio-validation (listen 127.0.0.1:15001,15006, dial 127.0.0.6:15002 from 127.0.0.1,
        pass when SO_ORIGINAL_DST says port 15002; exit 126 after 5 s), linkerd's
        network-validator (listen on :4140, dial 1.1.1.1:20001 or [fd00::1]:20001, pass when
        its own token comes back; exit 95 after 10 s), kuma's transparent-proxy validator
        (listen 127.0.0.1:15006, dial 127.0.0.6:2xxxx from 127.0.0.1; exit 1 after 5 s).
        Run it with the mesh's proxy uid (linkerd: 65534) as those validators run.
  udp ADDR:PORT [--timeout-ms N] [--from-port P]
        send one datagram, print the reply; exit 1 if none";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capture-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn take(args: &mut Vec<String>, flag: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(i) = args.iter().position(|a| a == flag) {
        if i + 1 < args.len() {
            out.push(args.remove(i + 1));
        }
        args.remove(i);
    }
    out
}

fn take_bool(args: &mut Vec<String>, flag: &str) -> bool {
    let had = args.iter().any(|a| a == flag);
    args.retain(|a| a != flag);
    had
}

fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad {what}: {s:?}"))
}

fn run(mut args: Vec<String>) -> Result<(), String> {
    if let Some(path) = take(&mut args, "--netns").pop() {
        let f = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {path}: {e}"))?;
    }
    if let Some(g) = take(&mut args, "--gid").pop() {
        let g = Gid::from_raw(num(&g, "gid")?);
        setgroups(&[g]).map_err(|e| format!("setgroups: {e}"))?;
        setresgid(g, g, g).map_err(|e| format!("setgid: {e}"))?;
    }
    if let Some(u) = take(&mut args, "--uid").pop() {
        let u = Uid::from_raw(num(&u, "uid")?);
        setresuid(u, u, u).map_err(|e| format!("setuid: {e}"))?;
    }
    let explicit_timeout = take(&mut args, "--timeout-ms")
        .pop()
        .map(|t| num::<u64>(&t, "timeout"))
        .transpose()?
        .map(Duration::from_millis);
    let timeout = explicit_timeout.unwrap_or(Duration::from_millis(2000));
    let Some(cmd) = args.first().cloned() else {
        return Err(USAGE.into());
    };
    args.remove(0);
    match cmd.as_str() {
        "serve" => serve(args),
        "validate" => {
            let ipv6 = take_bool(&mut args, "--ipv6");
            let mesh = args.first().cloned().ok_or(USAGE)?;
            let code = validate(&mesh, ipv6, explicit_timeout)?;
            std::process::exit(code);
        }
        "connect" => {
            let from = take(&mut args, "--from").pop();
            let mark = take(&mut args, "--mark").pop();
            let bind = take(&mut args, "--bind").pop();
            let addr: SocketAddr = num(args.first().ok_or(USAGE)?, "address")?;
            let mut s = match (from, bind) {
                (None, Some(b)) => bound_connect(addr, num(&b, "bind address")?, timeout)?,
                (None, None) => TcpStream::connect_timeout(&addr, timeout)
                    .map_err(|e| format!("connect {addr}: {e}"))?,
                (Some(src), _) => transparent_connect(
                    addr,
                    num(&src, "source address")?,
                    mark.map(|m| num(&m, "mark")).transpose()?,
                    timeout,
                )?,
            };
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(&mut s)
                .read_line(&mut line)
                .map_err(|e| format!("read from {addr}: {e}"))?;
            if line.is_empty() {
                return Err(format!("{addr} closed without answering"));
            }
            print!("{line}");
            Ok(())
        }
        "udp" => {
            let addr: SocketAddr = num(args.first().ok_or(USAGE)?, "address")?;
            let from_port: u16 = match take(&mut args, "--from-port").pop() {
                Some(p) => num(&p, "port")?,
                None => 0,
            };
            let bind: SocketAddr = match addr {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, from_port).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, from_port).into(),
            };
            let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.send_to(b"query\n", addr)
                .map_err(|e| format!("send to {addr}: {e}"))?;
            let mut buf = [0u8; 1500];
            let (n, from) = s
                .recv_from(&mut buf)
                .map_err(|e| format!("no answer from {addr}: {e}"))?;
            println!(
                "{} from={from}",
                String::from_utf8_lossy(&buf[..n]).trim_end()
            );
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

/// Connects from a source address that need not be local (`IP_TRANSPARENT`), optionally
/// with a socket mark: what a proxy preserving the client's address (Istio's original_src)
/// does. Needs CAP_NET_ADMIN.
fn transparent_connect(
    to: SocketAddr,
    from: IpAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<TcpStream, String> {
    connect_from(to, from, true, mark, timeout)
}

/// Connects from a local address bound first (port chosen by the kernel).
fn bound_connect(to: SocketAddr, from: IpAddr, timeout: Duration) -> Result<TcpStream, String> {
    connect_from(to, from, false, None, timeout)
}

fn connect_from(
    to: SocketAddr,
    from: IpAddr,
    transparent: bool,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let fd = bound(from, 0, socket::SockType::Stream, transparent)?;
    if let Some(m) = mark {
        socket::setsockopt(&fd, sockopt::Mark, &m).map_err(|e| format!("SO_MARK: {e}"))?;
    }
    let s = TcpStream::from(fd);
    socket::setsockopt(
        &s,
        sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64),
    )
    .map_err(|e| e.to_string())?;
    socket::connect(s.as_raw_fd(), &socket::SockaddrStorage::from(to))
        .map_err(|e| format!("connect {to} from {from}: {e}"))?;
    Ok(s)
}

/// One mesh's validator, as its init container runs it; returns the exit code.
fn validate(mesh: &str, ipv6: bool, timeout: Option<Duration>) -> Result<i32, String> {
    let (lo, passthrough) = if ipv6 {
        (
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
        )
    };
    let deadline = |d: u64| std::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(d));
    match mesh {
        // tools/istio-iptables/pkg/validation: listeners on the capture ports, a dial to
        // 127.0.0.6:15002 once a second; the accepted connection's SO_ORIGINAL_DST port must
        // be 15002.
        "istio" => {
            let (tx, rx) = std::sync::mpsc::channel();
            for port in [15001u16, 15006] {
                let l = listener(lo, port, false)?;
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for c in l.incoming().flatten() {
                        let _ = tx.send(original_dst(&c, false));
                    }
                });
            }
            let until = deadline(5);
            while std::time::Instant::now() < until {
                let _ = bound_connect(
                    SocketAddr::new(passthrough, 15002),
                    lo,
                    Duration::from_secs(1),
                );
                if let Ok(orig) = rx.recv_timeout(Duration::from_secs(1))
                    && orig.rsplit(':').next() == Some("15002")
                {
                    println!("istio validation passed: original destination {orig}");
                    return Ok(0);
                }
            }
            eprintln!("istio validation failed: no redirected connection to port 15002");
            Ok(126)
        }
        // linkerd2-proxy-init validator: serve a token on :4140, dial 1.1.1.1:20001 (a
        // non-local address), and read the token back through the redirect.
        "linkerd" => {
            let any = if ipv6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            };
            let token = format!("mesh-redirect-validator-{}", std::process::id());
            let l = listener(any, 4140, false)?;
            let t = token.clone();
            std::thread::spawn(move || {
                for mut c in l.incoming().flatten() {
                    let _ = writeln!(c, "{t}");
                }
            });
            let target: SocketAddr = if ipv6 {
                "[fd00::1]:20001".parse().map_err(|_| "addr")?
            } else {
                "1.1.1.1:20001".parse().map_err(|_| "addr")?
            };
            let until = deadline(10);
            while std::time::Instant::now() < until {
                if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut line = String::new();
                    let _ = BufReader::new(&mut s).read_line(&mut line);
                    if line.trim() == token {
                        println!("linkerd validation passed");
                        return Ok(0);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("linkerd validation failed: {target} did not reach :4140");
            Ok(95)
        }
        // kuma's transparent-proxy validator: a server on localhost at the inbound port, a
        // dial from localhost to the passthrough address at a random port that only the
        // proxy's loopback rule sends to the inbound port.
        "kuma" => {
            let l = listener(lo, 15006, false)?;
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for c in l.incoming().flatten() {
                    let _ = tx.send(original_dst(&c, false));
                }
            });
            let port = 20000 + (std::process::id() % 10000) as u16;
            let until = deadline(5);
            while std::time::Instant::now() < until {
                if bound_connect(
                    SocketAddr::new(passthrough, port),
                    lo,
                    Duration::from_secs(1),
                )
                .is_ok()
                    && let Ok(orig) = rx.recv_timeout(Duration::from_secs(1))
                {
                    println!("kuma validation passed: original destination {orig}");
                    return Ok(0);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("kuma validation failed: {passthrough}:{port} did not reach 15006");
            Ok(1)
        }
        other => Err(format!("unknown mesh {other:?} (istio, linkerd, kuma)")),
    }
}

/// The original destination of an accepted connection.
fn original_dst(s: &TcpStream, transparent: bool) -> String {
    if transparent {
        return s
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "-".into());
    }
    match s.local_addr() {
        Ok(SocketAddr::V4(_)) => socket::getsockopt(&s.as_fd(), sockopt::OriginalDst)
            .map(|a| {
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                SocketAddr::from((ip, u16::from_be(a.sin_port))).to_string()
            })
            .unwrap_or_else(|_| "-".into()),
        Ok(SocketAddr::V6(_)) => socket::getsockopt(&s.as_fd(), sockopt::Ip6tOriginalDst)
            .map(|a| {
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                format!("[{ip}]:{}", u16::from_be(a.sin6_port))
            })
            .unwrap_or_else(|_| "-".into()),
        Err(_) => "-".into(),
    }
}

/// A bound socket; IPv6 ones are IPv6-only, so an IPv4 and an IPv6 socket share a port.
fn bound(
    ip: IpAddr,
    port: u16,
    ty: socket::SockType,
    transparent: bool,
) -> Result<OwnedFd, String> {
    use socket::{AddressFamily, SockFlag, SockaddrStorage};
    let fam = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(fam, ty, SockFlag::SOCK_CLOEXEC, None).map_err(|e| e.to_string())?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| e.to_string())?;
    if ip.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(|e| e.to_string())?;
    }
    if transparent {
        // Linux keeps one transparent flag per socket; IP_TRANSPARENT sets it for IPv6 too.
        socket::setsockopt(&fd, sockopt::IpTransparent, &true)
            .map_err(|e| format!("IP_TRANSPARENT: {e}"))?;
    }
    let addr = SockaddrStorage::from(SocketAddr::new(ip, port));
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| format!("bind {ip} port {port}: {e}"))?;
    Ok(fd)
}

fn listener(ip: IpAddr, port: u16, transparent: bool) -> Result<TcpListener, String> {
    let fd = bound(ip, port, socket::SockType::Stream, transparent)?;
    socket::listen(&fd, socket::Backlog::new(128).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    Ok(TcpListener::from(fd))
}

fn serve(mut args: Vec<String>) -> Result<(), String> {
    let name = take(&mut args, "--name")
        .pop()
        .unwrap_or_else(|| "server".into());
    let transparent = take_bool(&mut args, "--transparent");
    // Like Istio's DNS proxy: listen on localhost only (a redirect in OUTPUT lands there, and
    // UDP answers then leave from the address the conntrack entry expects).
    let loopback = take_bool(&mut args, "--loopback");
    let (any4, any6) = if loopback {
        (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        )
    };
    let ports: Vec<u16> = take(&mut args, "--port")
        .iter()
        .map(|p| num(p, "port"))
        .collect::<Result<_, _>>()?;
    let udp: Vec<u16> = take(&mut args, "--udp")
        .iter()
        .map(|p| num(p, "port"))
        .collect::<Result<_, _>>()?;
    let mut threads = Vec::new();
    for &port in &ports {
        // IPv6 may be absent (no address yet, or disabled); IPv4 must work.
        let v6 = listener(any6, port, transparent);
        for l in [Some(listener(any4, port, transparent)?), v6.ok()]
            .into_iter()
            .flatten()
        {
            let name = name.clone();
            threads.push(std::thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    let line = format!(
                        "{name} port={} orig={} peer={}\n",
                        conn.local_addr().map(|a| a.port()).unwrap_or(0),
                        original_dst(&conn, transparent),
                        conn.peer_addr()
                            .map(|a| a.to_string())
                            .unwrap_or_else(|_| "-".into()),
                    );
                    let mut conn = conn;
                    let _ = conn.write_all(line.as_bytes());
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                    // Drain so the client sees a clean close.
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = conn.read(&mut [0u8; 64]);
                }
            }));
        }
    }
    for &port in &udp {
        for ip in [any4, any6] {
            let s = match bound(ip, port, socket::SockType::Datagram, false) {
                Ok(fd) => UdpSocket::from(fd),
                Err(e) if ip.is_ipv4() => return Err(e),
                Err(_) => continue,
            };
            let name = name.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    let reply = format!(
                        "{name} udp-port={port} got={}",
                        String::from_utf8_lossy(&buf[..n]).trim_end()
                    );
                    let _ = s.send_to(reply.as_bytes(), from);
                }
            }));
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
