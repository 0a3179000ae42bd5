//! Annotation value syntaxes: booleans, port lists (with or without ranges), CIDR lists,
//! interface names. Pure; every error is code 100 naming the annotation and the value.

use crate::protocol::{CniError, code, truncate, valid_ifname};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The error for a malformed annotation: code 100, naming the annotation and the value.
pub fn bad(name: &str, value: &str, why: &str) -> CniError {
    CniError::new(
        code::BAD_ANNOTATION,
        format!(
            "invalid pod annotation {name}={:?}: {why}",
            truncate(value, 200)
        ),
    )
}

/// Go's `strconv.ParseBool`, exactly (no trimming, no other spellings): `None` when it would
/// fail to parse.
pub fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A boolean annotation of ours (Go's spellings), or code 100.
pub fn boolean(name: &str, v: &str) -> Result<bool, CniError> {
    go_bool(v).ok_or_else(|| bad(name, v, "must be true or false"))
}

/// Comma-separated items with surrounding spaces trimmed and empty items dropped (`"80, 443,"`
/// is two ports).
pub fn items(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Whether the whole value is `*` (spaces around it allowed).
pub fn is_star(v: &str) -> bool {
    v.trim() == "*"
}

/// A set of TCP/UDP ports as sorted, merged, inclusive ranges (a single port is `(p, p)`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports(Vec<(u16, u16)>);

impl Ports {
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u16, u16)>) -> Ports {
        let mut v: Vec<(u16, u16)> = ranges.into_iter().collect();
        v.sort();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some(last) if a as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Ports(out)
    }

    pub fn of(ports: &[u16]) -> Ports {
        Ports::from_ranges(ports.iter().map(|&p| (p, p)))
    }

    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, p: u16) -> bool {
        self.0.iter().any(|&(a, b)| a <= p && p <= b)
    }

    /// How many ports in all.
    pub fn count(&self) -> u32 {
        self.0.iter().map(|&(a, b)| (b - a) as u32 + 1).sum()
    }

    pub fn union(&self, other: &Ports) -> Ports {
        Ports::from_ranges(self.0.iter().chain(&other.0).copied())
    }

    /// The ports one by one (for small sets).
    pub fn singles(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().flat_map(|&(a, b)| a..=b)
    }
}

fn port(name: &str, v: &str, item: &str) -> Result<u16, CniError> {
    match item.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ if item == "*" => Err(bad(name, v, "'*' is not allowed in this list")),
        _ => Err(bad(
            name,
            v,
            &format!("{:?} is not a port number 1-65535", truncate(item, 40)),
        )),
    }
}

/// A port list: single ports, and with `ranges` also `LOW-HIGH`.
pub fn ports(name: &str, v: &str, ranges: bool) -> Result<Ports, CniError> {
    let parsed = items(v)
        .map(|item| match item.split_once('-') {
            Some((lo, hi)) if ranges => {
                let (lo, hi) = (port(name, v, lo.trim())?, port(name, v, hi.trim())?);
                if lo > hi {
                    return Err(bad(
                        name,
                        v,
                        &format!("range {item:?} ends below its start"),
                    ));
                }
                Ok((lo, hi))
            }
            _ => port(name, v, item).map(|p| (p, p)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Ports::from_ranges(parsed))
}

/// Canonical CIDRs (host bits cleared), sorted and deduplicated, per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl Cidrs {
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn push(&mut self, net: IpNet) {
        match net.trunc() {
            IpNet::V4(n) => self.v4.push(n),
            IpNet::V6(n) => self.v6.push(n),
        }
    }

    fn normalize(&mut self) {
        self.v4.sort();
        self.v4.dedup();
        self.v6.sort();
        self.v6.dedup();
    }
}

/// A parsed CIDR list and whether any item's address (as written) is a loopback address, which
/// is what Istio's `HasLoopBackIP` looks at.
#[derive(Debug)]
pub struct CidrList {
    pub cidrs: Cidrs,
    pub has_loopback: bool,
}

/// One address or CIDR: a bare address is a /32 or /128.
pub fn cidr(name: &str, v: &str, item: &str) -> Result<IpNet, CniError> {
    if item == "*" {
        return Err(bad(
            name,
            v,
            "'*' is allowed only as the whole value of an include list",
        ));
    }
    item.parse::<IpNet>()
        .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            bad(
                name,
                v,
                &format!(
                    "{:?} is not an IPv4 or IPv6 address or CIDR",
                    truncate(item, 60)
                ),
            )
        })
}

