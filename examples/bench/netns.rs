//! Network namespaces: `ip netns add PREFIX-N`, deleted on drop.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

pub(crate) static NS_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `ip netns add PREFIX-N`, deleted on drop.
pub(crate) struct Ns {
    pub(crate) name: String,
    pub(crate) path: String,
    pub(crate) file: File,
}

impl Ns {
    pub(crate) fn new(prefix: &str) -> Ns {
        let name = format!("{prefix}-{}", NS_COUNTER.fetch_add(1, Ordering::SeqCst));
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip netns add {name} failed");
        let path = format!("/run/netns/{name}");
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Ns { name, path, file }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// `ip -n NAME ARGS...` (setup only, never timed).
    pub(crate) fn ip(&self, args: &str) {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        let st = Command::new("ip").args(&full).status().expect("run ip");
        assert!(st.success(), "ip {full:?} failed");
    }

    /// Enters this namespace with the calling thread (for threads that live in it).
    pub(crate) fn enter(&self) {
        nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", self.path));
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
