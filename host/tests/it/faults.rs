//! Faults under load, each test ending by counting: every message ends
//! delivered, deferred with its reason, or bounced; none is silently dropped.
//! Next hops that refuse, drop, stall, crawl or break TLS; SIGKILL again and
//! again; the spool's disk full; Redis down and back under a kv plugin;
//! plugins that trap, loop and exhaust their memory beside normal traffic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::eventually;
use crate::support::inprocess::{self as inproc, Relay as InProcess};
use crate::support::relay::{base_config, config_with, free_port, Relay};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::{queue_id, send_message};
use crate::support::{is_root, mount_tmpfs, Unmount};

const WAIT: Duration = Duration::from_secs(20);

/// Short client timeouts, so a stalled or slow next hop costs a test well
/// under a second per attempt.
const SHORT_TIMEOUTS: &str =
    "timeouts = { connect = \"1s\", greeting = \"1s\", command = \"300ms\", \
                              data = \"300ms\", data_block = \"1s\", data_end = \"500ms\" }\n";

/// How one message ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Delivered,
    Deferred(String),
    Bounced,
}

/// Next hops that answer 4xx, 5xx, drop the connection mid-DATA, stall after
/// the data, answer slower than the timeouts, or reset TLS in the handshake:
/// each message is delivered, deferred with the reason, or bounced, and the
/// counts add up to what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_to_a_faulty_next_hop_is_delivered_deferred_or_bounced() {
    let faults = [
        ("accept.test", Behavior::Accept),
        ("temp.test", Behavior::TempFail),
        ("reject.test", Behavior::Reject),
        ("drop.test", Behavior::DropMidData),
        ("stall.test", Behavior::Stall),
        ("slow.test", Behavior::Slow(700)),
        ("tlsreset.test", Behavior::TlsReset),
    ];
    let mut sinks = BTreeMap::new();
    let mut routes = String::from("[delivery.routes]\n");
    for (domain, behavior) in faults {
        let sink = Sink::start("127.0.0.1", Options::new(behavior)).await;
        routes.push_str(&format!("{domain:?} = \"smtp://{}\"\n", sink.addr));
        sinks.insert(domain, sink);
    }
    let bounces = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    routes.push_str(&format!("\"origin.test\" = \"smtp://{}\"\n", bounces.addr));
    let dir = tempfile::tempdir().unwrap();
    let relay = InProcess::start(
        dir.path(),
        &format!("retry = [\"1h\"]\n{SHORT_TIMEOUTS}{routes}"),
    )
    .await;

    const PER_DOMAIN: usize = 4;
    let mut sent: Vec<(String, &str)> = Vec::new();
    let mut senders = tokio::task::JoinSet::new();
    for (domain, _) in faults {
        for n in 0..PER_DOMAIN {
            let addr = relay.addr;
            senders.spawn(async move {
                let body = format!("Subject: {domain} {n}\n\nto a faulty next hop\n");
                let rcpt = format!("user@{domain}");
                let id = inproc::send(addr, "a@origin.test", &[&rcpt], "", "", &body)
                    .await
                    .unwrap_or_else(|e| panic!("{domain} {n} not accepted: {e}"));
                (id, domain)
            });
        }
    }
    while let Some(r) = senders.join_next().await {
        sent.push(r.unwrap());
    }

    // Wait until every message has either left the spool or been deferred
    // with a reason (the retry is an hour away).
    let config = relay.config.clone();
    // `None` once the message has left the spool.
    let show = |id: &str| -> Option<serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["queue", "show", id, "--json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    };
    let deferred = |v: &serde_json::Value| {
        let reason = v["last_reply"].as_str().unwrap_or_default();
        (v["state"] == "deferred" && !reason.is_empty()).then(|| Outcome::Deferred(reason.into()))
    };
    let settled = eventually(WAIT, || {
        let spooled: HashSet<String> = relay.spooled().into_iter().collect();
        let pending = sent
            .iter()
            .filter(|(id, _)| spooled.contains(id))
            .filter(|(id, _)| show(id).is_some_and(|v| deferred(&v).is_none()))
            .count();
        (pending == 0).then_some(())
    })
    .await;
    assert!(settled.is_some(), "messages still in flight after 20 s");

    let dsns = bounces.messages();
    let mut outcomes: BTreeMap<&str, Vec<Outcome>> = BTreeMap::new();
    for (id, domain) in &sent {
        let delivered = sinks[domain]
            .messages()
            .iter()
            .any(|m| String::from_utf8_lossy(&m.data).contains(id.as_str()));
        let bounced = dsns
            .iter()
            .any(|m| String::from_utf8_lossy(&m.data).contains(id.as_str()));
        let outcome = match (show(id).and_then(|v| deferred(&v)), delivered, bounced) {
            (Some(deferred), false, false) => deferred,
            (None, true, false) => Outcome::Delivered,
            (None, false, true) => Outcome::Bounced,
            (None, false, false) if domain == &"reject.test" => {
                // The bounce may still be on its way to the sender's sink.
                let arrived = eventually(WAIT, || {
                    bounces
                        .messages()
                        .iter()
                        .any(|m| String::from_utf8_lossy(&m.data).contains(id.as_str()))
                        .then_some(())
                })
                .await;
                assert!(
                    arrived.is_some(),
                    "{id} to {domain} left the spool unbounced"
                );
                Outcome::Bounced
            }
            other => panic!("{id} to {domain}: no single outcome: {other:?}"),
        };
        outcomes.entry(domain).or_default().push(outcome);
    }
    eprintln!("outcomes: {outcomes:#?}");

    let count = |domain: &str, f: &dyn Fn(&Outcome) -> bool| {
        outcomes[domain].iter().filter(|o| f(o)).count()
    };
    let deferred_with = |needle: &'static str| move |o: &Outcome| matches!(o, Outcome::Deferred(r) if r.contains(needle));
    assert_eq!(
        count("accept.test", &|o| *o == Outcome::Delivered),
        PER_DOMAIN
    );
    assert_eq!(count("temp.test", &deferred_with("451")), PER_DOMAIN);
    assert_eq!(
        count("reject.test", &|o| *o == Outcome::Bounced),
        PER_DOMAIN
    );
    assert_eq!(
        count("drop.test", &|o| matches!(o, Outcome::Deferred(_))),
        PER_DOMAIN
    );
    assert_eq!(count("stall.test", &deferred_with("timeout")), PER_DOMAIN);
    assert_eq!(count("slow.test", &deferred_with("timeout")), PER_DOMAIN);
    // A broken handshake never sends the mail in clear text over it: it is
    // deferred, or delivered in clear on a fresh connection (opportunistic TLS).
    assert_eq!(
        count("tlsreset.test", &|o| *o != Outcome::Bounced),
        PER_DOMAIN
    );
    let total: usize = outcomes.values().map(Vec::len).sum();
    assert_eq!(
        total,
        faults.len() * PER_DOMAIN,
        "every message counted once"
    );
    relay.stop().await;
}

