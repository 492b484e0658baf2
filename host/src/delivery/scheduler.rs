//! The queue manager. Messages come from the spool (at start, on each new 250,
//! from retry timers) into a bounded active set; each one's open recipients are
//! routed and grouped into jobs, one per destination; each destination has a
//! FIFO of jobs and up to `max_per_destination` connections, each of which takes
//! jobs until the FIFO is empty (connection reuse). A destination whose next hop
//! cannot be reached is suspended as a whole for a backoff period: its queued
//! jobs are deferred at once instead of each trying the dead host.
//!
//! Memory does not grow with the spool: at most `max_active` messages are in
//! memory, and at most `10 * max_active` retry timers; what does not fit is
//! found again by a periodic scan of the spool folder.
//!
//! A message's way through, a file each: [`admit`] (into the active set,
//! routed, its jobs queued), [`connection`] (jobs sent over a destination's
//! connections), [`settle`] (outcomes applied; the message removed, or kept
//! for its retry). This file holds the books they share and the timers.

mod admit;
mod connection;
mod settle;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use super::client::Timeouts;
use super::dns::Dns;
use super::pools::Pools;
use super::route::Target;
use super::state::{self, unix_now, DeliveryState, Status};
use super::suspend::{Suspension, Suspensions};
use super::tls::ClientTls;
use super::Error;
use crate::authn::mta_sts::MtaSts;
use crate::config::Config;
use crate::envelope::Address;
use crate::plugins::delivered::Reporter;
use crate::plugins::ChainHandle;
use crate::queue::{off_runtime, Place, QueueId, QueuedMeta, Shape, Spool, Spooled, StoredMessage};
use crate::server::Context;
use crate::smtp::reply::Reply;

/// Messages larger than this are read again from the spool for each job
/// instead of being kept in memory between routing and sending.
const CACHE_BODY_MAX: u64 = 128 * 1024;
/// Addresses tried per destination per connection attempt (Postfix: 5).
const MAX_ADDRESSES: usize = 5;
/// How long a connection with nothing to do stays open for the next message
/// to its destination (Postfix's `smtp_connection_cache_time_limit`).
const IDLE_TIME: Duration = Duration::from_secs(2);
/// How often the spool is scanned for messages that did not fit in memory.
const SCAN_INTERVAL: Duration = Duration::from_secs(10);
/// How long an operator command waits for a pass over its message to settle
/// (the remover may run seconds behind under load).
const EDIT_WAIT: Duration = Duration::from_secs(30);
/// Records the start-up scan reads in one trip to the blocking pool.
const SCAN_BATCH: usize = 512;

/// The running delivery side; cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    shared: Arc<Shared>,
}

struct Shared {
    config: Arc<Config>,
    spool: Spool,
    queue_dir: PathBuf,
    chain: Arc<ChainHandle>,
    dns: Dns,
    tls: ClientTls,
    /// MTA-STS policies, when `delivery.mta_sts` is on.
    mta_sts: Option<MtaSts>,
    /// Signs the relay's own DSNs.
    signer: Arc<crate::authn::Signer>,
    timeouts: Timeouts,
    /// The relay's own listening addresses: never a next hop.
    own: Vec<SocketAddr>,
    /// Shared with the remover, which ends a message's `settling`.
    sched: Arc<Mutex<Sched>>,
    /// Wakes the timer loop when an earlier timer or a scan is due.
    timer: Notify,
    /// The admission channel (new messages, DSNs).
    admit_tx: mpsc::UnboundedSender<Spooled>,
    /// Removes finished messages off the async workers.
    remover: Remover,
    /// Destinations the operator suspended (read at each admission).
    suspended: std::sync::RwLock<Suspensions>,
    /// Held while the suspensions are changed and saved, so two changes
    /// never write the file out of order.
    suspend_writer: std::sync::Mutex<()>,
    /// Reports each attempt to the `delivered` hook.
    reports: Reporter,
    /// Which pool host takes the next message.
    pools: Pools,
}

/// Where a group of a message's recipients goes: a destination, or a pool
/// whose host is picked as the job is queued.
enum Destination {
    Fixed(Target),
    Pool { name: String, require_tls: bool },
}

