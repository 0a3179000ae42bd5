//! A small stand-in for the CNI project's `cnitool`, for machines without Go: runs a network's
//! plugin chain on a network namespace the way a runtime does. Same interface:
//!
//!   cnitool add|check|del NETWORK NETNS_PATH
//!
//! Environment: NETCONFPATH (default /etc/cni/net.d) holds `*.conf`/`*.conflist` files, the
//! network is the one whose `name` is NETWORK; CNI_PATH (default /opt/cni/bin); CNI_IFNAME
//! (default eth0); CNI_ARGS (`K=V;K=V`); CAP_ARGS (JSON object of capability arguments, e.g.
//! `{"io.kubernetes.cri.pod-annotations": {...}}`); CNI_CONTAINERID (default derived from the
//! netns path). ADD results are cached in CNI_CACHE_DIR (default /var/lib/cni/cnitool) for
//! CHECK and DEL, as libcni does.

use common::cnichain::{self, Attachment, Runtime};
use mesh_redirect::install::files::fnv1a;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn find_network(dir: &Path, name: &str) -> Result<Value, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            )
        })
        .collect();
    files.sort();
    for f in files {
        if let Ok(list) = cnichain::load_list(&f)
            && list.get("name").and_then(Value::as_str) == Some(name)
        {
            return Ok(list);
        }
    }
    Err(format!("no network named {name:?} in {}", dir.display()))
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [verb, net, netns] = args.as_slice() else {
        return Err("usage: cnitool add|check|del NETWORK NETNS_PATH".into());
    };
    let list = find_network(Path::new(&env_or("NETCONFPATH", "/etc/cni/net.d")), net)?;
    let cap_args = match std::env::var("CAP_ARGS") {
        Ok(s) if !s.is_empty() => match serde_json::from_str(&s) {
            Ok(Value::Object(m)) => m,
            _ => return Err("CAP_ARGS must be a JSON object".into()),
        },
        _ => Default::default(),
    };
    let digest = fnv1a(netns.as_bytes());
    let att = Attachment {
        container_id: env_or("CNI_CONTAINERID", &format!("cnitool-{digest:016x}")),
        netns: netns.clone(),
        ifname: env_or("CNI_IFNAME", "eth0"),
        args: env_or("CNI_ARGS", "")
            .split(';')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cap_args,
    };
    let rt = Runtime {
        cni_path: std::env::split_paths(&env_or("CNI_PATH", "/opt/cni/bin")).collect(),
        exec_netns: None,
    };
    let cache_dir = PathBuf::from(env_or("CNI_CACHE_DIR", "/var/lib/cni/cnitool"));
    let cache = cache_dir.join(format!("{net}-{}-{}", att.container_id, att.ifname));
    let cached = || -> Option<Value> { serde_json::from_slice(&std::fs::read(&cache).ok()?).ok() };
    match verb.as_str() {
        "add" => {
            let result = rt.add(&list, &att).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&cache_dir).map_err(|e| e.to_string())?;
            std::fs::write(&cache, result.to_string()).map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::to_string_pretty(&result).unwrap_or_default()
            );
        }
        "check" => rt
            .check(
                &list,
                &att,
                &cached().ok_or("no cached ADD result: run add first")?,
            )
            .map_err(|e| e.to_string())?,
        "del" => {
            rt.del(&list, &att, cached().as_ref())
                .map_err(|e| e.to_string())?;
            let _ = std::fs::remove_file(&cache);
        }
        other => return Err(format!("unknown verb {other:?} (add, check, del)")),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cnitool: {e}");
            ExitCode::FAILURE
        }
    }
}
