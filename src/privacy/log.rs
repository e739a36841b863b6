//! Log redaction: the writer every log line passes on its way out.

/// Log output with every VIN-shaped token replaced by `vin:redacted`.
/// fleetgate's own lines name vehicles by pseudonym or tag only, but rumqttd
/// puts client ids and, for a TLS vehicle, its certificate's organisation
/// (the VIN) into its log spans; a VIN must never reach a log line. Each
/// `write` gets one whole formatted event, so no token is split.
pub struct Redacting<W: std::io::Write>(pub W);

impl<W: std::io::Write> std::io::Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let clean = crate::privacy::pseudo::redact_vins(buf, &mut |_| "redacted".to_owned());
        self.0.write_all(&clean)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn log_lines_lose_their_vins() {
        let mut log = super::Redacting(Vec::new());
        log.write_all(b"remote_link{tenant_id=Some(\"WMW11DJ04N2T00001\") client_id=\"WMW11DJ04N2T00001.car\"} router-drop\n")
            .expect("write");
        let line = String::from_utf8(log.0).expect("utf8");
        assert!(!line.contains("WMW11DJ04N2T00001"), "{line}");
        assert!(
            line.contains("vin:redacted.car") && line.contains("router-drop"),
            "{line}"
        );
    }
}
