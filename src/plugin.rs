//! The CNI verbs: stdin/env → config → policy → ruleset → kernel, one way.

use crate::config::{self, LogLevel, PluginConfig};
use crate::kernel::{Kernel, Linger, Sockets};
use crate::log::Record;
use crate::netns::Netns;
use crate::pod::{self, PodPlan};
use crate::policy::{self, Decision, Pod};
use crate::protocol::{self, CniError, Command, Env, code};
use crate::ruleset::{self, Ruleset};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Plugin code for a CHECK that found the pod's table differing from the plan.
pub const CHECK_MISMATCH: u32 = 103;

/// What one invocation produced: the stdout JSON (if any) and the exit status.
#[derive(Debug)]
pub struct Output {
    pub stdout: Option<Value>,
    pub ok: bool,
}

/// Where logging goes for this invocation (known once the config parsed).
struct LogTarget {
    file: Option<PathBuf>,
    level: LogLevel,
}

/// Runs one CNI invocation and logs it.
pub fn run(get_env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Output {
    let start = Instant::now();
    let mut rec = Record::default();
    let mut log = LogTarget {
        file: None,
        level: LogLevel::Info,
    };
    let mut version = protocol::LATEST.to_string();
    let mut events: Option<String> = None;
    let mut linger = Linger::default();
    let result = invoke(
        &get_env,
        stdin,
        &mut rec,
        &mut log,
        &mut version,
        &mut events,
        &mut linger,
    );
    let out = match result {
        Ok(stdout) => Output { stdout, ok: true },
        Err(e) => {
            rec.error_code = Some(e.code);
            rec.error = Some(e.msg.clone());
            Output {
                stdout: Some(e.to_json(&version)),
                ok: false,
            }
        }
    };
    let elapsed = start.elapsed();
    crate::log::emit(log.file.as_deref(), log.level, &rec, elapsed);
    match events {
        // The agent also takes the netfilter socket, whose release may wait (kernel::Linger).
        Some(path) => crate::events::send_event(
            &path,
            &crate::events::event(&rec, elapsed),
            linger.into_fd(),
        ),
        // No agent: the close waits for the kernel here.
        None => drop(linger),
    }
    out
}

fn invoke(
    get_env: &impl Fn(&str) -> Option<String>,
    stdin: &[u8],
    rec: &mut Record,
    log: &mut LogTarget,
    version: &mut String,
    events: &mut Option<String>,
    linger: &mut Linger,
) -> Result<Option<Value>, CniError> {
    rec.command = get_env("CNI_COMMAND").unwrap_or_default();
    let env = Env::from_lookup(get_env)?;
    rec.container_id = env.container_id.clone();
    rec.netns = env.netns.clone();
    rec.pod_namespace = env.arg("K8S_POD_NAMESPACE").unwrap_or_default().to_string();
    rec.pod_name = env.arg("K8S_POD_NAME").unwrap_or_default().to_string();
    if env.command == Command::Version {
        return Ok(Some(protocol::version_info()));
    }
    let conf = protocol::parse_stdin(stdin)?;
    // Taken even from a config that fails later: its errors are counted too.
    *events = config::event_socket(&conf);
    // Errors speak the config's version when it has a usable one.
    if let Some(v) = conf.get("cniVersion").and_then(Value::as_str)
        && protocol::SUPPORTED_VERSIONS.contains(&v)
    {
        *version = v.to_string();
    }
    *version = protocol::negotiate_version(&conf, env.command)?;
    let cfg = PluginConfig::from_conf(&conf);
    if let Ok(c) = &cfg {
        log.file = c.log_file.clone();
        log.level = c.log_level;
    }
    match env.command {
        Command::Add => add(&env, &conf, cfg?, rec, version, linger),
        Command::Check => check(&env, &conf, cfg?, rec, version),
        Command::Del => del(&env, &conf, cfg, rec, linger).map(|()| None),
        Command::Gc => {
            rec.decision = "nothing to collect: all state lives in pod namespaces".into();
            Ok(None)
        }
        // A config every ADD would refuse makes the plugin unavailable too.
        Command::Status => {
            cfg?;
            status(rec).map(|()| None)
        }
        Command::Version => Ok(Some(protocol::version_info())),
    }
}

/// The result to print for ADD and CHECK: prevResult, unchanged, in the config's version.
fn result(conf: &Map<String, Value>, version: &str, cmd: Command) -> Result<Value, CniError> {
    match conf.get("prevResult") {
        Some(prev) if !prev.is_null() => protocol::pass_through_result(prev, version),
        _ => Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "mesh-redirect is a chained plugin: {cmd} needs a prevResult from the plugin before it \
                 (put mesh-redirect after the primary network plugin in a conflist)"
            ),
        )),
    }
}

