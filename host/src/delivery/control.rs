//! `postern queue` commands. A running relay answers them on a Unix socket,
//! `control.sock` inside the spool folder (mode 0600, in a folder of mode 0700:
//! only the relay's user gets in), so changes go through the scheduler and never
//! race a delivery in flight. When no relay runs, the command locks the spool
//! itself and works on the files.
//!
//! The protocol is one JSON request line and one JSON response line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use super::state::{self, unix_now, Status};
use super::{Delivery, Error};
use crate::queue::{self, QueueId, Spool};
use crate::record::Record;

/// The socket's name inside the spool folder.
pub const SOCKET: &str = "control.sock";

/// A queue command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Every message.
    List,
    /// One message.
    Show {
        /// Queue id.
        id: String,
    },
    /// Retry now: one message, or all.
    Flush {
        /// Queue id; all when absent.
        id: Option<String>,
    },
    /// Remove without a bounce.
    Delete {
        /// Queue id.
        id: String,
    },
    /// Stop delivering until released.
    Hold {
        /// Queue id.
        id: String,
    },
    /// Undo hold (and a quarantine hold).
    Release {
        /// Queue id.
        id: String,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// The command succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Messages (list: all; show: one).
    #[serde(default)]
    pub entries: Vec<Entry>,
}

impl Response {
    fn ok(entries: Vec<Entry>) -> Response {
        Response {
            ok: true,
            error: None,
            entries,
        }
    }

    fn err(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            entries: Vec::new(),
        }
    }
}

/// One message as `postern queue list --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Queue id.
    pub id: String,
    /// Arrival, seconds since the epoch.
    pub received: u64,
    /// Seconds since arrival.
    pub age: u64,
    /// Message size in bytes.
    pub size: u64,
    /// Envelope sender ("" for the null sender).
    pub sender: String,
    /// Recipients with their state.
    pub recipients: Vec<RecipientEntry>,
    /// `queued` (no attempt yet or due now), `deferred` or `held`.
    pub state: String,
    /// Delivery passes so far.
    pub attempts: u32,
    /// Next attempt, seconds since the epoch; absent when held or due now.
    pub next_attempt: Option<u64>,
    /// The most recent reply about any recipient.
    pub last_reply: Option<String>,
    /// Why it is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_reason: Option<String>,
    /// The transaction record: session facts, envelope with parameters, the
    /// plugins' metadata (`show` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Record>,
}

/// One recipient in an [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientEntry {
    /// The address.
    pub address: String,
    /// `pending`, `deferred`, `delivered` or `failed`.
    pub state: Status,
    /// Attempts for this recipient.
    pub attempts: u32,
    /// Its last reply.
    pub last_reply: Option<String>,
}

fn parse_id(id: &str) -> Result<QueueId, queue::Error> {
    QueueId::parse(id).ok_or_else(|| queue::Error::Damaged {
        path: PathBuf::from(id),
        reason: "not a queue id".into(),
    })
}

/// Reads one message's entry from the spool files.
pub fn entry(queue_dir: &Path, id: &QueueId) -> Result<Entry, queue::Error> {
    let stored = queue::spool_load(&queue_dir.join(id.as_str()), id)?;
    let meta = stored.meta;
    let st = state::load(queue_dir, &meta, id).unwrap_or_else(|_| state::DeliveryState::new(&meta));
    let record = Record::of(&meta);
    let held = st.is_held(&meta);
    let now = unix_now();
    let state = if held {
        "held"
    } else if st.attempts > 0 && st.next_attempt > now {
        "deferred"
    } else {
        "queued"
    };
    let recipients: Vec<RecipientEntry> = meta
        .envelope
        .recipients
        .iter()
        .zip(&st.recipients)
        .map(|(r, s)| RecipientEntry {
            address: r.address.to_string(),
            state: s.status,
            attempts: s.attempts,
            last_reply: s.last_reply.clone(),
        })
        .collect();
    let last_reply = st
        .recipients
        .iter()
        .filter(|r| r.is_open())
        .chain(st.recipients.iter())
        .find_map(|r| r.last_reply.clone());
    Ok(Entry {
        id: id.to_string(),
        received: meta.received,
        age: now.saturating_sub(meta.received),
        size: meta.size,
        sender: meta.envelope.sender.to_string(),
        recipients,
        state: state.into(),
        attempts: st.attempts,
        next_attempt: (!held && st.next_attempt > now).then_some(st.next_attempt),
        last_reply,
        hold_reason: if st.held {
            Some("postern queue hold".into())
        } else if held {
            meta.hold.clone()
        } else {
            None
        },
        record: Some(record),
    })
}

