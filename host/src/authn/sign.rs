//! Outbound DKIM signing (RFC 6376, RFC 8463): per sender domain, with
//! every key of that domain (dual signing with RSA and Ed25519), keys read
//! from PEM files and read again when the files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mail_auth::common::crypto::{Algorithm, Ed25519Key, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use super::config::{DkimConfig, DkimKeyConfig};
use super::header::{field_name, fields};
use super::Error;

/// The smallest RSA key the relay signs with (RFC 8301 3.2).
pub const MIN_RSA_BITS: usize = 2048;
/// How often key files are looked at for changes, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// An RSA private key, signing with ring (RSASSA-PKCS1-v1_5 with SHA-256),
/// the library rustls already uses: its assembly signs a message about
/// three times faster than mail-auth's pure-Rust RSA.
pub struct RsaKey {
    pair: ring::signature::RsaKeyPair,
    rng: ring::rand::SystemRandom,
}

impl RsaKey {
    /// Reads a PKCS#1 or PKCS#8 DER key.
    fn from_der(der: &PrivateKeyDer<'_>) -> Result<RsaKey, String> {
        use ring::signature::RsaKeyPair;
        let pair = match der {
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            _ => return Err("not an RSA key".into()),
        };
        let pair = pair.map_err(|e| match e.to_string().as_str() {
            "TooSmall" => format!(
                "an RSA key of fewer than {MIN_RSA_BITS} bits; DKIM needs at least {MIN_RSA_BITS}"
            ),
            other => format!("not a usable RSA key: {other}"),
        })?;
        Ok(RsaKey {
            pair,
            rng: ring::rand::SystemRandom::new(),
        })
    }

    /// The public key, DER `RSAPublicKey` (PKCS#1), as DKIM publishes it.
    pub fn public_key(&self) -> &[u8] {
        self.pair.public().as_ref()
    }
}

impl SigningKey for RsaKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        let mut data = Vec::with_capacity(256);
        input.write(&mut data);
        let mut signature = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &self.rng,
                &data,
                &mut signature,
            )
            .map_err(|e| {
                mail_auth::Error::Crypto(mail_auth::common::crypto::CryptoError::Library(
                    e.to_string(),
                ))
            })?;
        Ok(signature)
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::RsaSha256
    }
}

/// A private key the relay signs with.
pub enum Key {
    /// rsa-sha256.
    Rsa(RsaKey),
    /// ed25519-sha256.
    Ed25519(Ed25519Key),
}

impl SigningKey for Key {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        match self {
            Key::Rsa(k) => k.sign(input),
            Key::Ed25519(k) => k.sign(input),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Key::Rsa(k) => k.algorithm(),
            Key::Ed25519(k) => k.algorithm(),
        }
    }
}

impl Key {
    /// The algorithm's name in a DKIM key record (`k=`).
    pub fn kind(&self) -> &'static str {
        match self {
            Key::Rsa(_) => "rsa",
            Key::Ed25519(_) => "ed25519",
        }
    }
}

/// Reads a PEM private key: RSA (PKCS#1 or PKCS#8, 2048 bits and up) or
/// Ed25519 (PKCS#8).
pub fn load_key(path: &Path) -> Result<Key, Error> {
    let bad = |message: String| Error::Key {
        path: path.to_path_buf(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| bad(format!("not a PEM private key: {e}")))?;
    let key = match &der {
        PrivateKeyDer::Pkcs8(p8) => match Ed25519Key::from_pkcs8_der(p8.secret_pkcs8_der()) {
            Ok(k) => Key::Ed25519(k),
            Err(_) => Key::Rsa(
                RsaKey::from_der(&der)
                    .map_err(|e| bad(format!("neither an Ed25519 nor an RSA key: {e}")))?,
            ),
        },
        PrivateKeyDer::Pkcs1(_) => Key::Rsa(RsaKey::from_der(&der).map_err(bad)?),
        _ => return Err(bad("only RSA and Ed25519 keys can sign DKIM".into())),
    };
    if let Key::Rsa(rsa) = &key {
        let bits = rsa_modulus_bits(rsa.public_key()).unwrap_or(0);
        if bits < MIN_RSA_BITS {
            return Err(bad(format!(
                "an RSA key of {bits} bits; DKIM needs at least {MIN_RSA_BITS}"
            )));
        }
    }
    Ok(key)
}

/// The size of the modulus of a DER `RSAPublicKey` (PKCS#1).
pub fn rsa_modulus_bits(der: &[u8]) -> Option<usize> {
    fn item(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = der.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (&rest[..len], &rest[len..]))
    }
    let (seq, _) = item(der, 0x30)?;
    let (n, _) = item(seq, 0x02)?;
    let start = n.iter().position(|&b| b != 0)?;
    let n = &n[start..];
    Some(n.len() * 8 - n[0].leading_zeros() as usize)
}

