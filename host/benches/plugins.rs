//! Plugin call costs, through `Chain::rcpt` as a session calls it: on a warm
//! pooled instance, and with `instances = "fresh"` (a new instance and `init`
//! per call). Prints microseconds per call; builds the blocklist plugin first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use postern::config::Config;
use postern::envelope::{Address, Envelope, MailParams, Recipient, SessionInfo};
use postern::plugins::Runtime;

fn wasm() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "blocklist",
        ])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("running cargo");
    assert!(status.success(), "building the blocklist plugin");
    target.join("wasm32-wasip2/release/blocklist.wasm")
}

fn main() -> anyhow::Result<()> {
    let wasm = wasm();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let session = SessionInfo {
        peer: "192.0.2.1:40000".parse()?,
        local: "192.0.2.10:25".parse()?,
        helo: Some("client.test".into()),
        tls: None,
        auth_user: None,
        may_relay: false,
    };
    let envelope = Envelope::new(Address("a@b.test".into()), MailParams::default());
    let rcpt = Recipient::new("user@example.test");
    for (label, instances, iterations) in [("warm", "warm", 20_000u32), ("fresh", "fresh", 2_000)] {
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[spool]\npath = {:?}\n[plugins]\ndir = \"/\"\nwatch = false\n\
             [[plugin]]\nname = \"blocklist\"\npath = {wasm:?}\ninstances = \"{instances}\"\n\
             [plugin.config]\ndomains = [\"blocked.test\"]\n",
            dir.path().join("spool")
        );
        let config = Config::parse(&text, &dir.path().join("postern.toml"))?;
        rt.block_on(async {
            let runtime = Runtime::new(&config)?;
            let chain = runtime.load_chain(&config).await?;
            for _ in 0..iterations / 10 {
                chain.rcpt(&session, &envelope, &rcpt).await;
            }
            let started = Instant::now();
            for _ in 0..iterations {
                let v = chain.rcpt(&session, &envelope, &rcpt).await;
                assert!(v.lets_through());
            }
            let per = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
            println!("rcpt hook, {label:>5} instance: {per:8.2} us/call ({iterations} calls)");
            anyhow::Ok(())
        })?;
    }
    Ok(())
}
