//! The Redis backend of the plugins' kv store, against a real `redis-server`
//! on a loopback port: counters land under `<prefix>:<plugin>:<key>`, two
//! relays share them, a counter's TTL is set when it is created and only then,
//! and a Redis that is down, silent or restarted costs plugins an `unavailable`
//! answer, never the relay its service.

// The in-process relay with a plugin chain, included as `plugins.rs` does.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "support/plugins.rs"]
mod plugin_relay;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugin_relay::{Relay, MESSAGE};
use postern::config::{KvBackend, KvConfig};
use postern::plugins::bindings::kv::Error;
use postern::plugins::host::kv::{KvStore, MAX_KEY};

use crate::support::redis::{Proxy, RedisServer};
use crate::support::relay::{base_config, free_port, Relay as Binary};
use crate::support::smtp::send_message;
use crate::support::tls::make_cert;

/// A `[kv]` table on `url` with `prefix`, and the testkit counting each hook
/// as plugin `kit`, with more testkit config in `config`.
pub(crate) fn chain(url: &str, prefix: &str, config: &str) -> String {
    format!(
        "[kv]\nbackend = \"redis\"\nredis_url = {url:?}\nkey_prefix = {prefix:?}\n\
         [[plugin]]\nname = \"kit\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n\
         [plugin.config]\ncount = true\n{config}\n"
    )
}

/// A Redis store opened the way the relay opens it.
fn store(url: &str, prefix: &str, timeout: Duration) -> KvStore {
    KvStore::new(&KvConfig {
        backend: KvBackend::Redis,
        redis_url: url.to_string(),
        key_prefix: prefix.to_string(),
        timeout: postern::config::HumanDuration(timeout),
        ca_file: None,
    })
    .expect("opening the Redis store")
}

async fn send_one(relay: &Relay, to: &[&str]) -> anyhow::Result<u16> {
    let (mut c, _) = relay.client().await?;
    Ok(c.send("a@b.test", to, MESSAGE).await?.code)
}

/// Every hook's counter is in Redis under `<prefix>:<plugin>:<hook>`, and two
/// plugins of one chain count apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_land_under_prefix_plugin_key() -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let second = "[[plugin]]\nname = \"kat\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n\
                  [plugin.config]\ncount = true\n";
    let relay = Relay::start(&format!("{}{second}", chain(&redis.url(), "it", ""))).await?;
    for _ in 0..2 {
        assert_eq!(
            send_one(&relay, &["c@local.test", "d@local.test"]).await?,
            250
        );
    }
    let mut expected = Vec::new();
    for plugin in ["kat", "kit"] {
        for (hook, n) in [
            ("connect", "2"),
            ("data", "2"),
            ("helo", "2"),
            ("mail_from", "2"),
            ("rcpt", "4"),
        ] {
            let key = format!("it:{plugin}:{hook}");
            assert_eq!(redis.get(&key).as_deref(), Some(n), "{key}");
            expected.push(key);
        }
    }
    assert_eq!(redis.keys(), expected);

    // The store is opened at start: a reload cannot move it.
    let err = relay
        .set_chain(&chain(&redis.url(), "elsewhere", ""))
        .await
        .expect_err("a reload with another [kv]");
    assert!(err.to_string().contains("[kv] changed"), "{err}");
    Ok(())
}

/// Two relays on one Redis add to the same counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_one_counter() -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let a = Relay::start(&chain(&redis.url(), "shared", "")).await?;
    let b = Relay::start(&chain(&redis.url(), "shared", "")).await?;
    for relay in [&a, &b, &a, &b, &b] {
        assert_eq!(send_one(relay, &["c@local.test"]).await?, 250);
    }
    assert_eq!(redis.get("shared:kit:rcpt").as_deref(), Some("5"));
    assert_eq!(redis.get("shared:kit:data").as_deref(), Some("5"));
    Ok(())
}

/// The TTL is set by the increment that creates the counter; later ones leave
/// it as it is, whether it is longer than theirs or absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_ttl_is_set_when_created_only() -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let relay = Relay::start(&chain(&redis.url(), "it", "count_ttl_ms = 60000")).await?;
    let key = "it:kit:rcpt";

    assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    let ttl = redis.pttl(key);
    assert!((50_000..=60_000).contains(&ttl), "PTTL {ttl}");

    redis.run(&["PEXPIRE", key, "3600000"]);
    assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    assert_eq!(redis.get(key).as_deref(), Some("2"));
    let ttl = redis.pttl(key);
    assert!(ttl > 3_500_000, "the increment reset the TTL: PTTL {ttl}");

    redis.run(&["PERSIST", key]);
    assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    assert_eq!(redis.get(key).as_deref(), Some("3"));
    assert_eq!(
        redis.pttl(key),
        -1,
        "the increment gave a TTL to a counter without one"
    );

    redis.run(&["DEL", key]);
    assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    assert_eq!(redis.get(key).as_deref(), Some("1"));
    let ttl = redis.pttl(key);
    assert!((50_000..=60_000).contains(&ttl), "PTTL {ttl}");
    Ok(())
}

