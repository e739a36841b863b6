//! A vehicle user's account as the portal shows it: the vehicles and
//! periods they held, the grants they gave (Data Act Art. 5), and when
//! each grant's recipient last read data of the granted streams, from the
//! query audit. Metadata of their own, no telemetry row: not audited.

use datafusion::prelude::SessionContext;
use serde_json::{Value, json};

use super::registry::{Principal, PrincipalKind};
use super::{AccessEnv, AccessError, DAY_MS, Result, audit, rfc3339};
use crate::lifecycle::requests::{MatchValue, sql_literal};

impl AccessEnv {
    /// The account of `user`: vehicles held, grants given, last reads. It
    /// reads the query audit, so it runs as a query does: one of the user's
    /// requests, in a query slot, within the time limit.
    pub async fn account(&self, user: &Principal, now_ms: i64) -> Result<Value> {
        if user.kind != PrincipalKind::User {
            return Err(AccessError::Refused(format!(
                "an account page is a vehicle user's; {} is a {}",
                user.id,
                user.kind.name()
            )));
        }
        let _running = self.start(user)?;
        self.bounded(self.account_page(user, now_ms)).await
    }

    async fn account_page(&self, user: &Principal, now_ms: i64) -> Result<Value> {
        let registry = self.registry()?;
        let vehicles: Vec<Value> = registry
            .vehicles_held(&user.id)
            .into_iter()
            .map(|(vin, periods)| {
                let held: Vec<Value> = periods
                    .into_iter()
                    .map(|(from, until)| {
                        json!({ "from": rfc3339(from), "until": until.and_then(rfc3339) })
                    })
                    .collect();
                json!({ "vin": vin, "held": held })
            })
            .collect();
        let since = now_ms - i64::from(self.settings.audit_retention_days) * DAY_MS;
        let reads = SessionContext::new();
        reads.register_table("reads", audit::table(&self.settings.audit_dir, since)?)?;
        let mut grants = Vec::new();
        for grant in registry.grants.iter().filter(|g| g.user == user.id) {
            let last_read = last_read(
                &reads,
                &grant.recipient,
                &grant.streams,
                grant.given_ms,
                grant.revoked_ms.unwrap_or(now_ms),
            )
            .await?;
            grants.push(json!({
                "id": grant.id,
                "recipient": grant.recipient,
                "vin": grant.vin,
                "streams": grant.streams,
                "purpose": grant.purpose,
                "from": rfc3339(grant.from_ms),
                "until": grant.until_ms.and_then(rfc3339),
                "given": rfc3339(grant.given_ms),
                "revoked": grant.revoked_ms.and_then(rfc3339),
                "last_read": last_read,
            }));
        }
        Ok(json!({ "user": user.id, "vehicles": vehicles, "grants": grants }))
    }
}

/// When `recipient` last read rows of any of `streams` (a query answered,
/// or rows a stream delivered) between `from_ms` and `until_ms`. The audit
/// names tables, not vehicles: a recipient holding grants of several users
/// shows its last read of these streams under any of them.
async fn last_read(
    reads: &SessionContext,
    recipient: &str,
    streams: &[String],
    from_ms: i64,
    until_ms: i64,
) -> Result<Option<String>> {
    let text = |t: &str| sql_literal(&MatchValue::Text(t.to_owned()));
    // Table names are a fixed set without commas; match them in the list.
    let tables: Vec<String> = streams
        .iter()
        .map(|s| format!("array_has(string_to_array(tables, ','), {})", text(s)))
        .collect();
    if tables.is_empty() {
        return Ok(None);
    }
    let sql = format!(
        "SELECT max(at) AS at FROM reads WHERE principal = {} \
         AND action IN ('query', 'delivered') AND decision NOT IN ('refuse', 'error') \
         AND at >= to_timestamp_millis({from_ms}) AND at <= to_timestamp_millis({until_ms}) \
         AND ({})",
        text(recipient),
        tables.join(" OR ")
    );
    let batches = reads.sql(&sql).await?.collect().await?;
    let Some(batch) = batches.first() else {
        return Ok(None);
    };
    let column = batch.column(0);
    if batch.num_rows() == 0 || column.is_null(0) {
        return Ok(None);
    }
    let options = arrow::util::display::FormatOptions::default();
    let formatter = arrow::util::display::ArrayFormatter::try_new(column.as_ref(), &options)
        .map_err(|e| AccessError::Invalid(e.to_string()))?;
    Ok(Some(formatter.value(0).to_string()))
}
