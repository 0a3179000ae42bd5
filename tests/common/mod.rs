//! Test support: throwaway network namespaces, a node + pod made by the real reference CNI
//! plugins with mesh-redirect chained after them, and traffic through `capture-probe`.
//!
//! Every namespace, process and directory made here is removed on drop, also when a test
//! panics. Nothing touches the host's root network namespace: the "node" is a namespace too.

#![allow(dead_code)]

pub mod agent;
pub mod cnichain;
pub mod memcg;
pub mod twin;
pub mod vm;

use cnichain::{Attachment, PluginError, Runtime};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_mesh-redirect");
pub const PROBE: &str = env!("CARGO_BIN_EXE_capture-probe");
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

pub const PROXY_UID: u32 = 1337;
pub const APP_UID: u32 = 1000;
pub const STATUS: &str = "sidecar.istio.io/status";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (they create network namespaces); run scripts/test.sh as root"
    );
    assert!(
        Path::new(REFERENCE_PLUGINS).join("bridge").exists(),
        "reference CNI plugins missing in {REFERENCE_PLUGINS}: run scripts/deps.sh"
    );
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("mesh-redirect-test-"));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

/// A process killed and reaped on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Who runs a probe command.
#[derive(Clone, Copy, Debug)]
pub struct Ident {
    pub uid: u32,
    pub gid: u32,
}

pub const APP: Ident = Ident {
    uid: APP_UID,
    gid: APP_UID,
};
pub const PROXY: Ident = Ident {
    uid: PROXY_UID,
    gid: PROXY_UID,
};
pub const ROOT: Ident = Ident { uid: 0, gid: 0 };

fn probe_cmd(netns: &str, who: Ident) -> Command {
    let mut c = Command::new(PROBE);
    c.args([
        "--netns",
        netns,
        "--gid",
        &who.gid.to_string(),
        "--uid",
        &who.uid.to_string(),
    ]);
    c
}

/// Starts `capture-probe serve` and waits until it listens.
pub fn serve(netns: &str, who: Ident, name: &str, ports: &[u16], extra: &[&str]) -> Proc {
    let mut c = probe_cmd(netns, who);
    c.args(["serve", "--name", name]);
    for p in ports {
        c.args(["--port", &p.to_string()]);
    }
    c.args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = c.spawn().expect("spawn capture-probe");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("probe stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read probe readiness");
    let proc = Proc(child);
    assert_eq!(line.trim(), "ready", "capture-probe {name} did not start");
    proc
}

/// `capture-probe connect`: the answering server's line, or the failure.
pub fn connect(netns: &str, who: Ident, addr: &str) -> Result<String, String> {
    connect_cmd(probe_cmd(netns, who).args(["--timeout-ms", "1500", "connect", addr]))
}

/// `capture-probe connect --bind`: a connection from a local source address (as Envoy's
/// inbound passthrough connects to the app from 127.0.0.6 / ::6, or a node address).
pub fn connect_from(netns: &str, who: Ident, addr: &str, bind: &str) -> Result<String, String> {
    connect_cmd(probe_cmd(netns, who).args([
        "--timeout-ms",
        "1500",
        "connect",
        addr,
        "--bind",
        bind,
    ]))
}

