//! The durable spool: every accepted message lives here, fsynced, until delivery
//! is done with all its recipients.
//!
//! Layout of the spool folder:
//! - `lock`: held (flock) by the running relay, so a second `serve` refuses to start.
//! - `queue/<id>`: one file per message: a JSON line with [`QueuedMeta`] (envelope,
//!   client, hold reason, size, CRC-32 of the bytes), then the message bytes
//!   exactly as received (CRLF). Written into a file of `pool/`, fdatasynced
//!   (or, over blocks already allocated on ext4 and XFS, written back and left
//!   to the folder fsync's cache flush), renamed here, then the folder
//!   fsynced: a crash leaves the whole message under its name, or none, or (a
//!   power loss before the folder fsync) one that never had its 250 and
//!   whose record's id or checksum shows it. A file shorter than its record
//!   or failing its checksum (damaged) is moved to `corrupt/` when delivery
//!   first meets it.
//! - `queue/<id>.state`: delivery state, once a message has been tried.
//! - `index.saved`: the [`index`] as a clean stop left it, taken in (and
//!   removed) by the next start, so it answers before the spool is read.
//! - `pool/<n>`: files of finished messages, written over by new ones (their
//!   blocks are allocated already, which makes the fsync cheap). Bytes past a
//!   record's `size` are the old tail of such a file.
//!
//! [`index`] keeps the messages by state in memory, for `/metrics` and the
//! queue summary.

mod id;
pub mod index;
mod spool;

pub use id::QueueId;
pub use index::{Index, Place, Shape};
pub use spool::{
    list_ids, load as spool_load, off_runtime, Error, QueuedMeta, Spool, Spooled, StoredMessage,
};
