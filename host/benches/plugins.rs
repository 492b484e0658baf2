//! Plugin call costs, through the chain's hooks as a session calls them:
//! - one rcpt call on a warm pooled instance, and with `instances = "fresh"`
//!   (a new instance and `init` per transaction);
//! - one whole message (connect, helo, mail-from, rcpt, data, route) through a
//!   chain of five plugins that each handle every hook, and through none.
//!
//! Prints microseconds per call or per message; builds the plugins first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use postern::authn::Results;
use postern::config::Config;
use postern::envelope::{Address, Envelope, MailParams, Recipient, SessionInfo};
use postern::metadata::SharedMetadata;
use postern::plugins::{Lease, Runtime, Scopes};
use postern::policy::{DataTransaction, Queued, RouteQuery};
use postern::queue::QueueId;

/// Builds the benchmarked plugins; returns the folder with their `.wasm`.
fn wasm_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .args(["-p", "blocklist", "-p", "testkit"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("running cargo");
    assert!(status.success(), "building the plugins");
    target.join("wasm32-wasip2/release")
}

const MESSAGE: &[u8] =
    b"Received: from client.test by relay.test; Mon, 23 Nov 2026 10:00:00 +0000\r\n\
From: <a@b.test>\r\nTo: <user@example.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\
Message-Id: <1@b.test>\r\nSubject: bench\r\n\r\n";

#[derive(Clone)]
struct Fixture {
    session: SessionInfo,
    envelope: Envelope,
    rcpt: Recipient,
    message: Vec<u8>,
}

/// One message's hooks, as a session and delivery call them (with the
/// metadata scopes a session makes).
async fn one_message(hooks: &mut Lease, f: &Fixture) {
    let limit = 64 * 1024;
    let mut scopes = Scopes {
        session: Some(SharedMetadata::new(limit)),
        transaction: None,
    };
    assert!(hooks.connect(&f.session, &scopes).await.lets_through());
    assert!(hooks.helo(&f.session, &scopes).await.lets_through());
    scopes.transaction = Some(SharedMetadata::new(limit));
    assert!(hooks
        .mail_from(&f.session, &f.envelope, &Results::default(), &scopes)
        .await
        .lets_through());
    assert!(hooks
        .rcpt(
            &f.session,
            &f.envelope,
            &f.rcpt,
            &Results::default(),
            &scopes
        )
        .await
        .lets_through());
    let mut envelope = f.envelope.clone();
    envelope.recipients.push(f.rcpt.clone());
    let mut tx = DataTransaction::new(envelope, f.message.clone());
    let id = QueueId::generate();
    assert!(hooks
        .data(&f.session, &mut tx, &scopes, &id)
        .await
        .lets_through());
    hooks.end();
    let metadata = Arc::new(scopes.transaction.map(|m| m.snapshot()).unwrap_or_default());
    // The header section, blank line included, as delivery hands it over.
    let end = MESSAGE.len();
    assert!(tx.message[..end].ends_with(b"\r\n\r\n"));
    let headers = &tx.message[..end];
    hooks
        .route(RouteQuery {
            queued: Queued {
                id: &id,
                envelope: &tx.envelope,
                client: Some(&f.session),
                metadata: &metadata,
            },
            recipient: &f.rcpt,
            headers,
        })
        .await;
    hooks.end();
}

fn main() -> anyhow::Result<()> {
    let wasm = wasm_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let f = Arc::new(Fixture {
        session: SessionInfo {
            peer: "192.0.2.1:40000".parse()?,
            local: "192.0.2.10:25".parse()?,
            helo: Some("client.test".into()),
            tls: None,
            auth_user: None,
            may_relay: false,
        },
        envelope: Envelope::new(Address("a@b.test".into()), MailParams::default()),
        rcpt: Recipient::new("user@example.test"),
        message: [MESSAGE, &[b'x'; 4000][..], b"\r\n"].concat(),
    });
    let config = |chain: &str| {
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[spool]\npath = {:?}\n[plugins]\ndir = {:?}\nwatch = false\n{chain}",
            dir.path().join("spool"),
            wasm
        );
        Config::parse(&text, &dir.path().join("postern.toml"))
    };

    for (label, instances, iterations) in
        [("warm", "per-call", 20_000u32), ("fresh", "fresh", 2_000)]
    {
        let config = config(&format!(
            "[[plugin]]\nname = \"blocklist\"\npath = \"blocklist.wasm\"\ninstances = \"{instances}\"\n\
             [plugin.config]\ndomains = [\"blocked.test\"]\n"
        ))?;
        rt.block_on(async {
            let runtime = Runtime::new(&config)?;
            let chain = Arc::new(runtime.load_chain(&config).await?);
            let mut hooks = chain.lease();
            let scopes = Scopes::default();
            // One transaction per call: the lease ends after each, so a warm
            // instance goes back to the pool and a fresh one is dropped.
            for _ in 0..iterations / 10 {
                hooks
                    .rcpt(
                        &f.session,
                        &f.envelope,
                        &f.rcpt,
                        &Results::default(),
                        &scopes,
                    )
                    .await;
                hooks.end();
            }
            let started = Instant::now();
            for _ in 0..iterations {
                let v = hooks
                    .rcpt(
                        &f.session,
                        &f.envelope,
                        &f.rcpt,
                        &Results::default(),
                        &scopes,
                    )
                    .await;
                assert!(v.lets_through());
                hooks.end();
            }
            let per = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
            println!("rcpt hook, {label:>5} instance: {per:8.2} us/call ({iterations} calls)");
            anyhow::Ok(())
        })?;
    }

    for plugins in [0, 5] {
        let chain: String = (0..plugins)
            .map(|i| {
                format!("[[plugin]]\nname = \"p{i}\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n")
            })
            .collect();
        let config = config(&chain)?;
        let iterations = 20_000u32;
        rt.block_on(async {
            let runtime = Runtime::new(&config)?;
            let chain = Arc::new(runtime.load_chain(&config).await?);
            let mut hooks = chain.lease();
            for _ in 0..iterations / 10 {
                one_message(&mut hooks, &f).await;
            }
            let started = Instant::now();
            for _ in 0..iterations {
                one_message(&mut hooks, &f).await;
            }
            let per = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
            println!(
                "one message, chain of {plugins}: {per:8.2} us/message ({iterations} messages)"
            );
            // Twenty sessions at once, each holding its own instances.
            let started = Instant::now();
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    let chain = chain.clone();
                    let f = f.clone();
                    tokio::spawn(async move {
                        let mut hooks = chain.lease();
                        for _ in 0..iterations / 20 {
                            one_message(&mut hooks, &f).await;
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await?;
            }
            let per = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
            println!("one message, chain of {plugins}, 20 sessions: {per:8.2} us/message");
            anyhow::Ok(())
        })?;
    }
    Ok(())
}
