//! The CNI conf dir as the runtime reads it, and keeping our entry in its primary file without
//! ever losing a version the primary plugin wrote.
//!
//! Selection is libcni's: `ConfFiles` (every entry that is not a directory whose Go
//! `filepath.Ext` is `.conf`, `.conflist` or `.json`, names kept as bytes) sorted bytewise; the
//! runtime uses the first one, and containerd refuses the whole dir while that one is invalid.
//!
//! Replacing the primary races with its own writer. We never `rename` over it blindly: our
//! version goes in with `renameat2(RENAME_EXCHANGE)`, which hands back the inode it displaced.
//! If that is not the version we read (renamed over the name meanwhile, or rewritten in place),
//! it is newer, and it is chained and exchanged in turn. A displaced inode stays watched for a
//! while (inotify on the inode, plus an fd to read it), because a writer that opened it before
//! the swap writes into it after: that write is a newer version too.

use super::conflist::{self, Conf, ConfError};
use super::error::InstallError;
use super::files::{self, TempTag, Version};
use super::log;
use nix::sys::inotify::{AddWatchFlags, Inotify, WatchDescriptor};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// libcni's extensions, compared with Go's `filepath.Ext`.
const EXTENSIONS: [&[u8]; 3] = [b".conf", b".conflist", b".json"];
/// Longest file name the kernel takes (and so the runtime reads).
pub const NAME_MAX: usize = 255;
/// Re-chaining this often within FLAP_WINDOW means something else fights over the file.
const FLAP_LIMIT: usize = 5;
const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// How long a displaced inode is watched for late in-place writes, and how many at once.
const DISPLACED_FOR: Duration = Duration::from_secs(10);
const DISPLACED_MAX: usize = 32;
/// Exchanges in one go before leaving the rest to the writer's next event.
const MAX_ROUNDS: usize = 64;
/// How long a one-shot restore (uninstall) watches what it displaced for a late in-place write.
const SETTLE: Duration = Duration::from_millis(100);

/// Go's `filepath.Ext` of a file name: from the last `.` on, or empty.
pub fn go_ext(name: &[u8]) -> &[u8] {
    name.iter()
        .rposition(|&b| b == b'.')
        .map_or(&[][..], |i| &name[i..])
}

/// Whether the runtime reads `name` as a network config.
pub fn is_conf(name: &OsStr) -> bool {
    EXTENSIONS.contains(&go_ext(name.as_bytes()))
}

/// Whether the runtime reads `name` as a list (libcni: the `.conflist` suffix).
pub fn is_list(name: &OsStr) -> bool {
    go_ext(name.as_bytes()) == b".conflist"
}

/// The name without its extension.
fn stem(name: &OsStr) -> &[u8] {
    let b = name.as_bytes();
    &b[..b.len() - go_ext(b).len()]
}

/// `10-bridge.conf` → `10-bridge.conflist`; `None` when that would not fit in a file name.
pub fn list_twin(name: &OsStr) -> Option<OsString> {
    let mut b = stem(name).to_vec();
    b.extend_from_slice(b".conflist");
    (b.len() <= NAME_MAX).then(|| OsString::from_vec(b))
}

/// Where the byte copy of `name` as the primary plugin wrote it is kept: `NAME` +
/// `.mesh-redirect-orig` (not a config extension, so runtimes skip it), or for a name too long
/// for that, a fixed-length name derived from it (found again by [`original_of_backup`]).
pub fn backup_name(name: &OsStr) -> OsString {
    let suffix = files::BACKUP_SUFFIX.as_bytes();
    let b = name.as_bytes();
    if b.len() + suffix.len() <= NAME_MAX {
        let mut v = b.to_vec();
        v.extend_from_slice(suffix);
        return OsString::from_vec(v);
    }
    OsString::from(format!(".{:016x}{}", files::fnv1a(b), files::BACKUP_SUFFIX))
}

/// The config name a backup belongs to: the name with the suffix removed, or for a derived
/// one, the name (or the `.conf`/`.json` a `.conflist` in `names` was made from) it derives from.
pub fn original_of_backup(backup: &OsStr, names: &[OsString]) -> Option<OsString> {
    let b = backup.as_bytes();
    let orig = b.strip_suffix(files::BACKUP_SUFFIX.as_bytes())?;
    // A derived name (`.HASH` + suffix) has no config extension left once stripped.
    if is_conf(OsStr::from_bytes(orig)) && backup_name(OsStr::from_bytes(orig)) == backup {
        return Some(OsString::from_vec(orig.to_vec()));
    }
    names
        .iter()
        .flat_map(|n| {
            let mut c = vec![n.clone()];
            if is_list(n) {
                for ext in [&b".conf"[..], b".json"] {
                    let mut v = stem(n).to_vec();
                    v.extend_from_slice(ext);
                    c.push(OsString::from_vec(v));
                }
            }
            c
        })
        .find(|n| backup_name(n) == backup)
}

