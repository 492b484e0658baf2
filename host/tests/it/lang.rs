//! Plugins written in Python and JavaScript with the SDKs (`sdk/python`,
//! `sdk/js`), end to end: the example plugins built by their own build
//! scripts, loaded into a running relay next to a Rust plugin, mail sent with
//! Python's smtplib; the grants of a plugin whose toolchain imports every
//! interface; and `postern plugin check` and `plugin test` on them.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

// The Rust plugins' build helper, included as `plugins.rs` includes it.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "support/plugins.rs"]
mod plugin_build;

use crate::support::lang::{js_hoard, js_tagger, python_tagger, repo, shared_cache};
use crate::support::redis::RedisServer;
use crate::support::relay::{base_config, config_with, free_port, Relay};
use crate::support::sink::{Behavior, Options, Sink};

/// The Rust blocklist plugin, built for wasm32-wasip2.
fn blocklist_wasm() -> std::path::PathBuf {
    plugin_build::wasm_dir().join("blocklist.wasm")
}

/// `[plugins]` for a relay in `dir`, with `files` copied into `dir/plugins`
/// and the tests' shared compiled cache.
fn plugins_section(dir: &Path, files: &[&Path]) -> String {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for file in files {
        std::fs::copy(file, plugins.join(file.file_name().unwrap())).unwrap();
    }
    format!(
        "[plugins]\ndir = \"plugins\"\ncache_dir = {:?}\nwatch = false\n",
        shared_cache()
    )
}

/// One message for the smtplib client.
fn message(from: &str, to: &str, subject: &str) -> serde_json::Value {
    serde_json::json!({ "from": from, "to": [to], "subject": subject })
}

/// Sends `messages` with Python's smtplib (one connection each) and returns
/// each one's final answer, `(code, text)`.
async fn smtplib(port: u16, messages: Vec<serde_json::Value>) -> Vec<(u16, String)> {
    smtplib_with(port, messages, false).await
}

