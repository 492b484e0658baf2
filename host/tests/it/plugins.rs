//! The plugin runtime end to end: real components built from the workspace,
//! a relay started as a library, SMTP over TCP.

#[path = "support/plugins.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{queue_id, Relay, MESSAGE};

/// A testkit plugin; it uses the kv store (its `count` option), so it gets
/// the kv grant unless `extra` gives other grants.
fn testkit(config: &str, extra: &str) -> String {
    let grants = if extra.contains("grants") {
        ""
    } else {
        "grants = [\"kv\"]"
    };
    format!(
        "[[plugin]]\nname = \"kit\"\npath = \"testkit.wasm\"\n{grants}\n{extra}\n[plugin.config]\n{config}\n"
    )
}

/// One verdict per hook: each refusal arrives with the plugin's own reply,
/// `accept` lets the transaction through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verdict_at_every_hook() -> anyhow::Result<()> {
    let relay = Relay::start("").await?;
    for hook in ["connect", "mail_from", "rcpt", "data"] {
        for (verdict, code, enhanced) in [
            ("reject", 554, "5.7.1"),
            ("tempfail", 451, "4.7.1"),
            ("disconnect", 421, "4.7.0"),
            ("accept", 0, ""),
        ] {
            relay
                .set_chain(&testkit(
                    &format!("{hook} = {{ verdict = \"{verdict}\", code = {code}, enhanced = \"{enhanced}\", text = \"{verdict} at {hook}\" }}"),
                    "",
                ))
                .await?;
            let (mut c, banner) = relay.client().await?;
            let last = if hook == "connect" {
                banner
            } else {
                c.send("a@b.test", &["c@local.test"], MESSAGE).await?
            };
            if verdict == "accept" {
                let expected = if hook == "connect" { 220 } else { 250 };
                assert_eq!(last.code, expected, "{hook}/{verdict}: {last:?}");
            } else {
                assert_eq!(last.code, code, "{hook}/{verdict}: {last:?}");
                assert!(
                    last.text
                        .contains(&format!("{enhanced} {verdict} at {hook}")),
                    "{last:?}"
                );
            }
            if verdict == "disconnect" {
                assert!(
                    c.cmd("NOOP").await.is_err(),
                    "{hook}: still connected after disconnect"
                );
            }
        }
    }
    Ok(())
}

/// `accept` from a plugin at RCPT never opens relaying the access rules refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_does_not_open_relaying() -> anyhow::Result<()> {
    let relay = Relay::start_with(&testkit("rcpt = { verdict = \"accept\" }", ""), false).await?;
    let (mut c, _) = relay.client().await?;
    c.cmd("EHLO client.test").await?;
    c.cmd("MAIL FROM:<a@b.test>").await?;
    let r = c.cmd("RCPT TO:<user@elsewhere.test>").await?;
    assert_eq!(r.code, 554, "{r:?}");
    assert_eq!(c.cmd("RCPT TO:<user@local.test>").await?.code, 250);
    Ok(())
}

/// Header and recipient edits of the data hook are in the spooled message and
/// envelope; a later plugin sees the edits of an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_edits_reach_the_spool() -> anyhow::Result<()> {
    let chain = "[[plugin]]\nname = \"first\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n[plugin.config]\n\
         data = { add_header = [\"X-Scanned\", \"yes\"], remove_header = \"X-Drop\", add_rcpt = \"audit@local.test\", remove_rcpt = \"c@local.test\", quarantine = \"looks odd\" }\n\
         [[plugin]]\nname = \"second\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n[plugin.config]\n\
         data = { remove_header = \"X-Scanned\", add_header = [\"X-Second\", \"saw it\"] }\n";
    let relay = Relay::start(chain).await?;
    let (mut c, _) = relay.client().await?;
    let r = c
        .send("a@b.test", &["c@local.test", "d@local.test"], MESSAGE)
        .await?;
    assert_eq!(r.code, 250, "{r:?}");
    let id = queue_id(&r).expect("queue id");
    let (meta, message) = relay.spooled(&id)?;
    let (headers, body) = message.split_once("\r\n\r\n").expect("header/body split");
    assert!(headers.starts_with("Received: "), "{headers}");
    assert!(headers.contains("\r\nX-Second: saw it\r\n"), "{headers}");
    assert!(
        !headers.contains("X-Scanned"),
        "the second plugin removed it: {headers}"
    );
    assert!(!headers.contains("X-Drop"), "{headers}");
    assert!(headers.contains("Subject: hello"), "{headers}");
    assert_eq!(body, "hi there\r\n");
    let meta = meta.to_string();
    assert!(
        meta.contains("audit@local.test") && meta.contains("d@local.test"),
        "{meta}"
    );
    assert!(!meta.contains("\"c@local.test\""), "{meta}");
    assert!(meta.contains("looks odd"), "{meta}");
    Ok(())
}

