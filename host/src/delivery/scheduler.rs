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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{mpsc, oneshot, Notify};

use super::bounce;
use super::client::{Client, Hop, Outgoing, Timeouts, TlsUse};
use super::dns::Dns;
use super::pools::Pools;
use super::route::{decide, Decision, Target, Via};
use super::state::{self, unix_now, DeliveryState, Status};
use super::suspend::{Suspension, Suspensions};
use super::tls::ClientTls;
use super::Error;
use crate::admin::metrics::{metrics, DeliveryOutcome, Direction, Label, Result_, Source};
use crate::authn::mta_sts::{Mode, MtaSts};
use crate::config::Config;
use crate::envelope::Address;
use crate::plugins::delivered::{self, Reporter};
use crate::plugins::ChainHandle;
use crate::policy::{Queued, RouteQuery};
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

    /// Loads a message and queues jobs for its open recipients, unless it is
    /// held, not due (and not `force`d), already in the books, or there is no
    /// room (a `force`d one, an operator's single command, is let in anyway).
    async fn admit(self: Arc<Self>, id: QueueId, force: bool) {
        self.admit_with(id, force, None).await;
    }

    /// [`Shared::admit`], for a message that may have just been spooled: its
    /// record and bytes come along, so nothing is read back from disk.
    async fn admit_with(self: Arc<Self>, id: QueueId, force: bool, fresh: Option<Spooled>) {
        {
            let mut s = self.lock();
            if s.stopping || s.in_hand(&id) {
                return;
            }
            let full = s.active.len() + s.admitting.len() >= self.config.delivery.max_active;
            if full && !force {
                // Dropping `fresh` lets the scan find the message on disk.
                s.scan_needed = true;
                s.scan_soon = true;
                return;
            }
            s.admitting.insert(id.clone());
        }
        let given = match fresh {
            Some(mut f) => {
                f.taken_in();
                Given::Fresh(Box::new(f))
            }
            None => Given::Nothing,
        };
        self.admit_claimed(id, force, given).await;
    }

    /// Admits a message already put in `admitting`, and takes it out.
    async fn admit_claimed(self: Arc<Self>, id: QueueId, force: bool, given: Given) {
        let result = self.clone().admit_inner(&id, force, given).await;
        self.lock().admitting.remove(&id);
        if let Err(e) = result {
            tracing::warn!(queue_id = %id, error = %e, "cannot load spooled message");
        }
    }

    async fn admit_inner(
        self: Arc<Self>,
        id: &QueueId,
        force: bool,
        given: Given,
    ) -> Result<(), Error> {
        // A message just spooled has no delivery state yet, and its bytes
        // are at hand; one found in the spool is read only if it is due.
        let state_file = !matches!(given, Given::Fresh(_));
        let on_disk = |(stored, dstate): (StoredMessage, DeliveryState)| {
            (
                Arc::new(stored.meta.clone()),
                dstate,
                Body::OnDisk(Box::new(stored)),
            )
        };
        let (meta, mut dstate, body) = match given {
            Given::Fresh(f) => {
                let f = *f;
                let dstate = DeliveryState::new(&f.meta);
                (Arc::new(f.meta), dstate, Body::InMemory(f.message))
            }
            Given::Read(read) => on_disk(*read),
            Given::Nothing => {
                let (spool, dir, qid) = (self.spool.clone(), self.queue_dir.clone(), id.clone());
                match off_runtime(move || Ok(read_record(&spool, &dir, &qid))).await? {
                    Some(read) => on_disk(read),
                    None => return Ok(()),
                }
            }
        };
        if dstate.is_held(&meta) {
            return Ok(());
        }
        let now = unix_now();
        if !force && dstate.next_attempt > now {
            let mut s = self.lock();
            if dstate.last_attempt >= s.flushed_at {
                self.push_deferred(&mut s, dstate.next_attempt, id.clone());
                return Ok(());
            }
        }
        let body = match body {
            Body::InMemory(body) => body,
            Body::OnDisk(stored) => Arc::new(off_runtime(move || stored.read_message()).await?),
        };
        let expired =
            now.saturating_sub(dstate.age_from(&meta)) >= self.config.delivery.max_age.0.as_secs();
        // One lease for the message: its recipients share the instances.
        let mut hooks = self.chain.current().lease();
        let headers = &body[..header_end(&body)];
        // One job per destination and envelope sender.
        let mut groups: HashMap<(String, Option<Address>), (Destination, Vec<usize>)> =
            HashMap::new();
        // Recipients left alone because their domain is suspended: when they
        // are all there is, the message waits without an attempt counted,
        // until the earliest suspension ends (`None`: until a resume).
        let mut held_back: Option<Option<u64>> = None;
        let mut decided = false;
        // Recipients given an outcome here, without a connection.
        let mut settled_here = false;
        for (i, rcpt) in meta.envelope.recipients.iter().enumerate() {
            if !dstate.recipients[i].is_open() {
                continue;
            }
            if expired {
                // finalize() turns open recipients of an expired message into failures.
                continue;
            }
            if let Some(until) = self.suspended().blocks(rcpt.address.domain(), now) {
                held_back = Some(sooner(held_back, until));
                continue;
            }
            decided = true;
            let route = hooks
                .route(RouteQuery {
                    queued: Queued::of(&meta, id),
                    recipient: rcpt,
                    headers,
                })
                .await;
            let attempt = |route: &'static str| Attempt {
                route,
                host: None,
                addr: None,
                tls: None,
                mta_sts: None,
                started: Instant::now(),
            };
            let sender = route.sender;
            match decide(&self.config.delivery, route.route, rcpt) {
                Decision::Deliver(target) => {
                    groups
                        .entry((target.key(), sender))
                        .or_insert_with(|| (Destination::Fixed(target), Vec::new()))
                        .1
                        .push(i);
                }
                Decision::Pool { name, require_tls } => {
                    groups
                        .entry((format!("pool:{name}"), sender))
                        .or_insert_with(|| (Destination::Pool { name, require_tls }, Vec::new()))
                        .1
                        .push(i);
                }
                Decision::Discard => {
                    settled_here = true;
                    let o = Outcome::delivered(
                        Reply::new(250, "2.0.0", "discarded by route"),
                        None,
                        false,
                    );
                    self.apply(id, &meta, &mut dstate, i, &o, &attempt("discard"));
                }
                Decision::Reject(reply) => {
                    settled_here = true;
                    // A 4xx from the route hook (a plugin's tempfail, or its
                    // on_error = "tempfail") defers the recipient; anything
                    // else that is not a 5xx is made one.
                    let (status, reply) = match reply.code {
                        400..=499 => (Status::Deferred, reply),
                        500..=599 => (Status::Failed, reply),
                        _ => (
                            Status::Failed,
                            Reply::new(550, "5.7.1", reply.text().to_string()),
                        ),
                    };
                    let o = Outcome {
                        status,
                        reply,
                        remote: None,
                        dsn_relayed: false,
                    };
                    self.apply(id, &meta, &mut dstate, i, &o, &attempt("reject"));
                }
                Decision::LocalFolder(dir) => {
                    settled_here = true;
                    let o = match self.write_local(&dir, id, i, &body) {
                        Ok(path) => Outcome::delivered(
                            Reply::new(250, "2.0.0", format!("filed as {}", path.display())),
                            None,
                            false,
                        ),
                        Err(e) => Outcome::from_error(&e, None),
                    };
                    self.apply(id, &meta, &mut dstate, i, &o, &attempt("local"));
                }
            }
        }
        if let (true, false, Some(until)) = (groups.is_empty(), decided, held_back) {
            if let Some(at) = until {
                let mut s = self.lock();
                self.push_deferred(&mut s, at, id.clone());
            }
            return Ok(());
        }
        let body = (meta.size <= CACHE_BODY_MAX).then_some(body);
        let active = Active {
            meta: meta.clone(),
            state: dstate,
            jobs_left: groups.len(),
            cancel: None,
            body,
            tried: settled_here || groups.is_empty(),
            state_file,
        };
        if groups.is_empty() {
            self.lock().settling.insert(id.clone());
            self.finalize(id.clone(), active).await;
            return Ok(());
        }
        let mut s = self.lock();
        s.active.insert(id.clone(), active);
        for ((_, sender), (destination, rcpts)) in groups {
            let target = match destination {
                Destination::Fixed(target) => target,
                Destination::Pool { name, require_tls } => {
                    let suspended = |k: &str| s.dests.get(k).and_then(|d| d.backoff_until);
                    match self.pools.pick(&name, require_tls, None, suspended) {
                        Some(target) => target,
                        // A pool the config had when the route was decided,
                        // gone since: cannot happen while the config is fixed
                        // for the process; deferred rather than lost if it did.
                        None => {
                            tracing::warn!(queue_id = %id, pool = name, "no such pool");
                            continue;
                        }
                    }
                }
            };
            let job = Job {
                id: id.clone(),
                rcpts,
                sender,
            };
            self.enqueue(&mut s, target, job);
        }
        Ok(())
    }

    fn write_local(
        &self,
        dir: &str,
        id: &QueueId,
        i: usize,
        body: &[u8],
    ) -> Result<PathBuf, Error> {
        let base = self.config.resolve(&self.config.delivery.local_folder);
        let rel = std::path::Path::new(dir);
        let bad = rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)));
        let folder = base.join(rel);
        let path = folder.join(format!("{id}.{i}.eml"));
        let io = |source| Error::LocalFolder {
            path: path.clone(),
            source,
        };
        if bad {
            return Err(io(std::io::Error::other(
                "folder must be relative, without ..",
            )));
        }
        std::fs::create_dir_all(&folder).map_err(io)?;
        let tmp = folder.join(format!("{id}.{i}.eml.tmp"));
        (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })()
        .map_err(io)?;
        Ok(path)
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

    /// One outbound connection: takes jobs from its destination until none is left.
    async fn connection(self: Arc<Self>, key: String) {
        let mut client: Option<Client> = None;
        // Addresses of the destination used up by `client` (for MX fallback).
        let mut used = 0;
        loop {
            let next = {
                let mut s = self.lock();
                if s.stopping {
                    break;
                }
                let Some(d) = s.dests.get_mut(&key) else {
                    break;
                };
                let target = d.target.clone();
                match d.queue.pop_front() {
                    Some(job) => {
                        let info = s
                            .active
                            .get(&job.id)
                            .map(|a| (a.meta.clone(), a.body.clone(), a.cancel));
                        Ok((job, target, info))
                    }
                    // Registered under the same lock that found the queue empty,
                    // so a job queued right after finds this connection.
                    None if client.as_ref().is_some_and(Client::is_usable) => {
                        let (tx, rx) = oneshot::channel();
                        d.idle.push_back(tx);
                        Err(Some(rx))
                    }
                    None => Err(None),
                }
            };
            let (job, target, info) = match next {
                Ok(next) => next,
                Err(Some(wake)) => match tokio::time::timeout(IDLE_TIME, wake).await {
                    Ok(Ok(())) => continue,
                    _ => break,
                },
                Err(None) => break,
            };
            let Some((meta, body, cancel)) = info else {
                continue;
            };
            if cancel.is_some() {
                self.complete_job(&job.id, Vec::new(), &attempt_for(&key))
                    .await;
                continue;
            }
            let body = match body {
                Some(b) => b,
                None => match self.read_spooled(&job.id).await {
                    Ok(b) => Arc::new(b),
                    Err(e) => {
                        let e = Error::from(e);
                        let results = job
                            .rcpts
                            .iter()
                            .map(|&i| (i, Outcome::from_error(&e, None)))
                            .collect();
                        self.complete_job(&job.id, results, &attempt_for(&key))
                            .await;
                        continue;
                    }
                },
            };
            let started = Instant::now();
            // A connection kept from an earlier job may have been closed by
            // the other side meanwhile; a new one is not.
            let mut kept = true;
            if !client.as_ref().is_some_and(Client::is_usable) {
                kept = false;
                match self.open(&target, 0).await {
                    Ok((c, n)) => {
                        client = Some(c);
                        used = n;
                    }
                    Err(e) => {
                        self.destination_failed(&key, &e, Some(job)).await;
                        break;
                    }
                }
            }
            // The operator may have suspended a recipient's domain since the
            // job was queued (a connection works through its destination's
            // queue one message after another): those recipients stay open
            // and untried, for after the resume.
            let job = self.without_suspended(job, &meta);
            if job.rcpts.is_empty() {
                self.complete_job(&job.id, Vec::new(), &attempt_for(&key))
                    .await;
                continue;
            }
            let outgoing = Outgoing {
                sender: job.sender.as_ref().unwrap_or(&meta.envelope.sender),
                params: &meta.envelope.params,
                recipients: job
                    .rcpts
                    .iter()
                    .map(|&i| &meta.envelope.recipients[i])
                    .collect(),
                message: &body,
            };
            let mut fell_back = false;
            let sent = loop {
                let Some(c) = client.as_mut() else {
                    unreachable!("a usable client was just ensured")
                };
                let remote = Some(format!("{} [{}]", c.host, c.peer.ip()));
                let dsn = c.supports_dsn();
                let sent = c.send(&outgoing).await;
                // RFC 5321 5.1: a temporary refusal of the transaction by one
                // MX host is a reason to try the next one now, not in an hour.
                let refused_4xx = matches!(
                    &sent,
                    Err(Error::Rejected { stage: "MAIL", reply }) if reply.code < 500
                );
                if refused_4xx && !fell_back && matches!(target.via, Via::Mx(_)) {
                    fell_back = true;
                    if let Ok((next, n)) = self.open(&target, used).await {
                        if let Some(old) = client.replace(next) {
                            old.quit().await;
                        }
                        used = n;
                        continue;
                    }
                }
                // A kept connection lost before the transaction began (the
                // other side closed it while idle, or went down): nothing
                // was sent, so a new connection tries again at once, and if
                // none opens the destination is down.
                if kept && matches!(&sent, Err(Error::Io { stage: "MAIL", .. })) {
                    kept = false;
                    client = None;
                    match self.open(&target, 0).await {
                        Ok((c, n)) => {
                            client = Some(c);
                            used = n;
                            continue;
                        }
                        Err(e) => break Err(e),
                    }
                }
                let results: Vec<(usize, Outcome)> = match sent {
                    Ok(per_rcpt) => job
                        .rcpts
                        .iter()
                        .zip(per_rcpt)
                        .map(|(&i, r)| {
                            let o = match r {
                                Ok(reply) => Outcome::delivered(reply, remote.clone(), dsn),
                                Err(e) => Outcome::from_error(&e, remote.clone()),
                            };
                            (i, o)
                        })
                        .collect(),
                    Err(e) => job
                        .rcpts
                        .iter()
                        .map(|&i| (i, Outcome::from_error(&e, remote.clone())))
                        .collect(),
                };
                break Ok((results, c.host.clone(), c.peer, c.tls, c.mta_sts.clone()));
            };
            let (results, host, addr, tls, mta_sts) = match sent {
                Ok(sent) => sent,
                Err(e) => {
                    self.destination_failed(&key, &e, Some(job)).await;
                    break;
                }
            };
            let attempt = Attempt {
                route: &key,
                host: Some(&host),
                addr: Some(addr),
                tls,
                mta_sts: mta_sts.as_deref(),
                started,
            };
            self.complete_job(&job.id, results, &attempt).await;
            let mut s = self.lock();
            if let Some(d) = s.dests.get_mut(&key) {
                d.backoff = Duration::ZERO;
            }
        }
        if let Some(c) = client {
            c.quit().await;
        }
        let mut s = self.lock();
        s.connections -= 1;
        let remove = match s.dests.get_mut(&key) {
            Some(d) => {
                d.connections -= 1;
                if d.connections == 0 {
                    d.idle.clear();
                }
                d.connections == 0 && d.queue.is_empty() && d.backoff_until.is_none()
            }
            None => false,
        };
        if remove {
            s.dests.remove(&key);
        } else {
            self.kick(&mut s, &key);
        }
        while s.connections < self.config.delivery.max_connections {
            let Some(k) = s.starved.pop_front() else {
                break;
            };
            self.kick(&mut s, &k);
        }
    }

    /// `job` less its recipients whose domain is suspended now.
    fn without_suspended(&self, mut job: Job, meta: &QueuedMeta) -> Job {
        let suspended = self.suspended();
        if suspended.is_empty() {
            return job;
        }
        let now = unix_now();
        let before = job.rcpts.len();
        job.rcpts.retain(|&i| {
            let domain = meta.envelope.recipients[i].address.domain();
            suspended.blocks(domain, now).is_none()
        });
        if job.rcpts.len() < before {
            tracing::info!(queue_id = %job.id, held_back = before - job.rcpts.len(),
                "recipients held back: their domain was suspended");
        }
        job
    }

    /// The destination could not be reached: suspend it for a while (doubling,
    /// from the first retry interval up to the last), and defer or fail its
    /// queued jobs (and `failed`, the one that found it down) with the same
    /// reason. A pool host's jobs go to the pool's next host at once instead,
    /// when one is up.
    async fn destination_failed(self: &Arc<Self>, key: &str, why: &Unopened, failed: Option<Job>) {
        let e = &why.error;
        let jobs: Vec<Job> = {
            let mut s = self.lock();
            let retry = &self.config.delivery.retry;
            let Some(d) = s.dests.get_mut(key) else {
                return;
            };
            if e.is_transient() {
                let first = retry
                    .first()
                    .map(|r| r.0)
                    .unwrap_or(Duration::from_secs(60));
                let last = retry.last().map(|r| r.0).unwrap_or(first);
                d.backoff = if d.backoff.is_zero() {
                    first
                } else {
                    (d.backoff * 2).min(last)
                };
                d.backoff_until = Some(Instant::now() + d.backoff);
                d.last_error = Some(e.reply());
                tracing::info!(destination = key, backoff = ?d.backoff, reason = %e, "destination suspended");
            }
            let pool = match &d.target.via {
                Via::PoolHost { pool, .. } if e.is_transient() => {
                    Some((pool.clone(), d.target.require_tls))
                }
                _ => None,
            };
            let jobs: Vec<Job> = failed.into_iter().chain(d.queue.drain(..)).collect();
            match pool {
                Some((pool, require_tls)) => {
                    self.to_next_pool_host(&mut s, &pool, require_tls, key, jobs)
                }
                None => jobs,
            }
        };
        for job in jobs {
            let results = job
                .rcpts
                .iter()
                .map(|&i| (i, Outcome::from_error(e, None)))
                .collect();
            let attempt = Attempt {
                mta_sts: why.mta_sts.as_deref(),
                ..attempt_for(key)
            };
            self.complete_job(&job.id, results, &attempt).await;
        }
        self.timer.notify_one();
    }

    /// Moves jobs from pool host `failed` to the pool's next host that is up;
    /// returns those that found none.
    fn to_next_pool_host(
        self: &Arc<Self>,
        s: &mut Sched,
        pool: &str,
        require_tls: bool,
        failed: &str,
        jobs: Vec<Job>,
    ) -> Vec<Job> {
        let mut stranded = Vec::new();
        for job in jobs {
            let suspended = |k: &str| s.dests.get(k).and_then(|d| d.backoff_until);
            match self.pools.pick(pool, require_tls, Some(failed), suspended) {
                Some(target) => {
                    tracing::info!(queue_id = %job.id, from = failed, to = %target.key(), "pool host down; sent to the next");
                    self.enqueue(s, target, job);
                }
                None => stranded.push(job),
            }
        }
        stranded
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

    /// Opens a connection to a destination: MX hosts in order (or the smart
    /// host), each of their addresses, until one gets as far as MAIL.
    /// `skip` addresses are passed over (those tried by an earlier connection);
    /// returns the client and how many addresses are used up with it.
    async fn open(&self, target: &Target, skip: usize) -> Result<(Client, usize), Unopened> {
        let d = &self.config.delivery;
        let mut mta_sts = None;
        let (hosts, port, tls_use, credentials) = match &target.via {
            Via::Mx(domain) => {
                let mut hosts: Vec<String> = self
                    .dns
                    .mx_hosts(domain)
                    .await?
                    .into_iter()
                    .map(|h| h.name)
                    .collect();
                let mut tls = if target.require_tls {
                    TlsUse::Required
                } else {
                    TlsUse::Opportunistic
                };
                if let Some(sts) = self.mta_sts(domain, &hosts).await {
                    if sts.enforce {
                        // Only the hosts the policy lists, over verified TLS:
                        // never another host, never clear text.
                        hosts.retain(|h| sts.policy.allows(h));
                        if hosts.is_empty() {
                            return Err(Unopened {
                                error: Error::MtaSts(format!(
                                    "no MX host of {domain} is in its policy ({})",
                                    sts.outcome
                                )),
                                mta_sts: Some(sts.refused("no MX host in the policy")),
                            });
                        }
                        tls = TlsUse::Required;
                    }
                    mta_sts = Some(sts);
                }
                (hosts, d.mx_port, tls, None)
            }
            Via::Smarthost(sh) | Via::PoolHost { host: sh, .. } => {
                let tls = if sh.implicit_tls {
                    TlsUse::Implicit
                } else if target.require_tls {
                    TlsUse::Required
                } else if sh.credentials.is_some() {
                    TlsUse::OfferedVerified
                } else {
                    TlsUse::Opportunistic
                };
                (vec![sh.host.clone()], sh.port, tls, sh.credentials.as_ref())
            }
        };
        // A pinned next hop gets TLS or nothing: never the clear-text retry.
        let (tls_use, pinned) = if target.pins.is_empty() {
            (tls_use, None)
        } else {
            let implicit = matches!(&target.via, Via::Smarthost(sh) if sh.implicit_tls);
            let config = self.tls.pinned(&target.pins).map_err(Error::Setup)?;
            let tls_use = if implicit {
                TlsUse::Implicit
            } else {
                TlsUse::Required
            };
            (tls_use, Some(config))
        };
        let mut last_error: Option<Error> = None;
        // Hosts an enforced policy allowed that had no valid TLS for it.
        let mut without_tls: Vec<&str> = Vec::new();
        let mut tried = 0;
        let mut looped = false;
        for host in &hosts {
            let addrs = match self.dns.addresses(host).await {
                Ok(a) => a,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            for ip in addrs {
                let addr = SocketAddr::new(ip, port);
                if self.is_own(addr) {
                    looped = true;
                    continue;
                }
                if tried == MAX_ADDRESSES {
                    break;
                }
                tried += 1;
                if tried <= skip {
                    continue;
                }
                let hop = Hop {
                    host,
                    addr,
                    tls: tls_use,
                    credentials,
                    pinned: pinned.clone(),
                };
                let mut connected =
                    Client::connect(&hop, &self.config.hostname, &self.tls, self.timeouts).await;
                // Like Postfix's "may" level: when opportunistic TLS fails in the
                // handshake, the same host is tried again in clear text, which is
                // what it would have got from a server without STARTTLS.
                if tls_use == TlsUse::Opportunistic && matches!(connected, Err(Error::Tls(_))) {
                    let plain = Hop {
                        tls: TlsUse::Plain,
                        ..hop.clone()
                    };
                    connected =
                        Client::connect(&plain, &self.config.hostname, &self.tls, self.timeouts)
                            .await;
                }
                match connected {
                    Ok(mut c) => {
                        c.mta_sts = mta_sts.as_ref().map(|sts| sts.connected(host));
                        metrics().outbound.inc(Result_::Ok);
                        if let Some(v) = c.tls {
                            metrics().tls_session(Direction::Outbound, v);
                        }
                        return Ok((c, tried));
                    }
                    Err(e) => {
                        metrics().outbound.inc(Result_::Failed);
                        tracing::debug!(host = %host, %addr, error = %e, "next hop failed; trying the next");
                        let enforced = mta_sts.as_ref().is_some_and(|sts| sts.enforce);
                        if enforced
                            && matches!(e, Error::Tls(_))
                            && !without_tls.contains(&host.as_str())
                        {
                            without_tls.push(host);
                        }
                        last_error = Some(e);
                    }
                }
            }
        }
        let error = match last_error {
            Some(e) => e,
            None if looped => Error::Loop(target.key()),
            None => Error::Dns {
                name: target.key(),
                message: "no address to connect to".into(),
                transient: true,
            },
        };
        let mta_sts = mta_sts.map(|sts| {
            if without_tls.is_empty() {
                sts.outcome
            } else {
                sts.refused(&format!("no valid TLS at {}", without_tls.join(" ")))
            }
        });
        Err(Unopened { error, mta_sts })
    }

    /// The MTA-STS policy of an MX destination, and the words for the log:
    /// its mode and where it came from, and in testing mode the hosts
    /// enforce would refuse.
    async fn mta_sts(&self, domain: &str, hosts: &[String]) -> Option<StsUse> {
        let sts = self.mta_sts.as_ref()?;
        if domain.starts_with('[') {
            return None;
        }
        let found = sts.policy(domain).await?;
        let mode = found.policy.mode;
        let outcome = format!("{} ({})", mode.as_str(), found.source);
        match mode {
            Mode::Enforce => Some(StsUse {
                enforce: true,
                policy: found.policy,
                outcome,
            }),
            Mode::Testing => {
                let refused: Vec<&str> = hosts
                    .iter()
                    .filter(|h| !found.policy.allows(h))
                    .map(String::as_str)
                    .collect();
                let outcome = if refused.is_empty() {
                    outcome
                } else {
                    let refused = refused.join(" ");
                    tracing::info!(domain, refused = %refused, "MTA-STS testing: MX hosts not in the policy, delivering anyway");
                    format!("{outcome}; not in policy: {refused}")
                };
                Some(StsUse {
                    enforce: false,
                    policy: found.policy,
                    outcome,
                })
            }
            Mode::None => None,
        }
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == addr.ip()
                    || (own.ip().is_unspecified()
                        && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
        })
    }

    /// Records a job's outcomes; the last job of a message finalizes it.
    async fn complete_job(
        self: &Arc<Self>,
        id: &QueueId,
        results: Vec<(usize, Outcome)>,
        attempt: &Attempt<'_>,
    ) {
        let finished = {
            let mut s = self.lock();
            let Some(a) = s.active.get_mut(id) else {
                return;
            };
            let meta = a.meta.clone();
            for (i, o) in &results {
                self.apply(id, &meta, &mut a.state, *i, o, attempt);
            }
            a.tried |= !results.is_empty();
            a.jobs_left = a.jobs_left.saturating_sub(1);
            if a.jobs_left == 0 {
                let a = s.active.remove(id);
                s.settling.insert(id.clone());
                if s.scan_soon && s.active.len() < self.config.delivery.max_active / 2 + 1 {
                    self.timer.notify_one();
                }
                a
            } else {
                None
            }
        };
        if let Some(a) = finished {
            self.clone().finalize(id.clone(), a).await;
        }
    }

    /// After every job of a pass, for a message that is `settling`: records
    /// the outcome, then ends `settling` once it is on disk (the remover ends
    /// it for a message it removes).
    async fn finalize(self: Arc<Self>, id: QueueId, a: Active) {
        let settled = self.clone().settle(&id, a).await;
        if settled == Settled::Removing {
            return;
        }
        let mut s = self.lock();
        s.settling.remove(&id);
        if let Settled::Retry(at) = settled {
            self.push_deferred(&mut s, at, id);
        }
    }

    /// Expiry, DSNs, then either the new state on disk or removal from the spool.
    async fn settle(self: Arc<Self>, id: &QueueId, mut a: Active) -> Settled {
        if a.cancel == Some(Cancel::Deleted) {
            if let Err(e) = state::remove_message(&self.spool, id) {
                tracing::warn!(queue_id = %id, error = %e, "cannot remove deleted message");
            }
            tracing::info!(queue_id = %id, "deleted by the operator");
            return Settled::Done;
        }
        let meta = a.meta.clone();
        let now = unix_now();
        if !a.tried && a.cancel.is_none() {
            return self.held_back(&meta, &a.state, now);
        }
        a.state.attempts += 1;
        let age = now.saturating_sub(a.state.age_from(&meta));
        let max_age = self.config.delivery.max_age.0.as_secs();
        for (i, r) in a.state.recipients.iter_mut().enumerate() {
            if r.is_open() && age >= max_age {
                let last = r.last_reply.clone().unwrap_or_else(|| "no attempt".into());
                r.status = Status::Failed;
                r.enhanced = Some("4.4.7".into());
                r.last_reply = Some(format!(
                    "554 4.4.7 message expired after {}; last reply: {last}",
                    self.config.delivery.max_age
                ));
                tracing::info!(queue_id = %id, recipient = meta.envelope.recipients[i].address.as_str(),
                    outcome = "expired", "delivery attempt");
                metrics().deliveries.inc(DeliveryOutcome::Expired);
                metrics().recent_delivery(crate::admin::metrics::RecentDelivery {
                    at: now,
                    queue_id: id.to_string(),
                    recipient: meta.envelope.recipients[i].address.to_string(),
                    outcome: "expired",
                    reply: r.last_reply.clone().unwrap_or_default(),
                });
            }
        }
        // DSNs for what is final and not yet reported.
        let mut notice = Vec::new();
        for (i, r) in a.state.recipients.iter_mut().enumerate() {
            if r.notified || r.is_open() {
                continue;
            }
            if bounce::wants_notice(&meta.envelope.recipients[i], r) {
                notice.push(i);
            } else {
                r.notified = true;
            }
        }
        if age >= self.config.delivery.delay_warning.0.as_secs() {
            for (i, r) in a.state.recipients.iter().enumerate() {
                if bounce::wants_delay_notice(&meta.envelope.recipients[i], r) {
                    notice.push(i);
                }
            }
        }
        if !notice.is_empty() {
            match self.send_notice(id, &meta, &a, &notice).await {
                Ok(dsn) => {
                    for i in &notice {
                        let r = &mut a.state.recipients[*i];
                        if r.is_open() {
                            r.delay_notified = true;
                        } else {
                            r.notified = true;
                        }
                    }
                    if let Some(dsn) = dsn {
                        // Through the admission channel: calling admit from here
                        // would make the futures recursive.
                        let _ = self.admit_tx.send(dsn);
                    }
                }
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "cannot queue the delivery status notification; retrying later")
                }
            }
        }
        if a.cancel == Some(Cancel::Held) {
            a.state.held = true;
        }
        if !a.state.has_work() {
            let state_file = a.state_file;
            let Err(id) = self.remover.remove(id.clone(), state_file) else {
                return Settled::Removing;
            };
            // No remover thread (it cannot fail, but the message must not
            // stay on disk as undelivered): remove it here.
            let spool = self.spool.clone();
            let qid = id.clone();
            if let Err(e) = off_runtime(move || state::remove_files(&spool, &qid, state_file)).await
            {
                tracing::warn!(queue_id = %id, error = %e, "cannot remove delivered message");
            }
            return Settled::Done;
        }
        let attempts = a
            .state
            .recipients
            .iter()
            .filter(|r| r.is_open())
            .map(|r| r.attempts)
            .max()
            .unwrap_or(1);
        let next = now + self.retry_delay(attempts).as_secs().max(1);
        a.state.next_attempt = next;
        a.state.last_attempt = now;
        // The state file is fsynced: on a runtime worker that wait would stall
        // every session and delivery scheduled there (a destination that is
        // down defers thousands of messages at once).
        let (dir, sid, st) = (self.queue_dir.clone(), id.clone(), a.state.clone());
        let saved = tokio::task::spawn_blocking(move || state::store(&dir, &sid, &st))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = saved {
            tracing::warn!(queue_id = %id, error = %e, "cannot save delivery state");
        }
        let (place, shape) = a.state.standing(&meta);
        self.spool.index().note(id, place, shape);
        if a.state.held {
            return Settled::Done;
        }
        Settled::Retry(next)
    }

    /// A pass in which a suspension that came after it started held back
    /// every recipient: nothing was tried, so no attempt is counted and
    /// nothing is written; the message waits as one held back when taken
    /// in does, until the earliest suspension ends or a resume (if the
    /// suspension was lifted meanwhile, the resume's flush found the
    /// message in hand: it is tried again now).
    fn held_back(&self, meta: &QueuedMeta, st: &DeliveryState, now: u64) -> Settled {
        let suspended = self.suspended();
        let mut until: Option<Option<u64>> = None;
        for (i, r) in meta.envelope.recipients.iter().enumerate() {
            if !st.recipients[i].is_open() {
                continue;
            }
            match suspended.blocks(r.address.domain(), now) {
                None => return Settled::Retry(now),
                Some(end) => until = Some(sooner(until, end)),
            }
        }
        match until {
            Some(Some(at)) => Settled::Retry(at),
            Some(None) => Settled::Done,
            None => Settled::Retry(now),
        }
    }

    /// The wait before the next attempt: the `retry` list, its last interval
    /// repeating, with up to 10% jitter so messages deferred together do not
    /// all come back in the same second.
    fn retry_delay(&self, attempts: u32) -> Duration {
        let retry = &self.config.delivery.retry;
        let idx = (attempts.max(1) as usize - 1).min(retry.len().saturating_sub(1));
        let base = retry
            .get(idx)
            .map(|r| r.0)
            .unwrap_or(Duration::from_secs(300));
        let jitter = rand::rng().random_range(0.0..0.1);
        base + base.mul_f64(jitter)
    }

    /// A spooled message's bytes, read off the async workers.
    async fn read_spooled(&self, id: &QueueId) -> Result<Vec<u8>, crate::queue::Error> {
        let (spool, id) = (self.spool.clone(), id.clone());
        off_runtime(move || spool.load(&id)?.read_message()).await
    }

    /// Queues the DSN about `notice`; returns it as spooled, or `None` when there is
    /// nobody to tell (null sender and no postmaster).
    async fn send_notice(
        &self,
        id: &QueueId,
        meta: &QueuedMeta,
        a: &Active,
        notice: &[usize],
    ) -> Result<Option<Spooled>, Error> {
        let to = if meta.envelope.sender.is_null() {
            match &self.config.delivery.postmaster {
                Some(pm) => pm.clone(),
                None => {
                    for i in notice {
                        tracing::warn!(queue_id = %id, recipient = %meta.envelope.recipients[*i].address,
                            reply = a.state.recipients[*i].last_reply.as_deref().unwrap_or(""),
                            "mail from the null sender failed; dropped without a bounce");
                    }
                    return Ok(None);
                }
            }
        } else {
            meta.envelope.sender.as_str().to_string()
        };
        let message = match &a.body {
            Some(b) => b.clone(),
            None => Arc::new(self.read_spooled(id).await?),
        };
        let items: Vec<_> = notice
            .iter()
            .map(|&i| (&meta.envelope.recipients[i], &a.state.recipients[i]))
            .collect();
        let report = crate::smtp::codec::fold_long_lines(bounce::build(
            &self.config.hostname,
            meta,
            &message,
            &items,
        ));
        // Signed as the relay's own mail (From: MAILER-DAEMON@hostname).
        let mut signed = self.signer.sign(&report);
        let report = if signed.is_empty() {
            report
        } else {
            signed.extend_from_slice(&report);
            signed
        };
        let envelope = bounce::envelope(meta, &to, &report);
        let dsn_id = QueueId::generate();
        let spooled = self
            .spool
            .store(
                &dsn_id,
                &envelope,
                None,
                None,
                Default::default(),
                Arc::new(report),
            )
            .await?;
        tracing::info!(queue_id = %id, dsn_id = %dsn_id, to = %to, recipients = notice.len(), "delivery status notification queued");
        metrics().received.inc(Source::Dsn);
        Ok(Some(spooled))
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

    /// Reads every message spooled before the start, once: each record
    /// seeds the queue's index and, while the active set has room, is
    /// admitted as read; a message not due gets its retry timer, one that
    /// is due and finds no room is left to a later scan. Batches are read
    /// on the blocking pool, each in two halves at once.
    ///
    /// The books the last clean stop saved answer at once meanwhile: they
    /// are taken in first, and what the reading finds stands over them.
    async fn start_up_scan(self: Arc<Self>) {
        let spool = self.spool.clone();
        let listed = off_runtime(move || {
            let saved = spool.root().join(crate::queue::index::SAVED_FILE);
            let saved = spool.index().load_saved(&saved);
            let ids = spool.list()?;
            if saved {
                spool.index().forget_unlisted(&ids);
            }
            Ok(ids)
        });
        let ids = match listed.await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the spool at start");
                Vec::new()
            }
        };
        let max_active = self.config.delivery.max_active;
        for batch in ids.chunks(SCAN_BATCH) {
            // Claimed before the reading, as `admit` does: no other path
            // delivers a message whose record is in hand here.
            let claimed: Vec<bool> = {
                let mut s = self.lock();
                if s.stopping {
                    break;
                }
                batch
                    .iter()
                    .map(|id| {
                        let room = s.active.len() + s.admitting.len() < max_active;
                        let claim = room && !s.in_hand(id);
                        if claim {
                            s.admitting.insert(id.clone());
                        }
                        claim
                    })
                    .collect()
            };
            let (first, second) = batch.split_at(batch.len() / 2);
            let (first, second) = tokio::join!(self.read_all(first), self.read_all(second));
            let read = first.into_iter().chain(second);
            let mut seed = Vec::with_capacity(batch.len());
            let mut admit = Vec::new();
            {
                let mut s = self.lock();
                let now = unix_now();
                for ((id, record), claim) in batch.iter().zip(read).zip(claimed) {
                    let Some((stored, st)) = record else {
                        if claim {
                            s.admitting.remove(id);
                        }
                        continue;
                    };
                    let (place, shape) = st.standing(&stored.meta);
                    seed.push((id.clone(), place, shape));
                    if claim {
                        admit.push((id.clone(), Given::Read(Box::new((stored, st)))));
                    } else if !st.is_held(&stored.meta) {
                        if st.next_attempt > now && st.last_attempt >= s.flushed_at {
                            self.push_deferred(&mut s, st.next_attempt, id.clone());
                        } else {
                            s.scan_needed = true;
                            s.scan_soon = true;
                        }
                    }
                }
            }
            self.spool.index().seed(seed);
            for (id, given) in admit {
                self.clone().admit_claimed(id, false, given).await;
            }
        }
        self.spool.index().seeded();
        self.lock().starting = false;
        self.timer.notify_one();
    }

    /// The records and delivery states of `ids`, read on the blocking pool
    /// (`None` for a message gone, or damaged: that one is set aside).
    async fn read_all(&self, ids: &[QueueId]) -> Vec<Option<(StoredMessage, DeliveryState)>> {
        let (spool, dir, owned) = (self.spool.clone(), self.queue_dir.clone(), ids.to_vec());
        let read = off_runtime(move || {
            Ok(owned
                .iter()
                .map(|id| read_record(&spool, &dir, id))
                .collect::<Vec<_>>())
        })
        .await;
        // One answer per id, so the caller's ids and records stay paired.
        read.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the spool at start");
            ids.iter().map(|_| None).collect()
        })
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

