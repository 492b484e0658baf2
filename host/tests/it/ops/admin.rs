//! The admin listener: what it refuses to start with, its guard, and
//! `/metrics` after known traffic.

use std::process::Command;
use std::time::Duration;

use super::{promtool_is_silent, sample, start};
use crate::support::http::{curl, get, post_json};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::{send_message, Raw};

const TOKEN: &str = "s3cret-admin-token-0123";

/// Known traffic, then a scrape: each count is what was sent, and promtool
/// finds nothing to say about the page.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_known_traffic() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let delivery = format!("smarthost = \"smtp://{}\"", sink.addr);
    let limits = "[limits]\nmax_recipients = 1\nmax_message_size = 2000\n";
    let (relay, base) = start(&delivery, None, limits);
    let addr = relay.addr();
    let before = get(&format!("{base}/metrics"), None).body;
    let ok = tokio::task::spawn_blocking(move || {
        let mut replies = Vec::new();
        for i in 0..3 {
            let body = format!("Subject: {i}\r\n\r\nhello\r\n");
            replies.push(send_message(addr, "a@ours.test", &["b@ours.test"], &body));
        }
        // Too big: refused at the end of data.
        let big = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(3000));
        replies.push(send_message(addr, "a@ours.test", &["b@ours.test"], &big));
        // A second recipient over max_recipients: 452 at RCPT.
        let mut c = Raw::connect(addr);
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<a@ours.test>");
        c.cmd("RCPT TO:<b@ours.test>");
        replies.push(c.cmd("RCPT TO:<c@ours.test>"));
        c.cmd("QUIT");
        replies
    })
    .await
    .unwrap();
    for r in &ok[..3] {
        assert!(r.starts_with("250 "), "{r}");
    }
    assert!(ok[3].starts_with("552"), "{}", ok[3]);
    assert!(ok[4].starts_with("452"), "{}", ok[4]);
    sink.wait_for(3, Duration::from_secs(20)).await;

    // Delivery records its outcome just after the sink's 250.
    let page = crate::support::eventually(Duration::from_secs(10), || {
        let page = get(&format!("{base}/metrics"), None).body;
        (sample(
            &page,
            "postern_delivery_recipients_total{outcome=\"delivered\"}",
        ) == Some(3.0))
        .then_some(page)
    })
    .await
    .expect("three deliveries counted");
    let listener = format!("127.0.0.1:{}", relay.port);
    for (series, want) in [
        (
            "postern_messages_received_total{source=\"smtp\"}".to_string(),
            3.0,
        ),
        (
            "postern_smtp_transactions_total{outcome=\"queued\"}".into(),
            3.0,
        ),
        (
            "postern_smtp_transactions_total{outcome=\"refused\"}".into(),
            1.0,
        ),
        (
            "postern_smtp_replies_total{stage=\"rcpt\",class=\"4xx\"}".into(),
            1.0,
        ),
        (
            "postern_smtp_replies_total{stage=\"rcpt\",class=\"2xx\"}".into(),
            5.0,
        ),
        (
            "postern_smtp_replies_total{stage=\"data\",class=\"5xx\"}".into(),
            1.0,
        ),
        (
            "postern_smtp_replies_total{stage=\"connect\",class=\"2xx\"}".into(),
            5.0,
        ),
        (
            format!(
                "postern_smtp_connections_total{{listener=\"{listener}\",outcome=\"accepted\"}}"
            ),
            5.0,
        ),
        ("postern_spool_fsync_seconds_count".into(), 3.0),
        ("postern_delivery_delay_seconds_count".into(), 3.0),
        ("postern_queue_messages{state=\"deferred\"}".into(), 0.0),
        (
            "postern_delivery_recipients_total{outcome=\"deferred\"}".into(),
            0.0,
        ),
    ] {
        let was = sample(&before, &series).unwrap_or(0.0);
        let now = sample(&page, &series).map(|v| v - was);
        assert_eq!(now, Some(want), "{series} (was {was}) in\n{page}");
    }
    assert_eq!(sample(&page, "postern_ready"), Some(1.0));
    // One connection carried all three, or a few did.
    let opened = sample(&page, "postern_outbound_connections_total{result=\"ok\"}").unwrap();
    assert!((1.0..=3.0).contains(&opened), "{page}");
    promtool_is_silent(&page);
}

