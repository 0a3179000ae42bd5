//! The `cni_config` fuzz target's body: raw stdin bytes (the CNI network configuration).
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

use crate::{check_decision, with_stderr_silenced};
use mesh_redirect::config::{self, PluginConfig};
use mesh_redirect::plugin;
use mesh_redirect::policy::{self, Decision, Pod};
use mesh_redirect::protocol::{self, Command, SUPPORTED_VERSIONS, code};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

const NETNS: &str = "/nonexistent/fuzz-netns";

/// The two fixed environments: a Kubernetes pod, and a plain invocation without CNI_ARGS.
const ENVS: [(Option<&str>, Option<&str>, &str); 2] = [
    (
        Some("default"),
        Some("web-0"),
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123",
    ),
    (None, None, ""),
];

fn env_map(command: &str, args: &str) -> HashMap<&'static str, String> {
    let mut m: HashMap<&'static str, String> = [
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", "abc123".to_string()),
        ("CNI_NETNS", NETNS.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
    ]
    .into();
    if !args.is_empty() {
        m.insert("CNI_ARGS", args.to_string());
    }
    m
}

fn run_plugin(command: &str, args: &str, stdin: &[u8]) -> plugin::Output {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        assert!(
            !Path::new(NETNS).exists() && !Path::new("/nonexistent").exists(),
            "{NETNS} exists: refusing to fuzz plugin::run"
        );
    });
    let env = env_map(command, args);
    with_stderr_silenced(|| plugin::run(|k| env.get(k).cloned(), stdin))
}

/// The error code of a failed run, checking the error object's shape.
fn err_code(what: &str, out: &plugin::Output) -> u32 {
    let v = out
        .stdout
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: failed without an error object"));
    let c = v
        .get("code")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{what}: error object without an integer code: {v}"));
    assert!(
        v.get("msg").is_some_and(Value::is_string),
        "{what}: error object without msg: {v}"
    );
    assert!(
        v.get("cniVersion").is_some_and(Value::is_string),
        "{what}: error object without cniVersion: {v}"
    );
    assert!(
        [1, 6, 7, 100, 101].contains(&c),
        "{what}: unexpected error code {c}: {v}"
    );
    c as u32
}

/// What ADD and CHECK decide before touching the netns, in `plugin`'s order (version, config,
/// prevResult, annotations, policy): prevResult as it will be printed and whether the pod is
/// captured, or the code of the first error.
fn expected(
    conf: &Map<String, Value>,
    cmd: Command,
    ns: Option<&str>,
    name: Option<&str>,
) -> Result<(Value, bool), u32> {
    let version = protocol::negotiate_version(conf, cmd).map_err(|e| e.code)?;
    let cfg = PluginConfig::from_conf(conf).map_err(|e| e.code)?;
    let out = match conf.get("prevResult") {
        Some(p) if !p.is_null() => {
            protocol::pass_through_result(p, &version).map_err(|e| e.code)?
        }
        _ => return Err(code::INVALID_CONFIG),
    };
    let ann = config::pod_annotations(conf).map_err(|e| e.code)?;
    let pod = Pod {
        namespace: ns,
        name,
        annotations: ann.as_ref(),
        ipv6: conf
            .get("prevResult")
            .is_some_and(protocol::result_has_ipv6),
    };
    let captured = match policy::decide(&cfg, &pod).map_err(|e| e.code)? {
        Decision::Capture(_) => true,
        Decision::Skip(_) => false,
    };
    Ok((out, captured))
}

