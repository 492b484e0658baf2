//! The plugin platform of `postern:relay@0.2.0`: metadata per session and per
//! message (through the spool and a restart), the helo and delivered hooks,
//! shadow mode, replay with `postern plugin test`, and plugins and spools
//! made before 0.2.0.

#[allow(dead_code, clippy::duplicate_mod)]
#[path = "support/plugins.rs"]
mod kit;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kit::{queue_id, Relay as Chain, MESSAGE};

use crate::support::redis::RedisServer;
use crate::support::relay::{base_config, free_port, Relay, NO_DELIVERY};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::tls::make_cert;
use crate::support::{eventually, plain};

/// A testkit entry named `name` with `config` as its `[plugin.config]` body.
/// The testkit imports kv (its counters), so it is granted kv unless `extra`
/// names the grants.
fn testkit(name: &str, extra: &str, config: &str) -> String {
    let grants = if extra.contains("grants") {
        ""
    } else {
        "grants = [\"kv\"]"
    };
    format!("[[plugin]]\nname = \"{name}\"\npath = \"testkit.wasm\"\n{grants}\n{extra}\n[plugin.config]\n{config}\n")
}

/// `[plugins]` for a relay started as the binary in `dir`, with the
/// workspace's plugins copied into `dir/plugins`.
fn plugins_section(dir: &Path) -> String {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for name in ["testkit.wasm", "blocklist.wasm"] {
        std::fs::copy(kit::wasm_dir().join(name), plugins.join(name)).unwrap();
    }
    let cache = kit::target_dir().join("postern-test-plugin-cache");
    format!("[plugins]\ndir = \"plugins\"\ncache_dir = {cache:?}\nwatch = false\n")
}

/// The value of header `name` in a spooled message.
fn header(message: &str, name: &str) -> Option<String> {
    message
        .split("\r\n\r\n")
        .next()?
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
}

/// Sends one message from a@b.test to c@dest.test; returns its queue id.
fn send(relay: &Relay, subject: &str) -> String {
    use crate::support::smtp::{queue_id, send_message};
    let body = format!("Subject: {subject}\r\n\r\nbody\r\n");
    queue_id(&send_message(
        relay.addr(),
        "a@b.test",
        &["c@dest.test"],
        &body,
    ))
}

fn postern(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .current_dir(dir)
        .env_remove("POSTERN_CONFIG")
        .output()
        .expect("running postern")
}

/// Metadata set at connect and mail-from is there at data; each plugin
/// writes under its own name, and reads another's with `get-from` without
/// being able to change it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_lasts_from_connect_to_data_and_stays_each_plugins_own() -> anyhow::Result<()> {
    let set = |value: &str| {
        format!(
            "set_metadata = [{{ hook = \"connect\", scope = \"session\", key = \"seen\", value = \"{value}-at-connect\" }},\
             {{ hook = \"mail_from\", scope = \"transaction\", key = \"class\", value = \"{value}\" }}]"
        )
    };
    let shown = "show_metadata = [\"kit.session.seen\", \"kit.transaction.class\", \"kat.transaction.class\", \"nobody.transaction.class\"]";
    let chain = format!(
        "{}{}",
        testkit("kat", "", &format!("{}\n{shown}", set("kat"))),
        testkit("kit", "", &format!("{}\n{shown}", set("kit"))),
    );
    let relay = Chain::start(&chain).await?;
    let (mut c, _) = relay.client().await?;
    let r = c.send("a@b.test", &["c@local.test"], MESSAGE).await?;
    assert_eq!(r.code, 250, "{r:?}");
    let (_, message) = relay.spooled(&queue_id(&r).expect("queue id"))?;
    let expected = "kit.session.seen=kit-at-connect; kit.transaction.class=kit; \
                    kat.transaction.class=kat; nobody.transaction.class=-";
    // Both plugins see the same values: neither wrote over the other's key.
    let seen: Vec<&str> = message
        .lines()
        .filter_map(|l| l.strip_prefix("X-Testkit-Metadata: "))
        .collect();
    assert_eq!(seen, [expected, expected], "{message}");
    // The session's values last into its next transaction.
    let r = c
        .send("a@b.test", &["c@local.test"], "Subject: again\n\nagain\n")
        .await?;
    let (meta, message) = relay.spooled(&queue_id(&r).expect("queue id"))?;
    assert!(
        message.contains("kit.session.seen=kit-at-connect"),
        "{message}"
    );
    // The transaction's values are stored with the message.
    assert_eq!(meta["metadata"]["kit"]["class"], "kit", "{meta}");
    assert_eq!(meta["metadata"]["kat"]["class"], "kat", "{meta}");
    Ok(())
}

