//! `postern:relay/kv`: the embedded key-value store. Each plugin has its own
//! key space (keys are stored under the plugin's name), values expire after
//! their TTL, and `incr` is atomic because the whole store sits behind one lock
//! that is never held across an await.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::plugins::bindings::kv::{Error, Host};
use crate::plugins::instance::HostState;

/// Longest key accepted, in bytes.
const MAX_KEY: usize = 1024;
/// Largest value accepted, in bytes.
const MAX_VALUE: usize = 1024 * 1024;
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

/// The store, shared by every plugin of the relay (and across reloads, so
/// counters survive a plugin update).
#[derive(Default)]
pub struct KvStore {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore").finish_non_exhaustive()
    }
}

fn ttl(ms: Option<u64>, now: Instant) -> Option<Instant> {
    ms.map(|ms| now + Duration::from_millis(ms))
}

impl KvStore {
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
    pub fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, Error> {
        check(key, &[])?;
        let now = Instant::now();
        let inner = self.lock();
        Ok(inner
            .map
            .get(&(ns.to_string(), key.to_string()))
            .filter(|e| e.live(now))
            .map(|e| e.value.clone()))
    }

    /// Sets a key.
    pub fn set(
        &self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), Error> {
        check(key, &value)?;
        let now = Instant::now();
        let mut inner = self.lock();
        inner.map.insert(
            (ns.to_string(), key.to_string()),
            Entry {
                value,
                expires: ttl(ttl_ms, now),
            },
        );
        Self::wrote(&mut inner, now);
        Ok(())
    }

    /// Removes a key; true when it was live.
    pub fn delete(&self, ns: &str, key: &str) -> Result<bool, Error> {
        check(key, &[])?;
        let now = Instant::now();
        let mut inner = self.lock();
        Ok(inner
            .map
            .remove(&(ns.to_string(), key.to_string()))
            .is_some_and(|e| e.live(now)))
    }

    /// Adds `delta` to the decimal integer at `key`; the TTL applies only when
    /// the key is created (or had expired).
    pub fn incr(&self, ns: &str, key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, Error> {
        check(key, &[])?;
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
            None => (0, ttl(ttl_ms, now)),
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

fn check(key: &str, value: &[u8]) -> Result<(), Error> {
    if key.len() > MAX_KEY || value.len() > MAX_VALUE {
        return Err(Error::TooLarge);
    }
    Ok(())
}

impl Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, Error>> {
        self.host_call_done();
        Ok(self.services.kv.get(&self.plugin, &key))
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.host_call_done();
        Ok(self.services.kv.set(&self.plugin, &key, value, ttl_ms))
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<bool, Error>> {
        self.host_call_done();
        Ok(self.services.kv.delete(&self.plugin, &key))
    }

    async fn incr(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<i64, Error>> {
        self.host_call_done();
        Ok(self.services.kv.incr(&self.plugin, &key, delta, ttl_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incr_is_counted_per_plugin_and_expires() {
        let kv = KvStore::default();
        assert_eq!(kv.incr("a", "n", 1, Some(50)).unwrap(), 1);
        assert_eq!(kv.incr("a", "n", 2, None).unwrap(), 3);
        assert_eq!(kv.incr("b", "n", 1, None).unwrap(), 1);
        std::thread::sleep(Duration::from_millis(80));
        // The window was fixed by the first increment, so it has expired.
        assert_eq!(kv.get("a", "n").unwrap(), None);
        assert_eq!(kv.incr("a", "n", 1, None).unwrap(), 1);
        kv.set("a", "s", b"text".to_vec(), None).unwrap();
        assert!(matches!(kv.incr("a", "s", 1, None), Err(Error::NotANumber)));
        assert!(kv.delete("a", "s").unwrap());
        assert!(!kv.delete("a", "s").unwrap());
        assert!(matches!(
            kv.set("a", &"k".repeat(MAX_KEY + 1), vec![], None),
            Err(Error::TooLarge)
        ));
    }
}
