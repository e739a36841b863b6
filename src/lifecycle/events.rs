//! Vehicle events from the admin interface (HTTP `POST /admin/events` and
//! `fleetgate admin event`): what happens to a vehicle's data when it is
//! sold, its account is deleted, its SIM is switched off or a consent
//! changes. Each event is applied to the vault (durable, so it survives a
//! restart), is idempotent (applying it twice leaves the same state), and
//! is appended to the audit log with the VIN's keyed tag, never the VIN.
//!
//! A case closed, a remote-managed charging session ended, an analysis
//! completed or charge history switched off records a deletion request for
//! the rows they name (see [`crate::lifecycle::requests`]): hidden at once, deleted
//! from disk by the next retention sweep. A legal hold on a vehicle or a
//! case keeps its rows whatever retention or a request says, and refuses
//! the vehicle's erasure, until it is released.
//!
//! Rows name a vehicle only by its pseudonym, which changes with the key
//! epoch; events about a vehicle's rows select the pseudonyms of every
//! epoch from 400 days before the event to 60 days after it.

use serde::{Deserialize, Serialize};

use crate::core::consent::Consent;
use crate::lifecycle::requests::LifecycleState;
use crate::lifecycle::requests::{self, DeletionRequest, LegalHold, MatchValue, Selection};
use crate::privacy::pseudo::{is_vin, vin_tag};
use crate::privacy::stage::PrivacyShared;
use crate::privacy::vault::VaultError;
use crate::schema::INTERNAL_DOMAIN;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("not a VIN: 17 characters of the VIN alphabet expected")]
    InvalidVin,
    #[error("event {0} needs `consent`: one of smart_maintenance, product_quality")]
    ConsentMissing(&'static str),
    #[error("event {0} needs `id`: the case, session, analysis or legal hold it names")]
    IdMissing(&'static str),
    #[error("the vehicle is under legal hold {0}: its erasure waits for the hold's release")]
    LegalHold(String),
    #[error(transparent)]
    Request(#[from] crate::control::ControlError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("audit log {path}: {source}")]
    Audit {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = EventError> = std::result::Result<T, E>;

/// What happened to a vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum VehicleEvent {
    /// Sold or transferred (§7.2, catalog §2.6): the previous owner's
    /// personal data goes; the vehicle gets new pseudonyms, which no key
    /// links to the old ones (stored counters still can, by value).
    VehicleSold,
    /// The customer account is deleted.
    AccountDeleted,
    /// An erasure request (GDPR Art. 17).
    ErasureRequested,
    /// SIM deactivated (§1.6, §8.8): collection stops.
    SimDeactivated,
    SimActivated,
    /// An opt-in consent (Smart Maintenance, Product Quality) withdrawn.
    ConsentWithdrawn,
    ConsentGiven,
    /// Charge history switched off (L1082-1084): its rows go, and no
    /// charging record is stored until it is switched on again.
    ChargeHistoryOff,
    ChargeHistoryOn,
    /// A teleservice case closed (L2505-2507).
    CaseClosed,
    /// A remote-managed charging session ended (L1085-1087).
    ChargingSessionEnded,
    /// A diagnostic analysis completed (L2753-2755).
    AnalysisCompleted,
    /// A legal hold placed on the vehicle, or on one of its cases
    /// (`case_id`), under the name `id`.
    LegalHoldPlaced,
    /// The legal hold named `id` released.
    LegalHoldReleased,
}

impl VehicleEvent {
    pub fn name(self) -> &'static str {
        match self {
            VehicleEvent::VehicleSold => "vehicle_sold",
            VehicleEvent::AccountDeleted => "account_deleted",
            VehicleEvent::ErasureRequested => "erasure_requested",
            VehicleEvent::SimDeactivated => "sim_deactivated",
            VehicleEvent::SimActivated => "sim_activated",
            VehicleEvent::ConsentWithdrawn => "consent_withdrawn",
            VehicleEvent::ConsentGiven => "consent_given",
            VehicleEvent::ChargeHistoryOff => "charge_history_off",
            VehicleEvent::ChargeHistoryOn => "charge_history_on",
            VehicleEvent::CaseClosed => "case_closed",
            VehicleEvent::ChargingSessionEnded => "charging_session_ended",
            VehicleEvent::AnalysisCompleted => "analysis_completed",
            VehicleEvent::LegalHoldPlaced => "legal_hold_placed",
            VehicleEvent::LegalHoldReleased => "legal_hold_released",
        }
    }
}

/// An opt-in consent an event names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ConsentKind {
    SmartMaintenance,
    ProductQuality,
}

/// One event as the admin interface takes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    pub event: VehicleEvent,
    pub vin: String,
    pub consent: Option<ConsentKind>,
    /// The case, charging session, analysis or legal hold the event names.
    pub id: Option<String>,
    /// The case a legal hold is limited to; without it the hold covers the vehicle.
    pub case_id: Option<String>,
}

