//! One pod's capture, as the plugin's verbs and the node agent both do it: the plan from its
//! annotations (policy → ruleset), and its table installed, compared or removed inside its
//! network namespace. One implementation, so an agent's repair is exactly an ADD and its
//! comparison exactly a CHECK.

use crate::config::PluginConfig;
use crate::kernel::{Drift, Kernel, KernelError, Linger, Sockets};
use crate::netns::{Netns, NetnsError};
use crate::policy::{self, Decision, Pod, Skip};
use crate::protocol::{CniError, code};
use crate::ruleset::{self, Ruleset};
use std::path::Path;

/// What to do with a pod: install this ruleset, or leave it alone for a stated reason.
// One per pod, moved once: boxing the ruleset would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodPlan {
    Capture(Ruleset),
    /// Not captured, and why (a decision, not an error).
    Skip(Skip),
}

/// The pod's plan. `Err`: its annotations (or the config) are invalid.
pub fn plan(cfg: &PluginConfig, pod: &Pod<'_>) -> Result<PodPlan, CniError> {
    Ok(match policy::decide(cfg, pod)? {
        Decision::Capture(p) => PodPlan::Capture(ruleset::build(&p)),
        Decision::Skip(why) => PodPlan::Skip(why),
    })
}

pub fn netns_error(e: NetnsError) -> CniError {
    CniError::new(
        code::NETNS,
        format!("network namespace could not be entered: {e}"),
    )
}

pub fn kernel_error(e: KernelError) -> CniError {
    let c = if e.is_transient() {
        code::TRY_AGAIN
    } else {
        code::KERNEL
    };
    CniError::new(c, e.to_string())
}

/// Opens the netns at `path` and runs `f` with `which` of its sockets.
pub fn in_netns_at<T>(
    path: &Path,
    which: Sockets,
    f: impl FnOnce(&mut Kernel) -> Result<T, KernelError>,
) -> Result<T, CniError> {
    let ns = Netns::open(path).map_err(netns_error)?;
    in_netns(&ns, which, f)
}

/// Runs `f` with `which` of the sockets of `ns`, and closes them (waiting, after a commit
/// that released objects, for the kernel to free them: see [`Linger`]).
pub fn in_netns<T>(
    ns: &Netns,
    which: Sockets,
    f: impl FnOnce(&mut Kernel) -> Result<T, KernelError>,
) -> Result<T, CniError> {
    in_netns_lingering(ns, which, f).map(|(t, _waits_here)| t)
}

/// [`in_netns`], returning the netfilter socket instead of waiting for its release.
pub fn in_netns_lingering<T>(
    ns: &Netns,
    which: Sockets,
    f: impl FnOnce(&mut Kernel) -> Result<T, KernelError>,
) -> Result<(T, Linger), CniError> {
    // Only the sockets are created inside: netlink sockets stay bound to the namespace they
    // were created in, so the rest runs back in ours.
    let mut kernel = ns
        .run(|| Kernel::open_sockets(which))
        .map_err(netns_error)?
        .map_err(kernel_error)?;
    let t = f(&mut kernel).map_err(kernel_error)?;
    Ok((t, kernel.close_lingering()))
}

/// Installs `rs` in the netns at `path` (ADD's one atomic batch).
pub fn apply(path: &Path, rs: &Ruleset) -> Result<Linger, CniError> {
    let ns = Netns::open(path).map_err(netns_error)?;
    in_netns_lingering(&ns, Sockets::to_install(rs), |k| k.replace(rs)).map(|((), l)| l)
}

/// What differs between the netns's table and `rs` (CHECK's comparison).
pub fn diff(path: &Path, rs: &Ruleset) -> Result<Drift, CniError> {
    in_netns_at(path, Sockets::to_compare(rs), |k| k.diff(rs))
}
