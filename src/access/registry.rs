//! Who may query: principals, the tenures that tie users to vehicles, and
//! the grants users give third parties. One JSON file (`[access]
//! registry_file`), changed only through [`crate::core::fsio::update_json`]
//! (exclusive lock, write, fsync, rename), so the admin API and the CLI can
//! both change it without losing an entry. A sale, an account deletion or
//! an erasure ends tenures and grants through [`AccessRegistry::end_holding`].
//!
//! The registry is the account link of seed L83-86 (a VIN tied to a
//! customer account) and so the one file besides the vault's index that
//! needs a vehicle's VIN: the owner gets their data, and their VIN, back.
//! It never reaches a Parquet file or a log line; audit lines carry the
//! VIN's keyed tag.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AccessError, Result};
use crate::lifecycle::events::VehicleEvent;
use crate::privacy::pseudo::is_vin;
use crate::schema::Stream;

/// The kinds of principal the Data Act rules distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// The manufacturer's own analytics: pseudonymised data.
    Operator,
    /// A vehicle's owner or lessee (Data Act Art. 4).
    User,
    /// A data recipient the user names (Art. 5).
    ThirdParty,
    /// An affiliate or sub-licensee under seed §9.2: aggregates only.
    Licensee,
}

impl PrincipalKind {
    pub fn name(self) -> &'static str {
        match self {
            PrincipalKind::Operator => "operator",
            PrincipalKind::User => "user",
            PrincipalKind::ThirdParty => "third_party",
            PrincipalKind::Licensee => "licensee",
        }
    }
}

/// What a third party does, which bounds what it can ever be granted
/// (catalog §4: who may receive which stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Independent repair provider in the EEA (L2379-2391): teleservice
    /// and diagnostics, positions included.
    IndependentRepair,
    /// The user's preferred service partner (L2286-2287, L2495-2497):
    /// maintenance needs only.
    ServicePartner,
    /// The remote charge management provider the user designated
    /// (L1001-1004): remote-managed charging sessions only.
    RemoteChargeManagement,
    /// Any other recipient: whatever streams the user grants.
    Other,
}

impl Role {
    /// The role as the API and the CLI spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::IndependentRepair => "independent_repair",
            Role::ServicePartner => "service_partner",
            Role::RemoteChargeManagement => "remote_charge_management",
            Role::Other => "other",
        }
    }

    /// The streams this role can be granted.
    pub fn streams(self) -> &'static [Stream] {
        match self {
            Role::IndependentRepair => &[Stream::Teleservice, Stream::Diagnostics],
            Role::ServicePartner => &[Stream::Teleservice],
            Role::RemoteChargeManagement => &[Stream::Charging],
            Role::Other => &[Stream::Teleservice, Stream::Diagnostics, Stream::Charging],
        }
    }
}

/// Someone who queries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Principal {
    pub id: String,
    pub kind: PrincipalKind,
    /// SHA-256 of the bearer token, hex; the token itself is never kept.
    pub token_sha256: String,
    /// Third parties: a gatekeeper under the DMA can receive no grant (Art. 5(3)).
    #[serde(default)]
    pub gatekeeper: bool,
    /// Third parties: what they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Third parties: established in the EEA.
    #[serde(default)]
    pub eea: bool,
    pub created_ms: i64,
}

/// A user holds a vehicle from `from_ms` until `until_ms` (open: still holds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenure {
    pub user: String,
    pub vin: String,
    pub from_ms: i64,
    pub until_ms: Option<i64>,
}

/// A sale, account deletion or erasure of a vehicle the registry names:
/// the vehicle's secrets were erased then (unless a legal hold refused it),
/// so a secret created later belongs to a new identity, which no tenure
/// that ended by then may reach, whatever the rows' timestamps say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Erasure {
    pub vin: String,
    pub at_ms: i64,
}