/// Past `[plugins] max_metadata_size` a write is refused with `too-large`
/// and the message goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_past_its_limit_is_refused() -> anyhow::Result<()> {
    let big = "x".repeat(100);
    // A key of the [plugins] table written before the first [[plugin]].
    let chain = format!(
        "max_metadata_size = 64\n{}",
        testkit(
            "kit",
            "",
            &format!(
                "set_metadata = [{{ hook = \"data\", scope = \"transaction\", key = \"small\", value = \"fits\" }},\
                 {{ hook = \"data\", scope = \"transaction\", key = \"big\", value = \"{big}\" }}]\n\
                 show_metadata = [\"kit.transaction.small\", \"kit.transaction.big\"]"
            )
        )
    );
    let relay = Chain::start(&chain).await?;
    let (mut c, _) = relay.client().await?;
    let r = c.send("a@b.test", &["c@local.test"], MESSAGE).await?;
    assert_eq!(r.code, 250, "{r:?}");
    let (meta, message) = relay.spooled(&queue_id(&r).expect("queue id"))?;
    assert_eq!(
        header(&message, "X-Testkit-Set-Error").as_deref(),
        Some("big: too-large"),
        "{message}"
    );
    assert_eq!(
        header(&message, "X-Testkit-Metadata").as_deref(),
        Some("kit.transaction.small=fits; kit.transaction.big=-")
    );
    assert_eq!(
        meta["metadata"]["kit"],
        serde_json::json!({"small": "fits"})
    );
    Ok(())
}

/// The helo hook refuses one name (the client may try another), and runs
/// again after STARTTLS; the session's metadata lasts across the handshake.
/// swaks is the client.
#[test]
fn helo_refuses_a_name_and_runs_again_after_starttls() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let cert = make_cert(dir.path());
    let config = format!(
        "hostname = \"mx.ours.test\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n\
         tls_cert = {:?}\ntls_key = {:?}\n[spool]\npath = \"spool\"\n\
         [relay]\nnetworks = [\"127.0.0.0/8\"]\n{NO_DELIVERY}\n{}{}",
        cert.cert,
        cert.key,
        plugins_section(dir.path()),
        testkit(
            "kit",
            "",
            "trace_helo = true\nhelo_refuse = \"bad.example\"\nshow_metadata = [\"kit.session.helo_seen\"]"
        )
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let mut c = crate::support::smtp::Raw::connect(relay.addr());
    let refused = c.cmd("EHLO bad.example");
    assert!(
        refused.starts_with("550 5.7.1 testkit refuses this name"),
        "{refused}"
    );
    let r = c.cmd("MAIL FROM:<a@b.test>");
    assert!(r.starts_with("503"), "MAIL without an accepted EHLO: {r}");
    assert!(c.cmd("EHLO good.example").starts_with("250"));
    c.cmd("QUIT");

    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}"), "--tls"])
        .args([
            "--ehlo",
            "client.test",
            "--from",
            "a@b.test",
            "--to",
            "c@dest.test",
        ])
        .output()
        .expect("swaks (Debian package swaks) is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let spooled = relay.spooled();
    assert_eq!(spooled.len(), 1);
    let message = String::from_utf8_lossy(&spooled[0].message).into_owned();
    assert_eq!(
        header(&message, "X-Testkit-Metadata").as_deref(),
        Some("kit.session.helo_seen=client.test/plain,client.test/tls"),
        "{message}"
    );
}

