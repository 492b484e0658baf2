//! What the data hook's message resource hands a plugin, on any message:
//! headers, subject, text bodies and every part read in ranges; then a
//! footer and a part removal applied as the relay applies them.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use postern::plugins::host::body::{self, BodyEdits, Footer};
use postern::plugins::host::message::MessageState;

fuzz_target!(|data: &[u8]| {
    let chunk = u32::from(data.first().copied().unwrap_or(0)) + 1;
    let mut state = MessageState::new(Arc::new(data.to_vec()), Vec::new());
    state.read_everything(chunk);
    let mut edits = BodyEdits::default();
    if body::check_footer(data).is_ok() {
        edits.footers.push(Footer {
            text: "-- \r\nfooter".into(),
            html: "<p>footer</p>".into(),
        });
    }
    if body::check_removal(data, 1).is_ok() {
        edits.removed.push((1, "removed by policy".into()));
    }
    if !edits.is_empty() {
        let _ = body::apply(data, &edits);
    }
});