/// The queue gauges come from the spool's index, kept as messages change
/// state: a scrape right after queueing, holding, deferring and delivering
/// counts each state exactly, and promtool is content with the page.
#[tokio::test(flavor = "multi_thread")]
async fn queue_gauges_are_exact_right_after_each_change() {
    let good = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let bad = Sink::start("127.0.0.1", Options::new(Behavior::TempFail)).await;
    let delivery = format!(
        "smarthost = \"smtp://{}\"\nretry = [\"1h\"]\n\
         [delivery.routes]\n\"later.test\" = \"smtp://{}\"",
        good.addr, bad.addr
    );
    let (relay, base) = start(&delivery, Some(TOKEN), "");
    let addr = relay.addr();
    let gauges = || {
        let page = get(&format!("{base}/metrics"), Some(TOKEN)).body;
        let counts = ["queued", "deferred", "held", "quarantine"]
            .map(|s| sample(&page, &format!("postern_queue_messages{{state=\"{s}\"}}")).unwrap());
        (counts, page)
    };
    let act = |action: &str, domain: &str| {
        let url = format!("{base}/api/v1/queue/{action}");
        let answer = post_json(&url, Some(TOKEN), &serde_json::json!({"domain": domain}));
        assert_eq!(answer.status, 200, "{action}: {answer:?}");
    };
    let send = move |to: &'static str, n: usize| {
        tokio::task::spawn_blocking(move || {
            for _ in 0..n {
                let r = send_message(addr, "a@ours.test", &[to], "Subject: q\r\n\r\nhi\r\n");
                assert!(r.starts_with("250 "), "{r}");
            }
        })
    };
    assert_eq!(gauges().0, [0.0; 4], "an empty spool");

    // Suspended, three wait untried: queued, counted as soon as the 250 came.
    act("suspend", "wait.test");
    send("x@wait.test", 3).await.unwrap();
    let (counts, page) = gauges();
    assert_eq!(counts, [3.0, 0.0, 0.0, 0.0], "{page}");
    let age = sample(&page, "postern_queue_oldest_age_seconds{state=\"queued\"}").unwrap();
    assert!((0.0..=5.0).contains(&age), "{age}");
    assert_eq!(
        sample(&page, "postern_queue_oldest_age_seconds{state=\"held\"}"),
        Some(0.0)
    );

    // Held: moved at once.
    act("hold", "wait.test");
    assert_eq!(gauges().0, [0.0, 0.0, 3.0, 0.0]);

    // Two refused with 451: deferred once their attempt is recorded.
    send("r@later.test", 2).await.unwrap();
    let deferred = crate::support::eventually(Duration::from_secs(20), || {
        let (counts, page) = gauges();
        (counts[1] == 2.0).then_some((counts, page))
    })
    .await;
    let (counts, page) = deferred.expect("two deferred");
    assert_eq!(counts, [0.0, 2.0, 3.0, 0.0], "{page}");
    assert!(bad.transactions.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    promtool_is_silent(&page);

    // Released and resumed: delivered, and gone from the gauges.
    act("release", "wait.test");
    assert_eq!(
        gauges().0,
        [3.0, 2.0, 0.0, 0.0],
        "released, still suspended"
    );
    act("resume", "wait.test");
    good.wait_for(3, Duration::from_secs(20)).await;
    let done = crate::support::eventually(Duration::from_secs(10), || {
        let (counts, _) = gauges();
        (counts == [0.0, 2.0, 0.0, 0.0]).then_some(())
    })
    .await;
    assert!(done.is_some(), "delivered: {:?}", gauges().0);
    assert_eq!(good.messages().len(), 3);
}

