//! Delivery state of one spooled message: per-recipient outcome, attempts, the
//! last reply and the next attempt. Kept as `queue/<id>.state` next to the
//! message, replaced atomically (write `.state.tmp`, fsync, rename), so a crash
//! leaves the old state or the new one, never a torn one; the spool's recovery
//! removes the `.tmp` debris and [`remove_orphans`] the states whose message is gone.
//!
//! A message with no state file has had no attempt yet. Losing the newest state
//! (a crash before the rename) only means recipients already delivered are
//! delivered again: duplicates, never loss.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::queue::{Error, Place, QueueId, QueuedMeta, Shape, Spool};

/// Where a recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not tried yet.
    Pending,
    /// Tried and failed temporarily; tried again at `next_attempt`.
    Deferred,
    /// Accepted by the next hop (or discarded or filed locally by a route).
    Delivered,
    /// Failed permanently, or expired.
    Failed,
}

/// One recipient's state (same index as in the envelope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptState {
    /// Where it stands.
    pub status: Status,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// The last reply (remote, or made up for a local failure), in wire form on one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// The next hop that gave it (`dns; host [addr]`), for DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// The RFC 3463 status for a DSN (`5.1.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    /// A DSN about this recipient has been queued (or none is due): done with it.
    #[serde(default)]
    pub notified: bool,
    /// The next hop took the DSN parameters on (RFC 3461 "relayed"), so a success
    /// notice is its job, not ours.
    #[serde(default)]
    pub dsn_relayed: bool,
    /// A delay notice (NOTIFY=DELAY) has been queued; there is at most one.
    #[serde(default)]
    pub delay_notified: bool,
}

impl RcptState {
    fn new() -> RcptState {
        RcptState {
            status: Status::Pending,
            attempts: 0,
            last_reply: None,
            remote: None,
            enhanced: None,
            notified: false,
            dsn_relayed: false,
            delay_notified: false,
        }
    }

    /// Pending or deferred: still to be delivered.
    pub fn is_open(&self) -> bool {
        matches!(self.status, Status::Pending | Status::Deferred)
    }
}

/// The state file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Format version.
    pub version: u32,
    /// Delivery passes over the message so far.
    pub attempts: u32,
    /// Seconds since the epoch before which the message is not tried (0: now).
    pub next_attempt: u64,
    /// When the last pass ended, seconds since the epoch (0: none, or a state
    /// written before this was recorded): a flush makes earlier ones due.
    #[serde(default)]
    pub last_attempt: u64,
    /// Put on hold by `postern queue hold`.
    #[serde(default)]
    pub held: bool,
    /// Released by `postern queue release`: a quarantine hold set at acceptance
    /// no longer applies.
    #[serde(default)]
    pub released: bool,
    /// When a quarantined message was released, seconds since the epoch (0:
    /// never): its age for `max_age` counts from then, so mail released
    /// after days in quarantine is delivered, not expired at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub released_at: u64,
    /// One per envelope recipient.
    pub recipients: Vec<RcptState>,
}

const STATE_VERSION: u32 = 1;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl DeliveryState {
    /// The state of a message that has had no attempt.
    pub fn new(meta: &QueuedMeta) -> DeliveryState {
        DeliveryState {
            version: STATE_VERSION,
            attempts: 0,
            next_attempt: 0,
            last_attempt: 0,
            held: false,
            released: false,
            released_at: 0,
            recipients: meta
                .envelope
                .recipients
                .iter()
                .map(|_| RcptState::new())
                .collect(),
        }
    }

    /// True while the message may not be delivered.
    pub fn is_held(&self, meta: &QueuedMeta) -> bool {
        self.held || (meta.hold.is_some() && !self.released)
    }

    /// True while a quarantine set at acceptance holds the message (an
    /// operator's hold may be on it too).
    pub fn is_quarantined(&self, meta: &QueuedMeta) -> bool {
        meta.hold.is_some() && !self.released
    }

    /// Where the message stands, for listings and the queue's index.
    pub fn place(&self, meta: &QueuedMeta) -> Place {
        if self.is_quarantined(meta) {
            Place::Quarantine
        } else if self.is_held(meta) {
            Place::Held
        } else if self.attempts > 0 {
            Place::Deferred(self.next_attempt)
        } else {
            Place::Queued
        }
    }

    /// Where the message stands and its shape, for the queue's index.
    pub fn standing(&self, meta: &QueuedMeta) -> (Place, Shape) {
        let recipients = meta.envelope.recipients.iter().zip(&self.recipients);
        let shape = Shape::of(
            recipients.map(|(r, s)| (r.address.as_str(), s.is_open(), s.last_reply.as_deref())),
        );
        (self.place(meta), shape)
    }

    /// When the message's time in the queue started for `max_age` and the
    /// delay notice: its arrival, or its release from quarantine.
    pub fn age_from(&self, meta: &QueuedMeta) -> u64 {
        meta.received.max(self.released_at)
    }

    /// True when some recipient is still to be delivered or notified about.
    pub fn has_work(&self) -> bool {
        self.recipients
            .iter()
            .any(|r| r.is_open() || !r.notified && r.status == Status::Failed)
    }
}

