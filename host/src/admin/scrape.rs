//! The `/metrics` page: the counters of [`super::metrics`], and what is
//! read at scrape time: the queue by state (from the spool's index, kept as
//! messages change state), delivery's connections and active set, and the
//! plugin chain's per-plugin, per-hook counters.

use super::metrics::{metrics, Page};
use super::State;
use crate::plugins::stats::HookExport;
use crate::queue::index::STATES;

/// Plugin call latency buckets written: 2^i µs for these `i` (16 µs to 16 s).
const PLUGIN_BUCKETS: [usize; 11] = [4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24];

/// The whole page.
pub async fn page(state: &State) -> String {
    let mut page = Page::new();
    metrics().write(&mut page);
    queue(state, &mut page);
    let (connections, active) = state.delivery.load();
    page.family(
        "postern_outbound_connections",
        "gauge",
        "Outbound connections open now.",
    );
    page.sample("postern_outbound_connections", &[], connections as u64);
    page.family(
        "postern_delivery_active_messages",
        "gauge",
        "Messages in memory for delivery now ([delivery] max_active).",
    );
    page.sample("postern_delivery_active_messages", &[], active as u64);
    plugins(state, &mut page);
    page.family(
        "postern_ready",
        "gauge",
        "1 once the SMTP listeners accept connections.",
    );
    page.sample("postern_ready", &[], u64::from(state.listening()));
    page.finish()
}

fn queue(state: &State, page: &mut Page) {
    let now = crate::delivery::state::unix_now();
    let counts = state.ctx.spool.index().counts(now);
    page.family(
        "postern_queue_messages",
        "gauge",
        "Messages in the spool by state.",
    );
    for (s, n) in STATES.iter().zip(counts.messages) {
        page.sample("postern_queue_messages", &[("state", s)], n);
    }
    page.family(
        "postern_queue_oldest_age_seconds",
        "gauge",
        "Age of the oldest message in the spool by state; 0 when there is none.",
    );
    for (s, o) in STATES.iter().zip(counts.oldest_micros) {
        let age = o.map_or(0, |micros| now.saturating_sub(micros / 1_000_000));
        page.sample("postern_queue_oldest_age_seconds", &[("state", s)], age);
    }
}

fn plugins(state: &State, page: &mut Page) {
    let chain = state.ctx.chain.current();
    let all: Vec<(String, Vec<HookExport>)> = chain
        .plugins()
        .iter()
        .map(|p| (p.name().to_string(), p.stats.export()))
        .collect();
    let name = "postern_plugin_instances_retired_total";
    page.family(
        name,
        "counter",
        "Intact instances of each plugin retired, by reason (memory: past its high-water mark; uses: after retire_after_uses calls).",
    );
    for p in chain.plugins() {
        for (reason, n) in p.stats.retirements() {
            page.sample(name, &[("plugin", p.name()), ("reason", reason)], n);
        }
    }
    page.family(
        "postern_plugins",
        "gauge",
        "Plugins in the chain new sessions use.",
    );
    page.sample("postern_plugins", &[], all.len() as u64);
    let name = "postern_plugin_call_duration_seconds";
    page.family(
        name,
        "histogram",
        "Time of one hook call, per plugin and hook (counters restart when a reload loads the plugin again).",
    );
    for (plugin, hooks) in &all {
        for h in hooks {
            let labels = [("plugin", plugin.as_str()), ("hook", h.hook.as_str())];
            for i in PLUGIN_BUCKETS {
                // Bucket j holds calls under 2^j µs.
                let below: u64 = h.latency.iter().take(i + 1).sum();
                let le = ((1u64 << i) as f64 / 1e6).to_string();
                page.bucket(name, &labels, &le, below);
            }
            let calls: u64 = h.latency.iter().sum();
            page.bucket(name, &labels, "+Inf", calls);
            page.sample_f(&format!("{name}_sum"), &labels, h.sum_us as f64 / 1e6);
            page.sample(&format!("{name}_count"), &labels, calls);
        }
    }
    let kinds = |h: &HookExport| h.answers.clone();
    plugin_counters(
        page,
        &all,
        "postern_plugin_verdicts_total",
        "Answers of each plugin, per hook and kind.",
        "verdict",
        kinds,
    );
    let shadowed: Vec<&str> = chain
        .plugins()
        .iter()
        .filter(|p| p.shadow.is_some())
        .map(|p| p.name())
        .collect();
    shadows(page, &all, &shadowed);
    let kinds = |h: &HookExport| h.errors.clone();
    plugin_counters(
        page,
        &all,
        "postern_plugin_errors_total",
        "Failed hook calls of each plugin, per hook and kind (trap, timeout, memory, invalid, instantiate, not-granted).",
        "kind",
        kinds,
    );
}

/// One count read from a hook's counters.
type HookCount = fn(&HookExport) -> u64;

/// How often each plugin's shadow answered a call as it did, and otherwise,
/// per hook (for plugins with a shadow only).
fn shadows(page: &mut Page, all: &[(String, Vec<HookExport>)], shadowed: &[&str]) {
    let families: [(&str, &str, HookCount); 2] = [
        (
            "postern_plugin_shadow_agreements_total",
            "Calls a plugin's shadow answered as the plugin did, per plugin and hook.",
            |h| h.shadow_agreed,
        ),
        (
            "postern_plugin_shadow_disagreements_total",
            "Calls a plugin's shadow answered otherwise than the plugin (never enforced), per plugin and hook.",
            |h| h.shadow_disagreed,
        ),
    ];
    for (name, help, count) in families {
        page.family(name, "counter", help);
        for (plugin, hooks) in all.iter().filter(|(p, _)| shadowed.contains(&p.as_str())) {
            for h in hooks {
                let labels = [("plugin", plugin.as_str()), ("hook", h.hook.as_str())];
                page.sample(name, &labels, count(h));
            }
        }
    }
}

/// A counter family per plugin, hook and one kind of count.
fn plugin_counters(
    page: &mut Page,
    all: &[(String, Vec<HookExport>)],
    name: &str,
    help: &str,
    label: &str,
    kinds: impl Fn(&HookExport) -> Vec<(&'static str, u64)>,
) {
    page.family(name, "counter", help);
    for (plugin, hooks) in all {
        for h in hooks {
            for (kind, n) in kinds(h) {
                let labels = [
                    ("plugin", plugin.as_str()),
                    ("hook", h.hook.as_str()),
                    (label, kind),
                ];
                page.sample(name, &labels, n);
            }
        }
    }
}