/// A recipient a data-hook plugin adds faces the access rules RCPT does: a
/// client that may not relay cannot have mail sent to another domain through
/// a plugin, while a local address is fine; a trusted client may have both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_added_by_plugins_obey_the_access_rules() -> anyhow::Result<()> {
    let chain = |rcpt: &str| testkit(&format!("data = {{ add_rcpt = \"{rcpt}\" }}"), "");
    for (trusted, added, kept) in [
        (false, "copy@elsewhere.test", false),
        (false, "copy@local.test", true),
        (true, "copy@elsewhere.test", true),
    ] {
        let relay = Relay::start_with(&chain(added), trusted).await?;
        let (mut c, _) = relay.client().await?;
        let r = c.send("a@b.test", &["c@local.test"], MESSAGE).await?;
        assert_eq!(r.code, 250, "{r:?}");
        let (meta, _) = relay.spooled(&queue_id(&r).expect("queue id"))?;
        let meta = meta.to_string();
        assert!(meta.contains("\"c@local.test\""), "{meta}");
        assert_eq!(
            meta.contains(added),
            kept,
            "trusted={trusted} {added}: {meta}"
        );
    }
    Ok(())
}

/// An instance is lent to one transaction at a time: two sessions whose
/// commands interleave each get their own instance, which runs that
/// transaction's mail-from, rcpt and data hooks and nothing else meanwhile.
/// With `instances = "per-call"` one instance takes every call in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_serves_one_transaction_at_a_time() -> anyhow::Result<()> {
    // The calls and transactions the instance had seen at each data hook.
    for (instances, seen) in [
        ("transaction", [(4, 1), (4, 1)]),
        ("per-call", [(6, 2), (7, 2)]),
    ] {
        let extra = format!("instances = \"{instances}\"");
        let relay = Relay::start(&testkit("tag_instance = true", &extra)).await?;
        let (mut a, _) = relay.client().await?;
        let (mut b, _) = relay.client().await?;
        for c in [&mut a, &mut b] {
            c.cmd("EHLO client.test").await?;
        }
        for c in [&mut a, &mut b] {
            assert_eq!(c.cmd("MAIL FROM:<s@b.test>").await?.code, 250);
        }
        for c in [&mut a, &mut b] {
            assert_eq!(c.cmd("RCPT TO:<r@local.test>").await?.code, 250);
        }
        for c in [&mut a, &mut b] {
            assert_eq!(c.cmd("RCPT TO:<q@local.test>").await?.code, 250);
        }
        for c in [&mut a, &mut b] {
            assert_eq!(c.cmd("DATA").await?.code, 354);
        }
        for (c, (calls, transactions)) in [&mut a, &mut b].into_iter().zip(seen) {
            let r = c.cmd("Subject: x\r\n\r\nbody\r\n.").await?;
            assert_eq!(r.code, 250, "{r:?}");
            let (_, message) = relay.spooled(&queue_id(&r).expect("queue id"))?;
            // Warm: mail-from, two rcpt, data, none from the other session.
            // Per call: the other session's calls are counted in between.
            for tag in [
                format!("\r\nX-Testkit-Calls: {calls}\r\n"),
                format!("\r\nX-Testkit-Transactions: {transactions}\r\n"),
            ] {
                assert!(message.contains(&tag), "{instances}: {message}");
            }
        }
        // The next transaction on a session starts over (on a pooled instance).
        let r = a
            .send("s@b.test", &["r@local.test"], "Subject: y\r\n\r\nbody\r\n")
            .await?;
        let (_, message) = relay.spooled(&queue_id(&r).expect("queue id"))?;
        assert!(
            message.contains("\r\nX-Testkit-Calls: 3\r\n"),
            "{instances}: {message}"
        );
    }
    Ok(())
}

