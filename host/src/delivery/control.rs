//! `postern queue` commands. A running relay answers them on a Unix socket,
//! `control.sock` inside the spool folder (mode 0600, in a folder of mode 0700:
//! only the relay's user gets in), so changes go through the scheduler and never
//! race a delivery in flight. When no relay runs, the command locks the spool
//! itself and works on the files.
//!
//! The socket speaks the admin HTTP API (`crate::admin::api`); this module
//! holds the commands themselves, which both that API and the files of a
//! stopped relay answer.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::{self, unix_now, Status};
use super::suspend::{Suspension, Suspensions};
use super::Delivery;
use crate::queue::index::Known;
use crate::queue::{self, Place, QueueId, Shape, Spool};
use crate::record::Record;

/// The socket's name inside the spool folder.
pub const SOCKET: &str = "control.sock";

/// Which messages a command acts on: every field given must match. A
/// message matches `domain` when a recipient still to be delivered is in it,
/// `sender` when its envelope sender is that address (`<>` for the null
/// sender) or, written `@domain`, in that domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// One queue id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A recipient domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// A sender address, `<>`, or `@domain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// Only messages that arrived at least this many seconds ago (as their
    /// queue id says: it is made as the message ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than: Option<u64>,
    /// `queued`, `deferred`, `held` or `quarantine`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Every message: what a command that changes the queue needs when no
    /// other field is given.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// The states a message can be listed in.
pub use crate::queue::index::STATES;

impl Selector {
    /// True when no field narrows the choice.
    pub fn is_empty(&self) -> bool {
        self.id.is_none()
            && self.domain.is_none()
            && self.sender.is_none()
            && self.older_than.is_none()
            && self.state.is_none()
    }

    /// Checks the fields' values; the error names the field.
    pub fn check(&self) -> Result<(), Failure> {
        let field = |field, message: String| Err(Failure::Field { field, message });
        if let Some(id) = &self.id {
            if QueueId::parse(id).is_none() {
                return field("id", format!("{id:?} is not a queue id"));
            }
        }
        if let Some(state) = &self.state {
            if !STATES.contains(&state.as_str()) {
                let states = STATES.join(", ");
                return field("state", format!("{state:?} is not one of {states}"));
            }
        }
        if let Some(d) = &self.domain {
            if d.is_empty() || d.contains('@') {
                return field("domain", format!("{d:?} is not a domain"));
            }
        }
        if self.sender.as_deref() == Some("") {
            return field("sender", "empty (the null sender is written <>)".into());
        }
        Ok(())
    }

    /// Whether a message matches.
    pub fn matches(&self, e: &Entry) -> bool {
        if self.id.as_deref().is_some_and(|id| id != e.id) {
            return false;
        }
        if self.state.as_deref().is_some_and(|s| s != e.state) {
            return false;
        }
        // The age of the id, as the queue's index has it.
        let arrival = QueueId::parse(&e.id).map(|id| Known::arrival_of(queue::index::key(&id)));
        if let (Some(secs), Some(arrival)) = (self.older_than, arrival) {
            if unix_now().saturating_sub(arrival) < secs {
                return false;
            }
        }
        if let Some(sender) = &self.sender {
            let ok = if sender == "<>" {
                e.sender.is_empty()
            } else if let Some(domain) = sender.strip_prefix('@') {
                e.sender
                    .rsplit_once('@')
                    .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain))
            } else {
                e.sender.eq_ignore_ascii_case(sender)
            };
            if !ok {
                return false;
            }
        }
        if let Some(domain) = &self.domain {
            if !e.shape().is_open_at(domain) {
                return false;
            }
        }
        true
    }
}

/// What a command does to the messages it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Retry now.
    Flush,
    /// Keep from delivery until released.
    Hold,
    /// Undo hold (and quarantine) and retry now; a quarantined message's
    /// age for `max_age` starts again.
    Release,
    /// Remove without a bounce.
    Delete,
}

