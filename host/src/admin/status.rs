//! The live status page at `/`: plain HTML with a little script (nothing
//! loaded from elsewhere, no build step) that polls `/api/v1/status` every
//! 1.5 s: messages in and out per second over the last five minutes, the
//! queue by state, the top destinations with their deferrals and last error
//! (read from the queue, not from metric labels), the plugin chain's
//! latency and verdicts, and the last deliveries.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State as AxState;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::metrics::{metrics, DeliveryOutcome, RecentDelivery, Source};
use super::State;
use crate::delivery::control::{Selector, Summary};
use crate::delivery::state::unix_now;

/// The page.
const PAGE: &str = include_str!("status.html");
/// Seconds of rates kept for the chart.
const RATE_SAMPLES: usize = 300;
/// Destinations shown.
const TOP_DESTINATIONS: usize = 10;

/// Messages in (received by SMTP or the API) and out (delivered recipients)
/// per second, one sample a second.
#[derive(Default)]
pub struct Rates {
    inner: Mutex<RatesInner>,
}

#[derive(Default)]
struct RatesInner {
    samples: VecDeque<(u64, u64)>,
    last: Option<(u64, u64)>,
}

impl Rates {
    /// Takes one sample of the counters (called once a second).
    pub fn tick(&self) {
        let m = metrics();
        let now = (
            m.received.get(Source::Smtp) + m.received.get(Source::Api),
            m.deliveries.get(DeliveryOutcome::Delivered),
        );
        let mut r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = r.last {
            if r.samples.len() == RATE_SAMPLES {
                r.samples.pop_front();
            }
            r.samples
                .push_back((now.0.saturating_sub(last.0), now.1.saturating_sub(last.1)));
        }
        r.last = Some(now);
    }

    fn series(&self) -> (Vec<u64>, Vec<u64>) {
        let r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        r.samples.iter().copied().unzip()
    }
}

/// Samples the rates until the process ends.
pub async fn sample(state: Arc<State>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        state.rates.tick();
    }
}

#[derive(Serialize)]
struct Status {
    hostname: String,
    uptime: u64,
    ready: bool,
    totals: Totals,
    rates: RateSeries,
    queue: QueueCounts,
    destinations: Vec<Destination>,
    plugins: Vec<crate::plugins::reload::PluginStatus>,
    deliveries: Vec<RecentDelivery>,
    connections: Connections,
}

#[derive(Serialize)]
struct Totals {
    received: u64,
    delivered: u64,
    deferred: u64,
    failed: u64,
}

#[derive(Serialize)]
struct RateSeries {
    step: u64,
    #[serde(rename = "in")]
    in_: Vec<u64>,
    out: Vec<u64>,
}

#[derive(Serialize)]
struct QueueCounts {
    queued: u64,
    deferred: u64,
    held: u64,
    /// Age of the oldest message, seconds; none when the queue is empty.
    oldest: Option<u64>,
}

#[derive(Serialize)]
struct Destination {
    domain: String,
    messages: u64,
    deferred: u64,
    held: u64,
    last_error: Option<String>,
}

#[derive(Serialize)]
struct Connections {
    smtp: i64,
    outbound: usize,
}

/// `GET /`.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `GET /api/v1/status`.
pub async fn status(AxState(state): AxState<Arc<State>>) -> Response {
    let m = metrics();
    // The counts and the destinations from the spool's index, exact now
    // (while the start-up scan reads the spool, of what it has read).
    let now = unix_now();
    let index = state.ctx.spool.index().counts(now);
    let counts = index.messages;
    let spool = state.ctx.spool.clone();
    let summary = crate::queue::off_runtime(move || {
        Ok(Summary::of_index(spool.index(), &Selector::default()))
    })
    .await;
    let summary = match summary {
        Ok(summary) => summary,
        Err(e) => {
            return super::guard::error(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the queue: {e}"),
            )
        }
    };
    let (in_, out) = state.rates.series();
    let (outbound, _) = state.delivery.load();
    let status = Status {
        hostname: state.ctx.config.hostname.clone(),
        uptime: state.started.elapsed().as_secs(),
        ready: state.listening(),
        totals: Totals {
            received: m.received.get(Source::Smtp) + m.received.get(Source::Api),
            delivered: m.deliveries.get(DeliveryOutcome::Delivered),
            deferred: m.deliveries.get(DeliveryOutcome::Deferred),
            failed: m.deliveries.get(DeliveryOutcome::Failed)
                + m.deliveries.get(DeliveryOutcome::Expired),
        },
        rates: RateSeries { step: 1, in_, out },
        queue: QueueCounts {
            queued: counts[0],
            deferred: counts[1],
            held: counts[2],
            oldest: index
                .oldest_micros
                .iter()
                .flatten()
                .min()
                .map(|micros| now.saturating_sub(micros / 1_000_000)),
        },
        destinations: summary
            .destinations
            .into_iter()
            .take(TOP_DESTINATIONS)
            .map(|d| Destination {
                domain: d.domain,
                messages: d.messages,
                deferred: d.deferred,
                held: d.held,
                last_error: d.last_error,
            })
            .collect(),
        plugins: crate::plugins::reload::status(&state.ctx.chain),
        deliveries: m.recent_deliveries(),
        connections: Connections {
            smtp: m.sessions(),
            outbound,
        },
    };
    Json(status).into_response()
}