/// One SMTP transaction against a relay that may die under it; the tag is in
/// the subject. `Some(queue id)` only for a 250 after the data.
fn try_send(addr: std::net::SocketAddr, tag: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let body = format!("Subject: {tag}\r\n\r\n{}\r\n", "load ".repeat(100));
    let mut reader = std::io::BufReader::new(stream.try_clone().ok()?);
    let mut reply = || -> Option<String> {
        loop {
            let mut line = String::new();
            if std::io::BufRead::read_line(&mut reader, &mut line).ok()? == 0 {
                return None;
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(line);
            }
        }
    };
    use std::io::Write;
    reply().filter(|r| r.starts_with("220"))?;
    stream
        .write_all(
            b"EHLO kill.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@other.test>\r\nDATA\r\n",
        )
        .ok()?;
    for want in ["250", "250", "250", "354"] {
        reply().filter(|r| r.starts_with(want))?;
    }
    stream.write_all(body.as_bytes()).ok()?;
    stream.write_all(b".\r\n").ok()?;
    let done = reply().filter(|r| r.starts_with("250 "))?;
    let _ = stream.write_all(b"QUIT\r\n");
    Some(queue_id(&done))
}

/// A pseudo-random number from the clock, enough to vary where a kill lands.
fn jitter(max_ms: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    nanos % max_ms
}

