//! A memory cgroup of the test's own, below the test process's own memory cgroup, with a
//! limit (as the kubelet gives a container its `resources.limits.memory`): cgroup v1's memory
//! controller where it is mounted, else cgroup v2. Removed on drop (its processes must be gone
//! by then).

use std::path::{Path, PathBuf};

pub struct MemCgroup {
    pub dir: PathBuf,
    v2: bool,
}

/// Where the memory controller is mounted, and whether it is cgroup v2.
fn memory_root() -> Option<(PathBuf, bool)> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory") {
            return Some((PathBuf::from(f[1]), false));
        }
    }
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 3
            && f[2] == "cgroup2"
            && std::fs::read_to_string(Path::new(f[1]).join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
        {
            return Some((PathBuf::from(f[1]), true));
        }
    }
    None
}

/// This process's cgroup path in the hierarchy (`/proc/self/cgroup`).
fn own_path(v2: bool) -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (id, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            let hit = if v2 {
                id == "0" && ctrl.is_empty()
            } else {
                ctrl.split(',').any(|c| c == "memory")
            };
            hit.then(|| path.to_string())
        })
        .next()
        .unwrap_or_else(|| "/".into())
}

impl MemCgroup {
    pub fn new(name: &str, limit: u64) -> MemCgroup {
        let (root, v2) = memory_root().expect("no memory cgroup controller on this machine");
        let parent = root.join(own_path(v2).trim_start_matches('/'));
        if v2 {
            // Children get the memory controller only if the parent hands it down.
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory");
        }
        let dir = parent.join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let cg = MemCgroup { dir, v2 };
        let (file, value) = if v2 {
            ("memory.max", limit.to_string())
        } else {
            ("memory.limit_in_bytes", limit.to_string())
        };
        std::fs::write(cg.dir.join(file), value).expect("set the memory limit");
        if !v2 {
            // Swap would hide the limit.
            let _ = std::fs::write(
                cg.dir.join("memory.memsw.limit_in_bytes"),
                limit.to_string(),
            );
            let _ = std::fs::write(cg.dir.join("memory.swappiness"), "0");
        }
        cg
    }

    /// The file a process writes its pid into to join.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Peak usage in bytes.
    pub fn peak(&self) -> u64 {
        let f = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        read_u64(&self.dir.join(f))
    }

    /// Current usage in bytes.
    pub fn usage(&self) -> u64 {
        let f = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        read_u64(&self.dir.join(f))
    }

    /// Processes the kernel's OOM killer killed in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let f = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(f))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Processes may take a moment to leave after they were killed.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
