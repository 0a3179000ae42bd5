//! Entering the pod's network namespace safely.
//!
//! The target is opened once and checked to be a network namespace other than our own (a
//! runtime bug passing the host's namespace must not capture the node's traffic). The calling
//! thread enters it only for the work given, and always returns to where it was.

use nix::sched::{CloneFlags, setns};
use nix::sys::stat::fstat;
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {0} does not exist")]
    Missing(PathBuf),
    #[error("{0} is not a network namespace (not an nsfs file: the namespace was torn down)")]
    TornDown(PathBuf),
    #[error("{0} is not a network namespace ({1})")]
    NotNetns(PathBuf, &'static str),
    #[error("{0} is the plugin's own network namespace (the host's); refusing to change it")]
    OwnNamespace(PathBuf),
    #[error("cannot open network namespace {0}: {1}")]
    Open(PathBuf, io::Error),
    #[error("cannot enter network namespace {0}: {1}")]
    Enter(PathBuf, nix::Error),
    #[error("cannot return to the original network namespace: {0}")]
    Return(nix::Error),
}

impl NetnsError {
    /// The namespace is gone: DEL treats this as success.
    pub fn is_gone(&self) -> bool {
        matches!(self, NetnsError::Missing(_) | NetnsError::TornDown(_))
    }
}

/// An opened, verified network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

fn own_netns() -> io::Result<File> {
    // thread-self: setns is per thread, and so is the namespace we must come back to.
    File::open("/proc/thread-self/ns/net")
}

impl Netns {
    /// Opens `path` (a bind-mounted netns file or `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let p = path.to_path_buf();
        if !path.is_absolute() {
            return Err(NetnsError::NotNetns(p, "not an absolute path"));
        }
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => NetnsError::Missing(p.clone()),
            _ => NetnsError::Open(p.clone(), e),
        })?;
        // A netns file whose namespace was torn down is left as an empty regular file.
        let fs = fstatfs(file.as_fd()).map_err(|e| NetnsError::Open(p.clone(), e.into()))?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(NetnsError::TornDown(p));
        }
        let target = fstat(file.as_fd()).map_err(|e| NetnsError::Open(p.clone(), e.into()))?;
        let own = own_netns()
            .and_then(|f| fstat(f.as_fd()).map_err(io::Error::from))
            .map_err(|e| NetnsError::Open(p.clone(), e))?;
        if (target.st_dev, target.st_ino) == (own.st_dev, own.st_ino) {
            return Err(NetnsError::OwnNamespace(p));
        }
        Ok(Netns { file, path: p })
    }

    /// Runs `f` with the calling thread inside this namespace, then returns to the original.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = own_netns()
            .map_err(|e| NetnsError::Open(PathBuf::from("/proc/thread-self/ns/net"), e))?;
        // CLONE_NEWNET makes the kernel check the fd is a network namespace (EINVAL otherwise).
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetnsError::Enter(self.path.clone(), e))?;
        // Back home even if `f` panics (the guard's drop), and checked when it does not.
        let guard = GoHome(Some(home));
        let out = f();
        guard.go()?;
        Ok(out)
    }
}

/// Returns the thread to its own network namespace when dropped.
struct GoHome(Option<File>);

impl GoHome {
    fn go(mut self) -> Result<(), NetnsError> {
        match self.0.take() {
            Some(home) => setns(home.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetnsError::Return),
            None => Ok(()),
        }
    }
}

impl Drop for GoHome {
    fn drop(&mut self) {
        if let Some(home) = self.0.take() {
            // Unwinding already: nothing better to do with an error than to leave it.
            let _ = setns(home.as_fd(), CloneFlags::CLONE_NEWNET);
        }
    }
}
