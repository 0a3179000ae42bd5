//! Comparing the kernel's table with a plan (CHECK): chains, sets and their elements, rules
//! (as libnftnl renders them, against the plan compiled and rendered the same way), and the
//! routing objects beside the table.

use super::compile::{FAMILY, compile_rule, cstring, encode_elems, make_chain, set_ids};
use super::{Kernel, KernelError, rtnl_objects};
use crate::ffi::{self, Elem};
use crate::nft_text;
use crate::ruleset::{ChainKind, HookPoint, Ruleset};
use nftnl::Table;
use nftnl::nftnl_sys::libc;
use std::collections::BTreeSet;

/// How a namespace's table compares with the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The table's flags, `None` when there is no table.
    pub table_flags: Option<u32>,
    /// What differs, in words (empty: the table is exactly the plan).
    pub differences: Vec<String>,
}

/// `NFT_TABLE_F_OWNER`: the table belongs to one netlink socket, and only it may change it.
pub const TABLE_F_OWNER: u32 = 2;

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.differences.is_empty()
    }

    pub fn table_missing(&self) -> bool {
        self.table_flags.is_none()
    }

    /// Someone in the namespace holds the table as its owner: the kernel refuses every change
    /// from anyone else until that socket closes.
    pub fn owned_by_another(&self) -> bool {
        self.table_flags.is_some_and(|f| f & TABLE_F_OWNER != 0)
    }
}

impl Kernel {
    /// Compares the kernel's table with `rs`: what differs (nothing: identical).
    pub fn diff(&mut self, rs: &Ruleset) -> Result<Drift, KernelError> {
        let fam = FAMILY as u16;
        let table = self.table;
        let Some(flags) = self.sock.table_flags(fam, table)? else {
            return Ok(Drift {
                table_flags: None,
                differences: vec![format!("table inet {table} is missing")],
            });
        };
        let mut diffs = Vec::new();
        if flags != 0 {
            // Dormant (`flags dormant`) turns every hook off: nothing is captured.
            diffs.push(format!(
                "table inet {table} has flags {} (expected none)",
                table_flag_names(flags)
            ));
        }
        self.diff_chains(rs, &mut diffs)?;
        // Sets.
        let have_sets = self.sock.sets(fam, table)?;
        for s in &rs.sets {
            let (key, interval, want) = encode_elems(&s.elems);
            let Some(info) = have_sets.iter().find(|h| h.name == s.name) else {
                diffs.push(format!("set {} is missing", s.name));
                continue;
            };
            let want_flags = if interval {
                libc::NFT_SET_INTERVAL as u32
            } else {
                0
            };
            // Every flag changes what a lookup does (a map, timeouts, a constant set…).
            if info.key_type != key.type_id() || info.key_len != key.key_len() {
                diffs.push(format!(
                    "set {} has key type {}/{} bytes (expected {}/{})",
                    s.name,
                    info.key_type,
                    info.key_len,
                    key.type_id(),
                    key.key_len()
                ));
                continue;
            }
            if info.flags != want_flags {
                diffs.push(format!(
                    "set {} has flags {:#x} (expected {want_flags:#x})",
                    s.name, info.flags
                ));
                continue;
            }
            let have: BTreeSet<Elem> = self
                .sock
                .set_elems(fam, table, s.name)?
                .into_iter()
                .collect();
            let want: BTreeSet<Elem> = want.into_iter().collect();
            if have != want {
                let missing = want.difference(&have).count();
                let extra = have.difference(&want).count();
                diffs.push(format!(
                    "set {} elements differ: {missing} expected element key(s) missing, {extra} unexpected (expected {} elements from the plan)",
                    s.name,
                    s.elems.len()
                ));
            }
        }
        for h in &have_sets {
            if rs.set(&h.name).is_none() {
                diffs.push(format!("unexpected set {}", h.name));
            }
        }
        self.diff_rules(rs, &mut diffs)?;
        if rs.needs_rtnetlink() {
            let sock = self.routing_socket()?;
            let (r, objs) = rtnl_objects(rs, sock.ipv6);
            for o in objs {
                if !sock.rtnl.exists(&r, o)? {
                    diffs.push(format!("{} is missing", r.describe(o)));
                }
            }
        }
        Ok(Drift {
            table_flags: Some(flags),
            differences: diffs,
        })
    }

