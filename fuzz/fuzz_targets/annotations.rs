//! Fuzz target `annotations`: structured pod annotations (`arbitrary`) → `policy::decide` →
//! `ruleset::build` → `nft_text::render` → `kernel::encode_elems`.
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
#![no_main]

use fuzz_common::annotations::{Input, run};
use libfuzzer_sys::fuzz_target;

// The body is in the library (`fuzz_common::annotations`), where tests/reproducers.rs replays
// the kept crash inputs through it.
fuzz_target!(|input: Input| run(&input));