/// What admission gets along with a message's id.
enum Given {
    /// Nothing: the record is read from the spool.
    Nothing,
    /// Just spooled: handed over by the session, record and bytes.
    Fresh(Box<Spooled>),
    /// Read by the start-up scan: the record and its delivery state.
    Read(Box<(StoredMessage, DeliveryState)>),
}

/// Where the bytes of a message being admitted are.
enum Body {
    /// Just spooled: handed over by the session.
    InMemory(Arc<Vec<u8>>),
    /// Found in the spool: read when it is due.
    OnDisk(Box<StoredMessage>),
}

/// A thread that unlinks finished messages. An ext4 unlink can wait on the
/// journal for a while; on a runtime worker that wait would stall sessions and
/// deliveries. The removal never needed to be durable at once (a crash before
/// it only means a duplicate), so handing it off changes no guarantee. Under
/// load it runs seconds behind; each message stays `settling` until its files
/// are gone, so no scan, timer or flush meets it in between.
struct Remover {
    /// Each message with whether it may have a state file.
    tx: std::sync::mpsc::Sender<(QueueId, bool)>,
    /// Removals handed over and not yet done (shutdown waits for them).
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

/// How long the remover lets removals gather after a batch: a wake-up per
/// message cost more CPU than the removal itself at a few thousand a second.
const REMOVER_PAUSE: Duration = Duration::from_millis(5);

impl Remover {
    fn start(spool: Spool, sched: Arc<Mutex<Sched>>) -> Remover {
        let (tx, rx) = std::sync::mpsc::channel::<(QueueId, bool)>();
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let p = pending.clone();
        std::thread::Builder::new()
            .name("postern-remover".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let batch: Vec<_> = std::iter::once(first).chain(rx.try_iter()).collect();
                    for (id, state_file) in &batch {
                        if let Err(e) = state::remove_files(&spool, id, *state_file) {
                            tracing::warn!(queue_id = %id, error = %e, "cannot remove delivered message");
                        }
                    }
                    let mut s = lock(&sched);
                    for (id, _) in &batch {
                        s.settling.remove(id);
                    }
                    drop(s);
                    p.fetch_sub(batch.len(), std::sync::atomic::Ordering::AcqRel);
                    // Let the next removals gather: while this thread is not
                    // waiting on the channel, handing one over wakes nothing.
                    std::thread::sleep(REMOVER_PAUSE);
                }
            })
            .expect("spawning the spool remover thread");
        Remover { tx, pending }
    }

    /// Hands over a message that is `settling`; the remover ends that.
    fn remove(&self, id: QueueId, state_file: bool) -> Result<(), QueueId> {
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.tx
            .send((id, state_file))
            .map_err(|std::sync::mpsc::SendError((id, _))| {
                self.pending
                    .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                tracing::warn!(queue_id = %id, "spool remover gone; removing the message directly");
                id
            })
    }

    fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn lock(sched: &Mutex<Sched>) -> MutexGuard<'_, Sched> {
    sched.lock().unwrap_or_else(|e| e.into_inner())
}

/// The scheduler's books. A message is in at most one of `admitting`,
/// `active`, `settling` and `editing`, and while it is in one of them no
/// other path (scan, retry timer, flush, release) may admit it: each would
/// read the delivery state on disk, which is behind, and deliver again.
#[derive(Default)]
struct Sched {
    active: HashMap<QueueId, Active>,
    /// Being loaded and routed; not yet in `active`.
    admitting: HashSet<QueueId>,
    /// Done with a pass, its outcome not yet on disk: the state file is being
    /// written, or the files are waiting for the remover.
    settling: HashSet<QueueId>,
    /// An operator command is changing its files (see [`Delivery::edit`]).
    editing: HashSet<QueueId>,
    /// `postern queue flush` of everything, seconds since the epoch: a message
    /// last tried before it is due whatever its retry time says.
    flushed_at: u64,
    dests: HashMap<String, Dest>,
    /// Retry timers: (unix seconds, id).
    deferred: BinaryHeap<Reverse<(u64, QueueId)>>,
    /// The ids in `deferred`, so a scan does not add a second timer.
    timed: HashSet<QueueId>,
    /// Some messages are in the spool but neither active nor timed.
    scan_needed: bool,
    /// The start-up scan is reading the spool: no other scan runs meanwhile.
    starting: bool,
    /// ... because the active set was full: scan again soon, not every
    /// `SCAN_INTERVAL`.
    scan_soon: bool,
    /// Shutting down: no new jobs start.
    stopping: bool,
    last_scan: Option<Instant>,
    connections: usize,
    /// Destinations with jobs that wait for a global connection slot.
    starved: VecDeque<String>,
}

