//! The live status page in headless Chromium while mail flows: the numbers
//! it renders are the relay's, they change as mail goes through, and a
//! screenshot is kept with the test output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::start;
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::send_message;

/// Runs headless Chromium on `url` with `args` (`--dump-dom` or
/// `--screenshot=...`); the page's script runs for `budget_ms` of virtual
/// time first. Returns stdout.
fn chromium(url: &str, args: &[&str], budget_ms: u32) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (Debian's chromium; host/scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with this id in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let open = format!("id=\"{id}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    rest[start..end].to_string()
}

fn number(dom: &str, id: &str) -> u64 {
    let t = text_of(dom, id);
    t.parse()
        .unwrap_or_else(|_| panic!("#{id} shows {t:?}, not a number"))
}

/// Where the test keeps its screenshot: the target folder, which outlives it.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_mail_as_it_flows() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    // dead.test goes to a port where nothing listens: deferred, with an error.
    let routes = "[delivery.routes]\n\"dead.test\" = \"smtp://127.0.0.1:9\"\n";
    let (relay, base) = start(
        &format!("smarthost = \"smtp://{}\"", sink.addr),
        None,
        routes,
    );
    let url = format!("{base}/");
    let addr = relay.addr();
    // Some mail before the first look, and a message that stays queued for
    // a destination with an error to show.
    let sent = tokio::task::spawn_blocking(move || {
        let r = send_message(
            addr,
            "a@ours.test",
            &["x@dead.test"],
            "Subject: stuck\r\n\r\nhi\r\n",
        );
        assert!(r.starts_with("250"), "{r}");
        for i in 0..5 {
            let r = send_message(
                addr,
                "a@ours.test",
                &["b@ours.test"],
                &format!("Subject: {i}\r\n\r\nhi\r\n"),
            );
            assert!(r.starts_with("250"), "{r}");
        }
    });
    sent.await.unwrap();
    sink.wait_for(5, Duration::from_secs(20)).await;
    let first = tokio::task::spawn_blocking(move || chromium(&url, &["--dump-dom"], 4000))
        .await
        .unwrap();
    let received = number(&first, "total-received");
    let delivered = number(&first, "total-delivered");
    assert!(
        received >= 5 && delivered >= 5,
        "received {received}, delivered {delivered}"
    );
    assert_eq!(text_of(&first, "host"), "mx.ours.test");
    assert!(
        first.contains("b@ours.test"),
        "the last deliveries list the recipient"
    );
    assert!(first.contains("class=\"delivered\""), "outcomes are shown");
    assert_eq!(number(&first, "queue-deferred"), 1, "the stuck message");
    let dest = first.split("id=\"destinations\"").nth(1).unwrap_or("");
    assert!(
        dest.contains("dead.test") && dest.contains("127.0.0.1:9"),
        "the destination and its error: {dest}"
    );

    // Mail keeps flowing while the page is looked at again.
    let stop = Instant::now() + Duration::from_secs(3);
    let flow = tokio::task::spawn_blocking(move || {
        let mut n = 0;
        while Instant::now() < stop {
            let r = send_message(
                addr,
                "a@ours.test",
                &["c@ours.test"],
                "Subject: more\r\n\r\nhi\r\n",
            );
            assert!(r.starts_with("250"), "{r}");
            n += 1;
        }
        n
    });
    let url = format!("{base}/");
    let second = tokio::task::spawn_blocking(move || chromium(&url, &["--dump-dom"], 4000))
        .await
        .unwrap();
    let more = flow.await.unwrap();
    let shot = artifacts().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!("{base}/");
    let shot_arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || chromium(&url, &[&shot_arg], 4000))
        .await
        .unwrap();
    assert!(more > 0);
    assert!(
        number(&second, "total-received") > received,
        "the received count moved: {received} then {}",
        number(&second, "total-received")
    );
    let points = second
        .split("id=\"line-in\"")
        .nth(1)
        .and_then(|s| s.split("points=\"").nth(1))
        .map(|s| {
            s.split('"')
                .next()
                .unwrap_or("")
                .split(' ')
                .filter(|p| !p.is_empty())
                .count()
        })
        .unwrap_or(0);
    assert!(points >= 1, "the chart has points");
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("status page screenshot: {}", shot.display());
}