/// A transaction-bound instance serves one transaction after another; with
/// `instances = "fresh"` each transaction gets a new one, so nothing a plugin
/// keeps in memory outlives the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_instances_keep_nothing_between_transactions() -> anyhow::Result<()> {
    for (instances, second) in [("transaction", "2"), ("fresh", "1")] {
        let extra = format!("instances = \"{instances}\"");
        let relay = Relay::start(&testkit("tag_instance = true", &extra)).await?;
        let (mut c, _) = relay.client().await?;
        for expected in ["1", second] {
            let r = c.send("s@b.test", &["r@local.test"], MESSAGE).await?;
            assert_eq!(r.code, 250, "{r:?}");
            let (_, message) = relay.spooled(&queue_id(&r).expect("queue id"))?;
            let header = format!("\r\nX-Testkit-Transactions: {expected}\r\n");
            assert!(message.contains(&header), "{instances}: {message}");
        }
    }
    Ok(())
}

/// The data hook's message API end to end, through a real component: the
/// subject, the MIME parts, the first text body, and an attachment's name,
/// type, size and decoded content read in small ranges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_api_shows_parts_and_attachments() -> anyhow::Result<()> {
    let relay = Relay::start(&testkit("inspect = true", "")).await?;
    let (mut c, _) = relay.client().await?;
    let message = "Subject: Report\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
                   --b\r\nContent-Type: text/plain\r\n\r\nhello world\r\n\
                   --b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=data.bin\r\n\
                   Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n--b--\r\n";
    let r = c.send("a@b.test", &["c@local.test"], message).await?;
    assert_eq!(r.code, 250, "{r:?}");
    let (_, spooled) = relay.spooled(&queue_id(&r).expect("queue id"))?;
    let expected = "X-Testkit-Inspect: subject=Report; parts=3; text=hello world; \
                    attachment=data.bin:application/octet-stream:6:000102030405\r\n";
    assert!(spooled.contains(expected), "{spooled}");
    Ok(())
}

/// A hook reads its session, envelope and recipient from the relay when it
/// first uses them, and gets the right ones; a hook asking for what it does
/// not have (the envelope at connect) traps and gets its on_error verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_read_their_context_on_request() -> anyhow::Result<()> {
    let relay = Relay::start(&testkit("show_context = true", "")).await?;
    let (mut c, _) = relay.client().await?;
    let r = c
        .send("a@b.test", &["c@local.test", "d@local.test"], MESSAGE)
        .await?;
    assert_eq!(r.code, 250, "{r:?}");
    let (_, spooled) = relay.spooled(&queue_id(&r).expect("queue id"))?;
    let expected = format!(
        "X-Testkit-Context: helo=client.test; peer=127.0.0.1; local-port={}; sender=a@b.test; rcpts=2\r\n",
        relay.addr.port()
    );
    assert!(spooled.contains(&expected), "{spooled}");
    // The rcpt hook read its recipient: it refuses one outside local.test
    // (which the access rules let through for this trusted client).
    let (mut c, _) = relay.client().await?;
    c.cmd("EHLO client.test").await?;
    c.cmd("MAIL FROM:<a@b.test>").await?;
    let r = c.cmd("RCPT TO:<x@other.test>").await?;
    assert_eq!(r.code, 550, "{r:?}");
    assert!(
        r.text.contains("testkit saw recipient x@other.test"),
        "{r:?}"
    );

    relay
        .set_chain(&testkit(
            "misbehave = { hook = \"connect\", how = \"envelope\" }",
            "on_error = \"reject\"",
        ))
        .await?;
    let (_, banner) = relay.client().await?;
    assert_eq!(banner.code, 550, "{banner:?}");
    Ok(())
}

