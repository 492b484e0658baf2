//! A relay with delivery, started in-process as a library (most delivery tests) or as the
//! `postern` binary (CLI and crash tests), always on 127.0.0.1:0.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use postern::config::Config;
use postern::delivery::Delivery;
use postern::server::Server;

/// Writes a config for a relay on `listen`, spool in `dir/spool`, with `delivery`
/// as the body of the `[delivery]` table.
pub fn write_config(dir: &Path, listen: SocketAddr, delivery: &str) -> PathBuf {
    let text = format!(
        "hostname = \"relay.test\"\n\
         [[listener]]\naddress = \"{listen}\"\n\
         [spool]\npath = \"{}\"\n\
         [relay]\nnetworks = [\"127.0.0.0/8\"]\n\
         [log]\nlevel = \"info\"\n\
         [delivery]\n{delivery}\n",
        dir.join("spool").display()
    );
    let path = dir.join("postern.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A relay running inside the test process.
pub struct Relay {
    /// Its SMTP address.
    pub addr: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    /// Its spool folder.
    pub spool: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay with the given `[delivery]` settings in `dir`.
    pub async fn start(dir: &Path, delivery: &str) -> Relay {
        let config_path = write_config(dir, "127.0.0.1:0".parse().unwrap(), delivery);
        Relay::start_with(config_path).await
    }

    /// Starts a relay with a whole config file of the test's own.
    pub async fn start_with(config_path: PathBuf) -> Relay {
        let config = Config::load(&config_path).unwrap();
        let spool = config.resolve(&config.spool.path);
        let server = Server::bind_without_plugins(config).await.unwrap();
        let addr = server.local_addrs()[0];
        let admin = postern::admin::Admin::bind(server.context()).await.unwrap();
        let delivery = Delivery::start(server.context(), server.local_addrs())
            .await
            .unwrap();
        admin.serve(delivery).set_listening();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.listen().unwrap().run(async move {
            let _ = rx.await;
        }));
        Relay {
            addr,
            config: config_path,
            spool,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Messages (not state files) left in the spool.
    pub fn spooled(&self) -> Vec<String> {
        spooled(&self.spool)
    }

    /// Stops accepting. Delivery tasks end with the test's runtime.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Message files in a spool.
pub fn spooled(spool: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(spool.join("queue")) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 17)
        .collect();
    v.sort();
    v
}

/// A free port on 127.0.0.1 (for the binary, which needs it in its config).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `postern` binary as a child process.
pub struct Binary {
    /// The process.
    pub child: Child,
}

impl Binary {
    /// Starts `postern serve` and waits until it accepts connections.
    pub async fn serve(config: &Path, addr: SocketAddr, log: &Path) -> Binary {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Owned by `Binary` at once, so its Drop reaps the child on every path.
        let bin = Binary { child };
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                return bin;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("postern did not start listening on {addr}");
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap()
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `postern queue ARGS --config CONFIG` and returns stdout (panics on failure).
pub fn queue_cmd(config: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .arg("queue")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "postern queue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Sends one message over SMTP and returns the queue id from the 250 reply.
/// `mail_params` and `rcpt_params` are appended to MAIL and each RCPT.
pub async fn send(
    addr: SocketAddr,
    from: &str,
    rcpts: &[&str],
    mail_params: &str,
    rcpt_params: &str,
    body: &str,
) -> Result<String, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut conn = BufReader::new(stream);
    async fn reply(conn: &mut BufReader<TcpStream>) -> Result<String, String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = conn.read_line(&mut line).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("connection closed after {all:?}"));
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(all);
            }
        }
    }
    async fn cmd(
        conn: &mut BufReader<TcpStream>,
        line: &str,
        want: &str,
    ) -> Result<String, String> {
        conn.get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let r = reply(conn).await?;
        if !r.starts_with(want) {
            return Err(format!("{line}: {r}"));
        }
        Ok(r)
    }
    let greeting = reply(&mut conn).await?;
    if !greeting.starts_with("220") {
        return Err(greeting);
    }
    cmd(&mut conn, "EHLO client.test", "250").await?;
    cmd(
        &mut conn,
        &format!("MAIL FROM:<{from}>{mail_params}"),
        "250",
    )
    .await?;
    for r in rcpts {
        cmd(&mut conn, &format!("RCPT TO:<{r}>{rcpt_params}"), "250").await?;
    }
    cmd(&mut conn, "DATA", "354").await?;
    let mut data = body.replace("\r\n", "\n").replace('\n', "\r\n");
    if !data.ends_with("\r\n") {
        data.push_str("\r\n");
    }
    data.push('.');
    let done = cmd(&mut conn, &data, "250").await?;
    let _ = cmd(&mut conn, "QUIT", "221").await;
    done.trim_end()
        .rsplit(' ')
        .next()
        .map(str::to_string)
        .ok_or(done)
}
