//! A KubeVirt-style VM behind a pod: a namespace of its own joined to the pod by a veth whose
//! pod end gets a name the test picks (KubeVirt's `k6t-eth0`, or Istio's golden `eth1`),
//! made after the pod's ADD, as KubeVirt makes its interfaces later. The pod forwards; the
//! node routes the VM's subnet back through the pod. Everything is inside namespaces the test
//! made.

use crate::netns::Netns;
use crate::pod::Pod;
use crate::probe::{ROOT, answer, connect};

pub struct Vm {
    pub ns: Netns,
    pub ip4: String,
    pub ip6: String,
}

impl Vm {
    /// VM `n` (1-9) behind `pod`: 10.20n.0.2/24 and fd2n::2/64, the pod end `ifname` with .1
    /// and ::1.
    pub fn attach(pod: &Pod, ifname: &str, n: u8) -> Vm {
        let ns = Netns::new("mrt-vm-");
        let (p4, v4) = (format!("10.20{n}.0.1"), format!("10.20{n}.0.2"));
        let (p6, v6) = (format!("fd2{n}::1"), format!("fd2{n}::2"));
        pod.pod.exec(&[
            "ip", "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        pod.pod
            .exec(&["ip", "addr", "add", &format!("{p4}/24"), "dev", ifname]);
        pod.pod
            .exec(&["ip", "addr", "add", &format!("{p6}/64"), "dev", ifname]);
        pod.pod.exec(&["ip", "link", "set", ifname, "up"]);
        pod.pod.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        ns.exec(&["ip", "addr", "add", &format!("{v6}/64"), "dev", "eth0"]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns.exec(&["ip", "route", "add", "default", "via", &p4]);
        ns.exec(&["ip", "-6", "route", "add", "default", "via", &p6]);
        if !pod.ip4.is_empty() {
            pod.node.exec(&[
                "ip",
                "route",
                "replace",
                &format!("10.20{n}.0.0/24"),
                "via",
                &pod.ip4,
            ]);
        }
        if !pod.ip6.is_empty() {
            pod.node.exec(&[
                "ip",
                "-6",
                "route",
                "replace",
                &format!("fd2{n}::/64"),
                "via",
                &pod.ip6,
            ]);
        }
        Vm {
            ns,
            ip4: v4,
            ip6: v6,
        }
    }

    /// A TCP connection from the VM: who answered (see [`describe`]).
    pub fn dial(&self, dst: &str) -> String {
        describe(connect(&self.ns.path(), ROOT, dst))
    }
}

/// How a connection ended: `proxy:PORT orig=ADDR`, `NAME:PORT`, or `no answer`.
pub fn describe(res: Result<String, String>) -> String {
    match res {
        Err(_) => "no answer".into(),
        Ok(line) => {
            let (name, orig) = answer(&line);
            let port = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("port="))
                .unwrap_or_default()
                .to_string();
            if name == "proxy" {
                format!("proxy:{port} orig={orig}")
            } else {
                format!("{name}:{port}")
            }
        }
    }
}
