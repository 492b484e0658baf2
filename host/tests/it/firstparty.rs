//! The first-party plugins end to end, through a running relay with capture
//! sinks and the suite's DNS server: router with a smart-host pool, forward
//! with SRS, ratelimit, access with DNS blocklists.

#[allow(dead_code, clippy::duplicate_mod)]
#[path = "support/plugins.rs"]
mod kit;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kit::Relay as Chain;

use crate::support::dns::DnsServer;
use crate::support::relay::{free_port, Relay};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::Raw;
use crate::support::{eventually, plain};

/// `[plugins]` for a relay started as the binary in `dir`, with these
/// workspace plugins copied into `dir/plugins`.
pub(crate) fn plugins_section(dir: &Path, names: &[&str]) -> String {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for name in names {
        let file = format!("{name}.wasm");
        std::fs::copy(kit::wasm_dir().join(&file), plugins.join(&file)).unwrap();
    }
    let cache = kit::target_dir().join("postern-test-plugin-cache");
    format!("[plugins]\ndir = \"plugins\"\ncache_dir = {cache:?}\nwatch = false\n")
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// Queues `n` messages of 1 KiB from a@origin.test to b@dest.test over 10
/// sessions.
fn smtp_source(relay: SocketAddr, n: usize) {
    crate::support::smtp::smtp_source(relay, n, 10, 1024);
}

/// The router sends to a pool: three sinks weighted 2:1:1 share 3,000
/// messages within 5% of their weights; one stopped costs no message more
/// than one connect attempt (the others take its share at once, nothing is
/// deferred); back after its backoff, it gets traffic again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_spreads_by_weight_and_steps_around_a_stopped_host() {
    let ports = [free_port(), free_port(), free_port()];
    let mut sinks = Vec::new();
    for p in ports {
        sinks.push(Sink::start_on(addr(p), Options::new(Behavior::Accept)).await);
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let hosts: Vec<String> = ports
        .iter()
        .map(|p| format!("\"smtp://127.0.0.1:{p}\""))
        .collect();
    let config = format!(
        "hostname = \"relay.test\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n[spool]\npath = \"spool\"\n\
         [relay]\nnetworks = [\"127.0.0.0/8\"]\n\
         [delivery]\nretry = [\"2s\"]\n\
         [delivery.pools.out]\nhosts = [{}]\nweights = [2, 1, 1]\n\
         {}[[plugin]]\nname = \"router\"\npath = \"router.wasm\"\n\
         [plugin.config]\nrules = [{{ domain = \"dest.test\", to = \"pool:out\" }}]\n",
        hosts.join(", "),
        plugins_section(dir.path(), &["router"])
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let counts = |sinks: &[Sink]| sinks.iter().map(|s| s.messages().len()).collect::<Vec<_>>();
    let all = |sinks: &[Sink], n: usize| {
        let total: usize = sinks.iter().map(|s| s.messages().len()).sum();
        (total >= n).then_some(())
    };

    smtp_source(relay.addr(), 3000);
    eventually(Duration::from_secs(60), || all(&sinks, 3000))
        .await
        .unwrap_or_else(|| panic!("not all delivered: {:?}", counts(&sinks)));
    let c = counts(&sinks);
    for (got, want) in c.iter().zip([1500.0, 750.0, 750.0]) {
        assert!(
            (*got as f64 - want).abs() <= want * 0.05,
            "{c:?} is not within 5% of 1500:750:750"
        );
    }

    sinks[2].stop().await;
    let before = counts(&sinks);
    smtp_source(relay.addr(), 600);
    eventually(Duration::from_secs(30), || all(&sinks, 3600))
        .await
        .unwrap_or_else(|| panic!("stopped host's share not taken over: {:?}", counts(&sinks)));
    let after = counts(&sinks);
    assert_eq!(after[2], before[2], "the stopped sink got mail");
    let log = plain(&relay.log());
    assert!(!log.contains("outcome=\"deferred\""), "{log}");
    assert!(log.contains("pool host down; sent to the next"), "{log}");

    // Back, and past its backoff (2 s), it takes its share again. (The new
    // sink counts from zero: the first one's messages are gone with it.)
    sinks[2] = Sink::start_on(addr(ports[2]), Options::new(Behavior::Accept)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    smtp_source(relay.addr(), 200);
    let expected = 3600 - before[2] + 200;
    let back = eventually(Duration::from_secs(30), || {
        (!sinks[2].messages().is_empty() && all(&sinks, expected).is_some()).then_some(())
    })
    .await;
    assert!(back.is_some(), "{:?}", counts(&sinks));
}

/// forward: an alias to a domain the relay does not serve leaves with an SRS0
/// sender and the original recipient as ORCPT; a bounce to that address
/// goes back to the original sender; a forged one is refused; a loop is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_rewrites_with_srs_and_bounces_come_back() {
    let partner = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let origin = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let config = format!(
        "hostname = \"mx.example.com\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n[spool]\npath = \"spool\"\n\
         [relay]\ndomains = [\"example.com\", \"fwd.example.com\"]\n\
         [delivery.routes]\n\"partner.test\" = \"smtp://{}\"\n\"origin.test\" = \"smtp://{}\"\n\
         {}[[plugin]]\nname = \"forward\"\npath = \"forward.wasm\"\ngrants = [\"recipients\"]\n\
         [plugin.config]\nlocal_domains = [\"example.com\"]\n\
         aliases = {{ \"info@example.com\" = \"ann@partner.test\" }}\n\
         srs = {{ domain = \"fwd.example.com\", secrets = [\"a long secret\"] }}\n",
        partner.addr,
        origin.addr,
        plugins_section(dir.path(), &["forward"])
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let mut c = Raw::connect(relay.addr());
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<jo@origin.test>").starts_with("250"));
    // Not a relay for partner.test: the alias is what takes it there.
    assert!(c.cmd("RCPT TO:<info@example.com>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd("Subject: forwarded\r\n\r\nhi\r\n.");
    assert!(r.starts_with("250"), "{r}");
    let got = partner.wait_for(1, Duration::from_secs(20)).await;
    let srs = &got[0].from;
    assert!(
        srs.starts_with("SRS0=") && srs.ends_with("=origin.test=jo@fwd.example.com"),
        "{srs}"
    );
    assert_eq!(got[0].rcpts, ["ann@partner.test"]);
    assert!(
        got[0].rcpt_lines[0].contains("ORCPT=rfc822;info@example.com"),
        "{:?}",
        got[0].rcpt_lines
    );
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(text.contains("Delivered-To: info@example.com"), "{text}");

    // The partner's bounce, to the SRS address, reaches the sender.
    assert!(c.cmd("MAIL FROM:<>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{srs}>")).starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    assert!(c
        .cmd("Subject: Undelivered Mail Returned to Sender\r\n\r\nsorry\r\n.")
        .starts_with("250"));
    let back = origin.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(back[0].rcpts, ["jo@origin.test"]);
    assert_eq!(back[0].from, "");

    // A forged or tampered address is refused at RCPT.
    assert!(c.cmd("MAIL FROM:<>").starts_with("250"));
    let forged = srs.replacen("=jo@", "=root@", 1);
    let r = c.cmd(&format!("RCPT TO:<{forged}>"));
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let r = c.cmd("RCPT TO:<SRS0=abcd=AA=origin.test=jo@fwd.example.com>");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    c.cmd("RSET");

    // A message that already went through here for info@ is a loop.
    assert!(c.cmd("MAIL FROM:<jo@origin.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<info@example.com>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd("Delivered-To: info@example.com\r\nSubject: again\r\n\r\nhi\r\n.");
    assert!(r.starts_with("554 5.4.6"), "{r}");
}

/// ratelimit: three messages a day for one client, then 451 4.7.1 naming
/// the limit and the wait; two recipients per recipient domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_counts_messages_and_recipients() -> anyhow::Result<()> {
    let chain =
        "[[plugin]]\nname = \"limits\"\npath = \"ratelimit.wasm\"\ngrants = [\"kv\", \"log\"]\n\
                 [plugin.config]\nlimits = [\
                 { by = \"client\", messages = 3, per = \"1d\" },\
                 { by = \"recipient_domain\", recipients = 2, per = \"1d\" }]\n";
    let relay = Chain::start(chain).await?;
    let mut codes = Vec::new();
    for _ in 0..4 {
        let (mut c, _) = relay.client().await?;
        c.cmd("EHLO client.test").await?;
        let r = c.cmd("MAIL FROM:<a@b.test>").await?;
        codes.push(r.code);
        if r.code == 451 {
            assert!(
                r.text
                    .contains("4.7.1 rate limit: 3 messages per 1d for 127.0.0.1; try again in"),
                "{r:?}"
            );
        }
    }
    assert_eq!(codes, [250, 250, 250, 451]);

    let relay = Chain::start(chain).await?;
    let (mut c, _) = relay.client().await?;
    c.cmd("EHLO client.test").await?;
    assert_eq!(c.cmd("MAIL FROM:<a@b.test>").await?.code, 250);
    let rcpts: Vec<u16> = {
        let mut v = Vec::new();
        for r in ["x@local.test", "y@local.test", "z@local.test"] {
            v.push(c.cmd(&format!("RCPT TO:<{r}>")).await?.code);
        }
        v
    };
    assert_eq!(rcpts, [250, 250, 451]);
    Ok(())
}

/// access: a client listed by a DNS blocklist is refused naming the list
/// (the answer cached in kv, not asked again), an error answer of a list is
/// no listing, a denied HELO and a blocklisted sender domain are refused,
/// and an allowed network skips the checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lists_and_dns_blocklists() -> anyhow::Result<()> {
    let dns = DnsServer::start().await;
    dns.a("1.0.0.127.bl.test", &["127.0.0.2"]);
    dns.a("1.0.0.127.quota.test", &["127.255.255.254"]);
    dns.a("spam.test.dbl.test", &["127.0.1.2"]);
    let chain = |allow: &str| {
        format!(
            "[delivery]\nnameservers = [\"{}\"]\n\
             [[plugin]]\nname = \"access\"\npath = \"access.wasm\"\ngrants = [\"kv\", \"dns\", \"log\"]\n\
             [plugin.config]\n{allow}\
             deny = {{ helo = [\"*.dynamic.test\"] }}\n\
             dnsbl = [{{ zone = \"quota.test\" }}, {{ zone = \"bl.test\", codes = [\"127.0.0.2-127.0.0.11\"] }}]\n\
             dbl = [{{ zone = \"dbl.test\" }}]\n",
            dns.addr
        )
    };
    let relay = Chain::start(&chain("")).await?;
    for _ in 0..2 {
        let (_, banner) = relay.client().await?;
        assert_eq!(banner.code, 554, "{banner:?}");
        assert!(
            banner.text.contains(
                "5.7.1 Service unavailable; Client host [127.0.0.1] blocked using bl.test"
            ),
            "{banner:?}"
        );
    }
    assert_eq!(
        dns.queries("1.0.0.127.bl.test"),
        1,
        "the second answer came from kv"
    );

    let relay = Chain::start(&chain("allow = { networks = [\"127.0.0.0/8\"] }\n")).await?;
    let (mut c, banner) = relay.client().await?;
    assert_eq!(banner.code, 220, "an allowed network skips the lists");
    assert_eq!(c.cmd("EHLO host-1.dynamic.test").await?.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<x@spam.test>").await?.code, 250);

    // Without the blocklisting zone: the deny list and the domain list.
    let relay = Chain::start(&chain("").replace(
        "{ zone = \"bl.test\", codes = [\"127.0.0.2-127.0.0.11\"] }",
        "{ zone = \"none.test\" }",
    ))
    .await?;
    let (mut c, banner) = relay.client().await?;
    assert_eq!(banner.code, 220, "{banner:?}");
    let r = c.cmd("EHLO host-1.dynamic.test").await?;
    assert!(
        r.code == 550 && r.text.contains("host-1.dynamic.test refused"),
        "{r:?}"
    );
    assert_eq!(c.cmd("EHLO mail.client.test").await?.code, 250);
    let r = c.cmd("MAIL FROM:<x@spam.test>").await?;
    assert!(
        r.code == 550 && r.text.contains("spam.test blocked using dbl.test"),
        "{r:?}"
    );
    assert_eq!(c.cmd("MAIL FROM:<x@fine.test>").await?.code, 250);
    Ok(())
}
