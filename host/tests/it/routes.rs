//! The plugin route hook end to end: a message sent over SMTP into a relay
//! that runs a plugin chain and delivery arrives where the route says (an MX
//! of another domain, a smart host, a local folder, nowhere, or back to the
//! sender as a bounce), and a route that fails temporarily keeps it queued.

// The plugin build helper, included as `plugins.rs` includes it; only its
// build and target folder are used here.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "support/plugins.rs"]
mod plugin_build;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mail_parser::MimeHeaders;
use postern::config::Config;
use postern::delivery::Delivery;
use postern::plugins::{ChainHandle, Runtime};
use postern::server::Server;
use tokio::sync::oneshot;

use crate::support::dns::DnsServer;
use crate::support::eventually;
use crate::support::inprocess::{self as inproc, queue_cmd};
use crate::support::sink::{Behavior, Captured, Options, Sink};

const WAIT: Duration = Duration::from_secs(20);

/// The envelope sender of every test message; `[delivery.routes]` sends its
/// domain to the sender's sink, so bounces can be seen.
const SENDER: &str = "a@sender.test";

/// A relay with a plugin chain and delivery, running until dropped.
struct Relay {
    addr: SocketAddr,
    config: PathBuf,
    spool: PathBuf,
    /// `delivery.local_folder`, resolved.
    local: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    _delivery: Delivery,
    _dir: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Relay {
    /// Starts a relay whose chain is `chain` (`[[plugin]]` tables naming the
    /// workspace's `.wasm` files) with `delivery` as its `[delivery]` body,
    /// loaded and started as `postern serve` does.
    async fn start(chain: &str, delivery: &str) -> anyhow::Result<Relay> {
        let dir = tempfile::tempdir()?;
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins)?;
        for name in ["router.wasm", "testkit.wasm"] {
            std::fs::copy(plugin_build::wasm_dir().join(name), plugins.join(name))?;
        }
        let cache = plugin_build::target_dir().join("postern-test-plugin-cache");
        let text = format!(
            "hostname = \"relay.test\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [relay]\nnetworks = [\"127.0.0.0/8\"]\n\
             [limits]\nshutdown_grace = \"1s\"\n\
             [plugins]\ndir = \"plugins\"\ncache_dir = {cache:?}\nwatch = false\n\
             [delivery]\n{delivery}\n\
             {chain}"
        );
        let path = dir.path().join("postern.toml");
        std::fs::write(&path, text)?;
        let config = Config::load(&path)?;
        let spool = config.resolve(&config.spool.path);
        let local = config.resolve(&config.delivery.local_folder);
        let runtime = Runtime::new(&config)?;
        let handle = Arc::new(ChainHandle::new(runtime.load_chain(&config).await?));
        let server = Server::bind(config, handle).await?;
        let addr = server.local_addrs()[0];
        let admin = postern::admin::Admin::bind(server.context()).await?;
        let delivery = Delivery::start(server.context(), server.local_addrs()).await?;
        admin.serve(delivery.clone()).set_listening();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(server.listen()?.run(async move {
            let _ = stopped.await;
        }));
        Ok(Relay {
            addr,
            config: path,
            spool,
            local,
            stop: Some(stop),
            _delivery: delivery,
            _dir: dir,
        })
    }

    /// Sends one message from [`SENDER`]; returns its queue id.
    async fn send(&self, rcpts: &[&str], subject: &str) -> String {
        inproc::send(self.addr, SENDER, rcpts, "", "", &message(subject))
            .await
            .unwrap_or_else(|e| panic!("sending to {rcpts:?}: {e}"))
    }

    /// Messages (not state files) in the spool.
    fn spooled(&self) -> Vec<String> {
        inproc::spooled(&self.spool)
    }

    /// Waits until the spool holds no message at all (bounces included).
    async fn wait_empty(&self) {
        let empty = eventually(WAIT, || self.spooled().is_empty().then_some(())).await;
        assert!(empty.is_some(), "still spooled: {:?}", self.spooled());
    }

