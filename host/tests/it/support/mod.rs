//! Test helpers: a DNS server, capture sinks, a Redis server, a relay started
//! as a library or as the binary, minimal SMTP clients, certificates, and the
//! Python and JavaScript example plugins built.

#![allow(dead_code)]

pub mod dns;
pub mod haproxy;
pub mod http;
pub mod inprocess;
pub mod lang;
pub mod redis;
pub mod relay;
pub mod sink;
pub mod smtp;
pub mod tls;

use std::time::Duration;

/// Polls `f` until it returns `Some`, for at most `timeout`.
pub async fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a Python script given as text with `args`; its standard output.
/// A failure fails the test with the script's standard error.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A log without its colours.
pub fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence runs to its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// True when the tests run as root (needed to mount a small tmpfs).
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Mounts a tmpfs of `size` (`"256k"`) at `at`; false when that is not
/// possible (it needs root).
pub fn mount_tmpfs(at: &std::path::Path, size: &str) -> bool {
    std::fs::create_dir_all(at).unwrap();
    std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Unmounts its folder when dropped.
pub struct Unmount(pub std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
