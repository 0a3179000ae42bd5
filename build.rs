//! Lets the installed plugin find the libnftnl/libmnl copies the installer ships beside it
//! (`<cni bin dir>/mesh-redirect.libs/`) before the node's own: nodes need not have them. And
//! records what the agent's `build_info` metric reports: the git commit and libnftnl version.
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
}
