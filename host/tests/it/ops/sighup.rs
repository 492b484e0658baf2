//! SIGHUP: the config and the plugin chain are read again without dropping
//! a session; keys the running relay cannot take up are named in a warning.

use std::time::Duration;

use super::with_plugin;
use crate::support::relay::{config_with, free_port, Relay};
use crate::support::smtp::Raw;

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_without_dropping_a_session() {
    let (dir, plugin) = with_plugin("blocklist", "[plugin.config]\ndomains = [\"a.test\"]");
    let port = free_port();
    let config = |max_errors: u32, plugin: &str| {
        config_with(
            port,
            crate::support::relay::NO_DELIVERY,
            &format!("[limits]\nmax_errors = {max_errors}\n{plugin}"),
        )
    };
    let relay = Relay::start_in(dir.clone(), port, &config(20, &plugin));
    let addr = relay.addr();
    // A session in the middle of a transaction when the signal comes.
    let mut open = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(addr);
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        assert!(c.cmd("MAIL FROM:<s@ours.test>").starts_with("250"));
        c
    })
    .await
    .unwrap();
    let changed = plugin.replace("\"a.test\"", "\"b.test\"");
    std::fs::write(dir.path().join("postern.toml"), config(7, &changed)).unwrap();
    relay.signal(1);
    crate::support::eventually(Duration::from_secs(20), || {
        relay.log().contains("plugin chain reloaded").then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("no reload: {}", relay.log()));
    let log = relay.log();
    let warning = log
        .lines()
        .find(|l| l.contains("need a restart"))
        .unwrap_or_else(|| panic!("no restart warning: {log}"));
    // Only [limits]: the [[plugin]] change was taken up.
    assert!(warning.trim_end().ends_with("keys=\"limits\""), "{warning}");

    let (old, new) = tokio::task::spawn_blocking(move || {
        // The open session finishes on the chain it started with.
        let old = open.cmd("RCPT TO:<x@b.test>");
        assert!(open.cmd("DATA").starts_with("354"));
        open.send(b"Subject: across a reload\r\n\r\nhi\r\n.\r\n");
        let queued = open.reply();
        assert!(queued.starts_with("250 "), "{queued}");
        // A new session gets the new chain.
        let mut c = Raw::connect(addr);
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<s@ours.test>");
        let new = (c.cmd("RCPT TO:<x@b.test>"), c.cmd("RCPT TO:<x@a.test>"));
        (old, new)
    })
    .await
    .unwrap();
    assert!(old.starts_with("250"), "{old}");
    assert!(new.0.starts_with("550"), "{}", new.0);
    assert!(new.1.starts_with("250"), "{}", new.1);
}