/// What a vehicle event that erases the vehicle's secrets does to the
/// tenures and grants of the vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `vehicle_sold`: every tenure of the vehicle ends, every grant of it
    /// is revoked.
    Sale,
    /// `account_deleted`: the same, and every other tenure and grant of
    /// the users who held the vehicle.
    AccountDeletion,
    /// `erasure_requested`: the holder keeps the vehicle; earlier holders
    /// lose the rows of its new identity.
    Erasure,
}

impl Ending {
    /// The ending a vehicle event brings, if any.
    pub fn of(event: VehicleEvent) -> Option<Self> {
        match event {
            VehicleEvent::VehicleSold => Some(Ending::Sale),
            VehicleEvent::AccountDeleted => Some(Ending::AccountDeletion),
            VehicleEvent::ErasureRequested => Some(Ending::Erasure),
            _ => None,
        }
    }
}

/// A user's permission for a third party to read streams of one of their
/// vehicles, for one purpose, over a period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub user: String,
    pub recipient: String,
    pub vin: String,
    pub streams: Vec<String>,
    pub purpose: String,
    pub from_ms: i64,
    pub until_ms: Option<i64>,
    pub given_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// What a grant asks for, before it is checked and given an id.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub user: String,
    pub recipient: String,
    pub vin: String,
    pub streams: Vec<String>,
    pub purpose: String,
    /// Start of the granted period; default: when it is given.
    pub from_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

/// The whole registry file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccessRegistry {
    pub principals: Vec<Principal>,
    pub tenures: Vec<Tenure>,
    pub grants: Vec<Grant>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub erasures: Vec<Erasure>,
}

/// The id of the operator principal every registry has: the CLI's default.
pub const OPERATOR: &str = "operator";

impl AccessRegistry {
    pub fn principal(&self, id: &str) -> Option<Principal> {
        if let Some(p) = self.principals.iter().find(|p| p.id == id) {
            return Some(p.clone());
        }
        (id == OPERATOR).then(|| Principal {
            id: OPERATOR.to_owned(),
            kind: PrincipalKind::Operator,
            token_sha256: String::new(),
            gatekeeper: false,
            role: None,
            eea: false,
            created_ms: 0,
        })
    }

    /// The principal whose token this is.
    pub fn by_token(&self, token: &str) -> Option<&Principal> {
        let hash = token_hash(token);
        self.principals.iter().find(|p| p.token_sha256 == hash)
    }

    /// The user's tenures.
    pub fn tenures_of<'a>(&'a self, user: &'a str) -> impl Iterator<Item = &'a Tenure> {
        self.tenures.iter().filter(move |t| t.user == user)
    }

    /// The grants in force for `recipient` at `now_ms`: not revoked, not
    /// past their `until`, and none at all for a gatekeeper.
    pub fn grants_for<'a>(
        &'a self,
        recipient: &'a Principal,
        now_ms: i64,
    ) -> impl Iterator<Item = &'a Grant> {
        self.grants.iter().filter(move |g| {
            !recipient.gatekeeper
                && g.recipient == recipient.id
                && g.revoked_ms.is_none_or(|at| at > now_ms)
                && g.until_ms.is_none_or(|until| until > now_ms)
        })
    }

    /// The periods within `[from, until)` in which `user` held `vin`.
    pub fn held_periods(
        &self,
        user: &str,
        vin: &str,
        from_ms: i64,
        until_ms: Option<i64>,
    ) -> Vec<Period> {
        self.periods(user, vin, from_ms, until_ms, None)
    }

    /// [`Self::held_periods`] that can hold rows under the vehicle's secret
    /// created at `secret_created_ms`: without the tenures that ended at or
    /// before an [`Erasure`] that secret came after, including tenures
    /// registered after the event. Its rows belong to the vehicle's new
    /// identity, even when their timestamps fall within such a tenure.
    pub fn held_periods_under(
        &self,
        user: &str,
        vin: &str,
        from_ms: i64,
        until_ms: Option<i64>,
        secret_created_ms: i64,
    ) -> Vec<Period> {
        self.periods(user, vin, from_ms, until_ms, Some(secret_created_ms))
    }

    fn periods(
        &self,
        user: &str,
        vin: &str,
        from_ms: i64,
        until_ms: Option<i64>,
        secret_created_ms: Option<i64>,
    ) -> Vec<Period> {
        self.tenures_of(user)
            .filter(|t| t.vin == vin)
            .filter(|t| {
                let cut_off = t
                    .until_ms
                    .zip(secret_created_ms)
                    .is_some_and(|(until, created)| {
                        self.erasures
                            .iter()
                            .any(|e| e.vin == t.vin && until <= e.at_ms && e.at_ms <= created)
                    });
                !cut_off
            })
            .filter_map(|t| {
                let start = t.from_ms.max(from_ms);
                let end = earlier_end(t.until_ms, until_ms);
                end.is_none_or(|end| end > start).then_some((start, end))
            })
            .collect()
    }

    /// Each vehicle `user` has held, with all the periods they held it.
    pub fn vehicles_held(&self, user: &str) -> Vec<(String, Vec<Period>)> {
        let mut vins: Vec<&str> = self.tenures_of(user).map(|t| t.vin.as_str()).collect();
        vins.sort_unstable();
        vins.dedup();
        vins.into_iter()
            .map(|vin| (vin.to_owned(), self.held_periods(user, vin, i64::MIN, None)))
            .collect()
    }
}