/// A CIDR list (`*` refused: callers that accept it check the whole value first); host bits
/// are cleared (`10.1.2.3/8` is `10.0.0.0/8`, as iptables would apply it).
pub fn cidrs(name: &str, v: &str) -> Result<CidrList, CniError> {
    let mut out = Cidrs::default();
    let mut has_loopback = false;
    for item in items(v) {
        let net = cidr(name, v, item)?;
        has_loopback |= net.addr().is_loopback();
        out.push(net);
    }
    out.normalize();
    Ok(CidrList {
        cidrs: out,
        has_loopback,
    })
}

/// Interface names, each valid for the kernel; a trailing `+` is iptables' prefix wildcard
/// (`veth+`: every name starting with `veth`, as `-i veth+` means in Istio's rules).
pub fn ifnames(name: &str, v: &str) -> Result<BTreeSet<String>, CniError> {
    items(v)
        .map(|n| {
            let base = n.strip_suffix('+').unwrap_or(n);
            let check = if base.is_empty() { "x" } else { base };
            if base.contains('+') {
                return Err(bad(
                    name,
                    v,
                    &format!("{n:?}: '+' is a wildcard only at the end of a name"),
                ));
            }
            valid_ifname(check)
                .map(|()| n.to_string())
                .map_err(|why| bad(name, v, &format!("{n:?} {why}")))
        })
        .collect()
}

/// A uid or gid as Go's `strconv.Atoi` reads it (an optional sign, then digits).
pub fn go_int(name: &str, v: &str) -> Result<i64, CniError> {
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(name, v, "must be an integer"));
    }
    v.parse::<i64>()
        .map_err(|_| bad(name, v, "must be an integer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_bool_is_exact() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(go_bool(t), Some(true), "{t}");
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(go_bool(f), Some(false), "{f}");
        }
        for x in ["fALSE", " false ", "no", "yes", "", "tRUE"] {
            assert_eq!(go_bool(x), None, "{x:?}");
        }
    }

    #[test]
    fn port_lists_and_ranges() {
        let p = ports("a", " 80, 8080 ,80,", false).unwrap();
        assert_eq!(p.ranges(), &[(80, 80), (8080, 8080)]);
        assert!(ports("a", "5000-5010", false).is_err(), "no ranges here");
        let p = ports("a", "5000-5010, 5011, 22, 1-1", true).unwrap();
        assert_eq!(p.ranges(), &[(1, 1), (22, 22), (5000, 5011)]);
        assert_eq!(p.count(), 14);
        assert!(p.contains(5005) && !p.contains(5012));
        for bad in ["10-5", "0-5", "1-65536", "1-2-3", "-5", "a-b", "*"] {
            assert_eq!(ports("a", bad, true).unwrap_err().code, 100, "{bad}");
        }
        assert_eq!(Ports::of(&[1, 2, 3]).ranges(), &[(1, 3)]);
    }

    #[test]
    fn cidrs_loopback_and_star() {
        let c = cidrs("a", "127.0.0.0/8, 10.0.0.1").unwrap();
        assert!(c.has_loopback);
        assert_eq!(c.cidrs.v4.len(), 2);
        assert!(cidrs("a", "::1/128").unwrap().has_loopback);
        assert!(!cidrs("a", "0.0.0.0/0,::/0").unwrap().has_loopback);
        // As written: 127.1.2.3/1 is a loopback address, though the network is 0.0.0.0/1.
        assert!(cidrs("a", "127.1.2.3/1").unwrap().has_loopback);
        assert_eq!(cidrs("a", "10.0.0.0/8,*").unwrap_err().code, 100);
    }

    #[test]
    fn interface_names_and_wildcards() {
        let n = ifnames("a", "eth1, veth+, +").unwrap();
        assert!(n.contains("veth+") && n.contains("+") && n.contains("eth1"));
        for bad in ["ve+th", "a/b", "waytoolonginterfacename0+", "++"] {
            assert_eq!(ifnames("a", bad).unwrap_err().code, 100, "{bad}");
        }
    }

    #[test]
    fn go_ints() {
        assert_eq!(go_int("a", "2102").unwrap(), 2102);
        assert_eq!(go_int("a", "+5").unwrap(), 5);
        assert_eq!(go_int("a", "-1").unwrap(), -1);
        for bad in [" 1", "1 ", "", "x", "1.5", "99999999999999999999"] {
            assert!(go_int("a", bad).is_err(), "{bad:?}");
        }
    }
}
