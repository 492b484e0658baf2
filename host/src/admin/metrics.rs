//! The metrics registry behind `/metrics`: counters and histograms updated
//! where things happen (lock-free atomics), written out in the Prometheus
//! text format on a scrape, with the gauges that are read at that moment
//! (queue, connections, plugin chain).
//!
//! Label values come only from the config (listener addresses, plugin names)
//! and from the fixed enums below, never from traffic, so the number of
//! series stays bounded whatever clients send.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

/// A fixed set of label values.
pub trait Label: Copy + 'static {
    /// Every value, in the order they are written.
    const ALL: &'static [Self];
    /// The value as written.
    fn as_str(self) -> &'static str;
    /// Its position in [`Label::ALL`].
    fn index(self) -> usize;
}

macro_rules! label {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl Label for $name {
            const ALL: &'static [$name] = &[$($name::$v),+];
            fn as_str(self) -> &'static str { match self { $($name::$v => $s),+ } }
            fn index(self) -> usize { self as usize }
        }
    };
}

label!(
    /// The SMTP command a reply answers.
    Stage {
        /// The banner (or a refusal instead of it).
        Connect => "connect",
        /// EHLO or HELO.
        Helo => "helo",
        /// MAIL FROM.
        Mail => "mail",
        /// RCPT TO.
        Rcpt => "rcpt",
        /// DATA, BDAT and the end of the message.
        Data => "data",
        /// AUTH.
        Auth => "auth",
        /// STARTTLS.
        StartTls => "starttls",
        /// Anything else (RSET, NOOP, QUIT, unknown commands).
        Other => "other",
    }
);

label!(
    /// The first digit of a reply code.
    CodeClass {
        /// 2xx.
        Success => "2xx",
        /// 3xx (354, 334).
        Intermediate => "3xx",
        /// 4xx.
        Transient => "4xx",
        /// 5xx.
        Permanent => "5xx",
    }
);

impl CodeClass {
    /// The class of a reply code.
    pub fn of(code: u16) -> CodeClass {
        match code {
            0..=299 => CodeClass::Success,
            300..=399 => CodeClass::Intermediate,
            400..=499 => CodeClass::Transient,
            _ => CodeClass::Permanent,
        }
    }
}

label!(
    /// What became of an inbound connection.
    ConnOutcome {
        /// Handed to a session.
        Accepted => "accepted",
        /// Refused by `max_connections` or `max_connections_per_client`.
        Limit => "refused_limit",
        /// Refused by the connect hook.
        Policy => "refused_policy",
        /// Refused before SMTP: not from a trusted proxy, or no valid
        /// PROXY header in time.
        Proxy => "refused_proxy",
    }
);

label!(
    /// How a transaction ended once its message was complete.
    TxOutcome {
        /// Spooled and answered 250.
        Queued => "queued",
        /// Refused by a limit, the loop check or policy.
        Refused => "refused",
        /// The spool could not take it (452).
        Failed => "failed",
        /// Policy removed every recipient: answered 250, nothing spooled.
        Dropped => "dropped",
    }
);

label!(
    /// Where a message came from.
    Source {
        /// An SMTP session.
        Smtp => "smtp",
        /// `POST /api/v1/messages`.
        Api => "api",
        /// A delivery status notification the relay wrote.
        Dsn => "dsn",
    }
);

label!(
    /// What one delivery attempt did for one recipient.
    DeliveryOutcome {
        /// Accepted by the next hop, filed or discarded by a route.
        Delivered => "delivered",
        /// Failed temporarily; tried again later.
        Deferred => "deferred",
        /// Failed permanently (a bounce follows where one is due).
        Failed => "failed",
        /// Still undelivered at `max_age`.
        Expired => "expired",
    }
);

label!(
    /// Which way a TLS session goes.
    Direction {
        /// A client of the relay.
        Inbound => "in",
        /// The relay delivering.
        Outbound => "out",
    }
);

label!(
    /// A TLS protocol version.
    TlsVersion {
        /// TLS 1.2.
        Tls12 => "TLSv1.2",
        /// TLS 1.3.
        Tls13 => "TLSv1.3",
        /// Anything else.
        Other => "other",
    }
);

impl TlsVersion {
    /// The version named as the TLS code names it ("TLSv1.3").
    pub fn of(name: &str) -> TlsVersion {
        match name {
            "TLSv1.2" => TlsVersion::Tls12,
            "TLSv1.3" => TlsVersion::Tls13,
            _ => TlsVersion::Other,
        }
    }
}

