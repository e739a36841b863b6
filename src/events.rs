//! Vehicle events from the admin interface (HTTP `POST /admin/events` and
//! `fleetgate admin event`): what happens to a vehicle's data when it is
//! sold, its account is deleted, its SIM is switched off or a consent
//! changes. Each event is applied to the vault (durable, so it survives a
//! restart), is idempotent (applying it twice leaves the same state), and
//! is appended to the audit log with the VIN's keyed tag, never the VIN.
//!
//! A case closed, a remote-managed charging session ended or an analysis
//! completed records a deletion request for the rows they name (see
//! [`crate::requests`]): hidden at once, deleted from disk by the next
//! retention sweep. Charge history switched off needs deletion by vehicle
//! across key epochs, which is not built: it is refused as unsupported, not
//! silently accepted.

use serde::{Deserialize, Serialize};

use crate::config::RetentionConfig;
use crate::privacy::PrivacyShared;
use crate::pseudo::{is_vin, vin_tag};
use crate::requests::{self, DeletionRequest, MatchValue};
use crate::vault::{Consent, VaultError};

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("not a VIN: 17 characters of the VIN alphabet expected")]
    InvalidVin,
    #[error("event {0} needs `consent`: one of smart_maintenance, product_quality")]
    ConsentMissing(&'static str),
    #[error("event {0} needs `id`: the case, session or analysis it names")]
    IdMissing(&'static str),
    #[error(
        "event {0} is not supported yet: it needs deletion by vehicle across key epochs; until then the charge_history retention cap applies"
    )]
    Unsupported(&'static str),
    #[error(transparent)]
    Request(#[from] crate::requests::RequestError),
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
    /// personal data goes; the vehicle starts a new, unlinked identity.
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
    /// Charge history switched off (L1082-1084).
    ChargeHistoryOff,
    /// A teleservice case closed (L2505-2507).
    CaseClosed,
    /// A remote-managed charging session ended (L1085-1087).
    ChargingSessionEnded,
    /// A diagnostic analysis completed (L2753-2755).
    AnalysisCompleted,
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
            VehicleEvent::CaseClosed => "case_closed",
            VehicleEvent::ChargingSessionEnded => "charging_session_ended",
            VehicleEvent::AnalysisCompleted => "analysis_completed",
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
    /// The case, charging session or analysis a closing event names.
    pub id: Option<String>,
}

/// Applies `request`, audits it, and says what it changed.
pub fn apply(
    privacy: &PrivacyShared,
    files: &RetentionConfig,
    request: &EventRequest,
    now_ms: i64,
) -> Result<String> {
    let audit_file = files.audit_file.as_path();
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
            "smart_maintenance={} product_quality={} sim_active={}",
            consent.smart_maintenance, consent.product_quality, consent.sim_active
        ))
    };
    let consent = || {
        request
            .consent
            .ok_or(EventError::ConsentMissing(event.name()))
    };
    let effect = match event {
        VehicleEvent::VehicleSold
        | VehicleEvent::AccountDeleted
        | VehicleEvent::ErasureRequested => {
            if privacy.erase(vin)? {
                "secrets erased: past rows unlinkable, encrypted fields unreadable".to_owned()
            } else {
                "no secrets held: nothing to erase".to_owned()
            }
        }
        VehicleEvent::SimDeactivated => set(&|c| c.sim_active = false)?,
        VehicleEvent::SimActivated => set(&|c| c.sim_active = true)?,
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
        | VehicleEvent::AnalysisCompleted => {
            let id = request
                .id
                .clone()
                .ok_or(EventError::IdMissing(event.name()))?;
            let (table, mut matches) = match event {
                VehicleEvent::CaseClosed => {
                    ("teleservice", vec![("case_id", MatchValue::Text(id))])
                }
                VehicleEvent::ChargingSessionEnded => {
                    ("charging", vec![("session_id", MatchValue::Text(id))])
                }
                _ => ("diagnostics", vec![("analysis_id", MatchValue::Text(id))]),
            };
            if event == VehicleEvent::ChargingSessionEnded {
                // Only remote charge management data ends with the session;
                // the charge history has its own rule (L1082-1087).
                matches.push(("remote_managed", MatchValue::Bool(true)));
            }
            requests::add(
                &files.requests_file,
                DeletionRequest {
                    table: table.to_owned(),
                    matches: matches
                        .into_iter()
                        .map(|(column, value)| (column.to_owned(), value))
                        .collect(),
                    event: event.name().to_owned(),
                    requested_ms: now_ms,
                },
            )?;
            format!("{table} rows hidden now, deleted from disk by the next retention sweep")
        }
        VehicleEvent::ChargeHistoryOff => return Err(EventError::Unsupported(event.name())),
    };
    let line = serde_json::json!({
        "at": chrono::DateTime::from_timestamp_millis(now_ms).map(|t| t.to_rfc3339()),
        "action": "vehicle_event",
        "event": event.name(),
        "vehicle": vin_tag(&privacy.keys.redaction_key(), vin),
        "consent": request.consent,
        "id": request.id,
        "effect": effect,
    });
    crate::retention::append_audit(audit_file, &[line]).map_err(|e| EventError::Audit {
        path: audit_file.display().to_string(),
        source: e,
    })?;
    Ok(effect)
}