/// [`smtplib`], all messages over one connection when `one_connection`.
async fn smtplib_with(
    port: u16,
    messages: Vec<serde_json::Value>,
    one_connection: bool,
) -> Vec<(u16, String)> {
    tokio::task::spawn_blocking(move || {
        let script = repo().join("host/tests/fixtures/clients/smtplib_send.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .args(one_connection.then_some("--one-connection"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running python3");
        serde_json::to_writer(child.stdin.take().unwrap(), &messages).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "smtplib client failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        answers
            .iter()
            .map(|a| {
                (
                    a["code"].as_u64().unwrap() as u16,
                    a["text"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    })
    .await
    .unwrap()
}

/// The queue id in a `250 ... queued as ID` answer's text.
fn queued_as(text: &str) -> &str {
    text.rsplit(' ').next().unwrap_or_default()
}

/// The header section of captured message data.
fn headers(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    text.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The Python and the JavaScript tagger run in one chain after the Rust
/// blocklist: each tags the mail its rules match with a header, counts it
/// per class in the kv store (Redis here), refuses what a rule says to
/// refuse, and at delivery routes by the class it left in the message's
/// metadata, each class to its own sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_js_plugins_tag_count_and_route_beside_a_rust_plugin() {
    let (py, js) = (python_tagger(), js_tagger());
    let redis = RedisServer::start();
    let newsletters = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let invoices = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let extra = format!(
        "{plugins}[kv]\nbackend = \"redis\"\nredis_url = {redis_url:?}\n\
         [[plugin]]\nname = \"blocklist\"\npath = \"blocklist.wasm\"\n\
         [plugin.config]\ndomains = [\"blocked.test\"]\n\
         [[plugin]]\nname = \"tagger-py\"\npath = \"tagger-py.wasm\"\ngrants = [\"kv\", \"log\"]\n\
         [plugin.config]\n\
         [[plugin.config.rules]]\nclass = \"newsletter\"\nsubject = [\"newsletter\"]\n\
         [[plugin.config.rules]]\nclass = \"junk\"\nsubject = [\"lottery\"]\nreject = true\n\
         [plugin.config.routes]\nnewsletter = \"smtp://{newsletters}\"\n\
         [[plugin]]\nname = \"tagger-js\"\npath = \"tagger-js.wasm\"\ngrants = [\"kv\", \"log\"]\n\
         [plugin.config]\nheader = \"X-Js-Class\"\n\
         [[plugin.config.rules]]\nclass = \"invoice\"\nsenders = [\"@billing.test\"]\n\
         [[plugin.config.rules]]\nclass = \"casino\"\nsubject = [\"casino\"]\nreject = true\n\
         [plugin.config.routes]\ninvoice = \"smtp://{invoices}\"\n",
        plugins = plugins_section(dir.path(), &[&blocklist_wasm(), py, js]),
        redis_url = redis.url(),
        newsletters = newsletters.addr,
        invoices = invoices.addr,
    );
    let relay = Relay::start_in(dir.clone(), port, &base_config(port, &extra));
    // Both were compiled into the shared cache before: the relay loaded
    // them from it, as after a restart.
    let log = relay.log();
    for file in [py, js] {
        let hash = hex::encode(Sha256::digest(std::fs::read(file).unwrap()));
        assert!(
            !log.lines()
                .any(|l| l.contains("plugin compiled") && l.contains(&hash[..12])),
            "{} was compiled again:\n{log}",
            file.display()
        );
    }

    let answers = smtplib(
        port,
        vec![
            message("a@sender.test", "c@dest.test", "Our newsletter, May"),
            message("accounts@mail.billing.test", "c@dest.test", "Invoice 42"),
            message("a@sender.test", "c@dest.test", "Lottery winner"),
            message("a@sender.test", "c@dest.test", "Casino night"),
            message("a@sender.test", "x@blocked.test", "Our newsletter, June"),
            message("a@sender.test", "c@dest.test", "Hello"),
        ],
    )
    .await;
    let codes: Vec<u16> = answers.iter().map(|(c, _)| *c).collect();
    assert_eq!(codes, [250, 250, 550, 550, 550, 250], "{answers:?}");
    assert!(
        answers[2].1.contains("5.7.1 message refused as junk"),
        "{answers:?}"
    );
    assert!(
        answers[3].1.contains("5.7.1 message refused as casino"),
        "{answers:?}"
    );
    assert!(
        answers[4].1.contains("recipient domain is blocked"),
        "{answers:?}"
    );

    // Each tagged message went where its class routes it, with its header.
    let news = newsletters.wait_for(1, Duration::from_secs(20)).await;
    let bills = invoices.wait_for(1, Duration::from_secs(20)).await;
    let (news, bills) = (headers(&news[0].data), headers(&bills[0].data));
    assert!(
        news.lines().any(|l| l == "X-Postern-Class: newsletter"),
        "{news}"
    );
    assert!(news.contains("Subject: Our newsletter, May"), "{news}");
    assert!(!news.contains("X-Js-Class"), "{news}");
    assert!(bills.contains("X-Js-Class: invoice"), "{bills}");
    assert!(!bills.contains("X-Postern-Class"), "{bills}");
    assert_eq!(newsletters.messages().len(), 1);
    assert_eq!(invoices.messages().len(), 1);

    // The untagged message went the default way (a dead smart host): it
    // waits in the spool, and no tagger left a class in its metadata.
    let hello = queued_as(&answers[5].1);
    let spooled = relay.spooled();
    let record = spooled
        .iter()
        .find(|s| s.id == hello)
        .unwrap_or_else(|| panic!("{hello} not in the spool: {spooled:?}"));
    assert!(
        record.meta["metadata"].get("tagger-py").is_none(),
        "{}",
        record.meta
    );
    assert!(
        record.meta["metadata"].get("tagger-js").is_none(),
        "{}",
        record.meta
    );

    // Counted per class, in each plugin's own key space.
    for (key, count) in [
        ("postern:tagger-py:class:newsletter", "1"),
        ("postern:tagger-py:class:junk", "1"),
        ("postern:tagger-js:class:invoice", "1"),
        ("postern:tagger-js:class:casino", "1"),
    ] {
        assert_eq!(
            redis.get(key).as_deref(),
            Some(count),
            "{key}: {:?}",
            redis.keys()
        );
    }
    assert_eq!(redis.keys().len(), 4, "{:?}", redis.keys());
}

/// A Python plugin granted only `log` loads (its component imports kv and
/// dns too) and works; when it calls kv, the call ends the hook with the
/// plugin's `on_error` answer and the log names the interface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_granted_only_log_loads_and_an_ungranted_call_gets_on_error() {
    let py = python_tagger();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let extra = format!(
        "{}[[plugin]]\nname = \"tagger-py\"\npath = \"tagger-py.wasm\"\ngrants = [\"log\"]\n\
         on_error = \"reject\"\n[plugin.config]\n\
         [[plugin.config.rules]]\nclass = \"newsletter\"\nsubject = [\"newsletter\"]\n",
        plugins_section(dir.path(), &[py])
    );
    let relay = Relay::start_in(dir.clone(), port, &base_config(port, &extra));
    let answers = smtplib(
        port,
        vec![
            message("a@sender.test", "c@dest.test", "Hello"),
            message("a@sender.test", "c@dest.test", "Our newsletter"),
        ],
    )
    .await;
    assert_eq!(answers[0].0, 250, "{answers:?}");
    assert_eq!(answers[1].0, 550, "{answers:?}");
    assert!(
        answers[1].1.contains("5.7.1 Rejected by policy"),
        "{answers:?}"
    );
    let log = relay.log();
    // It logged (granted) before it counted (not granted).
    assert!(log.contains("from <a@sender.test>: newsletter"), "{log}");
    let failed = log
        .lines()
        .find(|l| l.contains("plugin failed"))
        .unwrap_or_else(|| panic!("no failure logged:\n{log}"));
    assert!(
        failed.contains("called postern:relay/kv@0.2.0 `incr`, which it was not granted (add \"kv\" to its grants)"),
        "{failed}"
    );
    assert_eq!(log.matches("plugin failed").count(), 1, "{log}");
}

/// `postern plugin check` and `plugin test` take the Python and the
/// JavaScript plugin as they take a Rust one: the world it fits, its hooks,
/// what it may be granted, and its answers to a folder of messages.
#[test]
fn check_and_test_work_on_python_and_js_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let messages = dir.path().join("messages");
    std::fs::create_dir_all(&messages).unwrap();
    for (name, from, subject) in [
        ("junk", "a@sender.test", "Lottery win"),
        ("list", "x@lists.example.com", "Hello"),
        ("news", "a@sender.test", "Weekly NEWSLETTER"),
        ("plain", "a@sender.test", "Hello"),
    ] {
        std::fs::write(
            messages.join(format!("{name}.eml")),
            format!("From: {from}\nTo: c@dest.test\nSubject: {subject}\n\nhi\n"),
        )
        .unwrap();
    }
    for (file, name) in [(python_tagger(), "tagger-py"), (js_tagger(), "tagger-js")] {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n\
                 [plugins]\ncache_dir = {:?}\n\
                 [[plugin]]\nname = \"{name}\"\npath = \"{name}.wasm\"\ngrants = [\"kv\", \"log\"]\n\
                 [plugin.config]\n\
                 [[plugin.config.rules]]\nclass = \"newsletter\"\nsubject = [\"newsletter\"]\nsenders = [\"@example.com\"]\n\
                 [[plugin.config.rules]]\nclass = \"junk\"\nsubject = [\"lottery\"]\nreject = true\n\
                 [plugin.config.routes]\nnewsletter = \"local:bulk\"\n",
                shared_cache()
            ),
        )
        .unwrap();
        let run = |args: &[&std::ffi::OsStr]| {
            let out = Command::new(env!("CARGO_BIN_EXE_postern"))
                .args(args)
                .current_dir(dir.path())
                .env_remove("POSTERN_CONFIG")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{name}: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        };
        let check = run(&[
            "plugin".as_ref(),
            "check".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            file.as_os_str(),
        ]);
        assert!(
            check.contains("fits postern:relay/plugin@0.2.0"),
            "{name}: {check}"
        );
        assert!(check.contains("  hooks:  data, route\n"), "{name}: {check}");
        assert!(
            check.contains("  grants: any of log, kv, dns ("),
            "{name}: {check}"
        );

        let test = run(&[
            "plugin".as_ref(),
            "test".as_ref(),
            file.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
            "--messages".as_ref(),
            messages.as_os_str(),
        ]);
        let row = |message: &str| {
            let line = test
                .lines()
                .find(|l| l.starts_with(message))
                .unwrap_or_else(|| panic!("{name}: no row for {message}:\n{test}"));
            line.split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            row("junk.eml"),
            "reject 550 5.7.1 message refused as junk -",
            "{name}"
        );
        assert_eq!(row("list.eml"), "continue local-folder bulk", "{name}");
        assert_eq!(row("news.eml"), "continue local-folder bulk", "{name}");
        assert_eq!(row("plain.eml"), "continue default", "{name}");
    }
}

