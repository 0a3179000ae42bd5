//! What the agent exposes on `/metrics`, with the official Prometheus client: plugin
//! invocations (from the plugin's events), reconcile passes and the pods they found, the
//! chain's state, and build info. Base units, `_total` counters, low-cardinality labels (never a
//! pod name).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Invocation {
    /// ADD, DEL, CHECK, STATUS, GC, VERSION.
    pub command: String,
    /// captured, skipped, error (ADD); ok, error (the others).
    pub outcome: String,
    /// The CNI error code, or "" when it succeeded.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Command {
    pub command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    /// captured, repaired, skipped, invalid_annotation, failed, defended, foreign_capture.
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Result_ {
    pub result: String,
}

/// Histogram buckets (seconds) that resolve 0.5 ms to 50 ms, where ADD and DEL live.
pub const DURATION_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.5,
];

/// Every metric, registered once; cloning shares the same values.
#[derive(Clone)]
pub struct Metrics {
    pub invocations: Family<Invocation, Counter>,
    pub duration: Family<Command, Histogram>,
    pub events_rejected: Family<Kind, Counter>,
    pub pods: Family<State, Gauge>,
    pub repairs: Family<Result_, Counter>,
    pub drift: Family<Kind, Counter>,
    pub passes: Family<Result_, Counter>,
    pub pass_duration: Histogram,
    pub chain_in_place: Gauge,
    pub rechains: Counter,
    pub flapping: Gauge,
    pub binary_current: Gauge,
    pub ready: Gauge,
    pub http_rejected: Family<Listener, Counter>,
    pub event_socket_owned: Gauge,
    pub sockets_released: Counter,
    pub capture_bypass: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Listener {
    /// probes, metrics.
    pub listener: String,
}

/// The pod states a pass reports (each always present, 0 when none).
pub const POD_STATES: [&str; 7] = [
    "captured",
    "repaired",
    "skipped",
    "invalid_annotation",
    "failed",
    "defended",
    "foreign_capture",
];

impl Metrics {
    /// Counts a connection a listener closed unserved.
    pub fn http_rejected(&self, listener: &str) {
        self.http_rejected
            .get_or_create(&Listener {
                listener: listener.into(),
            })
            .inc();
    }

    /// The metrics and the registry that serves them.
    pub fn new() -> (Metrics, Registry) {
        let mut r = Registry::with_prefix("mesh_redirect");
        let m = Metrics {
            invocations: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            events_rejected: Family::default(),
            pods: Family::default(),
            repairs: Family::default(),
            drift: Family::default(),
            passes: Family::default(),
            pass_duration: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            chain_in_place: Gauge::default(),
            rechains: Counter::default(),
            flapping: Gauge::default(),
            binary_current: Gauge::default(),
            ready: Gauge::default(),
            http_rejected: Family::default(),
            event_socket_owned: Gauge::default(),
            sockets_released: Counter::default(),
            capture_bypass: Gauge::default(),
        };
        r.register(
            "plugin_invocations",
            "CNI invocations of the plugin on this node, by command, outcome and CNI error code",
            m.invocations.clone(),
        );
        r.register(
            "plugin_duration_seconds",
            "How long the plugin took per invocation (ADD, DEL, CHECK), from its own clock",
            m.duration.clone(),
        );
        r.register(
            "plugin_events_rejected",
            "Plugin events the agent could not use, by kind (malformed, oversized, incomplete)",
            m.events_rejected.clone(),
        );
        r.register(
            "pods",
            "Pod sandboxes on this node by state, as the last reconcile pass found them",
            m.pods.clone(),
        );
        r.register(
            "repairs",
            "Tables the agent installed or replaced in a pod, by result",
            m.repairs.clone(),
        );
        r.register(
            "drift",
            "Pods found not as planned: table missing, or differing",
            m.drift.clone(),
        );
        r.register(
            "reconcile_passes",
            "Reconcile passes over the node's pod sandboxes, by result",
            m.passes.clone(),
        );
        r.register(
            "reconcile_pass_duration_seconds",
            "How long a reconcile pass took",
            m.pass_duration.clone(),
        );
        r.register(
            "chain_in_place",
            "1 while mesh-redirect is chained in the runtime's primary network config",
            m.chain_in_place.clone(),
        );
        r.register(
            "rechains",
            "Times the entry was put back after another component rewrote the config without it",
            m.rechains.clone(),
        );
        r.register(
            "flapping",
            "1 while another component keeps rewriting the network config without mesh-redirect",
            m.flapping.clone(),
        );
        r.register(
            "binary_current",
            "1 while the plugin binary in the CNI bin dir is byte for byte the agent's",
            m.binary_current.clone(),
        );
        r.register(
            "ready",
            "1 while the agent reports ready (chained, binary current, last pass done)",
            m.ready.clone(),
        );
        r.register(
            "http_connections_rejected",
            "HTTP connections closed unserved because the listener already served its limit",
            m.http_rejected.clone(),
        );
        r.register(
            "event_socket_owned",
            "1 while this agent owns the event socket (another agent holding it: 0, waiting)",
            m.event_socket_owned.clone(),
        );
        r.register(
            "plugin_sockets_released",
            "Netlink sockets the plugin handed over with its event for the agent to close, so \
             that a DEL need not wait for the kernel to free the table",
            m.sockets_released.clone(),
        );
        r.register(
            "capture_bypass",
            "1 while connects to the cluster's service address are rewritten before capture sees them (connect-time load balancing)",
            m.capture_bypass.clone(),
        );
        r.register(
            "build",
            "Build of the running agent",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("git_commit", env!("MESH_REDIRECT_GIT_COMMIT")),
                ("libnftnl", env!("MESH_REDIRECT_LIBNFTNL")),
            ]),
        );
        // Every series an alert or a dashboard reads exists from the start, at 0.
        for s in POD_STATES {
            m.pods.get_or_create(&State { state: s.into() }).set(0);
        }
        for (command, outcome) in [
            ("ADD", "captured"),
            ("ADD", "skipped"),
            ("ADD", "error"),
            ("DEL", "ok"),
            ("CHECK", "ok"),
        ] {
            let code = if outcome == "error" { "100" } else { "" };
            let _ = m.invocations.get_or_create(&Invocation {
                command: command.into(),
                outcome: outcome.into(),
                code: code.into(),
            });
        }
        for command in ["ADD", "DEL"] {
            let _ = m.duration.get_or_create(&Command {
                command: command.into(),
            });
        }
        for kind in ["malformed", "oversized", "incomplete"] {
            let _ = m.events_rejected.get_or_create(&Kind { kind: kind.into() });
        }
        for listener in ["probes", "metrics"] {
            let _ = m.http_rejected.get_or_create(&Listener {
                listener: listener.into(),
            });
        }
        for kind in ["missing", "differs"] {
            let _ = m.drift.get_or_create(&Kind { kind: kind.into() });
        }
        for result in ["ok", "failed"] {
            let _ = m.repairs.get_or_create(&Result_ {
                result: result.into(),
            });
            let _ = m.passes.get_or_create(&Result_ {
                result: result.into(),
            });
        }
        (m, r)
    }
}
