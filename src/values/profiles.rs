//! Mesh profiles as data: which annotation marks a pod as meshed, each annotation's name and
//! meaning, the defaults, and the switches where a mesh's rules differ in shape. The policy
//! engine (`policy::decide`) and the ruleset builder read these; adding a mesh is a new table.
//!
//! Sources: istio/istio `cni/pkg/plugin/sidecar_redirect.go` and `tools/istio-iptables`;
//! linkerd2-proxy-init `cni-plugin/main.go` and `pkg/iptables/iptables.go` (183e791) with the
//! linkerd2-cni chart's values; kumahq/kuma `app/cni` and `pkg/transparentproxy` (348b652,
//! 2026-08-21). README lists where we differ on purpose.

/// Which mesh's profile applies (the conflist entry's `mesh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mesh {
    Istio,
    Linkerd,
    Kuma,
}

impl Mesh {
    pub const ALL: [Mesh; 3] = [Mesh::Istio, Mesh::Linkerd, Mesh::Kuma];

    pub fn profile(self) -> &'static Profile {
        match self {
            Mesh::Istio => &ISTIO,
            Mesh::Linkerd => &LINKERD,
            Mesh::Kuma => &KUMA,
        }
    }

    pub fn name(self) -> &'static str {
        self.profile().name
    }

    pub fn from_name(n: &str) -> Option<Mesh> {
        Mesh::ALL.into_iter().find(|m| m.name() == n)
    }
}

/// How a pod shows it has this mesh's sidecar (and no init container of the mesh's own).
#[derive(Debug, Clone, Copy)]
pub enum Marker {
    /// The annotation is present (any value).
    Present(&'static str),
    /// The annotation has exactly this value.
    Equals(&'static str, &'static str),
}

/// Defaults the conflist entry can override.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub proxy_uid: u32,
    /// `None`: no group rule unless configured (Linkerd: only when `proxy-gid` is set).
    pub proxy_gid: Option<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub dns_port: u16,
    pub exclude_namespaces: &'static [&'static str],
    /// Inbound ports never captured (the proxy's own); annotations add to them.
    pub always_excluded_inbound: &'static [u16],
    /// Outbound ports not captured unless an annotation replaces the list.
    pub excluded_outbound: &'static [u16],
    /// Capture IPv6 as well as IPv4.
    pub ipv6: bool,
    /// Whether the mesh's proxy answers DNS at all (`captureDNS` is refused otherwise).
    pub dns: bool,
}

/// What an annotation sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A Go-ParseBool false value opts the pod out; anything else does not.
    Inject,
    /// `REDIRECT`, `TPROXY`, or `NONE` (not captured).
    InterceptionMode,
    /// CIDR list, or `*` as the whole value: outbound destinations captured.
    IncludeOutboundRanges,
    /// CIDR list: outbound destinations never captured.
    ExcludeOutboundRanges,
    /// CIDR list: inbound connections from these sources never captured.
    InboundExcludeSources,
    /// Port list, or `*` as the whole value; empty: no inbound capture.
    IncludeInboundPorts,
    /// Port list added to the always-excluded inbound ports.
    ExcludeInboundPorts,
    /// Port list captured outbound whatever the destination.
    IncludeOutboundPorts,
    /// Port list replacing the default excluded outbound ports.
    ExcludeOutboundPorts,
    /// Interface names (trailing `+`: prefix) whose traffic is never captured.
    ExcludeInterfaces,
    /// true/false: per-pod DNS capture switch.
    CaptureDns,
    /// Integer (Go's Atoi): the proxy's uid; 0 or less means no uid rule.
    ProxyUid,
    /// Integer: the proxy's gid; 0 or less means no gid rule.
    ProxyGid,
    /// Kuma's YAML document holding the whole capture configuration (absent or empty: the
    /// per-key annotations Kuma 2.x's injector writes by default).
    KumaConfig,
    /// Istio's `inject.istio.io/templates`: no `sidecar` among them, not captured.
    InjectTemplates,
    /// Istio's `sidecar.istio.io/status`: what the injector added (init-container mode, no
    /// proxy: not captured).
    SidecarStatus,
    /// Istio's `proxy.istio.io/config`: the proxy's metadata for this pod (DNS capture, dual
    /// stack, invalid-packet drop, the proxy disabled).
    ProxyConfig,
    /// Interfaces whose arriving TCP is redirected to the outbound port (KubeVirt).
    RerouteInterfaces,
    /// The deprecated name of the same, read only without the new one.
    KubevirtInterfaces,
}

#[derive(Debug, Clone, Copy)]
pub struct Annotation {
    pub name: &'static str,
    pub field: Field,
}

/// How the app's and the proxy's traffic over `lo` is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loopback {
    /// Istio's and Kuma's: the passthrough source (127.0.0.6, ::6) returns; the proxy calling
    /// a local non-127.0.0.1 address goes to the inbound port; the app's other loopback
    /// traffic returns (unless an include range holds a loopback address); localhost returns.
    Passthrough,
    /// Linkerd's: everything leaving on `lo` returns, for every uid.
    ReturnAll,
}