/// Every message, oldest first (messages that vanish meanwhile are skipped,
/// damaged ones too, with a warning: the relay sets them aside when it meets
/// them).
pub fn list(queue_dir: &Path) -> Result<Vec<Entry>, queue::Error> {
    let mut out = Vec::new();
    for id in queue::list_ids(queue_dir)? {
        match entry(queue_dir, &id) {
            // The records stay out of a listing: `show` has them.
            Ok(e) => out.push(Entry { record: None, ..e }),
            Err(queue::Error::NotFound(_)) => {}
            Err(e @ queue::Error::Damaged { .. }) => {
                tracing::warn!(queue_id = %id, error = %e, "skipping a damaged message file")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Sets or clears the operator hold in a message's state file.
pub fn set_hold(queue_dir: &Path, id: &QueueId, hold: bool) -> Result<(), queue::Error> {
    let stored = queue::spool_load(&queue_dir.join(id.as_str()), id)?;
    let mut st = state::load(queue_dir, &stored.meta, id)
        .unwrap_or_else(|_| state::DeliveryState::new(&stored.meta));
    st.held = hold;
    if !hold {
        st.released = true;
        st.next_attempt = 0;
    }
    state::store(queue_dir, id, &st)
}

fn flush_file(queue_dir: &Path, id: &QueueId) -> Result<(), queue::Error> {
    let stored = queue::spool_load(&queue_dir.join(id.as_str()), id)?;
    let Ok(mut st) = state::load(queue_dir, &stored.meta, id) else {
        return Ok(());
    };
    if st.next_attempt != 0 {
        st.next_attempt = 0;
        state::store(queue_dir, id, &st)?;
    }
    Ok(())
}

/// Runs a request against a running relay's scheduler.
async fn handle(d: &Delivery, req: Request) -> Response {
    let dir = d.queue_dir().to_path_buf();
    let result = async {
        match req {
            // Reading every record of a large queue takes a while: off the
            // runtime, so deliveries and sessions go on meanwhile.
            Request::List => queue::off_runtime(move || list(&dir)).await,
            Request::Show { id } => {
                let id = parse_id(&id)?;
                queue::off_runtime(move || entry(&dir, &id).map(|e| vec![e])).await
            }
            Request::Flush { id } => {
                let id = id.as_deref().map(parse_id).transpose()?;
                d.flush(id.as_ref()).await.map(|_| Vec::new())
            }
            Request::Delete { id } => d.delete(&parse_id(&id)?).await.map(|_| Vec::new()),
            Request::Hold { id } => d.hold(&parse_id(&id)?).await.map(|_| Vec::new()),
            Request::Release { id } => d.release(&parse_id(&id)?).await.map(|_| Vec::new()),
        }
    }
    .await;
    match result {
        Ok(entries) => Response::ok(entries),
        Err(e) => Response::err(e),
    }
}

/// Runs a request on the spool files of a stopped relay (the caller holds the lock).
fn handle_direct(spool: &Spool, req: Request) -> Result<Vec<Entry>, queue::Error> {
    let dir = spool.root().join("queue");
    match req {
        Request::List => list(&dir),
        Request::Show { id } => entry(&dir, &parse_id(&id)?).map(|e| vec![e]),
        Request::Flush { id: Some(id) } => flush_file(&dir, &parse_id(&id)?).map(|_| Vec::new()),
        Request::Flush { id: None } => {
            for id in spool.list()? {
                flush_file(&dir, &id)?;
            }
            Ok(Vec::new())
        }
        Request::Delete { id } => {
            let id = parse_id(&id)?;
            if !dir.join(id.as_str()).exists() {
                return Err(queue::Error::NotFound(id));
            }
            state::remove_message(spool, &id).map(|_| Vec::new())
        }
        Request::Hold { id } => set_hold(&dir, &parse_id(&id)?, true).map(|_| Vec::new()),
        Request::Release { id } => set_hold(&dir, &parse_id(&id)?, false).map(|_| Vec::new()),
    }
}

/// Binds the control socket and answers requests until the process ends.
pub(super) fn serve(d: Delivery) -> Result<(), Error> {
    let path = d.spool_root().join(SOCKET);
    // We hold the spool lock, so a socket file left here is from a dead relay.
    let _ = std::fs::remove_file(&path);
    let io = |source| {
        Error::Spool(queue::Error::Io {
            path: path.clone(),
            source,
        })
    };
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let d = d.clone();
            tokio::spawn(async move {
                let (r, mut w) = conn.into_split();
                let mut line = String::new();
                // One bounded line: a stuck or hostile client cannot hold memory.
                let mut r = tokio::io::BufReader::new(r.take(64 * 1024));
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handle(&d, req).await,
                    Err(e) => Response::err(format!("bad request: {e}")),
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                let _ = w.write_all(&out).await;
            });
        }
    });
    Ok(())
}

/// How long a queue command waits for the control socket of a relay that
/// holds the spool but does not answer yet (starting, or stopping).
const SOCKET_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs a queue command: through the control socket when a relay is running
/// on this spool, else directly on the files (with the spool locked).
pub fn run(spool_root: &Path, req: Request) -> Result<Vec<Entry>, String> {
    let sock = spool_root.join(SOCKET);
    let deadline = std::time::Instant::now() + SOCKET_WAIT;
    let mut said = false;
    loop {
        match run_once(spool_root, &sock, &req) {
            Ok(entries) => return Ok(entries),
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::Locked) if std::time::Instant::now() >= deadline => {
                let (spool, sock) = (spool_root.display(), sock.display());
                let wait = SOCKET_WAIT.as_secs();
                return Err(format!(
                    "a relay holds the spool {spool} but its control socket {sock} did not answer within {wait}s"
                ));
            }
            Err(Attempt::Locked) => {
                if !said {
                    let (spool, wait) = (spool_root.display(), SOCKET_WAIT.as_secs());
                    eprintln!(
                        "postern: a relay holds the spool {spool} and its control socket does not answer yet; waiting up to {wait}s"
                    );
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Why one try at a queue command did not answer.
enum Attempt {
    /// A relay holds the spool and its socket does not answer: try again.
    Locked,
    /// A final answer.
    Failed(String),
}

fn run_once(spool_root: &Path, sock: &Path, req: &Request) -> Result<Vec<Entry>, Attempt> {
    if let Ok(mut conn) = std::os::unix::net::UnixStream::connect(sock) {
        let fail = |e: String| Attempt::Failed(e);
        let mut line = serde_json::to_vec(req).map_err(|e| fail(e.to_string()))?;
        line.push(b'\n');
        conn.write_all(&line)
            .map_err(|e| fail(format!("{}: {e}", sock.display())))?;
        let mut answer = String::new();
        BufReader::new(conn)
            .read_line(&mut answer)
            .map_err(|e| fail(format!("{}: {e}", sock.display())))?;
        let resp: Response = serde_json::from_str(&answer)
            .map_err(|e| fail(format!("{}: bad answer: {e}", sock.display())))?;
        return if resp.ok {
            Ok(resp.entries)
        } else {
            Err(fail(resp.error.unwrap_or_else(|| "failed".into())))
        };
    }
    if !spool_root.join("queue").is_dir() {
        return Err(Attempt::Failed(format!(
            "{}: no spool here",
            spool_root.display()
        )));
    }
    let spool = Spool::open(spool_root).map_err(|e| match e {
        queue::Error::Locked(_) => Attempt::Locked,
        e => Attempt::Failed(e.to_string()),
    })?;
    handle_direct(&spool, req.clone()).map_err(|e| Attempt::Failed(e.to_string()))
}