/// The same calls give the same answers from the embedded store and from
/// Redis, and Redis holds what the calls say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_backends_answer_alike() -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let remote = store(&redis.url(), "it", Duration::from_secs(2));
    let memory = KvStore::default();
    let big = (1i64 << 53) + 1;
    for kv in [&memory, &remote] {
        assert_eq!(kv.get("p", "k").await.ok(), Some(None));
        kv.set("p", "k", b"v\0\xff".to_vec(), None).await.unwrap();
        assert_eq!(kv.get("p", "k").await.ok(), Some(Some(b"v\0\xff".to_vec())));
        assert_eq!(
            kv.get("q", "k").await.ok(),
            Some(None),
            "plugins share keys"
        );
        kv.set("p", "t", b"x".to_vec(), Some(60_000)).await.unwrap();
        kv.set("p", "gone", b"x".to_vec(), Some(0)).await.unwrap();
        kv.set("p", "ever", b"x".to_vec(), Some(u64::MAX))
            .await
            .unwrap();
        assert_eq!(
            kv.incr("p", "ever-n", 1, Some(u64::MAX)).await.ok(),
            Some(1)
        );
        assert_eq!(kv.get("p", "gone").await.ok(), Some(None));

        assert_eq!(kv.incr("p", "n", 5, None).await.ok(), Some(5));
        assert_eq!(kv.incr("p", "n", -7, None).await.ok(), Some(-2));
        kv.set("p", "big", big.to_string().into_bytes(), None)
            .await
            .unwrap();
        assert_eq!(kv.incr("p", "big", 1, None).await.ok(), Some(big + 1));
        assert!(matches!(
            kv.incr("p", "k", 1, Some(1000)).await,
            Err(Error::NotANumber)
        ));
        kv.set("p", "max", i64::MAX.to_string().into_bytes(), None)
            .await
            .unwrap();
        assert!(matches!(
            kv.incr("p", "max", 1, None).await,
            Err(Error::NotANumber)
        ));
        assert!(matches!(
            kv.get("p", &"k".repeat(MAX_KEY + 1)).await,
            Err(Error::TooLarge)
        ));

        assert_eq!(kv.delete("p", "k").await.ok(), Some(true));
        assert_eq!(kv.delete("p", "k").await.ok(), Some(false));
    }
    assert_eq!(redis.get("it:p:n").as_deref(), Some("-2"));
    let ttl = redis.pttl("it:p:t");
    assert!((50_000..=60_000).contains(&ttl), "PTTL {ttl}");
    assert_eq!(redis.pttl("it:p:k"), -2);
    assert_eq!(redis.pttl("it:p:max"), -1, "a failed increment set a TTL");
    Ok(())
}

/// Redis stopped: kv calls answer `unavailable` (as a plugin that reports
/// them shows), a plugin that ignores them goes on, the relay answers and
/// nothing traps. Redis back: counting resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_unavailable_and_counting_resumes() -> anyhow::Result<()> {
    let mut redis = RedisServer::start();
    let lenient = chain(&redis.url(), "it", "");
    let strict = chain(&redis.url(), "it", "count_errors = true");
    let relay = Relay::start(&lenient).await?;
    assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    assert_eq!(redis.get("it:kit:rcpt").as_deref(), Some("1"));

    redis.stop();
    let started = Instant::now();
    assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    // Four hooks, each call bounded by the 200ms default timeout.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let kv = store(&redis.url(), "it", Duration::from_millis(200));
    assert!(
        matches!(
            kv.incr("kit", "rcpt", 1, None).await,
            Err(Error::Unavailable(_))
        ),
        "the store answered while Redis is down"
    );

    relay.set_chain(&strict).await?;
    let (_, banner) = relay.client().await?;
    assert_eq!(banner.code, 451, "{banner:?}");
    assert!(banner.text.contains("kv unavailable"), "{banner:?}");
    relay.set_chain(&lenient).await?;

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while redis.get("it:kit:rcpt").is_none() {
        assert!(Instant::now() < deadline, "counting did not resume");
        assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    }
    let before: u64 = redis.get("it:kit:rcpt").unwrap_or_default().parse()?;
    assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    assert_eq!(redis.get("it:kit:rcpt"), Some((before + 1).to_string()));

    for hook in relay.handle.current().plugins()[0].stats.snapshot() {
        assert!(hook.errors.is_empty(), "{hook:?}");
    }
    Ok(())
}

