//! Kernel: compiles a [`Ruleset`] to nftables netlink objects and applies, deletes or checks
//! table `inet mesh_redirect` over one netfilter socket.
//!
//! The socket belongs to the network namespace it was opened in; the caller opens it inside the
//! pod's namespace (see `netns`). Installing is one batch, so the kernel commits all of it or
//! none of it: into a namespace without the table, the table created exclusively with
//! everything in it; over an existing one, add table, delete it, add the new one.
//!
//! Here: the [`Kernel`] (its sockets, installing, deleting, the routing beside the table);
//! `compile` turns a ruleset into nftnl objects and batches, `diff` compares the kernel's
//! table with a ruleset (CHECK). The FFI they stand on is `crate::ffi`.

mod compile;
mod diff;

pub use compile::encode_elems;
pub use diff::{Drift, TABLE_F_OWNER};

use crate::ffi;
use crate::policy::Passthrough6;
use crate::route::{self, Obj, Routing, Rtnl};
use crate::ruleset::{Ruleset, TABLE};
use compile::{Built, FAMILY, Replace, delete_batch, replace_batch};
use nftnl::nftnl_sys::libc;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(io::Error),
    #[error("kernel refused the ruleset at {what}: {err}")]
    Refused { what: String, err: io::Error },
    #[error("netlink conversation with the kernel failed: {0}")]
    Io(#[from] io::Error),
}

impl KernelError {
    /// True for the errors worth retrying (a busy or slow kernel), CNI code 11.
    pub fn is_transient(&self) -> bool {
        let e = match self {
            KernelError::Refused { err, .. } | KernelError::Io(err) | KernelError::Socket(err) => {
                err
            }
        };
        matches!(
            e.raw_os_error(),
            Some(libc::EAGAIN | libc::EBUSY | libc::EINTR | libc::ENOBUFS)
        )
    }
}

/// A mesh's own capture rules found in a pod's namespace (its init container's or its CNI
/// plugin's): the mesh, and what showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignCapture {
    pub mesh: &'static str,
    pub evidence: String,
}

/// The netfilter socket of one network namespace, and its rtnetlink socket when TPROXY's
/// policy routing or `::6` on `lo` is involved.
pub struct Kernel {
    sock: ffi::Socket,
    routing: Option<RoutingSocket>,
    /// The table this socket manages: `mesh_redirect`, or another tool's of its own (the
    /// bypass probe's), so that neither can touch the other's.
    table: &'static str,
}

struct RoutingSocket {
    rtnl: Rtnl,
    /// Whether IPv6 is on in the namespace, if asked (see [`Sockets`]).
    ipv6: Option<bool>,
}

/// A netfilter socket, kept open past its job, for someone who can afford its release.
///
/// Releasing a netfilter socket can wait: nf_tables' netlink notifier flushes the
/// transaction-destroy work, which frees deleted objects only after an RCU grace period (10-15
/// ms on an idle node with lazy RCU). Since Linux 6.14 (fb8286562ecf, in stable kernels since
/// March 2025) that work is per namespace, so only a socket whose own commit deleted something
/// waits: DEL, a re-ADD. Before, it was one global work item, flushed on every release, so any
/// plugin run, an ADD included, could wait for other pods' DELs (docs/PERFORMANCE.md). The
/// commit itself is done either way; only the freeing is pending. A `Linger` lets the plugin
/// hand the socket to the node agent instead of making the runtime wait; dropped, it closes
/// here and waits as before.
#[derive(Debug, Default)]
#[must_use = "dropped, it closes the socket and waits; hand it over instead"]
pub struct Linger(Option<std::os::fd::OwnedFd>);

impl Linger {
    /// The descriptor to hand over.
    pub fn into_fd(self) -> Option<std::os::fd::OwnedFd> {
        self.0
    }
}

/// Which sockets a job opens in the pod's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sockets {
    /// The netfilter socket only.
    Netfilter,
    /// Also rtnetlink, and whether IPv6 is on (read from the namespace's own `/proc` while
    /// inside it: TPROXY's IPv6 rule and route, DEL and CHECK need to know).
    Routing,
    /// Also rtnetlink, without asking about IPv6: installing only `::6` learns it from the
    /// kernel's answer to the add (`EACCES` with IPv6 off), which saves a `/proc` read per ADD.
    RoutingAnswerTells,
}

impl Sockets {
    /// What installing `rs` needs.
    pub fn to_install(rs: &Ruleset) -> Sockets {
        if !rs.needs_rtnetlink() {
            Sockets::Netfilter
        } else if rs.routing.is_some() {
            Sockets::Routing
        } else {
            Sockets::RoutingAnswerTells
        }
    }

