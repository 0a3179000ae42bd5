//! Links libnftnl and the unwinder into the binaries (static archives, found first on the
//! linker's search path): every exec of the plugin (one per ADD and DEL) then maps and
//! relocates two shared libraries fewer, about 0.25 ms here (docs/PERFORMANCE.md). libmnl and
//! glibc stay shared (Debian ships no libmnl.a); the installed plugin finds the libmnl copy the
//! installer ships beside it (`<cni bin dir>/mesh-redirect.libs/`) before the node's own.
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
    if let Err(e) = static_archives() {
        println!("cargo:warning=libnftnl and the unwinder stay shared libraries ({e})");
    }
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

/// A directory, first on the linker's search path, holding only static archives under the
/// names the link asks for: `-lnftnl` (from nftnl-sys) finds `libnftnl.a`, and `-lgcc_s`
/// (which Rust's std asks for, for unwinding) finds a copy of `libgcc_eh.a`, the same unwinder
/// that `gcc -static-libgcc` links. Within one directory the linker prefers a `.so`; with only
/// archives there it takes them, and the shared copies elsewhere are never looked at.
fn static_archives() -> Result<(), String> {
    let dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("no OUT_DIR")?).join("static");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let libdir = output("pkg-config", &["--variable=libdir", "libnftnl"])
        .ok_or("pkg-config does not know libnftnl")?;
    let nftnl = Path::new(&libdir).join("libnftnl.a");
    let eh = toolchain_lib("libgcc_eh.a").ok_or("the C compiler has no libgcc_eh.a")?;
    for (src, name) in [(&nftnl, "libnftnl.a"), (&eh, "libgcc_s.a")] {
        std::fs::copy(src, dir.join(name)).map_err(|e| format!("{}: {e}", src.display()))?;
        println!("cargo:rerun-if-changed={}", src.display());
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
    Ok(())
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
/// `/lib/ld-linux-aarch64.so.1`), and every shared library the binaries need (libc, libmnl;
/// libnftnl and the unwinder are linked in) in `/usr/local/bin/mesh-redirect.libs/`, where their RUNPATH
/// (`$ORIGIN/mesh-redirect.libs`) finds them first, whatever directories the loader would
/// search by default (Debian's `/lib/<triplet>`, Fedora's `/lib64`, Arch's `/usr/lib`): an
/// image built on any of them starts. The installer copies only libmnl from there to the node
/// (`install::files::bundled_libs`); the node's own libc stays the node's.
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
    let soname = "libmnl.so.0";
    let dir = output("pkg-config", &["--variable=libdir", "libmnl"]).ok_or("pkg-config libmnl")?;
    put(&Path::new(&dir).join(soname), &own.join(soname)).map_err(|e| format!("{soname}: {e}"))?;
    Ok(())
}
