//! Delivery: smart host and MX routing, retries, bounces, expiry, the queue
//! commands and a crash during delivery.

use std::time::Duration;

use mail_parser::MimeHeaders;

use crate::support::dns::{Answer, DnsServer};
use crate::support::eventually;
use crate::support::inprocess::{self as relay, Binary, Relay};
use crate::support::sink::{self, Behavior, Options, Sink};

const WAIT: Duration = Duration::from_secs(20);

fn body(subject: &str) -> String {
    format!("Subject: {subject}\nFrom: <a@origin.test>\n\nHello.\n")
}

/// A message's delivery-status part, checked to be an RFC 3464 report.
fn dsn_status(data: &[u8]) -> String {
    let msg = mail_parser::MessageParser::default()
        .parse(data)
        .expect("parses");
    let ct = msg.content_type().expect("content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let parts: Vec<_> = msg
        .parts
        .iter()
        .filter_map(|p| p.content_type())
        .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")))
        .collect();
    assert!(
        parts.contains(&"message/delivery-status".to_string()),
        "{parts:?}"
    );
    let text = String::from_utf8_lossy(data).into_owned();
    let start = text.find("Reporting-MTA:").expect("Reporting-MTA");
    text[start..].to_string()
}

/// Delivery settings sending `dest.test` to one sink and `origin.test` (the
/// senders' domain, where bounces go) to another; `before` comes first.
fn two_sink_routes(
    before: &str,
    dest: std::net::SocketAddr,
    origin: std::net::SocketAddr,
) -> String {
    format!("{before}[delivery.routes]\n\"dest.test\" = \"smtp://{dest}\"\n\"origin.test\" = \"smtp://{origin}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smarthost_retry_after_4xx_then_success() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::TempFailFirst(1))).await;
    let relay = Relay::start(
        dir.path(),
        &format!("smarthost = \"smtp://{}\"\nretry = [\"1s\"]\n", sink.addr),
    )
    .await;
    let id = relay::send(
        relay.addr,
        "a@origin.test",
        &["b@dest.test"],
        "",
        "",
        &body("retry me"),
    )
    .await
    .unwrap();
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].from, "a@origin.test");
    assert_eq!(got[0].rcpts, vec!["b@dest.test"]);
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(text.contains("Subject: retry me"), "{text}");
    assert!(
        text.contains(&id),
        "Received header names the queue id: {text}"
    );
    assert!(
        sink.transactions.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "a first, refused attempt"
    );
    // The message leaves the spool, state file included.
    let gone = eventually(WAIT, || relay.spooled().is_empty().then_some(())).await;
    assert!(gone.is_some(), "still spooled: {:?}", relay.spooled());
    let files: Vec<_> = std::fs::read_dir(relay.spool.join("queue"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(files.is_empty(), "{files:?}");
    relay.stop().await;
}

/// Binds sinks on several loopback addresses sharing one port (MX delivery
/// uses one `mx_port` for every host).
async fn sinks_on_one_port(specs: &[(&str, Behavior)]) -> (u16, Vec<Sink>) {
    for _ in 0..20 {
        let first = Sink::start(specs[0].0, Options::new(specs[0].1)).await;
        let port = first.addr.port();
        let mut sinks = vec![first];
        let mut ok = true;
        for (ip, b) in &specs[1..] {
            let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
            if std::net::TcpListener::bind(addr).is_err() {
                ok = false;
                break;
            }
            sinks.push(Sink::start_on(addr, Options::new(*b)).await);
        }
        if ok {
            return (port, sinks);
        }
    }
    panic!("no common free port");
}

fn mx_config(dns: &DnsServer, port: u16, extra: &str) -> String {
    format!(
        "nameservers = [\"{}\"]\nmx_port = {port}\nretry = [\"1s\"]\n{extra}",
        dns.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_delivery_fallback_order_and_nodata() {
    let dir = tempfile::tempdir().unwrap();
    let (port, sinks) = sinks_on_one_port(&[
        ("127.0.0.2", Behavior::Greeting421),
        ("127.0.0.3", Behavior::Accept),
        ("127.0.0.4", Behavior::Accept),
        ("127.0.0.5", Behavior::Accept),
        ("127.0.0.7", Behavior::MailTempFail),
        ("127.0.0.8", Behavior::Accept),
    ])
    .await;
    let dns = DnsServer::start().await;
    // Best MX refuses at the greeting, the second takes the mail, the third
    // must not be used; order in the answer is not order of preference.
    dns.mx(
        "dest.test",
        &[
            (30, "mx3.dest.test"),
            (10, "mx1.dest.test"),
            (20, "mx2.dest.test"),
        ],
    )
    .a("mx1.dest.test", &["127.0.0.2"])
    .a("mx2.dest.test", &["127.0.0.3"])
    .a("mx3.dest.test", &["127.0.0.4"]);
    // No MX at all (NODATA): the domain's own address is the mail host.
    dns.a("plain.test", &["127.0.0.5"]);
    // The best MX answers MAIL with 451: the next MX gets the message now.
    dns.mx("busy.test", &[(10, "mx1.busy.test"), (20, "mx2.busy.test")])
        .a("mx1.busy.test", &["127.0.0.7"])
        .a("mx2.busy.test", &["127.0.0.8"]);
    let relay = Relay::start(dir.path(), &mx_config(&dns, port, "")).await;
    relay::send(
        relay.addr,
        "a@origin.test",
        &["b@dest.test", "c@plain.test", "d@busy.test"],
        "",
        "",
        &body("mx"),
    )
    .await
    .unwrap();
    let got = sinks[1].wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["b@dest.test"]);
    let got = sinks[3].wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["c@plain.test"]);
    let got = sinks[5].wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["d@busy.test"]);
    assert_eq!(
        sinks[4]
            .transactions
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "best MX tried first"
    );
    assert!(
        sinks[0]
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1,
        "best MX tried first"
    );
    assert!(
        sinks[2].messages().is_empty(),
        "third MX used although the second took the mail"
    );
    assert!(
        eventually(WAIT, || relay.spooled().is_empty().then_some(()))
            .await
            .is_some()
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_and_null_mx_bounce_servfail_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (port, sinks) = sinks_on_one_port(&[("127.0.0.6", Behavior::Accept)]).await;
    let dns = DnsServer::start().await;
    dns.mx("origin.test", &[(10, "mx.origin.test")])
        .a("mx.origin.test", &["127.0.0.6"]);
    dns.add("servfail.test", Answer::ServFail);
    dns.mx("nullmx.test", &[(0, ".")]);
    let relay = Relay::start(dir.path(), &mx_config(&dns, port, "")).await;
    let id = relay::send(
        relay.addr,
        "a@origin.test",
        &["x@nx.test", "y@servfail.test", "z@nullmx.test"],
        "",
        "",
        &body("dns"),
    )
    .await
    .unwrap();
    // One bounce to the sender's own MX, about the two permanent failures only.
    let got = sinks[0].wait_for(1, WAIT).await;
    assert_eq!(got[0].from, "", "bounces come from the null sender");
    assert_eq!(got[0].rcpts, vec!["a@origin.test"]);
    let status = dsn_status(&got[0].data);
    assert!(
        status.contains("Final-Recipient: rfc822; x@nx.test"),
        "{status}"
    );
    assert!(status.contains("Status: 5.1.2"), "{status}");
    assert!(
        status.contains("Final-Recipient: rfc822; z@nullmx.test"),
        "{status}"
    );
    assert!(status.contains("Status: 5.1.10"), "{status}");
    assert!(
        !status.contains("servfail.test"),
        "SERVFAIL must not bounce: {status}"
    );
    // The SERVFAIL recipient stays queued for a retry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(relay.spooled(), vec![id.clone()]);
    let list = relay::queue_cmd(&relay.config, &["show", &id, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let rcpts = v["recipients"].as_array().unwrap();
    let state_of = |addr: &str| {
        rcpts
            .iter()
            .find(|r| r["address"] == addr)
            .map(|r| r["state"].as_str().unwrap().to_string())
    };
    assert_eq!(
        state_of("y@servfail.test").as_deref(),
        Some("deferred"),
        "{v}"
    );
    assert_eq!(state_of("x@nx.test").as_deref(), Some("failed"), "{v}");
    assert_eq!(
        sinks[0].messages().len(),
        1,
        "bounced once, not on every retry"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounce_after_5xx_is_an_rfc3464_report_honouring_dsn_params() {
    let dir = tempfile::tempdir().unwrap();
    let rejecting = Sink::start("127.0.0.1", Options::new(Behavior::Reject)).await;
    let sender_sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let relay = Relay::start(
        dir.path(),
        &two_sink_routes("", rejecting.addr, sender_sink.addr),
    )
    .await;
    // Full message returned by default.
    relay::send(
        relay.addr,
        "a@origin.test",
        &["nobody@dest.test"],
        "",
        "",
        &body("full return"),
    )
    .await
    .unwrap();
    // RET=HDRS, ENVID and ORCPT honoured.
    relay::send(
        relay.addr,
        "a@origin.test",
        &["nobody2@dest.test"],
        " RET=HDRS ENVID=env-42",
        " NOTIFY=FAILURE ORCPT=rfc822;orig@dest.test",
        "Subject: headers only\n\nSECRET-BODY\n",
    )
    .await
    .unwrap();
    // NOTIFY=NEVER: no bounce.
    relay::send(
        relay.addr,
        "a@origin.test",
        &["nobody3@dest.test"],
        "",
        " NOTIFY=NEVER",
        &body("never"),
    )
    .await
    .unwrap();
    let got = sender_sink.wait_for(2, WAIT).await;
    assert!(
        eventually(WAIT, || relay.spooled().is_empty().then_some(()))
            .await
            .is_some(),
        "{:?}",
        relay.spooled()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = if sender_sink.messages().len() > got.len() {
        sender_sink.messages()
    } else {
        got
    };
    assert_eq!(got.len(), 2, "NOTIFY=NEVER must not bounce");
    let find = |needle: &str| {
        got.iter()
            .find(|m| String::from_utf8_lossy(&m.data).contains(needle))
            .unwrap_or_else(|| panic!("no bounce about {needle}"))
    };
    let full = find("nobody@dest.test");
    assert_eq!(full.from, "");
    let status = dsn_status(&full.data);
    assert!(status.contains("Action: failed"), "{status}");
    assert!(status.contains("Status: 5.1.1"), "{status}");
    assert!(
        status.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user here"),
        "{status}"
    );
    assert!(status.contains("Remote-MTA: dns; 127.0.0.1"), "{status}");
    let full_text = String::from_utf8_lossy(&full.data);
    assert!(
        full_text.contains("message/rfc822") && full_text.contains("Subject: full return"),
        "{full_text}"
    );

    let hdrs = find("nobody2@dest.test");
    let text = String::from_utf8_lossy(&hdrs.data);
    assert!(text.contains("Original-Envelope-Id: env-42"), "{text}");
    assert!(
        text.contains("Original-Recipient: rfc822;orig@dest.test"),
        "{text}"
    );
    assert!(
        text.contains("text/rfc822-headers") && text.contains("Subject: headers only"),
        "{text}"
    );
    assert!(
        !text.contains("SECRET-BODY"),
        "RET=HDRS returned the body: {text}"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bounce_for_the_null_sender() {
    let dir = tempfile::tempdir().unwrap();
    let rejecting = Sink::start("127.0.0.1", Options::new(Behavior::Reject)).await;
    let relay = Relay::start(
        dir.path(),
        &format!("smarthost = \"smtp://{}\"\n", rejecting.addr),
    )
    .await;
    relay::send(
        relay.addr,
        "",
        &["nobody@dest.test"],
        "",
        "",
        &body("a bounce that bounces"),
    )
    .await
    .unwrap();
    assert!(
        eventually(WAIT, || relay.spooled().is_empty().then_some(()))
            .await
            .is_some(),
        "{:?}",
        relay.spooled()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One transaction (the message itself, refused); a bounce would be a second.
    assert_eq!(
        rejecting
            .transactions
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert!(relay.spooled().is_empty());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_bounces_with_4_4_7() {
    let dir = tempfile::tempdir().unwrap();
    let deferring = Sink::start("127.0.0.1", Options::new(Behavior::TempFail)).await;
    let sender_sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let relay = Relay::start(
        dir.path(),
        &two_sink_routes(
            "retry = [\"1s\"]\nmax_age = \"3s\"\n",
            deferring.addr,
            sender_sink.addr,
        ),
    )
    .await;
    relay::send(
        relay.addr,
        "a@origin.test",
        &["late@dest.test"],
        "",
        "",
        &body("too late"),
    )
    .await
    .unwrap();
    let got = sender_sink.wait_for(1, WAIT).await;
    let status = dsn_status(&got[0].data);
    assert!(
        status.contains("Final-Recipient: rfc822; late@dest.test"),
        "{status}"
    );
    assert!(
        status.contains("Action: failed") && status.contains("Status: 4.4.7"),
        "{status}"
    );
    assert!(
        status.contains("451 4.3.0 try later"),
        "last reply reported: {status}"
    );
    assert!(
        deferring
            .transactions
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2,
        "retried before expiry"
    );
    assert!(
        eventually(WAIT, || relay.spooled().is_empty().then_some(()))
            .await
            .is_some()
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smarthost_auth_only_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (acceptor, ca) = sink::tls_acceptor(dir.path(), &["sink.test"]);
    let mut opts = Options::new(Behavior::Accept);
    opts.tls = Some(acceptor);
    opts.auth = Some(("relayuser".into(), "s3cret:pw".into()));
    let tls_sink = Sink::start("127.0.0.1", opts).await;
    // A sink that offers AUTH in clear text and no STARTTLS: must never get the password.
    let mut clear = Options::new(Behavior::Accept);
    clear.auth = Some(("relayuser".into(), "s3cret:pw".into()));
    clear.auth_in_clear = true;
    let clear_sink = Sink::start("127.0.0.1", clear).await;
    let dns = DnsServer::start().await;
    dns.a("sink.test", &["127.0.0.1"]);
    let relay = Relay::start(
        dir.path(),
        &format!(
            "nameservers = [\"{}\"]\ntls_ca = \"{}\"\nretry = [\"1h\"]\n[delivery.routes]\n\"dest.test\" = \"smtp://relayuser:s3cret%3Apw@sink.test:{}\"\n\"clear.test\" = \"smtp://relayuser:s3cret%3Apw@127.0.0.1:{}\"\n",
            dns.addr,
            ca.display(),
            tls_sink.addr.port(),
            clear_sink.addr.port()
        ),
    )
    .await;
    relay::send(
        relay.addr,
        "a@origin.test",
        &["b@dest.test"],
        "",
        "",
        &body("auth"),
    )
    .await
    .unwrap();
    let id = relay::send(
        relay.addr,
        "a@origin.test",
        &["b@clear.test"],
        "",
        "",
        &body("no auth"),
    )
    .await
    .unwrap();
    let got = tls_sink.wait_for(1, WAIT).await;
    assert!(got[0].tls, "delivered over TLS");
    assert_eq!(got[0].auth.as_deref(), Some("relayuser"));
    // The clear-text hop: deferred, no AUTH attempt, no transaction.
    let deferred = eventually(WAIT, || {
        let out = relay::queue_cmd(&relay.config, &["show", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (v["state"] == "deferred").then_some(v)
    })
    .await
    .expect("deferred");
    assert!(
        deferred["last_reply"]
            .as_str()
            .unwrap()
            .contains("only sent over TLS"),
        "{deferred}"
    );
    assert_eq!(
        clear_sink
            .auth_attempts
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        clear_sink
            .transactions
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    relay.stop().await;
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_on_a_running_and_a_stopped_relay() {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::TempFail)).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let config = relay::write_config(
        dir.path(),
        addr,
        &format!("smarthost = \"smtp://{}\"\nretry = [\"1h\"]\n", sink.addr),
    );
    let bin = Binary::serve(&config, addr, &dir.path().join("relay.log")).await;
    let id = relay::send(
        addr,
        "a@origin.test",
        &["b@dest.test", "c@dest.test"],
        "",
        "",
        &body("q"),
    )
    .await
    .unwrap();
    let listed = eventually(WAIT, || {
        let v = json(&relay::queue_cmd(&config, &["list", "--json"]));
        (v[0]["state"] == "deferred").then_some(v)
    })
    .await
    .expect("deferred after the first attempt");
    let e = &listed[0];
    assert_eq!(e["id"], id.as_str());
    assert_eq!(e["sender"], "a@origin.test");
    assert_eq!(e["attempts"], 1);
    assert!(e["next_attempt"].as_u64().unwrap() > 0);
    assert!(
        e["last_reply"].as_str().unwrap().contains("451 4.3.0"),
        "{e}"
    );
    assert_eq!(e["recipients"].as_array().unwrap().len(), 2);
    assert_eq!(e["recipients"][0]["state"], "deferred");
    let sock = dir.path().join("spool/control.sock");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = relay::queue_cmd(&config, &["list"]);
    assert!(
        text.contains(&id) && text.contains("b@dest.test") && text.contains("deferred"),
        "{text}"
    );

    relay::queue_cmd(&config, &["hold", &id]);
    assert_eq!(
        json(&relay::queue_cmd(&config, &["show", &id, "--json"]))["state"],
        "held"
    );
    let before = sink.transactions.load(SeqCst);
    relay::queue_cmd(&config, &["flush"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.transactions.load(SeqCst),
        before,
        "a held message was tried"
    );
    relay::queue_cmd(&config, &["release", &id]);
    assert!(
        eventually(WAIT, || (sink.transactions.load(SeqCst) > before)
            .then_some(()))
        .await
        .is_some(),
        "release retries now"
    );
    let after_release = sink.transactions.load(SeqCst);
    eventually(WAIT, || {
        (json(&relay::queue_cmd(&config, &["show", &id, "--json"]))["attempts"] == 2).then_some(())
    })
    .await
    .expect("second pass recorded");
    relay::queue_cmd(&config, &["flush", &id]);
    assert!(
        eventually(WAIT, || (sink.transactions.load(SeqCst) > after_release)
            .then_some(()))
        .await
        .is_some(),
        "flush retries now"
    );

    // Stopped relay: the command works on the files.
    bin.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v = json(&relay::queue_cmd(&config, &["list", "--json"]));
    assert_eq!(v.as_array().unwrap().len(), 1);
    relay::queue_cmd(&config, &["hold", &id]);
    assert_eq!(
        json(&relay::queue_cmd(&config, &["show", &id, "--json"]))["state"],
        "held"
    );
    relay::queue_cmd(&config, &["release", &id]);
    assert_eq!(
        json(&relay::queue_cmd(&config, &["show", &id, "--json"]))["state"],
        "queued"
    );
    relay::queue_cmd(&config, &["delete", &id]);
    assert_eq!(
        json(&relay::queue_cmd(&config, &["list", "--json"])),
        serde_json::json!([])
    );
    assert!(relay::spooled(&dir.path().join("spool")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_delivery_loses_nothing_acknowledged() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    const SENDERS: usize = 8;
    const PER_SENDER: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let config = relay::write_config(
        dir.path(),
        addr,
        &format!("smarthost = \"smtp://{}\"\nretry = [\"1s\"]\n", sink.addr),
    );
    let bin = Binary::serve(&config, addr, &dir.path().join("relay1.log")).await;
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..PER_SENDER {
                let subject = format!("msg-{s}-{n}");
                match relay::send(
                    addr,
                    "a@origin.test",
                    &["b@dest.test"],
                    "",
                    "",
                    &body(&subject),
                )
                .await
                {
                    Ok(_) => acked.lock().unwrap().push(subject),
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill while messages are both arriving and being delivered.
    eventually(WAIT, || (sink.messages().len() >= 40).then_some(()))
        .await
        .expect("delivery under way");
    bin.kill();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 40);
    let _bin = Binary::serve(&config, addr, &dir.path().join("relay2.log")).await;
    let subject_of = |data: &[u8]| {
        let text = String::from_utf8_lossy(data);
        text.lines()
            .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
            .unwrap_or_default()
    };
    let counts = eventually(Duration::from_secs(60), || {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for m in sink.messages() {
            *counts.entry(subject_of(&m.data)).or_default() += 1;
        }
        acked
            .iter()
            .all(|s| counts.contains_key(s))
            .then_some(counts)
    })
    .await;
    let Some(counts) = counts else {
        let counts: std::collections::HashSet<String> = sink
            .messages()
            .iter()
            .map(|m| subject_of(&m.data))
            .collect();
        let missing: Vec<_> = acked.iter().filter(|s| !counts.contains(*s)).collect();
        panic!(
            "{} acknowledged message(s) never delivered: {missing:?}",
            missing.len()
        );
    };
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "sigkill test: {} acknowledged, {} delivered, {} distinct, {} duplicate(s)",
        acked.len(),
        sink.messages().len(),
        counts.len(),
        duplicates
    );
    assert!(
        eventually(WAIT, || relay::spooled(&dir.path().join("spool"))
            .is_empty()
            .then_some(()))
        .await
        .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_during_delivery_delivers_nothing_twice() {
    use std::collections::HashMap;
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let config = relay::write_config(
        dir.path(),
        addr,
        &format!("smarthost = \"smtp://{}\"\nretry = [\"1s\"]\n", sink.addr),
    );
    let bin = Binary::serve(&config, addr, &dir.path().join("relay1.log")).await;
    let mut tasks = Vec::new();
    for s in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..30 {
                let subject = format!("msg-{s}-{n}");
                if relay::send(
                    addr,
                    "a@origin.test",
                    &["b@dest.test"],
                    "",
                    "",
                    &body(&subject),
                )
                .await
                .is_ok()
                {
                    acked.push(subject);
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 120);
    // Stop while deliveries may still be in flight, then start again.
    // Off the runtime: the sink serving the relay's last QUIT runs on it.
    let t0 = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || bin.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        t0.elapsed()
    );
    let _bin = Binary::serve(&config, addr, &dir.path().join("relay2.log")).await;
    let subject_of = |data: &[u8]| {
        let text = String::from_utf8_lossy(data);
        text.lines()
            .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
            .unwrap_or_default()
    };
    eventually(WAIT, || {
        (sink.messages().len() >= acked.len()).then_some(())
    })
    .await
    .expect("all delivered");
    assert!(
        eventually(WAIT, || relay::spooled(&dir.path().join("spool"))
            .is_empty()
            .then_some(()))
        .await
        .is_some()
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        *counts.entry(subject_of(&m.data)).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dups.is_empty(), "delivered twice: {dups:?}");
    assert!(acked.iter().all(|s| counts.contains_key(s)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_lacking_8bitmime_smtputf8_or_size_fails_with_the_right_code() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(Behavior::Accept);
    opts.minimal = true;
    let old = Sink::start("127.0.0.1", opts).await;
    let sender_sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let relay = Relay::start(dir.path(), &two_sink_routes("", old.addr, sender_sink.addr)).await;
    let send = |rcpt: &'static str, params: &'static str, text: String| {
        let addr = relay.addr;
        async move {
            relay::send(addr, "a@origin.test", &[rcpt], params, "", &text)
                .await
                .unwrap()
        }
    };
    send(
        "eight@dest.test",
        " BODY=8BITMIME",
        "Subject: 8bit\n\nCaf\u{e9}\n".into(),
    )
    .await;
    send("\u{fc}ser@dest.test", " SMTPUTF8", body("utf8 address")).await;
    send(
        "big@dest.test",
        "",
        format!("Subject: big\n\n{}\n", "x".repeat(3000)),
    )
    .await;
    // 7-bit content declared 8BITMIME goes through without the parameter.
    send("seven@dest.test", " BODY=8BITMIME", body("plain ascii")).await;
    let bounces = sender_sink.wait_for(3, WAIT).await;
    let all: String = bounces.iter().map(|m| dsn_status(&m.data)).collect();
    for (rcpt, code) in [
        ("eight@dest.test", "5.6.3"),
        ("\u{fc}ser@dest.test", "5.6.7"),
        ("big@dest.test", "5.3.4"),
    ] {
        let block = all
            .split("\r\n\r\n")
            .find(|b| b.contains(&format!("; {rcpt}")))
            .unwrap_or_else(|| panic!("no report about {rcpt}: {all}"));
        assert!(
            block.contains(&format!("Status: {code}")),
            "{rcpt}: {block}"
        );
    }
    let got = old.wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["seven@dest.test"]);
    assert!(!got[0].mail.contains("BODY="), "{}", got[0].mail);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_the_relay_itself_bounces_as_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let sender_sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", relay::free_port()).parse().unwrap();
    let config = relay::write_config(
        dir.path(),
        addr,
        &format!(
            "[delivery.routes]\n\"loop.test\" = \"smtp://{addr}\"\n\"origin.test\" = \"smtp://{}\"\n",
            sender_sink.addr
        ),
    );
    let _bin = Binary::serve(&config, addr, &dir.path().join("relay.log")).await;
    relay::send(
        addr,
        "a@origin.test",
        &["b@loop.test"],
        "",
        "",
        &body("loop"),
    )
    .await
    .unwrap();
    let got = sender_sink.wait_for(1, WAIT).await;
    let status = dsn_status(&got[0].data);
    assert!(status.contains("Status: 5.4.6"), "{status}");
    assert!(status.contains("loops back"), "{status}");
    assert!(
        eventually(WAIT, || relay::spooled(&dir.path().join("spool"))
            .is_empty()
            .then_some(()))
        .await
        .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_tls_per_route_never_sends_in_clear() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let plain = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let relay = Relay::start(
        dir.path(),
        &format!(
            "retry = [\"1h\"]\n[delivery.routes]\n\"secure.test\" = {{ next_hop = \"smtp://{0}\", require_tls = true }}\n\"open.test\" = \"smtp://{0}\"\n",
            plain.addr
        ),
    )
    .await;
    let id = relay::send(
        relay.addr,
        "a@origin.test",
        &["b@secure.test"],
        "",
        "",
        &body("secret"),
    )
    .await
    .unwrap();
    relay::send(
        relay.addr,
        "a@origin.test",
        &["b@open.test"],
        "",
        "",
        &body("open"),
    )
    .await
    .unwrap();
    let got = plain.wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["b@open.test"]);
    let v = eventually(WAIT, || {
        let v = json(&relay::queue_cmd(&relay.config, &["show", &id, "--json"]));
        (v["state"] == "deferred").then_some(v)
    })
    .await
    .expect("deferred, not sent in clear");
    assert!(
        v["last_reply"]
            .as_str()
            .unwrap()
            .contains("TLS is required"),
        "{v}"
    );
    assert_eq!(
        plain.transactions.load(SeqCst),
        1,
        "only the open route's message"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_delay_gets_one_delay_notice() {
    let dir = tempfile::tempdir().unwrap();
    let deferring = Sink::start("127.0.0.1", Options::new(Behavior::TempFail)).await;
    let sender_sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let relay = Relay::start(
        dir.path(),
        &two_sink_routes(
            "retry = [\"1s\"]\ndelay_warning = \"1s\"\n",
            deferring.addr,
            sender_sink.addr,
        ),
    )
    .await;
    relay::send(
        relay.addr,
        "a@origin.test",
        &["slow@dest.test"],
        "",
        " NOTIFY=DELAY,FAILURE",
        &body("delayed"),
    )
    .await
    .unwrap();
    // Without NOTIFY=DELAY: no delay notice.
    relay::send(
        relay.addr,
        "a@origin.test",
        &["quiet@dest.test"],
        "",
        "",
        &body("quiet"),
    )
    .await
    .unwrap();
    let got = sender_sink.wait_for(1, WAIT).await;
    let status = dsn_status(&got[0].data);
    assert!(
        status.contains("Final-Recipient: rfc822; slow@dest.test"),
        "{status}"
    );
    assert!(
        status.contains("Action: delayed") && status.contains("Status: 4.3.0"),
        "{status}"
    );
    // Retries go on; still only the one notice.
    let before = deferring
        .transactions
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(eventually(WAIT, || (deferring
        .transactions
        .load(std::sync::atomic::Ordering::SeqCst)
        >= before + 4)
        .then_some(()))
    .await
    .is_some());
    assert_eq!(
        sender_sink.messages().len(),
        1,
        "one delay notice, and none without NOTIFY=DELAY"
    );
    assert_eq!(relay.spooled().len(), 2);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opportunistic_tls_failure_falls_back_to_clear_text() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(Behavior::Accept);
    opts.broken_tls = true;
    let sink = Sink::start("127.0.0.1", opts).await;
    let relay = Relay::start(
        dir.path(),
        &format!("smarthost = \"smtp://{}\"\n", sink.addr),
    )
    .await;
    relay::send(
        relay.addr,
        "a@origin.test",
        &["b@dest.test"],
        "",
        "",
        &body("tls broken"),
    )
    .await
    .unwrap();
    let got = sink.wait_for(1, WAIT).await;
    assert!(!got[0].tls);
    assert!(
        sink.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "a TLS try, then clear text"
    );
    relay.stop().await;
}
