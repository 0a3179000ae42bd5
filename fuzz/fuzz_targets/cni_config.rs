//! Fuzz target `cni_config`: raw stdin bytes (the CNI network configuration).
//!
//! Invariants (a violation panics, which libFuzzer reports as a crash):
//! - nothing panics: `protocol::parse_stdin`, `negotiate_version` (every verb),
//!   `PluginConfig::from_conf`, `config::pod_annotations`, `protocol::pass_through_result`
//!   (every supported version), `policy::decide` and `plugin::run`;
//! - `negotiate_version` returns a supported version or code 1, 6 or 7; `from_conf` and
//!   `pod_annotations` fail only with code 7; `pass_through_result` fails only with 1, 6 or 7,
//!   sets `cniVersion` to the target version, and returns prevResult unchanged when it is
//!   already in that version;
//! - `decide` on the parsed config and annotations: every invariant of `fuzz_common`
//!   (plan, ruleset, nft text, netlink set elements; see README.md);
//! - `plugin::run` (VERSION, GC, ADD, CHECK, DEL; never STATUS, which creates a namespace and
//!   talks to the kernel) with a fixed environment whose CNI_NETNS does not exist: the output is
//!   ok, or a JSON error object with an integer `code` among 1, 6, 7, 100, 101 (never 102/11/199:
//!   the kernel is never reached); VERSION is always ok; GC and DEL are ok exactly when the
//!   version negotiates; CHECK is never ok; ADD is ok exactly when the pod is skipped, and then
//!   prints prevResult converted to the config's version; a captured pod's ADD fails with 101.
//!
//! Safety of the harness: CNI_NETNS is "/nonexistent/fuzz-netns" (checked absent at start), so
//! `Netns::open` fails with ENOENT before any setns or netlink socket. A string `logFile` is
//! rewritten to "/dev/null" before `run` sees the config (a fuzzed path would make `run` append
//! log lines to arbitrary files), and stderr is silenced during `run`.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The body is in the library (`fuzz_common::cni_config`), where tests/reproducers.rs replays
// the kept crash inputs through it.
fuzz_target!(|data: &[u8]| fuzz_common::cni_config::run(data));