/// From (inclusive) and until (exclusive; `None`: open), in milliseconds.
pub type Period = (i64, Option<i64>);

/// The earlier of two period ends, where `None` is open.
pub fn earlier_end(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// SHA-256 of a token, hex.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AccessError::Invalid(format!(
            "principal id {id:?}: 1-64 characters of A-Z, a-z, 0-9, '-', '_', '.'"
        )))
    }
}

/// A new principal: the registry entry and its bearer token, which is
/// shown once and never stored.
pub fn new_principal(
    id: &str,
    kind: PrincipalKind,
    role: Option<Role>,
    eea: bool,
    gatekeeper: bool,
    now_ms: i64,
) -> Result<(Principal, String)> {
    check_id(id)?;
    if kind != PrincipalKind::ThirdParty && (role.is_some() || gatekeeper || eea) {
        return Err(AccessError::Invalid(
            "role, eea and gatekeeper apply to third parties only".into(),
        ));
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| AccessError::Invalid(e.to_string()))?;
    let token = format!("fg_{}", hex::encode(bytes));
    let principal = Principal {
        id: id.to_owned(),
        kind,
        token_sha256: token_hash(&token),
        gatekeeper,
        role: (kind == PrincipalKind::ThirdParty).then(|| role.unwrap_or(Role::Other)),
        eea,
        created_ms: now_ms,
    };
    Ok((principal, token))
}

impl AccessRegistry {
    /// Adds `principal`; refuses an id in use.
    pub fn add_principal(&mut self, principal: Principal) -> Result<()> {
        if self.principal(&principal.id).is_some() {
            return Err(AccessError::Invalid(format!(
                "principal {} exists",
                principal.id
            )));
        }
        self.principals.push(principal);
        Ok(())
    }

    /// `user` holds `vin` from `from_ms`: whoever held it before stops
    /// holding it then (a sale ends the old owner's tenure, seed §7).
    pub fn transfer(&mut self, user: &str, vin: &str, from_ms: i64) -> Result<()> {
        if !is_vin(vin) {
            return Err(AccessError::Invalid("not a VIN".into()));
        }
        match self.principal(user) {
            Some(p) if p.kind == PrincipalKind::User => {}
            _ => return Err(AccessError::Invalid(format!("{user} is not a user"))),
        }
        if self
            .tenures
            .iter()
            .any(|t| t.vin == vin && t.from_ms >= from_ms)
        {
            return Err(AccessError::Invalid(format!(
                "the vehicle already changed hands at or after {from_ms}"
            )));
        }
        for tenure in self.tenures.iter_mut().filter(|t| t.vin == vin) {
            if tenure.until_ms.is_none_or(|until| until > from_ms) {
                tenure.until_ms = Some(from_ms);
            }
        }
        self.tenures.push(Tenure {
            user: user.to_owned(),
            vin: vin.to_owned(),
            from_ms,
            until_ms: None,
        });
        Ok(())
    }

