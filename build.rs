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
    if let Err(e) = stage_image_libs() {
        println!("cargo:warning=image libraries not staged ({e}): deploy/Containerfile needs them");
    }
}

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

/// The image's libraries: glibc's loader, libc and libgcc_s where the binaries' interpreter and
/// the loader's default paths look, libnftnl and libmnl where their RUNPATH looks
/// (`$ORIGIN/mesh-redirect.libs`, beside the binaries in /usr/local/bin; the agent copies them
/// to the node from there).
fn stage_image_libs() -> Result<(), String> {
    let (triplet, loader_dir, loader) = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => ("x86_64-linux-gnu", "lib64", "ld-linux-x86-64.so.2"),
        Ok("aarch64") => ("aarch64-linux-gnu", "lib", "ld-linux-aarch64.so.1"),
        Ok(a) => return Err(format!("no image layout for {a}")),
        Err(_) => return Err("no target arch".into()),
    };
    let root = profile_dir().ok_or("no target dir")?.join("image-libs");
    let _ = std::fs::remove_dir_all(&root);
    let libdir = root.join("lib").join(triplet);
    for name in ["libc.so.6", "libgcc_s.so.1"] {
        let src = toolchain_lib(name).ok_or(format!("{name} not found"))?;
        put(&src, &libdir.join(name)).map_err(|e| format!("{name}: {e}"))?;
    }
    let ld = toolchain_lib(loader)
        .or_else(|| Some(PathBuf::from("/").join(loader_dir).join(loader)).filter(|p| p.exists()))
        .ok_or(format!("{loader} not found"))?;
    put(&ld, &root.join(loader_dir).join(loader)).map_err(|e| format!("{loader}: {e}"))?;
    let own = root.join("usr/local/bin/mesh-redirect.libs");
    for (pkg, soname) in [("libnftnl", "libnftnl.so.11"), ("libmnl", "libmnl.so.0")] {
        let dir =
            output("pkg-config", &["--variable=libdir", pkg]).ok_or(format!("pkg-config {pkg}"))?;
        put(&Path::new(&dir).join(soname), &own.join(soname))
            .map_err(|e| format!("{soname}: {e}"))?;
    }
    Ok(())
}