/// How a pass over a message ended, once its outcome is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Handed to the remover, which takes it out of `settling`.
    Removing,
    /// Tried again at this time (seconds since the epoch).
    Retry(u64),
    /// Nothing more to schedule (held, or deleted by the operator).
    Done,
}

impl Sched {
    /// Some path has the message in hand; every other keeps off it.
    fn in_hand(&self, id: &QueueId) -> bool {
        self.active.contains_key(id)
            || self.admitting.contains(id)
            || self.settling.contains(id)
            || self.editing.contains(id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    Held,
    Deleted,
}

struct Active {
    meta: Arc<QueuedMeta>,
    state: DeliveryState,
    jobs_left: usize,
    cancel: Option<Cancel>,
    body: Option<Arc<Vec<u8>>>,
    /// Some recipient of this pass has an outcome: false while every job
    /// found its recipients' domains suspended at the connection.
    tried: bool,
    /// The message may have a state file: it was read from the spool, not
    /// handed over from memory just after it was stored.
    state_file: bool,
}

struct Dest {
    target: Target,
    queue: VecDeque<Job>,
    connections: usize,
    backoff_until: Option<Instant>,
    backoff: Duration,
    last_error: Option<Reply>,
    /// Connections with nothing to do, waiting up to `IDLE_TIME` for a job
    /// (Postfix's connection cache): a send wakes one.
    idle: VecDeque<oneshot::Sender<()>>,
}

struct Job {
    id: QueueId,
    rcpts: Vec<usize>,
    /// The envelope sender for these recipients, when a route gave one
    /// (else the message's).
    sender: Option<Address>,
}

/// One recipient's result of one attempt.
#[derive(Debug, Clone)]
struct Outcome {
    status: Status,
    reply: Reply,
    remote: Option<String>,
    dsn_relayed: bool,
}

impl Outcome {
    fn from_error(e: &Error, remote: Option<String>) -> Outcome {
        Outcome {
            status: if e.is_transient() {
                Status::Deferred
            } else {
                Status::Failed
            },
            reply: e.reply(),
            remote,
            dsn_relayed: false,
        }
    }

    fn delivered(reply: Reply, remote: Option<String>, dsn_relayed: bool) -> Outcome {
        Outcome {
            status: Status::Delivered,
            reply,
            remote,
            dsn_relayed,
        }
    }
}

/// Facts about the attempt for the log record.
struct Attempt<'a> {
    route: &'a str,
    host: Option<&'a str>,
    addr: Option<SocketAddr>,
    tls: Option<&'static str>,
    /// The MTA-STS outcome of an MX delivery.
    mta_sts: Option<&'a str>,
    started: Instant,
}

/// How MTA-STS applies to one MX destination.
struct StsUse {
    /// Only the policy's hosts, over verified TLS.
    enforce: bool,
    policy: Arc<crate::authn::mta_sts::Policy>,
    /// For the log: mode, source, and what testing mode would refuse.
    outcome: String,
}

impl StsUse {
    /// The log's words for a connection to `host`.
    fn connected(&self, host: &str) -> String {
        if self.policy.allows(host) {
            format!("{}; matched {host}", self.outcome)
        } else {
            self.outcome.clone()
        }
    }