    /// Every file below the local folder (relative paths), sorted.
    fn local_files(&self) -> Vec<PathBuf> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap_or(&p).to_path_buf());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.local, &self.local, &mut out);
        out.sort();
        out
    }
}

fn message(subject: &str) -> String {
    format!(
        "Subject: {subject}\nFrom: <{SENDER}>\nTo: <someone@elsewhere.test>\n\nRouted body line.\n"
    )
}

/// The test's next hops: a DNS server, the MX sink (on `mx_port`, reached
/// through DNS), a smart host sink, and the sender's sink (for bounces).
struct World {
    _dns: DnsServer,
    mx: Sink,
    smarthost: Sink,
    sender: Sink,
    relay: Relay,
}

impl World {
    /// Starts the sinks, the DNS server and a relay with `chain`, or with the
    /// first-party router sending each test domain its own way.
    async fn start(chain: Option<&str>) -> anyhow::Result<World> {
        let mx = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
        let smarthost = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
        let sender = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
        let dns = DnsServer::start().await;
        dns.mx("other.test", &[(10, "mx.other.test")])
            .a("mx.other.test", &["127.0.0.1"]);
        // Domains whose default route (their own MX) reaches the MX sink too,
        // so a route that is not followed shows there.
        for domain in [
            "smart.test",
            "folder.test",
            "void.test",
            "gone.test",
            "dest.test",
        ] {
            dns.mx(domain, &[(10, "mx.other.test")]);
        }
        // mxroute.test has no DNS records: only the route reaches an MX.
        let delivery = format!(
            "nameservers = [\"{}\"]\nmx_port = {}\nretry = [\"1h\"]\nlocal_folder = \"local\"\n\
             [delivery.routes]\n\"sender.test\" = \"smtp://{}\"\n",
            dns.addr,
            mx.addr.port(),
            sender.addr
        );
        let router = format!(
            "[[plugin]]\nname = \"router\"\npath = \"router.wasm\"\n[plugin.config.routes]\n\
             \"mxroute.test\" = \"mx:other.test\"\n\
             \"smart.test\" = \"smtp://{}\"\n\
             \"folder.test\" = \"local:inbox/routed\"\n\
             \"void.test\" = \"discard\"\n\
             \"gone.test\" = \"reject\"\n",
            smarthost.addr
        );
        let relay = Relay::start(chain.unwrap_or(&router), &delivery).await?;
        Ok(World {
            _dns: dns,
            mx,
            smarthost,
            sender,
            relay,
        })
    }

    /// Messages received by each sink: (mx, smart host, sender).
    fn counts(&self) -> (usize, usize, usize) {
        (
            self.mx.messages().len(),
            self.smarthost.messages().len(),
            self.sender.messages().len(),
        )
    }
}

/// Checks that a message arrived with this envelope and content.
fn assert_arrived(got: &Captured, rcpts: &[&str], subject: &str, id: &str) {
    assert_eq!(got.from, SENDER);
    assert_eq!(got.rcpts, rcpts);
    let text = String::from_utf8_lossy(&got.data);
    assert!(text.contains(&format!("Subject: {subject}\r\n")), "{text}");
    assert!(text.contains("Routed body line.\r\n"), "{text}");
    assert!(text.contains(id), "the Received header names {id}: {text}");
}

/// The delivery-status part of an RFC 3464 report.
fn dsn_status(data: &[u8]) -> String {
    let msg = mail_parser::MessageParser::default()
        .parse(data)
        .expect("the report parses");
    let ct = msg.content_type().expect("content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    assert!(
        msg.parts.iter().any(|p| p
            .content_type()
            .is_some_and(|c| c.ctype() == "message" && c.subtype() == Some("delivery-status"))),
        "no message/delivery-status part"
    );
    let text = String::from_utf8_lossy(data).into_owned();
    let start = text.find("Reporting-MTA:").expect("Reporting-MTA");
    text[start..].to_string()
}

