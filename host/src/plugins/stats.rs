//! Per-plugin, per-hook counters for `postern plugin list`: calls, answers,
//! errors by kind, and a latency histogram for percentiles. Lock-free, since
//! every hook call updates them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::config::HookName;

/// Answer kinds counted per hook (`done`: a `delivered` call).
pub const ANSWERS: [&str; 12] = [
    "continue",
    "accept",
    "reject",
    "tempfail",
    "disconnect",
    "mx",
    "smarthost",
    "local-folder",
    "discard",
    "default",
    "done",
    "pool",
];

/// Error kinds counted per hook.
pub const ERRORS: [&str; 6] = [
    "trap",
    "timeout",
    "memory",
    "invalid",
    "instantiate",
    "not-granted",
];

/// Reasons an intact instance is retired ([`crate::plugins::instance::Retired`]).
pub const RETIRED: [&str; 2] = ["memory", "uses"];

/// Latency buckets: bucket `i` holds calls that took less than 2^i µs.
const BUCKETS: usize = 28;

#[derive(Default)]
struct HookStats {
    answers: [AtomicU64; ANSWERS.len()],
    errors: [AtomicU64; ERRORS.len()],
    latency: [AtomicU64; BUCKETS],
    /// Time of all calls, in µs (the metrics page's histogram sum).
    sum_us: AtomicU64,
    /// Calls where the shadow answered as this plugin did, and where not.
    shadow_agreed: AtomicU64,
    shadow_disagreed: AtomicU64,
}

/// The counters of one plugin.
#[derive(Default)]
pub struct Stats {
    hooks: [HookStats; HookName::ALL.len()],
    /// Instances retired, by reason (as [`RETIRED`]).
    retired: [AtomicU64; RETIRED.len()],
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

impl Stats {
    /// Records one call and how long it took. The latency buckets also
    /// count the calls.
    pub fn call(&self, hook: HookName, micros: u64) {
        let h = &self.hooks[hook.index()];
        let bucket = (64 - micros.leading_zeros() as usize).min(BUCKETS - 1);
        h.latency[bucket].fetch_add(1, Relaxed);
        h.sum_us.fetch_add(micros, Relaxed);
    }

    /// Raw counts of every hook that was called, for the metrics page:
    /// latency buckets (bucket `i`: under 2^i µs), their sum, answers and
    /// errors of every kind.
    pub fn export(&self) -> Vec<HookExport> {
        HookName::ALL
            .iter()
            .zip(&self.hooks)
            .filter_map(|(hook, h)| {
                let latency: Vec<u64> = h.latency.iter().map(|b| b.load(Relaxed)).collect();
                (latency.iter().sum::<u64>() > 0).then(|| HookExport {
                    hook: *hook,
                    latency,
                    sum_us: h.sum_us.load(Relaxed),
                    answers: ANSWERS
                        .iter()
                        .zip(&h.answers)
                        .map(|(n, c)| (*n, c.load(Relaxed)))
                        .collect(),
                    errors: ERRORS
                        .iter()
                        .zip(&h.errors)
                        .map(|(n, c)| (*n, c.load(Relaxed)))
                        .collect(),
                    shadow_agreed: h.shadow_agreed.load(Relaxed),
                    shadow_disagreed: h.shadow_disagreed.load(Relaxed),
                })
            })
            .collect()
    }

    /// Records an answer by kind (one of [`ANSWERS`]).
    pub fn answer(&self, hook: HookName, kind: &str) {
        if let Some(i) = ANSWERS.iter().position(|k| *k == kind) {
            self.hooks[hook.index()].answers[i].fetch_add(1, Relaxed);
        }
    }

    /// Records an error by kind (one of [`ERRORS`]).
    pub fn error(&self, hook: HookName, kind: &str) {
        if let Some(i) = ERRORS.iter().position(|k| *k == kind) {
            self.hooks[hook.index()].errors[i].fetch_add(1, Relaxed);
        }
    }

    /// Records an instance retired while intact.
    pub fn retired(&self, reason: crate::plugins::instance::Retired) {
        if let Some(i) = RETIRED.iter().position(|k| *k == reason.as_str()) {
            self.retired[i].fetch_add(1, Relaxed);
        }
    }

    /// Instances retired so far, by reason, every reason listed.
    pub fn retirements(&self) -> Vec<(&'static str, u64)> {
        RETIRED
            .iter()
            .zip(&self.retired)
            .map(|(n, c)| (*n, c.load(Relaxed)))
            .collect()
    }

