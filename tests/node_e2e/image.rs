//! The node image, built as a user builds it: `cargo build --release --bins`, then
//! `buildah bud -f deploy/Containerfile .` with no registry (buildah needs no daemon), into
//! storage and a network config dir of the test's own; then saved as an archive that the node's
//! containerd imports, as a registry pull would have put it there.

use crate::node::Node;
use common::run_cmd as run;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Image {
    /// The name the manifest's `image:` resolves to in the runtime.
    pub reference: String,
    /// Its layers, uncompressed, in bytes.
    pub size: u64,
    pub archive: PathBuf,
}

/// Builds the release binaries (a no-op when they are current) and the image from the
/// Containerfile as shipped, tagged `tag` (the manifest's `image:`, as the runtime spells it).
pub fn build(node: &Node, tag: &str) -> Image {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    common::release_bins();
    let _cache = BlobCache::note();
    let dir = node.dir("image-build");
    std::fs::create_dir_all(&dir).expect("image build dir");
    // vfs: plain directories (no mounts to undo); storage of our own below the node's dir.
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(dir.join("storage"))
            .arg("--runroot")
            .arg(dir.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .current_dir(root)
            .env("BUILDAH_ISOLATION", "chroot");
        c
    };
    // The build as README gives it, plus where buildah keeps its network config (else it
    // makes /etc/cni/net.d on the host, though nothing here runs a container).
    let cni = dir.join("cni");
    let cni = cni.to_string_lossy();
    run(&mut buildah(&[
        "bud",
        "--cni-config-dir",
        &cni,
        "--cni-plugin-path",
        &cni,
        "-f",
        "deploy/Containerfile",
        "-t",
        tag,
        ".",
    ]));
    let archive = dir.join("image.tar");
    run(&mut buildah(&[
        "push",
        tag,
        &format!("docker-archive:{}:{tag}", archive.display()),
    ]));
    let size = layers_size(&archive);
    run(&mut buildah(&["rmi", "--all", "--force"]));

    Image {
        reference: tag.to_string(),
        size,
        archive,
    }
}

/// The sum of the archive's layer tarballs (what the image unpacks to).
fn layers_size(archive: &Path) -> u64 {
    let out = run(Command::new("tar").arg("-tvf").arg(archive));
    out.lines()
        .filter(|l| l.starts_with('-') && l.ends_with(".tar"))
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum()
}

/// buildah's blob-info cache goes to /var/lib/containers/cache whatever --root says: removed
/// again (also on a failure) when the build made it.
struct BlobCache(bool);

const SYSTEM_DIR: &str = "/var/lib/containers";

impl BlobCache {
    fn note() -> BlobCache {
        BlobCache(Path::new(SYSTEM_DIR).exists())
    }
}

impl Drop for BlobCache {
    fn drop(&mut self) {
        if !self.0 {
            let _ = std::fs::remove_dir_all(SYSTEM_DIR);
        }
    }
}

/// The image's root filesystem, unpacked from the archive's layers (in order) into `dir`.
fn unpack(image: &Image, dir: &Path) -> PathBuf {
    let x = dir.join("archive");
    let root = dir.join("rootfs");
    std::fs::create_dir_all(&x).expect("archive dir");
    std::fs::create_dir_all(&root).expect("rootfs dir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(&image.archive)
        .arg("-C")
        .arg(&x));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(x.join("manifest.json")).expect("manifest.json"))
            .expect("manifest.json is JSON");
    for layer in manifest[0]["Layers"].as_array().expect("Layers") {
        run(Command::new("tar")
            .arg("-xf")
            .arg(x.join(layer.as_str().expect("a layer")))
            .arg("-C")
            .arg(&root));
    }
    root
}

