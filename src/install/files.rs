//! Files on the node: atomic writes that keep modes, the plugin binary and the libraries it
//! needs, backups of the configs we edit. Nothing here follows a symlink out of its directory:
//! temporary files are created exclusively and without following links, and a rename replaces
//! a directory entry, never what a link points to.

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The binary's name in the CNI bin dir.
pub const BINARY: &str = "mesh-redirect";
/// Where the shared libraries it needs go, next to it. The binary's RUNPATH
/// (`$ORIGIN/mesh-redirect.libs`, see build.rs) finds them there before the node's own.
pub const LIBS_DIR: &str = "mesh-redirect.libs";
/// Suffix of the backups of configs we changed: not a CNI config extension, so runtimes skip it.
pub const BACKUP_SUFFIX: &str = ".mesh-redirect-orig";

/// A file's identity (device, inode) and content, as read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub id: (u64, u64),
    pub bytes: Vec<u8>,
}

/// Prefix of every temporary file we make; no config extension follows (Go's `filepath.Ext`
/// of such a name is the whole name), so runtimes never load one.
pub const TEMP_PREFIX: &str = ".mesh-redirect-tmp-";
/// Prefix of a writer's claim on its temporary files in a directory (see [`claim`]).
pub const CLAIM_PREFIX: &str = ".mesh-redirect-owner-";

/// FNV-1a, 64 bits: stable across builds and versions (names derived from it must not change).
pub fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What a temporary file was made for, written into its name: enough for an installer
/// started after a crash to tell whether what sits there is a version of the primary's that
/// must not be lost (see `confdir::recover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TempTag {
    /// Nothing to recover: a write that had not happened yet (backups, restores, binaries).
    Plain,
    /// Exchanged with the file whose name hashes to `target`: we had read the version hashing
    /// to `read` there and put the one hashing to `ours` in its place. After the exchange this
    /// name holds what was displaced.
    Exchange { target: u64, read: u64, ours: u64 },
    /// A `.conf` (name hashing to `target`) we turned into a list, moved out of the way; we
    /// had read the version hashing to `read`.
    MovedOut { target: u64, read: u64 },
}

/// A parsed temporary name: its writer and what it was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Temp {
    pub owner: u64,
    pub tag: TempTag,
}

/// This process's writer id: random enough to keep two processes (pid 1 in two containers)
/// apart.
pub fn owner_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // std seeds RandomState from the OS's randomness.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    })
}

/// A temporary name in `dir`: fixed length whatever the target's (so it always fits), unique,
/// naming its writer and its purpose.
pub fn temp_name(tag: TempTag) -> OsString {
    let seq = unique_suffix();
    OsString::from(match tag {
        TempTag::Plain => format!("{TEMP_PREFIX}{:016x}-p-{seq:x}", owner_id()),
        TempTag::Exchange { target, read, ours } => format!(
            "{TEMP_PREFIX}{:016x}-x-{target:016x}-{read:016x}-{ours:016x}-{seq:x}",
            owner_id()
        ),
        TempTag::MovedOut { target, read } => format!(
            "{TEMP_PREFIX}{:016x}-m-{target:016x}-{read:016x}-{seq:x}",
            owner_id()
        ),
    })
}

/// Reads a temporary name back (`None`: not ours, or from an older installer).
pub fn parse_temp(name: &OsStr) -> Option<Temp> {
    let rest = name.to_str()?.strip_prefix(TEMP_PREFIX)?;
    let f: Vec<&str> = rest.split('-').collect();
    let hex = |s: &str| {
        (s.len() == 16)
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
    };
    let owner = hex(f.first()?)?;
    let tag = match (f.get(1).copied()?, f.len()) {
        ("p", 3) => TempTag::Plain,
        ("x", 6) => TempTag::Exchange {
            target: hex(f[2])?,
            read: hex(f[3])?,
            ours: hex(f[4])?,
        },
        ("m", 5) => TempTag::MovedOut {
            target: hex(f[2])?,
            read: hex(f[3])?,
        },
        _ => return None,
    };
    Some(Temp { owner, tag })
}

/// The claim file of writer `owner` in a directory.
pub fn claim_name(owner: u64) -> OsString {
    OsString::from(format!("{CLAIM_PREFIX}{owner:016x}"))
}

