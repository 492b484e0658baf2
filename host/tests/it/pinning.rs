//! TLS pinning towards a smart host with a self-signed certificate (made as
//! `openssl req -x509` does: `CA:TRUE`): a pinned fingerprint gets the mail
//! over TLS, a wrong one gets nothing, not even in clear text, and `tls_ca`
//! pointing at such a certificate says what to do instead.

use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use crate::support::eventually;
use crate::support::inprocess::{send, Relay};
use crate::support::sink::{Behavior, Options, Sink};

/// A self-signed CA certificate for 127.0.0.1 and its acceptor; returns the
/// certificate file and its fingerprint as `openssl x509 -fingerprint
/// -sha256` prints it.
fn self_signed(dir: &std::path::Path) -> (TlsAcceptor, std::path::PathBuf, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join("smarthost.pem");
    let key_path = dir.join("smarthost.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let acceptor = postern::smtp::tls::acceptor(&cert_path, &key_path).unwrap();
    let fp = postern::delivery::tls::fingerprint(cert.der());
    (acceptor, cert_path, fp)
}

async fn tls_sink(acceptor: TlsAcceptor) -> Sink {
    let mut opts = Options::new(Behavior::Accept);
    opts.tls = Some(acceptor);
    Sink::start("127.0.0.1", opts).await
}

fn last_reply(relay: &Relay) -> Option<String> {
    let dir = relay.spool.join("queue");
    std::fs::read_dir(&dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.ends_with(".state")
            .then(|| std::fs::read_to_string(e.path()).unwrap_or_default())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_self_signed_smart_host_gets_mail_over_tls_and_a_wrong_pin_gets_none() {
    let dir = tempfile::tempdir().unwrap();
    let (acceptor, _, fp) = self_signed(dir.path());
    assert!(fp.starts_with("sha256:") && fp.len() == 7 + 95, "{fp}");
    let sink = tls_sink(acceptor.clone()).await;
    // Lower case without colons works as well as openssl's form.
    let written = fp
        .to_ascii_lowercase()
        .replace(':', "")
        .replacen("sha256", "sha256:", 1);
    let relay_dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        relay_dir.path(),
        &format!(
            "smarthost = \"smtp://{}\"\ntls_fingerprint = [\"{written}\"]\nretry = [\"1h\"]",
            sink.addr
        ),
    )
    .await;
    send(
        relay.addr,
        "a@sender.test",
        &["b@dest.test"],
        "",
        "",
        "Subject: pinned\r\n\r\nHi.\r\n",
    )
    .await
    .unwrap();
    let got = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    assert!(
        got[0].tls,
        "the pinned smart host got the mail in clear text"
    );

    let other = tls_sink(acceptor).await;
    let wrong = format!("sha256:{}", "AB".repeat(32));
    let dir2 = tempfile::tempdir().unwrap();
    let relay2 = Relay::start(
        dir2.path(),
        &format!(
            "smarthost = \"smtp://{}\"\ntls_fingerprint = [\"{wrong}\"]\nretry = [\"1h\"]",
            other.addr
        ),
    )
    .await;
    send(
        relay2.addr,
        "a@sender.test",
        &["b@dest.test"],
        "",
        "",
        "Subject: wrong pin\r\n\r\nHi.\r\n",
    )
    .await
    .unwrap();
    let state = eventually(Duration::from_secs(20), || last_reply(&relay2))
        .await
        .expect("the message was not tried");
    assert!(
        state.contains("not one of the pinned tls_fingerprint values"),
        "{state}"
    );
    assert!(state.contains("deferred"), "a mismatch defers: {state}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        other.messages().is_empty(),
        "mail went to a host whose certificate is not pinned"
    );
    assert_eq!(
        other.transactions.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a transaction was started (in clear text?)"
    );
    assert_eq!(
        relay2.spooled().len(),
        1,
        "the message must wait in the spool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_ca_with_a_self_signed_certificate_says_to_pin_it() {
    let dir = tempfile::tempdir().unwrap();
    let (acceptor, cert, _) = self_signed(dir.path());
    let sink = tls_sink(acceptor).await;
    let relay_dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        relay_dir.path(),
        &format!(
            "smarthost = \"smtp://{}\"\nrequire_tls = true\ntls_ca = \"{}\"\nretry = [\"1h\"]",
            sink.addr,
            cert.display()
        ),
    )
    .await;
    send(
        relay.addr,
        "a@sender.test",
        &["b@dest.test"],
        "",
        "",
        "Subject: ca\r\n\r\nHi.\r\n",
    )
    .await
    .unwrap();
    let state = eventually(Duration::from_secs(20), || last_reply(&relay))
        .await
        .expect("the message was not tried");
    assert!(
        state.contains("CaUsedAsEndEntity") && state.contains("pin it with tls_fingerprint"),
        "{state}"
    );
    assert!(sink.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_pins_its_hosts_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (acceptor, _, fp) = self_signed(dir.path());
    let pinned = tls_sink(acceptor.clone()).await;
    let relay_dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        relay_dir.path(),
        &format!(
            "smarthost = \"pool:out\"\nretry = [\"1h\"]\n\
             [delivery.pools.out]\nhosts = [\"smtp://{}\"]\ntls_fingerprint = [\"{fp}\"]",
            pinned.addr
        ),
    )
    .await;
    send(
        relay.addr,
        "a@sender.test",
        &["b@dest.test"],
        "",
        "",
        "Subject: pooled\r\n\r\nHi.\r\n",
    )
    .await
    .unwrap();
    let got = pinned.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    assert!(
        got[0].tls,
        "the pinned pool host got the mail in clear text"
    );
}
