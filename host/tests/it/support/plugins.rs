//! Helpers for the plugin tests: the workspace's plugins built once for
//! wasm32-wasip2, a relay started as a library on 127.0.0.1:0 with a given
//! chain, and a small SMTP client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context as _};
use postern::config::Config;
use postern::plugins::{ChainHandle, Runtime};
use postern::server::Server;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The workspace's target folder (as cargo was told, or the default).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Builds the plugin crates once per test run and returns the folder with
/// their `.wasm` files.
pub fn wasm_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                "testkit",
                "-p",
                "blocklist",
                "-p",
                "router",
                "-p",
                "archive",
                "-p",
                "forward",
                "-p",
                "ratelimit",
                "-p",
                "access",
                "-p",
                "compliance",
            ])
            .env("CARGO_TARGET_DIR", target_dir())
            .status()
            .expect("running cargo to build the plugins");
        assert!(status.success(), "building the plugins failed");
        target_dir().join("wasm32-wasip2/release")
    })
}

/// A relay with a plugin chain, running until dropped.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub runtime: Arc<Runtime>,
    pub handle: Arc<ChainHandle>,
    trusted: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The config text for a chain (`[[plugin]]` tables), with the relay parts.
fn config_text(chain: &str, trusted: bool) -> String {
    let networks = if trusted { "\"127.0.0.0/8\"" } else { "" };
    let cache = target_dir().join("postern-test-plugin-cache");
    format!(
        "hostname = \"relay.test\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\n\
         [relay]\nnetworks = [{networks}]\ndomains = [\"local.test\"]\n\
         [limits]\nmax_connections = 64\nshutdown_grace = \"1s\"\n\
         [plugins]\ndir = \"plugins\"\ncache_dir = {cache:?}\nwatch = false\n\
         {chain}"
    )
}

impl Relay {
    /// Starts a relay whose chain is `chain` (TOML `[[plugin]]` tables naming
    /// `.wasm` files of the workspace by crate name, e.g. `path = "testkit.wasm"`).
    pub async fn start(chain: &str) -> anyhow::Result<Relay> {
        Relay::start_with(chain, true).await
    }

    /// Like [`Relay::start`]; with `trusted` false the test client is an
    /// outsider that may send only to `local.test`.
    pub async fn start_with(chain: &str, trusted: bool) -> anyhow::Result<Relay> {
        let dir = tempfile::tempdir()?;
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins)?;
        for entry in std::fs::read_dir(wasm_dir())? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "wasm") {
                std::fs::copy(&path, plugins.join(path.file_name().unwrap_or_default()))?;
            }
        }
        let path = dir.path().join("postern.toml");
        std::fs::write(&path, config_text(chain, trusted))?;
        let config = Config::load(&path)?;
        let runtime = Runtime::new(&config)?;
        let chain = runtime.load_chain(&config).await?;
        let handle = Arc::new(ChainHandle::new(chain));
        let server = Server::bind(config, handle.clone()).await?;
        let addr = server.local_addrs()[0];
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(server.listen()?.run(async move {
            let _ = stopped.await;
        }));
        Ok(Relay {
            addr,
            dir,
            runtime,
            handle,
            trusted,
            stop: Some(stop),
        })
    }

    /// Rewrites the config with another chain and reloads it, as the watcher
    /// or SIGHUP would.
    pub async fn set_chain(&self, chain: &str) -> Result<usize, postern::plugins::Error> {
        let path = self.dir.path().join("postern.toml");
        std::fs::write(&path, config_text(chain, self.trusted)).expect("writing the config");
        postern::plugins::reload::reload(&path, &self.runtime, &self.handle).await
    }

    /// The spooled message with this queue id: (metadata JSON, message).
    pub fn spooled(&self, id: &str) -> anyhow::Result<(serde_json::Value, String)> {
        let text = std::fs::read_to_string(self.dir.path().join("spool/queue").join(id))
            .with_context(|| format!("spool file of {id}"))?;
        let (meta, message) = text.split_once('\n').context("no metadata line")?;
        Ok((serde_json::from_str(meta)?, message.to_string()))
    }

    /// A connected client that has read the banner.
    pub async fn client(&self) -> anyhow::Result<(Client, Reply)> {
        let stream = TcpStream::connect(self.addr).await?;
        let mut c = Client {
            stream: BufReader::new(stream),
        };
        let banner = c.read().await?;
        Ok((c, banner))
    }
}

/// One reply: code and its lines' text.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

/// A line-at-a-time SMTP client.
pub struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    pub async fn read(&mut self) -> anyhow::Result<Reply> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read_line(&mut line))
                .await
                .context("reply timed out")??;
            if n == 0 {
                bail!("connection closed (after {text:?})");
            }
            if line.len() < 4 {
                bail!("short reply line {line:?}");
            }
            text.push_str(line[4..].trim_end());
            text.push('\n');
            if line.as_bytes()[3] == b' ' {
                return Ok(Reply {
                    code: line[..3].parse()?,
                    text,
                });
            }
        }
    }

    pub async fn cmd(&mut self, line: &str) -> anyhow::Result<Reply> {
        self.stream
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.read().await
    }

    /// EHLO, MAIL, RCPTs, DATA with `body` (headers and body, LF or CRLF).
    /// Returns the first reply that is not positive, or the final one.
    pub async fn send(&mut self, from: &str, to: &[&str], body: &str) -> anyhow::Result<Reply> {
        let r = self.cmd("EHLO client.test").await?;
        if r.code != 250 {
            return Ok(r);
        }
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await?;
        if r.code != 250 {
            return Ok(r);
        }
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>")).await?;
            if r.code != 250 {
                return Ok(r);
            }
        }
        let r = self.cmd("DATA").await?;
        if r.code != 354 {
            return Ok(r);
        }
        let body = body.replace("\r\n", "\n").replace('\n', "\r\n");
        self.stream.get_mut().write_all(body.as_bytes()).await?;
        self.cmd(".").await
    }
}

/// The queue id in a `250 ... queued as <id>` reply.
pub fn queue_id(r: &Reply) -> Option<String> {
    r.text
        .split("queued as ")
        .nth(1)
        .map(|s| s.trim().to_string())
}

/// A small message.
pub const MESSAGE: &str =
    "From: a@b.test\nTo: c@local.test\nSubject: hello\nX-Drop: me\n\nhi there\n";