/// Ten SIGKILLs at random points while clients send and the relay delivers,
/// restarted each time: every message acknowledged with 250 reaches the
/// sink at least once; duplicates (mail delivered but not yet recorded when
/// the relay died) are counted and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_sigkills_under_load_lose_no_acknowledged_message() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let config = config_with(
        port,
        &format!(
            "[delivery]\nsmarthost = \"smtp://{}\"\nretry = [\"1s\"]\n{SHORT_TIMEOUTS}",
            sink.addr
        ),
        "",
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..8 {
        let (acked, stop) = (acked.clone(), stop.clone());
        clients.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let tag = format!("tag-{client}-{n}");
                n += 1;
                if try_send(addr, &tag).is_some() {
                    acked.lock().unwrap().push(tag);
                } else {
                    // The relay is down or restarting.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }));
    }
    let mut relay = Relay::start_in(dir.clone(), port, &config);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150 + jitter(350))).await;
        relay.signal(9);
        relay.wait_exit(Duration::from_secs(10));
        relay = Relay::start_in(dir.clone(), port, &config);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "only {} acknowledged", acked.len());

    let tag_of = |data: &[u8]| {
        let text = String::from_utf8_lossy(data);
        text.lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .map(str::to_string)
            .unwrap_or_default()
    };
    let wanted: HashSet<&String> = acked.iter().collect();
    let all_arrived = eventually(Duration::from_secs(30), || {
        let got: HashSet<String> = sink.messages().iter().map(|m| tag_of(&m.data)).collect();
        wanted.iter().all(|t| got.contains(*t)).then_some(())
    })
    .await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        *seen.entry(tag_of(&m.data)).or_default() += 1;
    }
    let missing: Vec<_> = acked.iter().filter(|t| !seen.contains_key(*t)).collect();
    assert!(
        all_arrived.is_some(),
        "{} acknowledged messages never arrived: {:?}\nlog:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        relay.log()
    );
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "10 SIGKILLs: {} acknowledged, {} arrived, {} duplicates, {} arrived unacknowledged",
        acked.len(),
        seen.len(),
        duplicates,
        seen.keys().filter(|t| !wanted.contains(t)).count()
    );
    // Nothing is left behind once everything arrived.
    let drained = eventually(WAIT, || relay.spooled().is_empty().then_some(())).await;
    assert!(drained.is_some(), "{} still spooled", relay.spooled().len());
}

