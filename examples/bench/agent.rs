//! The real node agent, run for the `variants` and `churn` sections: serving only its event
//! socket, on throwaway CNI dirs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A running node agent (the real one), serving only its event socket here.
pub(crate) struct AgentProc {
    pub(crate) child: std::process::Child,
    pub(crate) _dir: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// Starts `mesh-redirect-agent install` (beside `plugin`) on throwaway CNI dirs, chaining only,
/// with its event socket at `socket`; waits until the socket is there.
pub(crate) fn start_agent(plugin: &Path, dir: &Path, socket: &Path) -> Option<AgentProc> {
    let agent = plugin.with_file_name("mesh-redirect-agent");
    if !agent.exists() {
        return None;
    }
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    for d in [&bin, &conf] {
        std::fs::create_dir_all(d).ok()?;
    }
    std::fs::write(
        conf.join("10-bridge.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
    )
    .ok()?;
    let child = Command::new(&agent)
        .arg("install")
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .args(["--reconcile-period", "0", "--event-socket"])
        .arg(socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let a = AgentProc {
        child,
        _dir: dir.to_path_buf(),
    };
    let t = Instant::now();
    while !socket.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    socket.exists().then_some(a)
}