impl Action {
    /// The name used in the API's paths and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Flush => "flush",
            Action::Hold => "hold",
            Action::Release => "release",
            Action::Delete => "delete",
        }
    }

    /// The action named `name`.
    pub fn parse(name: &str) -> Option<Action> {
        [Action::Flush, Action::Hold, Action::Release, Action::Delete]
            .into_iter()
            .find(|a| a.as_str() == name)
    }
}

/// A queue command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The messages a selector picks (all with an empty one).
    List(Selector),
    /// One message.
    Show {
        /// Queue id.
        id: String,
    },
    /// Flush, hold, release or delete what a selector picks. `flush` with
    /// an empty selector makes every message due.
    Act {
        /// What to do.
        action: Action,
        /// To which messages.
        selector: Selector,
    },
    /// Destinations by message count and age, of what a selector picks.
    Summary(Selector),
    /// Stop delivery to a recipient domain, for a while or until resumed.
    Suspend {
        /// The domain.
        domain: String,
        /// Seconds; none: until resumed.
        for_secs: Option<u64>,
    },
    /// Lift a suspension and try the domain's mail now.
    Resume {
        /// The domain.
        domain: String,
    },
    /// The suspended domains.
    Suspended,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// List and show.
    Entries {
        /// The messages.
        messages: Vec<Entry>,
    },
    /// Act: the ids acted on (empty for a flush of everything).
    Acted {
        /// Queue ids.
        ids: Vec<String>,
    },
    /// Summary.
    Summary(Summary),
    /// Suspend, resume, suspended: the suspensions in force afterwards.
    Suspensions {
        /// The list.
        suspended: Vec<Suspension>,
    },
}

/// A command that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A field of the request is wrong (HTTP 400, naming the field).
    #[error("{field}: {message}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No such message (HTTP 404).
    #[error(transparent)]
    NotFound(queue::Error),
    /// The spool (HTTP 500).
    #[error(transparent)]
    Spool(queue::Error),
}

impl From<queue::Error> for Failure {
    fn from(e: queue::Error) -> Failure {
        match e {
            queue::Error::NotFound(_) => Failure::NotFound(e),
            e => Failure::Spool(e),
        }
    }
}

/// One message as `postern queue list --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Queue id.
    pub id: String,
    /// Arrival, seconds since the epoch.
    pub received: u64,
    /// Seconds since arrival.
    pub age: u64,
    /// Message size in bytes.
    pub size: u64,
    /// Envelope sender ("" for the null sender).
    pub sender: String,
    /// Recipients with their state.
    pub recipients: Vec<RecipientEntry>,
    /// `queued` (no attempt yet or due now), `deferred`, `held` (by the
    /// operator) or `quarantine` (by a plugin at acceptance).
    pub state: String,
    /// Delivery passes so far.
    pub attempts: u32,
    /// Next attempt, seconds since the epoch; absent when held or due now.
    pub next_attempt: Option<u64>,
    /// The most recent reply about any recipient.
    pub last_reply: Option<String>,
    /// Why it is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_reason: Option<String>,
    /// The transaction record: session facts, envelope with parameters, the
    /// plugins' metadata (`show` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Record>,
}

/// One recipient in an [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientEntry {
    /// The address.
    pub address: String,
    /// `pending`, `deferred`, `delivered` or `failed`.
    pub state: Status,
    /// Attempts for this recipient.
    pub attempts: u32,
    /// Its last reply.
    pub last_reply: Option<String>,
}

fn parse_id(id: &str) -> Result<QueueId, queue::Error> {
    QueueId::parse(id).ok_or_else(|| queue::Error::Damaged {
        path: PathBuf::from(id),
        reason: "not a queue id".into(),
    })
}