/// The pod's ruleset, or why it is not captured.
fn plan(env: &Env, conf: &Map<String, Value>, cfg: &PluginConfig) -> Result<PodPlan, CniError> {
    let annotations = config::pod_annotations(conf)?;
    pod::plan(
        cfg,
        &Pod {
            namespace: env.arg("K8S_POD_NAMESPACE"),
            name: env.arg("K8S_POD_NAME"),
            annotations: annotations.as_ref(),
            ipv6: conf
                .get("prevResult")
                .is_some_and(protocol::result_has_ipv6),
        },
    )
}

fn add(
    env: &Env,
    conf: &Map<String, Value>,
    cfg: PluginConfig,
    rec: &mut Record,
    version: &str,
    linger: &mut Linger,
) -> Result<Option<Value>, CniError> {
    let out = result(conf, version, Command::Add)?;
    match plan(env, conf, &cfg)? {
        PodPlan::Capture(rs) => {
            rec.rules = Some(rs.rule_count());
            rec.set_elements = Some(rs.sets.iter().map(|s| s.elems.len()).sum());
            *linger = pod::apply(Path::new(&env.netns), &rs)?;
            rec.decision = "captured".into();
        }
        PodPlan::Skip(why) => rec.decision = format!("skipped: {why}"),
    }
    Ok(Some(out))
}

fn check(
    env: &Env,
    conf: &Map<String, Value>,
    cfg: PluginConfig,
    rec: &mut Record,
    version: &str,
) -> Result<Option<Value>, CniError> {
    let out = result(conf, version, Command::Check)?;
    let planned = plan(env, conf, &cfg)?;
    let diffs = match &planned {
        PodPlan::Capture(rs) => pod::diff(Path::new(&env.netns), rs)?.differences,
        PodPlan::Skip(why)
            if pod::in_netns_at(Path::new(&env.netns), Sockets::Netfilter, |k| {
                k.table_exists()
            })? =>
        {
            vec![format!(
                "table inet {} exists but the pod is not captured ({why})",
                ruleset::TABLE
            )]
        }
        PodPlan::Skip(_) => Vec::new(),
    };
    if !diffs.is_empty() {
        return Err(CniError::new(
            CHECK_MISMATCH,
            format!("pod ruleset differs from the plan: {}", diffs.join("; ")),
        ));
    }
    rec.decision = match planned {
        PodPlan::Capture(_) => "checked: ruleset matches".into(),
        PodPlan::Skip(_) => "checked: not captured, no table".into(),
    };
    Ok(Some(out))
}

fn del(
    env: &Env,
    conf: &Map<String, Value>,
    cfg: Result<PluginConfig, CniError>,
    rec: &mut Record,
    linger: &mut Linger,
) -> Result<(), CniError> {
    if env.netns.is_empty() {
        rec.decision = "nothing to delete: no netns given".into();
        return Ok(());
    }
    let ns = match Netns::open(Path::new(&env.netns)) {
        Ok(ns) => ns,
        Err(e) if e.is_gone() => {
            rec.decision = "nothing to delete: netns is gone".into();
            return Ok(());
        }
        Err(e) => return Err(pod::netns_error(e)),
    };
    // What to remove besides the table: the TPROXY routing if this pod's plan had it, and
    // `::6` if we added it (it carries our mark). If the plan cannot be made (DEL must not
    // fail on config), the routing rule and route, which are unambiguously ours.
    let (routing, sockets) = match cfg.and_then(|c| plan(env, conf, &c)) {
        Ok(PodPlan::Capture(rs)) => (rs.routing, Sockets::to_compare(&rs)),
        Ok(PodPlan::Skip(_)) => (None, Sockets::Netfilter),
        Err(_) => (Some(ruleset::Routing::default()), Sockets::Routing),
    };
    let (existed, l) = pod::in_netns_lingering(&ns, sockets, |k| k.delete(routing.as_ref()))?;
    *linger = l;
    rec.decision = if existed {
        "deleted".into()
    } else {
        "nothing to delete: no table".into()
    };
    Ok(())
}

/// Why STATUS finds the plugin unavailable.
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    #[error("cannot create a scratch network namespace: {0}")]
    Scratch(nix::Error),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
}

