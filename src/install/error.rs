//! The installer's one error type, and what makes two errors the same one again.

use std::io;
use std::mem::Discriminant;
use std::path::PathBuf;

/// What the installer could not do.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or directory in the CNI dirs (named as the messages show it).
    #[error("{file}: {err}")]
    File { file: String, err: io::Error },
    #[error("primary config {0} is a symlink; refusing to replace it")]
    PrimaryIsSymlink(String),
    /// A chain mesh-redirect cannot speak (its `cniVersion`): every pod's ADD would fail.
    #[error("primary config {file}: {why}; not chaining into it")]
    CannotSpeak { file: String, why: String },
    #[error(
        "cannot turn {0} into a list: the .conflist name would be longer than {max} bytes",
        max = super::confdir::NAME_MAX
    )]
    ListNameTooLong(String),
    #[error("cannot turn {from} into a list: {to} exists and is not ours")]
    ListNameTaken { from: String, to: String },
    #[error("{0}: the file displaced while chaining is not a regular file")]
    DisplacedNotRegular(String),
    #[error("cannot read --plugin-config {}: {err}", path.display())]
    PluginConfigUnreadable { path: PathBuf, err: io::Error },
    #[error("--plugin-config {} is not a JSON object", .0.display())]
    PluginConfigNotObject(PathBuf),
    /// A plugin config the plugin itself would refuse at every ADD.
    #[error("plugin config: {0}")]
    PluginConfig(String),
    /// Setting up the watch loop (signals, inotify, poll).
    #[error("{what}: {err}")]
    Setup { what: String, err: nix::Error },
}

/// What two errors share when they are "the same one again": the kind, the file and, for I/O,
/// the kind of I/O error, not the text around them. Repeats are logged once, and readiness
/// carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    kind: Discriminant<InstallError>,
    file: Option<String>,
    io: Option<io::ErrorKind>,
}

impl InstallError {
    /// A file operation's error, naming the file.
    pub fn file(file: impl Into<String>, err: io::Error) -> InstallError {
        InstallError::File {
            file: file.into(),
            err,
        }
    }

    pub fn cause(&self) -> Cause {
        use InstallError::*;
        let (file, io) = match self {
            File { file, err } => (Some(file.clone()), Some(err.kind())),
            PrimaryIsSymlink(f) | ListNameTooLong(f) | DisplacedNotRegular(f) => {
                (Some(f.clone()), None)
            }
            CannotSpeak { file, .. } => (Some(file.clone()), None),
            ListNameTaken { to, .. } => (Some(to.clone()), None),
            PluginConfigUnreadable { path, err } => {
                (Some(path.display().to_string()), Some(err.kind()))
            }
            PluginConfigNotObject(p) => (Some(p.display().to_string()), None),
            PluginConfig(_) | Setup { .. } => (None, None),
        };
        Cause {
            kind: std::mem::discriminant(self),
            file,
            io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_failure_again_is_one_cause_whatever_its_text() {
        let a = InstallError::file("10-x.conflist", io::Error::from_raw_os_error(libc::EACCES));
        let b = InstallError::file(
            "10-x.conflist",
            io::Error::other("permission denied (again)"),
        );
        assert_ne!(
            a.cause(),
            b.cause(),
            "a different kind of I/O error is news"
        );
        let c = InstallError::file("10-x.conflist", io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(a.cause(), c.cause());
        let d = InstallError::file("20-y.conflist", io::Error::from_raw_os_error(libc::EACCES));
        assert_ne!(a.cause(), d.cause(), "another file is news");
    }
}