/// Runs `argv` in `root` as the image's only filesystem, as a container would: a private
/// mount namespace with /proc mounted (the loader finds `$ORIGIN` through /proc/self/exe),
/// `chroot`, an environment of `env` alone. Its exit status and stderr.
fn in_root(root: &Path, argv: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    use nix::mount::{MsFlags, mount};
    use std::os::unix::process::CommandExt;
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).expect("proc dir");
    let root = root.to_path_buf();
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).env_clear().envs(env.iter().copied());
    // SAFETY: only syscalls between fork and exec (the paths were made before).
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some("proc"),
                &proc_dir,
                Some("proc"),
                MsFlags::empty(),
                None::<&str>,
            )?;
            nix::unistd::chroot(&root)?;
            nix::unistd::chdir("/")?;
            Ok(())
        });
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{argv:?} in the image's root: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Proves the image needs no loader search path: its files are the loader at the binaries'
/// interpreter path and, for everything else, the binaries and their RUNPATH dir; run there
/// with `LD_DEBUG=libs` (in a chroot of the image's root, no cache, no default library dirs),
/// each binary loads every library from that dir, found through RUNPATH, and the loader never
/// falls back to a default directory. Also through the loader by hand (`--inhibit-cache`).
/// Returns a line for the report.
pub fn check_libraries(node: &Node, image: &Image) -> String {
    let dir = node.dir("image-root");
    let root = unpack(image, &dir);
    let libs = "/usr/local/bin/mesh-redirect.libs";
    let loader = match std::env::consts::ARCH {
        "x86_64" => "/lib64/ld-linux-x86-64.so.2",
        "aarch64" => "/lib/ld-linux-aarch64.so.1",
        a => panic!("no image layout for {a}"),
    };
    let mut files: Vec<String> = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .expect("read the image's root")
            .flatten()
        {
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                stack.push(e.path());
            } else {
                let p = e.path();
                files.push(format!("/{}", p.strip_prefix(&root).unwrap().display()));
            }
        }
    }
    files.sort();
    let bins = ["mesh-redirect", "mesh-redirect-agent", "capture-probe"];
    for f in &files {
        let ok = f == loader
            || f.starts_with(&format!("{libs}/"))
            || bins.iter().any(|b| f == &format!("/usr/local/bin/{b}"));
        assert!(
            ok,
            "the image holds {f}: only the loader ({loader}), the binaries and {libs}/ belong \
             there (files: {files:?})"
        );
    }
    // libnftnl and the unwinder are linked into the binaries (build.rs).
    for lib in ["libc.so.6", "libmnl.so.0"] {
        assert!(
            files.contains(&format!("{libs}/{lib}")),
            "{lib} is not in {libs}: {files:?}"
        );
    }
    // capture-probe has no help command: its usage (exit 1) shows it ran.
    for (bin, arg) in [
        ("mesh-redirect", "version"),
        ("mesh-redirect-agent", "help"),
        ("capture-probe", ""),
    ] {
        let path = format!("/usr/local/bin/{bin}");
        let argv: Vec<&str> = [path.as_str(), arg]
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect();
        let (ok, debug) = in_root(&root, &argv, &[("LD_DEBUG", "libs")]);
        assert!(
            ok || (bin == "capture-probe" && debug.contains("capture-probe [--netns")),
            "{path} {arg} does not run in the image's root:\n{debug}"
        );
        let loaded: Vec<&str> = debug
            .lines()
            .filter_map(|l| l.split_once("calling init: ").map(|(_, p)| p.trim()))
            .collect();
        assert!(
            loaded.contains(&format!("{libs}/libc.so.6").as_str())
                && loaded
                    .iter()
                    .all(|p| *p == loader || p.starts_with(&format!("{libs}/"))),
            "{path}: loaded {loaded:?}, not all from {libs}:\n{debug}"
        );
        assert!(
            !debug.contains("system search path") && !debug.contains("search cache"),
            "{path}: the loader fell back to its default dirs:\n{debug}"
        );
        assert!(
            debug.contains(&format!("(RUNPATH from file {path})")),
            "{path}: not found through RUNPATH:\n{debug}"
        );
    }
    let (ok, err) = in_root(
        &root,
        &[
            loader,
            "--inhibit-cache",
            "/usr/local/bin/mesh-redirect",
            "version",
        ],
        &[],
    );
    assert!(ok, "{loader} --inhibit-cache mesh-redirect version: {err}");
    // The control: libc where another distribution's loader would look by default (Fedora's
    // /usr/lib64), not in the RUNPATH dir, and this (Debian) loader does not find it: the way
    // an image staged for one loader's default path failed under another's.
    let moved = root.join("usr/lib64");
    std::fs::create_dir_all(&moved).expect("usr/lib64");
    std::fs::rename(
        root.join(&libs[1..]).join("libc.so.6"),
        moved.join("libc.so.6"),
    )
    .expect("move libc");
    let (ok, err) = in_root(&root, &["/usr/local/bin/mesh-redirect", "version"], &[]);
    assert!(
        !ok && err.contains("libc.so.6"),
        "with libc outside the RUNPATH dir the binary still started: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    format!(
        "the image's files: {loader}, the three binaries and {libs}/ (libc, libmnl), no \
         default library dir; in a chroot of it (no ld.so.cache) each \
         binary runs and LD_DEBUG=libs shows every library loaded from {libs}/ through RUNPATH, \
         none from a default dir; `{loader} --inhibit-cache mesh-redirect version` too; with \
         libc moved to /usr/lib64 (Fedora's default dir, not this loader's) it does not start"
    )
}
