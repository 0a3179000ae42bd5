//! The command-line face: `plan`, `version`, `install`, `uninstall`, `check-bypass`.

use crate::args::{self, CliError, Spec};
use crate::config::{self, Annotations, PluginConfig};
use crate::policy::{self, Decision, Pod};
use crate::{nft_text, ruleset};
use serde_json::Value;

const USAGE_HEAD: &str = "\
mesh-redirect: chained CNI plugin installing service-mesh traffic capture as nftables

As a CNI plugin (CNI_COMMAND set) it reads the network configuration on stdin.
As a command:
  mesh-redirect plan --config FILE [--annotations FILE] [--namespace NS]
      Print the ruleset ADD would install for a pod, in `nft -f` syntax (check it with
      `nft -c -f -`), or why the pod would not be captured.
      --config       the mesh-redirect conflist entry (or a whole conflist) as JSON
      --annotations  the pod's annotations: a JSON object, or a pod from `kubectl get -o json`
      --namespace    the pod's namespace (for excludeNamespaces)
";

/// `check-bypass`'s usage; here, not in the agent's code, so the plugin's help shows it too.
pub const CHECK_BYPASS_USAGE: &str =
    "  mesh-redirect check-bypass [--target IP:PORT] [--netns PATH] [--timeout SECONDS]
      Detect connect-time load balancing that bypasses capture (Cilium's socket-LB, Calico
      eBPF's connect-time LB: cgroup/connect BPF programs that rewrite a pod's connect() to a
      service into a backend address before any packet exists). Connects to the service with
      every TCP connection of its own socket redirected to its own listener, and reads the
      original destination the capture hook saw. Runs in the node agent (this execs
      `mesh-redirect-agent check-bypass`), as root. --target defaults to
      KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT. Probes from a scratch network namespace
      it creates and removes, or with --netns from that namespace (a pod's), where it adds
      table inet mesh_redirect_probe, matching only its own socket, for the probe's duration.
      --timeout: how long the connection has to arrive (default 2). Prints the target, what
      was seen, the verdict, and the fixes when rewritten. Exit 0: not rewritten, 1: rewritten,
      2: usage, 3: inconclusive (the connection never arrived), 4: the probe failed.";

/// `check-bypass`'s exit code when the probe could not run (0: not rewritten, 1: rewritten,
/// 2: usage, 3: inconclusive).
pub const CHECK_BYPASS_FAILED: u8 = 4;

fn usage() -> String {
    format!(
        "{USAGE_HEAD}{}\n{CHECK_BYPASS_USAGE}\n  mesh-redirect version\n  mesh-redirect help",
        crate::install::USAGE
    )
}

/// Runs a CLI command; returns the process exit status.
pub fn main(args: Vec<String>) -> u8 {
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{}", usage());
        return 2;
    };
    let result = match cmd.as_str() {
        "plan" => plan(rest),
        // The node agent is its own binary (it links a CRI client, an async runtime and an
        // HTTP server the exec'd plugin must not carry): `install` hands over to it.
        "install" => return report(exec_agent(args.clone())),
        // The probe is the agent's too (the plugin links none of it). Exit 1 means "rewritten"
        // there, so a failure to hand over must not look like one.
        "check-bypass" => {
            return match exec_agent(args.clone()) {
                Err(CliError::Failed(m) | CliError::Usage(m)) => {
                    eprintln!("mesh-redirect: {m}");
                    CHECK_BYPASS_FAILED
                }
                Ok(()) => 0,
            };
        }
        "uninstall" => crate::install::Options::parse(rest, |k| std::env::var(k).ok())
            .and_then(|o| crate::install::cleanup(&o).map_err(|e| CliError::Failed(e.to_string()))),
        "version" | "--version" | "-V" => {
            println!("mesh-redirect {}", env!("CARGO_PKG_VERSION"));
            println!(
                "CNI versions: {}",
                crate::protocol::SUPPORTED_VERSIONS.join(", ")
            );
            Ok(())
        }
        "help" | "--help" | "-h" => {
            println!("{}", usage());
            Ok(())
        }
        other => Err(CliError::Usage(format!("unknown command {other:?}"))),
    };
    report(result)
}

/// The node agent's binary: beside this one (as the image and `target/` have them).
pub const AGENT: &str = "mesh-redirect-agent";