/// Reads one message's entry from the spool files.
pub fn entry(queue_dir: &Path, id: &QueueId) -> Result<Entry, queue::Error> {
    let stored = queue::spool_load(&queue_dir.join(id.as_str()), id)?;
    let meta = stored.meta;
    let st = state::load(queue_dir, &meta, id).unwrap_or_else(|_| state::DeliveryState::new(&meta));
    let record = Record::of(&meta);
    let held = st.is_held(&meta);
    let now = unix_now();
    let state = st.place(&meta).state(now);
    let recipients: Vec<RecipientEntry> = meta
        .envelope
        .recipients
        .iter()
        .zip(&st.recipients)
        .map(|(r, s)| RecipientEntry {
            address: r.address.to_string(),
            state: s.status,
            attempts: s.attempts,
            last_reply: s.last_reply.clone(),
        })
        .collect();
    let last_reply = st
        .recipients
        .iter()
        .filter(|r| r.is_open())
        .chain(st.recipients.iter())
        .find_map(|r| r.last_reply.clone());
    Ok(Entry {
        id: id.to_string(),
        received: meta.received,
        age: now.saturating_sub(meta.received),
        size: meta.size,
        sender: meta.envelope.sender.to_string(),
        recipients,
        state: state.into(),
        attempts: st.attempts,
        next_attempt: (!held && st.next_attempt > now).then_some(st.next_attempt),
        last_reply,
        hold_reason: if st.is_quarantined(&meta) {
            meta.hold.clone()
        } else if st.held {
            Some("postern queue hold".into())
        } else {
            None
        },
        record: Some(record),
    })
}

