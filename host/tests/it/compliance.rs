//! The compliance and archive plugins and the quarantine end to end: a
//! relay binary with the plugins, a capture sink as its next hop,
//! Postfix's smtp-source and `postern queue`; and the footer corpus
//! checked with a MIME parser nobody here wrote (Python's `email`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use mail_parser::MimeHeaders;
use postern::plugins::host::body::{self, BodyEdits, Footer};

use crate::firstparty::plugins_section;
use crate::support::eventually;
use crate::support::inprocess::queue_cmd;
use crate::support::relay::{config_with, free_port, Relay, NO_DELIVERY};
use crate::support::sink::{Behavior, Options, Sink};
use crate::support::smtp::{queue_id, send_message};

const COMPLIANCE: &str = r#"[[plugin]]
name = "compliance"
path = "compliance.wasm"
timeouts = { data = 5000 }
[plugin.config]
remove_headers = ["X-Internal-Route"]
rules = [
  { name = "cards", data = "cards", action = "reject", reply = "card numbers may not be mailed" },
  { name = "executables", extensions = ["exe", "js"], double_extensions = true, signatures = ["pe", "elf", "script"], action = "strip" },
  { name = "review", pattern = "HOLD-FOR-REVIEW", action = "quarantine" },
  { name = "disclaimer", sender_domains = ["corp.test"], action = "footer", text = "Confidential: corp.test", html = "<p>Confidential: corp.test</p>" },
]
"#;

const ZIP_SCRIPT: &str = r#"
import io, sys, zipfile
b = io.BytesIO()
with zipfile.ZipFile(b, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr('readme.txt', 'see the invoice\n' * 50)
    pe = b'MZ' + bytes(0x3a) + bytes([0x80, 0, 0, 0]) + bytes(0x40) + b'PE\0\0' + bytes(2000)
    z.writestr('invoice.pdf.exe', pe)
sys.stdout.buffer.write(b.getvalue())
"#;

/// A zip built by Python's zipfile (deflated): a readme and an executable
/// hiding behind a double extension.
fn zip_with_an_exe() -> Vec<u8> {
    let out = Command::new("python3")
        .args(["-c", ZIP_SCRIPT])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn base64_lines(bytes: &[u8]) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(bytes);
    b.as_bytes()
        .chunks(76)
        .map(|l| format!("{}\r\n", String::from_utf8_lossy(l)))
        .collect()
}

/// A relay (the binary) in `dir` delivering to the smart host `next_hop`
/// (retrying after a second), with `extra` tables, these workspace plugins
/// and the `[[plugin]]` chain.
fn relay_to(
    next_hop: SocketAddr,
    dir: &Arc<tempfile::TempDir>,
    extra: &str,
    plugins: &[&str],
    chain: &str,
) -> Relay {
    let port = free_port();
    let config = config_with(
        port,
        &format!("[delivery]\nsmarthost = \"smtp://{next_hop}\"\nretry = [\"1s\"]\n"),
        &format!("{extra}{}{chain}", plugins_section(dir.path(), plugins)),
    );
    Relay::start_in(dir.clone(), port, &config)
}

/// A card number refused; an `.exe` inside a zip stripped with the
/// explanation part in its place; the disclaimer in both alternatives of
/// mail from corp.test; internal headers gone; our `Received:` without the
/// internal client's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compliance_rejects_strips_and_adds_footers() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let relay = relay_to(
        sink.addr,
        &dir,
        "[smtp]\nreceived_hide_networks = [\"127.0.0.0/8\"]\n",
        &["compliance"],
        COMPLIANCE,
    );

    let r = send_message(
        relay.addr(),
        "jo@corp.test",
        &["ann@partner.test"],
        "Subject: order\r\n\r\nPlease charge 4111 1111 1111 1111, exp 12/29.\r\n",
    );
    assert!(
        r.starts_with("550 5.7.1 card numbers may not be mailed"),
        "{r}"
    );
    // A look-alike (fails the Luhn check) passes.
    let r = send_message(
        relay.addr(),
        "jo@other.test",
        &["ann@partner.test"],
        "Subject: order\r\nX-Internal-Route: core-7\r\n\r\nOrder 4111 1111 1111 1112 shipped.\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    let plain_id = queue_id(&r);

    let zip = zip_with_an_exe();
    let body = format!(
        "Subject: invoice\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n\
         --m\r\nContent-Type: multipart/alternative; boundary=\"a\"\r\n\r\n\
         --a\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe invoice is attached.\r\n\
         --a\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>The invoice is attached.</p></body></html>\r\n\
         --a--\r\n\
         --m\r\nContent-Type: application/zip; name=\"invoice.zip\"\r\nContent-Disposition: attachment; filename=\"invoice.zip\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\
         --m\r\nContent-Type: application/pdf; name=\"terms.pdf\"\r\nContent-Disposition: attachment; filename=\"terms.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\
         --m--\r\n",
        base64_lines(&zip),
        base64_lines(b"%PDF-1.4\nterms\n%%EOF\n")
    );
    let r = send_message(relay.addr(), "jo@corp.test", &["ann@partner.test"], &body);
    assert!(r.starts_with("250"), "{r}");
    let zip_id = queue_id(&r);

    let got = sink.wait_for(2, Duration::from_secs(30)).await;
    let find = |id: &str| {
        got.iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .find(|t| t.contains(id))
            .unwrap_or_else(|| panic!("{id} not delivered"))
    };
    let plain = find(&plain_id);
    assert!(!plain.contains("X-Internal-Route"), "{plain}");
    assert!(
        !plain.contains("Confidential"),
        "not from corp.test: no footer"
    );
    assert!(
        plain.starts_with("Received: by mx.ours.test (Postern) with ESMTP id"),
        "{plain}"
    );
    assert!(
        !plain.contains("127.0.0.1") && !plain.contains("client.test"),
        "{plain}"
    );

    let text = find(&zip_id);
    let m = mail_parser::MessageParser::default()
        .parse(text.as_bytes())
        .expect("parses");
    let plain_body = m.body_text(0).unwrap();
    assert!(
        plain_body.starts_with("The invoice is attached.")
            && plain_body.trim_end().ends_with("Confidential: corp.test"),
        "{plain_body}"
    );
    let html = m.body_html(0).unwrap();
    assert!(
        html.contains("<p>The invoice is attached.</p><p>Confidential: corp.test</p>"),
        "{html}"
    );
    // The zip became a note; the PDF is there, byte for byte.
    let names: Vec<_> = m
        .attachments()
        .filter_map(|a| a.attachment_name())
        .collect();
    assert_eq!(names, ["terms.pdf"], "{text}");
    assert_eq!(
        m.attachment(0).unwrap().contents(),
        b"%PDF-1.4\nterms\n%%EOF\n"
    );
    let note =
        "invoice.zip was removed from this message: invoice.pdf.exe in the archive: file type .exe";
    assert!(
        m.parts
            .iter()
            .any(|p| p.text_contents().is_some_and(|t| t.contains(note))),
        "{text}"
    );
}