/// Where DNS capture sits and what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsShape {
    /// Istio's: TCP and UDP 53 to the DNS port, after the proxy's own traffic returned.
    TcpAndUdp,
    /// Kuma's: UDP 53 only, before anything but the excluded destinations; the proxy's UDP 53
    /// returns, and the app's TCP 53 goes out as it is.
    UdpFirst,
}

/// When `::6/128` (the proxy's IPv6 inbound-passthrough source) goes on `lo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough6 {
    /// Never.
    No,
    /// When the pod has an IPv6 address (from the primary plugin's result): Istio's.
    PodHasIpv6,
    /// When IPv6 is on in the pod's namespace (Kuma's dual stack: any IPv6 address there,
    /// link-local included, makes its validator test `::6`).
    Ipv6Enabled,
}

/// Where a mesh's rules differ in shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Port lists take `LOW-HIGH` ranges.
    pub port_ranges: bool,
    /// A port never redirected inbound nor by the proxy's loopback rule (Istio's HBONE 15008).
    pub tunnel_port: Option<u16>,
    pub loopback: Loopback,
    /// Excluded destinations return before anything else, for every uid (Kuma).
    pub exclude_dst_first: bool,
    pub dns: DnsShape,
    pub passthrough6: Passthrough6,
}

#[derive(Debug)]
pub struct Profile {
    pub mesh: Mesh,
    pub name: &'static str,
    pub marker: Marker,
    pub defaults: Defaults,
    /// Read in this order; a malformed one is code 100 even when another makes it moot.
    pub annotations: &'static [Annotation],
    pub shape: Shape,
}

/// Istio's annotation names.
pub mod istio {
    pub const STATUS: &str = "sidecar.istio.io/status";
    pub const INJECT: &str = "sidecar.istio.io/inject";
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
    pub const TEMPLATES: &str = "inject.istio.io/templates";
    pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
    pub const REROUTE_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
    /// Deprecated by Istio for `istio.io/reroute-virtual-interfaces`, which wins when both are
    /// there.
    pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
    /// Not an Istio name: a per-pod switch of ours that overrides `captureDNS` and the pod's
    /// `proxy.istio.io/config` (`ISTIO_META_DNS_CAPTURE`).
    pub const CAPTURE_DNS: &str = "traffic.mesh-redirect.io/captureDNS";

    /// Inbound ports never captured when includeInboundPorts is `*`: the proxy's own
    /// status (15020), health (15021) and Prometheus (15090) ports.
    pub const ALWAYS_EXCLUDED_INBOUND: [u16; 3] = [15020, 15021, 15090];
    /// The default excludeOutboundPorts (replaced, not extended, by the annotation).
    pub const DEFAULT_EXCLUDED_OUTBOUND: [u16; 1] = [15020];
    /// HBONE tunnel port: never redirected inbound, nor by the proxy's loopback rule.
    pub const TUNNEL_PORT: u16 = 15008;
}

/// Linkerd's annotation names.
pub mod linkerd {
    /// Written by the proxy injector only when it injected the proxy (and by Helm on the
    /// control plane's own pods).
    pub const PROXY_VERSION: &str = "linkerd.io/proxy-version";
    pub const SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
    pub const SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
    pub const SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
    pub const PROXY_UID: &str = "config.linkerd.io/proxy-uid";
    pub const PROXY_GID: &str = "config.linkerd.io/proxy-gid";
    /// The proxy's admin (4191) and control (4190) ports: linkerd2-cni's chart always puts
    /// them in `inbound-ports-to-ignore`.
    pub const ALWAYS_EXCLUDED_INBOUND: [u16; 2] = [4190, 4191];
}

/// Kuma's annotation names.
pub mod kuma {
    pub const SIDECAR_INJECTED: &str = "kuma.io/sidecar-injected";
    /// The injector's YAML with the whole capture configuration. Kuma 2.x writes it only with
    /// Helm's `transparentProxy.configMap.enabled`, per-key annotations otherwise (see
    /// `policy::kuma_keys`); Kuma's unreleased 3.0 writes only the YAML.
    pub const TRANSPARENT_PROXY_CONFIG: &str = "traffic.kuma.io/transparent-proxy-config";
}

