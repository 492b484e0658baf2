//! Settling: the outcomes of a job are applied to each recipient's state;
//! a message whose recipients are all done is removed (and its notices
//! sent), one with recipients left waits for its retry.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::admin::metrics::{metrics, DeliveryOutcome, Label, Source};
use crate::delivery::state::{unix_now, DeliveryState, Status};
use crate::delivery::{bounce, state, Error};
use crate::plugins::delivered;
use crate::queue::{off_runtime, QueueId, QueuedMeta, Spooled};

use super::{sooner, Active, Attempt, Cancel, Outcome, Settled, Shared};

impl Shared {
    /// Records a job's outcomes; the last job of a message finalizes it.
    pub(super) async fn complete_job(
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
    pub(super) async fn finalize(self: Arc<Self>, id: QueueId, a: Active) {
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
    pub(super) async fn read_spooled(&self, id: &QueueId) -> Result<Vec<u8>, crate::queue::Error> {
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
}

impl Shared {
    /// Applies one outcome to a recipient's state, with the attempt's log record
    /// and its report to the `delivered` hook.
    pub(super) fn apply(
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
