//! The configs in `examples/` run as they are written: each is read, its
//! ports, spool, next hops and key files are rewritten in a copy (nothing
//! else), the relay binary starts with it and a message goes through, sent
//! by a client nobody here wrote where it matters (swaks).

#[allow(dead_code, clippy::duplicate_mod)]
#[path = "support/plugins.rs"]
mod kit;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use toml::{Table, Value};

use crate::support::dns::DnsServer;
use crate::support::haproxy::connect_from;
use crate::support::relay::{free_port, Relay};
use crate::support::sink::{tls_acceptor, Behavior, Captured, Options, Sink};
use crate::support::smtp::send_message;

/// `examples/<path>`, parsed.
pub fn example(path: &str) -> Table {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(path);
    let text = std::fs::read_to_string(&file).unwrap();
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// The table at `path` (made when absent).
pub fn table<'a>(t: &'a mut Table, path: &[&str]) -> &'a mut Table {
    path.iter().fold(t, |t, key| {
        t.entry(key.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("{key} is not a table"))
    })
}

/// The first `[[listener]]`.
pub fn listener(t: &mut Table) -> &mut Table {
    t["listener"].as_array_mut().unwrap()[0]
        .as_table_mut()
        .unwrap()
}

/// The config of a relay run from `dir`: the first listener on `port`, the
/// spool and admin listener its own, and `plugins` (which the example must
/// name) copied from the workspace build into `dir/plugins`.
pub fn localize(t: &mut Table, dir: &Path, port: u16, plugins: &[&str]) {
    listener(t).insert("address".into(), format!("127.0.0.1:{port}").into());
    table(t, &["spool"]).insert("path".into(), "spool".into());
    if t.contains_key("admin") {
        table(t, &["admin"]).insert(
            "address".into(),
            format!("127.0.0.1:{}", free_port()).into(),
        );
    }
    let folder = dir.join("plugins");
    std::fs::create_dir_all(&folder).unwrap();
    for name in plugins {
        let file = format!("{name}.wasm");
        std::fs::copy(kit::wasm_dir().join(&file), folder.join(&file)).unwrap();
    }
    let p = table(t, &["plugins"]);
    p.insert("dir".into(), "plugins".into());
    let cache = kit::target_dir().join("postern-test-plugin-cache");
    p.insert("cache_dir".into(), cache.display().to_string().into());
    p.insert("watch".into(), false.into());
    if p.contains_key("archive_dir") {
        p.insert("archive_dir".into(), "archive".into());
    }
}

/// Listener certificate and key for 127.0.0.1, signed by a CA in `dir`
/// (the files [`tls_acceptor`] writes); returns the CA file.
fn listener_tls(t: &mut Table, dir: &Path) -> PathBuf {
    let (_, ca) = tls_acceptor(dir, &["127.0.0.1"]);
    let l = listener(t);
    l.insert(
        "tls_cert".into(),
        dir.join("sink-cert.pem").display().to_string().into(),
    );
    l.insert(
        "tls_key".into(),
        dir.join("sink-key.pem").display().to_string().into(),
    );
    ca
}

fn start(dir: Arc<tempfile::TempDir>, port: u16, t: &Table) -> Relay {
    Relay::start_in(dir, port, &toml::to_string(t).unwrap())
}

fn swaks(port: u16, args: &[&str]) -> String {
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}"), "--timeout", "20"])
        .args(args)
        .output()
        .expect("swaks (Debian package swaks) is installed");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The first message at any of `sinks` within 20 s.
async fn first_at(sinks: &[&Sink]) -> Captured {
    crate::support::eventually(Duration::from_secs(20), || {
        sinks.iter().find_map(|s| s.messages().into_iter().next())
    })
    .await
    .expect("no message reached a next hop")
}

/// outbound.toml: submission with STARTTLS and AUTH (the example's own user
/// and password), then through the pool to an upstream that wants AUTH over
/// verified TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_example_takes_authenticated_mail_to_its_pool() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut t = example("outbound.toml");
    listener_tls(&mut t, dir.path());
    // Two upstreams, each with a CA of its own; the relay trusts both.
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let mk = |d: &Path| {
        let mut o = Options::new(Behavior::Accept);
        let (acceptor, ca) = tls_acceptor(d, &["127.0.0.1"]);
        o.tls = Some(acceptor);
        o.auth = Some(("relay-user".into(), "relay-secret".into()));
        (o, ca)
    };
    let (oa, ca_a) = mk(&a_dir);
    let (ob, ca_b) = mk(&b_dir);
    let bundle = dir.path().join("upstream-ca.pem");
    std::fs::write(
        &bundle,
        [std::fs::read(&ca_a).unwrap(), std::fs::read(&ca_b).unwrap()].concat(),
    )
    .unwrap();
    let (up_a, up_b) = (
        Sink::start("127.0.0.1", oa).await,
        Sink::start("127.0.0.1", ob).await,
    );
    let port = free_port();
    localize(&mut t, dir.path(), port, &["ratelimit"]);
    let d = table(&mut t, &["delivery"]);
    d.insert("tls_ca".into(), bundle.display().to_string().into());
    let hosts: Vec<Value> = [up_a.addr, up_b.addr]
        .iter()
        .map(|a| format!("smtp://relay-user:relay-secret@{a}").into())
        .collect();
    table(&mut t, &["delivery", "pools", "upstream"]).insert("hosts".into(), hosts.into());
    let _relay = start(dir.clone(), port, &t);

    let out = tokio::task::spawn_blocking(move || {
        swaks(
            port,
            &[
                "--tls",
                "--auth",
                "LOGIN",
                "--auth-user",
                "alice",
                "--auth-password",
                "example password",
                "--from",
                "alice@example.test",
                "--to",
                "someone@example.org",
            ],
        )
    })
    .await
    .unwrap();
    assert!(out.contains("235 "), "AUTH failed:\n{out}");
    assert!(out.contains("<~  250 2.0.0 Ok: queued"), "{out}");
    let got = first_at(&[&up_a, &up_b]).await;
    assert_eq!(got.rcpts, ["someone@example.org"]);
    assert!(got.tls, "the upstream got the mail in clear text");
    assert_eq!(got.auth.as_deref(), Some("relay-user"));

    // Without AUTH nothing is relayed: the listener is for submission.
    let out = tokio::task::spawn_blocking(move || {
        swaks(
            port,
            &[
                "--tls",
                "--from",
                "x@example.test",
                "--to",
                "y@example.org",
                "--quit-after",
                "RCPT",
            ],
        )
    })
    .await
    .unwrap();
    assert!(
        out.contains("<~* 530 5.7.0"),
        "MAIL without AUTH was not refused:\n{out}"
    );
}

