//! The records a run had acknowledged, per stream and vehicle, kept as
//! ranges of sequence numbers: a run of millions of records whose acks came
//! in order is a handful of ranges per vehicle.

use std::collections::BTreeMap;

use fleetgate::schema::Stream;
use serde::{Deserialize, Serialize};

/// Inclusive ranges of acknowledged sequence numbers, per stream (by
/// index) and vehicle.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Acks {
    streams: [BTreeMap<u32, Vec<(u64, u64)>>; Stream::ALL.len()],
}

impl Acks {
    /// Records `records` acknowledged records from `first_seq` on.
    pub fn add(&mut self, stream: Stream, vehicle: u32, first_seq: u64, records: u32) {
        if records == 0 {
            return;
        }
        let last_seq = first_seq + u64::from(records) - 1;
        let ranges = self.streams[stream.index()].entry(vehicle).or_default();
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == first_seq => *end = last_seq,
            _ => ranges.push((first_seq, last_seq)),
        }
    }

    /// Takes in another connection's acks.
    pub fn merge(&mut self, other: Acks) {
        for (mine, theirs) in self.streams.iter_mut().zip(other.streams) {
            for (vehicle, ranges) in theirs {
                let merged = mine.entry(vehicle).or_default();
                merged.extend(ranges);
                normalise(merged);
            }
        }
    }

    /// Every acknowledged (vehicle, sequence number) of a stream.
    pub fn records(&self, stream: Stream) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.streams[stream.index()]
            .iter()
            .flat_map(|(&vehicle, ranges)| {
                ranges
                    .iter()
                    .flat_map(move |&(a, b)| (a..=b).map(move |seq| (vehicle, seq)))
            })
    }

    pub fn count(&self, stream: Stream) -> u64 {
        self.streams[stream.index()]
            .values()
            .flatten()
            .map(|(a, b)| b - a + 1)
            .sum()
    }

    /// Vehicles with at least one acknowledged record, any stream.
    pub fn vehicles(&self) -> impl Iterator<Item = u32> + '_ {
        let mut all: Vec<u32> = self
            .streams
            .iter()
            .flat_map(|s| s.keys().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        all.into_iter()
    }
}

/// Sorts ranges and joins those that touch or overlap.
fn normalise(ranges: &mut Vec<(u64, u64)>) {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges.iter() {
        match out.last_mut() {
            Some((_, end)) if a <= *end + 1 => *end = (*end).max(b),
            _ => out.push((a, b)),
        }
    }
    *ranges = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_acks_become_one_range_and_gaps_stay_gaps() {
        let mut acks = Acks::default();
        acks.add(Stream::Charging, 4, 0, 2);
        acks.add(Stream::Charging, 4, 2, 1);
        acks.add(Stream::Charging, 4, 5, 1);
        let mut other = Acks::default();
        other.add(Stream::Charging, 4, 3, 1);
        acks.merge(other);
        let seqs: Vec<u64> = acks.records(Stream::Charging).map(|(_, s)| s).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 5]);
        assert_eq!(acks.count(Stream::Charging), 5);
        assert_eq!(acks.count(Stream::Rtti), 0);
        assert_eq!(acks.vehicles().collect::<Vec<_>>(), vec![4]);
    }
}
