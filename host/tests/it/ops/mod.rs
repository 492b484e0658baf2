//! Operations: the admin listener and its guard, `/metrics` after known
//! traffic (checked by promtool), the queue API and bulk control on a
//! running relay, injection, logs, the PROXY protocol behind haproxy, the
//! status page in Chromium, SIGHUP, and the systemd unit.

mod admin;
mod inject;
mod logs;
mod proxy;
mod queue;
mod sighup;
mod status;
mod systemd;

// The plugin build helper, as `plugins.rs` includes it.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "../support/plugins.rs"]
mod plugin_build;

use std::sync::Arc;

use crate::support::relay::{free_port, Relay};
use crate::support::smtp::Raw;

/// A relay binary whose `[delivery]` is `delivery` and whose admin listener
/// is on a free loopback port, with `token` if given; `extra` is appended.
pub fn start(delivery: &str, token: Option<&str>, extra: &str) -> (Relay, String) {
    let admin = token
        .map(|t| format!("token = \"{t}\""))
        .unwrap_or_default();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let admin_port = free_port();
    let config = crate::support::relay::config_with(
        port,
        &format!("[delivery]\n{delivery}"),
        &format!("[admin]\naddress = \"127.0.0.1:{admin_port}\"\n{admin}\n{extra}"),
    );
    let relay = Relay::start_in(dir, port, &config);
    let base = format!("http://127.0.0.1:{admin_port}");
    crate::support::http::wait_ready(&format!("{base}/ready"), token);
    (relay, base)
}

/// A metric's value on a page: the sample whose name and labels are `series`
/// exactly as written.
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A folder for a relay with the workspace's plugin `name` in `plugins/`,
/// and the config tables that load it (`entry` is added to its
/// `[[plugin]]` table: grants, `[plugin.config]`).
pub fn with_plugin(name: &str, entry: &str) -> (Arc<tempfile::TempDir>, String) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let file = format!("{name}.wasm");
    std::fs::copy(
        plugin_build::wasm_dir().join(&file),
        dir.path().join("plugins").join(&file),
    )
    .unwrap();
    let cache = plugin_build::target_dir().join("postern-test-plugin-cache");
    let tables = format!(
        "[plugins]\ndir = \"plugins\"\ncache_dir = {cache:?}\nwatch = false\n\
         [[plugin]]\nname = \"{name}\"\npath = \"{file}\"\n{entry}\n"
    );
    (dir, tables)
}

/// One transaction on a new connection: EHLO `helo`, each recipient with
/// the reply code it must get, the message; returns the final reply.
pub fn transaction(mut c: Raw, helo: &str, rcpts: &[(&str, &str)], body: &str) -> String {
    assert!(c.cmd(&format!("EHLO {helo}")).starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@ours.test>").starts_with("250"));
    for (rcpt, code) in rcpts {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with(code), "{rcpt}: {r}");
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(format!("{body}.\r\n").as_bytes());
    let reply = c.reply();
    c.cmd("QUIT");
    reply
}

/// A checker's run succeeded and it had nothing to say (no warning).
pub fn assert_silent(out: &std::process::Output, what: &str) {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{what}: {said}"
    );
}

/// `promtool check metrics` passes the page and prints no warning.
pub fn promtool_is_silent(page: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; host/scripts/test.sh installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_silent(&out, "promtool");
}
