//! The DATA receiver: dot-stuffing, the end of data, line ends and limits,
//! fed in arbitrary chunks. Whatever comes in, what it keeps has CRLF line
//! ends only, and nothing after the first end of data is taken as message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::smtp::codec::DataReceiver;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut receiver = DataReceiver::new(common::limits(data.first().copied().unwrap_or(0)));
    for chunk in common::chunks(data) {
        let used = receiver.feed(chunk);
        assert!(used <= chunk.len());
        if receiver.is_done() {
            break;
        }
    }
    let (message, _flags) = receiver.finish();
    common::assert_crlf_only(&message);
});
