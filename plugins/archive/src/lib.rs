//! Copies every message into the plugin's archive folder (grant `archive`;
//! the relay preopens `<plugins.archive_dir>/<name>` as `/archive`), one
//! `.eml` per message, streamed a chunk at a time.
//!
//! ```toml
//! [[plugin]]
//! name = "archive"
//! path = "archive.wasm"
//! grants = ["archive"]
//! timeouts = { data = 2000 }
//! ```

use std::io::Write;

use postern_sdk::prelude::*;

struct Archive;

/// A file name from the Message-ID, or the time and size when there is none.
fn file_name(message: &Message) -> String {
    let id = message.first_header("Message-ID").unwrap_or_default();
    let clean: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
        .take(100)
        .collect();
    if clean.is_empty() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{now}-{}.eml", message.size())
    } else {
        format!("{clean}.eml")
    }
}

#[postern_sdk::plugin]
impl Plugin for Archive {
    fn init(_config: Config) -> Result<Self, ConfigError> {
        if !std::path::Path::new("/archive").is_dir() {
            return Err(ConfigError::new(
                "no /archive folder: grant \"archive\" to this plugin",
            ));
        }
        Ok(Archive)
    }

    fn data(&self, _session: &Session, _envelope: &Envelope, message: &Message) -> Verdict {
        let path = format!("/archive/{}", file_name(message));
        let copied = std::fs::File::create(&path).and_then(|mut f| {
            std::io::copy(&mut message.raw_reader(), &mut f)?;
            f.flush()
        });
        match copied {
            Ok(()) => Verdict::Continue,
            // Not archived means not accepted: the client will retry.
            Err(_) => Verdict::tempfail(451, "4.3.0", "archive unavailable"),
        }
    }
}

postern_sdk::export!(Archive);
