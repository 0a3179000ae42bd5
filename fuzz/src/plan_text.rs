//! The `plan_text` fuzz target's body: raw, unstructured annotation values → `policy::decide` →
//! `ruleset::build` → `nft_text::render` → `kernel::encode_elems`.
//!
//! Input format (human-writable, so seeds are plain text): UTF-8 (lossy) lines `NAME=VALUE`.
//! A first line `mesh=linkerd` or `mesh=kuma` picks that profile (istio otherwise). NAME is
//! one of the profile's annotations, by full name or the part after its '/'
//! (`excludeInterfaces`, `skip-subnets`, …); any other NAME is used as-is. VALUE is everything
//! after the first '='; a trailing '\r' is kept. A line without '=' sets the next annotation of
//! the profile's table (`fuzz_common::names`) to the whole line. The profile's marker
//! (`sidecar.istio.io/status`, `linkerd.io/proxy-version`, `kuma.io/sidecar-injected`) is set
//! unless a line sets it, so nearly every input is a captured pod: the point is the list
//! parsers and what follows them. Pod: namespace "default", name "web-0"; config: the
//! profile's defaults.
//!
//! Invariants: the same as `annotations` (all of `fuzz_common`): no panic anywhere; errors are
//! code 100 naming the annotation and quoting its value; plan lists canonical (host bits
//! cleared, sorted, unique, no port 0, Only non-empty, valid interface names); ruleset sets
//! exist exactly once, are non-empty, referenced, typed right, aggregated and cover the plan;
//! fewer than 40 rules; the nft text names the table, sets and chains; the netlink interval
//! encoding is well-formed and decodes back to the sets' CIDRs.

use crate::{decide_and_check, marker_value, names};
use mesh_redirect::config::{Annotations, Mesh, PluginConfig};
use mesh_redirect::policy::Pod;

fn full_name(names: &[&str], name: &str) -> String {
    names
        .iter()
        .find(|n| **n == name || n.rsplit('/').next() == Some(name))
        .map_or_else(|| name.to_string(), |n| n.to_string())
}

/// Parses the input into the mesh and the annotations (see the module comment).
fn parse(data: &[u8]) -> (Mesh, Annotations) {
    let text = String::from_utf8_lossy(data);
    // A first line `mesh=linkerd` or `mesh=kuma` picks that profile (istio otherwise).
    let (mesh, text) = match text.split_once('\n') {
        Some((first, rest)) if first.starts_with("mesh=") => (
            Mesh::from_name(&first["mesh=".len()..]).unwrap_or(Mesh::Istio),
            rest.to_string(),
        ),
        _ => (Mesh::Istio, text.to_string()),
    };
    let names = names(mesh);
    let mut ann = Annotations::new();
    ann.insert(names[0].to_string(), marker_value(mesh).to_string());
    let mut next = names[1..].iter().cycle();
    for line in text.split('\n') {
        match line.split_once('=') {
            Some((name, value)) => {
                ann.insert(full_name(&names, name), value.to_string());
            }
            None if line.is_empty() => {}
            None => {
                let name = next.next().expect("cycle");
                ann.insert(name.to_string(), line.to_string());
            }
        }
    }
    (mesh, ann)
}

/// The target's body: raw bytes through `decide` and every check.
pub fn run(data: &[u8]) {
    let (mesh, ann) = parse(data);
    let pod = Pod {
        namespace: Some("default"),
        name: Some("web-0"),
        annotations: Some(&ann),
        ipv6: true,
    };
    let _ = decide_and_check(&PluginConfig::for_mesh(mesh), &pod);
}
