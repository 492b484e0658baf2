//! Exactly once: a backlog built up while the next hop was down reaches it once
//! per message, whichever path starts the delivery (the start-up scan, retry
//! timers, the scan of what did not fit in memory, `postern queue flush` of all
//! or one, `release`), and all of them at the same time, with or without a
//! restart in between. Counted at a capture sink by the queue id in each
//! message's `Received:` header.
//!
//! The backlog is sized to overflow a small active set (`max_active`), so the
//! periodic scan runs while deliveries finish, and the one-second retry keeps
//! every timer firing during the drain. The relay's remover thread (which
//! unlinks delivered messages) is put in the idle scheduling class, so it
//! runs behind the deliveries as it does under heavy load on a large queue:
//! that gap is where a second pass used to find a delivered message still on
//! disk.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::eventually;
use crate::support::inprocess::{self as relay, Binary};
use crate::support::sink::{Behavior, Captured, Options, Sink};

/// Messages queued per scenario: enough for several active sets.
/// `POSTERN_TEST_BACKLOG` sets another size for a longer run by hand.
fn backlog() -> usize {
    std::env::var("POSTERN_TEST_BACKLOG")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1500)
}
/// The active set: small, so the backlog is taken in by scans.
const MAX_ACTIVE: usize = 100;

/// A relay whose smart host is `sink` (not listening yet), retrying every second.
fn config(dir: &Path, addr: SocketAddr, sink: SocketAddr) -> PathBuf {
    relay::write_config(
        dir,
        addr,
        &format!("smarthost = \"smtp://{sink}\"\nretry = [\"1s\"]\nmax_active = {MAX_ACTIVE}\n"),
    )
}

/// Starts the relay binary and puts its remover thread in the idle
/// scheduling class (`chrt --idle`).
async fn serve(config: &Path, addr: SocketAddr, log: &Path) -> Binary {
    let bin = Binary::serve(config, addr, log).await;
    let tasks = PathBuf::from(format!("/proc/{}/task", bin.child.id()));
    let named = |t: &std::fs::DirEntry| {
        std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "postern-remover")
    };
    // A new thread names itself once it first runs, which on a busy
    // machine may be after the relay listens.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let remover = loop {
        if let Some(t) = std::fs::read_dir(&tasks).unwrap().flatten().find(named) {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay has a remover thread"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let status = Command::new("chrt")
        .args(["--idle", "-p", "0"])
        .arg(remover.file_name())
        .status()
        .expect("chrt (util-linux) is installed");
    assert!(status.success(), "chrt --idle on the remover thread");
    bin
}

/// Queues `n` messages of 2 KiB with Postfix's smtp-source over 20 sessions.
fn queue_backlog(addr: SocketAddr, n: usize) {
    crate::support::smtp::smtp_source(addr, n, 20, 2048);
}

/// The queue ids in the spool, checked to be `n`.
fn queued_ids(spool: &Path, n: usize) -> Vec<String> {
    let ids = relay::spooled(spool);
    assert_eq!(ids.len(), n, "every message acknowledged is queued");
    ids
}