fn connect_cmd(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().expect("run capture-probe");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// `capture-probe udp`.
pub fn udp(netns: &str, who: Ident, addr: &str) -> Result<String, String> {
    let out = probe_cmd(netns, who)
        .args(["--timeout-ms", "1500", "udp", addr])
        .output()
        .expect("run capture-probe");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Who answered a connection, and the original destination it saw.
pub fn answer(line: &str) -> (String, String) {
    let name = line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let orig = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("orig="))
        .unwrap_or_default()
        .to_string();
    (name, orig)
}

pub const SUBNET4: &str = "10.88.0.0/24";
pub const GW4: &str = "10.88.0.1";
pub const SUBNET6: &str = "fd88::/64";
pub const GW6: &str = "fd88::1";

/// A node namespace (no uplink) with a pod namespace attached by the real chain:
/// `loopback`, then `bridge` + `host-local` + mesh-redirect from one conflist.
pub struct Pod {
    pub pod: Netns,
    pub node: Netns,
    pub tmp: TempDir,
    pub list: Value,
    pub att: Attachment,
    pub result: Option<Value>,
    pub ip4: String,
    pub ip6: String,
    pub cni_path: Vec<PathBuf>,
}

pub fn runtime(node: &Netns) -> Runtime {
    Runtime {
        cni_path: default_cni_path(),
        exec_netns: Some(node.name.clone()),
    }
}

pub fn default_cni_path() -> Vec<PathBuf> {
    vec![PathBuf::from(REFERENCE_PLUGINS), plugin_dir()]
}

pub fn plugin_dir() -> PathBuf {
    Path::new(PLUGIN)
        .parent()
        .expect("plugin dir")
        .to_path_buf()
}

/// The test conflist: bridge with dual-stack host-local, then mesh-redirect.
pub fn conflist(data_dir: &Path, version: &str, mesh: Value) -> Value {
    let mut entry = json!({"type": "mesh-redirect", "capabilities": {"io.kubernetes.cri.pod-annotations": true}});
    if let (Some(e), Value::Object(extra)) = (entry.as_object_mut(), mesh) {
        e.extend(extra);
    }
    json!({
        "cniVersion": version,
        "name": "mrtest",
        "plugins": [
            {
                "type": "bridge", "bridge": "mr0", "isGateway": true,
                "ipam": {
                    "type": "host-local", "dataDir": data_dir.to_string_lossy(),
                    "ranges": [[{"subnet": SUBNET4}], [{"subnet": SUBNET6}]],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
                }
            },
            entry
        ]
    })
}

impl Pod {
    /// A pod with these annotations (`None`: the runtime passes none) and plugin-config keys.
    pub fn with(annotations: Option<Value>, mesh: Value) -> Result<Pod, PluginError> {
        Self::build(annotations, mesh, "1.0.0", "default")
    }

    /// A pod with a sidecar (the status annotation) plus these annotations.
    pub fn meshed(extra: &[(&str, &str)]) -> Pod {
        let mut ann = json!({STATUS: "{}"});
        for (k, v) in extra {
            ann[*k] = json!(v);
        }
        Self::with(Some(ann), json!({})).unwrap_or_else(|e| panic!("ADD failed: {e}"))
    }

    pub fn build(
        annotations: Option<Value>,
        mesh: Value,
        version: &str,
        namespace: &str,
    ) -> Result<Pod, PluginError> {
        let tmp = TempDir::new();
        let list = conflist(tmp.path(), version, mesh);
        Self::from_list(list, tmp, annotations, namespace)
    }

    /// A pod attached by the chain of `list` (whose host-local state lives in `tmp`).
    pub fn from_list(
        list: Value,
        tmp: TempDir,
        annotations: Option<Value>,
        namespace: &str,
    ) -> Result<Pod, PluginError> {
        Self::from_list_in(list, tmp, annotations, namespace, default_cni_path())
    }

    /// The same, finding plugins in `cni_path`.
    pub fn from_list_in(
        list: Value,
        tmp: TempDir,
        annotations: Option<Value>,
        namespace: &str,
        cni_path: Vec<PathBuf>,
    ) -> Result<Pod, PluginError> {
        require_root();
        let version = list["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
        let node = Netns::new("mrt-node-");
        let pod = Netns::new("mrt-pod-");
        let mut att = Attachment {
            container_id: unique("ctr"),
            netns: pod.path(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), namespace.into()),
                ("K8S_POD_NAME".into(), "web-0".into()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), "x".into()),
            ],
            ..Attachment::default()
        };
        if let Some(a) = annotations {
            att.cap_args
                .insert("io.kubernetes.cri.pod-annotations".into(), a);
        }
        let rt = Runtime {
            cni_path: cni_path.clone(),
            exec_netns: Some(node.name.clone()),
        };
        // The runtime brings lo up with the loopback plugin, outside the pod's conflist.
        let lo = json!({"cniVersion": version, "name": "cni-loopback", "type": "loopback"});
        rt.exec(
            "ADD",
            &lo,
            &Attachment {
                ifname: "lo".into(),
                ..att.clone()
            },
        )?;
        let mut p = Pod {
            pod,
            node,
            tmp,
            list,
            att,
            result: None,
            ip4: String::new(),
            ip6: String::new(),
            cni_path,
        };
        let result = rt.add(&p.list, &p.att)?;
        for ip in result["ips"].as_array().into_iter().flatten() {
            let a = ip["address"].as_str().unwrap_or_default();
            let addr = a.split('/').next().unwrap_or_default().to_string();
            if addr.contains(':') {
                p.ip6 = addr;
            } else {
                p.ip4 = addr;
            }
        }
        p.result = Some(result);
        Ok(p)
    }

    pub fn runtime(&self) -> Runtime {
        Runtime {
            cni_path: self.cni_path.clone(),
            exec_netns: Some(self.node.name.clone()),
        }
    }

    /// The stand-in proxy: uid/gid 1337, outbound 15001, inbound 15006.
    pub fn proxy(&self) -> Proc {
        serve(&self.pod.path(), PROXY, "proxy", &[15001, 15006], &[])
    }

    /// An app server in the pod (uid 1000).
    pub fn app_server(&self, ports: &[u16]) -> Proc {
        serve(&self.pod.path(), APP, "app", ports, &[])
    }

    /// A server in the node namespace: the "rest of the cluster".
    pub fn node_server(&self, ports: &[u16]) -> Proc {
        serve(&self.node.path(), ROOT, "node", ports, &[])
    }

    /// A connection from inside the pod.
    pub fn dial_from_pod(&self, who: Ident, addr: &str) -> Result<String, String> {
        connect(&self.pod.path(), who, addr)
    }

    /// A connection from the node to the pod.
    pub fn dial_from_node(&self, addr: &str) -> Result<String, String> {
        connect(&self.node.path(), ROOT, addr)
    }

    /// Runs mesh-redirect alone with this pod's env and the given full config.
    pub fn plugin(&self, command: &str, conf: &Value) -> Result<Option<Value>, PluginError> {
        self.runtime().exec(command, conf, &self.att)
    }

    /// The config the runtime gives mesh-redirect (the chain's last entry) for this pod.
    pub fn mesh_conf(&self) -> Value {
        let entries = self.list["plugins"].as_array().cloned().unwrap_or_default();
        let entry = entries.last().cloned().unwrap_or_default();
        Runtime::plugin_conf(&self.list, &entry, self.result.as_ref(), &self.att)
    }

    pub fn check(&self) -> Result<(), PluginError> {
        self.runtime().check(
            &self.list,
            &self.att,
            self.result.as_ref().unwrap_or(&Value::Null),
        )
    }

    pub fn del(&self) -> Result<(), PluginError> {
        self.runtime()
            .del(&self.list, &self.att, self.result.as_ref())
    }
}

