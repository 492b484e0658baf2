//! SMTP AUTH: users from `[[user]]` with argon2 or bcrypt PHC hashes, checked
//! off the async runtime, and a per-client throttle on failed attempts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::config::UserConfig;

/// How a stored hash is checked.
#[derive(Debug, Clone)]
enum StoredHash {
    /// `$argon2id$...` (or argon2i/argon2d).
    Argon2(String),
    /// `$2b$...` (or 2a/2y).
    Bcrypt(String),
}

/// Recognises a PHC string the relay can verify.
pub fn parse_hash(s: &str) -> Result<(), String> {
    stored_hash(s).map(|_| ())
}

fn stored_hash(s: &str) -> Result<StoredHash, String> {
    if s.starts_with("$argon2") {
        let parsed = PasswordHash::new(s).map_err(|e| e.to_string())?;
        if parsed.salt.is_none() || parsed.hash.is_none() {
            return Err("argon2 hash without salt or hash value".into());
        }
        Ok(StoredHash::Argon2(s.to_string()))
    } else if s.starts_with("$2a$") || s.starts_with("$2b$") || s.starts_with("$2y$") {
        Ok(StoredHash::Bcrypt(s.to_string()))
    } else {
        Err("not an argon2 or bcrypt hash".into())
    }
}

/// Hashes a password for `[[user]] password_hash` (argon2id, random salt).
pub fn hash_password(password: &str) -> String {
    let salt =
        SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16 bytes is a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default params")
        .to_string()
}

/// The configured users and the failure throttle.
#[derive(Debug, Clone)]
pub struct Authenticator {
    users: Arc<HashMap<String, StoredHash>>,
    failures: Arc<Mutex<HashMap<IpAddr, (u32, Instant)>>>,
    max_failures: u32,
}

/// How long a client that reached the failure limit must wait.
const THROTTLE_WINDOW: Duration = Duration::from_secs(300);

impl Authenticator {
    /// Builds from the config (hashes were checked when the config was loaded).
    pub fn new(users: &[UserConfig], max_failures: usize) -> Authenticator {
        let users = users
            .iter()
            .filter_map(|u| {
                stored_hash(&u.password_hash)
                    .ok()
                    .map(|h| (u.name.clone(), h))
            })
            .collect();
        Authenticator {
            users: Arc::new(users),
            failures: Arc::default(),
            max_failures: max_failures.max(1) as u32,
        }
    }

    /// True when any user is configured (AUTH is advertised only then).
    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// True while a client is locked out after too many failures.
    pub fn is_throttled(&self, ip: IpAddr) -> bool {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match failures.get(&ip) {
            Some((_, since)) if since.elapsed() > THROTTLE_WINDOW => {
                failures.remove(&ip);
                false
            }
            Some((n, _)) => *n >= self.max_failures,
            None => false,
        }
    }

    /// Checks credentials. The hash runs on the blocking pool (argon2 takes tens
    /// of milliseconds of CPU on purpose); an unknown user costs the same as a
    /// wrong password so timing does not reveal which names exist.
    pub async fn verify(&self, ip: IpAddr, user: &str, password: &str) -> bool {
        let stored = self.users.get(user).cloned();
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || match stored {
            Some(StoredHash::Argon2(h)) => PasswordHash::new(&h)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false),
            Some(StoredHash::Bcrypt(h)) => bcrypt::verify(&password, &h).unwrap_or(false),
            None => {
                let _ = Argon2::default().hash_password(
                    password.as_bytes(),
                    &SaltString::encode_b64(&[0u8; 16]).expect("salt"),
                );
                false
            }
        })
        .await
        .unwrap_or(false);
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            failures.remove(&ip);
        } else {
            let entry = failures.entry(ip).or_insert((0, Instant::now()));
            entry.0 += 1;
            entry.1 = Instant::now();
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn argon2_and_bcrypt_verify_and_failures_throttle() {
        let users = vec![
            UserConfig {
                name: "alice".into(),
                password_hash: hash_password("wonderland"),
            },
            UserConfig {
                name: "bob".into(),
                password_hash: bcrypt::hash("builder", 4).unwrap(),
            },
        ];
        let auth = Authenticator::new(&users, 2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(auth.verify(ip, "alice", "wonderland").await);
        assert!(auth.verify(ip, "bob", "builder").await);
        assert!(!auth.is_throttled(ip));
        assert!(!auth.verify(ip, "alice", "wrong").await);
        assert!(!auth.verify(ip, "mallory", "x").await);
        assert!(auth.is_throttled(ip));
        assert!(!auth.is_throttled("192.0.2.2".parse().unwrap()));
    }

    #[test]
    fn only_phc_hashes_are_accepted() {
        assert!(parse_hash(&hash_password("x")).is_ok());
        assert!(parse_hash("plaintext").is_err());
        assert!(parse_hash("$argon2id$garbage").is_err());
    }
}