/// Metadata set at data is read at route, with the relay killed and
/// started again in between: it travels in the spool record, which
/// `postern queue show --json` shows as `record`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_set_at_data_is_read_at_route_after_a_restart() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let entry = |hooks: &str| {
        format!(
            "{}{}",
            plugins_section(dir.path()),
            testkit(
                "kit",
                &format!("hooks = [{hooks}]"),
                "set_metadata = [{ hook = \"data\", scope = \"transaction\", key = \"folder\", value = \"chosen-at-data\" }]\n\
                 route = { route = \"folder-from-metadata\", arg = \"folder\" }"
            )
        )
    };
    // First the chain sets the value and has no route hook: delivery goes
    // to the smart host, which is down.
    let first = base_config(port, &entry("\"data\""))
        .replace(NO_DELIVERY, &format!("{NO_DELIVERY}retry = [\"1s\"]\n"));
    let relay = Relay::start_in(dir.clone(), port, &first);
    let id = send(&relay, "routed by metadata");
    let shown = postern(
        dir.path(),
        &["queue", "show", &id, "--json", "--config", "postern.toml"],
    );
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON");
    assert_eq!(
        shown["record"]["metadata"]["kit"]["folder"], "chosen-at-data",
        "{shown}"
    );
    assert_eq!(
        shown["record"]["envelope"]["recipients"][0]["address"],
        "c@dest.test"
    );
    assert_eq!(shown["record"]["client"]["helo"], "client.test", "{shown}");
    // The attempt failed (nothing listens there); then the relay dies.
    let deferred = eventually(Duration::from_secs(20), || {
        plain(&relay.log())
            .contains("outcome=\"deferred\"")
            .then_some(())
    })
    .await;
    assert!(deferred.is_some(), "{}", relay.log());
    relay.signal(9);
    drop(relay);

    // Started again with the route hook: the retry reads the stored value.
    let second = first.replace("hooks = [\"data\"]", "hooks = [\"data\", \"route\"]");
    let relay = Relay::start_in(dir.clone(), port, &second);
    let filed = dir.path().join(format!("local/chosen-at-data/{id}.0.eml"));
    let found = eventually(Duration::from_secs(20), || filed.exists().then_some(())).await;
    assert!(found.is_some(), "not filed; log:\n{}", relay.log());
    let text = std::fs::read_to_string(&filed).unwrap();
    assert!(text.contains("Subject: routed by metadata"), "{text}");
}

/// The delivered hook hears of each attempt, off the delivery path: against
/// a sink that answers 451 first, a deferral and then a delivery, each
/// with the attempt number, the queue id and the message's metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_hears_the_deferral_then_the_delivery() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::TempFailFirst(1))).await;
    let port = free_port();
    let config = base_config(
        port,
        &format!(
            "{}{}",
            plugins_section(dir.path()),
            testkit(
                "kit",
                "grants = [\"kv\", \"archive\"]",
                "record_delivered = true\n\
                 set_metadata = [{ hook = \"data\", scope = \"transaction\", key = \"class\", value = \"bulk\" }]"
            )
        ),
    )
    .replace(
        NO_DELIVERY,
        &format!("[delivery]\nsmarthost = \"smtp://{}\"\nretry = [\"1s\"]\n", sink.addr),
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let id = send(&relay, "twice");
    sink.wait_for(1, Duration::from_secs(20)).await;
    let log = dir.path().join("archive/kit/delivered.log");
    let lines = eventually(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.lines().count() >= 2).then_some(text)
    })
    .await
    .unwrap_or_else(|| panic!("two reports; relay log:\n{}", relay.log()));
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!(
            "c@dest.test deferred attempt=1 id={id} meta=class=bulk reply=451"
        )),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "c@dest.test delivered attempt=2 id={id} meta=class=bulk reply=250"
        )),
        "{lines:?}"
    );
}

