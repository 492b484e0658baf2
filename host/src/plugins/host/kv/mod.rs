//! `postern:relay/kv`: the plugins' key-value store. Each plugin has its own
//! key space (keys are stored under the plugin's name). The store is embedded
//! by default ([`memory`]) or in Redis ([`redis`]) when several relays must
//! share counters; both take the same sizes and give the same answers.

pub mod memory;
pub mod redis;

use std::time::Duration;

use crate::config::{KvBackend, KvConfig};
use crate::plugins::bindings::kv::{Error, Host};
use crate::plugins::instance::HostState;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// Longest key accepted, in bytes.
pub const MAX_KEY: usize = 1024;
/// Largest value accepted, in bytes.
pub const MAX_VALUE: usize = 1024 * 1024;
/// Longer TTLs are cut to this (about a century), as Redis refuses expiry
/// times past its clock's range; both stores then answer alike.
pub const MAX_TTL: Duration = Duration::from_millis(100 * 365 * 86_400_000);

/// The store, shared by every plugin of the relay (and across reloads, so
/// counters survive a plugin update).
#[derive(Debug)]
pub enum KvStore {
    /// In this relay's memory.
    Memory(MemoryStore),
    /// In Redis.
    Redis(RedisStore),
}

impl Default for KvStore {
    fn default() -> Self {
        KvStore::Memory(MemoryStore::default())
    }
}

impl KvStore {
    /// The store `[kv]` asks for. Redis is connected lazily, so this succeeds
    /// while Redis is down; it must run inside the tokio runtime.
    pub fn new(config: &KvConfig) -> Result<KvStore, String> {
        Ok(match config.backend {
            KvBackend::Memory => KvStore::Memory(MemoryStore::default()),
            KvBackend::Redis => KvStore::Redis(RedisStore::new(config)?),
        })
    }

    /// The live value of a key.
    pub async fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, Error> {
        check(key, &[])?;
        match self {
            KvStore::Memory(m) => Ok(m.get(ns, key)),
            KvStore::Redis(r) => r.get(ns, key).await,
        }
    }

    /// Sets a key, to expire after `ttl` when one is given.
    pub async fn set(
        &self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), Error> {
        check(key, &value)?;
        let ttl = ttl_ms.map(ttl);
        match self {
            KvStore::Memory(m) => {
                m.set(ns, key, value, ttl);
                Ok(())
            }
            KvStore::Redis(r) => r.set(ns, key, value, ttl).await,
        }
    }

    /// Removes a key; true when it was live.
    pub async fn delete(&self, ns: &str, key: &str) -> Result<bool, Error> {
        check(key, &[])?;
        match self {
            KvStore::Memory(m) => Ok(m.delete(ns, key)),
            KvStore::Redis(r) => r.delete(ns, key).await,
        }
    }

    /// Adds `delta` to the decimal integer at `key` (absent counts as 0); the
    /// TTL applies only when the key is created (or had expired), so a window
    /// opened by the first increment is not pushed back by later ones.
    pub async fn incr(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<i64, Error> {
        check(key, &[])?;
        let ttl = ttl_ms.map(ttl);
        match self {
            KvStore::Memory(m) => m.incr(ns, key, delta, ttl),
            KvStore::Redis(r) => r.incr(ns, key, delta, ttl).await,
        }
    }
}

fn check(key: &str, value: &[u8]) -> Result<(), Error> {
    if key.len() > MAX_KEY || value.len() > MAX_VALUE {
        return Err(Error::TooLarge);
    }
    Ok(())
}

fn ttl(ms: u64) -> Duration {
    Duration::from_millis(ms).min(MAX_TTL)
}

// Each function re-arms the deadline only once the store has answered: the
// deadline counts guest time, and the store call had its own limit (`[kv]
// timeout` for Redis).
impl Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, Error>> {
        let r = self.services.kv.get(&self.plugin, &key).await;
        self.host_call_done();
        Ok(r)
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<(), Error>> {
        let r = self
            .services
            .kv
            .set(&self.plugin, &key, value, ttl_ms)
            .await;
        self.host_call_done();
        Ok(r)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<bool, Error>> {
        let r = self.services.kv.delete(&self.plugin, &key).await;
        self.host_call_done();
        Ok(r)
    }

    async fn incr(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<i64, Error>> {
        let r = self
            .services
            .kv
            .incr(&self.plugin, &key, delta, ttl_ms)
            .await;
        self.host_call_done();
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sizes_are_checked_before_the_backend() {
        let kv = KvStore::default();
        let long = "k".repeat(MAX_KEY + 1);
        assert!(matches!(kv.get("a", &long).await, Err(Error::TooLarge)));
        assert!(matches!(kv.delete("a", &long).await, Err(Error::TooLarge)));
        assert!(matches!(
            kv.incr("a", &long, 1, None).await,
            Err(Error::TooLarge)
        ));
        assert!(matches!(
            kv.set("a", "k", vec![0; MAX_VALUE + 1], None).await,
            Err(Error::TooLarge)
        ));
        kv.set("a", &"k".repeat(MAX_KEY), vec![0; MAX_VALUE], None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_huge_ttl_is_a_long_one() {
        let kv = KvStore::default();
        kv.set("a", "k", b"v".to_vec(), Some(u64::MAX))
            .await
            .unwrap();
        assert_eq!(kv.get("a", "k").await.unwrap(), Some(b"v".to_vec()));
        assert_eq!(kv.incr("a", "n", 1, Some(u64::MAX)).await.unwrap(), 1);
    }
}
