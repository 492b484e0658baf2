//! Destinations the operator suspended (`postern queue suspend --domain D
//! [--for 2h]`): no delivery to a recipient in such a domain starts until
//! it is resumed or the time is up, whether the mail was queued before or
//! arrives later. It is checked when a message is taken in and again right
//! before each message goes on a connection (one already sending finishes).
//! Kept in `suspended.json` in the spool folder, so a restart
//! keeps them; written whole to a temporary file, fsynced and renamed.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::queue::Error;

/// The file's name in the spool folder.
pub const FILE: &str = "suspended.json";

/// One suspended domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// The recipient domain, lowercase.
    pub domain: String,
    /// Seconds since the epoch when it ends by itself; none: until resumed.
    pub until: Option<u64>,
}

/// Every suspension, by domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Suspensions {
    domains: BTreeMap<String, Option<u64>>,
}

impl Suspensions {
    /// Reads `suspended.json` from a spool folder; none when it is absent.
    pub fn load(spool_root: &Path) -> Result<Suspensions, Error> {
        let path = spool_root.join(FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Suspensions::default()),
            Err(source) => return Err(Error::Io { path, source }),
        };
        let list: Vec<Suspension> = serde_json::from_slice(&text).map_err(|e| Error::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Suspensions {
            domains: list.into_iter().map(|s| (s.domain, s.until)).collect(),
        })
    }

    /// Writes the list durably.
    pub fn save(&self, spool_root: &Path) -> Result<(), Error> {
        let path = spool_root.join(FILE);
        let tmp: PathBuf = spool_root.join(format!("{FILE}.tmp"));
        let text = serde_json::to_vec_pretty(&self.list(0)).unwrap_or_default();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&text).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        fs::File::open(spool_root)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }

    /// Suspends `domain` until `until` (seconds since the epoch) or resumed.
    pub fn suspend(&mut self, domain: &str, until: Option<u64>) {
        self.domains.insert(domain.to_ascii_lowercase(), until);
    }

    /// Lifts the suspension of `domain`; false when it was not suspended.
    pub fn resume(&mut self, domain: &str) -> bool {
        self.domains.remove(&domain.to_ascii_lowercase()).is_some()
    }

    /// When delivery to `domain` may start again: `None` if it may now,
    /// `Some(None)` when only a resume lifts it, `Some(Some(t))` at `t`.
    pub fn blocks(&self, domain: &str, now: u64) -> Option<Option<u64>> {
        if self.domains.is_empty() {
            return None;
        }
        let until = *self.domains.get(&domain.to_ascii_lowercase())?;
        match until {
            Some(t) if t <= now => None,
            u => Some(u),
        }
    }

    /// The suspensions still in force at `now` (all of them with `now` 0).
    pub fn list(&self, now: u64) -> Vec<Suspension> {
        self.domains
            .iter()
            .filter(|(_, u)| now == 0 || u.is_none_or(|t| t > now))
            .map(|(d, u)| Suspension {
                domain: d.clone(),
                until: *u,
            })
            .collect()
    }

    /// True when nothing is suspended.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspensions_end_by_time_or_resume_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Suspensions::load(dir.path()).unwrap();
        assert!(s.is_empty());
        s.suspend("Example.COM", None);
        s.suspend("timed.test", Some(1000));
        assert_eq!(s.blocks("example.com", 5000), Some(None));
        assert_eq!(s.blocks("timed.test", 999), Some(Some(1000)));
        assert_eq!(s.blocks("timed.test", 1000), None);
        assert_eq!(s.blocks("other.test", 0), None);
        s.save(dir.path()).unwrap();
        let mut again = Suspensions::load(dir.path()).unwrap();
        assert_eq!(again, s);
        assert_eq!(again.list(2000).len(), 1, "the timed one is over");
        assert!(again.resume("EXAMPLE.com"));
        assert!(!again.resume("example.com"));
        std::fs::write(dir.path().join(FILE), "{").unwrap();
        assert!(matches!(
            Suspensions::load(dir.path()),
            Err(Error::Damaged { .. })
        ));
    }
}