/// Tables whose rows carry the vehicle's pseudonym in `vehicle_id`; RTTI
/// rows carry no vehicle identifier at all, by design.
const VEHICLE_TABLES: [&str; 4] = ["teleservice", "diagnostics", "charging", "dead_letters"];
const DAY_MS: i64 = 86_400_000;

/// The vehicle's pseudonyms for every key epoch from 400 days before `now`
/// to 60 days after: those its stored rows and its coming rows carry.
fn vehicle_ids(privacy: &PrivacyShared, vin: &str, now_ms: i64) -> Result<Vec<String>> {
    let first = privacy.epoch(now_ms - 400 * DAY_MS);
    let last = privacy.epoch(now_ms + 60 * DAY_MS);
    let mut ids = Vec::new();
    for epoch in first..=last {
        if let Some(id) = privacy.lookup_vehicle_id(INTERNAL_DOMAIN, vin, epoch)? {
            ids.push(id);
        }
    }
    Ok(ids)
}

fn selection(table: &str, matches: Vec<(&str, MatchValue)>) -> Selection {
    Selection {
        table: table.to_owned(),
        matches: matches
            .into_iter()
            .map(|(column, value)| (column.to_owned(), value))
            .collect(),
    }
}

/// Applies `request`, audits it, and says what it changed.
pub fn apply(
    privacy: &PrivacyShared,
    state: &LifecycleState,
    request: &EventRequest,
    now_ms: i64,
) -> Result<String> {
    let audit_file = state.audit_file.as_path();
    if !is_vin(&request.vin) {
        return Err(EventError::InvalidVin);
    }
    let vin = request.vin.as_str();
    let event = request.event;
    let set = |change: &dyn Fn(&mut Consent)| -> Result<String> {
        let mut consent = privacy.vault.consent(vin)?;
        change(&mut consent);
        privacy.set_consent(vin, consent)?;
        Ok(format!(
            "smart_maintenance={} product_quality={} sim_active={} charge_history={}",
            consent.smart_maintenance,
            consent.product_quality,
            consent.sim_active,
            consent.charge_history
        ))
    };
    let consent = || {
        request
            .consent
            .ok_or(EventError::ConsentMissing(event.name()))
    };
    let id = || {
        request
            .id
            .clone()
            .ok_or(EventError::IdMissing(event.name()))
    };
    let tag = vin_tag(&privacy.keys.redaction_key(), vin);
    let effect = match event {
        VehicleEvent::VehicleSold
        | VehicleEvent::AccountDeleted
        | VehicleEvent::ErasureRequested => {
            if let Some(hold) = requests::load_holds(&state.holds)?
                .into_iter()
                .find(|h| h.vehicle_tag == tag)
            {
                return Err(EventError::LegalHold(hold.name));
            }
            if privacy.erase(vin)? {
                "secrets erased: past rows unlinked from the VIN, encrypted fields unreadable"
                    .to_owned()
            } else {
                "no secrets held: nothing to erase".to_owned()
            }
        }
        VehicleEvent::SimDeactivated => set(&|c| c.sim_active = false)?,
        VehicleEvent::SimActivated => set(&|c| c.sim_active = true)?,
        VehicleEvent::ChargeHistoryOn => set(&|c| c.charge_history = true)?,
        VehicleEvent::ConsentWithdrawn | VehicleEvent::ConsentGiven => {
            let kind = consent()?;
            let on = event == VehicleEvent::ConsentGiven;
            set(&|c| match kind {
                ConsentKind::SmartMaintenance => c.smart_maintenance = on,
                ConsentKind::ProductQuality => c.product_quality = on,
            })?
        }
        VehicleEvent::CaseClosed
        | VehicleEvent::ChargingSessionEnded
        | VehicleEvent::AnalysisCompleted
        | VehicleEvent::ChargeHistoryOff => {
            let rows = match event {
                VehicleEvent::CaseClosed => {
                    selection("teleservice", vec![("case_id", MatchValue::Text(id()?))])
                }
                // Only remote charge management data ends with the session;
                // the charge history has its own rule (L1082-1087).
                VehicleEvent::ChargingSessionEnded => selection(
                    "charging",
                    vec![
                        ("session_id", MatchValue::Text(id()?)),
                        ("remote_managed", MatchValue::Bool(true)),
                    ],
                ),
                VehicleEvent::AnalysisCompleted => selection(
                    "diagnostics",
                    vec![("analysis_id", MatchValue::Text(id()?))],
                ),
                _ => selection(
                    "charging",
                    vec![(
                        "vehicle_id",
                        MatchValue::AnyOf(vehicle_ids(privacy, vin, now_ms)?),
                    )],
                ),
            };
            let table = rows.table.clone();
            requests::add(
                &state.requests,
                DeletionRequest {
                    rows,
                    event: event.name().to_owned(),
                    requested_ms: now_ms,
                },
            )?;
            let effect =
                format!("{table} rows hidden now, deleted from disk by the next retention sweep");
            if event == VehicleEvent::ChargeHistoryOff {
                set(&|c| c.charge_history = false)?;
                format!("{effect}; no charging record is stored until charge_history_on")
            } else {
                effect
            }
        }
        VehicleEvent::LegalHoldPlaced => {
            let covers = match &request.case_id {
                Some(case) => vec![selection(
                    "teleservice",
                    vec![("case_id", MatchValue::Text(case.clone()))],
                )],
                None => {
                    // A vehicle fleetgate has not seen yet gets its secret
                    // now, so that the rows it sends later are covered too.
                    privacy.vault.get_or_create(vin)?;
                    let ids = vehicle_ids(privacy, vin, now_ms)?;
                    VEHICLE_TABLES
                        .iter()
                        .map(|table| {
                            selection(table, vec![("vehicle_id", MatchValue::AnyOf(ids.clone()))])
                        })
                        .collect()
                }
            };
            let hold = LegalHold {
                name: id()?,
                vehicle_tag: tag.clone(),
                covers,
                placed_ms: now_ms,
            };
            if requests::place_hold(&state.holds, hold)? {
                "legal hold placed".to_owned()
            } else {
                "legal hold replaced".to_owned()
            }
        }
        VehicleEvent::LegalHoldReleased => {
            if requests::release_hold(&state.holds, &id()?, &tag)? {
                "legal hold released".to_owned()
            } else {
                "no legal hold of that name on this vehicle".to_owned()
            }
        }
    };
    let line = serde_json::json!({
        "at": chrono::DateTime::from_timestamp_millis(now_ms).map(|t| t.to_rfc3339()),
        "action": "vehicle_event",
        "event": event.name(),
        "vehicle": tag,
        "consent": request.consent,
        "id": request.id,
        "case_id": request.case_id,
        "effect": effect,
    });
    crate::lifecycle::retention::append_audit(audit_file, &[line]).map_err(|e| {
        EventError::Audit {
            path: audit_file.display().to_string(),
            source: e,
        }
    })?;
    Ok(effect)
}