    /// What comparing the kernel with `rs` needs.
    pub fn to_compare(rs: &Ruleset) -> Sockets {
        if rs.needs_rtnetlink() {
            Sockets::Routing
        } else {
            Sockets::Netfilter
        }
    }
}

/// The errors an IPv6 address add gets when IPv6 is off in the namespace: disabled on the
/// device (`EACCES`) or not in the kernel at all (`EAFNOSUPPORT`).
fn ipv6_is_off(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EAFNOSUPPORT))
}

/// What rtnetlink objects a ruleset wants beside its table. `ipv6` unknown: `::6` is tried.
fn rtnl_objects(rs: &Ruleset, ipv6: Option<bool>) -> (Routing, Vec<Obj>) {
    let r = rs.routing.unwrap_or_default();
    let mut objs = match rs.routing {
        Some(r) => r.objects(ipv6.unwrap_or(false)),
        None => Vec::new(),
    };
    let want6 = match rs.passthrough6 {
        Passthrough6::No => false,
        Passthrough6::Yes => true,
        Passthrough6::IfIpv6Enabled => ipv6 != Some(false),
    };
    if want6 {
        objs.push(Obj::Passthrough6);
    }
    (r, objs)
}

impl Kernel {
    /// Opens the netfilter socket in the calling thread's current network namespace.
    pub fn open() -> Result<Kernel, KernelError> {
        Kernel::open_table(TABLE)
    }

    /// Like [`Kernel::open`], for table `inet NAME` instead of `inet mesh_redirect`.
    pub fn open_table(name: &'static str) -> Result<Kernel, KernelError> {
        Ok(Kernel {
            sock: ffi::Socket::open().map_err(KernelError::Socket)?,
            routing: None,
            table: name,
        })
    }

    /// Opens `which` sockets in the calling thread's current network namespace.
    pub fn open_sockets(which: Sockets) -> Result<Kernel, KernelError> {
        let mut k = Kernel::open()?;
        if which != Sockets::Netfilter {
            k.routing = Some(RoutingSocket {
                rtnl: Rtnl::open().map_err(KernelError::Socket)?,
                ipv6: (which == Sockets::Routing).then(route::ipv6_enabled),
            });
        }
        Ok(k)
    }

    fn routing_socket(&mut self) -> Result<&mut RoutingSocket, KernelError> {
        self.routing.as_mut().ok_or_else(|| {
            KernelError::Socket(io::Error::other(
                "no rtnetlink socket: open the kernel with routing",
            ))
        })
    }

    /// Adds the rtnetlink objects; on failure removes the ones this call added.
    /// Returns the ones it added (for rolling back if what follows fails).
    fn add_routing(&mut self, rs: &Ruleset) -> Result<(Routing, Vec<Obj>), KernelError> {
        let sock = self.routing_socket()?;
        let (r, objs) = rtnl_objects(rs, sock.ipv6);
        let mut added = Vec::new();
        for o in objs {
            match sock.rtnl.add(&r, o) {
                Ok(true) => added.push(o),
                Ok(false) => {}
                // Asked without knowing: IPv6 is off, so there is no `::6` to add.
                Err(err)
                    if o == Obj::Passthrough6
                        && rs.passthrough6 == Passthrough6::IfIpv6Enabled
                        && ipv6_is_off(&err) =>
                {
                    sock.ipv6 = Some(false);
                }
                Err(err) => {
                    for a in added.iter().rev() {
                        let _ = sock.rtnl.del(&r, *a);
                    }
                    let mut what = r.describe(o);
                    if err.raw_os_error() == Some(libc::ENETDOWN) {
                        what.push_str(" (lo is down in the pod's namespace: the runtime's loopback plugin must run first)");
                    }
                    return Err(KernelError::Refused { what, err });
                }
            }
        }
        Ok((r, added))
    }

    /// Best effort, newest first: used to undo, where the first error is already reported.
    fn remove_routing(&mut self, r: &Routing, objs: &[Obj]) {
        if let Some(rs) = self.routing.as_mut() {
            for o in objs.iter().rev() {
                let _ = rs.rtnl.del(r, *o);
            }
        }
    }

    /// Closes the sockets, keeping a second descriptor of the netfilter socket (see
    /// [`Linger`]): this close is then immediate. Without one (no descriptor left) it waits
    /// here, as it always did.
    pub fn close_lingering(self) -> Linger {
        Linger(self.sock.dup_fd().ok())
    }