/// Every file below `dir`, at any depth.
pub(crate) fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_below(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// 1,000 messages through smtp-source: each one that got a 250 has its
/// `.eml`, replay record and authentication results in the day's folder
/// (written and fsynced before the 250).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_keeps_a_copy_of_every_accepted_message() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let config = config_with(
        port,
        NO_DELIVERY,
        &format!(
            "{}[[plugin]]\nname = \"archive\"\npath = \"archive.wasm\"\ngrants = [\"archive\"]\n\
             timeouts = {{ data = 5000 }}\n",
            plugins_section(dir.path(), &["archive"])
        ),
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    crate::support::smtp::smtp_source(relay.addr(), 1000, 10, 4096);
    let accepted = relay.spooled().len();
    assert_eq!(accepted, 1000, "smtp-source saw every message accepted");
    let files = files_below(&dir.path().join("archive/archive"));
    let count = |ext: &str| {
        files
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(ext))
            .count()
    };
    assert_eq!(count(".eml"), accepted);
    assert_eq!(count(".auth.json"), accepted);
    assert_eq!(count(".json"), 2 * accepted);
    for s in relay.spooled() {
        let eml = files
            .iter()
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy() == format!("{}.eml", s.id))
            })
            .unwrap_or_else(|| panic!("no archived copy of {}", s.id));
        let day = eml
            .parent()
            .unwrap()
            .strip_prefix(dir.path().join("archive/archive"))
            .unwrap();
        assert_eq!(day.components().count(), 3, "YYYY/MM/DD: {day:?}");
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(eml.with_extension("json")).unwrap())
                .unwrap();
        assert_eq!(record["id"], s.id.as_str());
        assert_eq!(record["envelope"]["sender"], "a@origin.test");
        assert_eq!(
            record["envelope"]["recipients"][0]["address"],
            "b@dest.test"
        );
        assert_eq!(
            record["client"]["peer"]
                .as_str()
                .map(|p| p.starts_with("127.0.0.1:")),
            Some(true)
        );
        assert_eq!(
            std::fs::read(eml).unwrap(),
            s.message,
            "the copy is the message as spooled"
        );
    }
}

