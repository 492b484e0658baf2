//! The plugin tools of the real `postern` binary: `plugin check`, `plugin
//! test`, `plugin new` and `plugin list`, and a SIGHUP that reloads the chain
//! of a running relay.

// The plugin build helper, included as `plugins.rs` includes it; only its
// build and target folder are used here.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "support/plugins.rs"]
mod plugin_build;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::relay::{base_config, free_port, Relay};
use crate::support::smtp::Raw;

/// The blocklist plugin, built for wasm32-wasip2.
fn blocklist_wasm() -> PathBuf {
    plugin_build::wasm_dir().join("blocklist.wasm")
}

/// Runs `postern` with these arguments in `dir`, without a config from the
/// environment.
fn postern(dir: &Path, args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .current_dir(dir)
        .env_remove("POSTERN_CONFIG")
        .env_remove("POSTERN_SDK")
        .output()
        .expect("running postern")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `[plugins]` and a blocklist entry refusing recipients in `domains`; the
/// plugin cache is shared with the other plugin tests.
fn blocklist_config(domains: &str) -> String {
    let cache = plugin_build::target_dir().join("postern-test-plugin-cache");
    format!(
        "[plugins]\ndir = \"plugins\"\ncache_dir = {cache:?}\nwatch = false\n\
         [[plugin]]\nname = \"blocklist\"\npath = \"blocklist.wasm\"\n\
         [plugin.config]\ndomains = [{domains}]\n"
    )
}

/// A good plugin fits: the command succeeds and names its hooks and grants.
/// Asserts the command succeeded (showing what it printed if not) and returns
/// its standard output.
fn succeeded(out: &std::process::Output) -> String {
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        text(&out.stderr)
    );
    stdout
}

#[test]
fn check_accepts_a_plugin_and_names_hooks_and_grants() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = blocklist_wasm();
    let out = postern(
        dir.path(),
        &["plugin".as_ref(), "check".as_ref(), wasm.as_os_str()],
    );
    let stdout = succeeded(&out);
    assert!(
        stdout.contains("fits postern:relay/plugin@0.2.0"),
        "{stdout}"
    );
    let line = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {key} line in:\n{stdout}"))
    };
    assert_eq!(line("hooks:"), "mail_from, rcpt");
    assert_eq!(line("grants:"), "none");
    assert_eq!(line("sha256:").len(), 64, "{stdout}");
}

/// Bytes that are no component: the command fails and says so.
#[test]
fn check_refuses_a_file_that_is_not_a_component() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, [0x0f, 0x64, 0xb8, 0x9b, 1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let out = postern(
        dir.path(),
        &["plugin".as_ref(), "check".as_ref(), junk.as_os_str()],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "check accepted junk: {stderr}");
    assert!(
        stderr.contains("junk.wasm: not a valid component"),
        "{stderr}"
    );
    assert!(!text(&out.stdout).contains("fits"), "{}", text(&out.stdout));
}

/// The router cannot start without its routes. Alone, check still says it
/// fits and why its hooks are unknown; with the relay config, the entry's
/// config decides, and a config the plugin refuses fails the check.
#[test]
fn check_runs_init_with_the_entry_config_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = plugin_build::wasm_dir().join("router.wasm");
    let check = |config: Option<&Path>| {
        let mut args = vec!["plugin".as_ref(), "check".as_ref(), wasm.as_os_str()];
        if let Some(c) = config {
            args.extend(["--config".as_ref(), c.as_os_str()]);
        }
        postern(dir.path(), &args)
    };

    let alone = succeeded(&check(None));
    assert!(alone.contains("fits postern:relay/plugin@0.2.0"), "{alone}");
    assert!(
        alone.contains(
            "hooks:  unknown: init refused to run without its config (give `rules` (or `routes`)"
        ),
        "{alone}"
    );

    let config = dir.path().join("postern.toml");
    let entry = |routes: &str| {
        base_config(
            free_port(),
            &format!(
                "[plugins]\ndir = \"plugins\"\nwatch = false\n\
                 [[plugin]]\nname = \"router\"\npath = \"router.wasm\"\n\
                 [plugin.config.routes]\n{routes}\n"
            ),
        )
    };
    std::fs::write(&config, entry("\"b.test\" = \"discard\"")).unwrap();
    let configured = succeeded(&check(Some(&config)));
    assert!(configured.contains("hooks:  route\n"), "{configured}");

    std::fs::write(&config, entry("\"b.test\" = \"teleport\"")).unwrap();
    let out = check(Some(&config));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        stderr.contains(
            "plugin router: init refused its config: routes.b.test: unknown target \"teleport\""
        ),
        "{stderr}"
    );
}