/// A plugin that traps gets its on_error policy: tempfail (the default),
/// continue, reject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_gets_on_error() -> anyhow::Result<()> {
    let relay = Relay::start("").await?;
    for (on_error, code) in [("tempfail", 451), ("continue", 250), ("reject", 550)] {
        relay
            .set_chain(&testkit(
                "misbehave = { hook = \"rcpt\", how = \"trap\" }",
                &format!("on_error = \"{on_error}\""),
            ))
            .await?;
        let (mut c, _) = relay.client().await?;
        c.cmd("EHLO client.test").await?;
        c.cmd("MAIL FROM:<a@b.test>").await?;
        let r = c.cmd("RCPT TO:<c@local.test>").await?;
        assert_eq!(r.code, code, "{on_error}: {r:?}");
        if on_error == "tempfail" {
            assert!(r.text.starts_with("4.3.0"), "{r:?}");
        }
    }
    Ok(())
}

/// A plugin that loops forever is stopped at its deadline and answered with
/// its on_error verdict, while other sessions carry on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_loop_is_cut_at_the_deadline() -> anyhow::Result<()> {
    let relay = Relay::start(&testkit(
        "misbehave = { hook = \"data\", how = \"loop\" }",
        "timeouts = { data = 300 }",
    ))
    .await?;
    let looping = {
        let (mut c, _) = relay.client().await?;
        tokio::spawn(async move {
            let started = Instant::now();
            let r = c.send("a@b.test", &["c@local.test"], MESSAGE).await;
            (r, started.elapsed())
        })
    };
    // Meanwhile, other sessions get their answers promptly.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..3 {
        let started = Instant::now();
        let (mut c, _) = relay.client().await?;
        c.cmd("EHLO client.test").await?;
        let r = c.cmd("MAIL FROM:<a@b.test>").await?;
        assert_eq!(r.code, 250);
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }
    let (r, took) = looping.await?;
    let r = r?;
    assert_eq!(r.code, 451, "{r:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    Ok(())
}

/// A plugin that allocates without end hits its memory cap and is answered
/// with on_error; the next transaction gets a fresh instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_allocation_is_capped() -> anyhow::Result<()> {
    let relay = Relay::start(&testkit(
        "misbehave = { hook = \"rcpt\", how = \"alloc\" }",
        "memory_mb = 16\non_error = \"reject\"",
    ))
    .await?;
    for _ in 0..2 {
        let (mut c, _) = relay.client().await?;
        c.cmd("EHLO client.test").await?;
        c.cmd("MAIL FROM:<a@b.test>").await?;
        let r = c.cmd("RCPT TO:<c@local.test>").await?;
        assert_eq!(r.code, 550, "{r:?}");
    }
    let chain = relay.handle.current();
    let stats = chain.plugins()[0].stats.snapshot();
    let rcpt = stats.iter().find(|h| h.hook == "rcpt").expect("rcpt stats");
    assert_eq!(rcpt.errors, vec![("memory".to_string(), 2)], "{rcpt:?}");
    Ok(())
}

/// A plugin that imports an interface it was not granted does not load, and
/// the error names the interface; the running chain stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ungranted_import_is_refused() -> anyhow::Result<()> {
    // `count = true` makes testkit use the kv store.
    let relay = Relay::start(&testkit("count = true", "grants = [\"kv\"]")).await?;
    let err = relay
        .set_chain(&testkit("count = true", "grants = [\"log\"]"))
        .await
        .expect_err("loading without the kv grant");
    let text = err.to_string();
    assert!(
        text.contains("postern:relay/kv") && text.contains("kit"),
        "{text}"
    );
    // The previous chain (with the grant) still runs and counts.
    let (mut c, _) = relay.client().await?;
    assert_eq!(
        c.send("a@b.test", &["c@local.test"], MESSAGE).await?.code,
        250
    );
    Ok(())
}

