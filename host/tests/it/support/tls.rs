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

/// A certificate authority made for a test, issuing server certificates.
pub struct TestCa {
    /// The CA certificate, PEM (what clients trust: `tls_ca`).
    pub path: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new CA, written as `dir/test-ca.pem`.
    pub fn new(dir: &Path) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        TestCa {
            path,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` signed by this CA, written as
    /// `dir/STEM-cert.pem` and `dir/STEM-key.pem`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> TestCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let out = TestCert {
            cert: dir.join(format!("{stem}-cert.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        };
        std::fs::write(&out.cert, cert.pem()).unwrap();
        std::fs::write(&out.key, key.serialize_pem()).unwrap();
        out
    }
}