/// The spool's disk fills up with mail already queued: new mail gets
/// 452 4.3.1, the queued messages are untouched, and accepting resumes as
/// soon as space returns.
#[test]
fn a_full_spool_disk_refuses_with_452_keeps_the_queue_and_recovers() {
    if !is_root() {
        eprintln!("a full spool disk needs root to mount a small tmpfs; not run");
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let spool = dir.path().join("spool");
    assert!(mount_tmpfs(&spool, "1m"), "mounting a tmpfs as root failed");
    let _unmount = Unmount(spool.clone());
    let port = free_port();
    let relay = Relay::start_in(dir.clone(), port, &base_config(port, ""));
    let mut queued = BTreeMap::new();
    for n in 0..5 {
        let body = format!(
            "Subject: queued {n}\r\n\r\n{}\r\n",
            format!("line {n}\r\n").repeat(50)
        );
        let id = queue_id(&send_message(
            relay.addr(),
            "a@client.test",
            &["b@other.test"],
            &body,
        ));
        queued.insert(id, body);
    }
    // Fill what is left of the disk.
    let filler = spool.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![b'x'; 16 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let body = format!(
        "Subject: no room\r\n\r\n{}",
        format!("{}\r\n", "y".repeat(500)).repeat(100)
    );
    let reply = send_message(relay.addr(), "a@client.test", &["b@other.test"], &body);
    assert!(reply.starts_with("452 4.3.1"), "{reply}");
    let check_queue = |queued: &BTreeMap<String, String>| {
        let spooled = relay.spooled();
        assert_eq!(
            spooled.len(),
            queued.len(),
            "{:?}",
            spooled.iter().map(|s| &s.id).collect::<Vec<_>>()
        );
        for s in &spooled {
            let text = String::from_utf8_lossy(&s.message);
            assert!(text.ends_with(&queued[&s.id]), "{} damaged", s.id);
        }
    };
    check_queue(&queued);

    std::fs::remove_file(&filler).unwrap();
    let reply = send_message(relay.addr(), "a@client.test", &["b@other.test"], &body);
    let id = queue_id(&reply);
    queued.insert(id, body.clone());
    check_queue(&queued);
}

// The in-process relay with a plugin chain, included as `kv.rs` does.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "support/plugins.rs"]
mod plugin_relay;

/// Sends one message to the local domain; returns its queue id.
async fn send_local(relay: &plugin_relay::Relay) -> String {
    let (mut c, _) = relay.client().await.unwrap();
    let r = c
        .send("a@b.test", &["c@local.test"], plugin_relay::MESSAGE)
        .await
        .unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    plugin_relay::queue_id(&r).unwrap()
}

/// Redis goes down and comes back while four clients send through a plugin
/// counting every hook in the kv store: every message is still taken and
/// queued, and counting resumes once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_back_under_load_loses_no_message() {
    use std::sync::atomic::AtomicUsize;
    let mut redis = crate::support::redis::RedisServer::start();
    let relay = Arc::new(
        plugin_relay::Relay::start(&crate::kv::chain(&redis.url(), "it", ""))
            .await
            .unwrap(),
    );
    const CLIENTS: usize = 4;
    const EACH: usize = 15;
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (relay, sent) = (relay.clone(), sent.clone());
        clients.spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..EACH {
                ids.push(send_local(&relay).await);
                sent.fetch_add(1, Ordering::SeqCst);
            }
            ids
        });
    }
    let reached = |n: usize| {
        let sent = sent.clone();
        async move {
            eventually(WAIT, || (sent.load(Ordering::SeqCst) >= n).then_some(()))
                .await
                .expect("clients stalled")
        }
    };
    reached(10).await;
    redis.stop();
    let down_at = sent.load(Ordering::SeqCst);
    reached(down_at + 12).await;
    redis.restart();
    let mut ids = Vec::new();
    while let Some(r) = clients.join_next().await {
        ids.extend(r.unwrap());
    }
    assert_eq!(ids.len(), CLIENTS * EACH);
    for id in &ids {
        relay
            .spooled(id)
            .unwrap_or_else(|e| panic!("{id} acknowledged but not queued: {e}"));
    }
    // Counting resumes: the counter is written again after the restart.
    redis.run(&["DEL", "it:kit:rcpt"]);
    let deadline = std::time::Instant::now() + WAIT;
    while redis.get("it:kit:rcpt").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "counting did not resume"
        );
        send_local(&relay).await;
    }
    eprintln!(
        "{} messages queued, Redis down after {down_at} of them",
        ids.len()
    );
}