/// STATUS: can this kernel take our ruleset? Installs the default istio ruleset in a
/// throwaway network namespace that disappears with the thread that made it.
fn status(rec: &mut Record) -> Result<(), CniError> {
    let rs = default_ruleset();
    let probe = std::thread::spawn(move || -> Result<(), Unavailable> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(Unavailable::Scratch)?;
        Ok(Kernel::open()?.replace(&rs)?)
    });
    match probe.join() {
        Ok(Ok(())) => {
            rec.decision = "available".into();
            Ok(())
        }
        Ok(Err(e)) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("plugin not available: {e}"),
        )),
        Err(_) => Err(CniError::new(
            code::NOT_AVAILABLE,
            "plugin not available: the probe failed",
        )),
    }
}

/// The ruleset of a pod with the istio profile's defaults and no annotations beyond the status.
pub fn default_ruleset() -> Ruleset {
    let ann: config::Annotations = [(policy::istio::STATUS.to_string(), "{}".to_string())].into();
    let pod = Pod {
        annotations: Some(&ann),
        ..Pod::default()
    };
    match policy::decide(&PluginConfig::default(), &pod) {
        Ok(Decision::Capture(p)) => ruleset::build(&p),
        // The defaults always capture; an empty ruleset would only make STATUS weaker.
        _ => Ruleset {
            sets: Vec::new(),
            chains: Vec::new(),
            routing: None,
            passthrough6: crate::policy::Passthrough6::No,
        },
    }
}

#[cfg(test)]
mod tests {
    //! The verbs' error paths that stop before the kernel (the kernel paths are in tests/).
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn invoke(command: &str, conf: &str) -> Output {
        let env: HashMap<&str, String> = [
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", "abc".into()),
            ("CNI_NETNS", "/run/netns/does-not-exist-unit".into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_PATH", "/opt/cni/bin".into()),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0".into(),
            ),
        ]
        .into();
        run(|k| env.get(k).cloned(), conf.as_bytes())
    }

    fn code_of(o: &Output) -> u64 {
        assert!(!o.ok);
        o.stdout.as_ref().unwrap()["code"].as_u64().unwrap()
    }

    fn conf(extra: Value) -> String {
        let mut c = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "mesh-redirect",
            "prevResult": {"cniVersion": "1.0.0", "ips": []},
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"sidecar.istio.io/status": "{}"}}});
        if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
            c.extend(e);
        }
        c.to_string()
    }

    #[test]
    fn version_needs_no_stdin() {
        let o = invoke("VERSION", "");
        assert!(o.ok);
        assert_eq!(o.stdout.unwrap()["cniVersion"], "1.1.0");
    }

    #[test]
    fn error_codes_before_the_kernel() {
        assert_eq!(code_of(&invoke("ADD", "{not json")), 6);
        assert_eq!(
            code_of(&invoke("ADD", &conf(json!({"cniVersion": "9.9.9"})))),
            1
        );
        assert_eq!(
            code_of(&invoke("CHECK", &conf(json!({"cniVersion": "0.3.1"})))),
            1
        );
        assert_eq!(
            code_of(&invoke("ADD", &conf(json!({"prevResult": null})))),
            7
        );
        assert_eq!(code_of(&invoke("ADD", &conf(json!({"inboundPort": 0})))), 7);
        let bad = json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {
            "sidecar.istio.io/status": "{}", "traffic.sidecar.istio.io/includeInboundPorts": "x"}}});
        let o = invoke("ADD", &conf(bad));
        assert_eq!(code_of(&o), 100);
        assert_eq!(
            o.stdout.unwrap()["cniVersion"],
            "1.0.0",
            "errors speak the config's version"
        );
        // Captured pod, netns missing: 101.
        assert_eq!(code_of(&invoke("ADD", &conf(json!({})))), 101);
    }

    #[test]
    fn skipped_pods_never_touch_the_netns() {
        // The netns does not exist; a skip must still succeed and pass prevResult through.
        let skip = json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {}}});
        let o = invoke("ADD", &conf(skip));
        assert!(o.ok);
        assert_eq!(o.stdout.unwrap(), json!({"cniVersion": "1.0.0", "ips": []}));
    }

    #[test]
    fn del_succeeds_when_the_netns_is_gone_even_with_a_bad_config() {
        let o = invoke("DEL", &conf(json!({"proxyUID": "nope"})));
        assert!(o.ok, "{:?}", o.stdout);
        assert!(o.stdout.is_none());
        assert!(invoke("GC", &conf(json!({"cniVersion": "1.1.0"}))).ok);
    }
}
