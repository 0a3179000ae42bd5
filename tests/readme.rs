//! README's commands, run as written: every ```sh block README.md presents as what to type,
//! taken from README.md itself (not a copy), and every example in `cni-conf/` as shipped.
//!
//! Each README section's blocks run in order, as one bash script, in a sandbox: a new mount
//! and network namespace (the "node": no uplink, the host's network untouched) with empty
//! tmpfs over /etc/cni/net.d, /opt/cni/bin, /run/netns, /var/lib/cni and /var/log (and a TMPDIR of its own), so
//! `ip netns add`, `cp … /opt/cni/bin` and the bridge plugin's `cni0` all stay inside it and
//! vanish with it. The working directory is the checkout, as README says ("from this
//! directory"). A block whose first line is `# needs a cluster: …` or `# needs Docker: …` is
//! skipped, and the reason printed; so is a line that runs `scripts/test.sh` (this is that
//! run).

use common::*;
use std::path::Path;
use std::process::Command;

/// One ```sh block of README.md.
struct Block {
    section: String,
    line: usize,
    code: String,
}

fn readme_blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut section = String::from("(top)");
    let mut lines = text.lines().enumerate();
    while let Some((i, l)) = lines.next() {
        if let Some(h) = l.strip_prefix("## ") {
            section = h.trim().to_string();
        }
        if l.trim_end() == "```sh" {
            let mut code = String::new();
            for (_, l) in lines.by_ref() {
                if l.trim_end() == "```" {
                    break;
                }
                code.push_str(l);
                code.push('\n');
            }
            out.push(Block {
                section: section.clone(),
                line: i + 1,
                code,
            });
        }
    }
    out
}

/// Every README block (by its `# needs …` line) or line (a `scripts/test.sh` run) this test
/// does not run, with its section: a skip not listed here fails the test, and so does an entry
/// that no longer skips anything. Each skip is printed to stderr as it happens.
const SKIPS: &[(&str, &str)] = &[
    (
        "(top)",
        "scripts/test.sh   # the tests (what CI runs): fmt, clippy, shellcheck, manifests, unit and",
    ),
    (
        "Installing on a cluster",
        "needs an image store: the node e2e test runs this build with storage of its own in a temp dir",
    ),
    ("Installing on a cluster", "needs Docker"),
    (
        "Installing on a cluster",
        "needs a cluster: kubectl, pointed at it",
    ),
    (
        "Installing on a cluster",
        "needs kustomize (or edit the images: entry of deploy/kustomization.yaml by hand)",
    ),
    (
        "Installing on a cluster",
        "needs a cluster: kubectl, pointed at it",
    ),
    (
        "Installing on a cluster",
        "needs a cluster: kubectl, pointed at it, and a shell on the pod's node (crictl)",
    ),
    ("Installing on a cluster", "needs Docker and kind"),
    (
        "Installing on a cluster",
        "needs a cluster: kubectl, pointed at a k3s cluster",
    ),
    (
        "Running it by hand",
        "needs a node with a container runtime: crictl, and POD_ID from `crictl pods`",
    ),
];

/// Says `line` on the test process's stderr as it is, not through the test harness's capture:
/// a skip shows in every run, passing or not.
fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Why a block cannot run here (`# needs …` on its first line).
fn needs(b: &Block) -> Option<&str> {
    let first = b.code.lines().next()?.trim();
    first.strip_prefix("# needs ")
}

const SANDBOX_DIRS: [&str; 5] = [
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/run/netns",
    "/var/lib/cni",
    "/var/log",
];