/// A Redis that goes silent without closing the connection: each call ends
/// at `[kv] timeout` with `unavailable`, the wait is not charged to the
/// plugin's deadline (shorter than it), and the store replaces the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_is_bounded_and_replaced() -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let config = format!(
        "[kv]\nbackend = \"redis\"\nredis_url = {:?}\nkey_prefix = \"it\"\ntimeout = \"100ms\"\n\
         [[plugin]]\nname = \"kit\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\ntimeout_ms = 20\n\
         [plugin.config]\ncount = true\ncount_errors = true\n",
        proxy.url()
    );
    let relay = Relay::start(&config).await?;
    assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    assert_eq!(redis.get("it:kit:rcpt").as_deref(), Some("1"));

    proxy.freeze();
    let started = Instant::now();
    let (_, banner) = relay.client().await?;
    let took = started.elapsed();
    assert_eq!(banner.code, 451, "{banner:?}");
    assert!(
        banner
            .text
            .contains("kv unavailable: Redis unreachable: no answer within 100ms"),
        "{banner:?}"
    );
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(1),
        "{took:?}"
    );
    for hook in relay.handle.current().plugins()[0].stats.snapshot() {
        assert!(hook.errors.is_empty(), "{hook:?}");
    }

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, banner) = relay.client().await?;
        if banner.code == 220 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the silent connection was never replaced: {banner:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(send_one(&relay, &["c@local.test"]).await?, 250);
    assert_eq!(redis.get("it:kit:rcpt").as_deref(), Some("2"));
    Ok(())
}

/// The `postern` binary with the counting testkit, its store in the Redis at
/// `url` under the default prefix, with more environment variables.
fn binary_relay(url: &str, env: &[(&str, &Path)]) -> Binary {
    binary_relay_kv(url, "", env)
}

/// As [`binary_relay`], with more lines for the `[kv]` table.
fn binary_relay_kv(url: &str, kv: &str, env: &[(&str, &Path)]) -> Binary {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(
        plugin_relay::wasm_dir().join("testkit.wasm"),
        dir.path().join("plugins/testkit.wasm"),
    )
    .unwrap();
    let cache = plugin_relay::target_dir().join("postern-test-plugin-cache");
    let port = free_port();
    let extra = format!(
        "[plugins]\ndir = \"plugins\"\ncache_dir = {cache:?}\nwatch = false\n\
         [kv]\nbackend = \"redis\"\nredis_url = {url:?}\n{kv}\
         [[plugin]]\nname = \"kit\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n\
         [plugin.config]\ncount = true\n"
    );
    Binary::start_in_env(dir, port, &base_config(port, &extra), env)
}

/// The relay binary starts while Redis is down, warns once, answers, and
/// counts under the default prefix once Redis is up.
#[test]
fn relay_starts_with_redis_down() {
    let redis_port = free_port();
    let relay = binary_relay(&format!("redis://127.0.0.1:{redis_port}/0"), &[]);
    let message = MESSAGE.replace('\n', "\r\n");
    let send = || {
        let reply = send_message(relay.addr(), "a@b.test", &["c@ours.test"], &message);
        assert!(reply.starts_with("250"), "{reply}");
    };
    let warned = || relay.log().matches("cannot reach Redis").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while warned() == 0 {
        assert!(
            Instant::now() < deadline,
            "no warning; log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    send();
    send();
    assert_eq!(warned(), 1, "log:\n{}", relay.log());

    let redis = RedisServer::start_on(redis_port);
    let deadline = Instant::now() + Duration::from_secs(15);
    while redis.get("postern:kit:rcpt").is_none() {
        assert!(
            Instant::now() < deadline,
            "counting did not start; log:\n{}",
            relay.log()
        );
        send();
    }
    assert!(
        relay.log().contains("Redis is reachable again"),
        "{}",
        relay.log()
    );
    assert!(!relay.log().contains("panicked"), "{}", relay.log());
}

/// `rediss://` is TLS with the certificate verified against the system roots
/// (here the test's own, through `SSL_CERT_FILE`): a relay that trusts the
/// certificate counts, one that does not gets nothing through and says why.
/// `[kv] ca_file` trusts a private CA whatever the system roots.
#[test]
fn rediss_is_verified_tls() {
    let certs = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_tls(make_cert(certs.path()));
    let tls_port = redis.tls_port.expect("a TLS port");
    let message = MESSAGE.replace('\n', "\r\n");
    let other = tempfile::tempdir().unwrap();
    let untrusted = make_cert(other.path()).cert;
    let trusted = certs.path().join("cert.pem");
    let with_ca = format!("ca_file = {trusted:?}\n");
    // System roots, [kv] lines, the count after the message, Redis reached.
    for (roots, kv, counted, reached) in [
        (&trusted, "", "1", true),
        (&untrusted, "", "1", false),
        (&untrusted, with_ca.as_str(), "2", true),
    ] {
        let relay = binary_relay_kv(
            &format!("rediss://127.0.0.1:{tls_port}/0"),
            kv,
            &[("SSL_CERT_FILE", roots.as_path())],
        );
        let reply = send_message(relay.addr(), "a@b.test", &["c@ours.test"], &message);
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(
            redis.get("postern:kit:rcpt").as_deref(),
            Some(counted),
            "log:\n{}",
            relay.log()
        );
        if reached {
            assert!(
                !relay.log().contains("cannot reach Redis"),
                "{}",
                relay.log()
            );
        } else {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !relay.log().contains("cannot reach Redis") {
                assert!(
                    Instant::now() < deadline,
                    "no warning; log:\n{}",
                    relay.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
