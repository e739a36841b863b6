//! The pipeline: worker shards that decode and validate each record,
//! pseudonymise it, batch it into Arrow, and turn rejections into dead letters.

pub mod batch;
pub mod dead_letter;
pub mod decode;
pub mod worker;
