//! Node installer (docs/DESIGN.md, "The installer's write protocol"): what chaining
//! mesh-redirect into a node's CNI config takes, file by file, and `mesh-redirect uninstall`.
//! The loop that keeps it chained is the node agent's (`agent::installer`); the plugin binary
//! carries only what `uninstall` needs.

pub mod confdir;
pub mod conflist;
pub mod error;
pub mod files;

use crate::args::{self, CliError, Spec};
pub use confdir::unchain_dir;
pub use error::InstallError;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `install`/`uninstall` options; every flag also reads an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// Chain into this file instead of the lexically first valid one.
    pub conf_name: Option<String>,
    /// The mesh-redirect entry (JSON object) to chain.
    pub plugin_config: Option<PathBuf>,
    pub readiness_addr: Option<SocketAddr>,
    pub keep_binary: bool,
    /// On SIGTERM/SIGINT leave the entry and the binary in place (for rollouts; see README).
    pub keep_on_exit: bool,
    /// The node's dynamic loader (mounted), to check the node's glibc can run the plugin.
    pub node_loader: Option<PathBuf>,
}

/// The plugin binary's summary of `install` and `uninstall` (the agent's `help` lists every
/// flag, from the same declarations).
pub const USAGE: &str = "  mesh-redirect install --cni-bin-dir DIR --cni-conf-dir DIR [FLAGS]
      The node agent (this execs `mesh-redirect-agent install`, beside this binary): copy the
      plugin into DIR, chain it last into the primary network config, keep it there, repair
      meshed pods that lack their table, serve /readyz, /healthz and /metrics, and undo the
      chain on SIGTERM/SIGINT unless --keep-on-exit. `mesh-redirect-agent help` lists every
      flag and its environment variable.
  mesh-redirect uninstall --cni-bin-dir DIR --cni-conf-dir DIR [--keep-binary]
      Remove the chain entry (restoring the original files) and the binary, once.";

/// The flags `install` and `uninstall` take (the agent adds its own).
pub const SPECS: &[Spec] = &[
    Spec::value(
        "--cni-bin-dir",
        "MESH_REDIRECT_CNI_BIN_DIR",
        "DIR",
        "the node's CNI bin dir (as mounted): the plugin and its libraries go there",
    ),
    Spec::value(
        "--cni-conf-dir",
        "MESH_REDIRECT_CNI_CONF_DIR",
        "DIR",
        "the node's CNI conf dir (as mounted): the entry is chained into the runtime's first file",
    ),
    Spec::value(
        "--conf-name",
        "MESH_REDIRECT_CONF_NAME",
        "FILE",
        "chain into this file instead of the runtime's first one",
    ),
    Spec::value(
        "--plugin-config",
        "MESH_REDIRECT_PLUGIN_CONFIG",
        "FILE",
        "the mesh-redirect entry as JSON (type and the annotations capability are forced)",
    ),
    Spec::value(
        "--readiness-addr",
        "MESH_REDIRECT_READINESS_ADDR",
        "HOST:PORT",
        "serve /readyz and /healthz here (keep it on loopback: the readiness body names pods)",
    ),
    Spec::switch(
        "--keep-binary",
        "MESH_REDIRECT_KEEP_BINARY",
        "leave the plugin binary in place on exit or uninstall",
    ),
    Spec::value(
        "--node-loader",
        "MESH_REDIRECT_NODE_LOADER",
        "PATH",
        "the node's dynamic loader (its /lib64/ld-linux-x86-64.so.2, mounted read-only): asked \
         for the node's glibc, and the plugin is not installed if it needs a newer one (every \
         ADD would fail)",
    ),
    Spec::switch(
        "--keep-on-exit",
        "MESH_REDIRECT_KEEP_ON_EXIT",
        "on SIGTERM/SIGINT leave the entry and the binary in place (a rollout has no window \
         in which new pods go uncaptured)",
    ),
];