/// check with the relay config compiles into the relay's cache, so the relay
/// later loads the file without compiling it; a cache folder the relay has
/// not made is left alone (made by the checking user, the relay would refuse
/// it).
#[test]
fn check_with_the_relay_config_fills_the_relay_cache() {
    use std::os::unix::fs::DirBuilderExt;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let cache = dir.path().join("cache");
    let shared_cache = plugin_build::target_dir().join("postern-test-plugin-cache");
    let port = free_port();
    let text = base_config(
        port,
        &blocklist_config("\"a.test\"").replace(
            &format!("cache_dir = {shared_cache:?}"),
            &format!("cache_dir = {cache:?}"),
        ),
    );
    let config = dir.path().join("postern.toml");
    std::fs::write(&config, &text).unwrap();
    let staged = dir.path().join("staged/blocklist.wasm");
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    std::fs::copy(blocklist_wasm(), &staged).unwrap();
    let check = || {
        succeeded(&postern(
            dir.path(),
            &[
                "plugin".as_ref(),
                "check".as_ref(),
                "--config".as_ref(),
                config.as_os_str(),
                staged.as_os_str(),
            ],
        ))
    };

    check();
    assert!(!cache.exists(), "check made the relay's cache folder");

    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&cache)
        .unwrap();
    let out = check();
    let hash = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("sha256: "))
        .unwrap_or_else(|| panic!("no sha256 line: {out}"))
        .to_string();
    let cached: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(
        cached[0].starts_with(&hash) && cached[0].ends_with(".cwasm"),
        "{cached:?}"
    );

    // The relay with this config loads the plugin from there: nothing to compile.
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(&staged, dir.path().join("plugins/blocklist.wasm")).unwrap();
    let relay = Relay::start_in(dir.clone(), port, &text);
    assert_eq!(rcpt_codes(&relay, &["x@a.test"]), ["550"]);
    assert!(!relay.log().contains("plugin compiled"), "{}", relay.log());
}

/// With the relay config's `[[plugin]]` entry, a recipient in a blocked
/// domain is refused and one outside it goes on.
#[test]
fn test_runs_the_configured_plugin_against_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        base_config(free_port(), &blocklist_config("\"blocked.test\"")),
    )
    .unwrap();
    let message = dir.path().join("message.eml");
    std::fs::write(
        &message,
        "From: a@sender.test\nTo: x@blocked.test\nSubject: hello\n\nhi\n",
    )
    .unwrap();
    let wasm = blocklist_wasm();
    let out = postern(
        dir.path(),
        &[
            "plugin".as_ref(),
            "test".as_ref(),
            wasm.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
            "--message".as_ref(),
            message.as_os_str(),
            "--from".as_ref(),
            "a@sender.test".as_ref(),
            "--to".as_ref(),
            "x@blocked.test".as_ref(),
            "--to".as_ref(),
            "y@fine.test".as_ref(),
        ],
    );
    let stdout = succeeded(&out);
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}"))
            .to_string()
    };
    let blocked = line("rcpt x@blocked.test:");
    assert!(
        blocked.contains("reject") && blocked.contains("550"),
        "{stdout}"
    );
    assert!(blocked.contains("recipient domain is blocked"), "{stdout}");
    assert_eq!(line("rcpt y@fine.test:"), "rcpt y@fine.test: continue");
    assert_eq!(line("mail_from:"), "mail_from: continue");
    assert_eq!(line("  recipients:"), "  recipients: y@fine.test");
}