label!(
    /// Success or failure.
    Result_ {
        /// It worked.
        Ok => "ok",
        /// It did not.
        Failed => "failed",
    }
);

/// A counter per value of `L`.
pub struct Counters<L: Label> {
    counts: Box<[AtomicU64]>,
    _label: std::marker::PhantomData<L>,
}

impl<L: Label> Default for Counters<L> {
    fn default() -> Self {
        Counters {
            counts: L::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            _label: std::marker::PhantomData,
        }
    }
}

impl<L: Label> Counters<L> {
    /// Adds one.
    pub fn inc(&self, l: L) {
        self.add(l, 1);
    }

    /// Adds `n`.
    pub fn add(&self, l: L, n: u64) {
        if let Some(c) = self.counts.get(l.index()) {
            c.fetch_add(n, Relaxed);
        }
    }

    /// The count for `l`.
    pub fn get(&self, l: L) -> u64 {
        self.counts.get(l.index()).map_or(0, |c| c.load(Relaxed))
    }
}

/// A counter per pair of values.
pub struct Counters2<A: Label, B: Label> {
    counts: Box<[AtomicU64]>,
    _labels: std::marker::PhantomData<(A, B)>,
}

impl<A: Label, B: Label> Default for Counters2<A, B> {
    fn default() -> Self {
        Counters2 {
            counts: (0..A::ALL.len() * B::ALL.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            _labels: std::marker::PhantomData,
        }
    }
}

impl<A: Label, B: Label> Counters2<A, B> {
    /// Adds one.
    pub fn inc(&self, a: A, b: B) {
        if let Some(c) = self.counts.get(a.index() * B::ALL.len() + b.index()) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// The count for `(a, b)`.
    pub fn get(&self, a: A, b: B) -> u64 {
        self.counts
            .get(a.index() * B::ALL.len() + b.index())
            .map_or(0, |c| c.load(Relaxed))
    }
}

/// A histogram of durations with fixed bucket bounds.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// Bounds for fast things: fsyncs, SMTP exchanges (1 ms to 10 s).
pub const FAST: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bounds for time in the queue (1 s to 5 days).
pub const SLOW: &[f64] = &[
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    86400.0,
    5.0 * 86400.0,
];

impl Histogram {
    /// An empty histogram with these upper bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn write(&self, out: &mut Page, name: &str, labels: &[(&str, &str)]) {
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += n.load(Relaxed);
            let le = bound.to_string();
            out.sample(
                &format!("{name}_bucket"),
                &with(labels, ("le", &le)),
                cumulative,
            );
        }
        let count = self.count.load(Relaxed);
        out.sample(
            &format!("{name}_bucket"),
            &with(labels, ("le", "+Inf")),
            count,
        );
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        out.sample_f(&format!("{name}_sum"), labels, sum);
        out.sample(&format!("{name}_count"), labels, count);
    }
}

fn with<'a>(labels: &[(&'a str, &'a str)], more: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut v = labels.to_vec();
    v.push(more);
    v
}

/// The counters of one `[[listener]]`, named by its configured address.
pub struct ListenerMetrics {
    /// The address as configured.
    pub name: String,
    /// Connections by outcome.
    pub connections: Counters<ConnOutcome>,
    /// Sessions open now.
    pub active: AtomicI64,
}

/// Counts an open session while alive.
pub struct ActiveSession(Arc<ListenerMetrics>);

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

impl ListenerMetrics {
    /// Counts a session as open until the guard is dropped.
    pub fn session(self: &Arc<Self>) -> ActiveSession {
        self.active.fetch_add(1, Relaxed);
        ActiveSession(self.clone())
    }
}

/// One delivery attempt, for the status page's list.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentDelivery {
    /// When, seconds since the epoch.
    pub at: u64,
    /// The message.
    pub queue_id: String,
    /// The recipient.
    pub recipient: String,
    /// delivered, deferred, failed or expired.
    pub outcome: &'static str,
    /// The next hop's reply, or ours.
    pub reply: String,
}

/// Delivery attempts the status page lists.
const RECENT_DELIVERIES: usize = 15;

