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
    tallies: Arc<Mutex<HashMap<IpAddr, Tally>>>,
    max_failures: u32,
    window: Duration,
}

/// One client address's failed attempts.
#[derive(Debug)]
struct Tally {
    /// Failures since the last success, within the window.
    failures: u32,
    /// Attempts being checked now: they count against the limit as if they
    /// had failed, so many connections guessing at once get no more tries
    /// than one connection guessing in turn.
    checking: u32,
    /// The last failure.
    last: Instant,
}

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The password is right.
    Ok,
    /// Wrong user or password.
    Failed,
    /// The client reached the failure limit: nothing was checked.
    Throttled,
}

/// Past this many client addresses with failures, those whose window is
/// over are dropped, so guesses from many addresses cannot grow the table
/// without end.
const PRUNE_AT: usize = 10_000;

impl Authenticator {
    /// Builds from the config (hashes were checked when the config was
    /// loaded): `max_failures` failed attempts from one client address
    /// lock it out until `window` has passed since its last failure.
    pub fn new(users: &[UserConfig], max_failures: usize, window: Duration) -> Authenticator {
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
            tallies: Arc::default(),
            max_failures: max_failures.max(1) as u32,
            window,
        }
    }

    /// True when any user is configured (AUTH is advertised only then).
    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    fn tallies(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Tally>> {
        self.tallies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while a client is locked out after too many failures (or has as
    /// many attempts being checked).
    pub fn is_throttled(&self, ip: IpAddr) -> bool {
        let mut tallies = self.tallies();
        match tallies.get_mut(&ip) {
            Some(t) => self.spent(t),
            None => false,
        }
    }

    /// Whether `t` has used up its attempts; a window over forgets its failures.
    fn spent(&self, t: &mut Tally) -> bool {
        if t.failures > 0 && t.last.elapsed() > self.window {
            t.failures = 0;
        }
        t.failures + t.checking >= self.max_failures
    }

    /// Checks credentials, unless the client is throttled. The hash runs on
    /// the blocking pool (argon2 takes tens of milliseconds of CPU on
    /// purpose); an unknown user costs the same as a wrong password so
    /// timing does not reveal which names exist.
    pub async fn check(&self, ip: IpAddr, user: &str, password: &str) -> Checked {
        let Some(attempt) = self.reserve(ip) else {
            return Checked::Throttled;
        };
        let ok = self.verify(user, password).await;
        attempt.settle(ok);
        if ok {
            Checked::Ok
        } else {
            Checked::Failed
        }
    }

    /// Counts an attempt as being checked, if the client has one left.
    fn reserve(&self, ip: IpAddr) -> Option<Attempt<'_>> {
        let mut tallies = self.tallies();
        if tallies.len() >= PRUNE_AT {
            let window = self.window;
            tallies.retain(|_, t| t.checking > 0 || t.last.elapsed() <= window);
        }
        let t = tallies.entry(ip).or_insert(Tally {
            failures: 0,
            checking: 0,
            last: Instant::now(),
        });
        if self.spent(t) {
            return None;
        }
        t.checking += 1;
        Some(Attempt {
            auth: self,
            ip,
            settled: false,
        })
    }

    async fn verify(&self, user: &str, password: &str) -> bool {
        let stored = self.users.get(user).cloned();
        let password = password.to_string();
        tokio::task::spawn_blocking(move || match stored {
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
        .unwrap_or(false)
    }
}

/// An attempt being checked; one dropped unsettled (its session went away
/// meanwhile) counts as a failure.
struct Attempt<'a> {
    auth: &'a Authenticator,
    ip: IpAddr,
    settled: bool,
}

impl Attempt<'_> {
    fn settle(mut self, ok: bool) {
        self.record(ok);
    }

    fn record(&mut self, ok: bool) {
        self.settled = true;
        let mut tallies = self.auth.tallies();
        let Some(t) = tallies.get_mut(&self.ip) else {
            return;
        };
        t.checking = t.checking.saturating_sub(1);
        if ok {
            t.failures = 0;
        } else {
            t.failures += 1;
            t.last = Instant::now();
        }
        if t.failures == 0 && t.checking == 0 {
            tallies.remove(&self.ip);
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.record(false);
        }
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
        let auth = Authenticator::new(&users, 2, Duration::from_millis(300));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(auth.check(ip, "alice", "wonderland").await, Checked::Ok);
        assert_eq!(auth.check(ip, "bob", "builder").await, Checked::Ok);
        assert!(!auth.is_throttled(ip));
        assert_eq!(auth.check(ip, "alice", "wrong").await, Checked::Failed);
        assert_eq!(auth.check(ip, "mallory", "x").await, Checked::Failed);
        assert!(auth.is_throttled(ip));
        // Throttled, even the right password is not checked.
        assert_eq!(
            auth.check(ip, "alice", "wonderland").await,
            Checked::Throttled
        );
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!auth.is_throttled(other));
        // Attempts in flight count: of five at once, two are checked.
        let guess = || auth.check(other, "alice", "guess");
        let (a, b, c, d, e) = tokio::join!(guess(), guess(), guess(), guess(), guess());
        let mut answers = [a, b, c, d, e];
        answers.sort_by_key(|c| *c as u8);
        assert_eq!(
            answers,
            [
                Checked::Failed,
                Checked::Failed,
                Checked::Throttled,
                Checked::Throttled,
                Checked::Throttled
            ]
        );
        // The window over, the client may try again.
        std::thread::sleep(Duration::from_millis(350));
        assert!(!auth.is_throttled(ip));
        assert_eq!(auth.check(ip, "alice", "wonderland").await, Checked::Ok);
    }

    #[test]
    fn only_phc_hashes_are_accepted() {
        assert!(parse_hash(&hash_password("x")).is_ok());
        assert!(parse_hash("plaintext").is_err());
        assert!(parse_hash("$argon2id$garbage").is_err());
    }
}
