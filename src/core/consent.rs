//! What a vehicle's owner has agreed to, and the state of its SIM.

/// What a vehicle's owner has agreed to and the state of its SIM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consent {
    /// Smart Maintenance: opt-in in the vehicle's privacy menu (seed L2320-2321, L2440).
    pub smart_maintenance: bool,
    /// Improvement of Product Quality: opt-in (L2677-2679).
    pub product_quality: bool,
    /// False after SIM deactivation (§1.6, §8.8): collection stops.
    pub sim_active: bool,
    /// False while the charge history is switched off (L1082-1084): no
    /// charging record is stored.
    pub charge_history: bool,
}

impl Default for Consent {
    /// The seed's defaults: opt-in functions off, SIM active, charge
    /// history on.
    fn default() -> Self {
        Self {
            smart_maintenance: false,
            product_quality: false,
            sim_active: true,
            charge_history: true,
        }
    }
}

impl Consent {
    /// Names of the consents a schema's gates may require.
    pub const NAMES: [&'static str; 2] = ["smart_maintenance", "product_quality"];

    pub fn get(&self, name: &str) -> bool {
        match name {
            "smart_maintenance" => self.smart_maintenance,
            "product_quality" => self.product_quality,
            _ => false,
        }
    }

    /// One byte, as the vault stores it.
    pub fn to_flags(self) -> u8 {
        u8::from(self.smart_maintenance)
            | u8::from(self.product_quality) << 1
            | u8::from(!self.sim_active) << 2
            | u8::from(!self.charge_history) << 3
    }

    /// The inverse of [`Consent::to_flags`].
    pub fn from_flags(flags: u8) -> Self {
        Self {
            smart_maintenance: flags & 1 != 0,
            product_quality: flags & 2 != 0,
            sim_active: flags & 4 == 0,
            charge_history: flags & 8 == 0,
        }
    }
}