/// `host:port` for an address that may be IPv6.
pub fn hp(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Asserts `line` came from `who` and saw `orig` as the original destination.
#[track_caller]
pub fn assert_answer(res: Result<String, String>, who: &str, orig: Option<&str>) {
    let line = res.unwrap_or_else(|e| panic!("expected {who} to answer, got error: {e}"));
    let (name, o) = answer(&line);
    assert_eq!(name, who, "answered by the wrong party: {line}");
    if let Some(orig) = orig {
        assert_eq!(o, orig, "wrong original destination: {line}");
    }
}

/// Writes `text` to a file in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).expect("create file");
    f.write_all(text.as_bytes()).expect("write file");
    p
}

/// The config a runtime gives mesh-redirect for a pod with `annotations`: a fixed
/// prevResult, plus `extra` top-level keys.
pub fn plugin_conf(annotations: Value, extra: Value) -> Value {
    let mut c = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "mesh-redirect",
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}});
    if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
        c.extend(e);
    }
    c
}

/// `plugin_conf` for a pod with a sidecar and `extra` annotations.
pub fn meshed_conf(extra: &[(&str, &str)]) -> Value {
    let mut ann = json!({STATUS: "{}"});
    for (k, v) in extra {
        ann[*k] = json!(v);
    }
    plugin_conf(ann, json!({}))
}

