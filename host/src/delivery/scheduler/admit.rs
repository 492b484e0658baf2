//! Admission: a message comes into the active set from a new 250, a retry
//! timer, an operator or the start-up scan; its recipients are routed
//! (plugins' route hook, local folders, discards) and its jobs queued.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::authn::header::body_start;
use crate::delivery::route::{decide, Decision};
use crate::delivery::state::{unix_now, DeliveryState, Status};
use crate::delivery::{state, Error};
use crate::envelope::Address;
use crate::policy::{Queued, RouteQuery};
use crate::queue::{off_runtime, QueueId, Spool, Spooled, StoredMessage};
use crate::smtp::reply::Reply;

use super::{
    sooner, Active, Attempt, Body, Destination, Given, Job, Outcome, Shared, CACHE_BODY_MAX,
    SCAN_BATCH,
};

impl Shared {
    /// Loads a message and queues jobs for its open recipients, unless it is
    /// held, not due (and not `force`d), already in the books, or there is no
    /// room (a `force`d one, an operator's single command, is let in anyway).
    pub(super) async fn admit(self: Arc<Self>, id: QueueId, force: bool) {
        self.admit_with(id, force, None).await;
    }

    /// [`Shared::admit`], for a message that may have just been spooled: its
    /// record and bytes come along, so nothing is read back from disk.
    pub(super) async fn admit_with(
        self: Arc<Self>,
        id: QueueId,
        force: bool,
        fresh: Option<Spooled>,
    ) {
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
            Body::OnDisk(stored) => {
                let (spool, qid) = (self.spool.clone(), id.clone());
                // Bytes that do not match their record's checksum were never
                // acknowledged, or the disk damaged them: set aside, as a
                // damaged record is.
                let read = off_runtime(move || match stored.read_message() {
                    Err(crate::queue::Error::Damaged { reason, .. }) => {
                        set_aside(&spool, &qid, &reason);
                        Ok(None)
                    }
                    other => other.map(Some),
                });
                match read.await? {
                    Some(bytes) => Arc::new(bytes),
                    None => return Ok(()),
                }
            }
        };
        let expired =
            now.saturating_sub(dstate.age_from(&meta)) >= self.config.delivery.max_age.0.as_secs();
        // One lease for the message: its recipients share the instances.
        let mut hooks = self.chain.current().lease();
        let headers = &body[..body_start(&body)];
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

    /// Reads every message spooled before the start, once: each record
    /// seeds the queue's index and, while the active set has room, is
    /// admitted as read; a message not due gets its retry timer, one that
    /// is due and finds no room is left to a later scan. Batches are read
    /// on the blocking pool, each in two halves at once.
    ///
    /// The books the last clean stop saved answer at once meanwhile: they
    /// are taken in first, and what the reading finds stands over them.
    pub(super) async fn start_up_scan(self: Arc<Self>) {
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
}

/// Moves a damaged message file to `corrupt/`; a failure is only logged, as
/// the message is not delivered either way.
fn set_aside(spool: &Spool, id: &QueueId, reason: &str) {
    if let Err(e) = spool.set_aside(id, reason) {
        tracing::warn!(queue_id = %id, error = %e, "cannot set a damaged message aside");
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
            set_aside(spool, id, &reason);
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