/// `plugin new` writes a crate against the SDK this binary came with; it is
/// not built here.
#[test]
fn new_creates_a_crate_against_this_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let out = postern(
        dir.path(),
        &["plugin".as_ref(), "new".as_ref(), "my-filter".as_ref()],
    );
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let krate = dir.path().join("my-filter");
    let manifest = std::fs::read_to_string(krate.join("Cargo.toml")).expect("Cargo.toml");
    let lib = std::fs::read_to_string(krate.join("src/lib.rs")).expect("src/lib.rs");

    let manifest: toml::Table = toml::from_str(&manifest).expect("Cargo.toml is TOML");
    assert_eq!(
        manifest["package"]["name"].as_str(),
        Some("my-filter"),
        "{manifest}"
    );
    assert_eq!(
        manifest["lib"]["crate-type"].as_array().map(|a| a.len()),
        Some(1),
        "{manifest}"
    );
    assert_eq!(manifest["lib"]["crate-type"][0].as_str(), Some("cdylib"));
    let sdk = manifest["dependencies"]["postern-sdk"]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("no postern-sdk path in {manifest}"));
    let sdk = Path::new(sdk);
    assert!(sdk.is_absolute(), "{}", sdk.display());
    let ours = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sdk")
        .canonicalize()
        .unwrap();
    assert_eq!(sdk.canonicalize().expect("the SDK path exists"), ours);
    let sdk_manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(sdk.join("Cargo.toml")).unwrap()).unwrap();
    assert_eq!(
        sdk_manifest["package"]["name"].as_str(),
        Some("postern-sdk")
    );

    assert!(lib.contains("use postern_sdk::prelude::*;"), "{lib}");
    assert!(lib.contains("impl Plugin for MyFilter"), "{lib}");
    assert!(lib.contains("postern_sdk::export!(MyFilter);"), "{lib}");
}

/// `postern plugin list` asks a running relay for its chain: name, hash,
/// hooks, load time, and per hook the calls, answers, errors and latency.
#[test]
fn list_shows_the_running_chain_and_its_counts() {
    let (dir, _, relay) = blocklist_relay();
    assert_eq!(
        rcpt_codes(&relay, &["x@a.test", "x@b.test", "y@b.test"]),
        ["550", "250", "250"]
    );
    let listed = plugin_list(dir.path());
    let header = listed.lines().next().unwrap_or_default();
    assert!(header.starts_with("blocklist  sha256:"), "{listed}");
    assert!(header.contains("hooks: mail_from,rcpt"), "{listed}");
    assert!(header.contains("instances: per-call"), "{listed}");
    assert!(header.contains("world: 0.2.0"), "{listed}");
    // Loaded today, shown as an RFC 3339 time.
    let year = mail_parser::DateTime::from_timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    )
    .year;
    assert!(header.contains(&format!("loaded: {year}-")), "{listed}");
    let rcpt = listed
        .lines()
        .find(|l| l.trim_start().starts_with("rcpt "))
        .unwrap_or_else(|| panic!("no rcpt line: {listed}"));
    assert!(rcpt.contains("calls        3"), "{rcpt}");
    assert!(rcpt.contains("answers: continue 2, reject 1"), "{rcpt}");
    assert!(rcpt.contains("errors: none"), "{rcpt}");
    assert!(rcpt.contains("p99 <"), "{rcpt}");
}

/// The real binary serving a chain of the blocklist, which refuses `a.test`;
/// returns its folder, port and process.
fn blocklist_relay() -> (Arc<tempfile::TempDir>, u16, Relay) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(blocklist_wasm(), plugins.join("blocklist.wasm")).unwrap();
    let port = free_port();
    let relay = Relay::start_in(
        dir.clone(),
        port,
        &base_config(port, &blocklist_config("\"a.test\"")),
    );
    (dir, port, relay)
}

