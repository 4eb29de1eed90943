//! The worker's one shutdown handle, shared by the consume loop and every task future (as tokio's mini-redis
//! `shutdown.rs`): first the worker *drains* (takes no new task, lets running ones finish and publish), then,
//! after the grace period, it *abandons* (tasks stop retrying their publishes; what is unfinished stays
//! uncommitted and is redelivered to another member).

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Draining,
    Abandoning,
}

/// Cheap to clone; every clone sees the same phase.
#[derive(Clone)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<Phase>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            tx: std::sync::Arc::new(watch::channel(Phase::Running).0),
        }
    }

    /// Stop taking tasks; running ones go on.
    pub fn drain(&self) {
        self.tx.send_if_modified(|p| advance(p, Phase::Draining));
    }

    /// Stop retrying: tasks still publishing give up (their offsets stay uncommitted).
    pub fn abandon(&self) {
        self.tx.send_if_modified(|p| advance(p, Phase::Abandoning));
    }

    pub fn is_draining(&self) -> bool {
        *self.tx.borrow() >= Phase::Draining
    }

    pub fn is_abandoned(&self) -> bool {
        *self.tx.borrow() == Phase::Abandoning
    }

    /// Resolves once [`Shutdown::abandon`] was called.
    pub async fn abandoned(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|p| *p == Phase::Abandoning).await;
    }
}

fn advance(phase: &mut Phase, to: Phase) -> bool {
    if *phase < to {
        *phase = to;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn phases_only_move_forward_and_wake_waiters() {
        let shutdown = Shutdown::new();
        let waiter = tokio::spawn({
            let s = shutdown.clone();
            async move { s.abandoned().await }
        });
        shutdown.drain();
        assert!(shutdown.is_draining() && !shutdown.is_abandoned());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "draining is not abandoning");
        shutdown.abandon();
        shutdown.drain();
        assert!(
            shutdown.is_abandoned(),
            "drain after abandon does not go back"
        );
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the waiter wakes")
            .unwrap();
    }
}