impl Options {
    /// Flags win over the environment (`env` is normally `std::env::var`).
    pub fn parse(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Options, CliError> {
        Options::from_parsed(&args::parse(args, SPECS, env)?)
    }

    /// From flags parsed against a spec list that includes [`SPECS`].
    pub fn from_parsed(f: &args::Parsed<'_>) -> Result<Options, CliError> {
        let dir = |flag: &str| -> Result<PathBuf, CliError> {
            let d = PathBuf::from(
                f.get(flag)
                    .ok_or_else(|| CliError::Usage(format!("{flag} is required")))?,
            );
            if !d.is_absolute() {
                return Err(CliError::Usage(format!("{flag} must be an absolute path")));
            }
            Ok(d)
        };
        let readiness_addr = f.parsed("--readiness-addr", "HOST:PORT", |a| {
            a.parse::<SocketAddr>().ok()
        })?;
        let conf_name = f.get("--conf-name");
        if let Some(n) = &conf_name
            && (n.contains('/') || n.starts_with('.'))
        {
            return Err(CliError::Usage(format!(
                "--conf-name {n:?} must be a file name in the conf dir"
            )));
        }
        Ok(Options {
            bin_dir: dir("--cni-bin-dir")?,
            conf_dir: dir("--cni-conf-dir")?,
            conf_name,
            plugin_config: f.get("--plugin-config").map(PathBuf::from),
            readiness_addr,
            keep_binary: f.on("--keep-binary"),
            keep_on_exit: f.on("--keep-on-exit"),
            node_loader: f.get("--node-loader").map(PathBuf::from),
        })
    }

    /// The mesh-redirect entry to chain: the operator's `--plugin-config` with `type` and the
    /// annotations capability forced.
    pub fn entry(&self) -> Result<Value, InstallError> {
        let plugin_config = match &self.plugin_config {
            None => None,
            Some(p) => {
                let text =
                    std::fs::read(p).map_err(|err| InstallError::PluginConfigUnreadable {
                        path: p.clone(),
                        err,
                    })?;
                match serde_json::from_slice::<Value>(&text) {
                    Ok(Value::Object(m)) => Some(m),
                    _ => return Err(InstallError::PluginConfigNotObject(p.clone())),
                }
            }
        };
        let entry = conflist::entry(plugin_config.as_ref());
        // Fail early on a config the plugin itself would reject at every ADD.
        if let Some(m) = entry.as_object() {
            crate::config::PluginConfig::from_conf(m)
                .map_err(|e| InstallError::PluginConfig(e.msg))?;
        }
        Ok(entry)
    }
}

/// One JSON log line on stderr.
pub(crate) fn log(level: &str, msg: &str, extra: Value) {
    crate::log::line(crate::log::Component::Installer, level, msg, extra);
}

/// Undoes everything: our entries (original files back) and, unless kept, the binary.
pub fn cleanup(opts: &Options) -> Result<(), InstallError> {
    unchain_dir(&opts.conf_dir, None)?;
    files::release_claims(&opts.conf_dir);
    if !opts.keep_binary {
        files::remove_binary(&opts.bin_dir)
            .map_err(|e| InstallError::file(opts.bin_dir.display().to_string(), e))?;
    }
    log(
        "info",
        "mesh-redirect removed",
        json!({"keptBinary": opts.keep_binary}),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options_from_flags_and_env() {
        let o = Options::parse(
            &args(&["--cni-bin-dir", "/b", "--cni-conf-dir=/c", "--keep-binary"]),
            |_| None,
        )
        .unwrap();
        assert_eq!(o.bin_dir, PathBuf::from("/b"));
        assert_eq!(o.conf_dir, PathBuf::from("/c"));
        assert!(o.keep_binary);
        assert!(!o.keep_on_exit);
        assert_eq!(o.readiness_addr, None);
        let env = |k: &str| match k {
            "MESH_REDIRECT_CNI_BIN_DIR" => Some("/eb".to_string()),
            "MESH_REDIRECT_CNI_CONF_DIR" => Some("/ec".to_string()),
            "MESH_REDIRECT_READINESS_ADDR" => Some("0.0.0.0:8000".to_string()),
            "MESH_REDIRECT_KEEP_BINARY" => Some("true".to_string()),
            "MESH_REDIRECT_KEEP_ON_EXIT" => Some("true".to_string()),
            "MESH_REDIRECT_CONF_NAME" => Some("10-calico.conflist".to_string()),
            _ => None,
        };
        let o = Options::parse(&args(&["--cni-bin-dir", "/flag-wins"]), env).unwrap();
        assert_eq!(o.bin_dir, PathBuf::from("/flag-wins"));
        assert_eq!(o.conf_dir, PathBuf::from("/ec"));
        assert_eq!(o.readiness_addr, Some("0.0.0.0:8000".parse().unwrap()));
        assert!(o.keep_binary);
        assert!(o.keep_on_exit);
        assert_eq!(o.conf_name.as_deref(), Some("10-calico.conflist"));
    }

    #[test]
    fn options_errors() {
        for bad in [
            vec!["--cni-conf-dir", "/c"],
            vec!["--cni-bin-dir", "rel", "--cni-conf-dir", "/c"],
            vec![
                "--cni-bin-dir",
                "/b",
                "--cni-conf-dir",
                "/c",
                "--readiness-addr",
                "nope",
            ],
            vec![
                "--cni-bin-dir",
                "/b",
                "--cni-conf-dir",
                "/c",
                "--conf-name",
                "../x",
            ],
            vec![
                "--cni-bin-dir",
                "/b",
                "--cni-conf-dir",
                "/c",
                "--bogus",
                "1",
            ],
        ] {
            assert!(
                matches!(
                    Options::parse(&args(&bad), |_| None),
                    Err(CliError::Usage(_))
                ),
                "{bad:?}"
            );
        }
    }
}
