//! Inbound TLS: rustls server configs, with one certificate or with a
//! listener's [`Certificates`](crate::smtp::certs::Certificates).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsVersion;
use crate::envelope::TlsInfo;
use crate::smtp::certs::{load_pair, Pair};

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

/// Builds an acceptor with one certificate that allows `min` and newer
/// versions.
pub fn acceptor_from(cert: &Path, key: &Path, min: TlsVersion) -> Result<TlsAcceptor, Error> {
    let pair = Pair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
    };
    let certified = Arc::new(load_pair(&pair)?);
    acceptor_with(Arc::new(SingleCert(certified)), min).map_err(|source| Error::Config {
        cert: pair.cert,
        key: pair.key,
        source,
    })
}

/// Builds an acceptor whose certificate `resolver` picks per handshake (a
/// listener's [`Certificates`](crate::smtp::certs::Certificates)), allowing
/// `min` and newer versions.
pub fn acceptor_with(
    resolver: Arc<dyn ResolvesServerCert>,
    min: TlsVersion,
) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(min.versions())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// One certificate for every handshake.
#[derive(Debug)]
struct SingleCert(Arc<CertifiedKey>);

impl ResolvesServerCert for SingleCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
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
