//! The query benchmark: a suite of named SQL statements timed through
//! fleetgate's DataFusion session, cold and hot, over a data directory.
//!
//! Suite files hold statements separated by `-- name: <name>` lines (see
//! `scripts/queries.sql`). "Cold" is the first execution in a new session
//! (listing, footers and statistics not yet cached); "hot" is the median of
//! the following runs in that session. Session set-up itself is not timed.
//! `scripts/duckdb_suite.py` times the same file the same way in DuckDB.

use std::path::Path;
use std::time::Instant;

use fleetgate::lifecycle::retention::Retention;
use fleetgate::query::{self, QueryError};
use fleetgate::schema::Registry;
use serde::Serialize;

/// One statement of a suite.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub name: String,
    pub sql: String,
}

/// What one statement took.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub name: String,
    pub cold_ms: f64,
    pub hot_ms: f64,
    pub rows: usize,
}

/// Splits a suite file into its named statements.
pub fn parse_suite(text: &str) -> Vec<Query> {
    let mut out: Vec<Query> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.trim().strip_prefix("-- name:") {
            out.push(Query {
                name: name.trim().to_owned(),
                sql: String::new(),
            });
        } else if let Some(current) = out.last_mut()
            && !line.trim_start().starts_with("--")
        {
            current.sql.push_str(line);
            current.sql.push('\n');
        }
    }
    for q in &mut out {
        q.sql = q.sql.trim().trim_end_matches(';').trim().to_owned();
    }
    out.retain(|q| !q.sql.is_empty());
    out
}

/// Times every query: once cold in a fresh session, then `hot_runs` times hot.
pub async fn time_suite(
    data_dir: &Path,
    suite: &[Query],
    hot_runs: usize,
) -> Result<Vec<Timing>, QueryError> {
    let registry = Registry::load()?;
    let retention = Retention::load(None, &registry)?;
    let mut out = Vec::new();
    for q in suite {
        let ctx = query::session_at(
            data_dir,
            &registry,
            &retention,
            fleetgate::core::clock::now_ms(),
        )
        .await?;
        let started = Instant::now();
        let rows: usize = query::run(&ctx, &q.sql)
            .await?
            .iter()
            .map(|b| b.num_rows())
            .sum();
        let cold_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut hot = Vec::with_capacity(hot_runs);
        for _ in 0..hot_runs {
            let started = Instant::now();
            query::run(&ctx, &q.sql).await?;
            hot.push(started.elapsed().as_secs_f64() * 1e3);
        }
        hot.sort_by(f64::total_cmp);
        let hot_ms = hot.get(hot.len() / 2).copied().unwrap_or(cold_ms);
        out.push(Timing {
            name: q.name.clone(),
            cold_ms,
            hot_ms,
            rows,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_split_on_name_lines_and_drop_comments() {
        let suite = parse_suite(
            "-- a header comment\n-- name: first\nSELECT 1\n-- why\nFROM t;\n\n-- name: second\nSELECT 2;\n-- name: empty\n",
        );
        assert_eq!(
            suite,
            vec![
                Query {
                    name: "first".into(),
                    sql: "SELECT 1\nFROM t".into()
                },
                Query {
                    name: "second".into(),
                    sql: "SELECT 2".into()
                },
            ]
        );
    }
}
