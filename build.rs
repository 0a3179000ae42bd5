//! Lets the installed plugin find the libnftnl/libmnl copies the installer ships beside it
//! (`<cni bin dir>/mesh-redirect.libs/`) before the node's own: nodes need not have them.
//! Records what the agent's `build_info` metric reports: the git commit and libnftnl version.
//! And stages the shared libraries the binaries need into `target/<profile>/image-libs/`, laid
//! out as the image's root, so that `deploy/Containerfile` can build the image `FROM scratch`
//! from `cargo build --release`'s output alone, with no registry.
use std::path::{Path, PathBuf};
use std::process::Command;

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--enable-new-dtags,-rpath,$ORIGIN/mesh-redirect.libs");
    println!("cargo:rerun-if-changed=build.rs");
    // A source tree without git (a tarball) says so.
    let commit =
        output("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let nftnl =
        output("pkg-config", &["--modversion", "libnftnl"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESH_REDIRECT_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=MESH_REDIRECT_LIBNFTNL={nftnl}");
    for p in [".git/HEAD", ".git/refs/heads"] {
        if std::path::Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-env-changed={SKIP_IMAGE_LIBS}");
    let glibc = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if glibc && std::env::var_os(SKIP_IMAGE_LIBS).is_none() {
        if let Err(e) = stage_image_libs() {
            // An image built from a half-staged root would not start, or start with a libc
            // that is not the one its loader belongs to: refuse here, where the cause is known.
            eprintln!(
                "error: cannot stage the node image's libraries in target/<profile>/image-libs/: \
                 {e}.\n\
                 deploy/Containerfile builds the image from them. Fix the toolchain (a glibc \
                 whose loader and libc.so.6 are in one directory, `cc`, pkg-config's libnftnl \
                 and libmnl), build from source in a container (`--target source`, README), \
                 or set {SKIP_IMAGE_LIBS}=1 to build the binaries without an image."
            );
            std::process::exit(1);
        }
    }
}

/// Set: build the binaries without staging the image's libraries.
const SKIP_IMAGE_LIBS: &str = "MESH_REDIRECT_SKIP_IMAGE_LIBS";

/// `<target>/<profile>`: OUT_DIR is `<target>/<profile>/build/<pkg>-<hash>/out`.
fn profile_dir() -> Option<PathBuf> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR")?);
    out.ancestors().nth(3).map(Path::to_path_buf)
}

/// A library the C compiler links against, by file name (its real file, not the symlink).
fn toolchain_lib(name: &str) -> Option<PathBuf> {
    let p = output("cc", &[&format!("-print-file-name={name}")])?;
    let p = PathBuf::from(p);
    (p.is_absolute() && p.exists())
        .then(|| std::fs::canonicalize(&p).ok())
        .flatten()
}

/// Copies `src` (through symlinks) to `dst`, creating directories.
fn put(src: &Path, dst: &Path) -> std::io::Result<()> {
    if let Some(d) = dst.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::copy(std::fs::canonicalize(src)?, dst).map(|_| ())
}

/// The image's libraries, laid out so that the image needs no loader search path of its own:
/// glibc's loader at the binaries' interpreter path (PT_INTERP: `/lib64/ld-linux-x86-64.so.2`,
/// `/lib/ld-linux-aarch64.so.1`), and every library the binaries need (libc, libgcc_s,
/// libnftnl, libmnl) in `/usr/local/bin/mesh-redirect.libs/`, where their RUNPATH
/// (`$ORIGIN/mesh-redirect.libs`) finds them first, whatever directories the loader would
/// search by default (Debian's `/lib/<triplet>`, Fedora's `/lib64`, Arch's `/usr/lib`): an
/// image built on any of them starts. The installer copies only libnftnl and libmnl from there
/// to the node (`install::files::bundled_libs`); the node's own libc stays the node's.
fn stage_image_libs() -> Result<(), String> {
    let (loader_dir, loader) = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => ("lib64", "ld-linux-x86-64.so.2"),
        Ok("aarch64") => ("lib", "ld-linux-aarch64.so.1"),
        Ok(a) => return Err(format!("no image layout for {a}")),
        Err(_) => return Err("no target arch".into()),
    };
    let root = profile_dir().ok_or("no target dir")?.join("image-libs");
    let _ = std::fs::remove_dir_all(&root);
    let own = root.join("usr/local/bin/mesh-redirect.libs");
    let libc = toolchain_lib("libc.so.6").ok_or("the C compiler's libc.so.6 not found")?;
    // The loader and libc must be one glibc build: the loader beside the libc the binaries
    // link against (Debian, Fedora and Arch all keep them in one directory).
    let glibc_dir = libc.parent().ok_or("libc.so.6 has no directory")?;
    let ld = [glibc_dir.join(loader)]
        .into_iter()
        .chain(toolchain_lib(loader))
        .chain([Path::new("/").join(loader_dir).join(loader)])
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .find(|p| p.parent() == Some(glibc_dir))
        .ok_or(format!(
            "no {loader} beside {} (the loader must be the one of the libc the binaries link)",
            libc.display()
        ))?;
    put(&ld, &root.join(loader_dir).join(loader)).map_err(|e| format!("{loader}: {e}"))?;
    put(&libc, &own.join("libc.so.6")).map_err(|e| format!("libc.so.6: {e}"))?;
    let gcc_s = toolchain_lib("libgcc_s.so.1").ok_or("libgcc_s.so.1 not found")?;
    put(&gcc_s, &own.join("libgcc_s.so.1")).map_err(|e| format!("libgcc_s.so.1: {e}"))?;
    for (pkg, soname) in [("libnftnl", "libnftnl.so.11"), ("libmnl", "libmnl.so.0")] {
        let dir =
            output("pkg-config", &["--variable=libdir", pkg]).ok_or(format!("pkg-config {pkg}"))?;
        put(&Path::new(&dir).join(soname), &own.join(soname))
            .map_err(|e| format!("{soname}: {e}"))?;
    }
    Ok(())
}