/// Replaces this process with the agent, passing the command line on.
fn exec_agent(args: Vec<String>) -> Result<(), CliError> {
    use std::os::unix::process::CommandExt;
    let me = std::env::current_exe()
        .map_err(|e| CliError::Failed(format!("cannot find my own binary: {e}")))?;
    let agent = me.with_file_name(AGENT);
    if !agent.exists() {
        return Err(CliError::Failed(format!(
            "`{}` runs the node agent, {}, which is not beside {} (the image ships both; \
             from the source tree: cargo build --bins)",
            args.first().map_or("", String::as_str),
            agent.display(),
            me.display()
        )));
    }
    let err = std::process::Command::new(&agent).args(args).exec();
    Err(CliError::Failed(format!(
        "cannot run {}: {err}",
        agent.display()
    )))
}

fn report(result: Result<(), CliError>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(CliError::Usage(m)) => {
            eprintln!("mesh-redirect: {m}\n\n{}", usage());
            2
        }
        Err(CliError::Failed(m)) => {
            eprintln!("mesh-redirect: {m}");
            1
        }
    }
}

fn read_json(path: &str) -> Result<Value, CliError> {
    let text =
        std::fs::read(path).map_err(|e| CliError::Failed(format!("cannot read {path}: {e}")))?;
    serde_json::from_slice(&text)
        .map_err(|e| CliError::Failed(format!("{path} is not valid JSON: {e}")))
}

/// The mesh-redirect entry: the object itself, or the `mesh-redirect` plugin of a conflist.
fn plugin_entry(v: Value) -> Result<serde_json::Map<String, Value>, CliError> {
    let Value::Object(mut m) = v else {
        return Err(CliError::Failed("the config must be a JSON object".into()));
    };
    if let Some(Value::Array(plugins)) = m.remove("plugins") {
        return plugins
            .into_iter()
            .filter_map(|p| match p {
                Value::Object(o) => Some(o),
                _ => None,
            })
            .find(|p| p.get("type").and_then(Value::as_str) == Some("mesh-redirect"))
            .ok_or_else(|| {
                CliError::Failed("the conflist has no plugin of type \"mesh-redirect\"".into())
            });
    }
    Ok(m)
}

/// Annotations from a JSON object of strings, or from a pod's `metadata.annotations`.
fn annotations(v: Value) -> Result<Annotations, CliError> {
    let v = match v.pointer("/metadata/annotations") {
        Some(a) => a.clone(),
        None => v,
    };
    let Value::Object(m) = v else {
        return Err(CliError::Failed("annotations must be a JSON object".into()));
    };
    m.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            _ => Err(CliError::Failed(format!(
                "annotation {k:?} must be a string"
            ))),
        })
        .collect()
}

fn plan(args: &[String]) -> Result<(), CliError> {
    const SPECS: &[Spec] = &[
        Spec::value(
            "--config",
            "",
            "FILE",
            "the mesh-redirect conflist entry (or a whole conflist) as JSON",
        ),
        Spec::value(
            "--annotations",
            "",
            "FILE",
            "the pod's annotations: a JSON object, or a pod from `kubectl get -o json`",
        ),
        Spec::value(
            "--namespace",
            "",
            "NS",
            "the pod's namespace (for excludeNamespaces)",
        ),
    ];
    let f = args::parse(args, SPECS, |_| None)?;
    let conf = plugin_entry(read_json(
        &f.get("--config")
            .ok_or_else(|| CliError::Usage("plan needs --config".into()))?,
    )?)?;
    let cfg = PluginConfig::from_conf(&conf).map_err(|e| CliError::Failed(e.msg))?;
    let ann = match f.get("--annotations") {
        Some(p) => annotations(read_json(&p)?)?,
        // Without a file, the annotations embedded in the config's runtimeConfig, if any.
        None => config::pod_annotations(&conf)
            .map_err(|e| CliError::Failed(e.msg))?
            .unwrap_or_default(),
    };
    let namespace = f.get("--namespace");
    let pod = Pod {
        namespace: namespace.as_deref(),
        name: None,
        annotations: Some(&ann),
        // As ADD decides it: from the primary plugin's result in the config, if there is one.
        ipv6: conf
            .get("prevResult")
            .is_some_and(crate::protocol::result_has_ipv6),
    };
    match policy::decide(&cfg, &pod)
        .map_err(|e| CliError::Failed(format!("{} (CNI code {})", e.msg, e.code)))?
    {
        Decision::Skip(why) => println!("# not captured ({}): {why}", why.rule()),
        Decision::Capture(p) => print!("{}", nft_text::render(&ruleset::build(&p))),
    }
    Ok(())
}