/// application.toml: mail from the application servers is DKIM-signed with
/// the example's key (made here with `postern dkim keygen`), archived, and
/// delivered (to a sink standing in for the MX hosts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_example_signs_archives_and_delivers() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let mut t = example("application.toml");
    let port = free_port();
    localize(&mut t, dir.path(), port, &["ratelimit", "archive"]);
    let key = dir.path().join("dkim.pem");
    let keygen = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args([
            "dkim",
            "keygen",
            "--domain",
            "example.test",
            "--selector",
            "app",
            "--out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    t["dkim"]["key"].as_array_mut().unwrap()[0]
        .as_table_mut()
        .unwrap()
        .insert("key".into(), key.display().to_string().into());
    table(&mut t, &["delivery"]).insert("smarthost".into(), format!("smtp://{}", sink.addr).into());
    let relay = start(dir.clone(), port, &t);

    let reply = send_message(
        relay.addr(),
        "noreply@example.test",
        &["customer@example.org"],
        "From: Shop <noreply@billing.example.test>\r\nTo: customer@example.org\r\n\
         Subject: Your order\r\nMessage-ID: <order-1@example.test>\r\n\r\nThank you.\r\n",
    );
    assert!(reply.starts_with("250"), "{reply}");
    let got = sink.wait_for(1, Duration::from_secs(20)).await;
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(
        text.contains("DKIM-Signature:")
            && text.contains("d=example.test")
            && text.contains("s=app"),
        "not signed as example.test (subdomains = true):\n{text}"
    );
    let archived = crate::support::eventually(Duration::from_secs(10), || {
        let files: Vec<_> = walk(&dir.path().join("archive"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        (!files.is_empty()).then_some(files)
    })
    .await
    .expect("no archived copy");
    let copy = std::fs::read_to_string(&archived[0]).unwrap();
    assert!(copy.contains("Subject: Your order"), "{copy}");
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

/// gateway.toml: a client on the example's DNS blocklist is refused naming
/// the list; mail for an alias reaches the internal server for each of its
/// targets, with the gateway's Authentication-Results:.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_example_refuses_listed_clients_and_expands_aliases() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let dns = DnsServer::start().await;
    dns.a("2.0.0.127.zen.spamhaus.org", &["127.0.0.2"]);
    let internal = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let mut t = example("gateway.toml");
    listener_tls(&mut t, dir.path());
    let port = free_port();
    localize(&mut t, dir.path(), port, &["access", "forward"]);
    let d = table(&mut t, &["delivery"]);
    d.insert(
        "nameservers".into(),
        vec![Value::from(dns.addr.to_string())].into(),
    );
    let routes = table(&mut t, &["delivery", "routes"]);
    for domain in ["example.test", "example.org"] {
        routes.insert(domain.into(), format!("smtp://{}", internal.addr).into());
    }
    let relay = start(dir.clone(), port, &t);
    let addr: SocketAddr = relay.addr();

    let banner = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let stream = connect_from("127.0.0.2", addr);
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert!(
        banner.starts_with("554") && banner.contains("zen.spamhaus.org"),
        "a listed client was not refused naming the list: {banner}"
    );

    let reply = send_message(
        addr,
        "someone@sender.example",
        &["info@example.test"],
        "From: someone@sender.example\r\nSubject: hello\r\n\r\nHi.\r\n",
    );
    assert!(reply.starts_with("250"), "{reply}");
    let got = internal.wait_for(1, Duration::from_secs(20)).await;
    let mut rcpts = got[0].rcpts.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["ann@example.test", "bob@example.test"]);
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(
        text.contains("Authentication-Results: mx.example.test"),
        "{text}"
    );

    // Nobody relays through a gateway.
    let reply = send_message(
        addr,
        "a@sender.example",
        &["b@elsewhere.example"],
        "Subject: x\r\n\r\nx\r\n",
    );
    assert!(
        reply.starts_with("55"),
        "relayed to an outside domain: {reply}"
    );
}
