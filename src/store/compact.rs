//! Compaction: once an hour partition is closed (its hour is over and the
//! writers' roll age has passed), its small files, one per writer roll, are
//! rewritten into few large ones by Delta's OPTIMIZE, in a commit that
//! removes the small files from the table as it adds the large one. A
//! reader sees either version, never both or neither; the removed files
//! stay on disk for queries already reading them until VACUUM (see the
//! retention sweep).

use std::num::NonZeroU64;

use deltalake::{FilterValue, filter_literal};

use super::delta::{self, StoreRoot};
use super::{PartitionKey, Result, Table, writer_properties};

/// How compaction writes.
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    pub target_bytes: u64,
    pub zstd_level: i32,
}

/// An hour partition is closed this long after its hour ends: the writers
/// commit what they hold within their roll age, far less than this.
const CLOSED_AFTER_MS: i64 = 5 * 60 * 1000;

/// Compacts the closed hour partitions of every table at `now_ms`; returns
/// how many small files were replaced.
pub fn compact(root: &StoreRoot, now_ms: i64, settings: Compaction) -> Result<u64> {
    let started_ms = crate::core::clock::now_ms();
    super::block_on(async {
        let mut replaced = 0;
        // The partition still open: its hour, or the one before within the margin.
        let open = PartitionKey::from_millis(now_ms - CLOSED_AFTER_MS);
        let (date, hour) = delta::partition_values(open);
        let hour = hour.to_string();
        let properties = writer_properties(settings.zstd_level, 1 << 20, &[])?;
        let target = NonZeroU64::new(settings.target_bytes).unwrap_or(NonZeroU64::MIN);
        for table in Table::all() {
            let Some(mut delta_table) = delta::open(root, table.name()).await? else {
                continue;
            };
            let earlier_days = [filter_literal("date", "<", FilterValue::Scalar(&date))?];
            let earlier_hours = [
                filter_literal("date", "=", FilterValue::Scalar(&date))?,
                filter_literal("hour", "<", FilterValue::Scalar(&hour))?,
            ];
            for filters in [&earlier_days[..], &earlier_hours[..]] {
                let (after, metrics) = delta_table
                    .optimize()
                    .with_filters(filters)
                    .with_target_size(target)
                    .with_writer_properties(properties.clone())
                    .await?;
                delta_table = after;
                replaced += metrics.num_files_removed;
            }
            // The rewritten files and their commits, on local disk.
            if let Some(dir) = root.table_dir(table.name()) {
                delta::sync_tree(&dir, started_ms - 2_000)?;
            }
        }
        Ok(replaced)
    })
}