    fn send(&mut self, built: &Built) -> Result<(), KernelError> {
        let errors = self
            .sock
            .send_batch(&built.batch, built.message_seqs().end - 1)?;
        match errors.into_iter().next() {
            None => Ok(()),
            Some(e) => Err(KernelError::Refused {
                what: built.describe(e.seq),
                err: e.err,
            }),
        }
    }

    /// Installs `rs` as table `inet mesh_redirect`, replacing any previous one, atomically;
    /// with TPROXY, its policy routing first. One logical transaction: if the table is refused,
    /// the routing this call added is removed again, and if the routing is refused, the table
    /// is not touched.
    pub fn replace(&mut self, rs: &Ruleset) -> Result<(), KernelError> {
        let added = if rs.needs_rtnetlink() {
            Some(self.add_routing(rs)?)
        } else {
            None
        };
        let res = self.install(rs);
        if res.is_err()
            && let Some((r, objs)) = &added
        {
            self.remove_routing(r, objs);
        }
        res
    }

    /// The table: created fresh when there is none (the cheap commit), else replaced. If a
    /// table appears between the question and the batch (a concurrent ADD), the exclusive
    /// create fails as a whole and the replace runs instead.
    fn install(&mut self, rs: &Ruleset) -> Result<(), KernelError> {
        if !self.table_exists()? {
            match self.create(rs) {
                Err(KernelError::Refused { err, .. })
                    if err.raw_os_error() == Some(libc::EEXIST) => {}
                other => return other,
            }
        }
        self.send(&replace_batch(rs, Replace::Replace, self.table))
    }

    /// Creates the table with `rs` in it, exclusively: refused with `EEXIST` (and nothing
    /// changed) when the table is already there. No routing.
    pub fn create(&mut self, rs: &Ruleset) -> Result<(), KernelError> {
        self.send(&replace_batch(rs, Replace::Create, self.table))
    }

    /// Deletes the table if it exists, `routing`'s objects, and `::6` on `lo` if it carries
    /// our mark (we added it). Idempotent. Returns whether there was a table.
    ///
    /// Asks first: a commit, even an empty-handed one, makes closing the socket wait for an
    /// RCU grace period (the kernel flushes its transaction-destroy work on socket release),
    /// which DEL of an uncaptured pod need not pay.
    pub fn delete(&mut self, routing: Option<&Routing>) -> Result<bool, KernelError> {
        let existed = self.table_exists()?;
        if existed {
            self.send(&delete_batch(self.table))?;
        }
        if self.routing.is_some() {
            let rs = self.routing_socket()?;
            let ipv6 = *rs.ipv6.get_or_insert(true);
            let objs = routing.map(|r| r.objects(ipv6)).unwrap_or_default();
            let r = routing.copied().unwrap_or_default();
            for o in objs.into_iter().rev() {
                rs.rtnl.del(&r, o).map_err(|err| KernelError::Refused {
                    what: format!("removing {}", r.describe(o)),
                    err,
                })?;
            }
            if ipv6 && rs.rtnl.passthrough6()? == Some(true) {
                rs.rtnl
                    .del(&r, Obj::Passthrough6)
                    .map_err(|err| KernelError::Refused {
                        what: format!("removing {}", route::describe_passthrough6()),
                        err,
                    })?;
            }
        }
        Ok(existed)
    }

    /// A mesh's own capture rules in this namespace, if any: iptables(-nft) chains of
    /// istio-iptables (`ISTIO_*`), linkerd2-proxy-init (`PROXY_INIT_*`) or Kuma (`KUMA_MESH_*`),
    /// or istio-cni's nftables tables (`istio-proxy-*`). Legacy iptables is not visible over
    /// nftables netlink; the caller checks it separately.
    pub fn foreign_capture(&mut self) -> Result<Option<ForeignCapture>, KernelError> {
        for (table, chain) in self.sock.all_chains()? {
            if table == self.table {
                continue;
            }
            let mesh = if chain.starts_with("ISTIO_") || table.starts_with("istio-proxy") {
                "istio"
            } else if chain.starts_with("PROXY_INIT_") {
                "linkerd"
            } else if chain.starts_with("KUMA_MESH") {
                "kuma"
            } else {
                continue;
            };
            return Ok(Some(ForeignCapture {
                mesh,
                evidence: format!("chain {chain} in table {table}"),
            }));
        }
        Ok(None)
    }

    pub fn table_exists(&mut self) -> Result<bool, KernelError> {
        Ok(self.sock.table_exists(FAMILY as u16, self.table)?)
    }
}
