//! Where each message in the spool stands (queued, deferred, held,
//! quarantined), kept in memory as messages change state, so `/metrics`
//! counts the queue by state exactly and at once, and `postern queue
//! summary` answers without reading the spool.
//!
//! The spool notes what it stores and removes; delivery notes the state
//! changes it writes (a pass ending, an operator's hold or release). Messages
//! spooled before the start are read once, by delivery's start-up scan,
//! which hands them over in batches ([`Index::seed`]) and then says it is
//! done ([`Index::seeded`]); what changes meanwhile wins over that reading.
//! A clean stop saves the books ([`Index::save`]) so that the next start
//! has them at once, before that reading has confirmed them.
//!
//! Ids sort by arrival time (see [`QueueId`]), so each state's oldest
//! message is the first of its ordered map, and a message's age is in its
//! key. A message is kept as its id's 17 hex digits in a `u128`, not as a
//! string, with the number of its [`Shape`]: the domains it still has mail
//! for and the replies about them, which most messages of a queue share
//! (a million messages for one unreachable destination have one shape).
//! A million queued, half of them deferred, cost about 75 MB here
//! (measured), and a scrape reads the counts in microseconds.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

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

/// What a queue summary needs of a message besides its state and age.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    /// The domains of the recipients still to be delivered, lowercase, each
    /// once, in envelope order; with each, the last reply about the first
    /// of those recipients there that has one.
    pub open: Vec<(String, Option<String>)>,
    /// The message's most recent reply: about a recipient still to be
    /// delivered if one has a reply, else about any.
    pub reply: Option<String>,
}

impl Shape {
    /// The shape of a message whose recipients are, in envelope order,
    /// `(address, still to be delivered, last reply)`.
    pub fn of<'a, I>(recipients: I) -> Shape
    where
        I: IntoIterator<Item = (&'a str, bool, Option<&'a str>)>,
        I::IntoIter: Clone,
    {
        let recipients = recipients.into_iter();
        let mut open: Vec<(String, Option<String>)> = Vec::new();
        for (address, is_open, reply) in recipients.clone() {
            if !is_open {
                continue;
            }
            let domain = address
                .rsplit_once('@')
                .map(|(_, d)| d.to_ascii_lowercase())
                .unwrap_or_default();
            match open.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, first)) => {
                    if first.is_none() {
                        *first = reply.map(String::from);
                    }
                }
                None => open.push((domain, reply.map(String::from))),
            }
        }
        let reply = recipients
            .clone()
            .filter(|(_, is_open, _)| *is_open)
            .chain(recipients)
            .find_map(|(_, _, reply)| reply.map(String::from));
        Shape { open, reply }
    }

    /// Some recipient still to be delivered is at `domain` (any case).
    pub fn is_open_at(&self, domain: &str) -> bool {
        self.open
            .iter()
            .any(|(d, _)| d.eq_ignore_ascii_case(domain))
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

/// The file in the spool folder that a clean stop saves the books in.
pub const SAVED_FILE: &str = "index.saved";

/// The spool's messages by state.
#[derive(Debug)]
pub struct Index {
    books: Mutex<Books>,
    /// Signalled when the start-up scan's reading is all in.
    seeded: Condvar,
}

/// Each map holds a message's key with the number of its shape.
#[derive(Debug, Default)]
struct Books {
    queued: BTreeMap<u128, u32>,
    /// Deferred ones whose retry time is still to come, with that time.
    deferred: BTreeMap<u128, (u64, u32)>,
    held: BTreeMap<u128, u32>,
    quarantine: BTreeMap<u128, u32>,
    /// `deferred` by retry time, to move each to `queued` when it comes.
    retry: BTreeSet<(u64, u128)>,
    shapes: Shapes,
    /// Until the spool's earlier messages are seeded: ids noted or removed
    /// meanwhile, which the seeding's reading may hold older news of.
    changed_while_seeding: Option<HashSet<u128>>,
    /// Every message is in, seeded or from the books saved at the last
    /// stop (which the seeding confirms or corrects as it reads).
    complete: bool,
}

/// The shapes in use, each kept once with the number of messages that
/// have it, so a shape no message has any more is dropped.
#[derive(Debug, Default)]
struct Shapes {
    numbers: HashMap<Arc<Shape>, u32>,
    /// By number: the shape and its messages; `None` for a free number.
    table: Vec<Option<(Arc<Shape>, u32)>>,
    free: Vec<u32>,
}

impl Shapes {
    /// The number of `shape`, counting one more message with it.
    fn take_up(&mut self, shape: Shape) -> u32 {
        if let Some(&n) = self.numbers.get(&shape) {
            if let Some((_, users)) = self.table[n as usize].as_mut() {
                *users += 1;
            }
            return n;
        }
        let shape = Arc::new(shape);
        let n = match self.free.pop() {
            Some(n) => n,
            None => {
                self.table.push(None);
                (self.table.len() - 1) as u32
            }
        };
        self.table[n as usize] = Some((shape.clone(), 1));
        self.numbers.insert(shape, n);
        n
    }

    /// One message less has shape `n`.
    fn let_go(&mut self, n: u32) {
        let Some(slot) = self.table.get_mut(n as usize) else {
            return;
        };
        let last = match slot.as_mut() {
            Some((_, users)) => {
                *users -= 1;
                *users == 0
            }
            None => false,
        };
        if last {
            if let Some((shape, _)) = slot.take() {
                self.numbers.remove(&shape);
            }
            self.free.push(n);
        }
    }

    fn get(&self, n: u32) -> &Shape {
        static NONE: Shape = Shape {
            open: Vec::new(),
            reply: None,
        };
        match self.table.get(n as usize) {
            Some(Some((shape, _))) => shape,
            _ => &NONE,
        }
    }
}

/// A queue id as a number: 13 hex digits of microseconds, 4 of a counter.
pub fn key(id: &QueueId) -> u128 {
    u128::from_str_radix(id.as_str(), 16).unwrap_or_default()
}

/// One message as the index knows it, for [`Index::each`].
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    /// Its id as a number ([`key`]); the top bits are its arrival in
    /// microseconds since the epoch.
    pub key: u128,
    /// One of [`STATES`].
    pub state: &'static str,
    /// Its shape.
    pub shape: &'a Shape,
}