    /// Records whether the shadow answered a call as the live plugin did.
    pub fn shadow(&self, hook: HookName, agreed: bool) {
        let h = &self.hooks[hook.index()];
        if agreed {
            h.shadow_agreed.fetch_add(1, Relaxed);
        } else {
            h.shadow_disagreed.fetch_add(1, Relaxed);
        }
    }

    /// A snapshot for the hooks that were called.
    pub fn snapshot(&self) -> Vec<HookSnapshot> {
        HookName::ALL
            .iter()
            .zip(&self.hooks)
            .filter_map(|(hook, h)| {
                let latency: Vec<u64> = h.latency.iter().map(|b| b.load(Relaxed)).collect();
                let calls = latency.iter().sum();
                if calls == 0 {
                    return None;
                }
                let pct = |p: f64| percentile(&latency, p);
                Some(HookSnapshot {
                    hook: hook.to_string(),
                    calls,
                    answers: named(&ANSWERS, &h.answers),
                    errors: named(&ERRORS, &h.errors),
                    p50_us: pct(0.5),
                    p90_us: pct(0.9),
                    p99_us: pct(0.99),
                    shadow_agreed: h.shadow_agreed.load(Relaxed),
                    shadow_disagreed: h.shadow_disagreed.load(Relaxed),
                })
            })
            .collect()
    }
}

fn named(names: &[&str], counts: &[AtomicU64]) -> Vec<(String, u64)> {
    names
        .iter()
        .zip(counts)
        .map(|(n, c)| (n.to_string(), c.load(Relaxed)))
        .filter(|(_, c)| *c > 0)
        .collect()
}

/// The upper bound (µs) of the bucket holding the p-th call.
fn percentile(buckets: &[u64], p: f64) -> u64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = ((total as f64) * p).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return 1u64 << i;
        }
    }
    1u64 << (buckets.len() - 1)
}

/// One hook's raw counters (see [`Stats::export`]).
#[derive(Debug, Clone)]
pub struct HookExport {
    /// The hook.
    pub hook: HookName,
    /// Calls per latency bucket: bucket `i` holds calls under 2^i µs.
    pub latency: Vec<u64>,
    /// Time of all calls, µs.
    pub sum_us: u64,
    /// Every answer kind with its count.
    pub answers: Vec<(&'static str, u64)>,
    /// Every error kind with its count.
    pub errors: Vec<(&'static str, u64)>,
    /// Calls the shadow answered as this plugin did.
    pub shadow_agreed: u64,
    /// Calls the shadow answered otherwise.
    pub shadow_disagreed: u64,
}

/// One hook's counters, as `postern plugin list` shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookSnapshot {
    /// The hook.
    pub hook: String,
    /// Calls made.
    pub calls: u64,
    /// Answers by kind.
    pub answers: Vec<(String, u64)>,
    /// Errors by kind.
    pub errors: Vec<(String, u64)>,
    /// Median latency, upper bound in µs.
    pub p50_us: u64,
    /// 90th percentile, upper bound in µs.
    pub p90_us: u64,
    /// 99th percentile, upper bound in µs.
    pub p99_us: u64,
    /// Calls the shadow answered as this plugin did.
    #[serde(default)]
    pub shadow_agreed: u64,
    /// Calls the shadow answered otherwise.
    #[serde(default)]
    pub shadow_disagreed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_buckets() {
        let s = Stats::default();
        for _ in 0..90 {
            s.call(HookName::Rcpt, 3);
        }
        for _ in 0..10 {
            s.call(HookName::Rcpt, 1000);
        }
        s.answer(HookName::Rcpt, "reject");
        s.error(HookName::Rcpt, "timeout");
        let snap = s.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].calls, 100);
        assert_eq!(snap[0].p50_us, 4);
        assert_eq!(snap[0].p99_us, 1024);
        assert_eq!(snap[0].answers, vec![("reject".to_string(), 1)]);
        assert_eq!(snap[0].errors, vec![("timeout".to_string(), 1)]);
        s.retired(crate::plugins::instance::Retired::Memory);
        s.retired(crate::plugins::instance::Retired::Memory);
        s.retired(crate::plugins::instance::Retired::Uses);
        assert_eq!(s.retirements(), vec![("memory", 2), ("uses", 1)]);
    }
}
