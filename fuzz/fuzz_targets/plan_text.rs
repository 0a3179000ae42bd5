//! Fuzz target `plan_text`: raw, unstructured annotation values → `policy::decide` →
//! `ruleset::build` → `nft_text::render` → `kernel::encode_elems`.
//!
//! Input format (human-writable, so seeds are plain text): UTF-8 (lossy) lines `NAME=VALUE`.
//! NAME is an istio annotation's full name or the part after its '/' (`excludeInterfaces`,
//! `status`, …); any other NAME is used as-is. VALUE is everything after the first '='; a
//! trailing '\r' is kept. A line without '=' sets the next istio annotation (in the order of
//! `fuzz_common::ISTIO_NAMES`, after `status`) to the whole line. `sidecar.istio.io/status` is
//! "{}" unless a line sets it, so nearly every input is a captured pod: the point is the list
//! parsers and what follows them. Pod: namespace "default", name "web-0"; config: defaults.
//!
//! Invariants: the same as `annotations` (all of `fuzz_common`): no panic anywhere; errors are
//! code 100 naming the annotation and quoting its value; plan lists canonical (host bits
//! cleared, sorted, unique, no port 0, Only non-empty, valid interface names); ruleset sets
//! exist exactly once, are non-empty, referenced, typed right, aggregated and cover the plan;
//! fewer than 40 rules; the nft text names the table, sets and chains; the netlink interval
//! encoding is well-formed and decodes back to the sets' CIDRs.
#![no_main]

use fuzz_common::{ISTIO_NAMES, decide_and_check};
use libfuzzer_sys::fuzz_target;
use mesh_redirect::config::{Annotations, PluginConfig};
use mesh_redirect::policy::{Pod, istio};

fn full_name(name: &str) -> String {
    ISTIO_NAMES
        .iter()
        .find(|n| **n == name || n.rsplit('/').next() == Some(name))
        .map_or_else(|| name.to_string(), |n| n.to_string())
}

/// Parses the input into annotations (see the module comment).
fn parse(data: &[u8]) -> Annotations {
    let text = String::from_utf8_lossy(data);
    let mut ann = Annotations::new();
    ann.insert(istio::STATUS.to_string(), "{}".to_string());
    let mut next = ISTIO_NAMES[1..].iter().cycle();
    for line in text.split('\n') {
        match line.split_once('=') {
            Some((name, value)) => {
                ann.insert(full_name(name), value.to_string());
            }
            None if line.is_empty() => {}
            None => {
                let name = next.next().expect("cycle");
                ann.insert(name.to_string(), line.to_string());
            }
        }
    }
    ann
}

fuzz_target!(|data: &[u8]| {
    let ann = parse(data);
    let pod = Pod {
        namespace: Some("default"),
        name: Some("web-0"),
        annotations: Some(&ann),
    };
    let _ = decide_and_check(&PluginConfig::default(), &pod);
});
