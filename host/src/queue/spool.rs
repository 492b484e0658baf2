//! Writing, reading and removing spooled messages, with group commit for the
//! folder fsync that makes a new message's name durable, and a pool of
//! finished message files that new messages are written over.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::QueueId;
use crate::envelope::{Envelope, SessionInfo};
use crate::metadata::Metadata;

/// Spool errors. Any of them during acceptance becomes `452 4.3.1`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process holds the spool lock.
    #[error("spool {0} is in use by another postern process (lock held on {0}/lock)")]
    Locked(PathBuf),
    /// I/O on a spool path.
    #[error("spool {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A spool file that cannot be read back.
    #[error("spool file {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No message with this id.
    #[error("no message {0} in the spool")]
    NotFound(QueueId),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the spool keeps about a message besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedMeta {
    /// Format version of this record.
    pub version: u32,
    /// The queue id.
    pub id: String,
    /// When the message was accepted, seconds since the epoch.
    pub received: u64,
    /// Sender, recipients and parameters.
    pub envelope: Envelope,
    /// The session that handed it over.
    pub client: Option<SessionInfo>,
    /// Set when the message is on hold (quarantine or `postern queue hold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
    /// Size of the message bytes.
    pub size: u64,
    /// CRC-32 of the message bytes, checked when they are read back: a file
    /// written over a pooled one may, after a power loss before its 250,
    /// hold some of the old message's blocks under the new name (see
    /// `Durability`). None in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
    /// The plugins' transaction metadata, as it was when the message was
    /// queued (none in records written before metadata existed).
    #[serde(default, skip_serializing_if = "is_empty")]
    pub metadata: Arc<Metadata>,
}

fn is_empty(m: &Arc<Metadata>) -> bool {
    m.is_empty()
}

/// A spooled message as read back: its record and where its bytes start.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// The record.
    pub meta: QueuedMeta,
    /// The spool file.
    pub path: PathBuf,
    /// Offset of the message bytes in the file.
    pub body_offset: u64,
}

impl StoredMessage {
    /// Reads the message bytes: `size` of them, since a file written over a
    /// longer one from the pool keeps that one's tail after the message.
    pub fn read_message(&self) -> Result<Vec<u8>, Error> {
        let mut f = File::open(&self.path).map_err(io_err(&self.path))?;
        let mut out = Vec::with_capacity(self.meta.size as usize);
        io::Seek::seek(&mut f, io::SeekFrom::Start(self.body_offset))
            .map_err(io_err(&self.path))?;
        f.take(self.meta.size)
            .read_to_end(&mut out)
            .map_err(io_err(&self.path))?;
        match self.meta.crc32 {
            Some(sum) if crc32fast::hash(&out) != sum => Err(Error::Damaged {
                path: self.path.clone(),
                reason: "its bytes do not match the record's checksum (a write that a power loss cut before its 250, or a damaged disk)".into(),
            }),
            _ => Ok(out),
        }
    }
}

/// A message the spool has just made durable, with its bytes, so delivery
/// can start on it without reading it back.
///
/// Until delivery takes it in ([`Spooled::taken_in`], or dropping it), the
/// message is left out of [`Spool::list`]: a scan or a flush that found it on
/// disk while it is on its way to delivery would start a second delivery of
/// it beside the one this value starts.
#[derive(Debug)]
pub struct Spooled {
    /// The queue id.
    pub id: QueueId,
    /// The record as written.
    pub meta: QueuedMeta,
    /// The message bytes as written.
    pub message: Arc<Vec<u8>>,
    claim: Option<Claim>,
}

impl Spooled {
    /// Delivery has taken the message in (it is in the scheduler's books):
    /// from now on [`Spool::list`] shows it.
    pub fn taken_in(&mut self) {
        self.claim = None;
    }
}

/// An id in [`Inner::incoming`]; dropping it takes the id out.
#[derive(Debug)]
struct Claim {
    inner: Arc<Inner>,
    id: QueueId,
}

