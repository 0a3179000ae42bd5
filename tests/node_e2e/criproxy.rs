//! A byte-for-byte forwarder in front of the node's real containerd CRI socket, that can make
//! the runtime "go away" or "pause" at a precise point of the agent's conversation: it counts
//! the client's requests on a connection (HTTP/2 HEADERS frames; gRPC sends one per call) and
//! acts on the n-th. Everything it forwards is containerd's own answer; nothing is made up.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What to do at the n-th request of the next connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Drop the connection instead of forwarding it, and refuse connections for a while: the
    /// runtime went away.
    Cut { refuse_for: Duration },
    /// Hold it until [`CriProxy::release`]: the runtime is slow to answer.
    Hold,
}

#[derive(Default)]
struct Ctl {
    armed: Option<(usize, Fault)>,
    refuse_until: Option<Instant>,
    holding: bool,
    released: bool,
    /// The fault fired.
    fired: bool,
}

pub struct CriProxy {
    pub socket: PathBuf,
    ctl: Arc<(Mutex<Ctl>, Condvar)>,
    stop: Arc<AtomicBool>,
}

const PREFACE: usize = 24;

impl CriProxy {
    pub fn start(socket: &Path, upstream: &Path) -> CriProxy {
        let _ = std::fs::remove_file(socket);
        let l = UnixListener::bind(socket).expect("bind the CRI proxy");
        l.set_nonblocking(true).unwrap();
        let ctl = Arc::new((Mutex::new(Ctl::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s, up) = (ctl.clone(), stop.clone(), upstream.to_path_buf());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let client = match l.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                let (arm, refusing) = {
                    let mut g = c.0.lock().unwrap();
                    let refusing = g.refuse_until.is_some_and(|t| Instant::now() < t);
                    (if refusing { None } else { g.armed.take() }, refusing)
                };
                if refusing {
                    drop(client);
                    continue;
                }
                let Ok(server) = UnixStream::connect(&up) else {
                    continue;
                };
                let c = c.clone();
                std::thread::spawn(move || pipe(client, server, arm, c));
            }
        });
        CriProxy {
            socket: socket.to_path_buf(),
            ctl,
            stop,
        }
    }

    /// Acts on the `n`-th request (1-based) of the next connection.
    pub fn arm(&self, n: usize, f: Fault) {
        let mut g = self.ctl.0.lock().unwrap();
        g.armed = Some((n, f));
        g.fired = false;
        g.released = false;
    }

    /// Waits until the armed fault fired (a held request is then waiting).
    pub fn wait_fired(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.ctl.0.lock().unwrap().fired {
            assert!(
                Instant::now() < deadline,
                "the CRI proxy's fault never fired"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets a held request through.
    pub fn release(&self) {
        let (m, cv) = &*self.ctl;
        m.lock().unwrap().released = true;
        cv.notify_all();
    }
}

impl Drop for CriProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Forwards one connection both ways; the client's side frame by frame.
fn pipe(
    mut client: UnixStream,
    mut server: UnixStream,
    arm: Option<(usize, Fault)>,
    ctl: Arc<(Mutex<Ctl>, Condvar)>,
) {
    let (mut c2, mut s2) = match (client.try_clone(), server.try_clone()) {
        (Ok(c), Ok(s)) => (c, s),
        _ => return,
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(std::net::Shutdown::Both);
    });
    let mut preface = [0u8; PREFACE];
    if client.read_exact(&mut preface).is_err() || server.write_all(&preface).is_err() {
        return;
    }
    let mut requests = 0;
    loop {
        let mut head = [0u8; 9];
        if client.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if client.read_exact(&mut payload).is_err() {
            break;
        }
        if head[3] == 1 {
            requests += 1;
            if let Some((n, fault)) = arm
                && requests == n
            {
                let (m, cv) = &*ctl;
                let mut g = m.lock().unwrap();
                g.fired = true;
                match fault {
                    Fault::Cut { refuse_for } => {
                        g.refuse_until = Some(Instant::now() + refuse_for);
                        drop(g);
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        let _ = server.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    Fault::Hold => {
                        g.holding = true;
                        while !g.released {
                            g = cv.wait(g).unwrap();
                        }
                        g.holding = false;
                    }
                }
            }
        }
        if server.write_all(&head).is_err() || server.write_all(&payload).is_err() {
            break;
        }
    }
    let _ = server.shutdown(std::net::Shutdown::Both);
}
