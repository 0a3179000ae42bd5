//! Liveness: each worker thread beats while it makes progress, and `/healthz` fails once one of
//! them has been silent for longer than its job can take. A panic anywhere ends the process
//! (after one log line), so the kubelet restarts the agent instead of leaving a process whose
//! reconciler, installer or event thread is gone while `/healthz` still says "ok".

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The threads whose progress `/healthz` vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worker {
    /// The installer's poll loop (wakes at least every 30 s).
    Installer,
    /// The reconciler: beats at every sandbox it visits and between passes.
    Reconcile,
    /// The event socket's loop (ticks every 2 s).
    Events,
    /// The capture-bypass probe (every minute).
    Bypass,
}

impl Worker {
    const ALL: [Worker; 4] = [
        Worker::Installer,
        Worker::Reconcile,
        Worker::Events,
        Worker::Bypass,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Worker::Installer => "installer",
            Worker::Reconcile => "reconcile",
            Worker::Events => "events",
            Worker::Bypass => "bypass",
        }
    }
}

/// What the kubelet's liveness probe is told when a worker went silent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {} thread has made no progress for {}s (limit {}s)", .worker.name(), .silent.as_secs(), .limit.as_secs())]
pub struct Stalled {
    pub worker: Worker,
    pub silent: Duration,
    pub limit: Duration,
}

/// Beats and limits, shared by every thread. A worker that is not running (no reconciling, no
/// probe) has no limit.
pub struct Health {
    start: Instant,
    /// Milliseconds since `start` of each worker's last beat.
    beats: [AtomicU64; 4],
    /// Milliseconds of silence allowed; 0: not watched.
    limits: [AtomicU64; 4],
}

impl Health {
    pub fn new() -> Health {
        Health {
            start: Instant::now(),
            beats: Default::default(),
            limits: Default::default(),
        }
    }

    fn index(w: Worker) -> usize {
        Worker::ALL.iter().position(|&x| x == w).unwrap_or(0)
    }

    /// Watches `w`: from now on it must beat at least every `limit`.
    pub fn watch(&self, w: Worker, limit: Duration) {
        self.beat(w);
        self.limits[Self::index(w)].store(limit.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Stops watching `w` (a worker with nothing to do has ended).
    pub fn unwatch(&self, w: Worker) {
        self.limits[Self::index(w)].store(0, Ordering::Relaxed);
    }

    pub fn beat(&self, w: Worker) {
        #[cfg(debug_assertions)]
        test_panic(w);
        let now = self.start.elapsed().as_millis() as u64;
        self.beats[Self::index(w)].store(now, Ordering::Relaxed);
    }

    /// The first watched worker that has been silent too long.
    pub fn check(&self) -> Result<(), Stalled> {
        let now = self.start.elapsed().as_millis() as u64;
        for w in Worker::ALL {
            let i = Self::index(w);
            let limit = self.limits[i].load(Ordering::Relaxed);
            let silent = now.saturating_sub(self.beats[i].load(Ordering::Relaxed));
            if limit > 0 && silent > limit {
                return Err(Stalled {
                    worker: w,
                    silent: Duration::from_millis(silent),
                    limit: Duration::from_millis(limit),
                });
            }
        }
        Ok(())
    }
}

impl Default for Health {
    fn default() -> Health {
        Health::new()
    }
}

/// Debug builds only (the tests' binaries): `MESH_REDIRECT_TEST_PANIC=<worker>` panics in that
/// worker's thread at its first beat, so that a test can show what a panic does to the agent.
#[cfg(debug_assertions)]
fn test_panic(w: Worker) {
    if std::env::var("MESH_REDIRECT_TEST_PANIC").is_ok_and(|v| v == w.name()) {
        panic!("MESH_REDIRECT_TEST_PANIC={}", w.name());
    }
}

/// Exit status of an agent that panicked (EX_SOFTWARE).
pub const PANIC_EXIT: i32 = 70;

/// Makes a panic in any thread end the process: one JSON log line naming the thread and the
/// message, then exit. Unwinding only ends the thread, and a half-dead agent keeps the node's
/// pods unrepaired while every probe stays green.
pub fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        crate::log::line(
            crate::log::Component::Agent,
            "error",
            "a thread panicked: exiting so that the kubelet restarts the agent",
            serde_json::json!({"thread": thread, "panic": what, "at": at}),
        );
        std::process::exit(PANIC_EXIT);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_watched_workers_that_went_silent_fail() {
        let h = Health::new();
        assert_eq!(h.check(), Ok(()));
        h.watch(Worker::Events, Duration::from_millis(30));
        h.beat(Worker::Reconcile);
        assert_eq!(h.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(60));
        let e = h.check().unwrap_err();
        assert_eq!(e.worker, Worker::Events);
        assert!(e.to_string().contains("events thread"), "{e}");
        h.beat(Worker::Events);
        assert_eq!(h.check(), Ok(()));
    }
}