/// Opens a new session and returns the RCPT reply codes for `rcpts`.
fn rcpt_codes(relay: &Relay, rcpts: &[&str]) -> Vec<String> {
    let mut c = Raw::connect(relay.addr());
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.cmd("MAIL FROM:<a@sender.test>");
    assert!(r.starts_with("250"), "{r}");
    let codes = rcpts
        .iter()
        .map(|t| {
            let r = c.cmd(&format!("RCPT TO:<{t}>"));
            r.get(..3).unwrap_or(&r).to_string()
        })
        .collect();
    c.cmd("QUIT");
    codes
}

/// SIGHUP re-reads the config and swaps in the chain it describes, with
/// file watching off so the signal is the only trigger.
#[test]
fn sighup_reloads_the_chain() {
    let (dir, port, relay) = blocklist_relay();
    assert_eq!(
        rcpt_codes(&relay, &["x@a.test", "x@b.test"]),
        ["550", "250"],
        "{}",
        relay.log()
    );

    let config = dir.path().join("postern.toml");
    std::fs::write(&config, base_config(port, &blocklist_config("\"b.test\""))).unwrap();
    // Without the signal, nothing changes.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rcpt_codes(&relay, &["x@a.test", "x@b.test"]),
        ["550", "250"],
        "reloaded without SIGHUP; log:\n{}",
        relay.log()
    );

    relay.signal(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let codes = rcpt_codes(&relay, &["x@b.test", "x@a.test"]);
        if codes == ["550", "250"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "chain not reloaded after SIGHUP (last codes {codes:?}); log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        relay.log().contains("plugin chain reloaded"),
        "{}",
        relay.log()
    );
}

/// A `.wasm` written in pieces, with a pause while its writer still has it
/// open, is loaded once, when complete: no attempt is made on the half file
/// (which would fail and log an error), and the new file then serves.
#[test]
fn a_plugin_written_in_pieces_is_loaded_once_complete() {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicU32, Ordering};
    static ROUND: AtomicU32 = AtomicU32::new(0);

    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(blocklist_wasm(), dir.path().join("plugins/blocklist.wasm")).unwrap();
    let port = free_port();
    let config = blocklist_config("\"a.test\"").replace("watch = false", "watch = true");
    let relay = Relay::start_in(dir.clone(), port, &base_config(port, &config));

    // The same plugin with a custom section at the end: new to the relay.
    let mut wasm = std::fs::read(blocklist_wasm()).unwrap();
    let tag = format!("test {}", ROUND.fetch_add(1, Ordering::Relaxed));
    wasm.extend_from_slice(&[0, tag.len() as u8 + 5, 4]);
    wasm.extend_from_slice(b"test");
    wasm.extend_from_slice(tag.as_bytes());
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&wasm));

    let mut file = std::fs::File::create(dir.path().join("plugins/blocklist.wasm")).unwrap();
    let (first, rest) = wasm.split_at(wasm.len() / 2);
    file.write_all(first).unwrap();
    file.flush().unwrap();
    // Longer than the settle after a close, shorter than the debounce for a
    // file still open.
    std::thread::sleep(Duration::from_millis(100));
    file.write_all(rest).unwrap();
    drop(file);

    wait_for_log(&relay, "plugin chain reloaded", 1);
    std::thread::sleep(Duration::from_millis(300));
    let log = relay.log();
    assert_eq!(log.matches("plugin chain reloaded").count(), 1, "{log}");
    assert!(!log.contains("not reloaded"), "{log}");
    let listed = plugin_list(dir.path());
    assert!(listed.contains(&digest[..16]), "{digest}\n{listed}");
    assert_eq!(
        rcpt_codes(&relay, &["x@a.test", "x@b.test"]),
        ["550", "250"]
    );
}

/// What `postern plugin list` prints for the relay configured in `dir`.
fn plugin_list(dir: &Path) -> String {
    let config = dir.join("postern.toml");
    succeeded(&postern(
        dir,
        &[
            "plugin".as_ref(),
            "list".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    ))
}

/// Waits until the relay's log holds `needle` `times` times.
fn wait_for_log(relay: &Relay, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay.log().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "waiting for {times} x {needle:?}; log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