/// A shadow runs beside the live plugin: it disagrees on one class of
/// recipient (it also blocks `b.test`), which is counted in `postern plugin
/// list` and in `/metrics`, and logged, and never enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_is_counted_and_logged_never_enforced() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let admin = free_port();
    let config = base_config(
        port,
        &format!(
            "{}[[plugin]]\nname = \"blocklist\"\npath = \"blocklist.wasm\"\nshadow = \"blocklist.wasm\"\n\
             [plugin.config]\ndomains = [\"a.test\"]\n[plugin.shadow_config]\ndomains = [\"a.test\", \"b.test\"]\n\
             [admin]\naddress = \"127.0.0.1:{admin}\"\n",
            plugins_section(dir.path())
        ),
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let metrics = format!("http://127.0.0.1:{admin}/metrics");
    let mut c = crate::support::smtp::Raw::connect(relay.addr());
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<s@sender.test>").starts_with("250"));
    let codes: Vec<String> = ["x@a.test", "x@b.test", "y@b.test", "z@c.test"]
        .iter()
        .map(|t| c.cmd(&format!("RCPT TO:<{t}>"))[..3].to_string())
        .collect();
    // Only the live version decides.
    assert_eq!(codes, ["550", "250", "250", "250"]);
    c.cmd("QUIT");
    let listed = eventually(Duration::from_secs(10), || {
        let out = postern(dir.path(), &["plugin", "list", "--config", "postern.toml"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("shadow at rcpt      agreed 2  disagreed 2")
            .then_some(text)
    })
    .await
    .unwrap_or_else(|| {
        let out = postern(dir.path(), &["plugin", "list", "--config", "postern.toml"]);
        panic!("{}", String::from_utf8_lossy(&out.stdout))
    });
    assert!(
        listed.contains("  shadow blocklist@shadow  sha256:"),
        "{listed}"
    );
    let page = crate::support::http::get(&metrics, None).body;
    let series = |family: &str| format!("{family}{{plugin=\"blocklist\",hook=\"rcpt\"}}");
    for (family, want) in [
        ("postern_plugin_shadow_disagreements_total", 2.0),
        ("postern_plugin_shadow_agreements_total", 2.0),
    ] {
        let got = crate::ops::sample(&page, &series(family));
        assert_eq!(got, Some(want), "{family} in\n{page}");
    }
    crate::ops::promtool_is_silent(&page);
    let log = plain(&relay.log());
    let line = log
        .lines()
        .find(|l| l.contains("shadow disagrees"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("live=continue") && line.contains("shadow=reject 550 5.7.1"),
        "{line}"
    );
}

/// A shadow's kv writes go to `<name>@shadow`, apart from the live plugin's,
/// and its edits and verdicts change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadows_kv_space_and_edits_are_its_own() -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let chain = format!(
        "[kv]\nbackend = \"redis\"\nredis_url = {:?}\nkey_prefix = \"sh\"\n\
         [[plugin]]\nname = \"kit\"\npath = \"testkit.wasm\"\nshadow = \"testkit.wasm\"\ngrants = [\"kv\"]\n\
         [plugin.config]\ncount = true\n\
         [plugin.shadow_config]\ncount = true\n\
         rcpt = {{ verdict = \"reject\", code = 550, enhanced = \"5.7.1\", text = \"shadow says no\" }}\n\
         data = {{ add_header = [\"X-Shadow\", \"1\"], quarantine = \"shadow\" }}\n",
        redis.url()
    );
    let relay = Chain::start(&chain).await?;
    let (mut c, _) = relay.client().await?;
    let r = c.send("a@b.test", &["c@local.test"], MESSAGE).await?;
    assert_eq!(r.code, 250, "{r:?}");
    let (meta, message) = relay.spooled(&queue_id(&r).expect("queue id"))?;
    assert!(!message.contains("X-Shadow"), "{message}");
    assert!(meta.get("hold").is_none(), "{meta}");
    let counted = eventually(Duration::from_secs(10), || {
        (redis.get("sh:kit@shadow:data").as_deref() == Some("1")).then_some(())
    })
    .await;
    assert!(counted.is_some(), "{:?}", redis.keys());
    assert_eq!(redis.get("sh:kit:rcpt").as_deref(), Some("1"));
    assert_eq!(redis.get("sh:kit@shadow:rcpt").as_deref(), Some("1"));
    let stats = relay.handle.current().plugins()[0].stats.snapshot();
    let rcpt = stats.iter().find(|h| h.hook == "rcpt").unwrap();
    assert_eq!((rcpt.shadow_agreed, rcpt.shadow_disagreed), (0, 1));
    Ok(())
}

/// A plugin built for postern:relay@0.1.0, kept as built, loads and answers
/// as before: verdicts, edits, routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_for_0_1_0_still_works() -> anyhow::Result<()> {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plugins/testkit-0.1.0.wasm");
    let relay = Chain::start("").await?;
    std::fs::copy(&fixture, relay.dir.path().join("plugins/old.wasm"))?;
    relay
        .set_chain(
            "[[plugin]]\nname = \"old\"\npath = \"old.wasm\"\ngrants = [\"kv\"]\n[plugin.config]\ncount = true\n\
             rcpt = { verdict = \"reject\", code = 550, enhanced = \"5.7.1\", text = \"not you\" }\n\
             data = { add_header = [\"X-Old\", \"1\"] }\n",
        )
        .await?;
    let plugin = relay.handle.current().plugins()[0].clone();
    assert_eq!(plugin.world(), "postern:relay/plugin@0.1.0");
    let (mut c, _) = relay.client().await?;
    let r = c.send("a@b.test", &["c@local.test"], MESSAGE).await?;
    assert_eq!(
        (r.code, r.text.contains("5.7.1 not you")),
        (550, true),
        "{r:?}"
    );
    relay
        .set_chain(
            "[[plugin]]\nname = \"old\"\npath = \"old.wasm\"\ngrants = [\"kv\"]\n[plugin.config]\n\
             data = { add_header = [\"X-Old\", \"1\"] }\nroute = { route = \"mx\", arg = \"mx.old.test\" }\n",
        )
        .await?;
    let (mut c, _) = relay.client().await?;
    let r = c.send("a@b.test", &["c@local.test"], MESSAGE).await?;
    assert_eq!(r.code, 250, "{r:?}");
    let (_, message) = relay.spooled(&queue_id(&r).expect("queue id"))?;
    assert!(message.contains("\r\nX-Old: 1\r\n"), "{message}");
    use postern::envelope::{Address, Envelope, MailParams, Recipient};
    use postern::policy::{Queued, Route, RouteQuery};
    let envelope = Envelope::new(Address("a@b.test".into()), MailParams::default());
    let id = postern::queue::QueueId::generate();
    let metadata = Arc::default();
    let route = relay
        .handle
        .current()
        .lease()
        .route(RouteQuery {
            queued: Queued {
                id: &id,
                envelope: &envelope,
                client: None,
                metadata: &metadata,
            },
            recipient: &Recipient::new("c@local.test"),
            headers: b"Subject: x\r\n\r\n",
        })
        .await;
    assert_eq!(route, Route::Mx("mx.old.test".into()).into());
    // `plugin check` says which world it fits.
    let out = postern(
        relay.dir.path(),
        &["plugin", "check", fixture.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fits postern:relay/plugin@0.1.0"), "{text}");
    Ok(())
}

/// A spool written before metadata existed (record and delivery state of
/// the format before) loads, flushes and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_written_before_metadata_delivers() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spool-0.1/queue");
    let queue = dir.path().join("spool/queue");
    std::fs::create_dir_all(&queue).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, queue.join(path.file_name().unwrap())).unwrap();
    }
    // The fixture's next attempt was an hour after it was written: move it
    // an hour past now, so the message is still deferred when it is shown.
    let state_path = queue.join("661908E366D030000.state");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    state["next_attempt"] = (now + 3600).into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let port = free_port();
    // The fixture is dated: a long max_age keeps it from expiring.
    let config = base_config(port, "").replace(
        NO_DELIVERY,
        &format!(
            "[delivery]\nsmarthost = \"smtp://{}\"\nmax_age = \"3650d\"\n",
            sink.addr
        ),
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let shown = postern(
        dir.path(),
        &[
            "queue",
            "show",
            "661908E366D030000",
            "--json",
            "--config",
            "postern.toml",
        ],
    );
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON");
    // Deferred once by the relay that wrote it.
    assert_eq!(shown["attempts"], 1, "{shown}");
    assert!(
        shown["last_reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("451 4.4.1 connect to 127.0.0.1:9")),
        "{shown}"
    );
    assert_eq!(shown["record"]["envelope"]["sender"], "old@origin.test");
    assert_eq!(shown["record"]["metadata"], serde_json::json!({}));
    let out = postern(dir.path(), &["queue", "flush", "--config", "postern.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].rcpts, ["rcpt@dest.test"]);
    assert!(String::from_utf8_lossy(&got[0].data).contains("written before metadata existed"));
    assert!(eventually(Duration::from_secs(10), || relay
        .spooled()
        .is_empty()
        .then_some(()))
    .await
    .is_some());
}

/// `postern plugin test` replays a folder of messages (one with a record
/// beside it) through every hook the plugin handles, and with --against
/// prints only the transactions where the versions differ.
#[test]
fn plugin_test_replays_a_folder_against_an_older_version() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        kit::wasm_dir().join("blocklist.wasm"),
        plugins.join("blocklist.wasm"),
    )
    .unwrap();
    std::fs::copy(
        kit::wasm_dir().join("blocklist.wasm"),
        plugins.join("blocklist-old.wasm"),
    )
    .unwrap();
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        base_config(
            free_port(),
            "[[plugin]]\nname = \"blocklist\"\npath = \"blocklist.wasm\"\n[plugin.config]\ndomains = [\"a.test\", \"b.test\"]\n\
             [[plugin]]\nname = \"old\"\npath = \"blocklist-old.wasm\"\n[plugin.config]\ndomains = [\"a.test\"]\n",
        ),
    )
    .unwrap();
    let messages = dir.path().join("messages");
    std::fs::create_dir_all(&messages).unwrap();
    let eml = |name: &str, to: &str| {
        std::fs::write(
            messages.join(name),
            format!("From: s@sender.test\nTo: {to}\nSubject: {name}\n\nhello\n"),
        )
        .unwrap()
    };
    eml("1-a.eml", "x@a.test");
    eml("2-b.eml", "x@b.test");
    eml("3-c.eml", "x@c.test");
    // The record's envelope, not the To field, says where 4 goes.
    eml("4-record.eml", "x@c.test");
    std::fs::write(
        messages.join("4-record.json"),
        r#"{"client": {"peer": "192.0.2.7:41234", "local": "192.0.2.1:25", "helo": "mail.example.org",
            "tls": null, "auth_user": null, "may_relay": false},
            "envelope": {"sender": "s@sender.test", "recipients": [{"address": "y@b.test"}]},
            "metadata": {}}"#,
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "plugin",
            "test",
            "plugins/blocklist.wasm",
            "--config",
            "postern.toml",
            "--messages",
            "messages",
        ];
        args.extend_from_slice(extra);
        postern(dir.path(), &args)
    };
    let out = run(&[]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(rows[0], ["message", "mail_from", "rcpt"], "{table}");
    assert_eq!(rows[1][0], "1-a.eml");
    assert!(rows[1][2].starts_with("reject 550 5.7.1"), "{table}");
    assert!(rows[2][2].starts_with("reject 550 5.7.1"), "{table}");
    assert_eq!(rows[3][1..], ["continue", "continue"], "{table}");
    assert!(rows[4][2].starts_with("reject 550 5.7.1"), "{table}");

    let out = run(&["--against", "plugins/blocklist-old.wasm"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{table}");
    let labels: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split("  ").next())
        .collect();
    assert_eq!(
        labels,
        [
            "2-b.eml (new)",
            "2-b.eml (old)",
            "4-record.eml (new)",
            "4-record.eml (old)",
            "2 of 4 transaction(s) answered differently"
        ],
        "{table}"
    );
}

/// `postern check` warns about the old name `warm`.
#[test]
fn check_warns_about_warm_instances() {
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        base_config(
            free_port(),
            "[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\ninstances = \"warm\"\n",
        ),
    )
    .unwrap();
    let out = postern(dir.path(), &["check", "--config", "postern.toml"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning:")
            && stderr.contains("plugin[0].instances = \"warm\" is the old name of \"transaction\""),
        "{stderr}"
    );
}