impl Known<'_> {
    /// Arrival, seconds since the epoch.
    pub fn arrival(&self) -> u64 {
        Known::arrival_of(self.key)
    }

    /// The arrival in a key, seconds since the epoch.
    pub fn arrival_of(key: u128) -> u64 {
        ((key >> 16) as u64) / 1_000_000
    }
}

impl Default for Index {
    /// An index of an empty spool.
    fn default() -> Index {
        let books = Books {
            complete: true,
            ..Books::default()
        };
        Index {
            books: Mutex::new(books),
            seeded: Condvar::new(),
        }
    }
}

impl Index {
    /// An index that waits for [`Index::seed`] with what was spooled before.
    pub fn unseeded() -> Index {
        let books = Books {
            changed_while_seeding: Some(HashSet::new()),
            ..Books::default()
        };
        Index {
            books: Mutex::new(books),
            seeded: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message is now at `place`, its recipients as they were.
    pub fn set(&self, id: &QueueId, place: Place) {
        let mut b = self.lock();
        b.changed(key(id));
        b.set(key(id), place, None, crate::delivery::state::unix_now());
    }

    /// A message is now at `place`, with `shape`.
    pub fn note(&self, id: &QueueId, place: Place, shape: Shape) {
        let mut b = self.lock();
        b.changed(key(id));
        b.set(
            key(id),
            place,
            Some(shape),
            crate::delivery::state::unix_now(),
        );
    }

    /// A message left the spool.
    pub fn remove(&self, id: &QueueId) {
        let mut b = self.lock();
        let k = key(id);
        if let Some(n) = b.take(k) {
            b.shapes.let_go(n);
        }
        b.changed(k);
    }

    /// Adds messages spooled before this process started, as read from
    /// disk (over what the saved books said of them); a message noted or
    /// removed since keeps what was noted.
    pub fn seed(&self, found: impl IntoIterator<Item = (QueueId, Place, Shape)>) {
        let now = crate::delivery::state::unix_now();
        let mut b = self.lock();
        for (id, place, shape) in found {
            let k = key(&id);
            let changed = b
                .changed_while_seeding
                .as_ref()
                .is_some_and(|c| c.contains(&k));
            if !changed {
                b.set(k, place, Some(shape), now);
            }
        }
    }

    /// Forgets the messages the saved books had that are not in the spool
    /// (`listed`: its ids at the start of the seeding), nor noted since.
    pub fn forget_unlisted(&self, listed: &[QueueId]) {
        let listed: HashSet<u128> = listed.iter().map(key).collect();
        let mut b = self.lock();
        let b = &mut *b;
        let Some(changed) = b.changed_while_seeding.as_ref() else {
            return;
        };
        let stale = |k: &u128| !listed.contains(k) && !changed.contains(k);
        let mut gone: Vec<u128> = Vec::new();
        for map in [&b.queued, &b.held, &b.quarantine] {
            gone.extend(map.keys().copied().filter(stale));
        }
        gone.extend(b.deferred.keys().copied().filter(stale));
        for k in gone {
            if let Some(n) = b.take(k) {
                b.shapes.let_go(n);
            }
        }
    }

    /// Every message spooled before the start has been seeded.
    pub fn seeded(&self) {
        let mut b = self.lock();
        b.changed_while_seeding = None;
        b.complete = true;
        self.seeded.notify_all();
    }

    /// Blocks until every message is in: seeded, or from saved books.
    pub fn wait_complete(&self) {
        let mut b = self.lock();
        while !b.complete {
            b = self.seeded.wait(b).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Saves the books, at a stop once delivery has stopped, for the next
    /// start to answer from at once (see [`Index::load_saved`]). Nothing is
    /// saved before the seeding is done: the books are not whole.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = {
            let b = self.lock();
            if b.changed_while_seeding.is_some() {
                return Ok(());
            }
            b.saved()
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    }

    /// Takes in the books the last stop saved, and removes the file so they
    /// are used once: the start-up scan's reading then confirms or corrects
    /// each message. False when there are none, or they do not read back.
    pub fn load_saved(&self, path: &Path) -> bool {
        let Ok(bytes) = std::fs::read(path) else {
            return false;
        };
        let _ = std::fs::remove_file(path);
        let now = crate::delivery::state::unix_now();
        let mut b = self.lock();
        if b.complete || !b.load(&bytes, now) {
            return false;
        }
        b.complete = true;
        self.seeded.notify_all();
        true
    }

    /// Where a message stands, if the index has it.
    pub fn place(&self, id: &QueueId) -> Option<Place> {
        let b = self.lock();
        let k = key(id);
        if let Some((t, _)) = b.deferred.get(&k) {
            Some(Place::Deferred(*t))
        } else if b.queued.contains_key(&k) {
            Some(Place::Queued)
        } else if b.held.contains_key(&k) {
            Some(Place::Held)
        } else if b.quarantine.contains_key(&k) {
            Some(Place::Quarantine)
        } else {
            None
        }
    }

    /// Calls `f` with every message at `now` (seconds since the epoch),
    /// state by state, oldest first in each.
    pub fn each(&self, now: u64, mut f: impl FnMut(Known<'_>)) {
        let mut b = self.lock();
        b.retry_due(now);
        let b = &*b;
        let mut each = |state: &'static str, all: &mut dyn Iterator<Item = (u128, u32)>| {
            for (key, n) in all {
                f(Known {
                    key,
                    state,
                    shape: b.shapes.get(n),
                });
            }
        };
        each(STATES[0], &mut b.queued.iter().map(|(k, n)| (*k, *n)));
        each(
            STATES[1],
            &mut b.deferred.iter().map(|(k, (_, n))| (*k, *n)),
        );
        each(STATES[2], &mut b.held.iter().map(|(k, n)| (*k, *n)));
        each(STATES[3], &mut b.quarantine.iter().map(|(k, n)| (*k, *n)));
    }

    /// Messages by state at `now` (seconds since the epoch).
    pub fn counts(&self, now: u64) -> Counts {
        let mut b = self.lock();
        b.retry_due(now);
        let first = |key: Option<&u128>| key.map(|k| (k >> 16) as u64);
        Counts {
            messages: [
                b.queued.len() as u64,
                b.deferred.len() as u64,
                b.held.len() as u64,
                b.quarantine.len() as u64,
            ],
            oldest_micros: [
                first(b.queued.keys().next()),
                first(b.deferred.keys().next()),
                first(b.held.keys().next()),
                first(b.quarantine.keys().next()),
            ],
        }
    }
}

/// The first line of saved books; then a JSON line of the shapes by number,
/// then one record of [`SAVED_RECORD`] bytes per message: key, place (0
/// queued, 1 deferred, 2 held, 3 quarantine), retry time, shape number,
/// little-endian.
const SAVED_MAGIC: &[u8] = b"postern-index 1\n";
const SAVED_RECORD: usize = 16 + 1 + 8 + 4;

impl Books {
    /// A message noted or removed while seeding wins over the reading.
    fn changed(&mut self, k: u128) {
        if let Some(changed) = self.changed_while_seeding.as_mut() {
            changed.insert(k);
        }
    }

    fn saved(&self) -> Vec<u8> {
        let shapes: Vec<Option<&Shape>> = self
            .shapes
            .table
            .iter()
            .map(|s| s.as_ref().map(|(shape, _)| &**shape))
            .collect();
        let count =
            self.queued.len() + self.deferred.len() + self.held.len() + self.quarantine.len();
        let mut out = SAVED_MAGIC.to_vec();
        serde_json::to_writer(&mut out, &shapes).expect("shapes serialize");
        out.push(b'\n');
        out.reserve(count * SAVED_RECORD);
        let mut put = |k: u128, place: u8, at: u64, n: u32| {
            out.extend_from_slice(&k.to_le_bytes());
            out.push(place);
            out.extend_from_slice(&at.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        };
        for (k, n) in &self.queued {
            put(*k, 0, 0, *n);
        }
        for (k, (at, n)) in &self.deferred {
            put(*k, 1, *at, *n);
        }
        for (k, n) in &self.held {
            put(*k, 2, 0, *n);
        }
        for (k, n) in &self.quarantine {
            put(*k, 3, 0, *n);
        }
        out
    }

    /// Takes in saved books; false (and nothing taken) if they do not read.
    fn load(&mut self, bytes: &[u8], now: u64) -> bool {
        let Some(rest) = bytes.strip_prefix(SAVED_MAGIC) else {
            return false;
        };
        let Some(end) = rest.iter().position(|&c| c == b'\n') else {
            return false;
        };
        let Ok(shapes) = serde_json::from_slice::<Vec<Option<Shape>>>(&rest[..end]) else {
            return false;
        };
        let records = &rest[end + 1..];
        if records.len() % SAVED_RECORD != 0 {
            return false;
        }
        let mut messages = Vec::with_capacity(records.len() / SAVED_RECORD);
        for r in records.chunks_exact(SAVED_RECORD) {
            let k = u128::from_le_bytes(r[..16].try_into().unwrap_or_default());
            let at = u64::from_le_bytes(r[17..25].try_into().unwrap_or_default());
            let n = u32::from_le_bytes(r[25..].try_into().unwrap_or_default());
            let place = match r[16] {
                0 => Place::Queued,
                1 => Place::Deferred(at),
                2 => Place::Held,
                3 => Place::Quarantine,
                _ => return false,
            };
            let Some(Some(shape)) = shapes.get(n as usize) else {
                return false;
            };
            messages.push((k, place, shape));
        }
        for (k, place, shape) in messages {
            if !self.contains(k) {
                self.set(k, place, Some(shape.clone()), now);
            }
        }
        true
    }

    /// Puts a message at `place` with `shape`, or the shape it had.
    fn set(&mut self, k: u128, place: Place, shape: Option<Shape>, now: u64) {
        let had = self.take(k);
        let n = match (shape, had) {
            (Some(shape), had) => {
                let n = self.shapes.take_up(shape);
                if let Some(had) = had {
                    self.shapes.let_go(had);
                }
                n
            }
            (None, Some(had)) => had,
            (None, None) => self.shapes.take_up(Shape::default()),
        };
        match place {
            Place::Deferred(t) if t > now => {
                self.deferred.insert(k, (t, n));
                self.retry.insert((t, k));
            }
            Place::Queued | Place::Deferred(_) => {
                self.queued.insert(k, n);
            }
            Place::Held => {
                self.held.insert(k, n);
            }
            Place::Quarantine => {
                self.quarantine.insert(k, n);
            }
        }
    }

    /// Takes a message out wherever it is; returns its shape's number.
    fn take(&mut self, k: u128) -> Option<u32> {
        if let Some(n) = self
            .queued
            .remove(&k)
            .or_else(|| self.held.remove(&k))
            .or_else(|| self.quarantine.remove(&k))
        {
            return Some(n);
        }
        let (t, n) = self.deferred.remove(&k)?;
        self.retry.remove(&(t, k));
        Some(n)
    }

    fn contains(&self, k: u128) -> bool {
        self.queued.contains_key(&k)
            || self.deferred.contains_key(&k)
            || self.held.contains_key(&k)
            || self.quarantine.contains_key(&k)
    }

    /// Deferred messages whose retry time has come count as queued.
    fn retry_due(&mut self, now: u64) {
        while let Some(&(t, k)) = self.retry.first() {
            if t > now {
                break;
            }
            self.retry.pop_first();
            if let Some((_, n)) = self.deferred.remove(&k) {
                self.queued.insert(k, n);
            }
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
        let none = Shape::default;
        index.seed([
            (a.clone(), Place::Quarantine, none()),
            (b.clone(), Place::Held, none()),
        ]);
        index.seed([(c.clone(), Place::Held, none())]);
        index.seeded();
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
        assert!(index.lock().changed_while_seeding.is_none());
    }

    #[test]
    fn shapes_are_shared_and_dropped_with_their_last_message() {
        let index = Index::default();
        let shape =
            |domain: &str, reply: Option<&str>| Shape::of([(&*format!("x@{domain}"), true, reply)]);
        let (a, b, c) = (id(1_000_000, 0), id(2_000_000, 0), id(3_000_000, 0));
        index.note(&a, Place::Queued, shape("One.test", None));
        index.note(&b, Place::Queued, shape("one.test", None));
        index.note(&c, Place::Deferred(1), shape("two.test", Some("451 later")));
        assert_eq!(index.lock().shapes.numbers.len(), 2, "a and b share one");
        // A change of place keeps the shape; a new shape lets the old go.
        index.set(&c, Place::Held);
        index.note(&a, Place::Queued, shape("two.test", Some("451 later")));
        let mut seen = Vec::new();
        index.each(0, |m| seen.push((m.key >> 16, m.state, m.shape.clone())));
        assert_eq!(
            seen,
            [
                (1_000_000, "queued", shape("two.test", Some("451 later"))),
                (2_000_000, "queued", shape("one.test", None)),
                (3_000_000, "held", shape("two.test", Some("451 later"))),
            ]
        );
        index.remove(&b);
        assert_eq!(index.lock().shapes.numbers.len(), 1);
        index.remove(&a);
        index.remove(&c);
        let b = index.lock();
        assert!(b.shapes.numbers.is_empty());
        assert_eq!(b.shapes.free.len(), b.shapes.table.len());
    }

    #[test]
    fn a_shape_has_the_open_domains_and_the_replies_a_summary_shows() {
        let shape = Shape::of([
            ("a@Done.test", false, Some("250 ok")),
            ("b@x.test", true, None),
            ("c@X.test", true, Some("451 busy")),
            ("d@y.test", true, None),
        ]);
        assert_eq!(
            shape.open,
            [
                ("x.test".to_string(), Some("451 busy".to_string())),
                ("y.test".to_string(), None)
            ]
        );
        assert_eq!(shape.reply.as_deref(), Some("451 busy"));
        let done = Shape::of([("a@done.test", false, Some("250 ok"))]);
        assert!(done.open.is_empty());
        assert_eq!(done.reply.as_deref(), Some("250 ok"), "no open one: any");
    }

    #[test]
    fn saved_books_come_back_once_and_the_reading_corrects_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SAVED_FILE);
        let t = crate::delivery::state::unix_now();
        let index = Index::default();
        let (a, b, c) = (id(1_000_000, 0), id(2_000_000, 0), id(3_000_000, 0));
        let later = Shape::of([("x@one.test", true, Some("451 later"))]);
        index.note(&a, Place::Deferred(t + 100), later.clone());
        index.note(&b, Place::Held, Shape::default());
        index.note(&c, Place::Quarantine, later);
        index.save(&path).unwrap();
        let all = |index: &Index| {
            let mut seen = Vec::new();
            index.each(t, |m| seen.push((m.key, m.state, m.shape.clone())));
            seen
        };
        let next = Index::unseeded();
        assert!(next.load_saved(&path));
        assert!(!path.exists(), "used once");
        next.wait_complete();
        assert_eq!(all(&next), all(&index));
        assert_eq!(next.counts(t), index.counts(t));
        // The reading: c left the spool while it was stopped, b was
        // released; a message stored since keeps what was noted.
        let d = id(4_000_000, 0);
        next.note(&d, Place::Queued, Shape::default());
        next.forget_unlisted(&[a.clone(), b.clone()]);
        next.seed([
            (b.clone(), Place::Queued, Shape::default()),
            (d.clone(), Place::Held, Shape::default()),
        ]);
        next.seeded();
        assert_eq!(next.counts(t).messages, [2, 1, 0, 0]);
        // Books not yet whole are not saved; a file that does not read is
        // not taken.
        let unseeded = Index::unseeded();
        unseeded.note(&a, Place::Queued, Shape::default());
        unseeded.save(&path).unwrap();
        assert!(!path.exists());
        std::fs::write(&path, b"postern-index 1\n[]\nshort").unwrap();
        assert!(!unseeded.load_saved(&path));
    }
}
