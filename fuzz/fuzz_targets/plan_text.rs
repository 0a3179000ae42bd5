//! Fuzz target `plan_text`: raw, unstructured annotation values → `policy::decide` →
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
#![no_main]

use libfuzzer_sys::fuzz_target;

// The body is in the library (`fuzz_common::plan_text`), where tests/reproducers.rs replays
// the kept crash inputs through it.
fuzz_target!(|data: &[u8]| fuzz_common::plan_text::run(data));
