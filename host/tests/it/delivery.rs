//! Delivery: smart host and MX routing, retries, bounces, expiry, the queue
//! commands and a crash during delivery.

use std::time::Duration;

use mail_parser::MimeHeaders;

use crate::support::dns::{Answer, DnsServer};
use crate::support::eventually;
use crate::support::relay::{self, Binary, Relay};
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