/// Quarantine: listed by state with its reason, never tried or bounced
/// (also past `max_age`); a release delivers it (its age starting again),
/// delete drops it, and what nobody releases is removed after
/// `quarantine_retention`. The archive's files go after `archive_retention`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_release_delete_and_retention() {
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let config = config_with(
        port,
        &format!(
            "[delivery]\nsmarthost = \"smtp://{}\"\nmax_age = \"3s\"\nretry = [\"1s\"]\n\
             quarantine_retention = \"8s\"\n",
            sink.addr
        ),
        &format!(
            "{}archive_retention = \"6s\"\narchive_sweep = \"1s\"\n{COMPLIANCE}\
             [[plugin]]\nname = \"archive\"\npath = \"archive.wasm\"\ngrants = [\"archive\"]\n",
            plugins_section(dir.path(), &["compliance", "archive"])
        ),
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let conf = dir.path().join("postern.toml");
    let send = |subject: &str| {
        let r = send_message(
            relay.addr(),
            "jo@origin.test",
            &["ann@partner.test"],
            &format!("Subject: {subject}\r\n\r\nHOLD-FOR-REVIEW please\r\n"),
        );
        queue_id(&r)
    };
    let (a, b, c) = (send("a"), send("b"), send("c"));
    let archived = files_below(&dir.path().join("archive/archive"));
    assert_eq!(archived.len(), 9, "{archived:?}");

    let listed: Vec<serde_json::Value> = serde_json::from_str(&queue_cmd(
        &conf,
        &["list", "--state", "quarantine", "--json"],
    ))
    .unwrap();
    assert_eq!(listed.len(), 3);
    for e in &listed {
        assert_eq!(e["state"], "quarantine");
        assert_eq!(e["hold_reason"], "compliance rule review: 1 matches");
    }
    let shown = queue_cmd(&conf, &["show", &a]);
    assert!(
        shown.contains("quarantined: compliance rule review"),
        "{shown}"
    );
    assert!(
        shown.contains("metadata compliance.matched = review"),
        "{shown}"
    );
    queue_cmd(&conf, &["delete", &c]);

    // Past max_age: still there, nothing tried, nothing bounced.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ids: Vec<String> = relay.spooled().into_iter().map(|s| s.id).collect();
    assert!(
        ids.contains(&a) && ids.contains(&b) && !ids.contains(&c),
        "{ids:?}"
    );
    assert!(sink.messages().is_empty());

    // Released after max_age: delivered, not expired.
    queue_cmd(&conf, &["release", &a]);
    let got = sink.wait_for(1, Duration::from_secs(20)).await;
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: a"));
    assert_eq!(got[0].rcpts, ["ann@partner.test"]);

    // b goes once its retention has passed, without a bounce.
    let gone = eventually(Duration::from_secs(20), || {
        relay.spooled().is_empty().then_some(())
    })
    .await;
    assert!(gone.is_some(), "{:?}", relay.spooled().len());
    assert!(
        relay
            .log()
            .contains("quarantined message removed after its retention"),
        "{}",
        relay.log()
    );
    let archive_swept = eventually(Duration::from_secs(20), || {
        files_below(&dir.path().join("archive/archive"))
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(
        archive_swept.is_some(),
        "archived files past their retention"
    );
    assert!(dir.path().join("archive/archive").is_dir());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.messages().len(), 1, "no bounce for b, c or a");
}

/// The footer corpus: every MIME shape gets its footer, and Python's email
/// package (policy.default) parses the result with the same parts, the
/// attachments byte-identical after decoding.
#[test]
fn footered_corpus_parses_in_python_with_parts_and_attachments_kept() {
    let pdf = base64_lines(b"%PDF-1.4\n\x00\x01\x02binary\xff\n%%EOF\n");
    let png = base64_lines(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR");
    let corpus: Vec<(&str, String)> = vec![
        ("plain 7bit", "Subject: a\r\n\r\nhello\r\n".into()),
        (
            "plain 8bit utf-8",
            "Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n".into(),
        ),
        (
            "latin-1 quoted-printable",
            "Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nGr=FC=DFe aus K=F6ln\r\n".into(),
        ),
        (
            "base64 windows-1252",
            format!("Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=windows-1252\r\nContent-Transfer-Encoding: base64\r\n\r\n{}", base64_lines(b"caf\xe9 \x80 10\r\n")),
        ),
        (
            "alternative",
            "Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nplain\r\n--b\r\nContent-Type: text/html\r\n\r\n<html><body><p>html</p></body></html>\r\n--b--\r\n".into(),
        ),
        (
            "related",
            format!("Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: multipart/related; boundary=\"r\"\r\n\r\n--r\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body><img src=\"cid:logo\"></body></html>\r\n--r\r\nContent-Type: image/png\r\nContent-ID: <logo>\r\nContent-Transfer-Encoding: base64\r\n\r\n{png}--r--\r\n"),
        ),
        (
            "mixed with attachments",
            format!("Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\nContent-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nsee =E9\r\n--b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{}--b--\r\n--m\r\nContent-Type: application/pdf; name=\"a.pdf\"\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{pdf}--m\r\nContent-Type: text/plain; name=\"notes.txt\"\r\nContent-Disposition: attachment; filename=\"notes.txt\"\r\n\r\nattached notes stay as they are\r\n--m--\r\n", base64_lines("<html><body><p>voilà</p></body></html>".as_bytes())),
        ),
        (
            "signed",
            "Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol=\"application/pgp-signature\"; micalg=pgp-sha256; boundary=\"s\"\r\n\r\n--s\r\nContent-Type: text/plain\r\n\r\nsigned\r\n--s\r\nContent-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\nx\r\n-----END PGP SIGNATURE-----\r\n--s--\r\n".into(),
        ),
    ];
    let edits = BodyEdits {
        footers: vec![Footer {
            text: "Confidentiel — for the addressee only.".into(),
            html: "<p>Confidentiel — for the addressee only.</p>".into(),
        }],
        removed: vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, (name, raw)) in corpus.iter().enumerate() {
        let out = body::apply(raw.as_bytes(), &edits);
        if *name == "signed" {
            assert_eq!(out, raw.as_bytes(), "a signed message is left alone");
        }
        let before = dir.path().join(format!("{i}.in.eml"));
        let after = dir.path().join(format!("{i}.out.eml"));
        std::fs::write(&before, raw).unwrap();
        std::fs::write(&after, &out).unwrap();
        files.push((name.to_string(), before, after));
    }
    // For each pair: the part count, each attachment's decoded bytes, and
    // whether every text body has the footer (decoded in its charset).
    let script = r#"
import sys, email, json
from email import policy
def facts(path):
    with open(path, 'rb') as f:
        m = email.message_from_binary_file(f, policy=policy.default)
    parts = list(m.walk())
    atts = [p.get_payload(decode=True).hex() for p in m.iter_attachments()] if m.is_multipart() else []
    bodies = [p.get_content() for p in parts
              if p.get_content_maintype() == 'text' and not p.is_attachment() and p.get_content_subtype() in ('plain', 'html')]
    defects = [str(d) for p in parts for d in p.defects]
    return {'parts': len(parts), 'attachments': atts, 'bodies': bodies, 'defects': defects}
out = []
for before, after in zip(sys.argv[1::2], sys.argv[2::2]):
    out.append({'before': facts(before), 'after': facts(after)})
print(json.dumps(out))
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]);
    for (_, before, after) in &files {
        cmd.arg(before).arg(after);
    }
    let out = cmd.output().expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for ((name, ..), r) in files.iter().zip(&results) {
        let (before, after) = (&r["before"], &r["after"]);
        assert_eq!(before["parts"], after["parts"], "{name}: part count");
        assert_eq!(
            before["attachments"], after["attachments"],
            "{name}: attachments"
        );
        assert_eq!(after["defects"], serde_json::json!([]), "{name}");
        let bodies = after["bodies"].as_array().unwrap();
        assert!(!bodies.is_empty(), "{name}");
        for (b, orig) in bodies.iter().zip(before["bodies"].as_array().unwrap()) {
            let (b, orig) = (b.as_str().unwrap(), orig.as_str().unwrap());
            if name == "signed" {
                assert_eq!(b, orig, "{name}");
                continue;
            }
            assert!(
                b.contains("Confidentiel — for the addressee only."),
                "{name}: {b}"
            );
            // The original text is all still there, decoded the same.
            let kept = orig.trim_end().replace("</body></html>", "");
            assert!(b.contains(kept.trim_end()), "{name}: {orig:?} not in {b:?}");
        }
    }
}