/// `mx:other.test`: the recipient goes to the MX of another domain (its own
/// domain has no DNS records at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_mx_delivers_to_another_domains_mx() -> anyhow::Result<()> {
    let w = World::start(None).await?;
    let id = w.relay.send(&["u@mxroute.test"], "via mx").await;
    let got = w.mx.wait_for(1, WAIT).await;
    assert_arrived(&got[0], &["u@mxroute.test"], "via mx", &id);
    w.relay.wait_empty().await;
    assert_eq!(w.counts(), (1, 0, 0), "one copy, at the MX only");
    Ok(())
}

/// `smtp://127.0.0.1:PORT`: the recipient goes to that smart host, not to its
/// domain's MX (the default route, which would also accept it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_smarthost_delivers_there() -> anyhow::Result<()> {
    let w = World::start(None).await?;
    let id = w.relay.send(&["u@smart.test"], "via smart host").await;
    let got = w.smarthost.wait_for(1, WAIT).await;
    assert_arrived(&got[0], &["u@smart.test"], "via smart host", &id);
    w.relay.wait_empty().await;
    assert_eq!(w.counts(), (0, 1, 0), "one copy, at the smart host only");
    Ok(())
}

/// `local:inbox/routed`: the message is written as `.eml` below
/// `delivery.local_folder` and leaves the spool; nothing goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_local_folder_writes_an_eml() -> anyhow::Result<()> {
    let w = World::start(None).await?;
    let id = w.relay.send(&["u@folder.test"], "filed").await;
    let file = w
        .relay
        .local
        .join("inbox/routed")
        .join(format!("{id}.0.eml"));
    let text = eventually(WAIT, || std::fs::read_to_string(&file).ok())
        .await
        .unwrap_or_else(|| panic!("no {}: {:?}", file.display(), w.relay.local_files()));
    w.relay.wait_empty().await;
    assert!(text.starts_with("Received: "), "{text}");
    assert!(text.contains(&id), "{text}");
    assert!(text.contains("Subject: filed\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nRouted body line.\r\n"), "{text}");
    assert_eq!(
        w.relay.local_files(),
        vec![PathBuf::from(format!("inbox/routed/{id}.0.eml"))],
        "one file, no temporary left"
    );
    assert_eq!(w.counts(), (0, 0, 0), "nothing sent over SMTP");
    Ok(())
}

/// `discard`: the message leaves the spool and arrives nowhere, not even as a
/// bounce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_discard_drops_silently() -> anyhow::Result<()> {
    let w = World::start(None).await?;
    // A second recipient routed elsewhere shows the pass ran to the end.
    w.relay
        .send(&["u@void.test", "v@smart.test"], "dropped")
        .await;
    let got = w.smarthost.wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["v@smart.test"]);
    // A bounce would be queued before the message leaves the spool, and
    // would stay there until a sink took it.
    w.relay.wait_empty().await;
    assert_eq!(w.counts(), (0, 1, 0), "the discarded recipient got nothing");
    assert!(w.relay.local_files().is_empty());
    Ok(())
}

/// `reject`: the recipient fails at once and the sender gets an RFC 3464
/// report with the route's reply; the recipient's MX gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_reject_bounces_to_the_sender() -> anyhow::Result<()> {
    let w = World::start(None).await?;
    w.relay.send(&["u@gone.test"], "refused").await;
    let got = w.sender.wait_for(1, WAIT).await;
    assert_eq!(got[0].from, "", "bounces come from the null sender");
    assert_eq!(got[0].rcpts, vec![SENDER]);
    let status = dsn_status(&got[0].data);
    assert!(
        status.contains("Final-Recipient: rfc822; u@gone.test"),
        "{status}"
    );
    assert!(status.contains("Action: failed"), "{status}");
    assert!(status.contains("Status: 5.1.2"), "{status}");
    assert!(status.contains("no route to this recipient"), "{status}");
    assert!(
        String::from_utf8_lossy(&got[0].data).contains("Subject: refused"),
        "the report returns the message"
    );
    w.relay.wait_empty().await;
    assert_eq!(w.counts(), (0, 0, 1), "one bounce, nothing at the MX");
    Ok(())
}

