//! Fuzz target `annotations`: structured pod annotations (`arbitrary`) → `policy::decide` →
//! `ruleset::build` → `nft_text::render` → `kernel::encode_elems`.
//!
//! Names are mostly the istio profile's (`policy::istio`), sometimes random; values mix random
//! strings with generated lists of plausible items: ports (valid, 0, > 65535), CIDRs v4/v6
//! with random prefix lengths (also near the edges of the address space, and close together
//! so that they nest and touch), `*`, spaces, empty items, interface names, booleans, modes.
//!
//! Invariants (checked in `fuzz_common`; a violation panics, libFuzzer reports a crash):
//! - `decide` never panics; an error is code 100 whose message names one of the pod's
//!   annotations and quotes its value, or code 7 only for a named pod without annotations;
//! - a captured pod has `sidecar.istio.io/status`, no false `inject`, mode not NONE, and is not
//!   in an excluded namespace;
//! - plan: CIDRs have host bits cleared, each list sorted without duplicates; no port 0;
//!   `Inbound::Only` never empty; `AllExcept` holds 15020, 15021, 15090; interface names 1–15
//!   bytes without '/', ':', whitespace or NUL; uid/gid/ports are the config's;
//! - ruleset: every set a rule references exists exactly once with the matching element type;
//!   no empty or unreferenced set; address sets sorted, non-overlapping, host bits cleared and
//!   covering every CIDR of the plan; port/name sets sorted and unique; fewer than 40 rules;
//!   chain names unique; jump targets exist;
//! - `render` contains "table inet mesh_redirect" and every set and chain;
//! - `encode_elems`: right key type and interval flag; address keys 4 or 16 bytes, strictly
//!   increasing, `[end@0] (start end)* [start]` with the leading end marker exactly when the
//!   first range starts above 0 and a final lone start exactly when the last range reaches the
//!   top of the key space; decoded ranges equal the set's CIDRs merged; port keys are the ports
//!   big-endian; interface keys are the names NUL-padded to 16 bytes.
#![no_main]

use arbitrary::Arbitrary;
use fuzz_common::{ISTIO_NAMES, decide_and_check};
use libfuzzer_sys::fuzz_target;
use mesh_redirect::config::{Annotations, PluginConfig};
use mesh_redirect::policy::Pod;
use std::fmt::Write;
use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Arbitrary, Debug)]
struct Input {
    namespace: Ns,
    name: Option<String>,
    /// 0: the runtime passed no annotations at all.
    annotations_present: u8,
    /// 0: no `sidecar.istio.io/status` (unless an entry adds one); else `status` or "{}".
    status_choice: u8,
    status: String,
    capture_dns: bool,
    entries: Vec<Entry>,
}

#[derive(Arbitrary, Debug)]
enum Ns {
    None,
    Default,
    KubeSystem,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Entry {
    /// < 224: an istio name (by index); else `random_name`.
    name_choice: u8,
    random_name: String,
    value: Val,
}

#[derive(Arbitrary, Debug)]
enum Val {
    Raw(String),
    Ports(Vec<Item<PortItem>>),
    Cidrs(Vec<Item<CidrItem>>),
    Ifaces(Vec<Item<IfItem>>),
    Word(u8),
    Star,
    Empty,
}

/// A list item with its separator and padding.
#[derive(Arbitrary, Debug)]
struct Item<T> {
    item: T,
    sep: u8,
    pad: u8,
}

#[derive(Arbitrary, Debug)]
enum Common {
    Star,
    Empty,
    Spaces,
    Junk(String),
}

#[derive(Arbitrary, Debug)]
enum PortItem {
    Port(u16),
    Wide(u32),
    Named(u8),
    Other(Common),
}

#[derive(Arbitrary, Debug)]
enum CidrItem {
    V4 {
        addr: [u8; 4],
        prefix: Option<u8>,
    },
    V6 {
        addr: [u8; 16],
        prefix: Option<u8>,
    },
    /// Small blocks inside 10.0.0.0/8 or fd00::/8: they nest, touch and merge.
    Near4 {
        idx: u8,
        prefix: u8,
    },
    Near6 {
        idx: u8,
        prefix: u8,
    },
    Edge(u8),
    Other(Common),
}

#[derive(Arbitrary, Debug)]
enum IfItem {
    Known(u8),
    Name(String),
    Other(Common),
}

const SEPS: [&str; 5] = [",", ", ", " ,", ",,", " , "];
const PADS: [&str; 4] = ["", " ", "\t", "  "];
const WORDS: [&str; 20] = [
    "true", "false", "t", "f", "0", "1", "TRUE", " False ", "yes", "no", "maybe", "", "REDIRECT",
    "TPROXY", "NONE", "redirect", " tproxy ", "none", "MAGIC", "{}",
];
const PORT_WORDS: [&str; 10] = [
    "80", "443", "15020", "15021", "15090", "65535", "65536", "0", "-1", "80-90",
];
const EDGES: [&str; 18] = [
    "0.0.0.0/0",
    "0.0.0.0",
    "0.0.0.0/1",
    "128.0.0.0/1",
    "255.255.255.255",
    "255.255.255.254/31",
    "10.1.2.3/8",
    "169.254.169.254/32",
    "127.0.0.1",
    "::",
    "::/0",
    "8000::/1",
    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127",
    "::ffff:1.2.3.4",
    "::1/128",
    "fe80::1%eth0",
    "2001:db8::1/64",
];
const IFACES: [&str; 12] = [
    "eth0",
    "eth1",
    "net1",
    "lo",
    "wg0",
    "veth1234567890a",
    "a/b",
    "x:y",
    ".",
    "..",
    "waytoolongname16",
    "é",
];

fn common(out: &mut String, c: &Common) {
    match c {
        Common::Star => out.push('*'),
        Common::Empty => {}
        Common::Spaces => out.push_str("  "),
        Common::Junk(s) => out.push_str(s),
    }
}

fn list<T>(items: &[Item<T>], mut one: impl FnMut(&mut String, &T)) -> String {
    let mut out = String::new();
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(SEPS[usize::from(it.sep) % SEPS.len()]);
        }
        let pad = PADS[usize::from(it.pad) % PADS.len()];
        out.push_str(pad);
        one(&mut out, &it.item);
        out.push_str(pad);
    }
    out
}