/// Signing comes after the data hook's edits: mail from corp.test gets the
/// disclaimer from the compliance plugin and a DKIM signature from the
/// relay, and dkimpy at the sink finds the signature good over the
/// footered body (and bad once the footer is taken out again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_footered_message_is_signed_after_the_footer() {
    use crate::dkim::{as_str, dkimpy_verify, keygen};
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let dns = crate::support::dns::DnsServer::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let key = dir.path().join("corp.pem");
    let record = keygen("corp.test", "s1", "rsa", &key);
    dns.txt_strings("s1._domainkey.corp.test", &as_str(&record));
    let dkim = format!(
        "[dkim]\n[[dkim.key]]\ndomain = \"corp.test\"\nselector = \"s1\"\nkey = \"{}\"\n",
        key.display()
    );
    let relay = relay_to(sink.addr, &dir, &dkim, &["compliance"], COMPLIANCE);
    let r = send_message(
        relay.addr(),
        "jo@corp.test",
        &["ann@partner.test"],
        "From: Jo <jo@corp.test>\r\nTo: <ann@partner.test>\r\nSubject: terms\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <terms@corp.test>\r\n\r\n\
         The terms are agreed.\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    let got = sink.wait_for(1, Duration::from_secs(30)).await;
    let text = String::from_utf8_lossy(&got[0].data).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase().contains("dkim-signature:") && head.contains("d=corp.test"),
        "{head}"
    );
    assert!(
        body.starts_with("The terms are agreed.") && body.contains("Confidential: corp.test"),
        "{body}"
    );
    let verdict = dkimpy_verify(dns.addr.port(), &got[0]);
    assert_eq!(verdict, (1, vec![true]), "dkimpy on\n{text}");

    // The same signature over the body without the footer does not verify:
    // it covers the footer.
    let mut unfootered = got[0].clone();
    let cut = body.find("Confidential").unwrap();
    unfootered.data = format!("{head}\r\n\r\n{}", &body[..cut]).into_bytes();
    assert_eq!(
        dkimpy_verify(dns.addr.port(), &unfootered),
        (1, vec![false])
    );
}

