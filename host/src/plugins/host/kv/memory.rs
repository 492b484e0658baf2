//! The embedded store: a map in the relay's memory. `incr` is atomic because
//! the whole store sits behind one lock that is never held across an await.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::plugins::bindings::kv::Error;

/// Expired entries are swept after this many writes, so keys that are never
/// read again do not pile up.
const SWEEP_EVERY: u64 = 4096;

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

#[derive(Default)]
struct Inner {
    map: HashMap<(String, String), Entry>,
    writes: u64,
}

/// Keys by (plugin name, key). Sizes are checked by the caller.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

fn expiry(ttl: Option<Duration>, now: Instant) -> Option<Instant> {
    ttl.map(|d| now + d)
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wrote(inner: &mut Inner, now: Instant) {
        inner.writes += 1;
        if inner.writes.is_multiple_of(SWEEP_EVERY) {
            inner.map.retain(|_, e| e.live(now));
        }
    }

    /// The live value of a key.
    pub fn get(&self, ns: &str, key: &str) -> Option<Vec<u8>> {
        let now = Instant::now();
        let inner = self.lock();
        inner
            .map
            .get(&(ns.to_string(), key.to_string()))
            .filter(|e| e.live(now))
            .map(|e| e.value.clone())
    }

    /// Sets a key.
    pub fn set(&self, ns: &str, key: &str, value: Vec<u8>, ttl: Option<Duration>) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.map.insert(
            (ns.to_string(), key.to_string()),
            Entry {
                value,
                expires: expiry(ttl, now),
            },
        );
        Self::wrote(&mut inner, now);
    }

    /// Removes a key; true when it was live.
    pub fn delete(&self, ns: &str, key: &str) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .map
            .remove(&(ns.to_string(), key.to_string()))
            .is_some_and(|e| e.live(now))
    }

    /// Adds `delta`; the TTL applies only when the key is created (or had
    /// expired).
    pub fn incr(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, Error> {
        let now = Instant::now();
        let mut inner = self.lock();
        let k = (ns.to_string(), key.to_string());
        let (current, expires) = match inner.map.get(&k).filter(|e| e.live(now)) {
            Some(e) => {
                let n = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or(Error::NotANumber)?;
                (n, e.expires)
            }
            None => (0, expiry(ttl, now)),
        };
        let next = current.checked_add(delta).ok_or(Error::NotANumber)?;
        inner.map.insert(
            k,
            Entry {
                value: next.to_string().into_bytes(),
                expires,
            },
        );
        Self::wrote(&mut inner, now);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incr_is_counted_per_plugin_and_expires() {
        let kv = MemoryStore::default();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(kv.incr("a", "n", 1, ms(50)).unwrap(), 1);
        assert_eq!(kv.incr("a", "n", 2, None).unwrap(), 3);
        assert_eq!(kv.incr("b", "n", 1, None).unwrap(), 1);
        std::thread::sleep(Duration::from_millis(80));
        // The window was fixed by the first increment, so it has expired.
        assert_eq!(kv.get("a", "n"), None);
        assert_eq!(kv.incr("a", "n", 1, None).unwrap(), 1);
        kv.set("a", "s", b"text".to_vec(), None);
        assert!(matches!(kv.incr("a", "s", 1, None), Err(Error::NotANumber)));
        kv.set("a", "max", i64::MAX.to_string().into_bytes(), None);
        assert!(matches!(
            kv.incr("a", "max", 1, None),
            Err(Error::NotANumber)
        ));
        assert!(kv.delete("a", "s"));
        assert!(!kv.delete("a", "s"));
    }
}
