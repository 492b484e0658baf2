//! HTTP injection: raw and built from fields, through the hooks to the
//! sink; credentials required; a retried Idempotency-Key queues nothing
//! twice, also across a restart.

use std::time::Duration;

use super::with_plugin;
use crate::support::http::{post_with as post, wait_ready};
use crate::support::relay::{config_with, free_port, Relay};
use crate::support::sink::{Behavior, Options, Sink};

const TOKEN: &str = "inject-admin-token-0123456";

#[tokio::test(flavor = "multi_thread")]
async fn injected_messages_pass_the_hooks_and_queue_once_per_key() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let hash = postern::auth::hash_password("s3cret-pass");
    let (dir, plugin) = with_plugin(
        "testkit",
        "grants = [\"kv\"]\n[plugin.config]\ndata = { verdict = \"continue\", add_header = [\"X-Hooked\", \"yes\"] }",
    );
    let (port, admin) = (free_port(), free_port());
    let config = config_with(
        port,
        &format!("[delivery]\nsmarthost = \"smtp://{}\"", sink.addr),
        &format!(
            "[admin]\naddress = \"127.0.0.1:{admin}\"\ntoken = \"{TOKEN}\"\n\
             [[user]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n{plugin}"
        ),
    );
    let relay = Relay::start_in(dir, port, &config);
    let base = format!("http://127.0.0.1:{admin}");
    wait_ready(&format!("{base}/ready"), Some(TOKEN));
    let url = format!("{base}/api/v1/messages");
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let token = ["-H", bearer.as_str()];
    let alice = ["-u", "alice:s3cret-pass"];

    let raw = serde_json::json!({
        "sender": "app@ours.test",
        "recipients": ["r1@ours.test"],
        "raw": "Subject: raw one\n\nhello\n",
    });
    let first = post(&url, &alice, &raw);
    assert_eq!(first.status, 200, "{first:?}");
    let raw_id = first.json()["id"].as_str().unwrap().to_string();
    let built = post(
        &url,
        &token,
        &serde_json::json!({
            "from": "App <app@ours.test>", "to": ["r2@ours.test"], "cc": ["r3@ours.test"],
            "subject": "built", "text": "plain body", "html": "<p>html</p>",
            "attachments": [{"filename": "n.txt", "content_type": "text/plain", "content": "bm90ZQ=="}],
            "headers": {"X-Campaign": "7"},
        }),
    );
    assert_eq!(built.status, 200, "{built:?}");
    assert_eq!(built.json()["recipients"], 2);
    let got = sink.wait_for(2, Duration::from_secs(20)).await;
    let raw_msg = got
        .iter()
        .find(|m| m.rcpts == ["r1@ours.test"])
        .expect("the raw one");
    let text = String::from_utf8_lossy(&raw_msg.data);
    assert!(text.contains("X-Hooked: yes"), "{text}");
    assert!(text.contains("Received: from api ([127.0.0.1])"), "{text}");
    assert!(text.contains(&format!("id {raw_id}")), "{text}");
    assert!(text.contains("Subject: raw one\r\n\r\nhello\r\n"), "{text}");
    let built_msg = got
        .iter()
        .find(|m| m.rcpts.len() == 2)
        .expect("the built one");
    assert_eq!(built_msg.rcpts, ["r2@ours.test", "r3@ours.test"]);
    assert_eq!(built_msg.from, "app@ours.test");
    let parsed = mail_parser::MessageParser::default()
        .parse(&built_msg.data)
        .unwrap();
    assert_eq!(parsed.subject(), Some("built"));
    assert_eq!(parsed.body_text(0).as_deref(), Some("plain body"));
    assert_eq!(
        parsed.attachment(0).map(|a| a.contents()),
        Some(&b"note"[..])
    );
    assert_eq!(parsed.header_raw("X-Campaign").map(str::trim), Some("7"));
    assert_eq!(parsed.header_raw("X-Hooked").map(str::trim), Some("yes"));

    // Credentials are always needed.
    let none = post(&url, &[], &raw);
    assert_eq!(none.status, 401);
    assert!(
        none.header("www-authenticate").unwrap().contains("Basic"),
        "{none:?}"
    );
    assert_eq!(post(&url, &["-u", "alice:wrong"], &raw).status, 401);
    // Bad input names the field and queues nothing.
    let bad = post(
        &url,
        &token,
        &serde_json::json!({"sender": "app@ours.test", "recipients": ["nobody"], "raw": "x"}),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["field"], "recipients[0]", "{bad:?}");
    let typo = post(
        &url,
        &token,
        &serde_json::json!({"sender": "app@ours.test", "recipients": ["a@ours.test"], "raww": "x"}),
    );
    assert_eq!(typo.json()["field"], "raww", "{typo:?}");

    // The same key twice: one message, one id.
    let keyed = ["-H", bearer.as_str(), "-H", "Idempotency-Key: order-42"];
    let once = post(&url, &keyed, &raw);
    let id = once.json()["id"].as_str().unwrap().to_string();
    assert_eq!(once.json()["replayed"], false);
    let again = post(&url, &keyed, &raw);
    assert_eq!(again.json()["id"], id.as_str(), "{again:?}");
    assert_eq!(again.json()["replayed"], true);
    sink.wait_for(3, Duration::from_secs(20)).await;

    // And after a restart.
    let mut relay = relay;
    relay.signal(15);
    relay.wait_exit(Duration::from_secs(20));
    let relay = Relay::start_in(relay.dir.clone(), relay.port, &config);
    wait_ready(&format!("{base}/ready"), Some(TOKEN));
    let after = post(&url, &keyed, &raw);
    assert_eq!(after.json()["id"], id.as_str(), "{after:?}");
    assert_eq!(after.json()["replayed"], true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.messages().len(), 3, "nothing queued twice");
    let page = crate::support::http::get(&format!("{base}/metrics"), Some(TOKEN)).body;
    assert_eq!(
        super::sample(&page, "postern_injections_total{result=\"ok\"}"),
        Some(1.0)
    );
    drop(relay);
}