/// A message near the 25 MB limit, a 24 MB CSV attachment: the plugin reads
/// it in ranges within its 64 MB memory cap and its 20 s deadline. The card
/// numbers rule wants three, placed at the start, the middle and the end,
/// so a refusal shows the whole attachment was read; with the last one
/// spoiled the message is accepted and reaches the sink as sent, but for
/// the disclaimer in its text part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_25_mb_message_is_scanned_footered_and_delivered_intact() {
    let chain = "[[plugin]]\nname = \"compliance\"\npath = \"compliance.wasm\"\nmemory_mb = 64\n\
                 timeouts = { data = 20000 }\n[plugin.config]\n\
                 rules = [\n\
                 { name = \"cards\", data = \"cards\", min_count = 3, action = \"reject\" },\n\
                 { name = \"disclaimer\", sender_domains = [\"corp.test\"], action = \"footer\", text = \"Confidential: corp.test\" },\n\
                 ]\n";
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let relay = relay_to(sink.addr, &dir, "", &["compliance"], chain);

    let line = format!("{},{}\r\n", "7".repeat(40), "row of figures".repeat(3));
    let rows = 24 * 1024 * 1024 / line.len();
    let mut csv = String::with_capacity(rows * line.len() + 200);
    csv.push_str("card 4111111111111111\r\n");
    for i in 0..rows {
        if i == rows / 2 {
            csv.push_str("middle 5555555555554444\r\n");
        }
        csv.push_str(&line);
    }
    csv.push_str("last 378282246310005\r\n");
    let message = |csv: &str| {
        format!(
            "Subject: figures\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n\
             --m\r\nContent-Type: text/plain\r\n\r\nfigures attached\r\n\
             --m\r\nContent-Type: text/csv; name=\"figures.csv\"\r\n\
             Content-Disposition: attachment; filename=\"figures.csv\"\r\n\r\n{csv}--m--\r\n"
        )
    };
    let three = message(&csv);
    assert!(three.len() > 24 * 1024 * 1024, "{}", three.len());
    let started = std::time::Instant::now();
    let r = send_message(relay.addr(), "jo@corp.test", &["ann@partner.test"], &three);
    assert!(r.starts_with("550 5.7.1"), "{r}");
    let two = message(&csv.replace("last 378282246310005", "last 378282246310006"));
    drop(three);
    let r = send_message(relay.addr(), "jo@corp.test", &["ann@partner.test"], &two);
    assert!(r.starts_with("250"), "{r}");
    eprintln!("both 25 MB messages answered in {:?}", started.elapsed());

    let got = sink.wait_for(1, Duration::from_secs(60)).await;
    let text = String::from_utf8_lossy(&got[0].data);
    assert_eq!(got[0].rcpts, ["ann@partner.test"]);
    // Our Received: first, then the message as sent but for the footer.
    let delivered = &text[text.find("Subject: figures").expect("the message")..];
    let (head, tail) = two.split_at(two.find("--m\r\nContent-Type: text/csv").unwrap());
    assert!(
        delivered.ends_with(tail),
        "the attachment changed on the way"
    );
    // The text part (its Content-Type may gain a charset) with the footer
    // after its text, and nothing else added.
    let text_part = &delivered[..delivered.len() - tail.len()];
    let part_head = "--m\r\nContent-Type: text/plain";
    let top = &head[..head.find(part_head).unwrap() + part_head.len()];
    assert!(text_part.starts_with(top), "{text_part}");
    let text_at = text_part.find("\r\n\r\nfigures attached\r\n").unwrap();
    assert!(
        text_part[text_at..].contains("Confidential: corp.test"),
        "{text_part}"
    );
    assert!(text_part.len() < head.len() + 100, "{text_part}");
}

