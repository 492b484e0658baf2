//! Shadow mode: a new version of a plugin (`[[plugin]] shadow = "v2.wasm"`)
//! runs on the same calls as the live one, on copies of the inputs the live
//! one saw, after the live answer is known: a session's shadow calls wait
//! until the client has its reply (so they add no latency), delivery's run
//! right after the live call. Its answers are counted against the live ones
//! per hook and never enforced; its message edits and metadata writes go to
//! copies that are dropped, its kv space is `<name>@shadow` and its archive
//! folder a scratch one. Promoting it is copying its file over the live one.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::config::HookName;
use crate::plugins::instance::{Answer, Call, LoadedPlugin, Pass};
use crate::plugins::{convert, on_error, route_error};
use crate::policy::{Route, Verdict};

/// A shadow call to make: the live plugin, the call on copies of its
/// inputs, and what the live plugin answered.
pub(crate) struct Pending {
    pub live: Arc<LoadedPlugin>,
    pub call: Call,
    pub live_answer: Answer,
}

/// Compares `pending` shadow calls in a task of their own (those a session
/// left when it ended before its last reply went out).
pub(crate) fn spawn(pending: Vec<Pending>) {
    if pending.is_empty() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            for p in pending {
                p.compare().await;
            }
        });
    }
}

impl Pending {
    /// Runs the shadow on the call and counts whether it answers as the
    /// live plugin did.
    pub async fn compare(self) {
        compare(&self.live, &self.call, &self.live_answer).await;
    }
}

/// Runs `live`'s shadow on `call` and counts whether it answers as the live
/// plugin did (`live_answer`).
pub(crate) async fn compare(live: &LoadedPlugin, call: &Call, live_answer: &Answer) {
    let Some(shadow) = live.shadow.as_deref() else {
        return;
    };
    let hook = call.hook();
    let answer = if shadow.handles(hook) {
        let mut held = None;
        let mut pass = Pass::begin(shadow.ticker());
        let result = shadow.call(&mut held, call, &mut pass).await;
        if let Some(instance) = held.take() {
            shadow.release(instance);
        }
        match result {
            Ok(answer) => answer,
            // The shadow's failure stands for what its on_error would do.
            Err(e) => match hook {
                HookName::Route => Answer::Route(route_error(shadow, e).into()),
                HookName::Delivered => Answer::Done,
                _ => Answer::Verdict(on_error(shadow, hook, e)),
            },
        }
    } else {
        unanswered(hook)
    };
    let agree = same(live_answer, &answer);
    live.stats.shadow(hook, agree);
    if agree {
        return;
    }
    if let Some(suppressed) = live.shadow_log.admit() {
        let context = &call.context;
        let about = match (&context.queue_id, &context.session) {
            (Some(id), _) => format!("queue_id {id}"),
            (None, Some(s)) => format!("client {}", convert::ip_addr(&s.peer_ip)),
            (None, None) => String::new(),
        };
        tracing::info!(
            plugin = live.name(),
            %hook,
            live = %describe(live_answer),
            shadow = %describe(&answer),
            about,
            suppressed,
            "shadow disagrees"
        );
    }
}

/// What a plugin that does not handle `hook` answers.
fn unanswered(hook: HookName) -> Answer {
    match hook {
        HookName::Route => Answer::Route(Route::Default.into()),
        HookName::Delivered => Answer::Done,
        _ => Answer::Verdict(Verdict::Continue),
    }
}

/// The same decision: the same verdict or route, with the same reply code
/// and enhanced code (the texts may differ between versions).
fn same(a: &Answer, b: &Answer) -> bool {
    use crate::smtp::reply::Reply;
    let codes = |x: &Reply, y: &Reply| x.code == y.code && x.enhanced == y.enhanced;
    match (a, b) {
        (Answer::Verdict(x), Answer::Verdict(y)) => match (x, y) {
            (Verdict::Reject(r), Verdict::Reject(s))
            | (Verdict::Tempfail(r), Verdict::Tempfail(s))
            | (Verdict::Disconnect(r), Verdict::Disconnect(s)) => codes(r, s),
            _ => x == y,
        },
        (Answer::Route(x), Answer::Route(y)) => {
            x.sender == y.sender
                && match (&x.route, &y.route) {
                    (Route::Reject(r), Route::Reject(s)) => codes(r, s),
                    (a, b) => a == b,
                }
        }
        (Answer::Done, Answer::Done) => true,
        _ => false,
    }
}

/// An answer in a log line.
fn describe(a: &Answer) -> String {
    match a {
        Answer::Verdict(v) => v.to_string(),
        Answer::Route(r) => r.to_string(),
        Answer::Done => "done".into(),
    }
}

/// At most one disagreement line per second per plugin; the next line says
/// how many were left out.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    /// The second (since the epoch) of the last line.
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// `Some(lines left out since the last one)` when a line may be written now.
    fn admit(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last.load(Relaxed);
        if last == now
            || self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::Reply;

    #[test]
    fn decisions_compare_by_kind_and_codes_not_text() {
        let reject = |text: &str| {
            Answer::Verdict(Verdict::Reject(Reply::new(550, "5.7.1", text.to_string())))
        };
        assert!(same(&reject("blocked"), &reject("refused")));
        assert!(!same(
            &reject("x"),
            &Answer::Verdict(Verdict::Reject(Reply::new(554, "5.7.1", "x")))
        ));
        assert!(!same(&reject("x"), &Answer::Verdict(Verdict::Continue)));
        assert!(same(
            &Answer::Route(Route::Mx("a.test".into()).into()),
            &Answer::Route(Route::Mx("a.test".into()).into())
        ));
        assert!(!same(
            &Answer::Route(Route::Mx("a.test".into()).into()),
            &Answer::Route(Route::Mx("b.test".into()).into())
        ));
        assert!(!same(
            &Answer::Route(Route::Default.into()),
            &Answer::Verdict(Verdict::Continue)
        ));
    }

    #[test]
    fn one_line_a_second() {
        let limit = LogLimit::default();
        assert_eq!(limit.admit(), Some(0));
        assert_eq!(limit.admit(), None);
        assert_eq!(limit.admit(), None);
        // The next second's line counts the two left out.
        limit.last.store(0, Relaxed);
        assert_eq!(limit.admit(), Some(2));
    }
}
