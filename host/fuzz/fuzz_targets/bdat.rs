//! The BDAT receiver: chunks of any content and any size; what it keeps has
//! CRLF line ends only.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::smtp::codec::BdatReceiver;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut receiver = BdatReceiver::new(common::limits(data.first().copied().unwrap_or(0)));
    for chunk in common::chunks(data) {
        receiver.feed(chunk);
    }
    let (message, _flags) = receiver.finish();
    common::assert_crlf_only(&message);
});
