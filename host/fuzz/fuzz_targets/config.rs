//! The config loader on any text: an error message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = postern::config::Config::parse(text, std::path::Path::new("/fuzz/postern.toml"));
    }
});
