//! Policy routing for TPROXY, over rtnetlink, inside the pod's namespace:
//!
//!   ip rule add fwmark 1337 lookup 133                (IPv4 and IPv6)
//!   ip route add local default dev lo table 133       (IPv4 and IPv6)
//!
//! Packets TPROXY marked are routed to the local stack through table 133, whatever their
//! destination. And, in both modes when the pod has IPv6 (istio-cni's `ConfigureRoutes`):
//!
//!   ip -6 addr add ::6/128 dev lo proto 0x6d          (the proxy's IPv6 passthrough source)
//!
//! marked with our address protocol so that DEL removes it only if we added it. Messages are
//! built and parsed here byte by byte: no `unsafe`, no `ip` binary.
//!
//! Also the few additions the bypass probe needs to make its scratch namespace routable (`lo`
//! up, an address, default routes: `Rtnl::link_up` and after).

use crate::ffi::netlink::{self, MsgBuf};
pub use crate::ruleset::Routing;
use std::io;
use std::net::{IpAddr, Ipv6Addr};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;

const IFF_UP: u32 = 1;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const RT_TABLE_MAIN: u8 = 254;
const RT_SCOPE_LINK: u8 = 253;
const RT_SCOPE_HOST: u8 = 254;
const RTPROT_STATIC: u8 = 4;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_PROTO: u16 = 11;
const IFA_F_NODAD: u8 = 0x02;
/// Our `IFA_PROTO` (Linux >= 6.1 keeps it; older kernels ignore it, and then DEL never
/// removes `::6`, which is safe).
pub const ADDR_PROTO: u8 = 0x6d;

/// Priority of our ip rules: before the `main` table (32766), like `ip rule add` would pick.
const RULE_PRIORITY: u32 = 32765;

/// The proxy's IPv6 inbound-passthrough source address.
pub const PASSTHROUGH6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// One routing object we manage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obj {
    /// `ip [-6] rule add fwmark MARK lookup TABLE`
    Rule { v6: bool },
    /// `ip [-6] route add local default dev lo table TABLE`
    Route { v6: bool },
    /// `ip -6 addr add ::6/128 dev lo proto 0x6d`
    Passthrough6,
}

// The rtnetlink side of the plan's TPROXY routing (the type itself is the ruleset's).
impl Routing {
    /// The policy routing objects for this namespace, in the order they are added (removed
    /// in reverse).
    pub fn objects(&self, ipv6: bool) -> Vec<Obj> {
        let mut v = vec![Obj::Rule { v6: false }, Obj::Route { v6: false }];
        if ipv6 {
            v.extend([Obj::Rule { v6: true }, Obj::Route { v6: true }]);
        }
        v
    }

    pub fn describe(&self, o: Obj) -> String {
        let six = |v6: bool| if v6 { "-6 " } else { "" };
        match o {
            Obj::Rule { v6 } => format!(
                "ip {}rule fwmark {} lookup {}",
                six(v6),
                self.mark,
                self.table
            ),
            Obj::Route { v6 } => format!(
                "ip {}route local default dev lo table {}",
                six(v6),
                self.table
            ),
            Obj::Passthrough6 => describe_passthrough6(),
        }
    }
}

