//! Debian's haproxy in front of relays (TCP mode, PROXY protocol), and
//! client connections from a chosen loopback address, so a relay behind it
//! sees distinct clients.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// haproxy in the foreground; killed on drop.
pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    /// Forwards each `(frontend port, option)` to `backend` with that
    /// option (`send-proxy-v2` or `send-proxy`).
    pub fn start(backend: SocketAddr, frontends: &[(u16, &str)]) -> Haproxy {
        let mut cfg = String::new();
        for (i, (port, option)) in frontends.iter().enumerate() {
            cfg.push_str(&format!(
                "frontend f{i}\n  bind 127.0.0.1:{port}\n  default_backend b{i}\nbackend b{i}\n  server relay {backend} {option}\n"
            ));
        }
        let ports: Vec<u16> = frontends.iter().map(|(p, _)| *p).collect();
        Haproxy::run(&cfg, &ports)
    }

    /// Round robin from 127.0.0.1:`front` over `backends`, each connection
    /// opened with a PROXY v2 header.
    pub fn round_robin(front: u16, backends: &[SocketAddr]) -> Haproxy {
        let mut cfg =
            format!("frontend smtp\n  bind 127.0.0.1:{front}\n  default_backend relays\nbackend relays\n  balance roundrobin\n");
        for (i, b) in backends.iter().enumerate() {
            cfg.push_str(&format!("  server r{i} {b} send-proxy-v2\n"));
        }
        Haproxy::run(&cfg, &[front])
    }

    /// Runs haproxy with these frontends and backends (TCP mode) and waits
    /// until it listens on every one of `ports`.
    pub fn run(sections: &str, ports: &[u16]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n{sections}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (Debian's haproxy; host/scripts/test.sh installs it)");
        let proxy = Haproxy { child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in ports {
            while !haproxy_bound(*port) {
                assert!(
                    Instant::now() < deadline,
                    "haproxy did not listen on {port}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        proxy
    }
}

/// Whether something listens on 127.0.0.1:`port`, seen in the kernel's
/// table rather than by connecting (a connection would go to the relay).
fn haproxy_bound(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(hex.trim_end()) && f[3] == "0A"
        })
}

/// A connection to `to` from the loopback address `from`.
pub fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = socket2_free_bind(from);
    let stream = socket.connect(to).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// A socket bound to `ip` on any port, ready to connect.
fn socket2_free_bind(ip: &str) -> Bound {
    Bound(format!("{ip}:0").parse().unwrap())
}

/// A local address to connect from.
struct Bound(SocketAddr);

impl Bound {
    fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(self.0)?;
            socket.connect(to).await
        })?;
        let std = stream.into_std()?;
        std.set_nonblocking(false)?;
        Ok(std)
    }
}