/// Claims `dir` for this process's tagged temporary files: an exclusive `flock` on
/// `.mesh-redirect-owner-<id>`, held until the process ends (the kernel drops it then). A
/// later installer recovers only the temporary files of writers whose claim it can lock.
pub fn claim(dir: &Path) -> io::Result<()> {
    use nix::fcntl::{Flock, FlockArg};
    static CLAIMS: std::sync::Mutex<Vec<(PathBuf, Flock<File>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut held = CLAIMS.lock().unwrap_or_else(|p| p.into_inner());
    if held.iter().any(|(d, _)| d == dir) {
        return Ok(());
    }
    let f = open_lock_file(&dir.join(claim_name(owner_id())))?;
    let l = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| io::Error::from(e))?;
    held.push((dir.to_path_buf(), l));
    Ok(())
}

/// Removes this process's claim files (on a clean exit, once its temporary files are gone).
pub fn release_claims(dir: &Path) {
    let _ = fs::remove_file(dir.join(claim_name(owner_id())));
}

/// Whether writer `owner`'s claim on `dir` is still held by a live process.
pub fn claim_held(dir: &Path, owner: u64) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    if owner == owner_id() {
        return true;
    }
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(dir.join(claim_name(owner)))
    else {
        return false;
    };
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(_) => false,
        Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
    }
}

/// A new temporary file in `dir` holding `bytes` with `mode`, synced and closed (exec of a
/// file open for writing fails with ETXTBSY). Returns its name and identity.
pub fn write_temp(
    dir: &Path,
    bytes: &[u8],
    mode: u32,
    tag: TempTag,
) -> io::Result<(OsString, Version)> {
    if tag != TempTag::Plain {
        claim(dir)?;
    }
    // create_new never opens, let alone truncates, someone else's file; a collision just
    // tries the next name.
    let (tmp, mut f) = loop {
        let tmp = temp_name(tag);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(&tmp))
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let res = (|| {
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        let m = f.metadata()?;
        Ok(Version {
            id: (m.dev(), m.ino()),
            bytes: bytes.to_vec(),
        })
    })();
    drop(f);
    match res {
        Ok(v) => Ok((tmp, v)),
        Err(e) => {
            let _ = fs::remove_file(dir.join(&tmp));
            Err(e)
        }
    }
}

/// Writes `bytes` to `dir/name` atomically: a new temporary file in the same directory, synced,
/// given `mode`, then renamed over the target. Readers see the old file or the new one. (The
/// temporary file must live in the directory: rename is atomic only within a filesystem, and
/// containerd 1.6's conf-dir watcher reloads on its WRITE events but ignores CREATE ones.)
pub fn write_atomic(dir: &Path, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (tmp, _) = write_temp(dir, bytes, mode, TempTag::Plain)?;
    finish(dir, &tmp, || fs::rename(dir.join(&tmp), dir.join(name)))
}

/// Like [`write_atomic`], but only if nothing is under `name` (`AlreadyExists` otherwise).
pub fn write_new(dir: &Path, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (tmp, _) = write_temp(dir, bytes, mode, TempTag::Plain)?;
    finish(dir, &tmp, || {
        renameat2(
            AT_FDCWD,
            &dir.join(&tmp),
            AT_FDCWD,
            &dir.join(name),
            RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(io::Error::from)
    })
}

/// Swaps what `dir/a` and `dir/b` name, atomically: `b` then names what `a` did, and `a` what
/// `b` did (so the caller gets the displaced inode back under `a`).
pub fn exchange(dir: &Path, a: &OsStr, b: &OsStr) -> io::Result<()> {
    renameat2(
        AT_FDCWD,
        &dir.join(a),
        AT_FDCWD,
        &dir.join(b),
        RenameFlags::RENAME_EXCHANGE,
    )
    .map_err(io::Error::from)?;
    // The swap itself must survive a crash too.
    File::open(dir)?.sync_all()
}

/// Runs the rename of `tmp`, syncs the dir, and removes `tmp` if the rename failed.
fn finish(dir: &Path, tmp: &OsStr, rename: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let res = rename().and_then(|()| File::open(dir)?.sync_all());
    if res.is_err() {
        let _ = fs::remove_file(dir.join(tmp));
    }
    res
}

/// Opens a regular file (through a symlink at its last component only with `follow`) and
/// reads its identity and content; the file stays open for reading it again later.
pub fn open_version(path: &Path, follow: bool) -> io::Result<(File, Version)> {
    // O_NONBLOCK: opening a FIFO someone named *.conf must not hang the installer.
    let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let bytes = read_all_at(&f)?;
    Ok((
        f,
        Version {
            id: (m.dev(), m.ino()),
            bytes,
        },
    ))
}

/// The whole content of an open file, from its start (the file offset is not used).
pub fn read_all_at(f: &File) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read_at(&mut buf, out.len() as u64) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Time-based and per-process unique: enough to keep temporary names apart.
fn unique_suffix() -> u128 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u128;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    t ^ (n << 100)
}