/// libcni's `ConfFiles` + `sort.Strings`: every non-directory entry with a config extension,
/// bytewise ordered. Names need not be UTF-8.
pub fn conf_files(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names: Vec<OsString> = std::fs::read_dir(dir)?
        .flatten()
        // Go's DirEntry.IsDir: the entry's own type (a symlink to a dir is not a dir).
        .filter(|e| !e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .filter(|n| is_conf(n))
        .collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// A name for logs (not necessarily UTF-8 on disk).
pub fn show(name: &OsStr) -> String {
    name.to_string_lossy().into_owned()
}

/// The primary as read once: everything decided and written comes from this version.
struct Primary {
    name: OsString,
    conf: Conf,
    version: Version,
}

/// What the conf dir offers.
/// Why the runtime's first file is not one we can chain into yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("not a readable regular file")]
    Unreadable,
    #[error(transparent)]
    Conf(#[from] ConfError),
}

/// Why we are not chained, while waiting for a (valid) primary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Waiting {
    #[error("no primary network config yet")]
    NoPrimary,
    #[error("the runtime's first network config {file} is not valid ({why}): waiting for it")]
    Invalid { file: String, why: Invalid },
}

enum Found {
    Primary(Primary),
    /// No config file yet.
    Nothing,
    /// The runtime's first file is not a usable config (half-written, or broken): wait.
    Invalid(OsString, Invalid),
}

/// An inode we took out from under a config name, watched for late in-place writes.
struct Displaced {
    wd: WatchDescriptor,
    file: File,
    /// Its temporary name: it stays linked while watched, so that an installer started after
    /// a crash finds a late write into it (`recover`).
    tmp: OsString,
    /// The name it was under, and whether we turned that `.conf` into a list.
    name: OsString,
    converted: bool,
    /// Its content when last read.
    bytes: Vec<u8>,
    /// [`ConfDir::foreign`] when it was taken out.
    foreign: u64,
    until: Instant,
}

/// The conf dir side of the installer: our entry last in the primary, nowhere else.
pub struct ConfDir {
    pub dir: PathBuf,
    /// `--conf-name`: this file instead of the runtime's first.
    pub conf_name: Option<OsString>,
    pub entry: Value,
    /// The file our entry is in, once chained.
    pub chained: Option<OsString>,
    /// Why we are not chained, while waiting for a (valid) primary.
    pub waiting: Option<Waiting>,
    /// What is under the primary's name as of our last look or write.
    known: Option<(OsString, Version)>,
    /// Versions found under the primary's name that we did not put there: the primary
    /// plugin's writes, in the order we saw them.
    foreign: u64,
    displaced: Vec<Displaced>,
    rewrites: VecDeque<Instant>,
    /// Times the entry was put back after the file was rewritten without it.
    pub rechains: u64,
    flapped_at: Option<Instant>,
    reported: Option<(OsString, Invalid)>,
    waiting_logged: bool,
    /// The plugin types of the primary as last read (the first is the primary plugin).
    pub primary_types: Vec<String>,
    /// Other meshes' capture plugins in the chain, as last logged.
    conflicts_logged: Vec<String>,
}

impl ConfDir {
    pub fn new(dir: PathBuf, conf_name: Option<OsString>, entry: Value) -> ConfDir {
        ConfDir {
            dir,
            conf_name,
            entry,
            chained: None,
            waiting: None,
            known: None,
            foreign: 0,
            displaced: Vec::new(),
            rewrites: VecDeque::new(),
            rechains: 0,
            flapped_at: None,
            reported: None,
            waiting_logged: false,
            primary_types: Vec::new(),
            conflicts_logged: Vec::new(),
        }
    }

    /// Another mesh's capture plugin in the chain we join (`istio-cni`, …): new pods would get
    /// two capture layers. Migrating is fine for a while: install mesh-redirect, roll the
    /// pods, then remove the mesh's own CNI (README, "Migrating").
    pub fn conflicts(&self) -> Vec<String> {
        self.primary_types
            .iter()
            .filter(|t| conflist::MESH_CNI_TYPES.contains(&t.as_str()))
            .cloned()
            .collect()
    }

    /// What the flapping warning says: the primary plugin by type, and for Cilium the fix.
    pub fn flap_hint(&self) -> String {
        let file = self.chained.as_deref().map(show).unwrap_or_default();
        match self.primary_types.first().map(String::as_str) {
            Some("cilium-cni") => format!(
                "Cilium's agent keeps rewriting {file} without mesh-redirect: its cni.exclusive \
                 (the Helm default, true) makes it own the CNI config; set Helm value \
                 cni.exclusive=false"
            ),
            Some(t) => format!(
                "the primary plugin's installer ({t}) keeps rewriting {file} without \
                 mesh-redirect; configure it to keep other plugins in its chain"
            ),
            None => format!("something keeps rewriting {file} without mesh-redirect"),
        }
    }

    fn find_primary(&mut self) -> io::Result<Found> {
        let names = match &self.conf_name {
            // A single-plugin file we turned into a list lives on under the list's name.
            Some(n) => std::iter::once(n.clone()).chain(list_twin(n)).collect(),
            None => conf_files(&self.dir)?,
        };
        for name in names {
            let path = self.dir.join(&name);
            // The runtime reads through symlinks (refused later, when we would replace one).
            let Ok((file, version)) = files::open_version(&path, true) else {
                // Gone meanwhile, or not a regular file: the runtime fails on it the same way.
                if self.conf_name.is_some() {
                    continue;
                }
                return Ok(Found::Invalid(name, Invalid::Unreadable));
            };
            drop(file);
            return Ok(match conflist::parse(&version.bytes, is_list(&name)) {
                Ok(conf) => Found::Primary(Primary {
                    name,
                    conf,
                    version,
                }),
                Err(why) => Found::Invalid(name, why.into()),
            });
        }
        Ok(Found::Nothing)
    }

    /// Brings the dir to "our entry last in the primary, nowhere else". `Ok(false)`: waiting
    /// (no primary, or an invalid one).
    pub fn reconcile(&mut self, inotify: &Inotify) -> Result<bool, InstallError> {
        let dir = self.dir.clone();
        let in_dir = |e| InstallError::file(dir.display().to_string(), e);
        // What an installer that died mid-write left (a no-op unless it did).
        recover(&dir).map_err(in_dir)?;
        let found = self.find_primary().map_err(in_dir)?;
        let p = match found {
            Found::Primary(p) => p,
            Found::Nothing => {
                if !self.waiting_logged {
                    log(
                        "info",
                        "waiting for a primary network config",
                        json!({"dir": dir}),
                    );
                    self.waiting_logged = true;
                }
                self.chained = None;
                self.waiting = Some(Waiting::NoPrimary);
                return Ok(false);
            }
            Found::Invalid(name, why) => {
                self.waiting = Some(Waiting::Invalid {
                    file: show(&name),
                    why: why.clone(),
                });
                let key = (name.clone(), why.clone());
                if self.reported.as_ref() != Some(&key) {
                    log(
                        "warn",
                        "the runtime's first network config is not valid: waiting for it (the \
                         runtime does not load the dir either), touching no other file",
                        json!({"file": show(&name), "error": why.to_string()}),
                    );
                    self.reported = Some(key);
                }
                self.chained = None;
                return Ok(false);
            }
        };
        self.waiting_logged = false;
        self.reported = None;
        self.waiting = None;
        if self
            .known
            .as_ref()
            .is_none_or(|(n, v)| *n != p.name || *v != p.version)
        {
            self.foreign += 1;
        }
        let path = dir.join(&p.name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(InstallError::PrimaryIsSymlink(show(&p.name)));
        }
        let list = conflist::as_list(&p.conf);
        self.primary_types = conflist::types(&list)
            .into_iter()
            .filter(|t| t != conflist::TYPE)
            .collect();
        let conflicts = self.conflicts();
        if conflicts != self.conflicts_logged {
            if !conflicts.is_empty() {
                log(
                    "warn",
                    "another mesh's capture plugin is in the chain: new pods get two capture \
                     layers until it is removed (migrating: install mesh-redirect, roll the \
                     pods, then remove it)",
                    json!({"file": show(&p.name), "plugins": conflicts}),
                );
            }
            self.conflicts_logged = conflicts;
        }
        // A chain mesh-redirect cannot speak would fail every pod's ADD on the node.
        crate::protocol::negotiate_version(&list, crate::protocol::Command::Add).map_err(|e| {
            InstallError::CannotSpeak {
                file: show(&p.name),
                why: e.msg,
            }
        })?;
        let target = match p.conf {
            Conf::List(_) => p.name.clone(),
            Conf::Single(_) => {
                list_twin(&p.name).ok_or_else(|| InstallError::ListNameTooLong(show(&p.name)))?
            }
        };
        if matches!(p.conf, Conf::List(_)) && conflist::is_chained(&list, &self.entry) {
            self.known = Some((p.name.clone(), p.version));
            self.chained = Some(target.clone());
            return self.unchain_others(&target).map(|()| true);
        }
        if target != p.name && dir.join(&target).exists() && !self.is_ours_converted(&target) {
            return Err(InstallError::ListNameTaken {
                from: show(&p.name),
                to: show(&target),
            });
        }
        let mode = files::mode_of(&path);
        self.keep_backup(&p.name, &list, &p.version.bytes, mode)?;
        let chained = conflist::render(&conflist::chain(&list, &self.entry));
        if target == p.name {
            self.replace(inotify, &p.name, p.version, chained, mode)?;
        } else {
            files::write_atomic(&dir, &target, &chained, mode)
                .map_err(|e| InstallError::file(show(&target), e))?;
            self.move_out(inotify, &p.name, &p.version)?;
        }
        let rewritten = self.chained.as_ref() == Some(&target);
        log(
            "info",
            if rewritten {
                "re-chained after the file was rewritten"
            } else {
                "chained"
            },
            json!({"file": show(&target)}),
        );
        if rewritten {
            self.note_rewrite(&target);
        }
        self.chained = Some(target.clone());
        self.unchain_others(&target)?;
        Ok(true)
    }

    /// Keeps the primary plugin's own version (without our entry) to give back on uninstall.
    fn keep_backup(
        &self,
        name: &OsStr,
        list: &serde_json::Map<String, Value>,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), InstallError> {
        if conflist::has_ours(list) {
            return Ok(());
        }
        let backup = backup_name(name);
        files::write_atomic(&self.dir, &backup, bytes, mode)
            .map_err(|e| InstallError::file(show(&backup), e))
    }

    /// Puts `content` under `name`, where we read `read`, by exchange; while what comes out is
    /// not what we expected there, it is a newer version: chain that (or put it back as it is,
    /// if it is not a complete config) and exchange again.
    fn replace(
        &mut self,
        inotify: &Inotify,
        name: &OsStr,
        read: Version,
        content: Vec<u8>,
        mode: u32,
    ) -> Result<(), InstallError> {
        let dir = self.dir.clone();
        let err = |e: io::Error| InstallError::file(show(name), e);
        let mut expected = read;
        let mut content = content;
        for _ in 0..MAX_ROUNDS {
            let tag = TempTag::Exchange {
                target: files::fnv1a(name.as_bytes()),
                read: files::fnv1a(&expected.bytes),
                ours: files::fnv1a(&content),
            };
            let (tmp, placed) = files::write_temp(&dir, &content, mode, tag).map_err(err)?;
            match files::exchange(&dir, &tmp, name) {
                Ok(()) => {}
                Err(e) => {
                    let _ = std::fs::remove_file(dir.join(&tmp));
                    // Removed meanwhile: its own event brings us back.
                    if e.kind() == io::ErrorKind::NotFound {
                        return Ok(());
                    }
                    return Err(err(e));
                }
            }
            let out = self.take_out(inotify, &tmp, name, false);
            self.known = Some((name.to_owned(), placed.clone()));
            let Some(out) = out else {
                return Err(InstallError::DisplacedNotRegular(show(name)));
            };
            if out == expected {
                return Ok(());
            }
            // Newer than what we read: renamed over the name, or written in place, meanwhile.
            self.foreign += 1;
            content = match conflist::parse(&out.bytes, is_list(name)) {
                Ok(conf) => {
                    let list = conflist::as_list(&conf);
                    if conflist::is_chained(&list, &self.entry) {
                        out.bytes.clone()
                    } else {
                        self.keep_backup(name, &list, &out.bytes, mode)?;
                        conflist::render(&conflist::chain(&list, &self.entry))
                    }
                }
                // Not complete yet (its writer is still at it, and its inode is watched), or
                // broken: put it back as written rather than hide it under an older version.
                // What goes under the name is then this inode's own content, not a newer
                // version: its writer finishing into it is still the newest one.
                Err(_) => {
                    if let Some(d) = self
                        .displaced
                        .last_mut()
                        .filter(|d| d.name == name && d.bytes == out.bytes)
                    {
                        d.foreign = self.foreign;
                    }
                    out.bytes.clone()
                }
            };
            expected = placed;
        }
        log(
            "warn",
            "the primary network config keeps changing while being chained: continuing on its next change",
            json!({"file": show(name)}),
        );
        Ok(())
    }

    /// Removes a `.conf` we turned into a list, if it still holds what we read: moved out by
    /// rename first, so a newer version renamed over it meanwhile is put back, not deleted.
    fn move_out(
        &mut self,
        inotify: &Inotify,
        name: &OsStr,
        read: &Version,
    ) -> Result<(), InstallError> {
        let dir = self.dir.clone();
        files::claim(&dir).map_err(|e| InstallError::file(dir.display().to_string(), e))?;
        let tmp = files::temp_name(TempTag::MovedOut {
            target: files::fnv1a(name.as_bytes()),
            read: files::fnv1a(&read.bytes),
        });
        match std::fs::rename(dir.join(name), dir.join(&tmp)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(InstallError::file(show(name), e)),
        }
        // The file's own mode, for putting a newer version back as it was.
        let mode = files::mode_of(&dir.join(&tmp));
        match self.take_out(inotify, &tmp, name, true) {
            Some(out) if out != *read => self.put_back(name, &out.bytes, mode),
            _ => Ok(()),
        }
    }

    /// Restores `bytes` under `name` (with `mode`, the file's own) unless something (newer) is
    /// already there.
    fn put_back(&self, name: &OsStr, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
        files::write_new(&self.dir, name, bytes, mode).or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(InstallError::file(show(name), e))
            }
        })
    }

    /// Reads the inode now at `tmp` (taken out from under `name`) and watches it for a while,
    /// leaving it linked at `tmp` until the watch ends (unlinked at once when it cannot be
    /// watched). `None` if it is not a regular file (then it is left at `tmp`).
    fn take_out(
        &mut self,
        inotify: &Inotify,
        tmp: &OsStr,
        name: &OsStr,
        converted: bool,
    ) -> Option<Version> {
        let path = self.dir.join(tmp);
        // Watch before reading: a write after the read then still raises an event.
        let wd = inotify
            .add_watch(
                &path,
                AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_DONT_FOLLOW,
            )
            .ok();
        let opened = files::open_version(&path, false);
        match (opened, wd) {
            (Ok((file, version)), Some(wd)) => {
                self.expire(inotify, Instant::now());
                if self.displaced.len() >= DISPLACED_MAX {
                    let d = self.displaced.remove(0);
                    self.let_go(inotify, d);
                }
                self.displaced.push(Displaced {
                    wd,
                    file,
                    tmp: tmp.to_owned(),
                    name: name.to_owned(),
                    converted,
                    bytes: version.bytes.clone(),
                    foreign: self.foreign,
                    until: Instant::now() + DISPLACED_FOR,
                });
                Some(version)
            }
            (Ok((_, version)), None) => {
                let _ = std::fs::remove_file(&path);
                Some(version)
            }
            (Err(_), wd) => {
                if let Some(wd) = wd {
                    let _ = inotify.rm_watch(wd);
                }
                None
            }
        }
    }

    /// Stops watching a displaced inode and unlinks its temporary name.
    fn let_go(&self, inotify: &Inotify, d: Displaced) {
        let _ = inotify.rm_watch(d.wd);
        let _ = std::fs::remove_file(self.dir.join(&d.tmp));
    }

    /// Lets every displaced inode go (on exit).
    pub fn release(&mut self, inotify: &Inotify) {
        for d in std::mem::take(&mut self.displaced) {
            self.let_go(inotify, d);
        }
        files::release_claims(&self.dir);
    }

    /// Whether `wd` watches a displaced inode.
    pub fn watches(&self, wd: WatchDescriptor) -> bool {
        self.displaced.iter().any(|d| d.wd == wd)
    }

    /// A displaced inode was written: if its content changed, that is the primary's newest
    /// version (its writer had it open across our swap); chain it now.
    pub fn on_displaced_write(
        &mut self,
        inotify: &Inotify,
        wd: WatchDescriptor,
    ) -> Result<(), InstallError> {
        let Some(i) = self.displaced.iter().position(|d| d.wd == wd) else {
            return Ok(());
        };
        let Ok(bytes) = files::read_all_at(&self.displaced[i].file) else {
            return Ok(());
        };
        if bytes == self.displaced[i].bytes {
            return Ok(());
        }
        self.displaced[i].bytes = bytes.clone();
        let (name, converted) = (self.displaced[i].name.clone(), self.displaced[i].converted);
        // A writer that had this inode open writes into it before it opens the name again:
        // if a version of its has reached the name since we took this one out, that version
        // is the newer one (and is chained already).
        if self.foreign != self.displaced[i].foreign {
            return Ok(());
        }
        let Ok(conf) = conflist::parse(&bytes, is_list(&name)) else {
            // Half-written: its close brings us back.
            return Ok(());
        };
        log(
            "info",
            "the primary plugin wrote into the file we had just replaced: chaining that version",
            json!({"file": show(&name)}),
        );
        let own_mode = self.displaced[i]
            .file
            .metadata()
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
            .unwrap_or(0o644);
        if converted {
            // The `.conf` comes back; the next look turns it into the list again.
            return self.put_back(&name, &bytes, own_mode);
        }
        let path = self.dir.join(&name);
        let mode = files::mode_of(&path);
        let expected = match &self.known {
            Some((n, v)) if *n == name => v.clone(),
            _ => match files::open_version(&path, false) {
                Ok((_, v)) => v,
                Err(_) => return self.put_back(&name, &bytes, own_mode),
            },
        };
        let list = conflist::as_list(&conf);
        self.keep_backup(&name, &list, &bytes, mode)?;
        let chained = conflist::render(&conflist::chain(&list, &self.entry));
        self.replace(inotify, &name, expected, chained, mode)
    }

    /// Stops watching displaced inodes whose time is up.
    pub fn expire(&mut self, inotify: &Inotify, now: Instant) {
        let (keep, done): (Vec<_>, Vec<_>) = std::mem::take(&mut self.displaced)
            .into_iter()
            .partition(|d| d.until > now);
        self.displaced = keep;
        for d in done {
            self.let_go(inotify, d);
        }
    }

    /// Whether displaced inodes are still watched (the caller then wakes up to expire them).
    pub fn watching(&self) -> bool {
        !self.displaced.is_empty()
    }

    /// Whether `target` (a `.conflist`) is the one we made from a `.conf`.
    fn is_ours_converted(&self, target: &OsStr) -> bool {
        let names = conf_files(&self.dir).unwrap_or_default();
        let has_backup = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| original_of_backup(&e.file_name(), &names))
            .any(|orig| list_twin(&orig).as_deref() == Some(target) && orig != target);
        has_backup
            && files::read_regular(&self.dir.join(target))
                .ok()
                .and_then(|b| conflist::parse(&b, true).ok())
                .is_some_and(|c| conflist::has_ours(&conflist::as_list(&c)))
    }

    /// Another component rewrote our file: fine once, a fight if it keeps happening.
    fn note_rewrite(&mut self, file: &OsStr) {
        self.rechains += 1;
        let now = Instant::now();
        self.rewrites.push_back(now);
        while self
            .rewrites
            .front()
            .is_some_and(|t| now.duration_since(*t) > FLAP_WINDOW)
        {
            self.rewrites.pop_front();
        }
        if self.rewrites.len() >= FLAP_LIMIT {
            self.flapped_at = Some(now);
            log(
                "warn",
                "flapping: another component keeps rewriting the network config without mesh-redirect",
                json!({"file": show(file), "rewrites": self.rewrites.len(),
                    "windowSeconds": FLAP_WINDOW.as_secs(), "primary": self.primary_types.first(),
                    "hint": self.flap_hint()}),
            );
            self.rewrites.clear();
        }
    }

    /// Whether the primary plugin has been fighting us: `FLAP_LIMIT` re-chains within
    /// `FLAP_WINDOW`, the last of them recently.
    pub fn flapping(&self) -> bool {
        self.flapped_at.is_some_and(|t| t.elapsed() <= FLAP_WINDOW)
    }

    fn unchain_others(&mut self, keep: &OsStr) -> Result<(), InstallError> {
        unchain_dir(&self.dir, Some(keep))
    }
}

