//! The `annotations` fuzz target's input and body: structured pod annotations (`arbitrary`)
//! → `policy::decide` → `ruleset::build` → `nft_text::render` → `kernel::encode_elems`.
//!
//! The mesh profile varies (istio, linkerd, kuma). Names are mostly that profile's (its table),
//! sometimes random; values mix random
//! strings with generated lists of plausible items: ports (valid, 0, > 65535), CIDRs v4/v6
//! with random prefix lengths (also near the edges of the address space, and close together
//! so that they nest and touch), `*`, spaces, empty items, interface names, booleans, modes,
//! port ranges, and for Kuma a generated `transparent-proxy-config` YAML document.
//!
//! Invariants (checked in `fuzz_common`; a violation panics, libFuzzer reports a crash):
//! - `decide` never panics; an error is code 100 whose message names one of the pod's
//!   annotations and quotes its value, or code 7 only for a named pod without annotations;
//! - a captured pod has its profile's marker (istio: `sidecar.istio.io/status`, no false
//!   `inject`, mode not NONE) and is not in an excluded namespace;
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

use crate::{decide_and_check, marker_value, names};
use arbitrary::Arbitrary;
use arbitrary::Unstructured;
use mesh_redirect::config::{Annotations, Mesh, PluginConfig};
use mesh_redirect::policy::Pod;
use std::fmt::Write;
use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Which profile: istio, linkerd, kuma (by index).
    mesh: u8,
    ipv6: bool,
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
    Kuma(Box<KumaDoc>),
}

/// A `traffic.kuma.io/transparent-proxy-config` document, rendered as flow-style YAML.
#[derive(Arbitrary, Debug)]
struct KumaDoc {
    /// 0: absent, 1: false, else true.
    cni_mode: u8,
    uid: Option<KumaScalar>,
    ip_family: u8,
    drop_invalid: bool,
    inbound: KumaFlow,
    outbound: KumaFlow,
    dns: Option<(bool, Option<KumaScalar>, bool, bool)>,
    uid_exclusions: Vec<String>,
    tail: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct KumaFlow {
    enabled: Option<bool>,
    port: Option<KumaScalar>,
    include: Option<Vec<KumaScalar>>,
    exclude: Option<Vec<KumaScalar>>,
    ips: Vec<Item<CidrItem>>,
}

#[derive(Arbitrary, Debug)]
enum KumaScalar {
    Num(u32),
    Text(String),
    Port(u16),
}

fn scalar(s: &KumaScalar) -> String {
    match s {
        KumaScalar::Num(n) => n.to_string(),
        KumaScalar::Port(p) => p.to_string(),
        KumaScalar::Text(t) => format!("{t:?}"),
    }
}

fn kuma_yaml(d: &KumaDoc) -> String {
    let mut parts = Vec::new();
    match d.cni_mode {
        0 => {}
        1 => parts.push("cniMode: false".to_string()),
        _ => parts.push("cniMode: true".to_string()),
    }
    if let Some(u) = &d.uid {
        parts.push(format!("kumaDPUser: {}", scalar(u)));
    }
    match d.ip_family % 4 {
        1 => parts.push("ipFamilyMode: ipv4".into()),
        2 => parts.push("ipFamilyMode: dualstack".into()),
        3 => parts.push("ipFamilyMode: ipv6".into()),
        _ => {}
    }
    parts.push(format!("dropInvalidPackets: {}", d.drop_invalid));
    let flow = |f: &KumaFlow, extra: &[String]| {
        let mut p = Vec::new();
        if let Some(e) = f.enabled {
            p.push(format!("enabled: {e}"));
        }
        if let Some(port) = &f.port {
            p.push(format!("port: {}", scalar(port)));
        }
        let list = |v: &[KumaScalar]| v.iter().map(scalar).collect::<Vec<_>>().join(", ");
        if let Some(i) = &f.include {
            p.push(format!("includePorts: [{}]", list(i)));
        }
        if let Some(e) = &f.exclude {
            p.push(format!("excludePorts: [{}]", list(e)));
        }
        if !f.ips.is_empty() {
            let mut s = String::new();
            for it in &f.ips {
                let mut one = String::new();
                cidr_item(&mut one, &it.item);
                if !s.is_empty() {
                    s.push(',');
                }
                s.push_str(&one);
            }
            p.push(format!("excludePortsForIPs: [{s:?}]"));
        }
        p.extend(extra.iter().cloned());
        format!("{{{}}}", p.join(", "))
    };
    let uids: Vec<String> = d.uid_exclusions.iter().map(|u| format!("{u:?}")).collect();
    let mut redirect = vec![
        format!("inbound: {}", flow(&d.inbound, &[])),
        format!(
            "outbound: {}",
            flow(
                &d.outbound,
                &[format!("excludePortsForUIDs: [{}]", uids.join(", "))]
            )
        ),
    ];
    if let Some((enabled, port, all, skip)) = &d.dns {
        let port = port.as_ref().map(scalar).unwrap_or_else(|| "15053".into());
        redirect.push(format!(
            "dns: {{enabled: {enabled}, port: {port}, captureAll: {all}, skipConntrackZoneSplit: {skip}}}"
        ));
    }
    parts.push(format!("redirect: {{{}}}", redirect.join(", ")));
    let mut y = format!("{{{}}}", parts.join(", "));
    if let Some(t) = &d.tail {
        y.push_str(t);
    }
    y
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

fn cidr_item(out: &mut String, c: &CidrItem) {
    match c {
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
    }
}

fn value(v: &Val) -> String {
    match v {
        Val::Raw(s) => s.clone(),
        Val::Star => "*".into(),
        Val::Empty => String::new(),
        Val::Word(w) => WORDS[usize::from(*w) % WORDS.len()].into(),
        Val::Kuma(d) => kuma_yaml(d),
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
        Val::Cidrs(items) => list(items, cidr_item),
        Val::Ifaces(items) => list(items, |out, i| match i {
            IfItem::Known(k) => out.push_str(IFACES[usize::from(*k) % IFACES.len()]),
            IfItem::Name(s) => out.push_str(s),
            IfItem::Other(c) => common(out, c),
        }),
    }
}

/// The target's body: one structured input through `decide` and every check.
pub fn run(input: &Input) {
    let mesh = Mesh::ALL[usize::from(input.mesh) % Mesh::ALL.len()];
    let names = names(mesh);
    let mut ann = Annotations::new();
    if input.status_choice != 0 {
        let status = if input.status_choice < 128 {
            marker_value(mesh).to_string()
        } else {
            input.status.clone()
        };
        ann.insert(names[0].to_string(), status);
    }
    for e in &input.entries {
        let name = if e.name_choice < 224 {
            names[usize::from(e.name_choice) % names.len()].to_string()
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
    let d = PluginConfig::for_mesh(mesh);
    let cfg = PluginConfig {
        capture_dns: input.capture_dns && mesh.profile().defaults.dns,
        ..d
    };
    let pod = Pod {
        namespace,
        name: input.name.as_deref(),
        annotations: (input.annotations_present != 0).then_some(&ann),
        ipv6: input.ipv6,
    };
    let _ = decide_and_check(&cfg, &pod);
}

/// What libFuzzer's `fuzz_target!(|input: Input| …)` does with raw bytes: too short for the
/// input's minimum size, or not decodable, and the body is not run (`false`); else it runs.
pub fn replay(data: &[u8]) -> bool {
    if data.len() < <Input as Arbitrary>::size_hint(0).0 {
        return false;
    }
    match Input::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => {
            run(&input);
            true
        }
        Err(_) => false,
    }
}