    /// The log's words for a destination the policy refused.
    fn refused(&self, why: &str) -> String {
        format!("{}; refused: {why}", self.outcome)
    }
}

/// A destination that could not be opened, with the MTA-STS outcome for
/// the attempt's log record.
struct Unopened {
    error: Error,
    mta_sts: Option<String>,
}

impl From<Error> for Unopened {
    fn from(error: Error) -> Unopened {
        Unopened {
            error,
            mta_sts: None,
        }
    }
}

impl Delivery {
    /// Starts delivery for a bound server, before it listens: opens the
    /// control socket, recovers the spool and listens for new messages. `own`
    /// are the relay's listening addresses (loop prevention).
    pub async fn start(ctx: &Arc<Context>, own: Vec<SocketAddr>) -> Result<Delivery, Error> {
        let config = ctx.config.clone();
        let d = &config.delivery;
        let dns = ctx.dns.clone();
        let tls = ClientTls::new(
            d.tls_ca.as_ref().map(|p| config.resolve(p)).as_deref(),
            d.tls_min_version,
        )
        .map_err(Error::Setup)?;
        let queue_dir = ctx.spool.root().join("queue");
        let suspended = Suspensions::load(ctx.spool.root())?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Spooled>();
        let sched = Arc::new(Mutex::new(Sched {
            starting: true,
            ..Default::default()
        }));
        let shared = Arc::new(Shared {
            admit_tx: tx.clone(),
            remover: Remover::start(ctx.spool.clone(), sched.clone()),
            reports: Reporter::start(ctx.chain.clone(), config.plugins.delivered_queue),
            pools: Pools::new(&config.delivery),
            timeouts: Timeouts::from(&d.timeouts),
            config: config.clone(),
            spool: ctx.spool.clone(),
            queue_dir,
            chain: ctx.chain.clone(),
            mta_sts: d
                .mta_sts
                .then(|| MtaSts::new(dns.clone(), tls.verified.clone(), d.mta_sts_port)),
            dns,
            tls,
            signer: ctx.signer.clone(),
            own,
            sched,
            timer: Notify::new(),
            suspended: std::sync::RwLock::new(suspended),
            suspend_writer: std::sync::Mutex::default(),
        });
        let _ = ctx.on_queued.set(tx);
        let delivery = Delivery { shared };
        // The control socket is bound already (`crate::admin::Admin::bind`),
        // so `postern queue` waits on it while the clean-up below runs.
        let removed = state::remove_orphans(&delivery.shared.queue_dir)?;
        if removed > 0 {
            tracing::info!(removed, "removed delivery states of messages already gone");
        }
        // The messages spooled before the start: each record read once,
        // for the queue's index and for delivery, while SMTP is served.
        tokio::spawn(delivery.shared.clone().start_up_scan());
        let admitter = delivery.shared.clone();
        tokio::spawn(async move {
            while let Some(spooled) = rx.recv().await {
                let id = spooled.id.clone();
                admitter.clone().admit_with(id, false, Some(spooled)).await;
            }
        });
        tokio::spawn(delivery.shared.clone().timer_loop());
        tokio::spawn(super::quarantine::sweep(
            delivery.clone(),
            config.delivery.quarantine_retention.0,
        ));
        Ok(delivery)
    }