/// Path of a message's state file.
pub fn path(queue_dir: &Path, id: &QueueId) -> PathBuf {
    queue_dir.join(format!("{id}.state"))
}

/// Reads a message's state; a missing file means no attempt yet.
pub fn load(queue_dir: &Path, meta: &QueuedMeta, id: &QueueId) -> Result<DeliveryState, Error> {
    let p = path(queue_dir, id);
    let text = match fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DeliveryState::new(meta)),
        Err(source) => return Err(Error::Io { path: p, source }),
    };
    let state: DeliveryState = serde_json::from_slice(&text).map_err(|e| Error::Damaged {
        path: p.clone(),
        reason: format!("bad delivery state: {e}"),
    })?;
    if state.version != STATE_VERSION || state.recipients.len() != meta.envelope.recipients.len() {
        return Err(Error::Damaged {
            path: p,
            reason: "delivery state does not match the message".into(),
        });
    }
    Ok(state)
}

/// Replaces a message's state atomically.
pub fn store(queue_dir: &Path, id: &QueueId, state: &DeliveryState) -> Result<(), Error> {
    let p = path(queue_dir, id);
    let tmp = queue_dir.join(format!("{id}.state.tmp"));
    let bytes = serde_json::to_vec(state).expect("delivery state serializes");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &p)
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        Error::Io { path: p, source }
    })
}

/// Removes a finished message: the message file first (back to the spool's
/// pool), then its state, so a crash in between leaves an orphan state
/// (removed at start) rather than a message without its state (which would
/// be delivered again from scratch).
pub fn remove_message(spool: &Spool, id: &QueueId) -> Result<(), Error> {
    remove_files(spool, id, true)
}

/// [`remove_message`] for a message that may never have had a state file
/// (`state_file` false: one delivered in its first pass, from memory). Not
/// looking for it matters: each failed lookup of a new name leaves a
/// negative entry in the kernel's dentry cache, a million of them after a
/// million messages, and every path lookup on the machine walks longer
/// hash chains for them.
pub fn remove_files(spool: &Spool, id: &QueueId, state_file: bool) -> Result<(), Error> {
    match spool.remove(id) {
        Ok(()) | Err(Error::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    if !state_file {
        return Ok(());
    }
    let st = path(&spool.root().join("queue"), id);
    match fs::remove_file(&st) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io { path: st, source }),
    }
}

/// Removes state files whose message is gone (a crash between the two
/// removals). One listing of the folder tells both apart, with no lookup
/// per file: a spool of a million messages is listed, not stat'ed, before
/// the relay serves SMTP.
pub fn remove_orphans(queue_dir: &Path) -> Result<usize, Error> {
    let entries = fs::read_dir(queue_dir).map_err(|source| Error::Io {
        path: queue_dir.into(),
        source,
    })?;
    let mut messages = std::collections::HashSet::new();
    let mut states = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        match name.strip_suffix(".state").map(QueueId::parse) {
            Some(Some(id)) => states.push(id),
            Some(None) => {}
            None => {
                messages.insert(name.to_string());
            }
        }
    }
    let mut removed = 0;
    for id in states.iter().filter(|id| !messages.contains(id.as_str())) {
        let _ = fs::remove_file(path(queue_dir, id));
        removed += 1;
    }
    Ok(removed)
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Address, Envelope, MailParams, Recipient};

    fn meta(id: &QueueId) -> QueuedMeta {
        let mut envelope = Envelope::new(Address("a@x.test".into()), MailParams::default());
        envelope.recipients.push(Recipient::new("b@y.test"));
        envelope.recipients.push(Recipient::new("c@y.test"));
        QueuedMeta {
            version: 1,
            id: id.to_string(),
            received: 0,
            envelope,
            client: None,
            hold: None,
            size: 0,
            crc32: None,
            metadata: Default::default(),
        }
    }

    #[test]
    fn store_load_remove_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let id = QueueId::generate();
        let m = meta(&id);
        assert_eq!(load(dir.path(), &m, &id).unwrap(), DeliveryState::new(&m));
        let mut st = DeliveryState::new(&m);
        st.recipients[1].status = Status::Delivered;
        st.next_attempt = 42;
        store(dir.path(), &id, &st).unwrap();
        assert_eq!(load(dir.path(), &m, &id).unwrap(), st);
        assert!(!dir.path().join(format!("{id}.state.tmp")).exists());
        // No message file: the state is an orphan.
        assert_eq!(remove_orphans(dir.path()).unwrap(), 1);
        assert!(!path(dir.path(), &id).exists());
        // A state that does not fit the message is reported, not trusted.
        fs::write(
            path(dir.path(), &id),
            br#"{"version":1,"attempts":0,"next_attempt":0,"recipients":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            load(dir.path(), &m, &id),
            Err(Error::Damaged { .. })
        ));
    }
}