/// A JavaScript plugin whose memory grows with every call (the fixture
/// `hoard.js` keeps each Subject in its instance), with retirement after N
/// uses turned off and a 16 MiB cap: its instances pass the high-water mark
/// (three quarters of the cap) and are retired between calls, so every
/// message gets through, no client gets the `on_error` answer, and the
/// relay says it retired them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_plugin_is_retired_at_its_memory_high_water_mark_before_it_fails() {
    // 4 KiB or more a call: an instance passes 12 MiB within a hundred calls.
    const MESSAGES: usize = 400;
    let hoard = js_hoard();
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let extra = format!(
        "{}[[plugin]]\nname = \"hoard\"\npath = \"hoard-js.wasm\"\n\
         memory_mb = 16\nretire_after_uses = 0\non_error = \"reject\"\n",
        plugins_section(dir.path(), &[hoard])
    );
    let delivery = format!("[delivery]\nsmarthost = \"smtp://{}\"\n", sink.addr);
    let relay = Relay::start_in(dir.clone(), port, &config_with(port, &delivery, &extra));
    let subject = "x".repeat(4000);
    let messages = (0..MESSAGES)
        .map(|_| message("a@sender.test", "c@dest.test", &subject))
        .collect();
    let answers = smtplib_with(port, messages, true).await;
    let refused: Vec<_> = answers.iter().filter(|(c, _)| *c != 250).collect();
    assert!(
        refused.is_empty(),
        "{} refused: {:?}",
        refused.len(),
        refused.first()
    );
    assert_eq!(answers.len(), MESSAGES);

    let log = relay.log();
    assert!(!log.contains("plugin failed"), "{log}");
    let retired: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("plugin instance retired at its memory high-water mark"))
        .collect();
    assert!(!retired.is_empty(), "no instance was retired:\n{log}");
    assert!(retired[0].contains("cap_mb=16"), "{}", retired[0]);
    let status = plugin_status(dir.path());
    let hoard = &status[0];
    let data = hoard["stats"]
        .as_array()
        .and_then(|hooks| hooks.iter().find(|h| h["hook"] == "data"))
        .unwrap_or_else(|| panic!("no data stats: {hoard}"));
    assert_eq!(data["calls"], MESSAGES as u64, "{hoard}");
    assert_eq!(data["errors"], serde_json::json!([]), "{hoard}");
    let memory = hoard["retired"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r[0] == "memory"))
        .and_then(|r| r[1].as_u64())
        .unwrap_or(0);
    assert_eq!(memory as usize, retired.len(), "{hoard}");

    // Each instance started over: the count it tags messages with fell
    // back to 1 once per retirement (and at the start).
    let delivered = sink.wait_for(MESSAGES, Duration::from_secs(60)).await;
    let counts: Vec<u64> = delivered
        .iter()
        .map(|m| {
            let h = headers(&m.data);
            h.lines()
                .find_map(|l| l.strip_prefix("X-Hoard: "))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no X-Hoard count in {h}"))
        })
        .collect();
    let restarts = counts.iter().filter(|n| **n == 1).count();
    assert_eq!(restarts, retired.len() + 1, "{counts:?}");
}

