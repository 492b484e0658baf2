//! Queue ids: time-ordered, unique within a spool, safe as file names.

use std::fmt;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A queue id: 13 hex digits of microseconds since the epoch and 4 of a counter,
/// so ids sort by arrival time and two in the same microsecond still differ.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(String);

static COUNTER: AtomicU16 = AtomicU16::new(0);

impl QueueId {
    /// A new id.
    pub fn generate() -> QueueId {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        QueueId(format!("{:013X}{:04X}", micros & 0xF_FFFF_FFFF_FFFF, n))
    }

    /// Parses an id given on the command line or found in the spool.
    pub fn parse(s: &str) -> Option<QueueId> {
        (s.len() == 17
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)))
        .then(|| QueueId(s.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_sortable_and_parse_back() {
        let a = QueueId::generate();
        let b = QueueId::generate();
        assert_ne!(a, b);
        assert_eq!(QueueId::parse(a.as_str()), Some(a.clone()));
        for bad in [
            "",
            "../etc/passwd",
            "0123456789abcdef0",
            "0123456789ABCDEF",
            "0123456789ABCDEF0.tmp",
        ] {
            assert_eq!(QueueId::parse(bad), None, "{bad}");
        }
    }
}