/// Runs `script` with bash in the sandbox; returns (success, stdout + stderr).
fn sandbox(script: &str) -> (bool, String) {
    // One sandbox at a time: the mount points one makes (and removes) must not vanish under
    // another's feet.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let repo = env!("CARGO_MANIFEST_DIR");
    // Mount points must exist; the standard CNI dirs are created if missing (and removed
    // again if they were made here and stayed empty).
    let mut made: Vec<&Path> = Vec::new();
    for d in SANDBOX_DIRS {
        for a in Path::new(d)
            .ancestors()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if !a.exists() {
                std::fs::create_dir(a).expect("create mount point");
                made.push(a);
            }
        }
    }
    let mounts: String = SANDBOX_DIRS
        .iter()
        .map(|d| format!("mount -t tmpfs mesh-redirect-readme {d}\n"))
        .collect();
    // A temp dir of its own (TMPDIR), in memory: not a tmpfs over /tmp, which may hold the
    // checkout itself.
    let tmp = TempDir::new();
    let tmp = tmp.path().display();
    let full = format!(
        "set -euo pipefail\n{mounts}mount -t tmpfs mesh-redirect-readme {tmp}\nip link set lo up\n\
         export PATH=\"$HOME/.cargo/bin:/root/.cargo/bin:$PATH\" CARGO_NET_OFFLINE=true TMPDIR={tmp}\n\
         cd {repo}\n{script}"
    );
    let out = Command::new("unshare")
        // A PID namespace too: whatever a block leaves running (a server started with `&`
        // before a failing command) dies with the script, and cannot hold the output pipe.
        .args(["--mount", "--net", "--pid", "--mount-proc", "--fork"])
        .args(["--propagation", "private"])
        .args(["bash", "-c", &full])
        .output()
        .expect("run unshare");
    for d in made.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn every_command_readme_gives_runs_as_written() {
    require_root();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let blocks = readme_blocks(&readme);
    assert!(!blocks.is_empty(), "README.md has no ```sh block");
    let mut sections: Vec<(String, Vec<&Block>)> = Vec::new();
    for b in &blocks {
        match sections.last_mut() {
            Some((s, v)) if *s == b.section => v.push(b),
            _ => sections.push((b.section.clone(), vec![b])),
        }
    }
    let mut failures = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    for (section, blocks) in sections {
        let mut script = String::new();
        for b in blocks {
            if let Some(why) = needs(b) {
                note(&format!(
                    "skipped: README.md:{} ({section}) needs {why}",
                    b.line
                ));
                skipped.push((section.clone(), format!("needs {why}")));
                continue;
            }
            script.push_str(&format!("echo '+ README.md:{} ({section})'\n", b.line));
            for l in b.code.lines() {
                if l.contains("scripts/test.sh") {
                    note(&format!(
                        "skipped: README.md:{} `{}`: this is that test run",
                        b.line,
                        l.trim()
                    ));
                    skipped.push((section.clone(), l.trim().to_string()));
                    continue;
                }
                script.push_str(l);
                script.push('\n');
            }
        }
        if script.is_empty() {
            continue;
        }
        let (ok, out) = sandbox(&script);
        println!(
            "ran: README.md section {section:?}: {}",
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            failures.push(format!(
                "section {section:?} failed:\n--- script ---\n{script}--- output (end) ---\n{}",
                tail(&out, 40)
            ));
        }
    }
    // The skips, against the list (as multisets: the same reason may skip two blocks).
    let mut allowed: Vec<(String, String)> = SKIPS
        .iter()
        .map(|(s, w)| (s.to_string(), w.to_string()))
        .collect();
    let mut unlisted = Vec::new();
    for skip in skipped {
        match allowed.iter().position(|a| *a == skip) {
            Some(i) => {
                allowed.remove(i);
            }
            None => unlisted.push(skip),
        }
    }
    if !unlisted.is_empty() {
        failures.push(format!(
            "README blocks skipped but not in SKIPS (run them, or list them with the reason): \
             {unlisted:?}"
        ));
    }
    if !allowed.is_empty() {
        failures.push(format!(
            "in SKIPS but no longer skipped (remove them from the list): {allowed:?}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A cnitool stand-in built with the tests (`cargo test --all-targets` builds the examples).
fn cnitool() -> String {
    let p = Path::new(plugin())
        .parent()
        .expect("target dir")
        .join("examples/cnitool");
    if !p.exists() {
        run(&["cargo", "build", "--example", "cnitool"]);
    }
    p.to_string_lossy().into_owned()
}

/// `cni-conf/`'s files as shipped: the full chain (with the example annotations) through the
/// real reference plugins, and the plugin entries (with their pods' annotations) through
/// `mesh-redirect plan`, checked by nft.
#[test]
fn every_cni_conf_example_works_as_shipped() {
    require_root();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cni-conf");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut used = Vec::new();
    let plugin = plugin();
    let cnitool = cnitool();
    // The chain, exactly as shipped, with the shipped pod annotations.
    let script = format!(
        "cp /usr/lib/cni/* {plugin} /opt/cni/bin/\n\
         cp cni-conf/10-mesh-redirect.conflist /etc/cni/net.d/\n\
         ip netns add demo\n\
         export NETCONFPATH=/etc/cni/net.d CNI_PATH=/opt/cni/bin\n\
         export CNI_ARGS='IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0'\n\
         export CAP_ARGS=\"{{\\\"io.kubernetes.cri.pod-annotations\\\": $(cat cni-conf/pod-annotations.json)}}\"\n\
         {cnitool} add k8s-pod-network /run/netns/demo\n\
         ip netns exec demo nft list table inet mesh_redirect | grep -q 'redirect to :15001'\n\
         {cnitool} check k8s-pod-network /run/netns/demo\n\
         {cnitool} del k8s-pod-network /run/netns/demo\n\
         ! ip netns exec demo nft list table inet mesh_redirect 2>/dev/null\n"
    );
    let (ok, out) = sandbox(&script);
    assert!(ok, "10-mesh-redirect.conflist:\n{}", tail(&out, 30));
    used.extend(["10-mesh-redirect.conflist", "pod-annotations.json"]);
    // Each plugin entry with its pod's annotations: a plan nft accepts.
    for (entry, annotations) in [
        ("mesh-redirect.json", "pod-annotations.json"),
        ("linkerd.json", "pod-annotations-linkerd.json"),
        ("kuma.json", "pod-annotations-kuma.json"),
    ] {
        let script = format!(
            "{plugin} plan --config cni-conf/{entry} --annotations cni-conf/{annotations} > \"$TMPDIR/plan.nft\"\n\
             grep -q 'table inet mesh_redirect' \"$TMPDIR/plan.nft\"\n\
             nft -c -f \"$TMPDIR/plan.nft\"\n"
        );
        let (ok, out) = sandbox(&script);
        assert!(ok, "{entry} + {annotations}:\n{}", tail(&out, 30));
        used.extend([entry, annotations]);
    }
    for n in &names {
        assert!(
            used.contains(&n.as_str()),
            "cni-conf/{n} is used by no test"
        );
    }
}