fn pure_layers(conf: &Map<String, Value>) {
    for cmd in [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Version,
        Command::Gc,
        Command::Status,
    ] {
        match protocol::negotiate_version(conf, cmd) {
            Ok(v) => assert!(
                SUPPORTED_VERSIONS.contains(&v.as_str()),
                "negotiated unsupported version {v:?}"
            ),
            Err(e) => assert!(
                [1, 6, 7].contains(&e.code),
                "negotiate_version: code {}: {}",
                e.code,
                e.msg
            ),
        }
    }
    let cfg = PluginConfig::from_conf(conf);
    if let Err(e) = &cfg {
        assert_eq!(e.code, code::INVALID_CONFIG, "from_conf: {}", e.msg);
    }
    let ann = config::pod_annotations(conf);
    if let Err(e) = &ann {
        assert_eq!(e.code, code::INVALID_CONFIG, "pod_annotations: {}", e.msg);
    }
    if let Some(prev) = conf.get("prevResult").filter(|p| !p.is_null()) {
        for v in SUPPORTED_VERSIONS {
            match protocol::pass_through_result(prev, v) {
                Ok(out) => {
                    assert_eq!(out["cniVersion"], v, "pass_through_result version");
                    if prev.get("cniVersion").and_then(Value::as_str) == Some(v) {
                        assert_eq!(&out, prev, "pass-through in the same version changed it");
                    }
                }
                Err(e) => assert!(
                    [1, 6, 7].contains(&e.code),
                    "pass_through_result: code {}: {}",
                    e.code,
                    e.msg
                ),
            }
        }
    }
    if let (Ok(cfg), Ok(ann)) = (&cfg, &ann) {
        for (ns, name, _) in ENVS {
            let pod = Pod {
                namespace: ns,
                name,
                annotations: ann.as_ref(),
                ipv6: false,
            };
            check_decision(cfg, &pod, &policy::decide(cfg, &pod));
        }
    }
}

fn verbs(data: &[u8], conf: Option<&Map<String, Value>>) {
    // VERSION needs no stdin and always answers.
    let out = run_plugin("VERSION", "", data);
    assert!(out.ok, "VERSION failed: {:?}", out.stdout);
    assert_eq!(out.stdout, Some(protocol::version_info()), "VERSION answer");

    // A string logFile would make plugin::run append to that path: point it at /dev/null.
    let rewrite = conf.is_some_and(|c| c.get("logFile").is_some_and(Value::is_string));
    let conf: Option<Map<String, Value>> = conf.map(|c| {
        let mut c = c.clone();
        if rewrite {
            c.insert("logFile".into(), Value::String("/dev/null".into()));
        }
        c
    });
    let stdin: Cow<[u8]> = match &conf {
        Some(c) if rewrite => Cow::Owned(serde_json::to_vec(c).expect("re-serialize")),
        _ => Cow::Borrowed(data),
    };
    // Expectations come from the bytes `run` reads: re-serializing can move a float by an ULP
    // (serde_json's default float parsing is not correctly rounded).
    let conf = if rewrite {
        Some(protocol::parse_stdin(&stdin).expect("re-serialized config parses"))
    } else {
        conf
    };

    for (ns, name, args) in ENVS {
        for cmd in ["GC", "DEL"] {
            let out = run_plugin(cmd, args, &stdin);
            let want_ok = conf.as_ref().is_some_and(|c| {
                protocol::negotiate_version(c, Command::parse(cmd).unwrap()).is_ok()
            });
            if out.ok {
                assert!(want_ok, "{cmd} ok but the version does not negotiate");
                assert!(out.stdout.is_none(), "{cmd} printed {:?}", out.stdout);
            } else {
                let c = err_code(cmd, &out);
                assert!(
                    !want_ok,
                    "{cmd} failed with {c} although the version negotiates"
                );
            }
        }

        // Both verbs stop at the missing netns, after the same checks in the same order.
        for cmd in [Command::Check, Command::Add] {
            let out = run_plugin(cmd.as_str(), args, &stdin);
            let want = match &conf {
                None => Err(code::DECODE),
                Some(c) => expected(c, cmd, ns, name),
            };
            match (out.ok, want) {
                (true, Ok((prev, false))) if cmd == Command::Add => {
                    assert_eq!(out.stdout.as_ref(), Some(&prev), "ADD of a skipped pod");
                }
                (true, want) => panic!("{cmd} succeeded, expected {want:?}: {:?}", out.stdout),
                (false, Ok((_, captured))) => {
                    let c = err_code(cmd.as_str(), &out);
                    assert!(
                        c == code::NETNS && (captured || cmd == Command::Check),
                        "{cmd} failed with {c}; captured={captured}: {:?}",
                        out.stdout
                    );
                }
                (false, Err(want)) => {
                    let c = err_code(cmd.as_str(), &out);
                    assert_eq!(c, want, "{cmd} error code: {:?}", out.stdout);
                }
            }
        }
    }
}

/// The target's body: raw stdin bytes through every layer and verb.
pub fn run(data: &[u8]) {
    let conf = protocol::parse_stdin(data);
    if let Err(e) = &conf {
        assert_eq!(e.code, code::DECODE, "parse_stdin: {}", e.msg);
    }
    let conf = conf.ok();
    if let Some(c) = &conf {
        pure_layers(c);
    }
    verbs(data, conf.as_ref());
}