/// A reply with CR/LF in it, or a code that does not fit the verdict, is
/// refused: the client sees the on_error reply, never the injected line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_injection_is_refused() -> anyhow::Result<()> {
    let relay = Relay::start("").await?;
    for answer in [
        "rcpt = { verdict = \"reject\", code = 550, enhanced = \"5.7.1\", text = \"no\\r\\n250 2.1.5 Ok\" }",
        "rcpt = { verdict = \"reject\", code = 250, enhanced = \"2.0.0\", text = \"sneaky\" }",
        "rcpt = { verdict = \"tempfail\", code = 550, enhanced = \"5.7.1\", text = \"wrong class\" }",
    ] {
        relay.set_chain(&testkit(answer, "")).await?;
        let (mut c, _) = relay.client().await?;
        c.cmd("EHLO client.test").await?;
        c.cmd("MAIL FROM:<a@b.test>").await?;
        let r = c.cmd("RCPT TO:<c@local.test>").await?;
        assert_eq!(r.code, 451, "{answer}: {r:?}");
        assert!(!r.text.contains("Ok") && !r.text.contains("sneaky"), "{r:?}");
        // The session is still in sync: the next command gets its own reply.
        assert_eq!(c.cmd("NOOP").await?.code, 250);
    }
    // A header edit with a line break is refused too (the plugin answers 554).
    relay
        .set_chain(&testkit(
            "data = { add_header = [\"X-Evil\", \"a\\r\\nBcc: x@y.test\"] }",
            "",
        ))
        .await?;
    let (mut c, _) = relay.client().await?;
    let r = c.send("a@b.test", &["c@local.test"], MESSAGE).await?;
    assert_eq!(r.code, 554, "{r:?}");
    Ok(())
}

/// The first-party blocklist plugin, as the SDK example writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocklist_refuses_listed_domains() -> anyhow::Result<()> {
    let relay = Relay::start(
        "[[plugin]]\nname = \"blocklist\"\npath = \"blocklist.wasm\"\n[plugin.config]\ndomains = [\"Blocked.Test\"]\nsender_domains = [\"junk.test\"]\n",
    )
    .await?;
    let (mut c, _) = relay.client().await?;
    c.cmd("EHLO client.test").await?;
    assert_eq!(c.cmd("MAIL FROM:<x@junk.test>").await?.code, 550);
    assert_eq!(c.cmd("MAIL FROM:<x@fine.test>").await?.code, 250);
    let r = c.cmd("RCPT TO:<u@blocked.test>").await?;
    assert_eq!(r.code, 550);
    assert!(r.text.contains("recipient domain is blocked"), "{r:?}");
    assert_eq!(c.cmd("RCPT TO:<u@local.test>").await?.code, 250);
    let chain = relay.handle.current();
    let hooks = &chain.plugins()[0].hooks;
    assert_eq!(hooks.len(), 2, "only the hooks it writes: {hooks:?}");
    Ok(())
}

/// Replacing the chain while clients send: no transaction fails, sessions
/// that started before the swap finish on the old chain, new ones get the new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_while_sending() -> anyhow::Result<()> {
    let relay = std::sync::Arc::new(
        Relay::start("[[plugin]]\nname = \"gate\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n[plugin.config]\n").await?,
    );
    // A session that starts on the old chain and sends after the swap.
    let (mut early, _) = relay.client().await?;
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let relay = relay.clone();
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..15 {
                    let (mut c, _) = relay.client().await?;
                    let r = c.send("a@b.test", &["c@local.test"], MESSAGE).await?;
                    // Either chain accepts local.test; nothing may fail.
                    anyhow::ensure!(r.code == 250, "{r:?}");
                    ok += 1;
                }
                anyhow::Ok(ok)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    // The new chain refuses other.test.
    relay
        .set_chain(
            "[[plugin]]\nname = \"gate\"\npath = \"blocklist.wasm\"\n[plugin.config]\ndomains = [\"other.test\"]\n",
        )
        .await?;
    let mut sent = 0;
    for s in senders {
        sent += s.await??;
    }
    assert_eq!(sent, 60);
    let r = early.send("a@b.test", &["x@other.test"], MESSAGE).await?;
    assert_eq!(r.code, 250, "the early session keeps the old chain: {r:?}");
    let (mut late, _) = relay.client().await?;
    late.cmd("EHLO client.test").await?;
    late.cmd("MAIL FROM:<a@b.test>").await?;
    assert_eq!(late.cmd("RCPT TO:<x@other.test>").await?.code, 550);
    Ok(())
}

