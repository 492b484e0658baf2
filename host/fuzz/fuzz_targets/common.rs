//! Shared by the content targets: the input cut into chunks as TCP reads
//! would, and the rule the relay's output must keep.

use postern::config::BareNewline;
use postern::smtp::codec::ContentLimits;

/// Limits small enough that the fuzzer reaches them.
pub fn limits(first: u8) -> ContentLimits {
    ContentLimits {
        max_size: 64 * 1024,
        max_line: 1000,
        bare_newline: if first & 1 == 0 {
            BareNewline::Normalize
        } else {
            BareNewline::Reject
        },
    }
}

/// `data` after its first byte, cut where the first byte's bits say, so
/// `<CRLF>.<CRLF>` and friends land across reads.
pub fn chunks(data: &[u8]) -> Vec<&[u8]> {
    let Some((&seed, rest)) = data.split_first() else {
        return Vec::new();
    };
    let step = usize::from(seed % 13) + 1;
    rest.chunks(step).collect()
}

/// What the relay stores and sends on has no bare CR and no bare LF: every
/// line ends in CRLF (SMTP smuggling stays closed).
pub fn assert_crlf_only(message: &[u8]) {
    for (i, &b) in message.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(message.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            b'\n' => assert!(i > 0 && message[i - 1] == b'\r', "bare LF at {i}"),
            _ => {}
        }
    }
}
