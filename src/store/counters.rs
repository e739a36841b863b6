//! The store's commits, failures and held memory, fed into the counters of
//! each table (see [`crate::metrics`]).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crate::core::table::Table;
use crate::metrics::{Metrics, TableCounters};
use crate::store::{Commit, CommitListener, StoreError, TableBatch};

/// Feeds a table writer's commits into the counters of its table.
pub struct TableListener {
    metrics: Arc<Metrics>,
    table: Table,
}

impl TableListener {
    pub fn new(metrics: Arc<Metrics>, table: Table) -> Arc<Self> {
        Arc::new(Self { metrics, table })
    }

    fn counters(&self) -> &TableCounters {
        self.metrics.table_of(self.table)
    }
}

impl CommitListener for TableListener {
    fn committed(&self, commit: &Commit, batches: &[TableBatch]) {
        let c = self.counters();
        c.rows_stored.fetch_add(commit.rows as u64, Relaxed);
        c.files_committed.fetch_add(commit.files as u64, Relaxed);
        c.bytes_committed.fetch_add(commit.bytes, Relaxed);
        let receipts = batches.iter().filter_map(|b| {
            b.batch
                .column_by_name(crate::schema::RECEIVED_AT_COLUMN)?
                .as_any()
                .downcast_ref::<arrow::array::TimestampMillisecondArray>()
                .map(|times| &times.values()[..])
        });
        crate::metrics::record_since_receipt(
            &self.metrics.wal.receipt_to_queryable_ms,
            crate::core::clock::now_ms(),
            receipts,
        );
    }

    fn holding(&self, bytes: usize) {
        let c = self.counters();
        c.held_bytes.store(bytes as u64, Relaxed);
        c.held_bytes_peak.fetch_max(bytes as u64, Relaxed);
    }

    fn failed(&self, error: &StoreError, rows_delayed: usize) {
        let table = self.table.name();
        tracing::error!(table, rows_delayed, %error, "write failed; will write these rows again");
        self.counters()
            .rows_delayed_by_write_errors
            .fetch_add(rows_delayed as u64, Relaxed);
    }
}
