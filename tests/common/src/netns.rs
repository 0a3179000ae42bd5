//! Network namespaces the test makes (`ip netns add`), and nftables state inside them.

use crate::sys::{run, unique};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        // DAD would leave fresh IPv6 addresses "tentative" (unusable) for a second or two.
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace (as root).
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run(&full)
    }

    /// The nftables ruleset of the namespace with handles (`nft -a list ruleset`).
    pub fn ruleset(&self) -> String {
        self.exec(&["nft", "-a", "list", "ruleset"])
    }

    pub fn has_table(&self) -> bool {
        self.exec(&["nft", "list", "tables"])
            .contains("mesh_redirect")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Someone else's `table inet mesh_redirect`, owned (NFT_TABLE_F_OWNER) by an `nft -i`
/// session in `ns`: the kernel refuses to let mesh-redirect delete it. Released on drop.
pub struct OwnedTable(Child);

impl OwnedTable {
    pub fn hold(ns: &Netns) -> OwnedTable {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nft -i");
        let stdin = child.stdin.as_mut().expect("nft stdin");
        writeln!(stdin, "add table inet mesh_redirect {{ flags owner; }}").expect("write to nft");
        writeln!(stdin, "add chain inet mesh_redirect someone_elses").expect("write to nft");
        stdin.flush().expect("flush nft");
        let held = OwnedTable(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ns.ruleset().contains("someone_elses") {
            assert!(
                Instant::now() < deadline,
                "nft -i did not create the owned table"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        held
    }
}

impl Drop for OwnedTable {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