impl Claim {
    fn new(inner: &Arc<Inner>, id: &QueueId) -> Claim {
        inner.incoming().insert(id.clone());
        Claim {
            inner: inner.clone(),
            id: id.clone(),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.inner.incoming().remove(&self.id);
    }
}

/// The open, locked spool.
#[derive(Debug, Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    queue: PathBuf,
    queue_dir: File,
    dir_sync: DirSync,
    pool: Pool,
    /// Messages stored by this process and not yet taken in by delivery (see
    /// [`Spooled`]).
    incoming: Mutex<HashSet<QueueId>>,
    /// How a message written over a pooled file is made durable here.
    durability: Durability,
    /// Per queued file this process wrote, the bytes from its start known to
    /// be allocated durably, handed to the pool when the file goes back to
    /// it. Bounded: a file it forgets is fdatasynced when next written.
    allocated: Mutex<HashMap<QueueId, u64>>,
    /// The messages by state; the spool notes what it stores and removes.
    index: super::Index,
    /// Held for the life of the process: the flock is the "one relay per spool" rule.
    _lock: File,
}

impl Inner {
    fn incoming(&self) -> std::sync::MutexGuard<'_, HashSet<QueueId>> {
        self.incoming.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn allocated(&self) -> std::sync::MutexGuard<'_, HashMap<QueueId, u64>> {
        self.allocated.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Queued files whose allocated bytes the spool remembers at most (about a
/// MiB of memory); past them, a long queue's files cost one fdatasync more each
/// when they come back from the pool.
const ALLOCATED_REMEMBERED: usize = 16 * 1024;

const SPOOL_VERSION: u32 = 1;

/// Finished message files kept in `pool/` to be written over by new messages.
/// Writing over a file whose blocks are already allocated spares the disk the
/// inode creation, the block allocation and, at removal, the truncation (and
/// the discard, on a filesystem mounted with it) that one file per message
/// would cost: an fdatasync then writes the data blocks and nothing else.
#[derive(Debug)]
struct Pool {
    dir: PathBuf,
    free: Mutex<Vec<PoolFile>>,
    next_name: AtomicU64,
}

/// A file in the pool, free to be written over.
#[derive(Debug)]
struct PoolFile {
    path: PathBuf,
    /// Bytes from its start whose blocks are allocated, their allocation
    /// durable: what this process wrote into it (with an fdatasync, or over
    /// bytes already so), or 0 when that is not known (found in the pool at
    /// start, where a crash may have cut a write short and left the size
    /// reaching past blocks never allocated).
    allocated: u64,
}

/// Files kept in the pool at most; beyond, finished files are unlinked.
/// Enough for 200 sessions writing while as many messages wait for the
/// remover: a pool that runs dry under load means a new inode per message
/// and an unlink per retired file, which at 200 sessions cost more CPU than
/// the writes (ext4's inode allocator shows at the top of a profile).
const POOL_FILES: usize = 1024;
/// Larger files are unlinked rather than pooled, so the pool holds at most
/// `POOL_FILES * POOL_FILE_MAX` bytes of disk.
const POOL_FILE_MAX: u64 = 256 * 1024;

impl Pool {
    fn open(dir: PathBuf) -> Result<Pool, Error> {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut free = Vec::new();
        let mut last = 0;
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            // A file with a second name is a message still in `queue/`: a
            // crash kept both names of a rename that a filesystem without a
            // journal did not finish. Only the pool's name goes.
            let shared = entry.metadata().map_err(io_err(&entry.path()))?.nlink() > 1;
            match entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(n) if free.len() < POOL_FILES && !shared => {
                    last = last.max(n);
                    free.push(PoolFile {
                        path: entry.path(),
                        allocated: 0,
                    });
                }
                _ => fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?,
            }
        }
        Ok(Pool {
            dir,
            free: Mutex::new(free),
            next_name: AtomicU64::new(last + 1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PoolFile>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A file to write a new message into: a pooled one, or else a new name
    /// in the pool folder (`None`: the file does not exist yet).
    fn take(&self) -> (PathBuf, Option<u64>) {
        match self.lock().pop() {
            Some(f) => (f.path, Some(f.allocated)),
            None => {
                let n = self.next_name.fetch_add(1, Ordering::Relaxed);
                (self.dir.join(n.to_string()), None)
            }
        }
    }

    /// Retires a finished message file, whose first `allocated` bytes are
    /// known allocated durably: into the pool if there is room and it is
    /// small, else unlinked. Neither needs to be durable: after a crash the
    /// message is still queued and is delivered again, a duplicate, never a loss.
    fn retire(&self, path: &Path, allocated: u64) -> io::Result<()> {
        let meta = fs::metadata(path)?;
        // Checked without holding the lock over the rename; two removals
        // racing may take the pool one or two files past its size. A file
        // with another name (in `corrupt/`) is never written over.
        if self.lock().len() >= POOL_FILES || meta.len() > POOL_FILE_MAX || meta.nlink() > 1 {
            return fs::remove_file(path);
        }
        let n = self.next_name.fetch_add(1, Ordering::Relaxed);
        let to = self.dir.join(n.to_string());
        fs::rename(path, &to)?;
        self.lock().push(PoolFile {
            path: to,
            allocated: allocated.min(meta.len()),
        });
        Ok(())
    }
}

impl Spool {
    /// Opens (creating if needed) and locks the spool, and removes debris of
    /// writes that a crash interrupted.
    pub fn open(root: &Path) -> Result<Spool, Error> {
        Spool::open_with(root, true)
    }

    /// [`Spool::open`]; `write_back: false` fdatasyncs every message, even
    /// where the folder fsync's cache flush could cover it (`[spool]
    /// write_back`).
    pub fn open_with(root: &Path, write_back: bool) -> Result<Spool, Error> {
        let queue = root.join("queue");
        fs::create_dir_all(&queue).map_err(io_err(&queue))?;
        restrict_to_owner(root).map_err(io_err(root))?;
        let lock_path = root.join("lock");
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(Error::Locked(root.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        lock.set_len(0)
            .and_then(|_| writeln!(lock, "{}", std::process::id()))
            .map_err(io_err(&lock_path))?;
        let queue_dir = File::open(&queue).map_err(io_err(&queue))?;
        let durability = match write_back {
            true => Durability::of(&queue_dir),
            false => Durability::Fdatasync,
        };
        let pool = Pool::open(root.join("pool"))?;
        let spool = Spool {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                queue: queue.clone(),
                queue_dir,
                dir_sync: DirSync::default(),
                pool,
                incoming: Mutex::default(),
                durability,
                allocated: Mutex::default(),
                index: super::Index::unseeded(),
                _lock: lock,
            }),
        };
        spool.remove_partial_writes()?;
        Ok(spool)
    }

    /// The spool folder.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The messages by state.
    pub fn index(&self) -> &super::Index {
        &self.inner.index
    }

    /// Removes `.tmp` debris of delivery-state writes a crash interrupted (a
    /// message write a crash interrupted stays in `pool/`, which is only ever
    /// written over). It reads no message: a damaged file is found when
    /// delivery first loads it ([`load`] checks the length) and set aside then
    /// ([`Spool::set_aside`]), so a spool of millions costs one folder listing
    /// at start, not a read of every file twice.
    fn remove_partial_writes(&self) -> Result<(), Error> {
        let queue = &self.inner.queue;
        for entry in fs::read_dir(queue).map_err(io_err(queue))? {
            let entry = entry.map_err(io_err(queue))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                tracing::info!(path = %path.display(), "removing a spool file whose write did not finish");
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        Ok(())
    }

    /// Moves a damaged message file (cut short by a crash before it was
    /// acknowledged, or unreadable) to `corrupt/` for the operator, so it is
    /// neither delivered nor tried again.
    pub fn set_aside(&self, id: &QueueId, reason: &str) -> Result<(), Error> {
        let corrupt = self.inner.root.join("corrupt");
        fs::create_dir_all(&corrupt).map_err(io_err(&corrupt))?;
        let path = self.message_path(id);
        tracing::warn!(queue_id = %id, reason, "damaged message file moved to corrupt/");
        self.inner.index.remove(id);
        self.inner.allocated().remove(id);
        match fs::rename(&path, corrupt.join(id.as_str())) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Path of a message's spool file.
    pub fn message_path(&self, id: &QueueId) -> PathBuf {
        self.inner.queue.join(id.as_str())
    }

    /// Stores a message durably: when this returns `Ok`, file and folder are
    /// on stable storage (fsynced; see `Durability`) and the message
    /// survives a crash or a power loss. Only then may the relay say 250.
    pub async fn store(
        &self,
        id: &QueueId,
        envelope: &Envelope,
        client: Option<&SessionInfo>,
        hold: Option<String>,
        metadata: Metadata,
        message: Arc<Vec<u8>>,
    ) -> Result<Spooled, Error> {
        let mut meta = QueuedMeta {
            version: SPOOL_VERSION,
            id: id.to_string(),
            received: unix_now(),
            envelope: envelope.clone(),
            client: client.cloned(),
            hold,
            size: message.len() as u64,
            crc32: None,
            metadata: Arc::new(metadata),
        };
        let final_path = self.message_path(id);
        // Claimed before the file has its name, so no listing ever sees it
        // unclaimed before delivery has it.
        let claim = Claim::new(&self.inner, id);
        let inner = self.inner.clone();
        let path = final_path.clone();
        let bytes = message.clone();
        let qid = id.clone();
        let started = std::time::Instant::now();
        // One trip to the blocking pool for the whole write, the checksum
        // included. The folder fsync makes the name durable; one fsync covers
        // every message renamed before it started (group commit).
        let meta = tokio::task::spawn_blocking(move || {
            meta.crc32 = Some(crc32fast::hash(&bytes));
            let mut header = serde_json::to_vec(&meta).expect("spool record serializes");
            header.push(b'\n');
            let (file, allocated) = inner.pool.take();
            let how = inner.durability;
            write_synced(&file, allocated, how, &final_path, &header, &bytes)?;
            inner
                .dir_sync
                .sync(&inner.queue_dir)
                .map_err(io_err(&final_path))?;
            let written = (header.len() + bytes.len()) as u64;
            let mut known = inner.allocated();
            if known.len() < ALLOCATED_REMEMBERED {
                known.insert(qid, written.max(allocated.unwrap_or(0)));
            }
            Ok(meta)
        })
        .await
        .map_err(|e| Error::Io {
            path,
            source: io::Error::other(e),
        })??;
        crate::admin::metrics::metrics()
            .spool_fsync
            .observe(started.elapsed());
        let place = match meta.hold {
            Some(_) => super::Place::Quarantine,
            None => super::Place::Queued,
        };
        let recipients = meta.envelope.recipients.iter();
        let shape = super::Shape::of(recipients.map(|r| (r.address.as_str(), true, None)));
        self.inner.index.note(id, place, shape);
        Ok(Spooled {
            id: id.clone(),
            meta,
            message,
            claim: Some(claim),
        })
    }

    /// Ids of the messages in the spool, oldest first, but for those just
    /// stored and still on their way to delivery (see [`Spooled`]).
    pub fn list(&self) -> Result<Vec<QueueId>, Error> {
        let mut ids = list_ids(&self.inner.queue)?;
        let incoming = self.inner.incoming();
        if !incoming.is_empty() {
            ids.retain(|id| !incoming.contains(id));
        }
        Ok(ids)
    }

    /// Reads a message's record.
    pub fn load(&self, id: &QueueId) -> Result<StoredMessage, Error> {
        load(&self.message_path(id), id)
    }

    /// Removes a message whose recipients are all done; its file goes back to
    /// the pool. The removal need not be durable at once: after a crash the
    /// message is just delivered again.
    pub fn remove(&self, id: &QueueId) -> Result<(), Error> {
        let path = self.message_path(id);
        let allocated = self.inner.allocated().remove(id).unwrap_or(0);
        let retired = self.inner.pool.retire(&path, allocated);
        if retired.is_ok() {
            self.inner.index.remove(id);
        }
        match retired {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound(id.clone())),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

/// Runs spool file work on the blocking pool: a file that is not in the page
/// cache waits for the disk, and on a runtime worker that wait would stall
/// every session and delivery scheduled there.
pub async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Io {
            path: PathBuf::new(),
            source: io::Error::other(e),
        })?
}

/// Ids of the messages in a spool `queue/` folder, oldest first.
pub fn list_ids(queue: &Path) -> Result<Vec<QueueId>, Error> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(queue).map_err(io_err(queue))? {
        let entry = entry.map_err(io_err(queue))?;
        if let Some(id) = entry.file_name().to_str().and_then(QueueId::parse) {
            ids.push(id);
        }
    }
    ids.sort();
    Ok(ids)
}

/// Reads one spool file's record, and checks that it is this id's and that
/// the file holds as many bytes as the record says: a shorter one was cut by
/// a crash before its 250. (A longer one was written over a longer pooled
/// file; the bytes past the message are that file's old tail.)
pub fn load(path: &Path, id: &QueueId) -> Result<StoredMessage, Error> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Error::NotFound(id.clone())),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut reader = BufReader::new(f);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).map_err(io_err(path))?;
    let meta: QueuedMeta = serde_json::from_slice(&line).map_err(|e| Error::Damaged {
        path: path.into(),
        reason: format!("bad record: {e}"),
    })?;
    if meta.version != SPOOL_VERSION {
        return Err(Error::Damaged {
            path: path.into(),
            reason: format!("unknown version {}", meta.version),
        });
    }
    if meta.id != id.as_str() {
        // A name whose removal a crash undid after the file went back to the
        // pool and took a newer message: that message is under its own name.
        return Err(Error::Damaged {
            path: path.into(),
            reason: format!("the file holds message {}", meta.id),
        });
    }
    let len = reader.get_ref().metadata().map_err(io_err(path))?.len();
    let expected = line.len() as u64 + meta.size;
    if len < expected {
        return Err(Error::Damaged {
            path: path.into(),
            reason: format!("{len} bytes where the record says {expected}: cut short by a crash before it was acknowledged"),
        });
    }
    Ok(StoredMessage {
        meta,
        path: path.into(),
        body_offset: line.len() as u64,
    })
}

/// Writes a message into `file` (in the pool folder; `allocated`: how many
/// of its first bytes are known allocated durably, `None` when it does not
/// exist yet), makes the bytes durable as `how` says, and only then renames
/// it to its final name, whose durability the caller's folder fsync
/// provides. A crash before the rename leaves a pool file, which is only ever
/// written over; so a name in `queue/` has its whole message behind it, or
/// (see [`Durability::WriteBack`]) one that its record's id or checksum
/// shows is not whole. Returns how the bytes were made durable.
fn write_synced(
    file: &Path,
    allocated: Option<u64>,
    how: Durability,
    dest: &Path,
    header: &[u8],
    message: &[u8],
) -> Result<Durability, Error> {
    let len = (header.len() + message.len()) as u64;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(allocated.is_none())
            .open(file)?;
        write_both(&mut f, header, message)?;
        let used = match (how, allocated) {
            (Durability::WriteBack, Some(a)) if len <= a => {
                write_back(&f)?;
                Durability::WriteBack
            }
            _ => {
                f.sync_data()?;
                Durability::Fdatasync
            }
        };
        fs::rename(file, dest)?;
        Ok(used)
    })();
    result.map_err(|source| {
        // The file may hold a half-written message; it is not pooled again.
        let _ = fs::remove_file(file);
        Error::Io {
            path: dest.to_path_buf(),
            source,
        }
    })
}