/// The archive plugin's journal mode: the journal address is added as an
/// envelope recipient, so the copy reaches the next hop beside the original
/// recipients' (a Bcc recipient included), and the original envelope is
/// kept in the transaction metadata `envelope`, which `postern queue show`
/// prints while the message waits, not in a header every recipient sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_recipient_gets_the_copy_with_the_original_envelope_recorded() {
    let chain =
        "[[plugin]]\nname = \"archive\"\npath = \"archive.wasm\"\ngrants = [\"recipients\"]\n\
                 [plugin.config]\njournal = \"journal@vault.test\"\n";
    // Nothing listens at the next hop at first, so the message waits in
    // the queue where its record can be read.
    let next_hop: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let relay = relay_to(next_hop, &dir, "", &["archive"], chain);
    let r = send_message(
        relay.addr(),
        "jo@origin.test",
        &["ann@partner.test", "bob@partner.test"],
        "From: jo@origin.test\r\nTo: ann@partner.test\r\nSubject: journalled\r\n\r\nFor the record.\r\n",
    );
    let id = queue_id(&r);
    let shown = queue_cmd(&dir.path().join("postern.toml"), &["show", &id]);
    let line = shown
        .lines()
        .find(|l| l.contains("metadata archive.envelope = "))
        .unwrap_or_else(|| panic!("no envelope in\n{shown}"));
    let json = line.split_once(" = ").unwrap().1.replace("\\\"", "\"");
    let envelope: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        envelope,
        serde_json::json!({"sender": "jo@origin.test", "recipients": ["ann@partner.test", "bob@partner.test"]}),
        "{shown}"
    );

    let sink = Sink::start_on(next_hop, Options::new(Behavior::Accept)).await;
    let rcpts = eventually(Duration::from_secs(30), || {
        let rcpts = sink.recipients();
        (rcpts.len() >= 3).then_some(rcpts)
    })
    .await
    .expect("the message for three recipients at the sink");
    assert_eq!(
        rcpts,
        ["ann@partner.test", "bob@partner.test", "journal@vault.test"]
    );
    for m in &sink.messages() {
        assert_eq!(m.from, "jo@origin.test");
        let text = String::from_utf8_lossy(&m.data);
        assert!(
            text.contains("Subject: journalled") && text.contains("For the record."),
            "{text}"
        );
        assert!(
            !text.contains("bob@partner.test"),
            "the Bcc recipient shows: {text}"
        );
    }
}
