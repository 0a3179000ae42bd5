//! mesh-redirect: a chained CNI plugin that installs a service mesh's transparent-capture
//! ruleset as nftables, via netlink, inside the pod's network namespace.
//!
//! Data flows one way: stdin/env ([`protocol`], [`config`]) → [`policy`] → [`ruleset`] →
//! [`kernel`] (through [`netns`]). [`plugin`] runs the CNI verbs, [`cli`] the commands.
//!
//! `unsafe` lives in [`ffi`] alone: the compiler refuses it anywhere else in the library.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

#[cfg(feature = "agent")]
pub mod agent;
pub mod args;
pub mod cli;
pub mod config;
pub mod events;
#[allow(unsafe_code)]
pub mod ffi;
pub mod install;
pub mod kernel;
pub mod log;
pub mod netns;
pub mod nft_text;
pub mod plugin;
pub mod pod;
pub mod policy;
pub mod protocol;
pub mod route;
pub mod ruleset;
pub mod values;
