//! deploy/ proven on a real runtime: the image built offline from deploy/Containerfile with
//! buildah, imported into the node's containerd, and the DaemonSet's pod, read from deploy/ as
//! shipped, run through the CRI as the kubelet runs it (tests/node_e2e/kubelet.rs). Through
//! that container: it chains itself, repairs the pods started before it, answers the probes
//! the manifest declares where the kubelet calls them, serves /metrics on the node's address,
//! captures pods started afterwards, and a rollout leaves no window. Then the manifest with
//! each added capability removed, and the netns mount without its propagation: each fails, and
//! the failure names the manifest line that was missing. Then the k3s and GKE overlays, each
//! from a node reset to its primary config alone, with the node's directories at the overlay's
//! host paths (and, for k3s, an IPv6 status.hostIP): chained, repaired, captured again.

use crate::containerd::Sandbox;
use crate::kubelet::{Deploy, Kubelet, PodRun, log_messages};
use crate::node::{Node, in_netns, say};
use crate::{MESHED, ROOT, Report, has_table, prove_capture, prove_uncaptured, types};
use common::{http_get_at, serve};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `status.hostIP` of the test node (an address on its `lo`).
const HOST_IP: &str = "10.77.0.1";
/// The node's IPv6 address, `status.hostIP` of an IPv6 (or IPv6-first dual-stack) node.
const HOST_IP6: &str = "fd77::1";
/// The overlays the test runs, with the node address each gets.
const OVERLAYS: [(&str, &str); 2] = [("k3s", HOST_IP6), ("gke", HOST_IP)];
/// The manifest's event socket dir: the same path inside the container and on the host (the
/// plugin, run by the runtime on the host, connects to what the agent wrote into the chain).
const EVENTS_DIR: &str = "/run/mesh-redirect";

/// /run/mesh-redirect on this machine for the test's duration: made if missing, removed after.
struct EventsDir {
    made: bool,
}

impl EventsDir {
    fn take() -> EventsDir {
        let sock = Path::new(EVENTS_DIR).join("events.sock");
        assert!(
            std::os::unix::net::UnixStream::connect(&sock).is_err(),
            "{} is in use: a mesh-redirect agent runs on this machine; the test needs the path",
            sock.display()
        );
        let made = !Path::new(EVENTS_DIR).exists();
        EventsDir { made }
    }
}

impl Drop for EventsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(Path::new(EVENTS_DIR).join("events.sock"));
        // The agents' lock beside it (one owner per event socket).
        let _ = std::fs::remove_file(Path::new(EVENTS_DIR).join("events.sock.lock"));
        if self.made {
            let _ = std::fs::remove_dir(EVENTS_DIR);
        }
    }
}

/// What went wrong, pointed at the manifest line that would have prevented it.
fn diagnose(d: &Deploy, log: &[String], why: &str) -> String {
    let errors: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("\"level\":\"warn\"") || l.contains("\"level\":\"error\""))
        .collect();
    let all = format!("{why}\n{}", log.join("\n"));
    let evidence = errors
        .last()
        .map(|l| l.to_string())
        .unwrap_or_else(|| why.to_string());
    let (line, what) = if all.contains("cannot enter network namespace") && all.contains("EPERM") {
        (
            d.line("- SYS_ADMIN"),
            "the agent cannot enter pods' network namespaces: setns(2) needs CAP_SYS_ADMIN",
        )
    } else if all.contains("not an nsfs file") {
        (
            d.line("mountPropagation: HostToContainer"),
            "the netns files of pods started after the agent are empty files in its mount of \
             the netns dir: that mount needs HostToContainer propagation",
        )
    } else if all.contains("network namespace") && all.contains("does not exist") {
        (
            d.line("--netns-dir"),
            "the agent does not see pods' netns files: the host's netns dir must be mounted \
             where --netns-dir says",
        )
    } else if all.contains("Operation not permitted") || all.contains("EPERM") {
        (
            d.line("- NET_ADMIN"),
            "the agent cannot read or write nftables in pods' namespaces: that needs \
             CAP_NET_ADMIN",
        )
    } else {
        (d.line("containers:"), "the agent did not do its job")
    };
    format!("{line}: {what}.\n   why: {why}\n   agent: {evidence}")
}

