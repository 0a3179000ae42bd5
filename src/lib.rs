//! mesh-redirect: a chained CNI plugin that installs a service mesh's transparent-capture
//! ruleset as nftables, via netlink, inside the pod's network namespace.
//!
//! Data flows one way: stdin/env ([`protocol`], [`config`]) → [`policy`] → [`ruleset`] →
//! [`kernel`] (through [`netns`]). [`plugin`] runs the CNI verbs, [`cli`] the commands.

#[cfg(feature = "agent")]
pub mod agent;
pub mod args;
pub mod cli;
pub mod config;
pub mod events;
pub mod install;
pub mod kernel;
pub mod log;
pub mod netns;
pub mod nft_text;
pub mod nftnl_ext;
pub mod plugin;
pub mod pod;
pub mod policy;
pub mod protocol;
pub mod route;
pub mod ruleset;
pub mod values;
