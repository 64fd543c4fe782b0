//! The delta recorder pauses while a restore holds this node: from the
//! agent's PREPARE to the restored member's start (or the rollback), so
//! the recorder does not go on recording the old cluster while its
//! members stop (bulwark-backup's own election keys among the events),
//! and `--to-latest` of the old timeline lands on its last real write.
//!
//! The hold ends by itself at a deadline (the agent's lock TTL, extended
//! once members are touched), so a coordinator that vanished mid-restore
//! does not stop recording for good.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

/// Shared between this node's restore agent (which holds it) and the
/// scheduler (whose recorder waits on it).
#[derive(Clone, Debug)]
pub struct RecorderPause {
    tx: Arc<watch::Sender<Option<Hold>>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Hold {
    restore_id: String,
    until: Instant,
}

impl Default for RecorderPause {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::channel(None).0),
        }
    }
}

impl RecorderPause {
    /// Pauses recording for `restore_id` until `until` (or its release);
    /// holding again moves the deadline.
    pub fn hold(&self, restore_id: &str, until: Instant) {
        self.tx.send_replace(Some(Hold {
            restore_id: restore_id.to_owned(),
            until,
        }));
    }

    /// Ends `restore_id`'s hold (another restore's hold stays).
    pub fn release(&self, restore_id: &str) {
        self.tx.send_if_modified(|h| {
            if h.as_ref().is_some_and(|h| h.restore_id == restore_id) {
                *h = None;
                true
            } else {
                false
            }
        });
    }

    /// The restore holding the recorder now, if any.
    pub fn held_by(&self) -> Option<String> {
        self.tx
            .borrow()
            .as_ref()
            .filter(|h| Instant::now() < h.until)
            .map(|h| h.restore_id.clone())
    }

    /// Resolves once a hold begins.
    pub async fn paused(&self) {
        let mut rx = self.tx.subscribe();
        loop {
            if self.held_by().is_some() {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Resolves once no hold is in force (released, or past its deadline).
    pub async fn resumed(&self) {
        let mut rx = self.tx.subscribe();
        loop {
            let until = match rx.borrow_and_update().as_ref() {
                Some(h) if Instant::now() < h.until => h.until,
                _ => return,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn holds_end_on_release_or_at_their_deadline() {
        let p = RecorderPause::default();
        assert_eq!(p.held_by(), None);
        p.hold("r1", Instant::now() + Duration::from_secs(60));
        assert_eq!(p.held_by().as_deref(), Some("r1"));
        tokio::time::timeout(Duration::from_secs(1), p.paused())
            .await
            .unwrap();
        // Another restore's release leaves the hold.
        p.release("r2");
        assert_eq!(p.held_by().as_deref(), Some("r1"));
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.resumed().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        p.release("r1");
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();

        // A coordinator that vanished: the deadline ends the hold.
        p.hold("r3", Instant::now() + Duration::from_millis(100));
        tokio::time::timeout(Duration::from_secs(2), p.resumed())
            .await
            .unwrap();
        assert_eq!(p.held_by(), None);
    }
}
