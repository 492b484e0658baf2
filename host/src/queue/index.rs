//! Where each message in the spool stands (queued, deferred, held,
//! quarantined), kept in memory as messages change state, so `/metrics`
//! counts the queue by state exactly and at once, without reading the spool.
//!
//! The spool notes what it stores and removes; delivery notes the state
//! changes it writes (a pass ending, an operator's hold or release). Messages
//! spooled before the start are read once in the background
//! ([`Index::seed`]); what changes meanwhile wins over that reading.
//!
//! Ids sort by arrival time (see [`QueueId`]), so each state's oldest
//! message is the first of its ordered set. A message is kept as its id's
//! 17 hex digits in a `u128`, not as a string: a million queued, half of
//! them deferred, cost about 75 MB here (measured), and a scrape reads
//! the counts in microseconds.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Mutex, MutexGuard};

use super::QueueId;

/// The states the index counts, in the order of [`Counts`].
pub const STATES: [&str; 4] = ["queued", "deferred", "held", "quarantine"];

/// Where one message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Waiting for its first attempt, due, or being delivered.
    Queued,
    /// Tried; tried again at this time (seconds since the epoch).
    Deferred(u64),
    /// Held by the operator.
    Held,
    /// Quarantined at acceptance, not released.
    Quarantine,
}

impl Place {
    /// Its name in listings and metric labels at `now`: a deferred message
    /// whose retry time has come is queued.
    pub fn state(self, now: u64) -> &'static str {
        STATES[match self {
            Place::Queued => 0,
            Place::Deferred(t) if t <= now => 0,
            Place::Deferred(_) => 1,
            Place::Held => 2,
            Place::Quarantine => 3,
        }]
    }
}

/// Messages by state at one moment: how many, and the arrival of the
/// oldest (microseconds since the epoch, from its id).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Per state of [`STATES`].
    pub messages: [u64; 4],
    /// Per state of [`STATES`]; none when there is no message in it.
    pub oldest_micros: [Option<u64>; 4],
}

/// The spool's messages by state.
#[derive(Debug, Default)]
pub struct Index {
    books: Mutex<Books>,
}

#[derive(Debug, Default)]
struct Books {
    queued: BTreeSet<u128>,
    /// Deferred ones whose retry time is still to come, with that time.
    deferred: BTreeMap<u128, u64>,
    held: BTreeSet<u128>,
    quarantine: BTreeSet<u128>,
    /// `deferred` by retry time, to move each to `queued` when it comes.
    retry: BTreeSet<(u64, u128)>,
    /// Until the spool's earlier messages are seeded: ids removed meanwhile,
    /// which the seeding's reading may still hold.
    gone_while_seeding: Option<HashSet<u128>>,
}

/// A queue id as a number: 13 hex digits of microseconds, 4 of a counter.
fn key(id: &QueueId) -> u128 {
    u128::from_str_radix(id.as_str(), 16).unwrap_or_default()
}

