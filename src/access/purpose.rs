//! The purposes a query may name (`schemas/purposes.toml`): which kinds of
//! principal may run queries for each, which encrypted fields a service
//! purpose reveals to the operator, and the purposes refused for everyone
//! (seed §9.3, Data Act Art. 6), each with its reason.

use serde::Deserialize;

use super::registry::PrincipalKind;
use super::{AccessError, Result};

/// Longest purpose name; every catalogue name is far shorter.
pub const MAX_PURPOSE_BYTES: usize = 64;

/// Whether `name` has the form of a catalogue name (lowercase letters,
/// digits and `_`, at most [`MAX_PURPOSE_BYTES`]): only such a name is ever
/// echoed in a refusal or written to the query audit.
pub fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PURPOSE_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// One allowed purpose.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    pub name: String,
    pub principals: Vec<PrincipalKind>,
    /// Encrypted fields (schema field names) the operator reads in clear for it.
    #[serde(default)]
    pub reveals: Vec<String>,
    pub basis: String,
}

/// A purpose no one may query for.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forbidden {
    pub name: String,
    pub reason: String,
}

/// The purpose catalogue.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purposes {
    #[serde(rename = "purpose")]
    pub allowed: Vec<Purpose>,
    pub forbidden: Vec<Forbidden>,
}

impl Purposes {
    /// The built-in catalogue.
    pub fn built_in() -> Result<Self> {
        Self::parse(include_str!("../../schemas/purposes.toml"))
    }

    pub fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| AccessError::Invalid(format!("purposes: {e}")))
    }

    /// The purpose `name` if `kind` may query for it; otherwise the refusal,
    /// naming the rule.
    pub fn check(&self, name: &str, kind: PrincipalKind) -> Result<&Purpose> {
        if !is_name(name) {
            return Err(AccessError::Refused(format!(
                "a purpose is a catalogue name: at most {MAX_PURPOSE_BYTES} lowercase letters, \
                 digits and _ (see schemas/purposes.toml)"
            )));
        }
        if let Some(forbidden) = self.forbidden.iter().find(|f| f.name == name) {
            return Err(AccessError::Refused(format!(
                "purpose {name} is forbidden: {}",
                forbidden.reason
            )));
        }
        let purpose = self
            .allowed
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                AccessError::Refused(format!(
                    "purpose {name:?} is unknown; known purposes: {}",
                    self.allowed
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        if !purpose.principals.contains(&kind) {
            return Err(AccessError::Refused(format!(
                "purpose {name} is not open to a {} ({})",
                kind.name(),
                purpose.basis
            )));
        }
        Ok(purpose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_unknown_and_foreign_purposes_are_refused_with_the_rule() {
        let purposes = Purposes::built_in().expect("built-in purposes");
        let refusal = |name, kind| match purposes.check(name, kind) {
            Err(AccessError::Refused(reason)) => reason,
            other => panic!("{name}: expected a refusal, got {other:?}"),
        };
        assert!(refusal("economic_situation", PrincipalKind::Operator).contains("§9.3"));
        assert!(refusal("profiling", PrincipalKind::ThirdParty).contains("Art. 6(2)(b)"));
        assert!(refusal("marketing", PrincipalKind::User).contains("unknown"));
        assert!(refusal("own_data_access", PrincipalKind::Licensee).contains("not open"));
        let long = "x".repeat(MAX_PURPOSE_BYTES + 1);
        for odd in [long.as_str(), "", "Operations", "operations\n"] {
            let reason = refusal(odd, PrincipalKind::Operator);
            assert!(reason.contains("catalogue name"), "{reason}");
            assert!(
                odd.is_empty() || !reason.contains(odd),
                "{reason} echoes {odd:?}"
            );
        }
        let hv = purposes
            .check("hv_warn_call", PrincipalKind::Operator)
            .expect("service purpose");
        assert_eq!(hv.reveals, vec!["contact_phone".to_owned()]);
    }
}
