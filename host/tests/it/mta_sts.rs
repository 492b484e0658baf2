//! MTA-STS for MX delivery: the suite's DNS serves `_mta-sts` records, MX
//! and addresses; an HTTPS server on 127.0.0.2 with a certificate from a
//! test CA serves the policies; the mail hosts are a TLS sink whose
//! certificate that CA issued for `mx.good.test`. Enforce delivers only to
//! listed hosts with a valid certificate, testing delivers and says what
//! enforce would refuse, and a failed refresh keeps the cached policy. Each
//! attempt's log record carries the outcome: the mode, and the host
//! matched or why the policy refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::support::dns::DnsServer;
use crate::support::relay::{config_with, free_port, Relay};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::send_message;
use crate::support::tls::TestCa;
use crate::support::{eventually, plain};

/// An HTTPS server answering each Host with a status and a body.
struct PolicyServer {
    addr: SocketAddr,
    answers: Arc<Mutex<HashMap<String, (u16, String)>>>,
}

impl PolicyServer {
    async fn start(ip: &str, acceptor: TlsAcceptor) -> PolicyServer {
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answers: Arc<Mutex<HashMap<String, (u16, String)>>> = Arc::default();
        let table = answers.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (acceptor, table) = (acceptor.clone(), table.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(conn).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let request = String::from_utf8_lossy(&request).to_string();
                    let host = request
                        .lines()
                        .find_map(|l| l.strip_prefix("host: ").or(l.strip_prefix("Host: ")))
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    let right_path = request.starts_with("GET /.well-known/mta-sts.txt ");
                    let (status, body) = match table.lock().unwrap().get(&host) {
                        Some(a) if right_path => a.clone(),
                        _ => (404, String::new()),
                    };
                    let location = if status == 301 {
                        "Location: https://elsewhere.test/\r\n"
                    } else {
                        ""
                    };
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n{location}\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        PolicyServer { addr, answers }
    }

    fn answer(&self, host: &str, status: u16, body: &str) {
        self.answers
            .lock()
            .unwrap()
            .insert(host.to_string(), (status, body.to_string()));
    }
}

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

/// The relay's record of the first delivery attempt for `rcpt`, within 20 s.
async fn attempt(relay: &Relay, rcpt: &str) -> String {
    let needle = format!("recipient=\"{rcpt}\"");
    let line = eventually(Duration::from_secs(20), || {
        plain(&relay.log())
            .lines()
            .find(|l| l.contains("delivery attempt") && l.contains(&needle))
            .map(str::to_string)
    })
    .await;
    line.unwrap_or_else(|| panic!("no delivery attempt for {rcpt}:\n{}", relay.log()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_testing_and_a_failed_refresh() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ca = TestCa::new(dir.path());
    let mx_cert = ca.issue(dir.path(), "mx", &["mx.good.test"]);
    let sink_tls = postern::smtp::tls::acceptor(&mx_cert.cert, &mx_cert.key).unwrap();
    let sink = Sink::start(
        "127.0.0.1",
        Options {
            tls: Some(sink_tls),
            ..Options::new(Behavior::Accept)
        },
    )
    .await;
    let domains = ["enforced", "wrongmx", "badcert", "testing", "redirect"];
    let names: Vec<String> = domains
        .iter()
        .map(|d| format!("mta-sts.{d}.test"))
        .collect();
    let web_cert = ca.issue(
        dir.path(),
        "web",
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let web = PolicyServer::start(
        "127.0.0.2",
        postern::smtp::tls::acceptor(&web_cert.cert, &web_cert.key).unwrap(),
    )
    .await;

    let dns = DnsServer::start().await;
    for (domain, mx) in [
        ("enforced", "mx.good.test"),
        ("wrongmx", "mx.other.test"),
        ("badcert", "mx.badcert.test"),
        ("testing", "mx.other.test"),
        ("redirect", "mx.good.test"),
    ] {
        let domain = format!("{domain}.test");
        dns.mx(&domain, &[(10, mx)])
            .txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=v1")
            .ttl(&format!("_mta-sts.{domain}"), 0)
            .a(&format!("mta-sts.{domain}"), &["127.0.0.2"]);
    }
    for host in ["mx.good.test", "mx.other.test", "mx.badcert.test"] {
        dns.a(host, &["127.0.0.1"]);
    }
    web.answer(
        "mta-sts.enforced.test",
        200,
        &policy("enforce", "mx.good.test"),
    );
    web.answer(
        "mta-sts.wrongmx.test",
        200,
        &policy("enforce", "*.good.test"),
    );
    web.answer(
        "mta-sts.badcert.test",
        200,
        &policy("enforce", "mx.badcert.test"),
    );
    web.answer(
        "mta-sts.testing.test",
        200,
        &policy("testing", "mx.good.test"),
    );
    web.answer("mta-sts.redirect.test", 301, "");

    let port = free_port();
    let delivery = format!(
        "[delivery]\nnameservers = [\"{}\"]\nmx_port = {}\nmta_sts_port = {}\n\
         tls_ca = \"{}\"\nretry = [\"1h\"]\n",
        dns.addr,
        sink.addr.port(),
        web.addr.port(),
        ca.path.display()
    );
    let relay = Relay::start_in(dir.clone(), port, &config_with(port, &delivery, ""));
    let send = |rcpt: &str| {
        let reply = send_message(
            relay.addr(),
            "a@ours.test",
            &[rcpt],
            "Subject: x\r\n\r\nhi\r\n",
        );
        assert!(reply.starts_with("250"), "{rcpt}: {reply}");
    };

    // Listed host, valid certificate: delivered over TLS.
    send("a@enforced.test");
    let line = attempt(&relay, "a@enforced.test").await;
    assert!(line.contains("outcome=\"delivered\""), "{line}");
    assert!(
        line.contains("mta_sts=\"enforce (fetched); matched mx.good.test\""),
        "{line}"
    );
    // The only MX is not in the policy: deferred, nothing sent.
    send("b@wrongmx.test");
    let line = attempt(&relay, "b@wrongmx.test").await;
    assert!(line.contains("deferred"), "{line}");
    assert!(
        line.contains("4.7.5 MTA-STS: no MX host of wrongmx.test"),
        "{line}"
    );
    // The attempt's record says which policy refused it and why.
    assert!(
        line.contains("mta_sts=\"enforce (fetched); refused: no MX host in the policy\""),
        "{line}"
    );
    // Listed, but its certificate is for another name: deferred, never clear.
    send("c@badcert.test");
    let line = attempt(&relay, "c@badcert.test").await;
    assert!(
        line.contains("deferred") && line.contains("4.7.5 TLS"),
        "{line}"
    );
    assert!(
        line.contains("mta_sts=\"enforce (fetched); refused: no valid TLS at mx.badcert.test\""),
        "{line}"
    );
    // Testing: delivered, with what enforce would have refused.
    send("d@testing.test");
    let line = attempt(&relay, "d@testing.test").await;
    assert!(line.contains("delivered"), "{line}");
    assert!(
        line.contains("testing (fetched); not in policy: mx.other.test"),
        "{line}"
    );
    // A redirect is not followed: no policy, delivered as without one.
    send("e@redirect.test");
    let line = attempt(&relay, "e@redirect.test").await;
    assert!(
        line.contains("delivered") && line.contains("mta_sts=\"none\""),
        "{line}"
    );
    assert!(
        relay.log().contains("redirects are not followed"),
        "{}",
        relay.log()
    );

    // A new id, and the policy server failing: the cached policy stays.
    // (After the idle connection of the first delivery has closed.)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    dns.remove("_mta-sts.enforced.test")
        .txt("_mta-sts.enforced.test", "v=STSv1; id=v2");
    web.answer("mta-sts.enforced.test", 500, "");
    send("f@enforced.test");
    let line = attempt(&relay, "f@enforced.test").await;
    assert!(line.contains("delivered"), "{line}");
    assert!(
        line.contains("enforce (cached, refresh failed: HTTP 500"),
        "{line}"
    );

    let got = sink.messages();
    assert_eq!(
        sink.recipients(),
        [
            "a@enforced.test",
            "d@testing.test",
            "e@redirect.test",
            "f@enforced.test"
        ]
    );
    assert!(got.iter().all(|m| m.tls), "a message went in clear text");
}
