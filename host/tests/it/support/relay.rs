//! Starts the real `postern` binary on a free loopback port with a config
//! written for the test, and reads back its spool.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running relay process.
pub struct Relay {
    child: Option<Child>,
    /// Temporary folder holding the config and the spool.
    pub dir: Arc<tempfile::TempDir>,
    /// The SMTP port on 127.0.0.1.
    pub port: u16,
    /// What the relay wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
}

/// The config used by most tests: a relay listener on `port`, trusted
/// 127.0.0.0/8, relay domain `ours.test`, spool in `dir`, and delivery to a
/// smart host on a loopback port where nothing listens, so messages stay
/// queued (deferred) and no test looks anything up outside this machine.
/// `extra` is appended (more listeners, other sections).
pub fn base_config(port: u16, extra: &str) -> String {
    config_with(port, NO_DELIVERY, extra)
}

/// [`base_config`] with another `[delivery]` table (`delivery` holds the
/// header and its keys).
pub fn config_with(port: u16, delivery: &str, extra: &str) -> String {
    format!(
        r#"hostname = "mx.ours.test"
[[listener]]
address = "127.0.0.1:{port}"
[spool]
path = "spool"
[relay]
networks = ["127.0.0.0/8"]
domains = ["ours.test"]
{delivery}
{extra}
"#
    )
}

/// A `[delivery]` table that keeps messages queued: the smart host is a
/// loopback port with nothing behind it.
pub const NO_DELIVERY: &str = "[delivery]\nsmarthost = \"smtp://127.0.0.1:9\"\n";

impl Relay {
    /// Starts a relay with [`base_config`] and waits until it listens.
    pub fn start(extra: &str) -> Relay {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let port = free_port();
        Relay::start_in(dir, port, &base_config(port, extra))
    }

    /// Starts a relay with this config text in `dir` (reused across restarts).
    pub fn start_in(dir: Arc<tempfile::TempDir>, port: u16, config: &str) -> Relay {
        Relay::start_in_env(dir, port, config, &[])
    }

    /// Like [`Relay::start_in`], without waiting for the SMTP port (a
    /// PROXY listener refuses a connection without a header).
    pub fn start_no_wait(dir: Arc<tempfile::TempDir>, port: u16, config: &str) -> Relay {
        Relay::spawn(dir, port, config, &[])
    }

    /// Like [`Relay::start_in`], with more environment variables.
    pub fn start_in_env(
        dir: Arc<tempfile::TempDir>,
        port: u16,
        config: &str,
        env: &[(&str, &Path)],
    ) -> Relay {
        let relay = Relay::spawn(dir, port, config, env);
        relay.wait_listening(port);
        relay
    }

    fn spawn(dir: Arc<tempfile::TempDir>, port: u16, config: &str, env: &[(&str, &Path)]) -> Relay {
        std::fs::write(dir.path().join("postern.toml"), config).unwrap();
        // Run from the folder with a relative config path, as
        // host/scripts/run.sh does, so paths resolve the way they do there.
        let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--config", "postern.toml"])
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postern");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        Relay {
            child: Some(child),
            dir,
            port,
            log,
        }
    }

    /// Waits until something accepts on 127.0.0.1:`port`.
    pub fn wait_listening(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "relay did not listen on {port}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The relay's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal (`libc::SIGTERM`, `libc::SIGKILL`, ...).
    pub fn signal(&self, sig: i32) {
        // Plain `kill`, so the tests need no unsafe code.
        let name = match sig {
            9 => "KILL",
            15 => "TERM",
            1 => "HUP",
            2 => "INT",
            _ => panic!("unsupported signal {sig}"),
        };
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code (None if killed).
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The spool folder.
    pub fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// Every spooled message: (queue id, metadata, message bytes).
    pub fn spooled(&self) -> Vec<Spooled> {
        spooled(&self.spool())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One spooled message as read from disk.
#[derive(Debug)]
pub struct Spooled {
    /// Queue id (the file name).
    pub id: String,
    /// The JSON record.
    pub meta: serde_json::Value,
    /// The message bytes.
    pub message: Vec<u8>,
}

/// Reads every message file in a spool folder. A running relay may remove a
/// file between the listing and the read: that message is no longer spooled.
pub fn spooled(spool: &Path) -> Vec<Spooled> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(spool.join("queue")) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains('.') {
            continue;
        }
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let nl = bytes.iter().position(|&b| b == b'\n').expect("record line");
        let meta: serde_json::Value = serde_json::from_slice(&bytes[..nl]).expect("record is JSON");
        // A file written over a longer pooled one keeps that one's tail.
        let size = meta["size"].as_u64().expect("record has a size") as usize;
        let message = bytes[nl + 1..]
            .get(..size)
            .expect("file as long as its record");
        out.push(Spooled {
            id: name,
            meta,
            message: message.to_vec(),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}
