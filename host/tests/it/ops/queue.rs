//! Bulk queue control on a running relay, through the command line (over
//! the control socket) and the HTTP API: selectors, suspend and resume,
//! summary.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::start;
use crate::support::http::{get, post_json};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::{queue_id, send_message};

const TOKEN: &str = "queue-admin-token-0123456";

/// `postern queue ARGS`: (success, stdout, stderr).
fn queue(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .arg("queue")
        .args(args)
        .args(["--config", "postern.toml"])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, out, err) = queue(dir, args);
    assert!(success, "postern queue {args:?}: {err}");
    out
}

fn ids(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// The relay's queue empties within 10 s.
async fn assert_queue_empties(dir: &Path) {
    let empty = crate::support::eventually(Duration::from_secs(10), || {
        ids(&ok(dir, &["list", "--json"])).is_empty().then_some(())
    })
    .await;
    assert!(empty.is_some(), "the queue empties");
}

/// A suspended domain gets nothing, mail queued before or after; hold,
/// release and delete pick by domain and sender; summary counts by
/// destination; resume delivers what waited, and a restart keeps a
/// suspension.
#[tokio::test(flavor = "multi_thread")]
async fn selectors_suspend_and_summary_on_a_running_relay() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let delivery = format!("smarthost = \"smtp://{}\"", sink.addr);
    let (relay, base) = start(&delivery, Some(TOKEN), "");
    let dir = relay.dir.path().to_path_buf();
    let addr = relay.addr();
    assert!(ok(&dir, &["suspend", "--domain", "Slow.test"]).contains("slow.test"));
    let sent = tokio::task::spawn_blocking(move || {
        let send = |from: &str, to: &[&str]| {
            queue_id(&send_message(addr, from, to, "Subject: t\r\n\r\nhi\r\n"))
        };
        vec![
            send("a@ours.test", &["x@slow.test"]),
            send("a@ours.test", &["y@slow.test"]),
            send("a@ours.test", &["z@fast.test"]),
            send("a@ours.test", &["w@fast.test", "v@slow.test"]),
            send("spam@bad.test", &["u@slow.test"]),
            send("spam@bad.test", &["t@slow.test"]),
        ]
    })
    .await
    .unwrap();
    // fast.test goes out: the third message and the fourth's first recipient.
    let got = sink.wait_for(2, Duration::from_secs(20)).await;
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["w@fast.test", "z@fast.test"]);

    let waiting = ids(&ok(&dir, &["list", "--domain", "slow.test", "--json"]));
    let mut want: Vec<String> = [0, 1, 3, 4, 5].iter().map(|&i| sent[i].clone()).collect();
    want.sort();
    assert_eq!(waiting, want);

    // The summary, from the command line and the API.
    let summary: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["summary", "--json"])).unwrap();
    assert_eq!(summary["total"]["messages"], 5);
    assert_eq!(summary["destinations"][0]["domain"], "slow.test");
    assert_eq!(summary["destinations"][0]["messages"], 5);
    assert_eq!(
        summary["destinations"][0]["counts"][0], 5,
        "all younger than 5 minutes"
    );
    let text = ok(&dir, &["summary"]);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().take(3).eq(["slow.test", "5", "5"])),
        "{text}"
    );
    let api = get(
        &format!("{base}/api/v1/queue/summary?sender=spam%40bad.test"),
        Some(TOKEN),
    );
    assert_eq!(api.json()["total"]["messages"], 2, "{api:?}");

    // Delete by sender, hold by domain.
    assert_eq!(
        ok(&dir, &["delete", "--sender", "spam@bad.test"]).trim(),
        "deleted 2 message(s)"
    );
    assert_eq!(
        ok(&dir, &["hold", "--domain", "slow.test"]).trim(),
        "held 3 message(s)"
    );
    let held = ids(&ok(&dir, &["list", "--state", "held", "--json"]));
    assert_eq!(held.len(), 3);
    // A command that would change everything must say so.
    let (success, _, err) = queue(&dir, &["release"]);
    assert!(!success && err.contains("needs an id, a selector"), "{err}");
    let bad = post_json(
        &format!("{base}/api/v1/queue/hold"),
        Some(TOKEN),
        &serde_json::json!({"state": "stuck"}),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["field"], "state");
    let unknown = post_json(
        &format!("{base}/api/v1/queue/hold"),
        Some(TOKEN),
        &serde_json::json!({"domian": "x"}),
    );
    assert_eq!(unknown.status, 400);
    assert!(unknown.body.contains("domian"), "{unknown:?}");

    // A restart keeps the suspension.
    let mut relay = relay;
    relay.signal(15);
    relay.wait_exit(Duration::from_secs(20));
    let config = std::fs::read_to_string(dir.join("postern.toml")).unwrap();
    let relay = crate::support::relay::Relay::start_in(relay.dir.clone(), relay.port, &config);
    crate::support::http::wait_ready(&format!("{base}/ready"), Some(TOKEN));
    let suspended: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["suspended", "--json"])).unwrap();
    assert_eq!(suspended[0]["domain"], "slow.test");
    // The queue gauges count what was spooled before the restart, read
    // once in the background.
    let held = crate::support::eventually(Duration::from_secs(10), || {
        let page = get(&format!("{base}/metrics"), Some(TOKEN)).body;
        let series = |s: &str| format!("postern_queue_messages{{state=\"{s}\"}}");
        let counts = ["queued", "deferred", "held"].map(|s| super::sample(&page, &series(s)));
        (counts == [Some(0.0), Some(0.0), Some(3.0)]).then_some(())
    })
    .await;
    assert!(held.is_some(), "three held after the restart");

    // Resumed, the held ones still wait; released (over HTTP), they go.
    let resumed = post_json(
        &format!("{base}/api/v1/queue/resume"),
        Some(TOKEN),
        &serde_json::json!({"domain": "slow.test"}),
    );
    assert_eq!(resumed.status, 200, "{resumed:?}");
    assert_eq!(resumed.json()["suspended"], serde_json::json!([]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.messages().len(), 2, "held mail waits");
    let released = post_json(
        &format!("{base}/api/v1/queue/release"),
        Some(TOKEN),
        &serde_json::json!({"domain": "slow.test"}),
    );
    assert_eq!(
        released.json()["ids"].as_array().unwrap().len(),
        3,
        "{released:?}"
    );
    let got = sink.wait_for(5, Duration::from_secs(20)).await;
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        [
            "v@slow.test",
            "w@fast.test",
            "x@slow.test",
            "y@slow.test",
            "z@fast.test"
        ]
    );
    assert_queue_empties(&dir).await;
    drop(relay);
}