fn prefix(out: &mut String, p: Option<u8>, max: u8) {
    if let Some(p) = p {
        // Mostly valid lengths, sometimes just past the maximum.
        let _ = write!(out, "/{}", p % (max + 4));
    }
}

fn value(v: &Val) -> String {
    match v {
        Val::Raw(s) => s.clone(),
        Val::Star => "*".into(),
        Val::Empty => String::new(),
        Val::Word(w) => WORDS[usize::from(*w) % WORDS.len()].into(),
        Val::Ports(items) => list(items, |out, p| match p {
            PortItem::Port(p) => {
                let _ = write!(out, "{p}");
            }
            PortItem::Wide(p) => {
                let _ = write!(out, "{p}");
            }
            PortItem::Named(i) => out.push_str(PORT_WORDS[usize::from(*i) % PORT_WORDS.len()]),
            PortItem::Other(c) => common(out, c),
        }),
        Val::Cidrs(items) => list(items, |out, c| match c {
            CidrItem::V4 { addr, prefix: p } => {
                let _ = write!(out, "{}", Ipv4Addr::from(*addr));
                prefix(out, *p, 32);
            }
            CidrItem::V6 { addr, prefix: p } => {
                let _ = write!(out, "{}", Ipv6Addr::from(*addr));
                prefix(out, *p, 128);
            }
            CidrItem::Near4 { idx, prefix } => {
                let p = 20 + u32::from(*prefix) % 13; // /20 ../32
                let a = (10u32 << 24) | (u32::from(*idx) << (32 - p));
                let _ = write!(out, "{}/{p}", Ipv4Addr::from(a));
            }
            CidrItem::Near6 { idx, prefix } => {
                let p = 116 + u32::from(*prefix) % 13; // /116 ../128
                let a = (0xfdu128 << 120) | (u128::from(*idx) << (128 - p));
                let _ = write!(out, "{}/{p}", Ipv6Addr::from(a));
            }
            CidrItem::Edge(i) => out.push_str(EDGES[usize::from(*i) % EDGES.len()]),
            CidrItem::Other(c) => common(out, c),
        }),
        Val::Ifaces(items) => list(items, |out, i| match i {
            IfItem::Known(k) => out.push_str(IFACES[usize::from(*k) % IFACES.len()]),
            IfItem::Name(s) => out.push_str(s),
            IfItem::Other(c) => common(out, c),
        }),
    }
}

fuzz_target!(|input: Input| {
    let mut ann = Annotations::new();
    if input.status_choice != 0 {
        let status = if input.status_choice < 128 {
            "{}".to_string()
        } else {
            input.status.clone()
        };
        ann.insert(ISTIO_NAMES[0].to_string(), status);
    }
    for e in &input.entries {
        let name = if e.name_choice < 224 {
            ISTIO_NAMES[usize::from(e.name_choice) % ISTIO_NAMES.len()].to_string()
        } else {
            e.random_name.clone()
        };
        ann.insert(name, value(&e.value));
    }
    let namespace = match &input.namespace {
        Ns::None => None,
        Ns::Default => Some("default"),
        Ns::KubeSystem => Some("kube-system"),
        Ns::Other(s) => Some(s.as_str()),
    };
    let cfg = PluginConfig {
        capture_dns: input.capture_dns,
        ..PluginConfig::default()
    };
    let pod = Pod {
        namespace,
        name: input.name.as_deref(),
        annotations: (input.annotations_present != 0).then_some(&ann),
    };
    let _ = decide_and_check(&cfg, &pod);
});
