//! A spool file as a crash or a bad disk may leave it: the record line and
//! the message behind it, read back as the relay does at start.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::queue::{spool_load, QueueId};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let id = QueueId::generate();
    let path = dir.path().join(id.as_str());
    std::fs::write(&path, data).unwrap();
    if let Ok(stored) = spool_load(&path, &id) {
        let _ = stored.read_message();
    }
});