/// Every message, oldest first (messages that vanish meanwhile are skipped,
/// damaged ones too, with a warning: the relay sets them aside when it meets
/// them).
pub fn list(queue_dir: &Path) -> Result<Vec<Entry>, queue::Error> {
    let mut out = Vec::new();
    for id in queue::list_ids(queue_dir)? {
        match entry(queue_dir, &id) {
            // The records stay out of a listing: `show` has them.
            Ok(e) => out.push(Entry { record: None, ..e }),
            Err(queue::Error::NotFound(_)) => {}
            Err(e @ queue::Error::Damaged { .. }) => {
                tracing::warn!(queue_id = %id, error = %e, "skipping a damaged message file")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Sets or clears the operator hold in a message's state file; returns
/// where the message stands then.
pub fn set_hold(
    queue_dir: &Path,
    id: &QueueId,
    hold: bool,
) -> Result<(Place, Shape), queue::Error> {
    let stored = queue::spool_load(&queue_dir.join(id.as_str()), id)?;
    let mut st = state::load(queue_dir, &stored.meta, id)
        .unwrap_or_else(|_| state::DeliveryState::new(&stored.meta));
    if !hold && st.is_quarantined(&stored.meta) {
        st.released_at = unix_now();
    }
    st.held = hold;
    if !hold {
        st.released = true;
        st.next_attempt = 0;
    }
    state::store(queue_dir, id, &st)?;
    Ok(st.standing(&stored.meta))
}

/// Makes a message due now (its retry time passed); returns where it stands then.
pub(super) fn flush_file(queue_dir: &Path, id: &QueueId) -> Result<(Place, Shape), queue::Error> {
    let stored = queue::spool_load(&queue_dir.join(id.as_str()), id)?;
    // A damaged state is started over at the next attempt.
    let Ok(mut st) = state::load(queue_dir, &stored.meta, id) else {
        return Ok(state::DeliveryState::new(&stored.meta).standing(&stored.meta));
    };
    if st.next_attempt != 0 {
        st.next_attempt = 0;
        state::store(queue_dir, id, &st)?;
    }
    Ok(st.standing(&stored.meta))
}

impl Entry {
    /// Its shape, as the queue's index keeps it for a message.
    pub fn shape(&self) -> Shape {
        Shape::of(self.recipients.iter().map(|r| {
            let open = matches!(r.state, Status::Pending | Status::Deferred);
            (r.address.as_str(), open, r.last_reply.as_deref())
        }))
    }
}

/// Upper bounds of the age columns of a summary, in minutes (Postfix's
/// qshape uses the same doubling); the last column holds everything older.
pub const AGE_BUCKETS_MIN: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// Destinations by count and age, like Postfix's `qshape`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Column names: `5m` holds messages up to 5 minutes old, ..., and the
    /// last one those older than the last bound.
    pub buckets: Vec<String>,
    /// Every message selected, counted once.
    pub total: SummaryRow,
    /// One row per recipient domain with mail still to deliver, most
    /// messages first; a message with recipients in two domains counts in both.
    pub destinations: Vec<SummaryRow>,
}

/// One row of a [`Summary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryRow {
    /// The recipient domain (`TOTAL` for the total row).
    pub domain: String,
    /// Messages.
    pub messages: u64,
    /// Messages per age column.
    pub counts: Vec<u64>,
    /// Messages deferred now (tried, their retry time still to come).
    pub deferred: u64,
    /// Messages held.
    pub held: u64,
    /// The newest message's reply about one of its recipients still to be
    /// delivered there (for the total: the message's most recent reply).
    pub last_error: Option<String>,
}

impl SummaryRow {
    fn new(domain: String) -> SummaryRow {
        SummaryRow {
            domain,
            messages: 0,
            counts: vec![0; AGE_BUCKETS_MIN.len() + 1],
            deferred: 0,
            held: 0,
            last_error: None,
        }
    }
}

/// A [`Summary`] being counted, from the files or from the queue's index:
/// each message as [`Known`] to the index.
struct Tally {
    now: u64,
    /// Each row with the key of the message its `last_error` is from.
    total: (SummaryRow, u128),
    rows: std::collections::HashMap<String, (SummaryRow, u128)>,
}

impl Tally {
    fn new(now: u64) -> Tally {
        Tally {
            now,
            total: (SummaryRow::new("TOTAL".into()), 0),
            rows: Default::default(),
        }
    }

    fn add(&mut self, m: Known<'_>) {
        let age = self.now.saturating_sub(m.arrival());
        let column = AGE_BUCKETS_MIN
            .iter()
            .position(|b| age <= b * 60)
            .unwrap_or(AGE_BUCKETS_MIN.len());
        let count = |(row, newest): &mut (SummaryRow, u128), reply: Option<&String>| {
            row.messages += 1;
            row.counts[column] += 1;
            row.deferred += u64::from(m.state == "deferred");
            row.held += u64::from(m.state == "held");
            if let Some(reply) = reply.filter(|_| m.key >= *newest) {
                row.last_error = Some(reply.clone());
                *newest = m.key;
            }
        };
        count(&mut self.total, m.shape.reply.as_ref());
        for (domain, reply) in &m.shape.open {
            let row = self
                .rows
                .entry(domain.clone())
                .or_insert_with(|| (SummaryRow::new(domain.clone()), 0));
            count(row, reply.as_ref());
        }
    }

    fn summary(self) -> Summary {
        let mut destinations: Vec<SummaryRow> = self.rows.into_values().map(|r| r.0).collect();
        destinations.sort_by(|a, b| b.messages.cmp(&a.messages).then(a.domain.cmp(&b.domain)));
        let mut buckets: Vec<String> = AGE_BUCKETS_MIN.iter().map(|m| format!("{m}m")).collect();
        buckets.push(format!("{}m+", AGE_BUCKETS_MIN[AGE_BUCKETS_MIN.len() - 1]));
        Summary {
            buckets,
            total: self.total.0,
            destinations,
        }
    }
}

impl Summary {
    /// The summary of `entries`, read from the files. A message's age is
    /// its id's, as in [`Summary::of_index`].
    pub fn of(entries: &[Entry]) -> Summary {
        let mut tally = Tally::new(unix_now());
        for e in entries {
            let Some(id) = QueueId::parse(&e.id) else {
                continue;
            };
            let shape = e.shape();
            tally.add(Known {
                key: queue::index::key(&id),
                state: STATES.iter().find(|s| **s == e.state).unwrap_or(&STATES[0]),
                shape: &shape,
            });
        }
        tally.summary()
    }

    /// The summary of what a selector picks (its `sender` aside), from the
    /// queue's index: no file is read.
    pub fn of_index(index: &queue::Index, selector: &Selector) -> Summary {
        let now = unix_now();
        let mut tally = Tally::new(now);
        let id = selector.id.as_ref().and_then(|id| QueueId::parse(id));
        let id = id.as_ref().map(queue::index::key);
        index.each(now, |m| {
            let picked = id.is_none_or(|k| k == m.key)
                && selector.state.as_deref().is_none_or(|s| s == m.state)
                && selector
                    .older_than
                    .is_none_or(|secs| now.saturating_sub(m.arrival()) >= secs)
                && selector
                    .domain
                    .as_deref()
                    .is_none_or(|domain| m.shape.is_open_at(domain));
            if picked {
                tally.add(m);
            }
        });
        tally.summary()
    }
}

/// The messages a selector picks, read off the runtime.
async fn select(dir: &Path, selector: &Selector) -> Result<Vec<Entry>, queue::Error> {
    let dir = dir.to_path_buf();
    let selector = selector.clone();
    queue::off_runtime(move || {
        let mut all = list(&dir)?;
        all.retain(|e| selector.matches(e));
        Ok(all)
    })
    .await
}

/// A command that changes the queue names what it acts on.
fn check_act(action: Action, selector: &Selector) -> Result<(), Failure> {
    selector.check()?;
    if selector.is_empty() && !selector.all && action != Action::Flush {
        return Err(Failure::Field {
            field: "selector",
            message: format!(
                "{} needs an id, a selector (domain, sender, older_than, state) or all",
                action.as_str()
            ),
        });
    }
    Ok(())
}

fn check_domain(domain: &str) -> Result<(), Failure> {
    if domain.is_empty() || domain.contains(['@', ' ', '/']) {
        return Err(Failure::Field {
            field: "domain",
            message: format!("{domain:?} is not a domain"),
        });
    }
    Ok(())
}

/// Runs a request against a running relay's scheduler. Every change goes
/// through [`Delivery`], which keeps it off messages a delivery has in hand.
pub async fn handle(d: &Delivery, req: Request) -> Result<Answer, Failure> {
    let dir = d.queue_dir().to_path_buf();
    match req {
        // Reading every record of a large queue takes a while: off the
        // runtime, so deliveries and sessions go on meanwhile.
        Request::List(selector) => {
            selector.check()?;
            let messages = select(&dir, &selector).await?;
            Ok(Answer::Entries { messages })
        }
        Request::Show { id } => {
            let id = parse_id(&id)?;
            let e = queue::off_runtime(move || entry(&dir, &id)).await?;
            Ok(Answer::Entries { messages: vec![e] })
        }
        Request::Summary(selector) => {
            selector.check()?;
            if selector.sender.is_some() {
                let entries = select(&dir, &selector).await?;
                return Ok(Answer::Summary(Summary::of(&entries)));
            }
            // The index knows the rest: once the start-up scan has seeded
            // it, a summary of a million messages reads no file.
            let spool = d.spool().clone();
            let summary = queue::off_runtime(move || {
                spool.index().wait_complete();
                Ok(Summary::of_index(spool.index(), &selector))
            })
            .await?;
            Ok(Answer::Summary(summary))
        }
        Request::Act { action, selector } => {
            check_act(action, &selector)?;
            if let (Some(id), true) = (&selector.id, only_id(&selector)) {
                let id = parse_id(id)?;
                match action {
                    Action::Flush => d.flush(Some(&id)).await?,
                    Action::Hold => d.hold(&id).await?,
                    Action::Release => d.release(&id).await?,
                    Action::Delete => d.delete(&id).await?,
                }
                return Ok(Answer::Acted {
                    ids: vec![id.to_string()],
                });
            }
            if action == Action::Flush && selector.is_empty() {
                d.flush(None).await?;
                return Ok(Answer::Acted { ids: Vec::new() });
            }
            let ids: Vec<QueueId> = select(&dir, &selector)
                .await?
                .iter()
                .filter_map(|e| QueueId::parse(&e.id))
                .collect();
            if action == Action::Flush {
                d.flush_many(&ids).await?;
            }
            for id in &ids {
                let done = match action {
                    Action::Flush => Ok(()),
                    Action::Hold => d.hold(id).await,
                    Action::Release => d.release(id).await,
                    Action::Delete => d.delete(id).await,
                };
                // Delivered or deleted meanwhile: nothing left to act on.
                match done {
                    Ok(()) | Err(queue::Error::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(Answer::Acted {
                ids: ids.iter().map(|i| i.to_string()).collect(),
            })
        }
        Request::Suspend { domain, for_secs } => {
            check_domain(&domain)?;
            let until = for_secs.map(|s| unix_now().saturating_add(s));
            d.set_suspension(&domain, Some(until)).await?;
            tracing::info!(domain, until, "delivery suspended by the operator");
            Ok(Answer::Suspensions {
                suspended: d.suspensions(),
            })
        }
        Request::Resume { domain } => {
            check_domain(&domain)?;
            if !d.set_suspension(&domain, None).await? {
                return Err(Failure::Field {
                    field: "domain",
                    message: format!("{domain} is not suspended"),
                });
            }
            tracing::info!(domain, "delivery resumed by the operator");
            let waiting = Selector {
                domain: Some(domain),
                ..Selector::default()
            };
            let ids: Vec<QueueId> = select(&dir, &waiting)
                .await?
                .iter()
                .filter_map(|e| QueueId::parse(&e.id))
                .collect();
            d.flush_many(&ids).await?;
            Ok(Answer::Suspensions {
                suspended: d.suspensions(),
            })
        }
        Request::Suspended => Ok(Answer::Suspensions {
            suspended: d.suspensions(),
        }),
    }
}

/// The selector names one message and nothing else.
fn only_id(selector: &Selector) -> bool {
    selector.domain.is_none()
        && selector.sender.is_none()
        && selector.older_than.is_none()
        && selector.state.is_none()
}

/// Runs a request on the spool files of a stopped relay (the caller holds the lock).
fn handle_direct(spool: &Spool, req: Request) -> Result<Answer, Failure> {
    let dir = spool.root().join("queue");
    let selected = |selector: &Selector| -> Result<Vec<Entry>, Failure> {
        selector.check()?;
        let mut all = list(&dir)?;
        all.retain(|e| selector.matches(e));
        Ok(all)
    };
    match req {
        Request::List(selector) => Ok(Answer::Entries {
            messages: selected(&selector)?,
        }),
        Request::Show { id } => Ok(Answer::Entries {
            messages: vec![entry(&dir, &parse_id(&id)?)?],
        }),
        Request::Summary(selector) => Ok(Answer::Summary(Summary::of(&selected(&selector)?))),
        Request::Act { action, selector } => {
            check_act(action, &selector)?;
            // The books the relay saved at its stop would not know of this.
            let _ = std::fs::remove_file(spool.root().join(queue::index::SAVED_FILE));
            let ids: Vec<QueueId> = match (&selector.id, only_id(&selector)) {
                (Some(id), true) => {
                    let id = parse_id(id)?;
                    if !dir.join(id.as_str()).exists() {
                        return Err(queue::Error::NotFound(id).into());
                    }
                    vec![id]
                }
                _ => selected(&selector)?
                    .iter()
                    .filter_map(|e| QueueId::parse(&e.id))
                    .collect(),
            };
            for id in &ids {
                let done = match action {
                    Action::Flush => flush_file(&dir, id).map(drop),
                    Action::Hold => set_hold(&dir, id, true).map(drop),
                    Action::Release => set_hold(&dir, id, false).map(drop),
                    Action::Delete => state::remove_message(spool, id),
                };
                match done {
                    Ok(()) | Err(queue::Error::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(Answer::Acted {
                ids: ids.iter().map(|i| i.to_string()).collect(),
            })
        }
        Request::Suspend { domain, for_secs } => {
            check_domain(&domain)?;
            let mut s = Suspensions::load(spool.root())?;
            s.suspend(&domain, for_secs.map(|f| unix_now().saturating_add(f)));
            s.save(spool.root())?;
            Ok(Answer::Suspensions {
                suspended: s.list(unix_now()),
            })
        }
        Request::Resume { domain } => {
            check_domain(&domain)?;
            let mut s = Suspensions::load(spool.root())?;
            if !s.resume(&domain) {
                return Err(Failure::Field {
                    field: "domain",
                    message: format!("{domain} is not suspended"),
                });
            }
            s.save(spool.root())?;
            Ok(Answer::Suspensions {
                suspended: s.list(unix_now()),
            })
        }
        Request::Suspended => Ok(Answer::Suspensions {
            suspended: Suspensions::load(spool.root())?.list(unix_now()),
        }),
    }
}

/// How long a queue command waits for the control socket of a relay that
/// holds the spool but does not answer yet (starting, or stopping).
const SOCKET_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs a queue command: through the control socket when a relay is running
/// on this spool, else directly on the files (with the spool locked).
pub fn run(spool_root: &Path, req: Request) -> Result<Answer, String> {
    let sock = spool_root.join(SOCKET);
    let deadline = std::time::Instant::now() + SOCKET_WAIT;
    let mut said = false;
    loop {
        match run_once(spool_root, &sock, &req) {
            Ok(answer) => return Ok(answer),
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::Locked) if std::time::Instant::now() >= deadline => {
                let (spool, sock) = (spool_root.display(), sock.display());
                let wait = SOCKET_WAIT.as_secs();
                return Err(format!(
                    "a relay holds the spool {spool} but its control socket {sock} did not answer within {wait}s"
                ));
            }
            Err(Attempt::Locked) => {
                if !said {
                    let (spool, wait) = (spool_root.display(), SOCKET_WAIT.as_secs());
                    eprintln!(
                        "postern: a relay holds the spool {spool} and its control socket does not answer yet; waiting up to {wait}s"
                    );
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Why one try at a queue command did not answer.
enum Attempt {
    /// A relay holds the spool and its socket does not answer: try again.
    Locked,
    /// A final answer.
    Failed(String),
}

fn run_once(spool_root: &Path, sock: &Path, req: &Request) -> Result<Answer, Attempt> {
    if let Ok(conn) = std::os::unix::net::UnixStream::connect(sock) {
        let (method, path, body) = crate::admin::api::to_http(req);
        let (status, answer) = crate::admin::client::call(conn, method, &path, body)
            .map_err(|e| Attempt::Failed(format!("{}: {e}", sock.display())))?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or_else(|| format!("HTTP {status}"));
            return Err(Attempt::Failed(message));
        }
        return crate::admin::api::answer_from_http(req, &answer)
            .map_err(|e| Attempt::Failed(format!("{}: bad answer: {e}", sock.display())));
    }
    if !spool_root.join("queue").is_dir() {
        return Err(Attempt::Failed(format!(
            "{}: no spool here",
            spool_root.display()
        )));
    }
    let spool = Spool::open(spool_root).map_err(|e| match e {
        queue::Error::Locked(_) => Attempt::Locked,
        e => Attempt::Failed(e.to_string()),
    })?;
    handle_direct(&spool, req.clone()).map_err(|e| Attempt::Failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::envelope::{Address, Envelope, MailParams, Recipient};

    /// An id of a message that arrived `minutes` ago.
    fn id(minutes: u64, n: u16) -> QueueId {
        let micros = (unix_now() - minutes * 60) * 1_000_000;
        QueueId::parse(&format!("{micros:013X}{n:04X}")).unwrap()
    }

    /// Tried once, due again in an hour: `(recipient, status, reply)`.
    fn tried(st: &mut state::DeliveryState, outcomes: &[(usize, Status, &str)]) {
        st.attempts = 1;
        st.next_attempt = unix_now() + 3600;
        st.last_attempt = unix_now();
        for &(i, status, reply) in outcomes {
            st.recipients[i].status = status;
            st.recipients[i].attempts = 1;
            st.recipients[i].last_reply = Some(reply.into());
        }
    }

    #[tokio::test]
    async fn the_index_summarises_the_queue_as_its_files_do() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let queue_dir = dir.path().join("queue");
        type Change = fn(&mut state::DeliveryState);
        let messages: [(u64, &[&str], Option<&str>, Change); 8] = [
            (2, &["x@a.test"], None, |_| {}),
            (7, &["y@a.test", "z@B.test"], None, |st| {
                tried(
                    st,
                    &[
                        (0, Status::Deferred, "451 4.4.1 a down"),
                        (1, Status::Deferred, "452 b full"),
                    ],
                )
            }),
            (30, &["w@A.test"], None, |st| {
                tried(st, &[(0, Status::Deferred, "451 a was down")])
            }),
            (100, &["v@b.test", "u@c.test"], None, |st| {
                tried(
                    st,
                    &[
                        (0, Status::Delivered, "250 ok"),
                        (1, Status::Deferred, "421 c busy"),
                    ],
                );
                st.next_attempt = unix_now() - 1;
            }),
            (700, &["t@c.test"], None, |st| st.held = true),
            (2000, &["s@d.test"], Some("quarantined by a plugin"), |_| {}),
            (3, &["r@b.test"], None, |st| {
                tried(st, &[(0, Status::Failed, "550 no such user")])
            }),
            (3, &["q@e.test", "p@e.test"], None, |st| {
                tried(
                    st,
                    &[
                        (0, Status::Delivered, "250 ok"),
                        (1, Status::Deferred, "451 e greylisted"),
                    ],
                )
            }),
        ];
        let mut ids = Vec::new();
        for (n, (minutes, rcpts, hold, change)) in messages.into_iter().enumerate() {
            let id = id(minutes, n as u16);
            let mut envelope = Envelope::new(Address("a@ours.test".into()), MailParams::default());
            envelope
                .recipients
                .extend(rcpts.iter().map(|r| Recipient::new(*r)));
            let message = Arc::new(b"Subject: t\r\n\r\nhi\r\n".to_vec());
            let hold = hold.map(String::from);
            let spooled = spool
                .store(&id, &envelope, None, hold, Default::default(), message)
                .await
                .unwrap();
            // As delivery notes the end of a pass.
            let mut st = state::DeliveryState::new(&spooled.meta);
            change(&mut st);
            if st != state::DeliveryState::new(&spooled.meta) {
                state::store(&queue_dir, &id, &st).unwrap();
                let (place, shape) = st.standing(&spooled.meta);
                spool.index().note(&id, place, shape);
            }
            ids.push(id);
        }
        let selectors = [
            Selector::default(),
            Selector {
                domain: Some("B.test".into()),
                ..Selector::default()
            },
            Selector {
                domain: Some("c.test".into()),
                state: Some("queued".into()),
                ..Selector::default()
            },
            Selector {
                state: Some("deferred".into()),
                ..Selector::default()
            },
            Selector {
                state: Some("held".into()),
                ..Selector::default()
            },
            Selector {
                state: Some("quarantine".into()),
                ..Selector::default()
            },
            Selector {
                older_than: Some(20 * 60),
                ..Selector::default()
            },
            Selector {
                id: Some(ids[1].to_string()),
                ..Selector::default()
            },
        ];
        let all = list(&queue_dir).unwrap();
        for selector in &selectors {
            let mut files = all.clone();
            files.retain(|e| selector.matches(e));
            assert_eq!(
                Summary::of_index(spool.index(), selector),
                Summary::of(&files),
                "{selector:?}"
            );
        }
        // And what it says.
        let s = Summary::of_index(spool.index(), &Selector::default());
        assert_eq!(s.total.messages, 8);
        assert_eq!(s.total.counts, [3, 1, 0, 1, 0, 1, 0, 0, 1, 1]);
        assert_eq!((s.total.deferred, s.total.held), (4, 1));
        let row = |d: &str| s.destinations.iter().find(|r| r.domain == d).unwrap();
        let a = row("a.test");
        assert_eq!((a.messages, a.deferred), (3, 2));
        assert_eq!(
            a.last_error.as_deref(),
            Some("451 4.4.1 a down"),
            "the newest"
        );
        assert_eq!(
            row("b.test").messages,
            1,
            "the delivered and the failed are done"
        );
        assert_eq!(row("c.test").last_error.as_deref(), Some("421 c busy"));
        assert_eq!(
            row("e.test").last_error.as_deref(),
            Some("451 e greylisted")
        );
        assert_eq!(s.destinations[0].domain, "a.test");
    }
}