/// A private key and the file it was read from, read again when the file
/// changes (a renewal tool replacing it by rename or in place).
pub struct KeyFile {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    key: Arc<Key>,
}

impl KeyFile {
    /// Reads the key at `path`.
    pub fn load(path: PathBuf) -> Result<KeyFile, Error> {
        let key = load_key(&path)?;
        Ok(KeyFile {
            stamp: stamp(&path),
            path,
            key: Arc::new(key),
        })
    }

    /// The key as last read.
    pub fn key(&self) -> Arc<Key> {
        self.key.clone()
    }

    /// Reads the file again if it changed since it was last read. A file
    /// that no longer loads keeps the key it had, with a warning; `what`
    /// names the key in the log.
    pub fn reload_changed(&mut self, what: &str) {
        let now = stamp(&self.path);
        if now.is_none() || now == self.stamp {
            return;
        }
        self.stamp = now;
        match load_key(&self.path) {
            Ok(key) => {
                tracing::info!(key = what, path = %self.path.display(), "key reloaded");
                self.key = Arc::new(key);
            }
            Err(e) => {
                tracing::warn!(key = what, error = %e, "key file changed but does not load; the previous key stays in use");
            }
        }
    }
}

/// Lets a file be looked at for changes at most once a [`RECHECK`].
pub struct Recheck(Mutex<Instant>);

impl Recheck {
    /// Starts counting now.
    pub fn new() -> Recheck {
        Recheck(Mutex::new(Instant::now()))
    }

    /// True once a [`RECHECK`] has passed since it was last true.
    pub fn due(&self) -> bool {
        let mut checked = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if checked.elapsed() < RECHECK {
            return false;
        }
        *checked = Instant::now();
        true
    }
}

impl Default for Recheck {
    fn default() -> Recheck {
        Recheck::new()
    }
}

/// One configured key.
struct Slot {
    /// Lowercase domain.
    domain: String,
    selector: String,
    subdomains: bool,
    file: KeyFile,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Signs outbound mail; shared by the sessions and delivery (for DSNs).
pub struct Signer {
    /// `h=` as given to the signer: the signed headers, then the over-signed
    /// ones again, so each is listed once more than it occurs.
    headers: Vec<String>,
    header_canon: Canonicalization,
    body_canon: Canonicalization,
    slots: Mutex<Vec<Slot>>,
    checked: Recheck,
}

/// Parses `relaxed/relaxed`, `simple/simple`, `relaxed` (for both) and the like.
pub fn parse_canonicalization(s: &str) -> Result<(Canonicalization, Canonicalization), String> {
    let one = |c: &str| match c {
        "relaxed" => Ok(Canonicalization::Relaxed),
        "simple" => Ok(Canonicalization::Simple),
        _ => Err(format!(
            "{s:?}: expected relaxed/relaxed, relaxed/simple, simple/relaxed or simple/simple"
        )),
    };
    match s.split_once('/') {
        Some((h, b)) => Ok((one(h)?, one(b)?)),
        None => Ok((one(s)?, Canonicalization::Simple)),
    }
}

impl Signer {
    /// Loads every key of `[dkim]`; `resolve` makes the paths absolute.
    pub fn new(config: &DkimConfig, resolve: impl Fn(&Path) -> PathBuf) -> Result<Signer, Error> {
        let (header_canon, body_canon) =
            parse_canonicalization(&config.canonicalization).map_err(Error::Config)?;
        let mut slots = Vec::new();
        for k in &config.keys {
            slots.push(slot(k, &resolve)?);
        }
        let mut headers = config.headers.clone();
        headers.extend(config.oversign.iter().cloned());
        Ok(Signer {
            headers,
            header_canon,
            body_canon,
            slots: Mutex::new(slots),
            checked: Recheck::new(),
        })
    }