/// How `::6` on `lo` is named in messages.
pub fn describe_passthrough6() -> String {
    "ip -6 addr ::6/128 dev lo".to_string()
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn message(ty: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

/// `struct ifinfomsg { family, pad, u16 type, i32 index, u32 flags, u32 change }`.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&change.to_ne_bytes());
    b
}

fn family(v6: bool) -> u8 {
    if v6 { AF_INET6 } else { AF_INET }
}

/// Netlink attributes of a message body after its fixed header: (type, payload).
fn attrs(body: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = body;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((ty, &rest[4..len]));
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    out
}

fn u32_attr(a: &[(u16, &[u8])], ty: u16) -> Option<u32> {
    a.iter()
        .find(|(t, _)| *t == ty)
        .and_then(|(_, d)| d.get(..4))
        .and_then(|d| d.try_into().ok())
        .map(u32::from_ne_bytes)
}

/// `lo`'s index in every network namespace: the kernel creates it first and checks that it got
/// this index (`LOOPBACK_IFINDEX`; drivers/net/loopback.c stops if not). Known, so no lookup (which
/// would cost another socket and an ioctl per ADD).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// An rtnetlink socket of the namespace it was opened in.
pub struct Rtnl {
    sock: mnl::Socket,
    buf: MsgBuf,
    seq: u32,
    lo: u32,
}

impl Rtnl {
    /// Opens the socket; call inside the target namespace.
    pub fn open() -> io::Result<Rtnl> {
        let sock = mnl::Socket::new(mnl::Bus::Route)?;
        netlink::set_recv_timeout(&sock, 10);
        Ok(Rtnl {
            sock,
            buf: MsgBuf::new(),
            seq: 1,
            lo: LOOPBACK_IFINDEX,
        })
    }

    fn body(&self, r: &Routing, o: Obj, for_add: bool) -> (u16, u16, Vec<u8>) {
        match o {
            Obj::Rule { v6 } => {
                // struct fib_rule_hdr { family, dst_len, src_len, tos, table, res1, res2, action; u32 flags }
                let mut b = vec![family(v6), 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
                attr(&mut b, FRA_FWMARK, &r.mark.to_ne_bytes());
                attr(&mut b, FRA_FWMASK, &u32::MAX.to_ne_bytes());
                attr(&mut b, FRA_TABLE, &r.table.to_ne_bytes());
                if for_add {
                    attr(&mut b, FRA_PRIORITY, &RULE_PRIORITY.to_ne_bytes());
                }
                (RTM_NEWRULE, RTM_DELRULE, b)
            }
            Obj::Route { v6 } => {
                // struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type; u32 flags }
                let table = u8::try_from(r.table).unwrap_or(252); // 252: RT_TABLE_COMPAT
                let mut b = vec![
                    family(v6),
                    0,
                    0,
                    0,
                    table,
                    RTPROT_STATIC,
                    RT_SCOPE_HOST,
                    RTN_LOCAL,
                    0,
                    0,
                    0,
                    0,
                ];
                let zero = if v6 { vec![0u8; 16] } else { vec![0u8; 4] };
                attr(&mut b, RTA_DST, &zero);
                attr(&mut b, RTA_TABLE, &r.table.to_ne_bytes());
                attr(&mut b, RTA_OIF, &self.lo.to_ne_bytes());
                (RTM_NEWROUTE, RTM_DELROUTE, b)
            }
            Obj::Passthrough6 => {
                // struct ifaddrmsg { family, prefixlen, flags, scope; u32 index }
                let mut b = vec![AF_INET6, 128, IFA_F_NODAD, 0];
                b.extend_from_slice(&self.lo.to_ne_bytes());
                attr(&mut b, IFA_LOCAL, &PASSTHROUGH6.octets());
                attr(&mut b, IFA_ADDRESS, &PASSTHROUGH6.octets());
                if for_add {
                    attr(&mut b, IFA_PROTO, &[ADDR_PROTO]);
                }
                (RTM_NEWADDR, RTM_DELADDR, b)
            }
        }
    }

    /// Sends one request and waits for its ACK; returns the errno (0 = done).
    fn request(&mut self, msg: Vec<u8>) -> io::Result<i32> {
        let seq = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
        self.sock.send(&msg)?;
        loop {
            let n = self.sock.recv_raw(self.buf.bytes())?;
            for m in mnl::NlMessages::new(&self.buf.bytes()[..n]) {
                let m = m?;
                if let Some((s, errno)) = ack(m)
                    && s == seq
                {
                    return Ok(errno);
                }
            }
        }
    }

    /// Runs a dump and returns each reply message's body (after the netlink header).
    fn dump(&mut self, ty: u16, body: Vec<u8>) -> io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let seq = self.seq;
        self.sock.send(&message(ty, NLM_F_DUMP, seq, &body))?;
        let mut out = Vec::new();
        loop {
            let n = self.sock.recv_raw(self.buf.bytes())?;
            for m in mnl::NlMessages::new(&self.buf.bytes()[..n]) {
                let m = m?;
                if m.len() < 16 || u32::from_ne_bytes([m[8], m[9], m[10], m[11]]) != seq {
                    continue;
                }
                match u16::from_ne_bytes([m[4], m[5]]) {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = ack(m).map_or(0, |(_, e)| e);
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(errno));
                        }
                        return Ok(out);
                    }
                    _ => out.push(m[16..].to_vec()),
                }
            }
        }
    }

    /// One request that must be ACKed without error.
    fn must(&mut self, ty: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        self.seq += 1;
        match self.request(message(ty, flags | NLM_F_ACK, self.seq, body))? {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// `lo`'s index in this namespace.
    pub fn lo(&self) -> u32 {
        self.lo
    }

    /// `ip link set dev INDEX up`.
    pub fn link_up(&mut self, index: u32) -> io::Result<()> {
        self.must(RTM_NEWLINK, 0, &ifinfomsg(index, IFF_UP, IFF_UP))
    }

    /// `ip addr add ADDR/PREFIX dev INDEX nodad` (no duplicate detection; for when IPv6 can
    /// use it, see `is_local`).
    pub fn add_addr(&mut self, index: u32, addr: IpAddr, prefix: u8) -> io::Result<()> {
        let (fam, bytes) = match addr {
            IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
            IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
        };
        let mut b = vec![fam, prefix, IFA_F_NODAD, 0];
        b.extend_from_slice(&index.to_ne_bytes());
        attr(&mut b, IFA_LOCAL, &bytes);
        attr(&mut b, IFA_ADDRESS, &bytes);
        self.must(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &b)
    }

    /// Whether the kernel delivers `addr` locally: its local route is in. IPv6 adds that
    /// route for a new address (`nodad` or not) from a work queue, a moment after the address;
    /// until then a reply to it is routed away (here: lost, retransmitted a second later).
    pub fn is_local(&mut self, addr: IpAddr) -> io::Result<bool> {
        let (v6, bytes) = match addr {
            IpAddr::V4(a) => (false, a.octets().to_vec()),
            IpAddr::V6(a) => (true, a.octets().to_vec()),
        };
        let full = (bytes.len() * 8) as u8;
        Ok(self
            .dump(
                RTM_GETROUTE,
                vec![family(v6), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            )?
            .iter()
            .any(|b| {
                b.len() >= 12
                    && b[1] == full
                    && b[7] == RTN_LOCAL
                    && attrs(&b[12..])
                        .iter()
                        .any(|(t, d)| *t == RTA_DST && **d == bytes[..])
            }))
    }

    /// `ip [-6] route add default dev INDEX` (on-link: no gateway) in the main table.
    pub fn add_default_route(&mut self, index: u32, v6: bool) -> io::Result<()> {
        let mut b = vec![
            family(v6),
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_STATIC,
            RT_SCOPE_LINK,
            RTN_UNICAST,
            0,
            0,
            0,
            0,
        ];
        attr(&mut b, RTA_OIF, &index.to_ne_bytes());
        self.must(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &b)
    }

    /// Adds `o`; `Ok(false)` when it was already there.
    pub fn add(&mut self, r: &Routing, o: Obj) -> io::Result<bool> {
        // An address answers EEXIST to an exclusive create: one round trip, no dump. Rules do
        // not (the kernel compares only some of their attributes), so they are looked up.
        if o != Obj::Passthrough6 && self.exists(r, o)? {
            return Ok(false);
        }
        let (new, _, body) = self.body(r, o, true);
        self.seq += 1;
        match self.request(message(
            new,
            NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
            self.seq,
            &body,
        ))? {
            0 => Ok(true),
            libc::EEXIST => Ok(false),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Deletes `o`; `Ok(false)` when it was not there.
    pub fn del(&mut self, r: &Routing, o: Obj) -> io::Result<bool> {
        let (_, del, body) = self.body(r, o, false);
        self.seq += 1;
        match self.request(message(del, NLM_F_ACK, self.seq, &body))? {
            0 => Ok(true),
            libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL => Ok(false),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Whether `o` is present, read back from the kernel's dumps.
    pub fn exists(&mut self, r: &Routing, o: Obj) -> io::Result<bool> {
        Ok(match o {
            Obj::Rule { v6 } => self
                .dump(
                    RTM_GETRULE,
                    vec![family(v6), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                )?
                .iter()
                .any(|b| {
                    b.len() >= 12 && b[7] == FR_ACT_TO_TBL && {
                        let a = attrs(&b[12..]);
                        u32_attr(&a, FRA_FWMARK) == Some(r.mark)
                            && u32_attr(&a, FRA_TABLE).unwrap_or(b[4] as u32) == r.table
                    }
                }),
            Obj::Route { v6 } => self
                .dump(
                    RTM_GETROUTE,
                    vec![family(v6), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                )?
                .iter()
                .any(|b| {
                    b.len() >= 12 && b[1] == 0 && b[7] == RTN_LOCAL && {
                        let a = attrs(&b[12..]);
                        u32_attr(&a, RTA_TABLE).unwrap_or(b[4] as u32) == r.table
                            && u32_attr(&a, RTA_OIF) == Some(self.lo)
                    }
                }),
            Obj::Passthrough6 => self.passthrough6()?.is_some(),
        })
    }

    /// `::6/128` on `lo`, if there: `Some(true)` when it carries our protocol mark.
    pub fn passthrough6(&mut self) -> io::Result<Option<bool>> {
        let lo = self.lo;
        Ok(self
            .dump(RTM_GETADDR, vec![AF_INET6, 0, 0, 0, 0, 0, 0, 0])?
            .iter()
            .find(|b| {
                b.len() >= 8
                    && b[1] == 128
                    && u32::from_ne_bytes([b[4], b[5], b[6], b[7]]) == lo
                    && attrs(&b[8..]).iter().any(|(t, d)| {
                        (*t == IFA_ADDRESS || *t == IFA_LOCAL) && *d == PASSTHROUGH6.octets()
                    })
            })
            .map(|b| {
                attrs(&b[8..])
                    .iter()
                    .any(|(t, d)| *t == IFA_PROTO && *d == [ADDR_PROTO])
            }))
    }
}

/// For an `NLMSG_ERROR`: (sequence number it answers, errno; 0 = ACK).
fn ack(m: &[u8]) -> Option<(u32, i32)> {
    if m.len() < 36 || u16::from_ne_bytes([m[4], m[5]]) != NLMSG_ERROR {
        return None;
    }
    let err = i32::from_ne_bytes([m[16], m[17], m[18], m[19]]);
    let seq = u32::from_ne_bytes([m[28], m[29], m[30], m[31]]);
    Some((seq, -err))
}

/// Whether IPv6 is usable in the calling thread's namespace (call inside it).
pub fn ipv6_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .is_ok_and(|s| s.trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_and_pad() {
        let mut b = Vec::new();
        attr(&mut b, FRA_FWMARK, &1337u32.to_ne_bytes());
        attr(&mut b, 99, &[1, 2, 3]);
        attr(&mut b, FRA_TABLE, &133u32.to_ne_bytes());
        assert_eq!(b.len(), 8 + 8 + 8);
        let a = attrs(&b);
        assert_eq!(u32_attr(&a, FRA_FWMARK), Some(1337));
        assert_eq!(u32_attr(&a, FRA_TABLE), Some(133));
        assert_eq!(a[1], (99, &[1u8, 2, 3][..]));
    }

    #[test]
    fn messages_have_the_netlink_header() {
        let m = message(RTM_NEWRULE, NLM_F_ACK, 7, &[0; 12]);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 28);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWRULE);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_ACK | NLM_F_REQUEST);
        assert_eq!(u32::from_ne_bytes([m[8], m[9], m[10], m[11]]), 7);
    }

    #[test]
    fn objects_and_descriptions() {
        let r = Routing {
            mark: 1337,
            table: 133,
        };
        assert_eq!(r.objects(false).len(), 2);
        assert_eq!(r.objects(true).len(), 4);
        assert_eq!(
            r.describe(Obj::Rule { v6: true }),
            "ip -6 rule fwmark 1337 lookup 133"
        );
        // Truncated or garbage input never panics.
        assert!(attrs(&[0xff, 0xff, 1]).is_empty());
        assert_eq!(ack(&[0u8; 10]), None);
    }
}
