//! A real `redis-server` on a free loopback port, saving nothing to disk and
//! killed when dropped, with a plain client to read what landed in it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::Commands as _;

use super::relay::free_port;
use super::tls::TestCert;

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its TLS port on 127.0.0.1, when it has one.
    pub tls_port: Option<u16>,
    tls: Option<TestCert>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers.
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// Starts one on `port` and waits until it answers.
    pub fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            tls_port: None,
            tls: None,
            dir: tempfile::tempdir().unwrap(),
        };
        server.restart();
        server
    }

    /// Starts one that also takes TLS connections, with this certificate, on
    /// `tls_port`.
    pub fn start_tls(cert: TestCert) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            tls_port: Some(free_port()),
            tls: Some(cert),
            dir: tempfile::tempdir().unwrap(),
        };
        server.restart();
        server
    }

    /// Starts it again on the same port (empty, as nothing was saved).
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        if let (Some(port), Some(cert)) = (self.tls_port, &self.tls) {
            cmd.args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(&cert.cert)
                .arg("--tls-key-file")
                .arg(&cert.key)
                .arg("--tls-ca-cert-file")
                .arg(&cert.cert);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server (host/scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = self
                .client()
                .get_connection()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not answer: {ping:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it; calls to it now fail.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its URL, database 0.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    fn conn(&self) -> redis::Connection {
        self.client()
            .get_connection()
            .expect("connecting to the test redis-server")
    }

    /// The string at `key`.
    pub fn get(&self, key: &str) -> Option<String> {
        self.conn().get(key).unwrap()
    }

    /// `PTTL key`: ms left, -1 without a TTL, -2 when absent.
    pub fn pttl(&self, key: &str) -> i64 {
        self.conn().pttl(key).unwrap()
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.conn().keys("*").unwrap();
        keys.sort();
        keys
    }

    /// Runs a command for its side effect.
    pub fn run(&self, args: &[&str]) {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query::<redis::Value>(&mut self.conn()).unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy to a Redis that can go silent: `freeze` stops forwarding on
/// the connections it has and leaves them open, as a peer that vanished
/// without closing them would (a failover, a reboot); connections made after
/// that are forwarded as before.
pub struct Proxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy to the Redis on 127.0.0.1:`to`.
    pub async fn start(to: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (generation, rx) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut rx = rx.clone();
                let born = *rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    let frozen = async { rx.wait_for(|g| *g != born).await.is_ok() };
                    let frozen = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        f = frozen => f,
                    };
                    if frozen {
                        // Silent, and open until the test's runtime ends.
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        Proxy {
            port,
            generation,
            task,
        }
    }

    /// Its URL, database 0.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops forwarding on every connection open now.
    pub fn freeze(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