/// Reads a regular file without following a symlink at its last component.
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO someone named *.conf must not hang the installer; reads of
    // a regular file ignore the flag.
    let mut f = open_regular(path)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// Permission bits of an existing file (0644 when it is gone).
pub fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .map(|m| m.mode() & 0o7777)
        .unwrap_or(0o644)
}

/// Whether two files hold the same bytes, read in chunks: the agent's memory limit is small
/// and binaries are not (a whole-file read of each would cost twice the binary's size).
pub fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (fa, fb) = (File::open(a)?, open_regular(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut off = 0u64;
    loop {
        let n = fa.read_at(&mut ba, off)?;
        if n == 0 {
            return Ok(true);
        }
        let mut got = 0;
        while got < n {
            match fb.read_at(&mut bb[got..n], off + got as u64)? {
                0 => return Ok(false),
                m => got += m,
            }
        }
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
}

/// Opens a regular file without following a symlink at its last component.
fn open_regular(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(f)
}

/// Copies `src` to `dir/name` atomically with `mode` (streamed into a temporary file, synced,
/// renamed), unless an identical file is already there. Returns whether it wrote.
pub fn install_file(src: &Path, dir: &Path, name: &str, mode: u32) -> io::Result<bool> {
    if same_content(src, &dir.join(name)).unwrap_or(false) && mode_of(&dir.join(name)) == mode {
        return Ok(false);
    }
    let mut from = File::open(src)?;
    let tmp = temp_name(TempTag::Plain);
    let res = (|| {
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(&tmp))?;
        io::copy(&mut from, &mut to)?;
        to.set_permissions(fs::Permissions::from_mode(mode))?;
        to.sync_all()
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(dir.join(&tmp));
        return Err(e);
    }
    finish(dir, &tmp, || fs::rename(dir.join(&tmp), dir.join(name)))?;
    Ok(true)
}

/// Opens (creating, 0600) a file that exists to be `flock`ed: never through a symlink.
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Makes `path`'s directory (0700, with its parents) if it is missing.
pub fn private_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.exists() => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        _ => Ok(()),
    }
}

/// The shared libraries the running binary loaded that a node might lack: libmnl (and
/// libnftnl, in a build that links it shared; see build.rs). Read once per process.
pub fn bundled_libs() -> Vec<PathBuf> {
    static LIBS: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();
    LIBS.get_or_init(|| bundled_in_maps(&fs::read_to_string("/proc/self/maps").unwrap_or_default()))
        .clone()
}

/// Whether every library of [`bundled_libs`] is in `bin_dir`'s library directory.
pub fn libs_installed(bin_dir: &Path) -> bool {
    let dir = bin_dir.join(LIBS_DIR);
    bundled_libs().iter().all(|l| {
        let name = l.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        dir.join(soname(name)).is_file()
    })
}

/// [`bundled_libs`] from a `/proc/PID/maps` text: libnftnl and libmnl only, by name. The
/// image keeps libc, libgcc_s and the loader in the same directory as these (its binaries'
/// RUNPATH), but those belong to the node: a glibc copied there would shadow the node's own
/// for the plugin, without its loader.
fn bundled_in_maps(maps: &str) -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            let name = Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            name.starts_with("libnftnl.so") || name.starts_with("libmnl.so")
        })
        .map(PathBuf::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// Installs `plugin` as `bin_dir/mesh-redirect`, with the libraries the running process loaded
/// (the agent links the same ones as the plugin) first, so the binary never appears before
/// what it needs. Returns whether anything was written.
pub fn install_binary(bin_dir: &Path, plugin: &Path) -> io::Result<bool> {
    let libs_dir = bin_dir.join(LIBS_DIR);
    let mut wrote = false;
    let libs = bundled_libs();
    if !libs.is_empty() {
        match fs::symlink_metadata(&libs_dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} exists and is not a directory",
                    libs_dir.display()
                )));
            }
            Err(_) => fs::DirBuilder::new().mode(0o755).create(&libs_dir)?,
        }
        for lib in &libs {
            // The soname file the binary asks for (e.g. libnftnl.so.11), with the real bytes.
            let name = lib.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let soname = soname(name);
            wrote |= install_file(lib, &libs_dir, &soname, 0o644)?;
        }
    }
    wrote |= install_file(plugin, bin_dir, BINARY, 0o755)?;
    Ok(wrote)
}

