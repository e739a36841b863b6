//! The durable watermark: which publishes the broker may acknowledge.
//!
//! The router appends every publish to its log at an offset that grows by
//! one per publish, and forwards it to fleetgate's link in that order. The
//! link hands each one to a worker shard ([`DurableFrontier::handed`]); a
//! shard reports the last offset it handled before each successful WAL fsync
//! ([`DurableFrontier::durable`]). Every publish at or below the watermark is
//! in an fsync'd write-ahead log (or was one fleetgate stores nothing of), and
//! the patched router then sends its PUBACK (`RouterConfig::ack_when_durable`).
//!
//! The watermark is conservative: while a shard lags, nothing above that
//! shard's last durable offset is released, even publishes that went to other
//! shards; that costs those at most one group commit of latency.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use rumqttd::local::Durability;

/// Offsets are stored plus one, so that 0 means "none yet".
fn encode(offset: u64) -> u64 {
    offset.saturating_add(1)
}

#[derive(Debug, Default)]
struct Shard {
    /// The highest offset handed to the shard, plus one.
    handed: AtomicU64,
    /// The highest offset the shard made durable, plus one.
    durable: AtomicU64,
}

/// Per shard, what was handed to it and what it made durable.
#[derive(Debug)]
pub struct DurableFrontier {
    shards: Vec<Shard>,
    /// The highest offset that left the link, plus one.
    passed: AtomicU64,
    /// The highest watermark reported to the router, plus one.
    reported: AtomicU64,
    router: OnceLock<Durability>,
}

impl DurableFrontier {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            passed: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            router: OnceLock::new(),
        }
    }

    /// Where watermarks go: the router of the link the offsets come from.
    /// Until it is set, nothing is reported (records replayed at start-up
    /// were acknowledged, if at all, by a previous run).
    pub fn connect(&self, router: Durability) {
        let _ = self.router.set(router);
    }

    /// The publish at `offset` goes to `shard`. Call before sending it.
    pub fn handed(&self, shard: usize, offset: u64) {
        if let Some(s) = self.shards.get(shard) {
            s.handed.fetch_max(encode(offset), SeqCst);
        }
        // After the shard's: a reader that sees `passed` sees the shard's too.
        self.passed.fetch_max(encode(offset), SeqCst);
    }

    /// The publish at `offset` needs no shard (nothing of it is stored).
    pub fn passed(&self, offset: u64) {
        self.passed.fetch_max(encode(offset), SeqCst);
    }

    /// `shard` has every publish handed to it up to `offset` in an fsync'd log.
    pub fn durable(&self, shard: usize, offset: u64) {
        if let Some(s) = self.shards.get(shard) {
            s.durable.fetch_max(encode(offset), SeqCst);
        }
    }

    /// The highest offset at or below which every publish is durable.
    pub fn watermark(&self) -> Option<u64> {
        // Read `passed` first: every handed offset at or below it is then
        // visible in its shard, so a shard holding one is seen lagging.
        let passed = self.passed.load(SeqCst);
        let lagging = self
            .shards
            .iter()
            .filter_map(|s| {
                let durable = s.durable.load(SeqCst);
                (durable < s.handed.load(SeqCst)).then_some(durable)
            })
            .min();
        let bound = lagging.map_or(passed, |durable| durable.min(passed));
        bound.checked_sub(1)
    }

    /// Reports the watermark to the router if it moved.
    pub fn report(&self) {
        let Some(router) = self.router.get() else {
            return;
        };
        let Some(watermark) = self.watermark() else {
            return;
        };
        if self.reported.fetch_max(encode(watermark), SeqCst) < encode(watermark) {
            // A closed router is a stopping server: nothing left to acknowledge.
            let _ = router.report(watermark);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_waits_for_the_slowest_shard() {
        let frontier = DurableFrontier::new(2);
        assert_eq!(frontier.watermark(), None, "nothing passed yet");
        frontier.handed(0, 0);
        frontier.handed(1, 1);
        frontier.handed(0, 2);
        assert_eq!(frontier.watermark(), None, "nothing durable yet");
        frontier.durable(1, 1);
        assert_eq!(frontier.watermark(), None, "shard 0 still holds offset 0");
        frontier.durable(0, 0);
        assert_eq!(
            frontier.watermark(),
            Some(0),
            "shard 0 still holds offset 2"
        );
        frontier.durable(0, 2);
        assert_eq!(frontier.watermark(), Some(2));
        frontier.passed(3);
        assert_eq!(frontier.watermark(), Some(3), "offset 3 needed no shard");
        frontier.handed(1, 4);
        assert_eq!(
            frontier.watermark(),
            Some(1),
            "shard 1 lags from offset 1 on"
        );
    }
}