/// A route hook that fails gets its on_error verdict, by default tempfail,
/// which defers the recipient: the message stays queued, nothing is sent, no
/// bounce. Both a trap and a 4xx reject (the route contract allows only 5xx,
/// so the plugin's reply is refused) end there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_tempfail_defers() -> anyhow::Result<()> {
    for config in [
        "misbehave = { hook = \"route\", how = \"trap\" }",
        "route = { route = \"reject\", code = 451, enhanced = \"4.7.1\", text = \"not yet\" }",
    ] {
        let chain = format!(
            "[[plugin]]\nname = \"kit\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n[plugin.config]\n{config}\n"
        );
        let w = World::start(Some(&chain)).await?;
        // dest.test's MX is the MX sink: a default route would deliver.
        let id = w.relay.send(&["u@dest.test"], "later").await;
        let state_file = w.relay.spool.join("queue").join(format!("{id}.state"));
        let state = eventually(WAIT, || {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state_file).ok()?).ok()?;
            (v["attempts"] == 1).then_some(v)
        })
        .await
        .unwrap_or_else(|| panic!("{config}: no delivery pass recorded"));
        assert_eq!(state["recipients"][0]["status"], "deferred", "{state}");
        let v: serde_json::Value =
            serde_json::from_str(&queue_cmd(&w.relay.config, &["show", &id, "--json"]))?;
        assert_eq!(v["state"], "deferred", "{config}: {v}");
        let rcpt = &v["recipients"][0];
        assert_eq!(rcpt["address"], "u@dest.test", "{v}");
        assert_eq!(rcpt["state"], "deferred", "{config}: {v}");
        assert!(
            rcpt["last_reply"]
                .as_str()
                .is_some_and(|r| r.starts_with("451 4.3.0 ")),
            "{config}: {v}"
        );
        assert!(v["next_attempt"].is_u64(), "{v}");
        // The state is written after any notice is queued: the message is
        // the only one spooled, so no bounce is on its way.
        assert_eq!(w.relay.spooled(), vec![id.clone()], "{config}");
        assert_eq!(w.counts(), (0, 0, 0), "{config}: nothing sent");
    }
    Ok(())
}

/// One message whose recipients each take another route: every copy lands
/// where its own route says, in one delivery pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_recipient_takes_its_own_route() -> anyhow::Result<()> {
    let w = World::start(None).await?;
    let id = w
        .relay
        .send(
            &[
                "a@mxroute.test",
                "b@smart.test",
                "c@folder.test",
                "d@void.test",
                "e@gone.test",
            ],
            "mixed",
        )
        .await;
    let mx = w.mx.wait_for(1, WAIT).await;
    assert_arrived(&mx[0], &["a@mxroute.test"], "mixed", &id);
    let smart = w.smarthost.wait_for(1, WAIT).await;
    assert_arrived(&smart[0], &["b@smart.test"], "mixed", &id);
    let bounce = w.sender.wait_for(1, WAIT).await;
    let status = dsn_status(&bounce[0].data);
    assert!(
        status.contains("Final-Recipient: rfc822; e@gone.test"),
        "{status}"
    );
    for other in [
        "a@mxroute.test",
        "b@smart.test",
        "c@folder.test",
        "d@void.test",
    ] {
        assert!(!status.contains(other), "{other} reported: {status}");
    }
    w.relay.wait_empty().await;
    assert_eq!(
        w.relay.local_files(),
        vec![PathBuf::from(format!("inbox/routed/{id}.2.eml"))]
    );
    assert_eq!(w.counts(), (1, 1, 1));
    Ok(())
}
