//! SIGKILL while many clients send: every message that got a 250 must be in the
//! spool, whole, after a restart.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::inprocess::queue_cmd;
use crate::support::relay::{base_config, Relay};

/// One SMTP transaction that reports failures instead of panicking (the relay
/// dies under it). Returns the queue id from the 250.
fn try_send(addr: SocketAddr, body: &str) -> std::io::Result<String> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    let mut expect = |reader: &mut BufReader<TcpStream>, code: &str| -> std::io::Result<String> {
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        if line.starts_with(code) {
            Ok(line.clone())
        } else {
            Err(std::io::Error::other(line.clone()))
        }
    };
    expect(&mut reader, "220")?;
    writer.write_all(
        b"EHLO crash.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@other.test>\r\nDATA\r\n",
    )?;
    expect(&mut reader, "250")?;
    expect(&mut reader, "250")?;
    expect(&mut reader, "250")?;
    expect(&mut reader, "354")?;
    writer.write_all(body.as_bytes())?;
    writer.write_all(b".\r\n")?;
    let reply = expect(&mut reader, "250 2.0.0 Ok: queued as ")?;
    let _ = writer.write_all(b"QUIT\r\n");
    Ok(reply
        .trim_end()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    let mut relay = Relay::start("");
    let addr = relay.addr();
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..20 {
        let (acked, stop) = (acked.clone(), stop.clone());
        clients.push(std::thread::spawn(move || {
            // Clients send until the relay dies under them; `stop` is set just
            // before the kill, so only then are failures expected.
            for n in 0.. {
                let body = format!(
                    "Subject: client {client} message {n}\r\n\r\n{}\r\nend of {client}/{n}\r\n",
                    format!("{client:02}-{n:06} ").repeat(200)
                );
                match try_send(addr, &body) {
                    Ok(id) => {
                        acked.lock().unwrap().insert(id, body);
                    }
                    Err(_) if stop.load(Ordering::Relaxed) => return,
                    Err(e) => panic!("client {client} failed before the kill: {e}"),
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    relay.signal(9);
    relay.wait_exit(Duration::from_secs(10));
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "only {} messages were acknowledged before the kill",
        acked.len()
    );

    // Restart on the same spool: the lock of the dead process is gone, debris is cleaned.
    // The restarted relay writes state files through `.tmp` names of its
    // own as its deliveries are deferred, the same names when it defers the
    // same message: what is checked is that the crash's files are gone,
    // whatever has their names now.
    let debris: Vec<_> = tmp_files(&relay.spool().join("queue"));
    let restarted = Relay::start_in(relay.dir.clone(), relay.port, &base_config(relay.port, ""));
    let spooled = restarted.spooled();
    let by_id: HashMap<_, _> = spooled.iter().map(|s| (s.id.clone(), s)).collect();
    for (id, body) in &acked {
        let stored = by_id
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged message {id} missing after the crash"));
        let text = String::from_utf8_lossy(&stored.message);
        // Lines over 998 octets are folded before the message is spooled.
        let body = postern::smtp::codec::fold_long_lines(body.clone().into_bytes());
        assert!(
            text.ends_with(String::from_utf8_lossy(&body).as_ref()),
            "message {id} is not whole"
        );
    }
    let left: Vec<_> = debris
        .iter()
        .filter(|(p, crashed)| identity(p).as_ref() == Some(crashed))
        .map(|(p, _)| p)
        .collect();
    assert!(left.is_empty(), "debris of the crash left: {left:?}");
    eprintln!(
        "{} messages acknowledged before SIGKILL, all {} found whole; {} spooled in all; {} files of unfinished writes removed",
        acked.len(),
        acked.len(),
        spooled.len(),
        debris.len()
    );
}

/// A message file a crash cut short before its 250 (simulated by truncating
/// one) is found when delivery first loads it after the restart: moved to
/// `corrupt/`, never delivered, and the messages around it are untouched.
#[test]
fn a_file_cut_short_is_set_aside_after_a_restart() {
    damaged_file_is_set_aside(
        |path| {
            let len = std::fs::metadata(path).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(len - 5)
                .unwrap();
        },
        false,
    );
}

/// The same for a file whose name a power loss kept with one of the old
/// pooled message's blocks behind it (simulated by changing a byte of the
/// message): its bytes do not match the record's checksum, found when they
/// are read for the next attempt (here, `postern queue flush ID`).
#[test]
fn a_file_that_fails_its_checksum_is_set_aside_after_a_restart() {
    damaged_file_is_set_aside(
        |path| {
            let mut bytes = std::fs::read(path).unwrap();
            let body = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
            bytes[body + 2] ^= 0x20;
            std::fs::write(path, bytes).unwrap();
        },
        true,
    );
}

/// Sends two messages, kills the relay, damages the first one's file with
/// `damage` and restarts (then asks for a delivery attempt if `flush`): the
/// damaged one goes to `corrupt/` with a log line, the other stays queued.
fn damaged_file_is_set_aside(damage: impl Fn(&std::path::Path), flush: bool) {
    let mut relay = Relay::start("");
    let addr = relay.addr();
    let short = try_send(addr, "Subject: short\r\n\r\nthis one is damaged\r\n").unwrap();
    let whole = try_send(addr, "Subject: whole\r\n\r\nthis one stays\r\n").unwrap();
    relay.signal(9);
    relay.wait_exit(Duration::from_secs(10));
    damage(&relay.spool().join("queue").join(&short));

    let restarted = Relay::start_in(relay.dir.clone(), relay.port, &base_config(relay.port, ""));
    if flush {
        queue_cmd(&relay.dir.path().join("postern.toml"), &["flush", &short]);
    }
    let corrupt = restarted.spool().join("corrupt").join(&short);
    let started = std::time::Instant::now();
    // The log line is read from the relay's stderr by another thread: it may
    // come a moment after the file has moved.
    while !corrupt.exists()
        || !restarted
            .log()
            .contains("damaged message file moved to corrupt/")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the damaged file was not set aside and said so; log:\n{}",
            restarted.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ids: Vec<String> = restarted.spooled().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![whole], "only the whole message stays queued");
}

/// The files of unfinished writes (`.tmp`) in a spool folder, each with its
/// [`identity`].
fn tmp_files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, (u64, i64, i64))> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .filter_map(|p| identity(&p).map(|id| (p, id)))
        .collect()
}

/// Which file a path names: inode and change time. A file made later under
/// the same name differs in its change time even if it reuses the inode.
fn identity(path: &std::path::Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.ctime(), m.ctime_nsec()))
}
