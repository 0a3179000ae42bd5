//! Test support for mesh-redirect's integration tests and examples: throwaway network
//! namespaces, a node + pod made by the real reference CNI plugins with mesh-redirect chained
//! after them, traffic through `capture-probe`, and the node agent run for real.
//!
//! Every namespace, process and directory made here is removed on drop, also when a test
//! panics. Nothing touches the host's root network namespace: the "node" is a namespace too.
//!
//! One module per concern. The ones nearly every test uses are re-exported here (`use
//! common::*`); the others are used by their path (`common::agent`, `common::twin`, …).

pub mod agent;
pub mod cnichain;
pub mod http;
pub mod memcg;
pub mod netns;
pub mod paths;
pub mod plugin;
pub mod pod;
pub mod probe;
pub mod sys;
pub mod twin;
pub mod vm;

pub use http::{http_get_at, http_get_in, sample};
pub use netns::{Netns, OwnedTable};
pub use paths::{
    REFERENCE_PLUGINS, agent, default_cni_path, plugin, plugin_dir, probe, release_bins, repo,
};
pub use plugin::{invoke, invoke_wrapped, meshed_conf, plugin_conf, uninstall};
pub use pod::{GW4, GW6, Pod, STATUS, SUBNET4, SUBNET6, conflist, runtime};
pub use probe::{
    APP, APP_UID, Ident, PROXY, PROXY_UID, ROOT, answer, assert_answer, connect, connect_from, hp,
    serve, udp,
};
pub use sys::{
    Proc, TempDir, die_with_parent, require_root, run, run_cmd, tail, unique, wait_for, write_file,
};