/// Three hostile plugins in one chain, each misbehaving only for its own
/// recipient's local part: `testkit` traps (on_error reject), `looper`
/// loops until its 200 ms deadline (on_error tempfail), `hog` allocates
/// past its 16 MB cap (on_error continue). While their sessions run, six
/// clients send normally: each hostile call gets exactly its plugin's
/// policy, counted by kind in `/metrics`, and every other message (and
/// the other recipients of a transaction with a hostile one) reaches the
/// sink.
#[tokio::test(flavor = "multi_thread")]
async fn plugins_that_trap_loop_and_hoard_under_load_cost_only_their_own_calls() {
    use crate::support::smtp::Raw;
    use std::time::Instant;
    const CLIENTS: usize = 6;
    const EACH: usize = 15;
    const HOSTILE: usize = 6;
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let (dir, tables) = crate::ops::with_plugin(
        "testkit",
        "on_error = \"reject\"\ngrants = [\"kv\"]\n[plugin.config]\n\
         misbehave = { hook = \"rcpt\", how = \"trap\", local = \"trap\" }",
    );
    let others = "[[plugin]]\nname = \"looper\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n\
         on_error = \"tempfail\"\ntimeouts = { rcpt = 200 }\n[plugin.config]\n\
         misbehave = { hook = \"rcpt\", how = \"loop\", local = \"loop\" }\n\
         [[plugin]]\nname = \"hog\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n\
         on_error = \"continue\"\nmemory_mb = 16\n[plugin.config]\n\
         misbehave = { hook = \"rcpt\", how = \"alloc\", local = \"hog\" }\n";
    let port = free_port();
    let admin = free_port();
    let config = config_with(
        port,
        &format!("[delivery]\nsmarthost = \"smtp://{}\"", sink.addr),
        &format!("{tables}{others}[admin]\naddress = \"127.0.0.1:{admin}\"\n"),
    );
    let relay = Relay::start_in(dir, port, &config);
    let addr = relay.addr();
    let started = Instant::now();
    let mut threads = Vec::new();
    for c in 0..CLIENTS {
        threads.push(std::thread::spawn(move || {
            for i in 0..EACH {
                let to = format!("c{c}m{i}@dest.test");
                let r = send_message(addr, "a@ours.test", &[&to], "Subject: ok\r\n\r\nhi\r\n");
                queue_id(&r);
            }
        }));
    }
    // (local part, the reply its RCPT gets, how long it may take at least)
    let hostile = [
        ("trap", "550", Duration::ZERO),
        ("loop", "451 4.3.0", Duration::from_millis(200)),
        ("hog", "250", Duration::ZERO),
    ];
    for (local, want, at_least) in hostile {
        threads.push(std::thread::spawn(move || {
            for i in 0..HOSTILE {
                let mut c = Raw::connect(addr);
                assert!(c.cmd("EHLO hostile.test").starts_with("250"));
                assert!(c.cmd("MAIL FROM:<a@ours.test>").starts_with("250"));
                let other = format!("{local}-other{i}@dest.test");
                assert!(c.cmd(&format!("RCPT TO:<{other}>")).starts_with("250"));
                let asked = Instant::now();
                let r = c.cmd(&format!("RCPT TO:<{local}@dest.test>"));
                let took = asked.elapsed();
                assert!(r.starts_with(want), "{local}: {r}");
                assert!(took >= at_least && took < WAIT, "{local}: {took:?}");
                assert!(c.cmd("DATA").starts_with("354"));
                c.send(b"Subject: hostile\r\n\r\nhi\r\n.\r\n");
                queue_id(&c.reply());
                c.cmd("QUIT");
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let took = started.elapsed();
    // Every normal message, and each hostile transaction with its other
    // recipient (and the hog's own: its policy is continue).
    let want = CLIENTS * EACH + 3 * HOSTILE;
    let got = sink.wait_for(want, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = if sink.messages().len() > got.len() {
        sink.messages()
    } else {
        got
    };
    assert_eq!(got.len(), want, "each message once");
    let rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    assert_eq!(rcpts.len(), want + HOSTILE, "{rcpts:?}");
    for local in ["trap", "loop"] {
        let none = format!("{local}@dest.test");
        assert!(!rcpts.contains(&none), "{none} was let through");
    }
    assert_eq!(
        rcpts.iter().filter(|r| *r == "hog@dest.test").count(),
        HOSTILE
    );

    let page = crate::support::http::get(&format!("http://127.0.0.1:{admin}/metrics"), None).body;
    let errors = |plugin: &str, kind: &str| {
        crate::ops::sample(
            &page,
            &format!(
                "postern_plugin_errors_total{{plugin=\"{plugin}\",hook=\"rcpt\",kind=\"{kind}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    for (plugin, kind) in [
        ("testkit", "trap"),
        ("looper", "timeout"),
        ("hog", "memory"),
    ] {
        assert_eq!(
            errors(plugin, kind),
            HOSTILE as f64,
            "{plugin} {kind}\n{page}"
        );
    }
    for plugin in ["testkit", "looper", "hog"] {
        let all: f64 = ["trap", "timeout", "memory", "invalid", "instantiate"]
            .iter()
            .map(|k| errors(plugin, k))
            .sum();
        assert_eq!(all, HOSTILE as f64, "{plugin} failed only its own calls");
    }
    eprintln!(
        "{} normal messages from {CLIENTS} clients beside {} hostile sessions in {took:?} ({:.0} msg/s)",
        CLIENTS * EACH,
        3 * HOSTILE,
        (CLIENTS * EACH) as f64 / took.as_secs_f64()
    );
}