/// A timed suspension ends by itself: the mail that waited goes out then.
#[tokio::test(flavor = "multi_thread")]
async fn a_timed_suspension_ends_by_itself() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let delivery = format!("smarthost = \"smtp://{}\"", sink.addr);
    let (relay, _base) = start(&delivery, None, "");
    let dir = relay.dir.path().to_path_buf();
    ok(&dir, &["suspend", "--domain", "later.test", "--for", "2s"]);
    let addr = relay.addr();
    tokio::task::spawn_blocking(move || {
        queue_id(&send_message(
            addr,
            "a@ours.test",
            &["r@later.test"],
            "Subject: t\r\n\r\nhi\r\n",
        ))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(sink.messages().is_empty(), "suspended for 2 s");
    sink.wait_for(1, Duration::from_secs(10)).await;
    let list: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["suspended", "--json"])).unwrap();
    assert_eq!(list, serde_json::json!([]));
}

/// Suspension is checked before each message goes on a connection, not
/// only when a message is taken in: with one slow connection working
/// through a long queue for one domain, a suspend stops it after at most
/// the message in flight; the rest stay queued and a resume delivers them.
#[tokio::test(flavor = "multi_thread")]
async fn a_suspend_stops_a_connection_working_through_its_queue() {
    const N: usize = 30;
    // Every reply 60 ms late: a transaction takes a few hundred ms.
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Slow(60))).await;
    let delivery = format!(
        "smarthost = \"smtp://{}\"\nmax_per_destination = 1",
        sink.addr
    );
    let (relay, _base) = start(&delivery, None, "");
    let dir = relay.dir.path().to_path_buf();
    let addr = relay.addr();
    tokio::task::spawn_blocking(move || {
        for i in 0..N {
            let to = format!("r{i}@busy.test");
            queue_id(&send_message(
                addr,
                "a@ours.test",
                &[&to],
                "Subject: t\r\n\r\nhi\r\n",
            ));
        }
    })
    .await
    .unwrap();
    sink.wait_for(3, Duration::from_secs(20)).await;
    ok(&dir, &["suspend", "--domain", "busy.test"]);
    let at_suspend = sink.messages().len();
    assert!(
        at_suspend < N / 2,
        "too fast to suspend mid-way: {at_suspend}"
    );
    // Long enough for several more transactions, had the connection gone on.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = sink.messages().len();
    assert!(
        after <= at_suspend + 1,
        "only the message in flight may finish: {at_suspend} then {after}"
    );
    let waiting = crate::support::eventually(Duration::from_secs(10), || {
        let list = [
            "list",
            "--domain",
            "busy.test",
            "--state",
            "queued",
            "--json",
        ];
        let w = ids(&ok(&dir, &list));
        (w.len() == N - after).then_some(w)
    })
    .await;
    // Untried: queued, not deferred, with no attempt counted.
    assert!(waiting.is_some(), "the rest stay queued");
    let all: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["list", "--domain", "busy.test", "--json"])).unwrap();
    for e in all.as_array().unwrap() {
        assert_eq!(e["attempts"], 0, "{e}");
    }
    assert_eq!(sink.messages().len(), after, "still nothing more");

    ok(&dir, &["resume", "--domain", "busy.test"]);
    let got = sink.wait_for(N, Duration::from_secs(60)).await;
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts.len(), N, "each once");
    assert_eq!(got.len(), N, "nothing twice");
    assert_queue_empties(&dir).await;
}
