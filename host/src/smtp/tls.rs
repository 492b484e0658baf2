//! Inbound TLS: a rustls server config from the listener's PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsVersion;
use crate::envelope::TlsInfo;

/// Errors loading a certificate or key; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unreadable or not PEM.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Certificate and key do not make a valid config.
    #[error("certificate {cert} with key {key}: {source}")]
    Config {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
}

/// Builds an acceptor from a PEM certificate chain and private key, for
/// TLS 1.2 and 1.3.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, Error> {
    acceptor_from(cert, key, TlsVersion::Tls12)
}

/// Builds an acceptor that allows `min` and newer versions.
pub fn acceptor_from(cert: &Path, key: &Path, min: TlsVersion) -> Result<TlsAcceptor, Error> {
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls_pki_types::pem::Error| Error::Pem {
            path,
            message: e.to_string(),
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(pem_err(cert))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(cert))?;
    if certs.is_empty() {
        return Err(Error::Pem {
            path: cert.into(),
            message: "no certificate found".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(min.versions())
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
        .map_err(|source| Error::Config {
            cert: cert.into(),
            key: key.into(),
            source,
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Version and cipher of an established server-side connection.
pub fn info(conn: &rustls::ServerConnection) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "unknown".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| s.suite().as_str().unwrap_or("unknown").to_string())
        .unwrap_or_else(|| "unknown".into());
    TlsInfo { version, cipher }
}