/// Every counter of the relay.
pub struct Metrics {
    listeners: RwLock<Vec<(SocketAddr, Arc<ListenerMetrics>)>>,
    /// The last delivery attempts, newest first.
    recent: std::sync::Mutex<std::collections::VecDeque<RecentDelivery>>,
    /// SMTP replies by the command they answer and their class.
    pub replies: Counters2<Stage, CodeClass>,
    /// Transactions by how they ended.
    pub transactions: Counters<TxOutcome>,
    /// Messages spooled, by source.
    pub received: Counters<Source>,
    /// Recipient delivery attempts by outcome.
    pub deliveries: Counters<DeliveryOutcome>,
    /// Time of one delivery attempt (connection, SMTP exchange).
    pub attempt_duration: Histogram,
    /// Time from acceptance to delivery, per delivered recipient.
    pub delivery_delay: Histogram,
    /// Outbound connections opened, and those that failed.
    pub outbound: Counters<Result_>,
    /// TLS sessions by direction and version.
    pub tls: Counters2<Direction, TlsVersion>,
    /// AUTH attempts by result.
    pub auth: Counters<Result_>,
    /// Time to make one message durable (write, file and folder fsync).
    pub spool_fsync: Histogram,
    /// Plugin chain reloads by result.
    pub reloads: Counters<Result_>,
    /// Time one reload took (compile, validate, swap).
    pub reload_duration: Histogram,
    /// `POST /api/v1/messages` requests by result.
    pub injections: Counters<Result_>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    listeners: RwLock::default(),
    recent: std::sync::Mutex::default(),
    replies: Counters2::default(),
    transactions: Counters::default(),
    received: Counters::default(),
    deliveries: Counters::default(),
    attempt_duration: Histogram::new(FAST),
    delivery_delay: Histogram::new(SLOW),
    outbound: Counters::default(),
    tls: Counters2::default(),
    auth: Counters::default(),
    spool_fsync: Histogram::new(FAST),
    reloads: Counters::default(),
    reload_duration: Histogram::new(FAST),
    injections: Counters::default(),
});

/// The relay's metrics (one set per process, as a scrape sees it).
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// The counters of the listener configured with `address` (made on first use).
    pub fn listener(&self, address: SocketAddr) -> Arc<ListenerMetrics> {
        if let Some((_, m)) = self
            .listeners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(a, _)| *a == address)
        {
            return m.clone();
        }
        let mut all = self.listeners.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = all.iter().find(|(a, _)| *a == address) {
            return m.clone();
        }
        let m = Arc::new(ListenerMetrics {
            name: address.to_string(),
            connections: Counters::default(),
            active: AtomicI64::new(0),
        });
        all.push((address, m.clone()));
        m
    }

    /// Keeps a delivery attempt for the status page.
    pub fn recent_delivery(&self, d: RecentDelivery) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_DELIVERIES {
            recent.pop_back();
        }
        recent.push_front(d);
    }

    /// The last delivery attempts, newest first.
    pub fn recent_deliveries(&self) -> Vec<RecentDelivery> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// SMTP sessions open now, over every listener.
    pub fn sessions(&self) -> i64 {
        self.listeners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, l)| l.active.load(Relaxed))
            .sum()
    }

    /// Counts one SMTP reply.
    pub fn reply(&self, stage: Stage, code: u16) {
        self.replies.inc(stage, CodeClass::of(code));
    }

    /// Counts one TLS session.
    pub fn tls_session(&self, direction: Direction, version: &str) {
        self.tls.inc(direction, TlsVersion::of(version));
    }
}

/// A Prometheus text page being written.
pub struct Page {
    text: String,
}

impl Default for Page {
    fn default() -> Self {
        Page::new()
    }
}

impl Page {
    /// An empty page.
    pub fn new() -> Page {
        Page {
            text: String::with_capacity(16 * 1024),
        }
    }

