//! examples/cluster: two relay binaries behind Debian's haproxy (round
//! robin, PROXY protocol v2) sharing one redis-server. A client's rate limit
//! holds for both relays together while another client is not limited, and
//! an alias works whichever relay takes the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use toml::Value;

use crate::examples::{example, localize, table};
use crate::support::haproxy::{connect_from, Haproxy};
use crate::support::redis::RedisServer;
use crate::support::relay::{free_port, Relay};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::Raw;

/// One of the example relays, on ports of its own, with the test's Redis
/// and the sink as the internal mail server.
fn start_relay(name: &str, redis: &RedisServer, internal: SocketAddr) -> Relay {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut t = example(&format!("cluster/{name}.toml"));
    let port = free_port();
    localize(&mut t, dir.path(), port, &["ratelimit", "forward"]);
    let admin = t["admin"]["address"].as_str().unwrap().to_string();
    table(&mut t, &["kv"]).insert("redis_url".into(), redis.url().into());
    table(&mut t, &["delivery", "routes"]).insert(
        "example.test".into(),
        Value::from(format!("smtp://{internal}")),
    );
    let relay = Relay::start_no_wait(dir, port, &toml::to_string(&t).unwrap());
    // A PROXY listener refuses a connection without a header: ask the admin
    // listener instead.
    crate::support::http::wait_ready(&format!("http://{admin}/ready"), None);
    relay
}

/// The limit the example sets: messages per minute for one client.
fn example_limit() -> usize {
    let t = example("cluster/relay-a.toml");
    let plugin = t["plugin"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("ratelimit"))
        .unwrap();
    let limit = &plugin["config"]["limits"][0];
    assert_eq!(limit["per"].as_str(), Some("1m"));
    limit["messages"].as_integer().unwrap() as usize
}

/// MAIL FROM in a new session from `from` through haproxy; its reply.
fn mail_from(from: &str, front: SocketAddr) -> String {
    let mut c = Raw::connect_stream(connect_from(from, front));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.cmd("MAIL FROM:<a@sender.example>");
    c.cmd("QUIT");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_behind_haproxy_share_limits_and_aliases() {
    let redis = RedisServer::start();
    let internal = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let a = start_relay("relay-a", &redis, internal.addr);
    let b = start_relay("relay-b", &redis, internal.addr);
    let front = free_port();
    let _haproxy = Haproxy::round_robin(front, &[a.addr(), b.addr()]);
    let front = SocketAddr::from(([127, 0, 0, 1], front));
    let limit = example_limit();

    // The windows are fixed minutes: start early in one, so the whole burst
    // falls into it.
    let second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second > 40 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let replies = tokio::task::spawn_blocking(move || {
        let limited: Vec<String> = (0..limit + 2)
            .map(|_| mail_from("127.0.0.2", front))
            .collect();
        let other = mail_from("127.0.0.3", front);
        (limited, other)
    })
    .await
    .unwrap();
    let (limited, other) = replies;
    let accepted = limited.iter().filter(|r| r.starts_with("250")).count();
    assert_eq!(accepted, limit, "{limited:#?}");
    for r in &limited[limit..] {
        assert!(r.starts_with("451 4.7.1 rate limit"), "{r}");
    }
    assert!(
        other.starts_with("250"),
        "another client was limited: {other}"
    );
    // haproxy alternates, so each relay took half the sessions: had each
    // counted alone, both would have accepted them all. (That both relays
    // are behind haproxy is shown by the alias below.)

    // The alias, through either relay.
    tokio::task::spawn_blocking(move || {
        for _ in 0..2 {
            let mut c = Raw::connect_stream(connect_from("127.0.0.4", front));
            assert!(c.cmd("EHLO client.test").starts_with("250"));
            assert!(c.cmd("MAIL FROM:<a@sender.example>").starts_with("250"));
            assert!(c.cmd("RCPT TO:<sales@example.test>").starts_with("250"));
            assert!(c.cmd("DATA").starts_with("354"));
            let r = c.cmd("Subject: to sales\r\n\r\nHello.\r\n.");
            assert!(r.starts_with("250"), "{r}");
            c.cmd("QUIT");
        }
    })
    .await
    .unwrap();
    let got = internal.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 2);
    for m in &got {
        let mut rcpts = m.rcpts.clone();
        rcpts.sort();
        assert_eq!(rcpts, ["ann@example.test", "bob@example.test"]);
    }
    let hosts: Vec<bool> = ["relay-a.example.test", "relay-b.example.test"]
        .iter()
        .map(|h| {
            got.iter()
                .any(|m| String::from_utf8_lossy(&m.data).contains(&format!("by {h}")))
        })
        .collect();
    assert_eq!(
        hosts,
        [true, true],
        "the alias did not go through both relays"
    );
}