    /// Stops starting deliveries and waits up to `grace` for the transactions
    /// in flight to finish and record their outcome, so that a clean restart
    /// delivers nothing twice.
    pub async fn shutdown(&self, grace: Duration) {
        {
            let mut s = self.shared.lock();
            s.stopping = true;
            // Idle connections wake, see `stopping` and close.
            for d in s.dests.values_mut() {
                for waiter in d.idle.drain(..) {
                    let _ = waiter.send(());
                }
            }
        }
        let deadline = Instant::now() + grace;
        while self.shared.lock().connections > 0 || self.shared.remover.pending() > 0 {
            if Instant::now() >= deadline {
                tracing::warn!("delivery shutdown grace period over; connections cut");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every outcome is on disk: the queue's books hold what the files
        // say, and the next start can answer from them at once.
        let spool = self.shared.spool.clone();
        let saved = off_runtime(move || {
            let path = spool.root().join(crate::queue::index::SAVED_FILE);
            spool
                .index()
                .save(&path)
                .map_err(|source| crate::queue::Error::Io { path, source })
        });
        if let Err(e) = saved.await {
            tracing::warn!(error = %e, "cannot save the queue's books");
        }
    }

    /// The spool folder.
    pub fn spool_root(&self) -> PathBuf {
        self.shared.spool.root().to_path_buf()
    }

    /// Outbound connections open now, and messages in the active set.
    pub(crate) fn load(&self) -> (usize, usize) {
        let s = self.shared.lock();
        (s.connections, s.active.len())
    }

    /// The spool's `queue/` folder.
    pub(crate) fn queue_dir(&self) -> &std::path::Path {
        &self.shared.queue_dir
    }

    /// The spool.
    pub(crate) fn spool(&self) -> &Spool {
        &self.shared.spool
    }

    /// Puts a message on hold (a delivery in flight finishes; nothing new starts).
    pub(crate) async fn hold(&self, id: &QueueId) -> Result<(), crate::queue::Error> {
        let on_active = |a: &mut Active| a.cancel = Some(Cancel::Held);
        self.edit(id, on_active, |dir, id| {
            super::control::set_hold(dir, id, true).map(Some)
        })
        .await
    }

    /// Releases a held message and tries it now.
    pub(crate) async fn release(&self, id: &QueueId) -> Result<(), crate::queue::Error> {
        let on_active = |a: &mut Active| {
            if a.cancel == Some(Cancel::Held) {
                a.cancel = None;
            }
        };
        self.edit(id, on_active, |dir, id| {
            super::control::set_hold(dir, id, false).map(Some)
        })
        .await?;
        self.shared.clone().admit(id.clone(), true).await;
        Ok(())
    }

    /// Deletes a message without a bounce.
    pub(crate) async fn delete(&self, id: &QueueId) -> Result<(), crate::queue::Error> {
        if !self.shared.queue_dir.join(id.as_str()).exists() {
            return Err(crate::queue::Error::NotFound(id.clone()));
        }
        let spool = self.shared.spool.clone();
        let on_active = |a: &mut Active| a.cancel = Some(Cancel::Deleted);
        self.edit(id, on_active, move |_, id| {
            state::remove_message(&spool, id).map(|()| None)
        })
        .await
    }

    /// An operator's change to a message. While a pass has the message in
    /// hand, its files are the scheduler's: an active message gets
    /// `on_active`, applied when the pass ends; one being admitted or settled
    /// is waited for. Otherwise the message is kept out of every pass while
    /// `edit` changes its files, so no pass reads them half-changed and no
    /// pass's newer state is written over with an older one. `edit` returns
    /// where the message stands afterwards, if it is still in the spool.
    async fn edit(
        &self,
        id: &QueueId,
        on_active: impl FnOnce(&mut Active),
        edit: impl FnOnce(&Path, &QueueId) -> Result<Option<(Place, Shape)>, crate::queue::Error>
            + Send
            + 'static,
    ) -> Result<(), crate::queue::Error> {
        let deadline = Instant::now() + EDIT_WAIT;
        loop {
            {
                let mut s = self.shared.lock();
                if let Some(a) = s.active.get_mut(id) {
                    on_active(a);
                    return Ok(());
                }
                if !s.in_hand(id) {
                    s.editing.insert(id.clone());
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(crate::queue::Error::Io {
                    path: self.shared.queue_dir.join(id.as_str()),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the message stayed busy in delivery; try again",
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (dir, eid) = (self.shared.queue_dir.clone(), id.clone());
        let edited = off_runtime(move || edit(&dir, &eid)).await;
        if let Ok(Some((place, shape))) = &edited {
            self.shared.spool.index().note(id, *place, shape.clone());
        }
        self.shared.lock().editing.remove(id);
        edited.map(drop)
    }

    /// Destinations suspended now.
    pub(crate) fn suspensions(&self) -> Vec<Suspension> {
        self.shared.suspended().list(unix_now())
    }

    /// Suspends (`Some(until)`, `until` none: until resumed) or resumes
    /// (`None`) delivery to a recipient domain, and saves the list. Returns
    /// false for a resume of a domain that was not suspended.
    pub(crate) async fn set_suspension(
        &self,
        domain: &str,
        suspend: Option<Option<u64>>,
    ) -> Result<bool, crate::queue::Error> {
        let shared = self.shared.clone();
        let domain = domain.to_string();
        let root = self.shared.spool.root().to_path_buf();
        off_runtime(move || {
            let _writer = shared
                .suspend_writer
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut next = shared.suspended().clone();
            let changed = match suspend {
                Some(until) => {
                    next.suspend(&domain, until);
                    true
                }
                None => next.resume(&domain),
            };
            next.save(&root)?;
            *shared.suspended.write().unwrap_or_else(|e| e.into_inner()) = next;
            Ok(changed)
        })
        .await
    }

    /// Makes each message due now and lets it in as the active set has room,
    /// the way a backlog is taken in (destination backoffs are lifted). A
    /// message being delivered is left to that delivery.
    pub(crate) async fn flush_many(&self, ids: &[QueueId]) -> Result<(), crate::queue::Error> {
        {
            let mut s = self.shared.lock();
            for d in s.dests.values_mut() {
                d.backoff_until = None;
            }
        }
        for id in ids {
            let flush = |dir: &Path, id: &QueueId| super::control::flush_file(dir, id).map(Some);
            match self.edit(id, |_| {}, flush).await {
                Ok(()) | Err(crate::queue::Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            self.shared.clone().admit(id.clone(), false).await;
        }
        Ok(())
    }

    /// Tries one message, or all deferred ones, now (destination backoffs are lifted).
    ///
    /// Flushing everything does not admit the whole spool at once: it makes
    /// every message tried before now due and asks for a scan, which admits
    /// them as the active set has room, the way it takes in any backlog.
    pub(crate) async fn flush(&self, id: Option<&QueueId>) -> Result<(), crate::queue::Error> {
        {
            let mut s = self.shared.lock();
            for d in s.dests.values_mut() {
                d.backoff_until = None;
            }
            if id.is_none() {
                s.flushed_at = unix_now();
                s.scan_needed = true;
                s.scan_soon = true;
                s.last_scan = None;
            }
        }
        match id {
            Some(id) => {
                if !self.shared.queue_dir.join(id.as_str()).exists() {
                    return Err(crate::queue::Error::NotFound(id.clone()));
                }
                self.shared.clone().admit(id.clone(), true).await;
            }
            None => self.shared.timer.notify_one(),
        }
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Sched> {
        lock(&self.sched)
    }

    fn suspended(&self) -> std::sync::RwLockReadGuard<'_, Suspensions> {
        self.suspended.read().unwrap_or_else(|e| e.into_inner())
    }

    fn max_deferred(&self) -> usize {
        self.config.delivery.max_active.saturating_mul(10)
    }

    fn push_deferred(&self, s: &mut Sched, at: u64, id: QueueId) {
        if s.timed.contains(&id) {
            return;
        }
        if s.deferred.len() >= self.max_deferred() {
            s.scan_needed = true;
            return;
        }
        s.timed.insert(id.clone());
        let earliest = s.deferred.peek().map(|Reverse((t, _))| *t);
        s.deferred.push(Reverse((at, id)));
        if earliest.is_none_or(|t| at < t) {
            self.timer.notify_one();
        }
    }

    /// Starts connections for a destination while it has jobs and slots.
    fn kick(self: &Arc<Self>, s: &mut Sched, key: &str) {
        let per_dest = self.config.delivery.max_per_destination;
        let global = self.config.delivery.max_connections;
        let now = Instant::now();
        if s.stopping {
            return;
        }
        let Some(d) = s.dests.get_mut(key) else {
            return;
        };
        if let Some(until) = d.backoff_until {
            if until > now {
                // Suspended: defer what arrives without touching the dead host.
                let jobs: Vec<Job> = d.queue.drain(..).collect();
                let reply = d
                    .last_error
                    .clone()
                    .unwrap_or_else(|| Reply::new(451, "4.4.1", "destination unreachable"));
                let suspended = Reply::new(
                    451,
                    "4.4.1",
                    format!("delivery temporarily suspended: {}", reply.text()),
                );
                let me = self.clone();
                let key = key.to_string();
                tokio::spawn(async move {
                    for job in jobs {
                        let o = Outcome {
                            status: Status::Deferred,
                            reply: suspended.clone(),
                            remote: None,
                            dsn_relayed: false,
                        };
                        let results = job.rcpts.iter().map(|&i| (i, o.clone())).collect();
                        me.complete_job(&job.id, results, &attempt_for(&key)).await;
                    }
                });
                return;
            }
            d.backoff_until = None;
        }
        // Idle connections first: reuse beats a new TCP and SMTP handshake.
        let mut unserved = d.queue.len();
        while unserved > 0 {
            let Some(waiter) = d.idle.pop_front() else {
                break;
            };
            if waiter.send(()).is_ok() {
                unserved -= 1;
            }
        }
        let mut starved = false;
        while unserved > 0 && d.connections < per_dest {
            unserved -= 1;
            if s.connections >= global {
                starved = true;
                break;
            }
            d.connections += 1;
            s.connections += 1;
            tokio::spawn(self.clone().connection(key.to_string()));
        }
        if starved && !s.starved.iter().any(|k| k == key) {
            s.starved.push_back(key.to_string());
        }
    }

    /// Queues a job on its destination (made if new) and starts connections.
    fn enqueue(self: &Arc<Self>, s: &mut Sched, target: Target, job: Job) {
        let key = target.key();
        let dest = s.dests.entry(key.clone()).or_insert_with(|| Dest {
            target,
            queue: VecDeque::new(),
            connections: 0,
            backoff_until: None,
            backoff: Duration::ZERO,
            last_error: None,
            idle: VecDeque::new(),
        });
        dest.queue.push_back(job);
        self.kick(s, &key);
    }

    /// True for a message that a scan need not read, as the queue's index
    /// has it: held, or deferred to a time still to come (it gets its retry
    /// timer, as admission would give it). After a flush of everything,
    /// deferred messages may be due before their time: they are read.
    fn waits(&self, id: &QueueId) -> bool {
        match self.spool.index().place(id) {
            Some(Place::Held | Place::Quarantine) => true,
            Some(Place::Deferred(at)) if at > unix_now() => {
                let mut s = self.lock();
                if s.flushed_at != 0 {
                    return false;
                }
                self.push_deferred(&mut s, at, id.clone());
                true
            }
            _ => false,
        }
    }

    async fn timer_loop(self: Arc<Self>) {
        loop {
            let (due, wait, scan) = {
                let mut s = self.lock();
                let now = unix_now();
                let mut due = Vec::new();
                while let Some(Reverse((t, _))) = s.deferred.peek() {
                    if *t > now {
                        break;
                    }
                    if let Some(Reverse((_, id))) = s.deferred.pop() {
                        s.timed.remove(&id);
                        due.push(id);
                    }
                }
                let every = if s.scan_soon {
                    Duration::from_secs(1)
                } else {
                    SCAN_INTERVAL
                };
                let wait = s
                    .deferred
                    .peek()
                    .map(|Reverse((t, _))| Duration::from_secs(t.saturating_sub(now)))
                    .unwrap_or(SCAN_INTERVAL)
                    .min(every);
                let scan = s.scan_needed
                    && !s.stopping
                    && !s.starting
                    && s.active.len() < self.config.delivery.max_active / 2 + 1
                    && s.last_scan.is_none_or(|t| t.elapsed() >= every);
                if scan {
                    s.scan_needed = false;
                    s.scan_soon = false;
                    s.last_scan = Some(Instant::now());
                }
                // Destinations idle since their backoff ended are forgotten.
                let now_i = Instant::now();
                s.dests.retain(|_, d| {
                    d.connections > 0
                        || !d.queue.is_empty()
                        || d.backoff_until.is_some_and(|u| u > now_i)
                });
                (due, wait, scan)
            };
            for id in due {
                self.clone().admit(id, false).await;
            }
            if scan {
                match self.spool.list() {
                    Ok(ids) => {
                        for id in ids {
                            if !self.waits(&id) {
                                self.clone().admit(id, false).await;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot scan the spool"),
                }
                continue;
            }
            // Timers have one-second resolution; wake at the next second boundary.
            let wait = if wait.is_zero() {
                Duration::from_millis(200)
            } else {
                wait
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.timer.notified() => {}
            }
        }
    }
}

/// When the first of several suspensions ends: `held` so far (`None`: no
/// suspension yet) and one more ending at `until`; `None` inside is "at a
/// resume", which ends later than any time.
fn sooner(held: Option<Option<u64>>, until: Option<u64>) -> Option<u64> {
    match (held, until) {
        (None, u) => u,
        (Some(Some(a)), Some(b)) => Some(a.min(b)),
        (Some(a), b) => a.or(b),
    }
}

fn attempt_for(key: &str) -> Attempt<'_> {
    Attempt {
        route: key,
        host: None,
        addr: None,
        tls: None,
        mta_sts: None,
        started: Instant::now(),
    }
}