/// How the spool makes a message written over a pooled file durable before
/// its rename into `queue/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// An fdatasync of the file: its data written, then the disk's write
    /// cache flushed. For a file written over blocks already allocated that
    /// is the whole of it, since no metadata an fdatasync keeps changes.
    Fdatasync,
    /// Where a folder fsync always ends with a flush of the disk's write
    /// cache (ext2/3/4 and XFS do, unless mounted without barriers, where an
    /// fdatasync flushes nothing either): the data written back and waited
    /// for, and no flush of its own. The folder fsync that follows the
    /// rename, and that the 250 waits for, starts after that write-back has
    /// completed; its flush makes every completed write durable, so the
    /// message is then as durable as an fdatasync would have left it, with
    /// one cache flush for the whole group commit instead of one per message.
    ///
    /// Only for bytes within blocks known allocated durably
    /// ([`PoolFile::allocated`]): a write-back persists no metadata, so a
    /// message that would grow the file is fdatasynced. A power loss before
    /// the folder fsync may keep the new name with only some of the new
    /// blocks (the kernel writes the folder back whenever it likes): the
    /// file then shows the old message's record, whose id is not the name's,
    /// or bytes whose CRC-32 is not the record's. Either is set aside as
    /// damaged, and no such message had its 250.
    WriteBack,
}

