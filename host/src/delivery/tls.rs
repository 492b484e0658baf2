//! Outbound TLS configs. Two kinds: verified (certificate chain checked against
//! the system roots or `tls_ca`, and the name against SNI), used when a route
//! requires TLS, for `smtps://` and whenever credentials are to be sent; and
//! opportunistic (RFC 7435), used for STARTTLS towards MX hosts, where an
//! unauthenticated encrypted channel still beats clear text and refusing a
//! self-signed certificate would only push the mail back to clear text.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

/// The two client configs, built once.
#[derive(Clone)]
pub struct ClientTls {
    /// Chain and name verified.
    pub verified: Arc<ClientConfig>,
    /// Any certificate accepted (handshake signatures still checked).
    pub opportunistic: Arc<ClientConfig>,
    /// The TLS versions allowed (`delivery.tls_min_version` and newer).
    versions: &'static [&'static rustls::SupportedProtocolVersion],
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ClientTls {
    /// Builds both configs; `ca` replaces the system roots when given.
    pub fn new(ca: Option<&Path>, min: crate::config::TlsVersion) -> Result<ClientTls, String> {
        let versions = min.versions();
        let mut roots = RootCertStore::empty();
        match ca {
            Some(path) => {
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                {
                    let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("{}: no certificates", path.display()));
                }
            }
            None => {
                // A missing or partly unreadable system store leaves verified TLS
                // failing per message (and logged), not the relay refusing to start.
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::warn!(error = %e, "loading system CA certificates");
                }
                roots.add_parsable_certificates(found.certs);
            }
        }
        let verified = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let opportunistic = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth();
        Ok(ClientTls {
            verified: Arc::new(verified),
            opportunistic: Arc::new(opportunistic),
            versions,
        })
    }
}

/// Parses a certificate fingerprint as Postfix writes them:
/// `sha256:HEX`, hex in either case, colons optional.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let hex = s
        .strip_prefix("sha256:")
        .or_else(|| s.strip_prefix("SHA256:"))
        .ok_or_else(|| format!("{s:?}: expected \"sha256:HEX\""))?;
    let hex: String = hex.chars().filter(|&c| c != ':').collect();
    let bytes = hex::decode(&hex).map_err(|e| format!("{s:?}: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{s:?}: a SHA-256 fingerprint has 32 octets (64 hex digits)"))
}

/// `sha256:` and the colon-separated upper-case hex of a certificate's hash.
pub fn fingerprint(cert: &[u8]) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(cert);
    let hex: Vec<String> = hash.iter().map(|b| format!("{b:02X}")).collect();
    format!("sha256:{}", hex.join(":"))
}

impl ClientTls {
    /// A config that accepts exactly the certificates whose SHA-256
    /// fingerprint is in `pins` (Postfix's `fingerprint` level): no chain
    /// or name check, since pinning is what one does for a self-signed
    /// certificate; the handshake signatures are still checked.
    pub fn pinned(&self, pins: &[[u8; 32]]) -> Result<Arc<ClientConfig>, String> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(self.versions)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                pins: pins.to_vec(),
                any: AnyCertificate(provider()),
            }))
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// Accepts the certificates whose SHA-256 fingerprint is pinned.
#[derive(Debug)]
struct Pinned {
    pins: Vec<[u8; 32]>,
    any: AnyCertificate,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use sha2::Digest as _;
        let hash: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if self.pins.contains(&hash) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "certificate {} is not one of the pinned tls_fingerprint values",
            fingerprint(end_entity.as_ref())
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.any.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.any.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.any.supported_verify_schemes()
    }
}

/// Accepts any certificate but still checks that the server holds its key,
/// so the session is at least encrypted to whoever presented it.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_in_either_case_with_or_without_colons() {
        let hex = "0123456789abcdef".repeat(4);
        let colons: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).to_uppercase())
            .collect();
        let want = parse_fingerprint(&format!("sha256:{hex}")).unwrap();
        assert_eq!(want[0], 0x01);
        for s in [
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", colons.join(":")),
            format!("SHA256:{}", colons.join(":")),
        ] {
            assert_eq!(parse_fingerprint(&s), Ok(want), "{s}");
        }
        for bad in ["", "md5:00", "sha256:0g", "sha256:0011", hex.as_str()] {
            assert!(parse_fingerprint(bad).is_err(), "{bad}");
        }
        assert_eq!(fingerprint(b"").len(), 7 + 95);
    }

    #[test]
    fn config_errors_name_the_key() {
        let base = "[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery]\n";
        for (body, needle) in [
            ("tls_fingerprint = [\"sha256:zz\"]", "delivery.tls_fingerprint"),
            ("tls_min_version = \"1.1\"", "tls_min_version"),
            (
                "[delivery.routes]\n\"a.test\" = { next_hop = \"smtp://h:25\", tls_fingerprint = [\"sha1:00\"] }",
                "delivery.routes.a.test.tls_fingerprint",
            ),
        ] {
            let text = format!("{base}{body}\n");
            let err = crate::config::Config::parse(&text, std::path::Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }
}
