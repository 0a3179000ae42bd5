//! Where things are: this package's binaries, the reference CNI plugins, the checkout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The Debian package's reference CNI plugins (`containernetworking-plugins`).
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The checkout (mesh-redirect's manifest dir): this crate lives in its `tests/common/`.
pub fn repo() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = here.parent().and_then(Path::parent).expect("tests/common");
        root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
    })
}

/// The directory cargo builds this package's binaries into: the running test's executable is
/// in its `deps/` (an example's in its `examples/`). What `CARGO_BIN_EXE_*` names at compile
/// time, found at run time, since a library is built before the binaries.
pub fn target_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        let mut dir = exe.parent().expect("the test's directory").to_path_buf();
        if dir.ends_with("deps") || dir.ends_with("examples") {
            dir.pop();
        }
        dir
    })
}

/// One of this package's binaries, built by cargo for the integration tests.
fn bin(name: &str) -> &'static str {
    static PATHS: OnceLock<[String; 3]> = OnceLock::new();
    let paths = PATHS.get_or_init(|| {
        ["mesh-redirect", "capture-probe", "mesh-redirect-agent"].map(|b| {
            let p = target_dir().join(b);
            assert!(
                p.is_file(),
                "{} missing: cargo builds it for the integration tests",
                p.display()
            );
            p.to_string_lossy().into_owned()
        })
    });
    match name {
        "mesh-redirect" => &paths[0],
        "capture-probe" => &paths[1],
        _ => &paths[2],
    }
}

/// The plugin binary (`mesh-redirect`).
pub fn plugin() -> &'static str {
    bin("mesh-redirect")
}

/// `capture-probe`: servers and clients that report who answered and the original destination.
pub fn probe() -> &'static str {
    bin("capture-probe")
}

/// The node agent (`mesh-redirect-agent`).
pub fn agent() -> &'static str {
    bin("mesh-redirect-agent")
}

/// The directory the plugin is in (a CNI_PATH entry).
pub fn plugin_dir() -> PathBuf {
    Path::new(plugin())
        .parent()
        .expect("plugin dir")
        .to_path_buf()
}

/// The reference plugins, then ours: the CNI_PATH of the test chain.
pub fn default_cni_path() -> Vec<PathBuf> {
    vec![PathBuf::from(REFERENCE_PLUGINS), plugin_dir()]
}

/// The release binaries, as the image ships them (`cargo build --release --bins`; a no-op
/// when they are current): the directory that holds them. Tests of what the manifest's limits
/// allow run these, not the debug builds.
pub fn release_bins() -> PathBuf {
    let root = repo();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "--bins", "--quiet"])
        .status()
        .expect("cargo build --release");
    assert!(st.success(), "cargo build --release --bins failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("release")
}