    /// True when some key is configured.
    pub fn is_enabled(&self) -> bool {
        !self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Reads again the key files that changed since they were last read.
    /// A file that no longer loads keeps the key it had, with a warning.
    pub fn reload_changed(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for s in slots.iter_mut() {
            let what = format!("DKIM {}/{}", s.domain, s.selector);
            s.file.reload_changed(&what);
        }
    }

    fn maybe_reload(&self) {
        if self.checked.due() {
            self.reload_changed();
        }
    }

    /// The keys that sign for `domain`: its own, else those of the nearest
    /// parent configured with `subdomains = true`.
    fn keys_for(&self, domain: &str) -> Vec<(String, String, Arc<Key>)> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut candidate = domain.as_str();
        let mut exact = true;
        loop {
            let found: Vec<_> = slots
                .iter()
                .filter(|s| s.domain == candidate && (exact || s.subdomains))
                .map(|s| (s.domain.clone(), s.selector.clone(), s.file.key()))
                .collect();
            if !found.is_empty() {
                return found;
            }
            match candidate.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => {
                    candidate = parent;
                    exact = false;
                }
                _ => return Vec::new(),
            }
        }
    }

    /// The `DKIM-Signature:` fields for `message`, one per key of its
    /// `From:` domain; empty when no key applies. Errors are logged: an
    /// unsigned message still goes out.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let Some(domain) = from_domain(message) else {
            return Vec::new();
        };
        self.sign_as(&domain, message)
    }

    /// As [`Signer::sign`], for the keys of `domain`.
    pub fn sign_as(&self, domain: &str, message: &[u8]) -> Vec<u8> {
        self.maybe_reload();
        let mut out = Vec::new();
        for (d, selector, key) in self.keys_for(domain) {
            match self.sign_with(&key, &d, &selector, message) {
                Ok(header) => out.extend_from_slice(header.as_bytes()),
                Err(e) => {
                    tracing::warn!(domain = %d, selector = %selector, error = %e, "DKIM signing failed; sent without this signature")
                }
            }
        }
        out
    }

    fn sign_with(
        &self,
        key: &Key,
        domain: &str,
        selector: &str,
        message: &[u8],
    ) -> mail_auth::Result<String> {
        // The key is borrowed into a signer per message: signers own their key.
        let signer = DkimSigner::from_key(BorrowedKey(key))
            .domain(domain)
            .selector(selector)
            .headers(self.headers.iter().cloned())
            .header_canonicalization(self.header_canon)
            .body_canonicalization(self.body_canon);
        Ok(signer.sign(message)?.to_header())
    }
}

/// A signing key used by reference.
pub struct BorrowedKey<'a, K>(pub &'a K);

impl<K: SigningKey> SigningKey for BorrowedKey<'_, K> {
    type Hasher = K::Hasher;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

fn slot(k: &DkimKeyConfig, resolve: &impl Fn(&Path) -> PathBuf) -> Result<Slot, Error> {
    Ok(Slot {
        domain: k.domain.trim_end_matches('.').to_ascii_lowercase(),
        selector: k.selector.clone(),
        subdomains: k.subdomains,
        file: KeyFile::load(resolve(&k.key))?,
    })
}

/// The domain of the (first) `From:` address, lowercase.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let field = fields(message)
        .into_iter()
        .map(|(s, e)| &message[s..e])
        .find(|f| field_name(f).is_some_and(|n| n.eq_ignore_ascii_case(b"From")))?;
    let parsed = mail_parser::MessageParser::new().parse_headers(field)?;
    let addr = parsed.from()?.first()?.address()?;
    let domain = addr
        .rsplit_once('@')?
        .1
        .trim_end_matches('>')
        .to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}
