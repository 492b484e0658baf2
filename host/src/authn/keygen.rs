//! `postern dkim keygen`: a new DKIM key pair, the private key written to a
//! file only its owner can read, the public key as the TXT record to publish.

use std::io::Write;
use std::path::Path;

use base64::Engine as _;
use mail_auth::dkim::generate::DkimKeyPair;

use super::sign::MIN_RSA_BITS;
use super::Error;

/// The algorithm of a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// rsa-sha256, with this many bits.
    Rsa(usize),
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
}

/// A key written to disk and its record.
#[derive(Debug)]
pub struct Generated {
    /// The record's name, `<selector>._domainkey.<domain>`.
    pub name: String,
    /// The record's value, e.g. `v=DKIM1; k=rsa; p=...`.
    pub record: String,
}

impl Generated {
    /// The record in zone-file form, split into strings of at most 255
    /// octets (RFC 1035 3.3), as DNS requires for long TXT records.
    pub fn zone_line(&self) -> String {
        let strings: Vec<String> = self
            .record
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        format!("{}. IN TXT ( {} )", self.name, strings.join(" "))
    }
}

/// Makes a key pair, writes the private key as PEM to `out` (mode 0600,
/// never over an existing file) and returns the record to publish.
pub fn keygen(
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
    out: &Path,
) -> Result<Generated, Error> {
    let bad = |message: String| Error::Key {
        path: out.to_path_buf(),
        message,
    };
    let (pem, public, k) = match algorithm {
        Algorithm::Rsa(bits) => {
            if bits < MIN_RSA_BITS {
                return Err(bad(format!("RSA keys need at least {MIN_RSA_BITS} bits")));
            }
            let pair = DkimKeyPair::generate_rsa(bits).map_err(|e| bad(e.to_string()))?;
            (
                pem_encode("RSA PRIVATE KEY", pair.private_key()),
                rsa_spki(pair.public_key()),
                "rsa",
            )
        }
        Algorithm::Ed25519 => {
            let pair = DkimKeyPair::generate_ed25519().map_err(|e| bad(e.to_string()))?;
            // RFC 8463 publishes the bare 32-octet key.
            (
                pem_encode("PRIVATE KEY", pair.private_key()),
                pair.public_key().to_vec(),
                "ed25519",
            )
        }
    };
    write_private(out, pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(public);
    Ok(Generated {
        name: format!(
            "{selector}._domainkey.{}",
            domain.trim_end_matches('.').to_ascii_lowercase()
        ),
        record: format!("v=DKIM1; k={k}; p={b64}"),
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// PEM armour around DER, 64 characters a line.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A PKCS#1 `RSAPublicKey` wrapped as the `SubjectPublicKeyInfo` that DKIM
/// key records carry (what `openssl rsa -pubout` prints).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = body.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|&b| b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend_from_slice(&bytes);
        }
        out.extend_from_slice(body);
        out
    }
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }
    const RSA_ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut body = RSA_ALGORITHM.to_vec();
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::sign::{load_key, rsa_modulus_bits, Key};

    #[test]
    fn keys_load_back_and_records_split() {
        let dir = tempfile::tempdir().unwrap();
        let rsa = dir.path().join("rsa.pem");
        let g = keygen("Example.TEST", "s1", Algorithm::Rsa(2048), &rsa).unwrap();
        assert_eq!(g.name, "s1._domainkey.example.test");
        assert!(
            g.record
                .starts_with("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A"),
            "{}",
            g.record
        );
        let line = g.zone_line();
        let strings: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert!(
            strings.len() >= 2 && strings.iter().all(|s| s.len() <= 255),
            "{line}"
        );
        assert_eq!(strings.concat(), g.record);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&rsa).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let Key::Rsa(k) = load_key(&rsa).unwrap() else {
            panic!("not RSA")
        };
        assert_eq!(rsa_modulus_bits(k.public_key()), Some(2048));
        assert!(
            keygen("example.test", "s1", Algorithm::Rsa(2048), &rsa).is_err(),
            "overwrote a key"
        );
        assert!(keygen(
            "example.test",
            "s2",
            Algorithm::Rsa(1024),
            &dir.path().join("small.pem")
        )
        .is_err());

        let ed = dir.path().join("ed.pem");
        let g = keygen("example.test", "e1", Algorithm::Ed25519, &ed).unwrap();
        assert!(g.record.starts_with("v=DKIM1; k=ed25519; p="));
        assert_eq!(g.record.len(), "v=DKIM1; k=ed25519; p=".len() + 44);
        assert!(matches!(load_key(&ed).unwrap(), Key::Ed25519(_)));
    }
}