/// The chain's status from the relay's control socket, as `postern plugin
/// list` reads it.
fn plugin_status(dir: &Path) -> Vec<serde_json::Value> {
    use std::io::Read as _;
    let mut conn = std::os::unix::net::UnixStream::connect(dir.join("spool/plugins.sock"))
        .expect("the control socket");
    let mut body = Vec::new();
    conn.read_to_end(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// `postern plugin new --lang python|js` makes a plugin that builds with
/// the one command its README gives, and does what the Rust template does:
/// refuse recipients of the domains in its config.
#[test]
fn new_python_and_js_plugins_build_as_scaffolded_and_refuse_listed_domains() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.eml"),
        "From: a@sender.test\nTo: x@blocked.example\nSubject: hi\n\nhi\n",
    )
    .unwrap();
    let run = |cwd: &Path, program: &str, args: &[&str]| {
        let out = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .env_remove("POSTERN_CONFIG")
            .env_remove("POSTERN_SDK")
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let postern = env!("CARGO_BIN_EXE_postern");
    for (lang, name, source) in [
        ("python", "py-filter", "py_filter.py"),
        ("js", "js-filter", "js_filter.js"),
    ] {
        let created = run(
            dir.path(),
            postern,
            &["plugin", "new", name, "--lang", lang],
        );
        let folder = dir.path().join(name);
        assert!(folder.join(source).is_file(), "{created}");
        let readme = std::fs::read_to_string(folder.join("README.md")).unwrap();
        // The one command, as the README and the command's output give it.
        let build = readme
            .lines()
            .find_map(|l| l.strip_prefix("    ").filter(|c| c.contains(source)))
            .unwrap_or_else(|| panic!("no build command in:\n{readme}"))
            .to_string();
        assert!(created.contains(&build), "{created}");
        let words: Vec<&str> = build.split_whitespace().collect();
        run(&folder, words[0], &words[1..]);
        let wasm = folder.join(format!("{}.wasm", name.replace('-', "_")));
        assert!(wasm.is_file(), "{build} made no {}", wasm.display());
        std::fs::write(
            dir.path().join("postern.toml"),
            format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n[plugins]\ncache_dir = {:?}\n\
                 [[plugin]]\nname = \"{name}\"\npath = \"{}\"\n\
                 [plugin.config]\ndomains = [\"blocked.example\"]\n",
                shared_cache(),
                wasm.file_name().unwrap().to_string_lossy()
            ),
        )
        .unwrap();
        let wasm = wasm.to_string_lossy().into_owned();
        let answers = |to: &str| {
            run(
                dir.path(),
                postern,
                &[
                    "plugin",
                    "test",
                    &wasm,
                    "--config",
                    "postern.toml",
                    "--message",
                    "m.eml",
                    "--from",
                    "a@sender.test",
                    "--to",
                    to,
                ],
            )
        };
        let blocked = answers("x@blocked.example");
        assert!(
            blocked
                .lines()
                .any(|l| l.contains("rcpt") && l.contains("550 5.7.1 recipient domain is blocked")),
            "{lang}: {blocked}"
        );
        let open = answers("x@open.example");
        assert!(!open.contains("550"), "{lang}: {open}");
        assert!(
            open.lines()
                .any(|l| l.contains("rcpt") && l.contains("continue")),
            "{lang}: {open}"
        );
    }
}