/// One DaemonSet pod's proofs; `Err` names the manifest line behind a failure.
struct Proof<'a> {
    node: &'a mut Node,
    kubelet: &'a Kubelet,
    d: &'a Deploy,
    r: &'a Report,
    /// Names for pods this proof starts, unique across runs.
    tag: &'a str,
    /// The DaemonSet pods it started (a failed one too, to delete).
    runs: Vec<PodRun>,
}

impl Proof<'_> {
    fn readyz(&self) -> Option<(u16, String)> {
        let (host, port, path) = self.d.probe("readinessProbe");
        http_get_at(&self.node.ns.path(), &host, port, &path)
    }

    /// Waits for /readyz 200, the kubelet's readiness probe; fails early (with the reason) when
    /// the agent says a meshed pod is not captured or the container exits.
    fn wait_ready(&self, run: &PodRun, secs: u64) -> Result<(), String> {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < Duration::from_secs(secs) {
            match self.readyz() {
                Some((200, _)) => return Ok(()),
                Some((_, body)) if body.contains("not captured") => {
                    // Give the log a moment to hold the agent's own words.
                    std::thread::sleep(Duration::from_millis(200));
                    return Err(format!("/readyz 503: {}", body.trim()));
                }
                other => last = other,
            }
            if let Ok(st) = self.node.cri.container_status(&run.container) {
                if st.state == crate::cri::CONTAINER_EXITED {
                    return Err(format!("the container exited with code {}", st.exit_code));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "/readyz not 200 after {secs}s (last answer: {last:?})"
        ))
    }

    fn fail(&self, run: &PodRun, why: &str) -> String {
        diagnose(self.d, &log_messages(&run.log), why)
    }

    fn pod(&mut self, name: &str) -> Sandbox {
        let name = format!("{name}-{}", self.tag);
        self.node
            .run_pod(self.node.pod_config(&name, "default", MESHED, true))
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"))
    }

    /// Starts the DaemonSet's pod and proves, in order: ready (the pods before repaired), the
    /// chain, the probes, the security context in force, /metrics, a pod started now captured
    /// and its table, deleted, back within one period.
    fn run(&mut self, before: &[&Sandbox]) -> Result<usize, String> {
        let start = Instant::now();
        let name = format!("mesh-redirect-{}", self.tag);
        let run = self.kubelet.run(self.node, self.d, &name)?;
        self.runs.push(run);
        let run = self.runs.last().expect("just pushed");
        self.wait_ready(run, 30).map_err(|e| self.fail(run, &e))?;
        self.r.ok(&format!(
            "{name}: RunPodSandbox (host network) + CreateContainer + StartContainer; the \
             readiness probe ({}) 200 after {:.0} ms",
            self.d.line("path: /readyz"),
            start.elapsed().as_secs_f64() * 1e3
        ));
        for p in before {
            if !has_table(&p.netns) {
                return Err(self.fail(run, &format!("{} was not repaired", p.name)));
            }
        }
        Ok(self.runs.len() - 1)
    }

    /// Deletes every DaemonSet pod this proof started (as a rollback or a rollout does).
    fn delete_all(&mut self) -> Vec<i32> {
        self.runs
            .drain(..)
            .map(|run| self.kubelet.delete(self.node, self.d, &run))
            .collect()
    }

    /// After `run`: a pod started now is captured; its table deleted comes back in a period.
    fn late_pod_kept_captured(&mut self) -> Result<Sandbox, String> {
        let n = self.runs.len();
        assert!(n > 0, "no DaemonSet pod running");
        let late = self.pod("web-late");
        if !has_table(&late.netns) {
            return Err(self.fail(
                &self.runs[n - 1],
                &format!("{} was not captured by ADD", late.name),
            ));
        }
        in_netns(
            &late.netns,
            &["nft", "delete", "table", "inet", "mesh_redirect"],
        );
        let period: f64 = self
            .d
            .arg("--reconcile-period")
            .and_then(|p| p.parse().ok())
            .unwrap_or(5.0);
        let t = Instant::now();
        let deadline = Duration::from_secs_f64(period + 3.0);
        while t.elapsed() < deadline {
            if has_table(&late.netns) {
                self.r.ok(&format!(
                    "{}, started after the agent: captured by ADD; its table deleted, back after \
                     {:.0} ms (period {period} s)",
                    late.name,
                    t.elapsed().as_secs_f64() * 1e3
                ));
                return Ok(late);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let body = self.readyz().map(|(_, b)| b).unwrap_or_default();
        self.node.remove_pod(&late);
        Err(self.fail(
            &self.runs[n - 1],
            &format!(
                "{}'s table, deleted, not back after {:.0} s; /readyz: {}",
                late.name,
                deadline.as_secs_f64(),
                body.trim()
            ),
        ))
    }
}

/// The test node's directory that a hostPath volume of the manifest stands for, by the
/// volume's name (the same in deploy/ and every overlay: only the paths differ).
fn node_dir(node: &Node, volume: &str) -> PathBuf {
    match volume {
        "cni-bin" => node.bin_dir(),
        "cni-conf" => node.conf_dir(),
        "cri" => node.socket().parent().expect("socket dir").into(),
        "netns" => node.netns_dir(),
        // The test node is this machine: its own loader answers for its glibc.
        "node-loader" => PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
        other => panic!("hostPath volume {other}: the test node has no stand-in for it"),
    }
}

/// The kubelet for the manifests `d`: each hostPath is found below the node's `host/` dir at
/// the manifest's own path (`/var/lib/rancher/k3s/data/cni` → `<node>/host/var/lib/rancher/
/// k3s/data/cni`), a link to the node's directory that the volume stands for, the way
/// `/var/lib/rancher/k3s/data/current` is a link on a k3s node; the runtime resolves it when
/// it mounts. The event socket's dir is the real /run/mesh-redirect (the plugin, on the host,
/// connects to the path the agent wrote into the chain).
fn kubelet_for(node: &Node, d: &Deploy, host_ip: &str) -> Kubelet {
    let host = node.dir("host");
    let mut host_paths = Vec::new();
    for (volume, path) in d.host_paths() {
        if path == EVENTS_DIR {
            host_paths.push((path, PathBuf::from(EVENTS_DIR)));
            continue;
        }
        let target = node_dir(node, &volume);
        let link = host.join(path.trim_start_matches('/'));
        match std::fs::read_link(&link) {
            Ok(t) => assert_eq!(t, target, "{} links elsewhere", link.display()),
            Err(_) => {
                std::fs::create_dir_all(link.parent().expect("a parent")).expect("host dir");
                std::os::unix::fs::symlink(&target, &link).expect("link the node's dir");
            }
        }
        host_paths.push((path, link));
    }
    Kubelet {
        host_ip: host_ip.into(),
        host_paths,
        dir: node.dir("kubelet"),
    }
}

/// The effective capabilities, no_new_privs, seccomp mode and uid of a process, from /proc.
fn proc_status(pid: i32) -> (u64, String, String, String) {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        st.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let cap = u64::from_str_radix(&field("CapEff"), 16).unwrap_or(u64::MAX);
    (cap, field("NoNewPrivs"), field("Seccomp"), field("Uid"))
}

const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_SYS_ADMIN: u64 = 1 << 21;

#[test]
fn the_daemonset_as_shipped_runs_through_containerd_from_the_image_built_by_buildah() {
    let mut r = Report {
        start: Instant::now(),
        step: 0,
    };
    r.step("node with containerd and the primary network; pods start before mesh-redirect");
    let _events = EventsDir::take();
    let mut node = Node::start();
    node.import_pause_image();
    node.ns
        .exec(&["ip", "addr", "add", &format!("{HOST_IP}/32"), "dev", "lo"]);
    node.ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{HOST_IP6}/128"),
        "dev",
        "lo",
        "nodad",
    ]);
    let conflist = node.write_primary_conflist();
    node.wait_runtime_loaded(&conflist);
    let _cluster = serve(&node.ns.path(), ROOT, "node", &[8080, 9090], &[]);
    let web_a = node
        .run_pod(node.pod_config("web-a", "default", MESHED, true))
        .unwrap_or_else(|e| panic!("RunPodSandbox web-a: {e}"));
    let plain = node
        .run_pod(node.pod_config("plain-0", "default", &[("app", "plain")], true))
        .unwrap_or_else(|e| panic!("RunPodSandbox plain-0: {e}"));
    prove_uncaptured(&r, &web_a);
    r.ok("web-a (meshed) and plain-0 (no sidecar) run uncaptured: nothing is chained yet");

    r.step("the image: deploy/Containerfile built by buildah, offline, imported into containerd");
    let d = Deploy::load();
    let image = crate::image::build(&node, &d.image());
    node.import_image(&image.archive, &image.reference);
    r.ok(&format!(
        "buildah bud -f deploy/Containerfile . → {} ({:.1} MB uncompressed, FROM scratch: the \
         three binaries, libmnl, glibc), imported; the CRI knows it",
        image.reference,
        image.size as f64 / 1e6
    ));
    r.ok(&crate::image::check_libraries(&node, &image));

    r.step("deploy/ read as shipped; the kubelet's translation of the DaemonSet's pod");
    let kubelet = kubelet_for(&node, &d, HOST_IP);
    let c = d.container();
    r.ok(&format!(
        "namespace {}, image {}, args {}, capabilities add {} drop {}, readOnlyRootFilesystem {}, \
         allowPrivilegeEscalation {}, seccomp {}",
        d.namespace,
        d.image(),
        c["args"].as_array().map_or(0, Vec::len),
        c["securityContext"]["capabilities"]["add"],
        c["securityContext"]["capabilities"]["drop"],
        c["securityContext"]["readOnlyRootFilesystem"],
        c["securityContext"]["allowPrivilegeEscalation"],
        c["securityContext"]["seccompProfile"]["type"]
    ));

    // Less than the agent needs: each added capability removed in turn.
    for cap in ["SYS_ADMIN", "NET_ADMIN"] {
        r.step(&format!(
            "the manifest without {cap}: must fail, naming the line"
        ));
        let mut v = Deploy::load();
        let add = v.container_mut()["securityContext"]["capabilities"]["add"]
            .as_array_mut()
            .expect("capabilities.add");
        let n = add.len();
        add.retain(|c| c != cap);
        assert_eq!(add.len(), n - 1, "{cap} is not in capabilities.add");
        let tag = format!("no-{}", cap.to_lowercase().replace('_', "-"));
        let mut p = Proof {
            node: &mut node,
            kubelet: &kubelet,
            d: &v,
            r: &r,
            tag: &tag,
            runs: Vec::new(),
        };
        let result = p.run(&[&web_a]);
        // Its pod goes (a failed rollout rolled back); what it chained stays (keep-on-exit).
        p.delete_all();
        let Err(err) = result else {
            panic!(
                "without {cap} the DaemonSet's pod still did its job: the capability is not needed"
            )
        };
        let line = d.line(&format!("- {cap}"));
        assert!(
            err.starts_with(&line),
            "without {cap}, expected {line}; got:\n{err}"
        );
        say(&format!(
            "   ok  fails as it must:\n       {}",
            err.replace('\n', "\n       ")
        ));
        assert!(!has_table(&web_a.netns), "web-a repaired without {cap}");
    }

    r.step("the DaemonSet's pod as shipped");
    let mut p = Proof {
        node: &mut node,
        kubelet: &kubelet,
        d: &d,
        r: &r,
        tag: "1",
        runs: Vec::new(),
    };
    p.run(&[&web_a]).unwrap_or_else(|e| panic!("{e}"));
    let late = p.late_pod_kept_captured().unwrap_or_else(|e| panic!("{e}"));
    let mut rollout = p.runs;
    let loaded = node.loaded_network().expect("a loaded network");
    assert_eq!(types(&loaded), ["bridge", "portmap", "mesh-redirect"]);
    assert!(node.bin_dir().join("mesh-redirect").exists());
    // The agent in the image loaded glibc from its RUNPATH dir too: only libmnl may go to the
    // node (libnftnl is linked in; the node's libc stays the node's).
    assert_eq!(
        crate::node::list_dir(&node.bin_dir().join("mesh-redirect.libs")),
        ["libmnl.so.0"],
        "what the installer copied beside the plugin"
    );
    r.ok("chained: containerd loads bridge, portmap, mesh-redirect; the plugin in the bin dir, and beside it in mesh-redirect.libs/ only libmnl (not the image's libc)");
    let said = crate::kubelet::log_messages(&rollout.last().expect("a run").log);
    assert!(
        said.iter()
            .any(|l| l.contains("the node's glibc runs the plugin")),
        "the agent asked the node's loader (--node-loader) for its glibc: {said:#?}"
    );
    r.ok("the node's glibc, asked through the mounted loader, runs the plugin");
    say("   web-a, started before, repaired by the agent:");
    prove_capture(&r, &node, &web_a);
    say(&format!(
        "   {}, started after the agent, its table repaired:",
        late.name
    ));
    prove_capture(&r, &node, &late);
    assert!(!has_table(&plain.netns));
    r.ok("plain-0 untouched");
    let (lhost, lport, lpath) = d.probe("livenessProbe");
    let live = http_get_at(&node.ns.path(), &lhost, lport, &lpath);
    assert_eq!(live.map(|(c, _)| c), Some(200), "liveness probe");
    r.ok(&format!(
        "liveness probe GET http://{lhost}:{lport}{lpath} 200 ({})",
        d.line("path: /healthz")
    ));
    let mport = d.port("metrics");
    let (code, metrics) =
        http_get_at(&node.ns.path(), HOST_IP, mport, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    let value = |prefix: &str, labels: &[&str]| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(value("mesh_redirect_ready ", &[]), 1.0, "{metrics}");
    assert!(
        value("mesh_redirect_repairs_total", &["result=\"ok\""]) >= 2.0,
        "{metrics}"
    );
    assert!(
        value(
            "mesh_redirect_plugin_invocations_total",
            &["command=\"ADD\"", "outcome=\"captured\""]
        ) >= 1.0,
        "the plugin's events reach the agent: {metrics}"
    );
    assert!(
        http_get_at(&node.ns.path(), "127.0.0.1", mport, "/metrics").is_none(),
        "/metrics on loopback"
    );
    let (_, rport, _) = d.probe("readinessProbe");
    assert!(
        http_get_at(&node.ns.path(), HOST_IP, rport, "/readyz").is_none(),
        "the probe port on the node's address"
    );
    r.ok(&format!(
        "GET http://{HOST_IP}:{mport}/metrics 200 (--metrics-host=$(HOST_IP) from status.hostIP): \
         ready 1, repairs ≥ 2, the plugin's ADDs counted from its events; nothing on \
         127.0.0.1:{mport}, nor on {HOST_IP}:{rport}"
    ));
    // The container's process: `mesh-redirect install` exec'd the agent in place.
    let pid = node
        .cri
        .container_pid(&rollout[0].container)
        .expect("the container's pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline)
            .starts_with("/usr/local/bin/mesh-redirect-agent\0install"),
        "the container runs the agent: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    let agents = [pid];
    let (cap, nnp, seccomp, uid) = proc_status(agents[0]);
    assert_eq!(
        cap,
        CAP_NET_ADMIN | CAP_SYS_ADMIN,
        "effective capabilities {cap:#x}"
    );
    assert_eq!(nnp, "1", "no_new_privs");
    assert_eq!(seccomp, "2", "seccomp filter mode");
    assert!(uid.starts_with("0\t"), "uid {uid}");
    let root_ro = std::fs::read_to_string(format!("/proc/{}/mountinfo", agents[0]))
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split(' ').nth(4) == Some("/")
                && l.split(' ').nth(5).is_some_and(|o| o.starts_with("ro"))
        });
    assert!(root_ro, "the root filesystem is read-only");
    r.ok("in force in the agent's process: CapEff = NET_ADMIN|SYS_ADMIN only, NoNewPrivs 1, seccomp filter, uid 0, read-only root");
    let log = rollout[0].log.clone();
    common::wait_for(
        20,
        "the capture-bypass probe to run in the container",
        || {
            log_messages(&log)
                .iter()
                .any(|l| l.contains("reach capture unchanged"))
        },
    );
    r.ok(&format!(
        "the capture-bypass probe runs inside the container with these capabilities and the \
         kubelet's KUBERNETES_SERVICE_HOST ({}): connects reach capture unchanged",
        crate::kubelet::SERVICE_HOST
    ));

    r.step("a rollout: the pod stopped (SIGTERM), a pod starts in the gap, the new pod takes over");
    let code = kubelet.delete(&node, &d, &rollout.pop().expect("the pod"));
    assert_eq!(code, 0, "the agent's exit code on SIGTERM");
    let gap = Proof {
        node: &mut node,
        kubelet: &kubelet,
        d: &d,
        r: &r,
        tag: "gap",
        runs: Vec::new(),
    }
    .pod("web");
    assert!(
        has_table(&gap.netns),
        "a pod started with no agent running is uncaptured"
    );
    r.ok(&format!(
        "StopContainer: exit 0 within the grace period; {} started with no agent is captured \
         (the chain and the binary stay: MESH_REDIRECT_KEEP_ON_EXIT, {})",
        gap.name,
        d.line("MESH_REDIRECT_KEEP_ON_EXIT")
    ));
    prove_capture(&r, &node, &gap);
    let mut p = Proof {
        node: &mut node,
        kubelet: &kubelet,
        d: &d,
        r: &r,
        tag: "2",
        runs: Vec::new(),
    };
    let i = p
        .run(&[&web_a, &late, &gap])
        .unwrap_or_else(|e| panic!("{e}"));
    let repaired: Vec<String> = log_messages(&p.runs[i].log)
        .into_iter()
        .filter(|l| l.contains("repaired a pod"))
        .collect();
    assert!(
        repaired.is_empty(),
        "nothing to repair after the rollout: {repaired:?}"
    );
    r.ok("the new pod ready with nothing to repair");
    assert_eq!(p.delete_all(), [0]);

    r.step("the netns mount without HostToContainer propagation: must fail, naming the line");
    let mut v = Deploy::load();
    let mounts = v.container_mut()["volumeMounts"]
        .as_array_mut()
        .expect("volumeMounts");
    let netns = mounts
        .iter_mut()
        .find(|m| m["mountPropagation"] == "HostToContainer")
        .expect("a HostToContainer mount");
    netns.as_object_mut().unwrap().remove("mountPropagation");
    let mut p = Proof {
        node: &mut node,
        kubelet: &kubelet,
        d: &v,
        r: &r,
        tag: "no-propagation",
        runs: Vec::new(),
    };
    p.run(&[&web_a]).unwrap_or_else(|e| panic!("{e}"));
    let result = p.late_pod_kept_captured();
    p.delete_all();
    let err = match result {
        Ok(late) => panic!(
            "without HostToContainer, {}'s table came back: the propagation is not needed",
            late.name
        ),
        Err(e) => e,
    };
    let line = d.line("mountPropagation: HostToContainer");
    assert!(err.starts_with(&line), "expected {line}; got:\n{err}");
    say(&format!(
        "   ok  fails as it must:\n       {}",
        err.replace('\n', "\n       ")
    ));

    for p in [&web_a, &plain, &late, &gap] {
        node.remove_pod(p);
    }

    // The platform overlays: the same image and pod, other host paths (and an IPv6 node).
    let mport = d.port("metrics");
    for (name, host_ip) in OVERLAYS {
        let o = Deploy::overlay(name);
        r.step(&format!(
            "{}: from a node with its primary config alone, its dirs at the overlay's paths, \
             status.hostIP {host_ip}",
            o.dir
        ));
        assert_eq!(o.image(), d.image(), "{name}: the image built above");
        let moved: Vec<String> = o
            .host_paths()
            .into_iter()
            .filter(|hp| !d.host_paths().contains(hp))
            .map(|(v, path)| format!("{v} {path}"))
            .collect();
        assert!(
            !moved.is_empty(),
            "{name}: no host path differs from deploy/'s"
        );
        common::uninstall(&node.bin_dir(), &node.conf_dir());
        assert!(!node.bin_dir().join("mesh-redirect").exists());
        node.wait_runtime_loaded(&conflist);
        let kubelet = kubelet_for(&node, &o, host_ip);
        let (before, late, runs) = {
            let mut p = Proof {
                node: &mut node,
                kubelet: &kubelet,
                d: &o,
                r: &r,
                tag: name,
                runs: Vec::new(),
            };
            let before = p.pod("web-before");
            assert!(
                !has_table(&before.netns),
                "{} captured unchained",
                before.name
            );
            p.run(&[&before]).unwrap_or_else(|e| panic!("{name}: {e}"));
            let late = p
                .late_pod_kept_captured()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            (before, late, std::mem::take(&mut p.runs))
        };
        let loaded = node.loaded_network().expect("a loaded network");
        assert_eq!(types(&loaded), ["bridge", "portmap", "mesh-redirect"]);
        assert!(
            node.bin_dir()
                .join("mesh-redirect.libs/libmnl.so.0")
                .exists()
        );
        r.ok(&format!(
            "host paths {}: the agent chained itself through them (containerd loads bridge, \
             portmap, mesh-redirect; the plugin and its libraries in the node's bin dir)",
            moved.join(", ")
        ));
        say(&format!(
            "   {}, started before the agent, repaired:",
            before.name
        ));
        prove_capture(&r, &node, &before);
        say(&format!(
            "   {}, started after, its table repaired:",
            late.name
        ));
        prove_capture(&r, &node, &late);
        let (code, metrics) = http_get_at(&node.ns.path(), host_ip, mport, "/metrics")
            .unwrap_or_else(|| panic!("{name}: no /metrics on {host_ip}:{mport}"));
        assert_eq!(code, 200);
        assert!(metrics.contains("\nmesh_redirect_ready 1"), "{metrics}");
        let other = if host_ip == HOST_IP {
            HOST_IP6
        } else {
            HOST_IP
        };
        assert!(
            http_get_at(&node.ns.path(), other, mport, "/metrics").is_none(),
            "/metrics on {other} too"
        );
        let shown = if host_ip.contains(':') {
            format!("[{host_ip}]")
        } else {
            host_ip.to_string()
        };
        r.ok(&format!(
            "GET http://{shown}:{mport}/metrics 200, ready 1 (--metrics-host=$(HOST_IP) \
             --metrics-port={mport}); nothing on {other}"
        ));
        for run in &runs {
            assert_eq!(kubelet.delete(&node, &o, run), 0, "{name}: exit code");
        }
        node.remove_pod(&before);
        node.remove_pod(&late);
    }
    say(&format!(
        "PASS  deploy/ and the overlays {} as shipped through containerd in {:.1}s (image \
         {:.1} MB)",
        OVERLAYS.map(|(o, _)| o).join(", "),
        r.start.elapsed().as_secs_f64(),
        image.size as f64 / 1e6
    ));
}