/// `libnftnl.so.11.6.0` → `libnftnl.so.11` (what the binary's NEEDED entry names).
fn soname(file: &str) -> String {
    match file.find(".so.") {
        Some(i) => {
            let rest = &file[i + 4..];
            let major = rest.split('.').next().unwrap_or(rest);
            format!("{}.so.{major}", &file[..i])
        }
        None => file.to_string(),
    }
}

/// Whether `bin_dir/mesh-redirect` is byte for byte `plugin`.
pub fn binary_is_current(bin_dir: &Path, plugin: &Path) -> bool {
    same_content(plugin, &bin_dir.join(BINARY)).unwrap_or(false)
}

/// (inode, mtime seconds, mtime nanoseconds, size) of a file.
pub type Stamp = (u64, i64, i64, u64);

/// A file's [`Stamp`], to notice it changed without reading it.
pub fn stamp(path: &Path) -> Option<Stamp> {
    fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

/// Removes the binary and its libraries.
pub fn remove_binary(bin_dir: &Path) -> io::Result<()> {
    match fs::remove_file(bin_dir.join(BINARY)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let libs = bin_dir.join(LIBS_DIR);
    if fs::symlink_metadata(&libs).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir_all(&libs)?;
    }
    Ok(())
}

/// The highest `GLIBC_x.y` symbol version the binary needs (what a node's libc must provide).
/// Version names are NUL-terminated strings in the binary's string table.
pub fn glibc_requirement(binary: &[u8]) -> Option<(u32, u32)> {
    binary
        .split(|&b| b == 0)
        .filter_map(|s| s.strip_prefix(b"GLIBC_2."))
        .filter_map(|rest| {
            let end = rest
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(rest.len());
            std::str::from_utf8(&rest[..end])
                .ok()?
                .parse()
                .ok()
                .map(|minor| (2, minor))
        })
        .max()
}

/// The glibc version a dynamic loader belongs to, from its `--version` line (`ld.so (GNU libc)
/// stable release version 2.36.`; distributions add their name before it).
pub fn parse_loader_version(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().next()?;
    let rest = &line[line.rfind("version ")? + "version ".len()..];
    let mut it = rest.trim_end_matches('.').split('.');
    let major = it.next()?.trim().parse().ok()?;
    let minor: String = it
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((major, minor.parse().ok()?))
}

/// The node's glibc, asked of its dynamic loader (`--node-loader`: the node's
/// `/lib64/ld-linux-x86-64.so.2`, mounted read-only): the loader is self-contained and runs in
/// the agent's container as it does on the node.
pub fn node_glibc(loader: &Path) -> io::Result<(u32, u32)> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(loader)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(
                "the loader did not answer --version in time",
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    parse_loader_version(&out)
        .ok_or_else(|| io::Error::other(format!("no glibc version in {:?}", out.lines().next())))
}

/// [`glibc_requirement`] of a file, read in chunks (that overlap by more than a version name).
pub fn glibc_requirement_of(path: &Path) -> io::Result<Option<(u32, u32)>> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut off, mut best) = (0u64, None);
    loop {
        let n = f.read_at(&mut buf, off)?;
        best = best.max(glibc_requirement(&buf[..n]));
        if n < buf.len() {
            return Ok(best);
        }
        off += (n - 64) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn tmpdir() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("mr-files-{}-{}", std::process::id(), rand_suffix()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces_symlinks_not_their_targets() {
        let d = tmpdir();
        write_atomic(&d, OsStr::new("a.conflist"), b"one", 0o600).unwrap();
        assert_eq!(fs::read(d.join("a.conflist")).unwrap(), b"one");
        assert_eq!(mode_of(&d.join("a.conflist")), 0o600);
        // A symlink pointing out of the directory: the link is replaced, the target untouched.
        let outside_dir = tmpdir();
        let outside = outside_dir.join("victim");
        fs::write(&outside, b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, d.join("b.conf")).unwrap();
        assert!(
            read_regular(&d.join("b.conf")).is_err(),
            "reading does not follow the link"
        );
        write_atomic(&d, OsStr::new("b.conf"), b"new", 0o644).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        assert!(fs::symlink_metadata(d.join("b.conf")).unwrap().is_file());
        // No temporary files left.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        fs::remove_dir_all(&d).unwrap();
        fs::remove_dir_all(&outside_dir).unwrap();
    }

    #[test]
    fn temp_names_carry_their_writer_and_purpose() {
        for tag in [
            TempTag::Plain,
            TempTag::Exchange {
                target: 1,
                read: u64::MAX,
                ours: 0xabc,
            },
            TempTag::MovedOut { target: 7, read: 8 },
        ] {
            let n = temp_name(tag);
            assert!(n.len() < 120, "{n:?}");
            assert_eq!(
                parse_temp(&n),
                Some(Temp {
                    owner: owner_id(),
                    tag
                })
            );
            // One dot, the first byte: Go's filepath.Ext is the whole name, never a config's.
            assert_eq!(n.as_bytes().iter().filter(|&&b| b == b'.').count(), 1);
        }
        assert_eq!(parse_temp(OsStr::new(".mesh-redirect-tmp-123-abc")), None);
        assert_eq!(parse_temp(OsStr::new("10-bridge.conflist")), None);
    }

    #[test]
    fn loader_versions() {
        assert_eq!(
            parse_loader_version("ld.so (GNU libc) stable release version 2.36.\nCopyright"),
            Some((2, 36))
        );
        assert_eq!(
            parse_loader_version(
                "ld.so (Debian GLIBC 2.31-13+deb11u5) stable release version 2.31."
            ),
            Some((2, 31))
        );
        assert_eq!(parse_loader_version("musl libc (x86_64)"), None);
        // This machine's own loader answers, as a node's would.
        let here = Path::new("/lib64/ld-linux-x86-64.so.2");
        if here.exists() {
            assert!(node_glibc(here).unwrap().1 >= 17);
        }
    }

    #[test]
    fn only_libnftnl_and_libmnl_go_to_the_node() {
        // The agent in the image: everything it loaded from its RUNPATH dir, glibc too.
        let dir = "/usr/local/bin/mesh-redirect.libs";
        let maps: String = [
            "/usr/local/bin/mesh-redirect-agent",
            &format!("{dir}/libc.so.6"),
            &format!("{dir}/libgcc_s.so.1"),
            &format!("{dir}/libnftnl.so.11"),
            &format!("{dir}/libnftnl.so.11"),
            &format!("{dir}/libmnl.so.0"),
            "/lib64/ld-linux-x86-64.so.2",
            "[vdso]",
            "",
        ]
        .iter()
        .map(|p| format!("7f00-7f01 r-xp 00000000 fd:00 42 {p}\n"))
        .collect();
        assert_eq!(
            bundled_in_maps(&maps),
            [
                PathBuf::from(format!("{dir}/libmnl.so.0")),
                PathBuf::from(format!("{dir}/libnftnl.so.11"))
            ]
        );
        // A node's own build: the distribution's versioned files, the same two.
        let host = "7f-8f r-xp 0 fd:00 1 /usr/lib/x86_64-linux-gnu/libnftnl.so.11.6.0\n\
                    7f-8f r-xp 0 fd:00 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n";
        assert_eq!(
            bundled_in_maps(host),
            [PathBuf::from(
                "/usr/lib/x86_64-linux-gnu/libnftnl.so.11.6.0"
            )]
        );
    }

    #[test]
    fn sonames_and_glibc() {
        assert_eq!(soname("libnftnl.so.11.6.0"), "libnftnl.so.11");
        assert_eq!(soname("libmnl.so.0"), "libmnl.so.0");
        assert_eq!(
            glibc_requirement(b"xx GLIBC_2.3\0GLIBC_2.34\0GLIBC_2.2.5"),
            Some((2, 34))
        );
        assert_eq!(glibc_requirement(b"none"), None);
    }
}