    /// Starts a metric family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn labels(&mut self, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        self.text.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.text.push(',');
            }
            let _ = write!(self.text, "{k}=\"");
            for c in v.chars() {
                match c {
                    '\\' => self.text.push_str("\\\\"),
                    '"' => self.text.push_str("\\\""),
                    '\n' => self.text.push_str("\\n"),
                    c => self.text.push(c),
                }
            }
            self.text.push('"');
        }
        self.text.push('}');
    }

    /// One integer sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.text.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.text, " {value}");
    }

    /// One sample that may be fractional or negative.
    pub fn sample_f(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.text, " {value}");
    }

    /// A counter family labelled by one enum.
    pub fn counters<L: Label>(&mut self, name: &str, help: &str, label: &str, c: &Counters<L>) {
        self.family(name, "counter", help);
        for l in L::ALL {
            self.sample(name, &[(label, l.as_str())], c.get(*l));
        }
    }

    /// A counter family labelled by two enums.
    pub fn counters2<A: Label, B: Label>(
        &mut self,
        name: &str,
        help: &str,
        labels: (&str, &str),
        c: &Counters2<A, B>,
    ) {
        self.family(name, "counter", help);
        for a in A::ALL {
            for b in B::ALL {
                let l = [(labels.0, a.as_str()), (labels.1, b.as_str())];
                self.sample(name, &l, c.get(*a, *b));
            }
        }
    }

    /// A histogram family without labels.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        h.write(self, name, &[]);
    }

    /// A cumulative bucket sample of a histogram written from other counts.
    pub fn bucket(&mut self, name: &str, labels: &[(&str, &str)], le: &str, value: u64) {
        self.sample(&format!("{name}_bucket"), &with(labels, ("le", le)), value);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

impl Metrics {
    /// Writes every counter and histogram kept here.
    pub fn write(&self, page: &mut Page) {
        let listeners: Vec<Arc<ListenerMetrics>> = self
            .listeners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, m)| m.clone())
            .collect();
        page.family(
            "postern_smtp_connections_total",
            "counter",
            "Inbound connections by listener and outcome.",
        );
        for l in &listeners {
            for o in ConnOutcome::ALL {
                page.sample(
                    "postern_smtp_connections_total",
                    &[("listener", &l.name), ("outcome", o.as_str())],
                    l.connections.get(*o),
                );
            }
        }
        page.family(
            "postern_smtp_sessions",
            "gauge",
            "SMTP sessions open now, by listener.",
        );
        for l in &listeners {
            page.sample_f(
                "postern_smtp_sessions",
                &[("listener", &l.name)],
                l.active.load(Relaxed) as f64,
            );
        }
        page.counters2(
            "postern_smtp_replies_total",
            "SMTP replies sent, by the command answered and the reply class.",
            ("stage", "class"),
            &self.replies,
        );
        page.counters(
            "postern_smtp_transactions_total",
            "Transactions whose message was complete, by how they ended.",
            "outcome",
            &self.transactions,
        );
        page.counters(
            "postern_messages_received_total",
            "Messages spooled, by where they came from.",
            "source",
            &self.received,
        );
        page.counters(
            "postern_delivery_recipients_total",
            "Recipient delivery attempts, by outcome.",
            "outcome",
            &self.deliveries,
        );
        page.histogram(
            "postern_delivery_attempt_duration_seconds",
            "Time of one delivery attempt to a next hop.",
            &self.attempt_duration,
        );
        page.histogram(
            "postern_delivery_delay_seconds",
            "Time from acceptance to delivery, per delivered recipient.",
            &self.delivery_delay,
        );
        page.counters(
            "postern_outbound_connections_total",
            "Outbound connections opened, by result.",
            "result",
            &self.outbound,
        );
        page.counters2(
            "postern_tls_sessions_total",
            "TLS sessions by direction and protocol version.",
            ("direction", "version"),
            &self.tls,
        );
        page.counters(
            "postern_auth_attempts_total",
            "SMTP AUTH attempts, by result.",
            "result",
            &self.auth,
        );
        page.histogram(
            "postern_spool_fsync_seconds",
            "Time to make one message durable: write, file and folder fsync.",
            &self.spool_fsync,
        );
        page.counters(
            "postern_plugin_reloads_total",
            "Plugin chain reloads, by result.",
            "result",
            &self.reloads,
        );
        page.histogram(
            "postern_plugin_reload_duration_seconds",
            "Time one plugin chain reload took.",
            &self.reload_duration,
        );
        page.counters(
            "postern_injections_total",
            "HTTP injection requests, by result.",
            "result",
            &self.injections,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.001, 0.01, 1.0]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(5));
        let mut page = Page::new();
        page.histogram("t_seconds", "test", &h);
        let text = page.finish();
        for line in [
            "t_seconds_bucket{le=\"0.001\"} 1",
            "t_seconds_bucket{le=\"0.01\"} 2",
            "t_seconds_bucket{le=\"1\"} 2",
            "t_seconds_bucket{le=\"+Inf\"} 3",
            "t_seconds_count 3",
            "t_seconds_sum 5.0055",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut page = Page::new();
        page.sample("x", &[("plugin", "a\"b\\c\nd")], 1);
        assert_eq!(page.finish(), "x{plugin=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn reply_codes_fall_in_classes() {
        for (code, class) in [
            (220, CodeClass::Success),
            (354, CodeClass::Intermediate),
            (451, CodeClass::Transient),
            (554, CodeClass::Permanent),
        ] {
            assert_eq!(CodeClass::of(code), class);
        }
    }
}
