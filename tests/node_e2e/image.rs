//! The node image, built as a user builds it: `cargo build --release --bins`, then
//! `buildah bud -f deploy/Containerfile .` with no registry (buildah needs no daemon), into
//! storage and a network config dir of the test's own; then saved as an archive that the node's
//! containerd imports, as a registry pull would have put it there.

use crate::node::{Node, run};
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
    crate::common::release_bins();
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