/// A token guards everything but /health; a browser logs in with it and
/// gets a cookie; without a token the listener only reads.
#[test]
fn the_token_guards_the_listener() {
    let (_relay, base) = start("smarthost = \"smtp://127.0.0.1:9\"", Some(TOKEN), "");
    let url = |p: &str| format!("{base}{p}");
    assert_eq!(get(&url("/health"), None).status, 200);
    let refused = get(&url("/metrics"), None);
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(
        refused.header("www-authenticate").as_deref(),
        Some("Bearer")
    );
    assert_eq!(
        get(&url("/metrics"), Some("wrong-token-0123456789")).status,
        401
    );
    assert_eq!(get(&url("/metrics"), Some(TOKEN)).status, 200);
    // A browser without the cookie is sent to the form.
    let page = curl(&[&url("/api/v1/queue"), "-H", "Accept: text/html"]);
    assert_eq!(page.status, 303);
    assert_eq!(page.header("location").as_deref(), Some("/login"));
    let wrong = curl(&[
        &url("/login"),
        "--data-urlencode",
        "token=guess-guess-guess",
    ]);
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());
    let login = curl(&[
        &url("/login"),
        "--data-urlencode",
        &format!("token={TOKEN}"),
    ]);
    assert_eq!(login.status, 303, "{login:?}");
    let cookie = login.header("set-cookie").expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap();
    let with_cookie = curl(&[&url("/api/v1/queue"), "-H", &format!("Cookie: {session}")]);
    assert_eq!(with_cookie.status, 200, "{with_cookie:?}");
    assert!(with_cookie.json()["messages"].is_array());
    let forged = curl(&[&url("/metrics"), "-H", "Cookie: postern_session=00ff"]);
    assert_eq!(forged.status, 401);
}

#[test]
fn without_a_token_http_only_reads() {
    let (relay, base) = start("smarthost = \"smtp://127.0.0.1:9\"", None, "");
    assert_eq!(get(&format!("{base}/api/v1/queue"), None).status, 200);
    let flush = crate::support::http::post_json(
        &format!("{base}/api/v1/queue/flush"),
        None,
        &serde_json::json!({}),
    );
    assert_eq!(flush.status, 403, "{flush:?}");
    assert!(flush.json()["error"].as_str().unwrap().contains("token"));
    // The control socket, the relay user's own, takes the same request.
    let sock = relay.spool().join("control.sock");
    let over_socket = curl(&[
        "--unix-socket",
        sock.to_str().unwrap(),
        "http://postern/api/v1/queue/flush",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        "{}",
    ]);
    assert_eq!(over_socket.status, 200, "{over_socket:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

/// A non-loopback admin address without a token and TLS: `postern check`
/// and `postern serve` refuse it and name the key.
#[test]
fn a_public_admin_address_needs_token_and_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = crate::support::tls::make_cert(dir.path());
    let port = crate::support::relay::free_port();
    let base = format!(
        "[[listener]]\naddress = \"127.0.0.1:{port}\"\n[spool]\npath = \"spool\"\n[admin]\naddress = \"0.0.0.0:{}\"\n",
        crate::support::relay::free_port()
    );
    let run = |sub: &str, extra: &str| {
        let path = dir.path().join("postern.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        Command::new(env!("CARGO_BIN_EXE_postern"))
            .args([sub, "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    for extra in ["", &format!("token = \"{TOKEN}\"\n")] {
        for sub in ["check", "serve"] {
            let out = run(sub, extra);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{sub} {extra:?} started");
            assert!(
                err.contains("admin.address") && err.contains("admin.tls_cert"),
                "{err}"
            );
        }
    }
    let tls = format!(
        "token = \"{TOKEN}\"\ntls_cert = {:?}\ntls_key = {:?}\n",
        cert.cert, cert.key
    );
    let out = run("check", &tls);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