/// Config names a hash in a temporary name may stand for: every config in the dir, and the
/// `.conf`/`.json` a `.conflist` there may have been made from.
fn candidates(dir: &Path) -> Vec<OsString> {
    let names = conf_files(dir).unwrap_or_default();
    let mut all = names.clone();
    for n in names.iter().filter(|n| is_list(n)) {
        for ext in [&b".conf"[..], b".json"] {
            let mut v = stem(n).to_vec();
            v.extend_from_slice(ext);
            all.push(OsString::from_vec(v));
        }
    }
    all
}

/// What [`recover`] did with one temporary file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// A version of the primary's, newer than what its installer chained, put back under
    /// its name (the next reconcile chains it).
    Restored(OsString),
    /// Nothing newer in it: removed.
    Removed(OsString),
}

/// Recovers what installers that died mid-write left in `dir` (SIGKILL, OOM, a node crash):
/// their temporary files, found by name and kept only where they hold a version of the
/// primary's newer than the one chained. An exchanged-out version goes back under its name if
/// that name still holds exactly what the dead installer put there (anything else there is
/// newer still); a moved-out `.conf` goes back if nothing took its name. Files of live
/// writers (whose claim is locked) are left alone.
pub fn recover(dir: &Path) -> io::Result<Vec<Recovered>> {
    let mut done = Vec::new();
    let mut dead = std::collections::BTreeSet::new();
    let names: Vec<OsString> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.as_bytes().starts_with(files::TEMP_PREFIX.as_bytes()))
        .collect();
    for tmp in names {
        let path = dir.join(&tmp);
        let Some(t) = files::parse_temp(&tmp) else {
            // An older installer's name: nothing to learn from it; gone once surely stale.
            let old = std::fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60));
            if old && std::fs::remove_file(&path).is_ok() {
                done.push(Recovered::Removed(tmp));
            }
            continue;
        };
        if files::claim_held(dir, t.owner) {
            continue;
        }
        dead.insert(t.owner);
        let Ok(bytes) = files::read_regular(&path) else {
            continue;
        };
        let h = files::fnv1a(&bytes);
        let named = |target: u64| {
            candidates(dir)
                .into_iter()
                .find(|n| files::fnv1a(n.as_bytes()) == target)
        };
        let restored = match t.tag {
            files::TempTag::Exchange { target, read, ours } if h != read && h != ours => {
                match named(target) {
                    Some(name)
                        if files::read_regular(&dir.join(&name))
                            .is_ok_and(|b| files::fnv1a(&b) == ours) =>
                    {
                        files::exchange(dir, &tmp, &name)?;
                        Some(name)
                    }
                    _ => None,
                }
            }
            files::TempTag::MovedOut { target, read } if h != read => {
                // The .conf is gone from the list of configs: look for it beside its list.
                match named(target) {
                    Some(name) if !dir.join(&name).exists() => {
                        files::write_new(dir, &name, &bytes, files::mode_of(&path))?;
                        Some(name)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let _ = std::fs::remove_file(&path);
        if let Some(name) = &restored {
            log(
                "info",
                "recovered a version of the primary network config left behind by an installer that died mid-write",
                json!({"file": show(name)}),
            );
        }
        done.push(match restored {
            Some(n) => Recovered::Restored(n),
            None => Recovered::Removed(tmp),
        });
    }
    for owner in dead {
        let _ = std::fs::remove_file(dir.join(files::claim_name(owner)));
    }
    Ok(done)
}

/// Puts `content` under `dir/name`, where `read` was read, by exchange (never a plain rename
/// over a name another writer may have just written): while what comes out is not `read`, it
/// is a newer version, and `next` says what to put instead. Displaced inodes are unlinked.
fn exchange_in(
    dir: &Path,
    name: &OsStr,
    read: Version,
    content: Vec<u8>,
    mode: u32,
    mut next: impl FnMut(&[u8]) -> Vec<u8>,
) -> io::Result<()> {
    let (mut expected, mut content) = (read, content);
    for _ in 0..MAX_ROUNDS {
        let tag = TempTag::Exchange {
            target: files::fnv1a(name.as_bytes()),
            read: files::fnv1a(&expected.bytes),
            ours: files::fnv1a(&content),
        };
        let (tmp, placed) = files::write_temp(dir, &content, mode, tag)?;
        if let Err(e) = files::exchange(dir, &tmp, name) {
            let _ = std::fs::remove_file(dir.join(&tmp));
            return Err(e);
        }
        let opened = files::open_version(&dir.join(&tmp), false);
        let (file, mut out) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_file(dir.join(&tmp));
                return Err(e);
            }
        };
        if out == expected {
            // A writer that opened the file before the exchange writes into what we took
            // out right after: give it a moment, then look again.
            std::thread::sleep(SETTLE);
            out.bytes = files::read_all_at(&file)?;
        }
        let _ = std::fs::remove_file(dir.join(&tmp));
        if out == expected {
            return Ok(());
        }
        content = next(&out.bytes);
        expected = placed;
    }
    Err(io::Error::other(
        "the file kept changing while mesh-redirect's entry was being removed",
    ))
}