pub static ISTIO: Profile = Profile {
    mesh: Mesh::Istio,
    name: "istio",
    marker: Marker::Present(istio::STATUS),
    defaults: Defaults {
        proxy_uid: 1337,
        proxy_gid: Some(1337),
        outbound_port: 15001,
        inbound_port: 15006,
        dns_port: 15053,
        exclude_namespaces: &["kube-system"],
        always_excluded_inbound: &istio::ALWAYS_EXCLUDED_INBOUND,
        excluded_outbound: &istio::DEFAULT_EXCLUDED_OUTBOUND,
        ipv6: true,
        dns: true,
    },
    annotations: &[
        // Skips first, as istio-cni decides them before it reads any setting.
        Annotation {
            name: istio::TEMPLATES,
            field: Field::InjectTemplates,
        },
        Annotation {
            name: istio::STATUS,
            field: Field::SidecarStatus,
        },
        Annotation {
            name: istio::PROXY_CONFIG,
            field: Field::ProxyConfig,
        },
        Annotation {
            name: istio::INJECT,
            field: Field::Inject,
        },
        Annotation {
            name: istio::INTERCEPTION_MODE,
            field: Field::InterceptionMode,
        },
        Annotation {
            name: istio::EXCLUDE_INBOUND_PORTS,
            field: Field::ExcludeInboundPorts,
        },
        Annotation {
            name: istio::INCLUDE_INBOUND_PORTS,
            field: Field::IncludeInboundPorts,
        },
        Annotation {
            name: istio::INCLUDE_OUTBOUND_IP_RANGES,
            field: Field::IncludeOutboundRanges,
        },
        Annotation {
            name: istio::EXCLUDE_OUTBOUND_IP_RANGES,
            field: Field::ExcludeOutboundRanges,
        },
        Annotation {
            name: istio::INCLUDE_OUTBOUND_PORTS,
            field: Field::IncludeOutboundPorts,
        },
        Annotation {
            name: istio::EXCLUDE_OUTBOUND_PORTS,
            field: Field::ExcludeOutboundPorts,
        },
        Annotation {
            name: istio::EXCLUDE_INTERFACES,
            field: Field::ExcludeInterfaces,
        },
        Annotation {
            name: istio::REROUTE_INTERFACES,
            field: Field::RerouteInterfaces,
        },
        Annotation {
            name: istio::KUBEVIRT_INTERFACES,
            field: Field::KubevirtInterfaces,
        },
        Annotation {
            name: istio::CAPTURE_DNS,
            field: Field::CaptureDns,
        },
    ],
    shape: Shape {
        port_ranges: false,
        tunnel_port: Some(istio::TUNNEL_PORT),
        loopback: Loopback::Passthrough,
        exclude_dst_first: false,
        dns: DnsShape::TcpAndUdp,
        passthrough6: Passthrough6::PodHasIpv6,
    },
};

pub static LINKERD: Profile = Profile {
    mesh: Mesh::Linkerd,
    name: "linkerd",
    marker: Marker::Present(linkerd::PROXY_VERSION),
    defaults: Defaults {
        proxy_uid: 2102,
        proxy_gid: None,
        outbound_port: 4140,
        inbound_port: 4143,
        dns_port: 15053,
        exclude_namespaces: &["kube-system"],
        always_excluded_inbound: &linkerd::ALWAYS_EXCLUDED_INBOUND,
        excluded_outbound: &[],
        // linkerd2-cni's chart: `disableIPv6: true`.
        ipv6: false,
        dns: false,
    },
    annotations: &[
        Annotation {
            name: linkerd::SKIP_INBOUND_PORTS,
            field: Field::ExcludeInboundPorts,
        },
        Annotation {
            name: linkerd::SKIP_OUTBOUND_PORTS,
            field: Field::ExcludeOutboundPorts,
        },
        Annotation {
            name: linkerd::SKIP_SUBNETS,
            field: Field::InboundExcludeSources,
        },
        Annotation {
            name: linkerd::PROXY_UID,
            field: Field::ProxyUid,
        },
        Annotation {
            name: linkerd::PROXY_GID,
            field: Field::ProxyGid,
        },
    ],
    shape: Shape {
        port_ranges: true,
        tunnel_port: None,
        loopback: Loopback::ReturnAll,
        exclude_dst_first: false,
        dns: DnsShape::TcpAndUdp,
        passthrough6: Passthrough6::No,
    },
};

pub static KUMA: Profile = Profile {
    mesh: Mesh::Kuma,
    name: "kuma",
    marker: Marker::Equals(kuma::SIDECAR_INJECTED, "true"),
    defaults: Defaults {
        proxy_uid: 5678,
        proxy_gid: None,
        outbound_port: 15001,
        inbound_port: 15006,
        dns_port: 15053,
        exclude_namespaces: &["kube-system", "kuma-system"],
        // Each source of Kuma's config sets its own (the YAML's and the per-key defaults differ).
        always_excluded_inbound: &[],
        excluded_outbound: &[],
        ipv6: true,
        dns: true,
    },
    annotations: &[Annotation {
        name: kuma::TRANSPARENT_PROXY_CONFIG,
        field: Field::KumaConfig,
    }],
    shape: Shape {
        port_ranges: false,
        tunnel_port: None,
        loopback: Loopback::Passthrough,
        exclude_dst_first: true,
        dns: DnsShape::UdpFirst,
        passthrough6: Passthrough6::Ipv6Enabled,
    },
};
