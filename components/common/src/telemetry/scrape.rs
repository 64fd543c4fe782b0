//! Counters kept outside the metrics recorder and brought into it when
//! `/metrics` is scraped.
//!
//! The proxy counts bytes after every write it makes. Going through the
//! recorder there would cost two atomic read-modify-writes on a cache line
//! that every data-path thread shares (the value and its generation), per
//! message: measured at about 7 % of the proxy's CPU per small request.
//! Such a source keeps its own per-thread atomics and registers here; each
//! scrape asks every live source to add what it counted since the last one
//! to its recorder counters, so the exposed series are exact at the moment
//! they are read.

use std::sync::{Mutex, Weak};

/// Something that adds what it counted since its last call to its
/// recorder counters.
pub trait Publish: Send + Sync {
    /// Adds the counts since the previous call (exactly once each, even
    /// when two scrapes call at the same time).
    fn publish(&self);
}

fn sources() -> &'static Mutex<Vec<Weak<dyn Publish>>> {
    static SOURCES: Mutex<Vec<Weak<dyn Publish>>> = Mutex::new(Vec::new());
    &SOURCES
}

/// Registers `source` until it is dropped (a dropped source is forgotten
/// at the next registration or scrape; it should publish its last counts
/// in its `Drop`). Registrations are rare (a backend added), so the list
/// is pruned here too: a daemon whose metrics are never scraped does not
/// keep every backend it ever had.
pub fn publish_on_scrape(source: Weak<dyn Publish>) {
    let mut all = sources().lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|s| s.strong_count() > 0);
    all.push(source);
}

/// Publishes every live source and forgets the dropped ones. Called by the
/// admin server before it renders `/metrics`.
pub fn publish_all() {
    let live: Vec<_> = {
        let mut all = sources().lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|s| s.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    // Outside the lock: a source's publish may take its own locks.
    for source in live {
        source.publish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    struct Calls(AtomicU64);

    impl Publish for Calls {
        fn publish(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn live_sources_publish_and_dropped_ones_are_forgotten() {
        let kept = Arc::new(Calls(AtomicU64::new(0)));
        let dropped = Arc::new(Calls(AtomicU64::new(0)));
        publish_on_scrape(Arc::downgrade(&kept) as Weak<dyn Publish>);
        publish_on_scrape(Arc::downgrade(&dropped) as Weak<dyn Publish>);
        publish_all();
        assert_eq!(kept.0.load(Ordering::Relaxed), 1);
        assert_eq!(dropped.0.load(Ordering::Relaxed), 1);
        let weak = Arc::downgrade(&dropped) as Weak<dyn Publish>;
        drop(dropped);
        publish_all();
        assert_eq!(kept.0.load(Ordering::Relaxed), 2);
        let registered = sources().lock().unwrap();
        assert!(!registered.iter().any(|s| Weak::ptr_eq(s, &weak)));
    }
}