/// Each route verdict through `Chain::route`, as delivery calls it; a failing
/// route plugin is refused with its on_error reply, never routed by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_verdict() -> anyhow::Result<()> {
    use postern::envelope::{Address, Envelope, MailParams, Recipient};
    use postern::policy::{Queued, Route, RouteQuery};
    use postern::queue::QueueId;

    let relay = Relay::start("").await?;
    let envelope = Envelope::new(Address("a@b.test".into()), MailParams::default());
    let id = QueueId::generate();
    let metadata = std::sync::Arc::default();
    let queued = || Queued {
        id: &id,
        envelope: &envelope,
        client: None,
        metadata: &metadata,
    };
    let rcpt = Recipient::new("user@dest.test");
    let headers = b"Subject: hi\r\nX-Folder: by\r\n header\r\nFrom: a@b.test\r\n\r\n";
    for (config, expected) in [
        (
            "route = { route = \"mx\", arg = \"mx.other.test\" }",
            Route::Mx("mx.other.test".into()),
        ),
        (
            "route = { route = \"smarthost\", arg = \"smtp://127.0.0.1:2626\" }",
            Route::Smarthost("smtp://127.0.0.1:2626".into()),
        ),
        (
            "route = { route = \"local-folder\", arg = \"inbox/b\" }",
            Route::LocalFolder("inbox/b".into()),
        ),
        ("route = { route = \"discard\" }", Route::Discard),
        // The header section reaches the plugin, folded fields unfolded.
        (
            "route = { route = \"folder-from-header\", arg = \"x-folder\" }",
            Route::LocalFolder("by header".into()),
        ),
        (
            "route = { route = \"reject\", code = 550, enhanced = \"5.1.2\", text = \"gone\" }",
            Route::Reject(postern::smtp::reply::Reply::new(550, "5.1.2", "gone")),
        ),
        ("route = { route = \"default\" }", Route::Default),
        // A folder outside the local delivery folder is refused (on_error).
        (
            "route = { route = \"local-folder\", arg = \"../../etc\" }",
            Route::Reject(postern::smtp::reply::Reply::PLUGIN_TEMPFAIL),
        ),
        (
            "misbehave = { hook = \"route\", how = \"trap\" }",
            Route::Reject(postern::smtp::reply::Reply::PLUGIN_TEMPFAIL),
        ),
    ] {
        relay.set_chain(&testkit(config, "")).await?;
        let route = relay
            .handle
            .current()
            .lease()
            .route(RouteQuery {
                queued: queued(),
                recipient: &rcpt,
                headers,
            })
            .await;
        assert_eq!(route, expected.into(), "{config}");
    }
    // The first-party router, by recipient domain.
    relay
        .set_chain(
            "[[plugin]]\nname = \"router\"\npath = \"router.wasm\"\n[plugin.config.routes]\n\"dest.test\" = \"local:archive\"\n\"*\" = \"smtp://gw.test:587\"\n",
        )
        .await?;
    let mut hooks = relay.handle.current().lease();
    let q = |r| RouteQuery {
        queued: queued(),
        recipient: r,
        headers,
    };
    assert_eq!(
        hooks.route(q(&rcpt)).await,
        Route::LocalFolder("archive".into()).into()
    );
    let other = Recipient::new("x@Other.Test");
    assert_eq!(
        hooks.route(q(&other)).await,
        Route::Smarthost("smtp://gw.test:587".into()).into()
    );
    Ok(())
}

