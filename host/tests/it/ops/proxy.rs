//! PROXY protocol behind Debian's haproxy: the client the relay sees (in
//! `Received:` at the sink and in a plugin's session) is the original one,
//! with `send-proxy-v2` and with `send-proxy`; a header from anyone not
//! trusted is refused; a v2 `LOCAL` health check gets a session.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::sample;
use crate::support::haproxy::{connect_from, Haproxy};
use crate::support::http::get;
use crate::support::relay::{free_port, Relay};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::Raw;

/// The relay config: one `proxy_protocol` listener trusting `trusted`,
/// delivery to `sink`, the testkit plugin showing its session in a header.
fn config(port: u16, admin: u16, trusted: &str, sink: SocketAddr, plugins: &str) -> String {
    format!(
        r#"hostname = "mx.ours.test"
[[listener]]
address = "127.0.0.1:{port}"
proxy_protocol = true
trusted_proxies = ["{trusted}"]
proxy_timeout = "2s"
[spool]
path = "spool"
[relay]
networks = ["127.0.0.0/8"]
domains = ["local.test"]
[delivery]
smarthost = "smtp://{sink}"
[admin]
address = "127.0.0.1:{admin}"
{plugins}"#
    )
}

fn start_relay(trusted: &str, sink: SocketAddr) -> (Relay, String) {
    let entry = "grants = [\"kv\"]\n[plugin.config]\nshow_context = true";
    let (dir, plugins) = super::with_plugin("testkit", entry);
    let (port, admin) = (free_port(), free_port());
    // The relay is ready when its admin listener says so: connecting to a
    // PROXY listener without a header would only be refused.
    let text = config(port, admin, trusted, sink, &plugins);
    std::fs::write(dir.path().join("postern.toml"), &text).unwrap();
    let relay = Relay::start_no_wait(dir, port, &text);
    let base = format!("http://127.0.0.1:{admin}");
    crate::support::http::wait_ready(&format!("{base}/ready"), None);
    (relay, base)
}

/// One message from `from` through the front at `front`; the final reply.
fn send_through(from: &str, front: SocketAddr) -> String {
    let c = Raw::connect_stream(connect_from(from, front));
    let body = "Subject: via a proxy\r\n\r\nhi\r\n";
    super::transaction(c, "client.test", &[("r@local.test", "250")], body)
}

#[tokio::test(flavor = "multi_thread")]
async fn haproxy_passes_the_real_client_with_v2_and_v1() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let (relay, _base) = start_relay("127.0.0.1/32", sink.addr);
    let (v2, v1) = (free_port(), free_port());
    let _haproxy = Haproxy::start(relay.addr(), &[(v2, "send-proxy-v2"), (v1, "send-proxy")]);
    let replies = tokio::task::spawn_blocking(move || {
        [
            send_through("127.0.0.5", SocketAddr::from(([127, 0, 0, 1], v2))),
            send_through("127.0.0.6", SocketAddr::from(([127, 0, 0, 1], v1))),
        ]
    })
    .await
    .unwrap();
    for r in &replies {
        assert!(r.starts_with("250 "), "{r}");
    }
    let got = sink.wait_for(2, Duration::from_secs(20)).await;
    for client in ["127.0.0.5", "127.0.0.6"] {
        let message = got
            .iter()
            .map(|m| String::from_utf8_lossy(&m.data).into_owned())
            .find(|d| d.contains(&format!("peer={client};")))
            .unwrap_or_else(|| panic!("no message whose plugin saw {client}: {got:?}"));
        assert!(
            message.contains(&format!("Received: from client.test ([{client}])")),
            "{message}"
        );
    }
    assert!(relay.log().contains("peer=127.0.0.5"), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_proxy_is_refused_and_a_local_check_is_served() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let (relay, base) = start_relay("127.0.0.9/32", sink.addr);
    let front = free_port();
    let _haproxy = Haproxy::start(relay.addr(), &[(front, "send-proxy-v2")]);
    let addr = relay.addr();
    tokio::task::spawn_blocking(move || {
        // Through haproxy, which is not trusted: closed before any banner.
        let mut c = connect_from("127.0.0.5", SocketAddr::from(([127, 0, 0, 1], front)));
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        // A v2 LOCAL health check from the trusted address gets a session.
        let mut check = connect_from("127.0.0.9", addr);
        check
            .write_all(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00")
            .unwrap();
        let mut c = Raw::connect_stream(check);
        assert!(c.cmd("QUIT").starts_with("221"));
        // The trusted address without a header: closed after the timeout.
        let mut silent = connect_from("127.0.0.9", addr);
        let started = Instant::now();
        let mut got = Vec::new();
        let _ = silent.read_to_end(&mut got);
        assert!(got.is_empty() && started.elapsed() >= Duration::from_millis(1500));
    })
    .await
    .unwrap();
    let page = get(&format!("{base}/metrics"), None).body;
    let listener = format!("127.0.0.1:{}", relay.port);
    let refused = format!(
        "postern_smtp_connections_total{{listener=\"{listener}\",outcome=\"refused_proxy\"}}"
    );
    assert_eq!(sample(&page, &refused), Some(2.0), "{page}");
    assert!(sink.messages().is_empty());
}
