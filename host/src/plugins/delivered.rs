//! The `delivered` hook's queue: a report of each delivery attempt of each
//! recipient waits here, off the delivery path, for the plugins that handle
//! `delivered`. The queue is bounded (`[plugins] delivered_queue`): when it is
//! full a report is dropped and counted, never waited for, so a slow plugin
//! cannot slow delivery. Reports still waiting when the relay stops abruptly
//! are lost: the hook hears of an attempt at most once.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::HookName;
use crate::envelope::Address;
use crate::plugins::bindings::types as wit;
use crate::plugins::{convert, ChainHandle};
use crate::policy::Queued;
use crate::queue::{QueueId, QueuedMeta};

/// How an attempt ended, for a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted (or filed, or discarded by a route).
    Delivered,
    /// Failed temporarily.
    Deferred,
    /// Failed permanently.
    Failed,
}

/// One attempt at one recipient.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    /// The recipient.
    pub recipient: &'a Address,
    /// How it ended.
    pub outcome: Outcome,
    /// The reply that decided it, on one line.
    pub reply: String,
    /// The next hop, as `host [address]`, when one answered.
    pub remote: Option<String>,
    /// Attempts at this recipient so far, this one included.
    pub attempt: u32,
}

struct Report {
    id: QueueId,
    meta: Arc<QueuedMeta>,
    report: wit::DeliveryReport,
}

/// Takes reports from delivery and hands them to the chain's `delivered`
/// hook in a task of its own.
#[derive(Clone)]
pub struct Reporter {
    chain: Arc<ChainHandle>,
    tx: mpsc::Sender<Report>,
}

impl Reporter {
    /// Starts the task that calls the hook, with a queue of `capacity`.
    pub fn start(chain: Arc<ChainHandle>, capacity: usize) -> Reporter {
        let (tx, mut rx) = mpsc::channel::<Report>(capacity.max(1));
        let handle = chain.clone();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                // The chain current when the report is handled: a plugin
                // reloaded meanwhile hears of attempts made before.
                let chain = handle.current();
                let mut lease = chain.lease();
                lease.delivered(Queued::of(&r.meta, &r.id), r.report).await;
            }
        });
        Reporter { chain, tx }
    }

    /// Reports an attempt, unless no plugin handles `delivered` (then it
    /// costs nothing). Never waits: a full queue drops the report and counts it.
    pub fn report(&self, id: &QueueId, meta: &Arc<QueuedMeta>, attempt: Attempt<'_>) {
        if !self.chain.current().handles(HookName::Delivered) {
            return;
        }
        let report = wit::DeliveryReport {
            recipient: convert::address(attempt.recipient),
            outcome: match attempt.outcome {
                Outcome::Delivered => wit::DeliveryOutcome::Delivered,
                Outcome::Deferred => wit::DeliveryOutcome::Deferred,
                Outcome::Failed => wit::DeliveryOutcome::Failed,
            },
            reply: attempt.reply,
            remote: attempt.remote,
            attempt: attempt.attempt,
        };
        let sent = self.tx.try_send(Report {
            id: id.clone(),
            meta: meta.clone(),
            report,
        });
        if sent.is_err() {
            let dropped = self.chain.delivered_dropped.fetch_add(1, Relaxed) + 1;
            // A line for the first drop and then every thousandth.
            if dropped % 1000 == 1 {
                tracing::warn!(dropped, "delivered hook queue full; reports dropped");
            }
        }
    }
}