/// A message's record and delivery state, as admission reads them: a
/// damaged state is started over, a damaged record set aside.
fn read_record(spool: &Spool, dir: &Path, id: &QueueId) -> Option<(StoredMessage, DeliveryState)> {
    let stored = match spool.load(id) {
        Ok(stored) => stored,
        Err(crate::queue::Error::NotFound(_)) => return None,
        // Never acknowledged (see `queue::spool_load`): not ours to deliver.
        Err(crate::queue::Error::Damaged { reason, .. }) => {
            if let Err(e) = spool.set_aside(id, &reason) {
                tracing::warn!(queue_id = %id, error = %e, "cannot set a damaged message aside");
            }
            return None;
        }
        Err(e) => {
            tracing::warn!(queue_id = %id, error = %e, "cannot load spooled message");
            return None;
        }
    };
    // Starting over may deliver some recipients twice; refusing to deliver
    // at all would lose the message.
    let st = state::load(dir, &stored.meta, id).unwrap_or_else(|e| {
        tracing::warn!(queue_id = %id, error = %e, "damaged delivery state; starting over");
        DeliveryState::new(&stored.meta)
    });
    Some((stored, st))
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

impl Shared {
    /// Applies one outcome to a recipient's state, with the attempt's log record
    /// and its report to the `delivered` hook.
    fn apply(
        &self,
        id: &QueueId,
        meta: &Arc<QueuedMeta>,
        st: &mut DeliveryState,
        i: usize,
        o: &Outcome,
        attempt: &Attempt<'_>,
    ) {
        let Some(r) = st.recipients.get_mut(i) else {
            return;
        };
        let Some(recipient) = meta.envelope.recipients.get(i) else {
            return;
        };
        r.attempts += 1;
        r.status = o.status;
        r.last_reply = Some(o.reply.to_string());
        r.remote = o.remote.clone();
        r.dsn_relayed = o.dsn_relayed;
        r.enhanced = Some(if o.reply.enhanced.is_empty() {
            match o.reply.code {
                200..=299 => "2.0.0".into(),
                400..=499 => "4.0.0".into(),
                _ => "5.0.0".into(),
            }
        } else {
            o.reply.enhanced.to_string()
        });
        let outcome = match o.status {
            Status::Delivered => DeliveryOutcome::Delivered,
            Status::Deferred | Status::Pending => DeliveryOutcome::Deferred,
            Status::Failed => DeliveryOutcome::Failed,
        };
        let m = metrics();
        m.deliveries.inc(outcome);
        if attempt.addr.is_some() {
            m.attempt_duration.observe(attempt.started.elapsed());
        }
        if outcome == DeliveryOutcome::Delivered {
            let waited = unix_now().saturating_sub(meta.received);
            m.delivery_delay.observe(Duration::from_secs(waited));
        }
        let outcome = outcome.as_str();
        // The reply and the addresses come from the network: as strings,
        // both log formats escape them.
        let reply = o.reply.to_string();
        m.recent_delivery(crate::admin::metrics::RecentDelivery {
            at: unix_now(),
            queue_id: id.to_string(),
            recipient: recipient.address.to_string(),
            outcome,
            reply: reply.trim_end().to_string(),
        });
        tracing::info!(
            target: "postern::delivery",
            queue_id = %id,
            recipient = recipient.address.as_str(),
            route = attempt.route,
            host = attempt.host.unwrap_or(""),
            addr = %attempt.addr.map(|a| a.to_string()).unwrap_or_default(),
            tls = attempt.tls.unwrap_or("none"),
            mta_sts = attempt.mta_sts.unwrap_or("none"),
            reply = reply.trim_end(),
            delay_ms = attempt.started.elapsed().as_millis() as u64,
            attempt = r.attempts,
            outcome,
            "delivery attempt"
        );
        self.reports.report(
            id,
            meta,
            delivered::Attempt {
                recipient: &recipient.address,
                outcome: match o.status {
                    Status::Delivered => delivered::Outcome::Delivered,
                    Status::Deferred | Status::Pending => delivered::Outcome::Deferred,
                    Status::Failed => delivered::Outcome::Failed,
                },
                reply: o.reply.to_string(),
                remote: o.remote.clone(),
                attempt: r.attempts,
            },
        );
    }
}

fn header_end(message: &[u8]) -> usize {
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(message.len())
}