/// The queue id our `Received:` header gives a delivered message.
fn queue_id(m: &Captured) -> String {
    let text = String::from_utf8_lossy(&m.data);
    text.split(" (Postern) with ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().nth(2))
        .map(|id| id.trim_end_matches(';').to_string())
        .unwrap_or_default()
}

/// Waits until the spool is empty and every id arrived, then a while longer
/// (past a retry interval and a scan) for late second copies; returns how
/// often each id arrived.
async fn drained(sink: &Sink, spool: &Path, ids: &[String]) -> HashMap<String, usize> {
    let counts = || {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for m in sink.messages() {
            *counts.entry(queue_id(&m)).or_default() += 1;
        }
        counts
    };
    let done = eventually(Duration::from_secs(120), || {
        let c = counts();
        (relay::spooled(spool).is_empty() && ids.iter().all(|id| c.contains_key(id))).then_some(())
    })
    .await;
    let c = counts();
    assert!(
        done.is_some(),
        "not drained: {} of {} arrived, {} still queued",
        ids.iter().filter(|id| c.contains_key(*id)).count(),
        ids.len(),
        relay::spooled(spool).len()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    counts()
}

/// Asserts that each queued message arrived once and nothing else did.
fn exactly_once(scenario: &str, counts: &HashMap<String, usize>, ids: &[String]) {
    let total: usize = counts.values().sum();
    let twice: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).collect();
    eprintln!(
        "{scenario}: {} queued, {total} arrived, {} delivered more than once",
        ids.len(),
        twice.len()
    );
    assert!(
        twice.is_empty(),
        "{scenario}: {} of {} messages delivered more than once (e.g. {:?})",
        twice.len(),
        ids.len(),
        twice.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(
        total,
        ids.len(),
        "{scenario}: arrivals that were never queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_after_a_restart_delivers_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let sink_addr: SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let config = config(dir.path(), addr, sink_addr);
    let spool = dir.path().join("spool");
    let bin = serve(&config, addr, &dir.path().join("relay1.log")).await;
    queue_backlog(addr, backlog());
    let ids = queued_ids(&spool, backlog());
    assert!(bin.terminate().success());
    let _bin = serve(&config, addr, &dir.path().join("relay2.log")).await;
    // Right after the restart the control socket answers: no "does not answer".
    let listed = relay::queue_cmd(&config, &["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(backlog()));
    let sink = Sink::start_on(sink_addr, Options::new(Behavior::Accept)).await;
    relay::queue_cmd(&config, &["flush"]);
    let counts = drained(&sink, &spool, &ids).await;
    exactly_once("restart, then flush", &counts, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_without_a_restart_delivers_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let sink_addr: SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let config = config(dir.path(), addr, sink_addr);
    let spool = dir.path().join("spool");
    let _bin = serve(&config, addr, &dir.path().join("relay.log")).await;
    queue_backlog(addr, backlog());
    let ids = queued_ids(&spool, backlog());
    let sink = Sink::start_on(sink_addr, Options::new(Behavior::Accept)).await;
    relay::queue_cmd(&config, &["flush"]);
    let counts = drained(&sink, &spool, &ids).await;
    exactly_once("flush", &counts, &ids);
}

/// The retry timers start the drain; meanwhile the operator flushes
/// everything twice, flushes single messages, and holds and releases one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_while_retry_timers_fire_delivers_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let sink_addr: SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let config = config(dir.path(), addr, sink_addr);
    let spool = dir.path().join("spool");
    let _bin = serve(&config, addr, &dir.path().join("relay.log")).await;
    queue_backlog(addr, backlog());
    let ids = queued_ids(&spool, backlog());
    let sink = Sink::start_on(sink_addr, Options::new(Behavior::Accept)).await;
    eventually(Duration::from_secs(30), || {
        (sink.messages().len() >= MAX_ACTIVE).then_some(())
    })
    .await
    .expect("the retry timers start delivering");
    let last = ids.last().unwrap().clone();
    relay::queue_cmd(&config, &["flush"]);
    for id in ids.iter().rev().step_by(97).take(8) {
        // A message may already be gone; only a refusal of another kind matters.
        let out = queue_cmd_status(&config, &["flush", id]);
        assert!(
            out.is_ok() || out.as_ref().is_err_and(|e| e.contains("no message")),
            "{out:?}"
        );
    }
    let held = queue_cmd_status(&config, &["hold", &last]);
    relay::queue_cmd(&config, &["flush"]);
    if held.is_ok() {
        // A hold that finds the message in flight lets that delivery finish
        // (`queue hold`), and a finished message is gone: only a refusal of
        // another kind matters. Either way it must arrive exactly once.
        let out = queue_cmd_status(&config, &["release", &last]);
        assert!(
            out.is_ok() || out.as_ref().is_err_and(|e| e.contains("no message")),
            "{out:?}"
        );
    }
    let counts = drained(&sink, &spool, &ids).await;
    exactly_once("retry timers, flushes, hold and release", &counts, &ids);
}

/// `postern queue ARGS`: stdout, or stderr when it fails.
fn queue_cmd_status(config: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .arg("queue")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// New mail keeps arriving while the backlog drains and the operator flushes
/// again and again: each flush lists the spool, where a message just
/// acknowledged already is before delivery has taken it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_during_new_mail_delivers_each_message_once() {
    const FRESH: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let sink_addr: SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let config = config(dir.path(), addr, sink_addr);
    let spool = dir.path().join("spool");
    let _bin = serve(&config, addr, &dir.path().join("relay.log")).await;
    let backlog = backlog() / 2;
    queue_backlog(addr, backlog);
    let mut ids = queued_ids(&spool, backlog);
    let sink = Sink::start_on(sink_addr, Options::new(Behavior::Accept)).await;
    let sending = tokio::task::spawn_blocking(move || queue_backlog(addr, FRESH));
    while !sending.is_finished() {
        relay::queue_cmd(&config, &["flush"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sending.await.unwrap();
    // The new messages' ids are known once they arrive: all distinct ids at
    // the sink, which must then be the backlog and FRESH more.
    let counts = drained(&sink, &spool, &ids).await;
    let fresh: Vec<String> = counts
        .keys()
        .filter(|id| !ids.contains(id))
        .cloned()
        .collect();
    assert_eq!(fresh.len(), FRESH, "every new message arrived");
    ids.extend(fresh);
    exactly_once("new mail and flushes", &counts, &ids);
}

/// Half delivered: each message has a recipient at the sink and one whose
/// next hop is down, so every pass ends by writing the delivery state (an
/// fsync) while the operator flushes again and again and the retry timers
/// fire. A pass that read the state before the last one had written it would
/// send the first recipient's copy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_during_partial_deliveries_sends_no_recipient_twice() {
    const MESSAGES: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let config = relay::write_config(
        dir.path(),
        addr,
        &format!(
            "retry = [\"1s\"]\nmax_active = {MAX_ACTIVE}\n[delivery.routes]\n\
             \"dest.test\" = \"smtp://{}\"\n\"down.test\" = \"smtp://127.0.0.1:9\"\n",
            sink.addr
        ),
    );
    let _bin = serve(&config, addr, &dir.path().join("relay.log")).await;
    // The operator flushes again and again from the first message on: the
    // first pass over each message (the one that delivers its first
    // recipient) races them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (stop, config) = (stop.clone(), config.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                relay::queue_cmd(&config, &["flush"]);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut ids = Vec::new();
    for n in 0..MESSAGES {
        let body = format!("Subject: half {n}\nFrom: <a@origin.test>\n\nHello.\n");
        let rcpts = ["b@dest.test", "c@down.test"];
        ids.push(
            relay::send(addr, "a@origin.test", &rcpts, "", "", &body)
                .await
                .unwrap(),
        );
    }
    eventually(Duration::from_secs(60), || {
        (sink.messages().len() >= MESSAGES).then_some(())
    })
    .await
    .expect("every message reaches the sink once");
    // More passes over every message, each racing the flushes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flusher.join().unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        *counts.entry(queue_id(&m)).or_default() += 1;
    }
    exactly_once("half delivered, flushed", &counts, &ids);
}
