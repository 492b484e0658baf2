//! The durable spool: every accepted message lives here, fsynced, until delivery
//! is done with all its recipients.
//!
//! Layout of the spool folder:
//! - `lock`: held (flock) by the running relay, so a second `serve` refuses to start.
//! - `queue/<id>`: one file per message: a JSON line with [`QueuedMeta`] (envelope,
//!   client, hold reason), then the message bytes exactly as received (CRLF).
//!   Written as `queue/<id>.tmp`, renamed, fsynced, then the folder fsynced:
//!   a crash leaves the whole message, a `.tmp` that start-up removes, or a
//!   file shorter than its record (never acknowledged), which does not load
//!   and is moved to `corrupt/` when delivery first meets it.

mod id;
mod spool;

pub use id::QueueId;
pub use spool::{
    list_ids, load as spool_load, off_runtime, Error, QueuedMeta, Spool, Spooled, StoredMessage,
};