    fn diff_chains(&mut self, rs: &Ruleset, diffs: &mut Vec<String>) -> Result<(), KernelError> {
        let have = self.sock.chains(FAMILY as u16, self.table)?;
        for c in &rs.chains {
            let Some(h) = have.iter().find(|h| h.name == c.name) else {
                diffs.push(format!("chain {} is missing", c.name));
                continue;
            };
            let want = c.hook.map(|hk| {
                let num = match hk.point {
                    HookPoint::Prerouting => libc::NF_INET_PRE_ROUTING,
                    HookPoint::Output => libc::NF_INET_LOCAL_OUT,
                } as u32;
                let kind = match hk.kind {
                    ChainKind::Nat => "nat",
                    ChainKind::Filter => "filter",
                    ChainKind::Route => "route",
                };
                (num, hk.priority, kind.to_string())
            });
            if h.hook != want {
                let show = |hk: &Option<(u32, i32, String)>| match hk {
                    None => "no hook".to_string(),
                    Some((n, p, t)) => format!("type {t} hook {n} priority {p}"),
                };
                diffs.push(format!(
                    "chain {} has {} (expected {})",
                    c.name,
                    show(&h.hook),
                    show(&want)
                ));
            }
            // Base chains are created with policy accept: anything else drops what no rule
            // decided (or, on a regular chain, cannot be set at all).
            let want_policy = c.hook.map(|_| libc::NF_ACCEPT as u32);
            if c.hook.is_some() && h.policy != want_policy {
                diffs.push(format!(
                    "chain {} has policy {} (expected accept)",
                    c.name,
                    match h.policy {
                        Some(p) if p == libc::NF_DROP as u32 => "drop".to_string(),
                        Some(p) => p.to_string(),
                        None => "none".to_string(),
                    }
                ));
            }
        }
        for h in &have {
            if !rs.chains.iter().any(|c| c.name == h.name) {
                diffs.push(format!("unexpected chain {}", h.name));
            }
        }
        Ok(())
    }

    fn diff_rules(&mut self, rs: &Ruleset, diffs: &mut Vec<String>) -> Result<(), KernelError> {
        let have = self.sock.rules(FAMILY as u16, self.table)?;
        let table = Table::new(cstring(self.table), FAMILY);
        let ids = set_ids(rs);
        for c in &rs.chains {
            let chain = make_chain(&table, c);
            let want: Vec<Vec<String>> = c
                .rules
                .iter()
                .map(|r| ffi::render_rule(&compile_rule(&chain, r, &ids)))
                .collect();
            let got: Vec<&ffi::RuleInfo> = have.iter().filter(|r| r.chain == c.name).collect();
            if got.iter().map(|r| &r.exprs).eq(want.iter()) {
                continue;
            }
            let mut unmatched = got.clone();
            for (i, w) in want.iter().enumerate() {
                match unmatched.iter().position(|g| g.exprs == *w) {
                    Some(p) => {
                        unmatched.remove(p);
                    }
                    None => diffs.push(format!(
                        "chain {}: rule {} is missing: {}",
                        c.name,
                        i + 1,
                        nft_text::rule(&c.rules[i])
                    )),
                }
            }
            for g in &unmatched {
                diffs.push(format!(
                    "chain {}: unexpected rule (handle {}): {}",
                    c.name,
                    g.handle,
                    g.exprs.join(" ")
                ));
            }
            if unmatched.is_empty() && got.len() == want.len() {
                diffs.push(format!("chain {}: rules are in the wrong order", c.name));
            }
        }
        Ok(())
    }
}

/// `nft`'s names for table flags.
fn table_flag_names(flags: u32) -> String {
    let mut names = Vec::new();
    for (bit, name) in [(1u32, "dormant"), (2, "owner"), (4, "persist")] {
        if flags & bit != 0 {
            names.push(name.to_string());
        }
    }
    let rest = flags & !7;
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    names.join(",")
}