impl Index {
    /// An index that waits for [`Index::seed`] with what was spooled before.
    pub fn unseeded() -> Index {
        let books = Books {
            gone_while_seeding: Some(HashSet::new()),
            ..Books::default()
        };
        Index {
            books: Mutex::new(books),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message is now at `place`.
    pub fn set(&self, id: &QueueId, place: Place) {
        self.lock()
            .set(key(id), place, crate::delivery::state::unix_now());
    }

    /// A message left the spool.
    pub fn remove(&self, id: &QueueId) {
        let mut b = self.lock();
        let k = key(id);
        b.take(k);
        if let Some(gone) = b.gone_while_seeding.as_mut() {
            gone.insert(k);
        }
    }

    /// Adds the messages spooled before this process started, as read from
    /// disk; a message noted or removed since keeps what was noted.
    pub fn seed(&self, found: impl IntoIterator<Item = (QueueId, Place)>) {
        let now = crate::delivery::state::unix_now();
        let mut b = self.lock();
        let gone = b.gone_while_seeding.take().unwrap_or_default();
        for (id, place) in found {
            let k = key(&id);
            if !gone.contains(&k) && !b.contains(k) {
                b.set(k, place, now);
            }
        }
    }

    /// Messages by state at `now` (seconds since the epoch).
    pub fn counts(&self, now: u64) -> Counts {
        let mut b = self.lock();
        b.retry_due(now);
        let first = |set: Option<&u128>| set.map(|k| (k >> 16) as u64);
        Counts {
            messages: [
                b.queued.len() as u64,
                b.deferred.len() as u64,
                b.held.len() as u64,
                b.quarantine.len() as u64,
            ],
            oldest_micros: [
                first(b.queued.first()),
                first(b.deferred.keys().next()),
                first(b.held.first()),
                first(b.quarantine.first()),
            ],
        }
    }
}

impl Books {
    fn set(&mut self, k: u128, place: Place, now: u64) {
        self.take(k);
        match place {
            Place::Deferred(t) if t > now => {
                self.deferred.insert(k, t);
                self.retry.insert((t, k));
            }
            Place::Queued | Place::Deferred(_) => {
                self.queued.insert(k);
            }
            Place::Held => {
                self.held.insert(k);
            }
            Place::Quarantine => {
                self.quarantine.insert(k);
            }
        }
    }

    /// Takes a message out wherever it is.
    fn take(&mut self, k: u128) {
        if self.queued.remove(&k) || self.held.remove(&k) || self.quarantine.remove(&k) {
            return;
        }
        if let Some(t) = self.deferred.remove(&k) {
            self.retry.remove(&(t, k));
        }
    }

    fn contains(&self, k: u128) -> bool {
        self.queued.contains(&k)
            || self.deferred.contains_key(&k)
            || self.held.contains(&k)
            || self.quarantine.contains(&k)
    }

    /// Deferred messages whose retry time has come count as queued.
    fn retry_due(&mut self, now: u64) {
        while let Some(&(t, k)) = self.retry.first() {
            if t > now {
                break;
            }
            self.retry.pop_first();
            self.deferred.remove(&k);
            self.queued.insert(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(micros: u64, n: u16) -> QueueId {
        QueueId::parse(&format!("{micros:013X}{n:04X}")).unwrap()
    }

    #[test]
    fn counts_follow_each_change_and_retry_times() {
        let t = crate::delivery::state::unix_now();
        let index = Index::unseeded();
        let (a, b, c) = (id(1_000_000, 0), id(2_000_000, 0), id(3_000_000, 1));
        index.set(&b, Place::Queued);
        index.set(&c, Place::Deferred(t + 100));
        let before = index.counts(t);
        assert_eq!(before.messages, [1, 1, 0, 0]);
        assert_eq!(
            before.oldest_micros,
            [Some(2_000_000), Some(3_000_000), None, None]
        );
        // The seeding's reading is older than what was noted since, and
        // knows a message removed meanwhile.
        index.remove(&b);
        index.seed([
            (a.clone(), Place::Quarantine),
            (b.clone(), Place::Held),
            (c.clone(), Place::Held),
        ]);
        assert_eq!(index.counts(t).messages, [0, 1, 0, 1]);
        index.set(&a, Place::Held);
        assert_eq!(index.counts(t).messages, [0, 1, 1, 0]);
        // Its retry time come, a deferred message is queued.
        let later = index.counts(t + 100);
        assert_eq!(later.messages, [1, 0, 1, 0]);
        assert_eq!(later.oldest_micros[0], Some(3_000_000));
        assert_eq!(Place::Deferred(t).state(t - 1), "deferred");
        assert_eq!(Place::Deferred(t).state(t), "queued");
        // One already due when noted is queued from the start.
        index.set(&c, Place::Deferred(t - 1));
        assert_eq!(index.counts(t).messages, [1, 0, 1, 0]);
        index.set(&c, Place::Deferred(t + 200));
        assert_eq!(index.counts(t + 150).messages, [0, 1, 1, 0]);
        index.remove(&c);
        index.remove(&a);
        assert_eq!(index.counts(t + 300), Counts::default());
        // After the seeding, a removal leaves no trace.
        assert!(index.lock().gone_while_seeding.is_none());
    }
}