/// Runs the plugin binary as a runtime does for pod default/web-0 (`env` overrides the
/// `CNI_*` variables; `wrapper` runs it under another program, e.g. strace). Returns
/// (exit success, stdout as JSON or Null).
pub fn invoke_wrapped(
    wrapper: &[&str],
    cmd: &str,
    netns: &str,
    stdin: &[u8],
    env: &[(&str, &str)],
) -> (bool, Value) {
    let mut c = match wrapper.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg(PLUGIN);
            c
        }
        None => Command::new(PLUGIN),
    };
    c.env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", "test-ctr")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0");
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the plugin");
    if let Some(mut pipe) = child.stdin.take() {
        // The plugin may stop reading early (bounded read): a broken pipe is fine.
        let _ = pipe.write_all(stdin);
    }
    let out = child.wait_with_output().expect("wait for the plugin");
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
    )
}

pub fn invoke(cmd: &str, netns: &str, stdin: &[u8], env: &[(&str, &str)]) -> (bool, Value) {
    invoke_wrapped(&[], cmd, netns, stdin, env)
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
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !ns.ruleset().contains("someone_elses") {
            assert!(
                std::time::Instant::now() < deadline,
                "nft -i did not create the owned table"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
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

/// `GET path` over HTTP/1.1 to 127.0.0.1:`port` inside the network namespace at `netns`
/// (the installer's readiness endpoint): (status code, body).
pub fn http_get_in(netns: &str, port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at(netns, "127.0.0.1", port, path)
}

/// An HTTP GET from inside `netns` to `host:port` (as the kubelet probes a hostNetwork pod):
/// the status code and body, or None when nothing answers.
pub fn http_get_at(netns: &str, host: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let (netns, host, path) = (netns.to_string(), host.to_string(), path.to_string());
    // setns is per thread: a thread of its own enters the namespace and ends there.
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).ok()?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let mut s = std::net::TcpStream::connect((host.as_str(), port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        std::io::Read::read_to_string(&mut s, &mut resp).ok()?;
        let code = resp.split_whitespace().nth(1)?.parse().ok()?;
        Some((
            code,
            resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
        ))
    })
    .join()
    .ok()
    .flatten()
}

/// `mesh-redirect uninstall` for these dirs, asserting it succeeds.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) {
    let out = Command::new(PLUGIN)
        .arg("uninstall")
        .arg("--cni-bin-dir")
        .arg(bin_dir)
        .arg("--cni-conf-dir")
        .arg(conf_dir)
        .output()
        .expect("run mesh-redirect uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The release binaries, as the image ships them (`cargo build --release --bins`; a no-op
/// when they are current): the directory that holds them. Tests of what the manifest's limits
/// allow run these, not the debug builds.
pub fn release_bins() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
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

/// The value of one series in Prometheus text (labels in any order).
pub fn sample(text: &str, series: &str) -> f64 {
    let (name, labels) = match series.split_once('{') {
        Some((n, l)) => (n, l.trim_end_matches('}')),
        None => (series, ""),
    };
    let want: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            let (n, ls) = match s.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (s, ""),
            };
            let have: Vec<&str> = ls.split(',').filter(|s| !s.is_empty()).collect();
            (n == name && want.len() == have.len() && want.iter().all(|w| have.contains(w)))
                .then(|| v.parse().ok())
                .flatten()
        })
        .next()
        .unwrap_or(0.0)
}
