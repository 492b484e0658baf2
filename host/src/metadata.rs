//! What plugins remember about a session or a message. Instances are lent per
//! hook call, so nothing a plugin learns at one hook survives in its memory to
//! the next: it leaves values here instead, each under its own name.
//!
//! Two scopes: the session's values live as long as the connection; the
//! transaction's, from MAIL FROM until the message is queued, and then in the
//! spool record with the envelope (fsynced with it, read back at delivery,
//! also after a restart).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// Values by plugin name, then key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Metadata(BTreeMap<String, BTreeMap<String, String>>);

/// A write that would take the values past their limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("metadata past its limit of {limit} bytes")]
pub struct TooLarge {
    /// The limit, in bytes.
    pub limit: usize,
}

impl Metadata {
    /// True when no plugin has a value.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `plugin`'s value for `key`.
    pub fn get(&self, plugin: &str, key: &str) -> Option<&str> {
        self.0.get(plugin)?.get(key).map(String::as_str)
    }

    /// `plugin`'s keys, in order.
    pub fn keys(&self, plugin: &str) -> Vec<String> {
        self.0
            .get(plugin)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every value: (plugin, key, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.0.iter().flat_map(|(p, m)| {
            m.iter()
                .map(move |(k, v)| (p.as_str(), k.as_str(), v.as_str()))
        })
    }

    /// Bytes the values take, as the limit counts them: each plugin name,
    /// key and value.
    pub fn size(&self) -> usize {
        self.0
            .iter()
            .map(|(p, m)| p.len() + m.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>())
            .sum()
    }

    /// Sets `plugin`'s value for `key`, unless the values would then take
    /// more than `limit` bytes.
    pub fn set(
        &mut self,
        plugin: &str,
        key: &str,
        value: &str,
        limit: usize,
    ) -> Result<(), TooLarge> {
        let old = self.get(plugin, key);
        let grows = match old {
            Some(old) => value.len().saturating_sub(old.len()),
            None => {
                key.len()
                    + value.len()
                    + if self.0.contains_key(plugin) {
                        0
                    } else {
                        plugin.len()
                    }
            }
        };
        if grows > 0 && self.size() + grows > limit {
            return Err(TooLarge { limit });
        }
        self.0
            .entry(plugin.to_string())
            .or_default()
            .insert(key.to_string(), value.to_string());
        Ok(())
    }

    /// Removes `plugin`'s value for `key`; returns whether there was one.
    pub fn remove(&mut self, plugin: &str, key: &str) -> bool {
        let Some(m) = self.0.get_mut(plugin) else {
            return false;
        };
        let had = m.remove(key).is_some();
        if m.is_empty() {
            self.0.remove(plugin);
        }
        had
    }
}

/// One scope's values while plugins may change them: shared by the hooks of
/// a session (or transaction), with the limit they may grow to.
#[derive(Debug, Clone)]
pub struct SharedMetadata {
    values: Arc<Mutex<Metadata>>,
    limit: usize,
}

impl SharedMetadata {
    /// Empty values that may grow to `limit` bytes.
    pub fn new(limit: usize) -> SharedMetadata {
        SharedMetadata::from_values(Metadata::default(), limit)
    }

    /// These values, which may grow to `limit` bytes.
    pub fn from_values(values: Metadata, limit: usize) -> SharedMetadata {
        SharedMetadata {
            values: Arc::new(Mutex::new(values)),
            limit,
        }
    }

    /// The values, locked.
    pub fn lock(&self) -> MutexGuard<'_, Metadata> {
        self.values.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A copy of the values now.
    pub fn snapshot(&self) -> Metadata {
        self.lock().clone()
    }

    /// A separate copy that may change without changing these (a shadow
    /// plugin's, whose writes are discarded).
    pub fn fork(&self) -> SharedMetadata {
        SharedMetadata::from_values(self.snapshot(), self.limit)
    }
}

/// A hook's access to one scope.
#[derive(Debug, Clone)]
pub enum Access {
    /// The plugins may write their values.
    Writable(SharedMetadata),
    /// The message is queued: the values are what was stored with it.
    ReadOnly(Arc<Metadata>),
}

impl Access {
    /// Runs `f` on the values.
    pub fn read<R>(&self, f: impl FnOnce(&Metadata) -> R) -> R {
        match self {
            Access::Writable(m) => f(&m.lock()),
            Access::ReadOnly(m) => f(m),
        }
    }

    /// A copy whose writes change nothing here (for a shadow plugin).
    pub fn fork(&self) -> Access {
        match self {
            Access::Writable(m) => Access::Writable(m.fork()),
            Access::ReadOnly(m) => Access::ReadOnly(m.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_plugin_has_its_own_keys_within_one_limit() {
        let mut m = Metadata::default();
        m.set("router", "class", "bulk", 64).unwrap();
        m.set("dlp", "class", "secret", 64).unwrap();
        assert_eq!(m.get("router", "class"), Some("bulk"));
        assert_eq!(m.get("dlp", "class"), Some("secret"));
        assert_eq!(m.keys("router"), vec!["class"]);
        // router(6) + class(5) + bulk(4) + dlp(3) + class(5) + secret(6)
        assert_eq!(m.size(), 29);
        // A value that would pass the limit is refused and changes nothing.
        assert_eq!(
            m.set("router", "note", &"x".repeat(40), 64),
            Err(TooLarge { limit: 64 })
        );
        assert_eq!(m.get("router", "note"), None);
        assert_eq!(m.size(), 29);
        // Replacing a value with a shorter one always fits.
        m.set("dlp", "class", "s", 29).unwrap();
        assert_eq!(m.size(), 24);
        assert!(m.remove("dlp", "class"));
        assert!(!m.remove("dlp", "class"));
        assert_eq!(m.get("dlp", "class"), None);
        assert_eq!(m.size(), 15);
    }

    #[test]
    fn stored_as_plain_nested_maps() {
        let mut m = Metadata::default();
        m.set("router", "class", "bulk", 1024).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"router":{"class":"bulk"}}"#);
        assert_eq!(serde_json::from_str::<Metadata>(&json).unwrap(), m);
    }

    #[test]
    fn a_fork_does_not_write_through() {
        let live = SharedMetadata::new(1024);
        live.lock().set("p", "k", "live", 1024).unwrap();
        let shadow = live.fork();
        shadow.lock().set("p", "k", "shadow", 1024).unwrap();
        assert_eq!(live.lock().get("p", "k"), Some("live"));
        assert_eq!(shadow.lock().get("p", "k"), Some("shadow"));
    }
}
