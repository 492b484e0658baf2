//! What a Python or JavaScript plugin costs, per language, with the example
//! taggers (`examples/plugins/{python,js}`, built by their own scripts):
//! - the component's size;
//! - the cold compile (an empty cache) and the cached load (a new engine
//!   reading the compiled cache, then instantiate and `init`: what a restart
//!   pays before it serves mail);
//! - the data hook on a fresh instance (instantiate, `init`, one call) and on
//!   a warm one;
//! - then CALLS data calls (default 500,000) through the JavaScript tagger
//!   with the relay's default limits, counting errors and retired instances.
//!
//! `cargo bench -p postern --bench lang [-- CALLS]`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern::config::Config;
use postern::envelope::{Address, Envelope, MailParams, Recipient, SessionInfo};
use postern::metadata::SharedMetadata;
use postern::plugins::{Lease, Runtime, Scopes};
use postern::policy::DataTransaction;
use postern::queue::QueueId;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds an example with its script; returns the `.wasm`.
fn build(script: &str, name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let out = target.join("lang-plugins").join(name);
    let started = Instant::now();
    let status = Command::new(root().join(script))
        .arg(&out)
        .status()
        .expect("running the build script");
    assert!(status.success(), "{script} failed");
    println!(
        "{name}: built (or up to date) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    out
}

struct Fixture {
    session: SessionInfo,
    envelope: Envelope,
    message: Vec<u8>,
}

/// One data call, as a session makes it (with its metadata scopes); true
/// when the plugin let the message through.
async fn data(hooks: &mut Lease, f: &Fixture) -> bool {
    let limit = 64 * 1024;
    let scopes = Scopes {
        session: Some(SharedMetadata::new(limit)),
        transaction: Some(SharedMetadata::new(limit)),
    };
    let mut tx = DataTransaction::new(f.envelope.clone(), f.message.clone());
    let id = QueueId::generate();
    let v = hooks.data(&f.session, &mut tx, &scopes, &id).await;
    hooks.end();
    v.lets_through()
}

fn per_call(elapsed: Duration, calls: u32) -> f64 {
    elapsed.as_secs_f64() * 1e6 / f64::from(calls)
}

fn main() -> anyhow::Result<()> {
    let calls: u32 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(500_000);
    let py = build("examples/plugins/python/build.sh", "tagger-py.wasm");
    let js = build("examples/plugins/js/build.sh", "tagger-js.wasm");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let f = Fixture {
        session: SessionInfo {
            peer: "192.0.2.1:40000".parse()?,
            local: "192.0.2.10:25".parse()?,
            helo: Some("client.test".into()),
            tls: None,
            auth_user: None,
            may_relay: false,
        },
        envelope: {
            let mut e = Envelope::new(Address("a@sender.test".into()), MailParams::default());
            e.recipients.push(Recipient::new("user@example.test"));
            e
        },
        message: [
            &b"From: <a@sender.test>\r\nTo: <user@example.test>\r\nSubject: Our newsletter, May\r\n\r\n"[..],
            &[b'x'; 4000][..],
            b"\r\n",
        ]
        .concat(),
    };

    for (label, file) in [("python", &py), ("js", &js)] {
        let dir = tempfile::tempdir()?;
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        let config = |instances: &str| {
            let text = format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n[spool]\npath = {:?}\n\
                 [plugins]\ndir = {:?}\ncache_dir = {:?}\nwatch = false\n\
                 [[plugin]]\nname = \"tagger\"\npath = {name:?}\ngrants = [\"kv\", \"log\"]\n\
                 instances = \"{instances}\"\n\
                 [plugin.config]\n[[plugin.config.rules]]\nclass = \"newsletter\"\nsubject = [\"newsletter\"]\n",
                dir.path().join("spool"),
                file.parent().unwrap_or(Path::new(".")),
                dir.path().join("cache"),
            );
            Config::parse(&text, &dir.path().join("postern.toml"))
        };
        let bytes = std::fs::read(file)?;
        println!("{label}: {name} is {:.1} MB", bytes.len() as f64 / 1e6);
        let warm = config("per-call")?;
        rt.block_on(async {
            let started = Instant::now();
            Runtime::new(&warm)?
                .requirements(bytes, warm.plugin_cache_dir())
                .await
                .map_err(anyhow::Error::msg)?;
            println!(
                "{label}: cold compile {:.2} s",
                started.elapsed().as_secs_f64()
            );
            // A new engine, as after a restart: the compiled cache only.
            let started = Instant::now();
            let runtime = Runtime::new(&warm)?;
            let chain = Arc::new(runtime.load_chain(&warm).await?);
            println!(
                "{label}: cached load (read, link, instantiate, init) {:.0} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
            let mut hooks = chain.lease();
            for _ in 0..200 {
                assert!(data(&mut hooks, &f).await);
            }
            let n = 20_000;
            let started = Instant::now();
            for _ in 0..n {
                assert!(data(&mut hooks, &f).await);
            }
            println!(
                "{label}: data hook, warm instance {:.1} us/call ({n} calls)",
                per_call(started.elapsed(), n)
            );
            let fresh = config("fresh")?;
            let chain = Arc::new(runtime.load_chain(&fresh).await?);
            let mut hooks = chain.lease();
            let n = 200;
            let started = Instant::now();
            for _ in 0..n {
                assert!(data(&mut hooks, &f).await);
            }
            println!(
                "{label}: data hook, fresh instance (instantiate, init, call) {:.0} us/call ({n} calls)",
                per_call(started.elapsed(), n)
            );
            anyhow::Ok(())
        })?;
    }

    // Many calls through the JavaScript tagger, with the relay's defaults
    // (64 MiB, retired at 75 % of it or after 10,000 uses).
    let dir = tempfile::tempdir()?;
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[spool]\npath = {:?}\n\
         [plugins]\ndir = {:?}\ncache_dir = {:?}\nwatch = false\n\
         [[plugin]]\nname = \"tagger\"\npath = \"tagger-js.wasm\"\ngrants = [\"kv\", \"log\"]\n\
         [plugin.config]\n[[plugin.config.rules]]\nclass = \"newsletter\"\nsubject = [\"newsletter\"]\n",
        dir.path().join("spool"),
        js.parent().unwrap_or(Path::new(".")),
        dir.path().join("cache"),
    );
    let config = Config::parse(&text, &dir.path().join("postern.toml"))?;
    rt.block_on(async {
        let runtime = Runtime::new(&config)?;
        let chain = Arc::new(runtime.load_chain(&config).await?);
        let mut hooks = chain.lease();
        let started = Instant::now();
        let mut refused = 0u32;
        for _ in 0..calls {
            if !data(&mut hooks, &f).await {
                refused += 1;
            }
        }
        let elapsed = started.elapsed();
        let plugin = &chain.plugins()[0];
        let errors: u64 = plugin
            .stats
            .snapshot()
            .iter()
            .flat_map(|h| h.errors.iter().map(|(_, n)| n))
            .sum();
        println!(
            "js: {calls} data calls in {:.1} s ({:.1} us/call): {refused} refused, {errors} plugin errors, instances retired: {:?}",
            elapsed.as_secs_f64(),
            per_call(elapsed, calls),
            plugin.stats.retirements()
        );
        anyhow::ensure!(refused == 0 && errors == 0, "the plugin failed calls");
        anyhow::Ok(())
    })?;
    Ok(())
}
