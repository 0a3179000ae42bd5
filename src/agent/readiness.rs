//! Readiness: what `/readyz` answers (on the readiness address only; the metrics address never
//! names pods). Ready means: the plugin is chained and current, and, when reconciling, the last
//! pass looked at every sandbox and found no meshed pod uncaptured or unchecked, and no probe
//! found capture bypassed on this node. Pods that defend their own table are reported, not
//! gating: one pod must not hold up a rollout across the cluster.

use super::installer::ChainNotReady;
use super::reconcile::{PassError, PodIssue};
use std::fmt;
use std::sync::Mutex;

/// One reason the node is not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("starting")]
    Starting,
    /// The installer's own reason (binary not in place, no valid primary config, a write
    /// refused).
    #[error(transparent)]
    Chain(ChainNotReady),
    #[error("waiting for the chain to be in place before reconciling")]
    WaitingForChain,
    #[error("no reconcile pass yet")]
    NoPassYet,
    #[error("cannot reconcile: {0}")]
    Reconcile(PassError),
    #[error("{} meshed pod(s) not captured or not checked: {}", .0.len(), Issues(.0))]
    Uncaptured(Vec<PodIssue>),
    /// Connect-time load balancing rewrites service connects before capture sees them.
    #[error("{0}")]
    Bypass(String),
}

/// Pods, "ns/name: why", joined.
struct Issues<'a>(&'a [PodIssue]);

impl fmt::Display for Issues<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", p.pod, p.why)?;
        }
        Ok(())
    }
}

/// Where reconciling stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconcile {
    Off,
    NotYet(NotReady),
    /// A full pass: the meshed pods it found uncaptured or unchecked (none: ready).
    Done(Vec<PodIssue>),
}

/// The parts of readiness, each set by the thread that knows it.
pub struct Readiness {
    chain: Mutex<Option<Result<(), ChainNotReady>>>,
    /// Shown in the probe's body, ready or not; never gating.
    warnings: Mutex<Vec<String>>,
    reconcile: Mutex<Reconcile>,
    bypass: Mutex<Option<String>>,
}

impl Readiness {
    pub fn new(reconciling: bool) -> Readiness {
        Readiness {
            chain: Mutex::new(None),
            warnings: Mutex::new(Vec::new()),
            reconcile: Mutex::new(if reconciling {
                Reconcile::NotYet(NotReady::NoPassYet)
            } else {
                Reconcile::Off
            }),
            bypass: Mutex::new(None),
        }
    }

    /// Every reason the node is not ready (empty: ready).
    pub fn check(&self) -> Vec<NotReady> {
        let mut why = Vec::new();
        match lock(&self.chain).clone() {
            None => why.push(NotReady::Starting),
            Some(Err(e)) => why.push(NotReady::Chain(e)),
            Some(Ok(())) => {}
        }
        match lock(&self.reconcile).clone() {
            Reconcile::Off => {}
            Reconcile::NotYet(r) => why.push(r),
            Reconcile::Done(issues) if issues.is_empty() => {}
            Reconcile::Done(issues) => why.push(NotReady::Uncaptured(issues)),
        }
        if let Some(b) = lock(&self.bypass).clone() {
            why.push(NotReady::Bypass(b));
        }
        why
    }

    pub fn is_ready(&self) -> bool {
        self.check().is_empty()
    }

    /// The chain is in place (the reconciler waits for it).
    pub fn chained(&self) -> bool {
        matches!(*lock(&self.chain), Some(Ok(())))
    }

    pub fn set_chain(&self, r: Result<(), ChainNotReady>) {
        *lock(&self.chain) = Some(r);
    }

    pub fn set_reconcile(&self, r: Reconcile) {
        *lock(&self.reconcile) = r;
    }

    pub fn set_bypass(&self, b: Option<String>) {
        *lock(&self.bypass) = b;
    }

    pub fn set_warnings(&self, w: Vec<String>) {
        *lock(&self.warnings) = w;
    }

    pub fn warnings(&self) -> Vec<String> {
        lock(&self.warnings).clone()
    }
}

/// A poisoned lock only means a thread panicked holding it, and a panic ends the process
/// (`health::exit_on_panic`): the value is still the last one written.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The probe's body: every reason, one per line, then the warnings.
pub fn body(why: &[NotReady], warnings: &[String]) -> String {
    let mut s = String::new();
    if why.is_empty() {
        s.push_str("ok\n");
    }
    for w in why {
        s.push_str("not ready: ");
        s.push_str(&w.to_string());
        s.push('\n');
    }
    for w in warnings {
        s.push_str("warning: ");
        s.push_str(w);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(pod: &str, why: &str) -> PodIssue {
        PodIssue {
            pod: pod.into(),
            sandbox: "abc".into(),
            why: why.into(),
        }
    }

    #[test]
    fn ready_needs_every_part() {
        let r = Readiness::new(true);
        assert_eq!(r.check(), [NotReady::Starting, NotReady::NoPassYet]);
        r.set_chain(Ok(()));
        assert_eq!(r.check(), [NotReady::NoPassYet]);
        r.set_reconcile(Reconcile::Done(vec![]));
        assert!(r.is_ready());
        r.set_reconcile(Reconcile::Done(vec![issue("default/web", "netns gone")]));
        let why = r.check();
        assert_eq!(
            body(&why, &[]),
            "not ready: 1 meshed pod(s) not captured or not checked: default/web: netns gone\n"
        );
        r.set_reconcile(Reconcile::Done(vec![]));
        r.set_bypass(Some("bypassed".into()));
        assert_eq!(r.check(), [NotReady::Bypass("bypassed".into())]);
        let off = Readiness::new(false);
        off.set_chain(Ok(()));
        assert!(off.is_ready());
        assert_eq!(
            body(&[], &["flapping: x".into()]),
            "ok\nwarning: flapping: x\n"
        );
    }
}