impl Durability {
    /// The one for the filesystem holding `dir`.
    fn of(dir: &File) -> Durability {
        const EXT_SUPER_MAGIC: i64 = 0xEF53;
        const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
        match filesystem_type(dir) {
            Some(EXT_SUPER_MAGIC | XFS_SUPER_MAGIC) => Durability::WriteBack,
            _ => Durability::Fdatasync,
        }
    }
}

/// The `f_type` of the filesystem holding `f`, or none if it cannot be read.
fn filesystem_type(f: &File) -> Option<i64> {
    use std::os::fd::AsRawFd;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: the descriptor is open for as long as `f` is borrowed, and
    // `stat` points to writable memory the size of a `statfs`, which
    // fstatfs fills completely when it returns 0; it is read only then.
    let stat = unsafe {
        if libc::fstatfs(f.as_raw_fd(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    #[allow(clippy::unnecessary_cast)] // `f_type`'s width differs by platform.
    Some(stat.f_type as i64)
}

/// Writes the file's dirty pages to the disk and waits until the disk has
/// them (in its write cache, not yet flushed), pages already on their way
/// included. Persists no metadata: see [`Durability::WriteBack`].
fn write_back(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range reads no memory of this process; the
    // descriptor is open for as long as `f` is borrowed; offset 0 and length
    // 0 mean the whole file.
    if unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `a` then `b` with as few system calls as the kernel allows.
fn write_both(f: &mut File, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() {
        let n = f.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    f.write_all(b)
}

fn restrict_to_owner(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Group commit for folder fsyncs. A caller needs an fsync that *starts* after
/// its rename; while one runs, every caller arriving meanwhile waits for the
/// next, which then covers all of them with one system call.
#[derive(Debug, Default)]
struct DirSync {
    state: Mutex<DirSyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct DirSyncState {
    /// Number of fsyncs started so far.
    started: u64,
    /// Number of fsyncs finished so far (successful or not).
    finished: u64,
    running: bool,
    /// Result of the last finished fsync.
    last_error: Option<io::ErrorKind>,
}

impl DirSync {
    fn sync(&self, dir: &File) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // The first fsync to start from now on covers this caller.
        let needed = st.started + 1;
        loop {
            if st.finished >= needed {
                return match st.last_error {
                    None => Ok(()),
                    Some(kind) => Err(io::Error::new(kind, "fsync of the spool folder failed")),
                };
            }
            if !st.running {
                st.running = true;
                st.started += 1;
                let ticket = st.started;
                drop(st);
                let result = dir.sync_all();
                st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.running = false;
                st.finished = ticket;
                st.last_error = result.err().map(|e| e.kind());
                self.done.notify_all();
                continue;
            }
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Address, MailParams, Recipient};

    fn envelope() -> Envelope {
        let mut e = Envelope::new(Address("a@example.org".into()), MailParams::default());
        e.recipients.push(Recipient::new("b@example.net"));
        e
    }

    #[tokio::test]
    async fn store_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let (id, msg) = store(&spool, b"Subject: hi\r\n\r\nbody\r\n").await;
        assert_eq!(spool.list().unwrap(), vec![id.clone()]);
        let stored = spool.load(&id).unwrap();
        assert_eq!(stored.meta.envelope, envelope());
        assert_eq!(stored.read_message().unwrap(), *msg);
        spool.remove(&id).unwrap();
        assert!(matches!(spool.load(&id), Err(Error::NotFound(_))));
    }

    /// Stores `body` under a new id; returns the id and the bytes.
    async fn store(spool: &Spool, body: &[u8]) -> (QueueId, Arc<Vec<u8>>) {
        let id = QueueId::generate();
        let msg = Arc::new(body.to_vec());
        spool
            .store(
                &id,
                &envelope(),
                None,
                None,
                Metadata::default(),
                msg.clone(),
            )
            .await
            .unwrap();
        (id, msg)
    }

    fn pooled(dir: &Path) -> usize {
        fs::read_dir(dir.join("pool")).unwrap().count()
    }

    #[tokio::test]
    async fn finished_files_are_written_over_and_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let long = QueueId::generate();
        let long_msg =
            Arc::new(format!("Subject: long\r\n\r\n{}\r\n", "x".repeat(5000)).into_bytes());
        spool
            .store(
                &long,
                &envelope(),
                None,
                None,
                Metadata::default(),
                long_msg,
            )
            .await
            .unwrap();
        assert_eq!(pooled(dir.path()), 0, "the file moved to queue/");
        spool.remove(&long).unwrap();
        assert_eq!(pooled(dir.path()), 1, "the finished file went to the pool");

        // The next message is written over it and keeps its old tail.
        let (short, short_msg) = store(&spool, b"Subject: short\r\n\r\nhi\r\n").await;
        assert_eq!(pooled(dir.path()), 0, "the pooled file was reused");
        let stored = spool.load(&short).unwrap();
        assert!(fs::metadata(&stored.path).unwrap().len() > stored.body_offset + 100);
        assert_eq!(stored.read_message().unwrap(), *short_msg);

        // A large file is unlinked, not pooled.
        let big = QueueId::generate();
        let big_msg = Arc::new(vec![b'x'; POOL_FILE_MAX as usize + 1]);
        spool
            .store(&big, &envelope(), None, None, Metadata::default(), big_msg)
            .await
            .unwrap();
        spool.remove(&big).unwrap();
        assert_eq!(pooled(dir.path()), 0);
        assert!(matches!(spool.remove(&big), Err(Error::NotFound(_))));
    }

    #[tokio::test]
    async fn the_pool_survives_a_restart_and_loses_its_debris() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path()).unwrap();
            for _ in 0..3 {
                let (id, _) = store(&spool, b"Subject: hi\r\n\r\n").await;
                spool.remove(&id).unwrap();
            }
            assert_eq!(pooled(dir.path()), 1, "one file went round three times");
        }
        fs::write(dir.path().join("pool/junk"), b"?").unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(
            pooled(dir.path()),
            1,
            "the stray file is gone, the pooled one kept"
        );
        let (id, msg) = store(&spool, b"Subject: again\r\n\r\n").await;
        assert_eq!(
            pooled(dir.path()),
            0,
            "the pooled file was reused after the restart"
        );
        assert_eq!(spool.load(&id).unwrap().read_message().unwrap(), *msg);
    }

    #[tokio::test]
    async fn a_pool_file_that_is_also_queued_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (id, msg) = {
            let spool = Spool::open(dir.path()).unwrap();
            store(&spool, b"Subject: kept\r\n\r\n").await
        };
        // As if a crash kept both names of the rename into queue/.
        fs::hard_link(
            dir.path().join("queue").join(id.as_str()),
            dir.path().join("pool/7"),
        )
        .unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(pooled(dir.path()), 0, "the second name is gone");
        let (other, _) = store(&spool, b"Subject: other\r\n\r\n").await;
        assert_eq!(spool.load(&id).unwrap().read_message().unwrap(), *msg);
        assert!(spool.load(&other).is_ok());
    }

    #[tokio::test]
    async fn a_name_that_holds_another_message_does_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let (id, _) = store(&spool, b"Subject: hi\r\n\r\n").await;
        // As if a crash undid the removal of `stale` after its file was reused for `id`.
        let stale = QueueId::generate();
        fs::hard_link(spool.message_path(&id), spool.message_path(&stale)).unwrap();
        assert!(matches!(spool.load(&stale), Err(Error::Damaged { .. })));
        assert!(spool.load(&id).is_ok());
        // Set aside, the stale name keeps the file: once `id` is done, the
        // file is unlinked rather than pooled and written over.
        spool.set_aside(&stale, "test").unwrap();
        spool.remove(&id).unwrap();
        assert_eq!(pooled(dir.path()), 0);
        assert!(dir.path().join("corrupt").join(stale.as_str()).exists());
    }

    #[tokio::test]
    async fn a_message_cut_short_does_not_load_and_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let id = QueueId::generate();
        {
            let spool = Spool::open(dir.path()).unwrap();
            let msg = Arc::new(b"Subject: hi\r\n\r\nbody\r\n".to_vec());
            spool
                .store(&id, &envelope(), None, None, Metadata::default(), msg)
                .await
                .unwrap();
        }
        let path = dir.path().join("queue").join(id.as_str());
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert!(
            matches!(spool.load(&id), Err(Error::Damaged { .. })),
            "a short file does not load"
        );
        spool.set_aside(&id, "test").unwrap();
        assert!(spool.list().unwrap().is_empty());
        assert!(dir.path().join("corrupt").join(id.as_str()).exists());
    }

    /// A message is written back without a cache flush of its own only over
    /// bytes known allocated durably, and only where the folder fsync flushes
    /// the disk's cache; everything else is fdatasynced.
    #[test]
    fn only_known_allocated_bytes_are_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let (file, dest) = (dir.path().join("f"), dir.path().join("g"));
        // Nine bytes, then back to the pool's name.
        let write = |allocated, how| {
            let used = write_synced(&file, allocated, how, &dest, b"h\n", b"message").unwrap();
            fs::rename(&dest, &file).unwrap();
            used
        };
        assert_eq!(write(None, Durability::WriteBack), Durability::Fdatasync);
        assert_eq!(write(Some(9), Durability::WriteBack), Durability::WriteBack);
        assert_eq!(write(Some(8), Durability::WriteBack), Durability::Fdatasync);
        assert_eq!(write(Some(9), Durability::Fdatasync), Durability::Fdatasync);
        assert_eq!(fs::read(&file).unwrap(), b"h\nmessage");
        // procfs is not a filesystem whose folder fsync is known to flush.
        let proc = File::open("/proc").unwrap();
        assert_eq!(Durability::of(&proc), Durability::Fdatasync);
        // `[spool] write_back = false` never writes back.
        let spool = Spool::open_with(&dir.path().join("spool"), false).unwrap();
        assert_eq!(spool.inner.durability, Durability::Fdatasync);
    }

    #[tokio::test]
    async fn the_pool_knows_what_its_files_have_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let allocated = |spool: &Spool| -> Vec<u64> {
            spool
                .inner
                .pool
                .lock()
                .iter()
                .map(|f| f.allocated)
                .collect()
        };
        let spool = Spool::open(dir.path()).unwrap();
        let (id, _) = store(&spool, &[b'x'; 3000]).await;
        let written = fs::metadata(spool.message_path(&id)).unwrap().len();
        spool.remove(&id).unwrap();
        assert_eq!(allocated(&spool), vec![written]);
        // A shorter message over it keeps the longer allocation known.
        let (id, _) = store(&spool, b"Subject: short\r\n\r\n").await;
        spool.remove(&id).unwrap();
        assert_eq!(allocated(&spool), vec![written]);
        assert!(spool.inner.allocated().is_empty(), "nothing left behind");
        drop(spool);
        // After a restart nothing is known of the pool's files.
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(allocated(&spool), vec![0]);
    }

    /// A power loss before the folder fsync can keep a new name on a file
    /// with some of the old message's blocks: they do not match the record's
    /// checksum, and the message does not read.
    #[tokio::test]
    async fn bytes_that_do_not_match_the_checksum_do_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let (id, msg) = store(&spool, b"Subject: hi\r\n\r\nbody\r\n").await;
        let stored = spool.load(&id).unwrap();
        assert_eq!(stored.meta.crc32, Some(crc32fast::hash(&msg)));
        let mut bytes = fs::read(&stored.path).unwrap();
        bytes[stored.body_offset as usize + 3] ^= 0x20;
        fs::write(&stored.path, &bytes).unwrap();
        let err = spool.load(&id).unwrap().read_message().unwrap_err();
        assert!(
            matches!(&err, Error::Damaged { reason, .. } if reason.contains("checksum")),
            "{err}"
        );
    }

    #[test]
    fn second_open_is_refused_and_debris_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert!(matches!(Spool::open(dir.path()), Err(Error::Locked(_))));
        drop(spool);
        fs::write(dir.path().join("queue/0000000000000AAAA.tmp"), b"half").unwrap();
        let _spool = Spool::open(dir.path()).unwrap();
        assert!(!dir.path().join("queue/0000000000000AAAA.tmp").exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_stores_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..64 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                let id = QueueId::generate();
                let msg = Arc::new(format!("Subject: {i}\r\n\r\n").into_bytes());
                spool
                    .store(&id, &envelope(), None, None, Metadata::default(), msg)
                    .await
                    .map(|_| id)
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap().unwrap());
        }
        ids.sort();
        assert_eq!(spool.list().unwrap(), ids);
    }
}