/// Removes our entry from a version of a config (as written, if it has none or does not parse).
fn without_us(bytes: &[u8], list: bool) -> Vec<u8> {
    match conflist::parse(bytes, list) {
        Ok(c) if conflist::has_ours(&conflist::as_list(&c)) => {
            conflist::render(&conflist::unchain(&conflist::as_list(&c)))
        }
        _ => bytes.to_vec(),
    }
}

/// Removes our entries from the conf dir's files (except `keep`), giving back the original
/// bytes where we kept them and the file is otherwise unchanged; restores `.conf` files we
/// turned into lists. Every write goes in by exchange, so a version the primary plugin writes
/// meanwhile is not lost: it comes back without our entry.
pub fn unchain_dir(dir: &Path, keep: Option<&OsStr>) -> Result<(), InstallError> {
    let err = |n: &OsStr, e: io::Error| InstallError::file(show(n), e);
    let in_dir = |e| InstallError::file(dir.display().to_string(), e);
    recover(dir).map_err(in_dir)?;
    let names = conf_files(dir).map_err(in_dir)?;
    // Backups first: they say which files we changed and what they were.
    let backups: Vec<OsString> = std::fs::read_dir(dir)
        .map_err(in_dir)?
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.as_bytes().ends_with(files::BACKUP_SUFFIX.as_bytes()))
        .collect();
    for backup in backups {
        let Some(orig) = original_of_backup(&backup, &names) else {
            log(
                "warn",
                "a backup whose config is gone is left in place",
                json!({"file": show(&backup)}),
            );
            continue;
        };
        let current = if dir.join(&orig).exists() {
            orig.clone()
        } else {
            list_twin(&orig).unwrap_or_else(|| orig.clone())
        };
        if Some(current.as_os_str()) == keep {
            continue;
        }
        let saved = files::read_regular(&dir.join(&backup)).map_err(|e| err(&backup, e))?;
        if let Ok((_, read)) = files::open_version(&dir.join(&current), false)
            && let Ok(now) = conflist::parse(&read.bytes, is_list(&current))
        {
            let now = conflist::as_list(&now);
            let saved_list = conflist::parse(&saved, is_list(&orig)).map(|c| conflist::as_list(&c));
            let mode = files::mode_of(&dir.join(&current));
            let list = is_list(&current);
            if saved_list
                .as_ref()
                .is_ok_and(|s| *s == conflist::unchain(&now))
            {
                // Unchanged but for us: the original bytes, under the original name.
                if current == orig {
                    exchange_in(dir, &orig, read, saved.clone(), mode, |b| {
                        without_us(b, list)
                    })
                    .map_err(|e| err(&orig, e))?;
                } else {
                    files::write_new(dir, &orig, &saved, mode).or_else(|e| {
                        // The primary wrote its .conf again meanwhile: that one is newer.
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            Ok(())
                        } else {
                            Err(err(&orig, e))
                        }
                    })?;
                    std::fs::remove_file(dir.join(&current)).map_err(|e| err(&current, e))?;
                }
            } else if conflist::has_ours(&now) {
                let out = conflist::render(&conflist::unchain(&now));
                exchange_in(dir, &current, read, out, mode, |b| without_us(b, list))
                    .map_err(|e| err(&current, e))?;
            }
        }
        std::fs::remove_file(dir.join(&backup)).map_err(|e| err(&backup, e))?;
        log(
            "info",
            "removed mesh-redirect from a network config",
            json!({"file": show(&orig)}),
        );
    }
    // Entries without a backup (e.g. written by hand or by an older installer).
    for name in conf_files(dir).map_err(in_dir)? {
        if Some(name.as_os_str()) == keep {
            continue;
        }
        let Ok((_, read)) = files::open_version(&dir.join(&name), false) else {
            continue;
        };
        if let Ok(c) = conflist::parse(&read.bytes, is_list(&name)) {
            let list = conflist::as_list(&c);
            if matches!(c, Conf::List(_)) && conflist::has_ours(&list) {
                let mode = files::mode_of(&dir.join(&name));
                let out = conflist::render(&conflist::unchain(&list));
                exchange_in(dir, &name, read, out, mode, |b| without_us(b, true))
                    .map_err(|e| err(&name, e))?;
                log(
                    "info",
                    "removed mesh-redirect from a network config",
                    json!({"file": show(&name)}),
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(b: &[u8]) -> OsString {
        OsString::from_vec(b.to_vec())
    }

    #[test]
    fn extensions_are_gos_filepath_ext() {
        assert_eq!(go_ext(b"10-bridge.conf"), b".conf");
        assert_eq!(go_ext(b".conflist"), b".conflist");
        assert_eq!(go_ext(b"a.b.json"), b".json");
        assert_eq!(go_ext(b"noext"), b"");
        assert!(is_conf(&os(b".conflist")));
        assert!(is_conf(&os(b"00-\xff.conflist")));
        assert!(!is_conf(&os(b"10-bridge.conf.mesh-redirect-orig")));
        assert!(!is_conf(&os(b".mesh-redirect-tmp-1-2")));
        assert!(is_list(&os(b"x.conflist")) && !is_list(&os(b"x.conf")));
        assert_eq!(
            list_twin(&os(b"10-bridge.conf")),
            Some(os(b"10-bridge.conflist"))
        );
        assert_eq!(list_twin(&os(b".conf")), Some(os(b".conflist")));
        let long = [b'a'; 250]
            .iter()
            .chain(b".conf")
            .copied()
            .collect::<Vec<_>>();
        assert_eq!(list_twin(&os(&long)), None, "255 + 4 bytes do not fit");
    }

    #[test]
    fn backup_names_always_fit_and_lead_back() {
        let short = os(b"10-bridge.conflist");
        assert_eq!(
            backup_name(&short),
            os(b"10-bridge.conflist.mesh-redirect-orig")
        );
        assert_eq!(
            original_of_backup(&backup_name(&short), &[]),
            Some(short.clone())
        );
        let long: Vec<u8> = [b'x'; 240].iter().chain(b".conflist").copied().collect();
        let long = os(&long);
        let b = backup_name(&long);
        assert!(b.len() <= NAME_MAX && !is_conf(&b), "{b:?}");
        assert_eq!(
            original_of_backup(&b, std::slice::from_ref(&long)),
            Some(long.clone())
        );
        // A long .conf turned into a list: found from the list's name.
        let conf: Vec<u8> = [b'y'; 240].iter().chain(b".conf").copied().collect();
        let conf = os(&conf);
        let twin = list_twin(&conf).unwrap();
        assert_eq!(original_of_backup(&backup_name(&conf), &[twin]), Some(conf));
        assert_eq!(original_of_backup(&os(b"unrelated"), &[]), None);
    }
}
