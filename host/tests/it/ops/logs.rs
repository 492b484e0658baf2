//! Logs: one record per transaction and per delivery attempt, as JSON lines
//! on request, never with colour codes in a file.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::relay::{config_with, free_port, Relay};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::Raw;

/// Every line of the log is a JSON object; the records with this message.
fn records(log: &str, message: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}"))
        })
        .filter(|v| v["message"] == message)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_records_for_each_transaction_and_attempt() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let (dir, plugin) =
        super::with_plugin("blocklist", "[plugin.config]\ndomains = [\"blocked.test\"]");
    let port = free_port();
    let config = config_with(
        port,
        &format!("[delivery]\nsmarthost = \"smtp://{}\"", sink.addr),
        &format!("[log]\nformat = \"json\"\n{plugin}"),
    );
    let relay = Relay::start_in(dir, port, &config);
    let addr = relay.addr();
    let reply = tokio::task::spawn_blocking(move || {
        // A name with a quote and a backslash: the JSON must escape them.
        let rcpts = [("b@ours.test", "250"), ("c@blocked.test", "550")];
        let body = "Subject: logged\r\n\r\nhi\r\n";
        super::transaction(Raw::connect(addr), "we\"ird\\name", &rcpts, body)
    })
    .await
    .unwrap();
    let id = crate::support::smtp::queue_id(&reply);
    sink.wait_for(1, Duration::from_secs(20)).await;
    let attempt = crate::support::eventually(Duration::from_secs(10), || {
        records(&relay.log(), "delivery attempt").into_iter().next()
    })
    .await
    .expect("a delivery attempt record");
    let log = relay.log();
    let tx = records(&log, "transaction");
    assert_eq!(tx.len(), 1, "{log}");
    let tx = &tx[0];
    for (field, want) in [
        ("queue_id", id.as_str()),
        ("helo", "we\"ird\\name"),
        ("tls", "none"),
        ("auth", ""),
        ("sender", "a@ours.test"),
        ("recipients", "b@ours.test"),
        (
            "verdicts",
            "blocklist:mail_from=continue blocklist:rcpt=continue blocklist:rcpt=reject",
        ),
        ("outcome", "queued"),
    ] {
        assert_eq!(tx[field], want, "{field} in {tx}");
    }
    assert!(
        tx["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{tx}"
    );
    assert!(tx["size"].as_u64().unwrap() > 20, "{tx}");
    assert_eq!(tx["reply"], format!("250 2.0.0 Ok: queued as {id}"));
    assert_eq!(attempt["queue_id"], id.as_str());
    assert_eq!(attempt["recipient"], "b@ours.test");
    assert_eq!(attempt["outcome"], "delivered");
    assert!(
        attempt["reply"].as_str().unwrap().starts_with("250"),
        "{attempt}"
    );
    assert!(!log.contains('\x1b'), "no escape codes in a log file");
}

/// Text by default, with no colour when stderr is not a terminal;
/// `--log-format json` asks for JSON whatever the config says.
#[test]
fn text_without_colour_and_json_from_the_command_line() {
    let relay = Relay::start("");
    let addr = relay.addr();
    let reply = crate::support::smtp::send_message(
        addr,
        "a@ours.test",
        &["b@ours.test"],
        "Subject: t\r\n\r\nhi\r\n",
    );
    let id = crate::support::smtp::queue_id(&reply);
    // The record reaches the log through a pipe: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (log, line) = loop {
        let log = relay.log();
        if let Some(l) = log.lines().find(|l| l.contains(": transaction ")) {
            let l = l.to_string();
            break (log, l);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no transaction record: {log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains(&format!("queue_id={id}")), "{line}");
    assert!(line.contains("sender=\"a@ours.test\""), "{line}");
    assert!(!log.contains('\x1b'), "{log:?}");

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("postern.toml"),
        crate::support::relay::base_config(port, ""),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["serve", "--log-format", "json", "--config", "postern.toml"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(v["level"], "INFO", "{v}");
}