/// Writing a new `.wasm` over a plugin in the watched folder changes what new
/// sessions get within a second, and the compiled form is cached in a private
/// folder so the next load does not compile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_wasm_is_picked_up_by_the_watcher() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let chain = "[[plugin]]\nname = \"gate\"\npath = \"gate.wasm\"\n[plugin.config]\ndomains = [\"other.test\"]\n";
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins)?;
    // First the router (no rcpt hook: everything passes), then the blocklist.
    std::fs::copy(
        support::wasm_dir().join("router.wasm"),
        plugins.join("gate.wasm"),
    )?;
    let first = "[[plugin]]\nname = \"gate\"\npath = \"gate.wasm\"\n[plugin.config.routes]\n\"x.test\" = \"mx\"\n";
    let cache = dir.path().join("cache");
    let config_text = |chain: &str| {
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[relay]\nnetworks = [\"127.0.0.0/8\"]\n\
             [plugins]\ndir = \"plugins\"\ncache_dir = {cache:?}\n{chain}"
        )
    };
    let path = dir.path().join("postern.toml");
    std::fs::write(&path, config_text(first))?;
    let config = postern::config::Config::load(&path)?;
    let runtime = postern::plugins::Runtime::new(&config)?;
    let handle = std::sync::Arc::new(postern::plugins::ChainHandle::new(
        runtime.load_chain(&config).await?,
    ));
    let _reloader = postern::plugins::reload::Reloader::start(
        path.clone(),
        &config,
        runtime.clone(),
        handle.clone(),
    )?;
    let mode = std::fs::metadata(&cache)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(
        std::fs::read_dir(&cache)?.count(),
        1,
        "one compiled artifact cached"
    );

    // The config change alone (new plugin config) would fail with the router
    // (unknown key `domains`): write the new wasm first, then the config.
    let started = Instant::now();
    std::fs::write(&path, config_text(chain))?;
    std::fs::copy(
        support::wasm_dir().join("blocklist.wasm"),
        plugins.join("gate.wasm"),
    )?;
    loop {
        let current = handle.current();
        if current.plugins()[0]
            .hooks
            .contains(&postern::config::HookName::Rcpt)
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    eprintln!("new plugin serving after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(std::fs::read_dir(&cache)?.count(), 2);
    Ok(())
}

/// The archive plugin writes each message into its granted folder (a WASI
/// preopen), in a folder of the day, streaming it from the host a chunk at
/// a time, with its record beside it; the status the control socket serves
/// counts its calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_writes_into_its_granted_folder() -> anyhow::Result<()> {
    let relay = Relay::start(
        "[[plugin]]\nname = \"archive\"\npath = \"archive.wasm\"\ngrants = [\"archive\"]\ntimeouts = { data = 5000 }\n",
    )
    .await?;
    let (mut c, _) = relay.client().await?;
    // 200 KB in many lines, so the plugin must read it in several chunks.
    let line = format!("{}\n", "x".repeat(99));
    let body = format!("Message-ID: <m1@b.test>\n{MESSAGE}{}", line.repeat(2000));
    let r = c.send("a@b.test", &["c@local.test"], &body).await?;
    assert_eq!(r.code, 250, "{r:?}");
    let days = crate::compliance::files_below(&relay.dir.path().join("archive/archive"));
    let file = days
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "eml"))
        .expect("an .eml archived");
    let archived = std::fs::read_to_string(file)?;
    let record = std::fs::read_to_string(file.with_extension("json"))?;
    assert!(record.contains("\"sender\":\"a@b.test\""), "{record}");
    assert_eq!(days.len(), 3, "{days:?}");
    assert!(archived.starts_with("Received: "), "{}", &archived[..80]);
    assert!(archived.contains("Subject: hello\r\n"));
    assert!(archived.ends_with(&format!("{}\r\n", "x".repeat(99)).repeat(2000)));

    // Without the grant it refuses to load (its init finds no /archive).
    let err = relay
        .set_chain("[[plugin]]\nname = \"archive\"\npath = \"archive.wasm\"\n")
        .await
        .expect_err("no archive grant");
    assert!(err.to_string().contains("grant \"archive\""), "{err}");

    let status = postern::plugins::reload::status(&relay.handle);
    assert_eq!(status[0].name, "archive");
    assert_eq!(status[0].hooks, vec!["data".to_string()]);
    assert_eq!(status[0].stats[0].calls, 1);
    Ok(())
}
