//! A self-signed certificate made for each test, written as PEM files.

use std::path::{Path, PathBuf};

/// PEM files of a certificate for `localhost` and 127.0.0.1.
pub struct TestCert {
    /// Certificate (also the CA file clients trust).
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Generates a certificate into `dir`.
pub fn make_cert(dir: &Path) -> TestCert {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    TestCert { cert, key }
}