    /// What `ending` of `vin` at `at_ms` does: a sale ends every tenure of
    /// the vehicle still open then (one dated later becomes empty) and
    /// revokes every grant of it; an account deletion also ends every other
    /// tenure, and revokes every other grant, of the users who held it; an
    /// erasure ends nothing. Each is recorded as an [`Erasure`], so the
    /// vehicle's next secret is out of reach of every tenure ended by then.
    /// Returns the users whose holding ended; idempotent.
    pub fn end_holding(&mut self, vin: &str, ending: Ending, at_ms: i64) -> Vec<String> {
        let erasure = Erasure {
            vin: vin.to_owned(),
            at_ms,
        };
        if !self.erasures.contains(&erasure) {
            self.erasures.push(erasure);
        }
        let mut users: Vec<String> = match ending {
            Ending::Erasure => Vec::new(),
            Ending::Sale | Ending::AccountDeletion => self
                .tenures
                .iter()
                .filter(|t| t.vin == vin && t.until_ms.is_none_or(|u| u > at_ms))
                .map(|t| t.user.clone())
                .collect(),
        };
        users.sort();
        users.dedup();
        let account = ending == Ending::AccountDeletion;
        for tenure in &mut self.tenures {
            if tenure.vin != vin && !(account && users.contains(&tenure.user)) {
                continue;
            }
            if ending != Ending::Erasure && tenure.until_ms.is_none_or(|u| u > at_ms) {
                tenure.until_ms = Some(at_ms.max(tenure.from_ms));
            }
        }
        if ending != Ending::Erasure {
            for grant in &mut self.grants {
                let concerned = grant.vin == vin || (account && users.contains(&grant.user));
                if concerned && grant.revoked_ms.is_none_or(|r| r > at_ms) {
                    grant.revoked_ms = Some(at_ms);
                }
            }
        }
        users
    }

    /// Records a grant after checking it against the recipient's role and
    /// the user's tenure; returns its id.
    pub fn grant(
        &mut self,
        request: GrantRequest,
        purpose_allowed: impl Fn(&str) -> Result<()>,
        now_ms: i64,
    ) -> Result<String> {
        let recipient = match self.principal(&request.recipient) {
            Some(p) if p.kind == PrincipalKind::ThirdParty => p,
            _ => {
                return Err(AccessError::Invalid(format!(
                    "{} is not a third party",
                    request.recipient
                )));
            }
        };
        if recipient.gatekeeper {
            return Err(AccessError::Refused(format!(
                "EU Data Act Art. 5(3): {} is a gatekeeper and can receive no data",
                recipient.id
            )));
        }
        let role = recipient.role.unwrap_or(Role::Other);
        if role == Role::IndependentRepair && !recipient.eea {
            return Err(AccessError::Refused(format!(
                "seed L2379-2391: an independent repair provider must be established in the EEA; {} is not",
                recipient.id
            )));
        }
        purpose_allowed(&request.purpose)?;
        if request.streams.is_empty() {
            return Err(AccessError::Invalid(
                "a grant names at least one stream".into(),
            ));
        }
        for stream in &request.streams {
            let known = Stream::from_name(stream)
                .ok_or_else(|| AccessError::Invalid(format!("no stream {stream}")))?;
            if !role.streams().contains(&known) {
                return Err(AccessError::Refused(format!(
                    "a recipient in role {} cannot be granted {stream}",
                    role.name()
                )));
            }
        }
        let from_ms = request.from_ms.unwrap_or(now_ms);
        if self
            .held_periods(&request.user, &request.vin, from_ms, request.until_ms)
            .is_empty()
        {
            return Err(AccessError::Refused(format!(
                "{} does not hold that vehicle in the granted period",
                request.user
            )));
        }
        let id = format!("grant-{}", self.grants.len() + 1);
        self.grants.push(Grant {
            id: id.clone(),
            user: request.user,
            recipient: request.recipient,
            vin: request.vin,
            streams: request.streams,
            purpose: request.purpose,
            from_ms,
            until_ms: request.until_ms,
            given_ms: now_ms,
            revoked_ms: None,
        });
        Ok(id)
    }

    /// Revokes a grant from `now_ms` on; false if it was already revoked.
    pub fn revoke(&mut self, grant_id: &str, now_ms: i64) -> Result<bool> {
        let grant = self
            .grants
            .iter_mut()
            .find(|g| g.id == grant_id)
            .ok_or_else(|| AccessError::Invalid(format!("no grant {grant_id}")))?;
        if grant.revoked_ms.is_some() {
            return Ok(false);
        }
        grant.revoked_ms = Some(now_ms);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIN: &str = "WMW11DJ04N2T00001";

    fn registry() -> AccessRegistry {
        let mut r = AccessRegistry::default();
        for (id, kind) in [("alice", PrincipalKind::User), ("bob", PrincipalKind::User)] {
            let (p, _) = new_principal(id, kind, None, false, false, 0).expect("principal");
            r.add_principal(p).expect("add");
        }
        r
    }

    /// The registry with the repair shop `rep` (independent repair, in the
    /// EEA) and alice holding `VIN` since 100.
    fn registry_with_repair() -> AccessRegistry {
        let mut r = registry();
        let (rep, _) = new_principal(
            "rep",
            PrincipalKind::ThirdParty,
            Some(Role::IndependentRepair),
            true,
            false,
            0,
        )
        .expect("principal");
        r.add_principal(rep).expect("add");
        r.transfer("alice", VIN, 100).expect("alice buys");
        r
    }

    /// Alice's grant of `VIN`'s `stream` to `rep` from 100.
    fn repair_request(stream: &str) -> GrantRequest {
        GrantRequest {
            user: "alice".into(),
            recipient: "rep".into(),
            vin: VIN.into(),
            streams: vec![stream.into()],
            purpose: "repair_and_maintenance".into(),
            from_ms: Some(100),
            until_ms: None,
        }
    }

    #[test]
    fn a_refused_stream_names_the_role_as_the_api_spells_it() {
        let mut r = registry_with_repair();
        let refusal = r
            .grant(repair_request("charging"), |_| Ok(()), 150)
            .expect_err("refused");
        assert_eq!(
            refusal.to_string(),
            "refused: a recipient in role independent_repair cannot be granted charging"
        );
        for role in [
            Role::IndependentRepair,
            Role::ServicePartner,
            Role::RemoteChargeManagement,
            Role::Other,
        ] {
            let spelled = serde_json::to_value(role).expect("serialises");
            assert_eq!(spelled, role.name(), "the name is serde's");
        }
    }

    #[test]
    fn a_sale_ends_the_previous_tenure() {
        let mut r = registry();
        r.transfer("alice", VIN, 100).expect("alice buys");
        r.transfer("bob", VIN, 500).expect("bob buys");
        assert_eq!(
            r.held_periods("alice", VIN, 0, None),
            vec![(100, Some(500))]
        );
        assert_eq!(r.held_periods("bob", VIN, 0, None), vec![(500, None)]);
        assert!(r.held_periods("alice", VIN, 500, None).is_empty());
        assert!(
            r.transfer("alice", VIN, 400).is_err(),
            "no sale into the past"
        );
    }

    #[test]
    fn a_sale_or_an_account_deletion_ends_tenures_and_their_grants() {
        const OTHER: &str = "WMW21GD07P2S00002";
        let mut r = registry_with_repair();
        r.transfer("alice", OTHER, 100).expect("alice buys another");
        r.grant(repair_request("teleservice"), |_| Ok(()), 150)
            .expect("grant");

        assert_eq!(
            r.end_holding(VIN, Ending::Sale, 500),
            vec!["alice".to_owned()]
        );
        assert_eq!(
            r.held_periods("alice", VIN, 0, None),
            vec![(100, Some(500))]
        );
        assert_eq!(
            r.held_periods("alice", OTHER, 0, None),
            vec![(100, None)],
            "a sale ends that vehicle's tenures only"
        );
        assert_eq!(r.grants[0].revoked_ms, Some(500));
        // The secret the sale erased was older than the tenure's end: its
        // rows are Alice's. A secret created after the sale is the buyer's.
        assert_eq!(
            r.held_periods_under("alice", VIN, 0, None, 50),
            vec![(100, Some(500))]
        );
        assert!(r.held_periods_under("alice", VIN, 0, None, 900).is_empty());
        // A buyer registered after the sale sees the new secret's rows.
        r.transfer("bob", VIN, 600).expect("bob buys");
        assert_eq!(
            r.held_periods_under("bob", VIN, 0, None, 900),
            vec![(600, None)]
        );

        assert_eq!(
            r.end_holding(OTHER, Ending::AccountDeletion, 700),
            vec!["alice".to_owned()]
        );
        assert!(
            r.tenures_of("alice")
                .all(|t| t.until_ms.is_some_and(|u| u <= 700))
        );
        assert!(
            r.end_holding(OTHER, Ending::AccountDeletion, 800)
                .is_empty(),
            "idempotent"
        );
        assert_eq!(
            r.held_periods("bob", VIN, 0, None),
            vec![(600, None)],
            "Alice's account deletion leaves Bob's tenure alone"
        );
    }

    #[test]
    fn an_erasure_cuts_earlier_holders_off_the_new_secret_only() {
        let mut r = registry();
        r.transfer("alice", VIN, 100).expect("alice buys");
        r.transfer("bob", VIN, 500).expect("bob buys");
        assert!(r.end_holding(VIN, Ending::Erasure, 700).is_empty());
        assert_eq!(
            r.held_periods_under("bob", VIN, 0, None, 800),
            vec![(500, None)],
            "the holder keeps the vehicle"
        );
        assert!(r.held_periods_under("alice", VIN, 0, None, 800).is_empty());
        assert_eq!(
            r.held_periods_under("alice", VIN, 0, None, 650),
            vec![(100, Some(500))],
            "a secret older than the erasure (a legal hold refused it) is still hers"
        );
    }

    #[test]
    fn a_tenure_registered_after_an_erasure_and_ended_before_it_is_cut_off_too() {
        let mut r = registry();
        let (carol, _) =
            new_principal("carol", PrincipalKind::User, None, false, false, 0).expect("carol");
        r.add_principal(carol).expect("add");
        r.transfer("alice", VIN, 100).expect("alice buys");
        r.end_holding(VIN, Ending::Sale, 500);
        // The history is completed afterwards: Bob held it from 300 to 400.
        r.transfer("bob", VIN, 300).expect("bob, late");
        r.transfer("carol", VIN, 400).expect("carol, late");
        assert!(r.held_periods_under("bob", VIN, 0, None, 900).is_empty());
        assert_eq!(
            r.held_periods_under("carol", VIN, 0, None, 900),
            vec![(400, None)],
            "registered as the holder now"
        );
    }

    #[test]
    fn tokens_are_stored_hashed() {
        let (p, token) =
            new_principal("rep", PrincipalKind::ThirdParty, None, true, false, 0).expect("p");
        assert_ne!(p.token_sha256, token);
        let mut r = AccessRegistry::default();
        r.add_principal(p).expect("add");
        assert_eq!(r.by_token(&token).map(|p| p.id.as_str()), Some("rep"));
        assert!(r.by_token("fg_wrong").is_none());
        assert!(new_principal("bad id", PrincipalKind::User, None, false, false, 0).is_err());
    }
}
