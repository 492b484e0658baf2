//! Byte-level framing with no I/O: command lines, and message content for DATA
//! and BDAT. Everything here is fed byte slices and is table-tested.
//!
//! SMTP smuggling is closed here: only `<CR><LF>.<CR><LF>` ends DATA. A bare LF
//! or a bare CR never takes part in an end of data, and what comes out has CRLF
//! line ends only, so nothing downstream can read a different message boundary
//! than we did.

use crate::config::BareNewline;

/// Longest command line accepted (RFC 5321 says 512; extensions make it longer,
/// Postfix allows 2048).
pub const MAX_COMMAND_LINE: usize = 4096;

/// Result of looking for the next command line in the input buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum CommandLine {
    /// A full line (with its LF) of this many bytes is at the front of the buffer.
    Line(usize),
    /// No full line yet.
    Incomplete,
    /// The line exceeds [`MAX_COMMAND_LINE`]; these many bytes should be dropped.
    TooLong(usize),
}

/// Finds the first command line in `buf`. `skipping` is true while the rest of
/// an over-long line is being discarded.
pub fn next_command_line(buf: &[u8]) -> CommandLine {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) if i < MAX_COMMAND_LINE => CommandLine::Line(i + 1),
        Some(i) => CommandLine::TooLong(i + 1),
        None if buf.len() > MAX_COMMAND_LINE => CommandLine::TooLong(buf.len()),
        None => CommandLine::Incomplete,
    }
}

/// What went wrong with message content. The message is read to its end either
/// way, so the client gets its reply in step and the session goes on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContentFlags {
    /// A bare CR or bare LF was seen.
    pub bare_newline: bool,
    /// A line exceeded the ceiling.
    pub line_too_long: bool,
    /// The message exceeded the size limit.
    pub too_big: bool,
    /// The relay had no memory to spare for it (see [`DataReceiver::abandon`]).
    pub no_memory: bool,
}

/// Limits applied while receiving content.
#[derive(Debug, Clone, Copy)]
pub struct ContentLimits {
    /// Size limit of the stored message in bytes.
    pub max_size: usize,
    /// Longest line accepted.
    pub max_line: usize,
    /// Bare CR/LF policy.
    pub bare_newline: BareNewline,
}

/// How the current line ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    Crlf,
    BareLf,
}

/// Most a declared message size reserves ahead of the content.
const EXPECT_AT_MOST: usize = 4 << 20;
/// Reserved beyond a declared size for the trace and authentication headers
/// put in front at the end of data, so [`prepend`] finds the room and does
/// not copy the message into a larger buffer.
const HEAD_ROOM: usize = 2048;

/// Splits content into lines, normalizes their ends to CRLF, and applies the
/// limits. Shared by DATA (with dot handling) and BDAT (without).
///
/// Lines are written straight into the message: the line being read is the
/// message's tail from `line_start`, so its bytes are copied once, not once
/// into a line buffer and again into the message.
#[derive(Debug)]
struct Lines {
    limits: ContentLimits,
    /// The message so far, then the current line's content (without its end).
    /// Once the message is refused (too big, no memory), only the current
    /// line: it is still needed to find the end of data.
    out: Vec<u8>,
    /// Where the current line starts in `out`.
    line_start: usize,
    /// Length of the current line including bytes dropped past the ceiling.
    line_len: usize,
    /// A CR was the last byte seen; whether it is part of CRLF depends on the next byte.
    pending_cr: bool,
    /// The current line had a stray CR removed, so it is not what the client
    /// sent byte for byte (and cannot be the end-of-data line).
    line_dirty: bool,
    flags: ContentFlags,
}

impl Lines {
    fn new(limits: ContentLimits) -> Lines {
        Lines {
            limits,
            out: Vec::with_capacity(8192),
            line_start: 0,
            line_len: 0,
            pending_cr: false,
            line_dirty: false,
            flags: ContentFlags::default(),
        }
    }

    /// Makes room for a message of the size the client declared (SIZE=),
    /// so a large one is not copied each time its buffer doubles. Capped: a
    /// declared size is the client's word, and what is reserved is not
    /// counted as kept until written.
    fn expect(&mut self, declared: usize) {
        let want = declared.min(self.limits.max_size).min(EXPECT_AT_MOST) + HEAD_ROOM;
        self.out.reserve(want.saturating_sub(self.out.len()));
    }

    /// The current line's content so far, up to the ceiling.
    fn line(&self) -> &[u8] {
        &self.out[self.line_start..]
    }

    /// The message is refused; only the current line is kept.
    fn refused(&self) -> bool {
        self.flags.too_big || self.flags.no_memory
    }

    /// Adds bytes of the current line; past the ceiling they are only counted.
    fn push_bytes(&mut self, bytes: &[u8]) {
        let room = self.limits.max_line.saturating_sub(self.line_len);
        self.line_len += bytes.len();
        if bytes.len() > room {
            self.flags.line_too_long = true;
            self.out.extend_from_slice(&bytes[..room]);
        } else {
            self.out.extend_from_slice(bytes);
        }
    }

    /// A CR not followed by LF: removed (normalize) and noted.
    fn stray_cr(&mut self) {
        self.flags.bare_newline = true;
        self.line_dirty = true;
    }

    /// Feeds bytes; calls `on_line` with each complete line and its end. Stops
    /// early (returning the bytes consumed) when `on_line` returns true.
    ///
    /// The bytes between line ends go in a run at a time, found with a SIMD
    /// search: a byte-by-byte loop here was a quarter of the relay's CPU
    /// with 100 KiB messages.
    fn feed(&mut self, input: &[u8], mut on_line: impl FnMut(&mut Lines, Eol) -> bool) -> usize {
        let mut i = 0;
        while i < input.len() {
            if self.pending_cr {
                self.pending_cr = false;
                if input[i] == b'\n' {
                    i += 1;
                    if on_line(self, Eol::Crlf) {
                        return i;
                    }
                    continue;
                }
                self.stray_cr();
            }
            let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
            if run > 0 {
                self.push_bytes(&input[i..i + run]);
                i += run;
                continue;
            }
            let b = input[i];
            i += 1;
            if b == b'\r' {
                self.pending_cr = true;
            } else {
                self.flags.bare_newline = true;
                if on_line(self, Eol::BareLf) {
                    return i;
                }
            }
        }
        input.len()
    }

    /// Ends the current line with CRLF, without its first `skip` bytes, and
    /// starts the next.
    fn emit_line(&mut self, skip: usize) {
        let skip = skip.min(self.line().len());
        if self.refused() {
            self.out.clear();
        } else if self.out.len() - skip + 2 > self.limits.max_size {
            self.flags.too_big = true;
            // Nothing more is kept; the rest is only read and counted.
            self.out = Vec::new();
        } else {
            self.out.drain(self.line_start..self.line_start + skip);
            self.out.extend_from_slice(b"\r\n");
        }
        self.start_line();
    }

    /// Drops the current line: it was not content (the end of data).
    fn drop_line(&mut self) {
        self.out.truncate(self.line_start);
        self.start_line();
    }

    fn start_line(&mut self) {
        self.line_start = self.out.len();
        self.line_len = 0;
        self.line_dirty = false;
    }

    /// Drops what was kept but the current line, and keeps nothing more.
    fn abandon(&mut self) {
        self.flags.no_memory = true;
        self.out = self.line().to_vec();
        self.line_start = 0;
    }

    /// Bytes of message kept so far; nothing once it is refused.
    fn kept(&self) -> usize {
        if self.refused() {
            0
        } else {
            self.line_start
        }
    }

    /// The message (CRLF line ends), empty if it was refused.
    fn finish(mut self) -> (Vec<u8>, ContentFlags) {
        if self.refused() {
            self.out = Vec::new();
        }
        (self.out, self.flags)
    }
}

/// Receives DATA content up to `<CR><LF>.<CR><LF>`, removing dot-stuffing.
#[derive(Debug)]
pub struct DataReceiver {
    lines: Lines,
    /// How the previous line ended; DATA starts after the command's CRLF.
    prev_eol: Eol,
    done: bool,
}

impl DataReceiver {
    /// A receiver for one message.
    pub fn new(limits: ContentLimits) -> DataReceiver {
        DataReceiver {
            lines: Lines::new(limits),
            prev_eol: Eol::Crlf,
            done: false,
        }
    }

    /// Feeds bytes. Returns how many were consumed; once the end of data was
    /// found, [`DataReceiver::is_done`] is true and the rest of `input` (the next
    /// pipelined commands) was not consumed.
    pub fn feed(&mut self, input: &[u8]) -> usize {
        let prev_eol = &mut self.prev_eol;
        let done = &mut self.done;
        self.lines.feed(input, |lines, eol| {
            // The end of data is a line of exactly "." between two real CRLFs.
            if eol == Eol::Crlf
                && *prev_eol == Eol::Crlf
                && !lines.line_dirty
                && lines.line_len == 1
                && lines.line() == b"."
            {
                lines.drop_line();
                *done = true;
                return true;
            }
            // Dot-stuffing: a line starting with "." had one added by the client.
            let skip = usize::from(lines.line().first() == Some(&b'.'));
            lines.emit_line(skip);
            *prev_eol = eol;
            false
        })
    }

    /// Makes room for the size the client declared in MAIL FROM.
    pub fn expect(&mut self, declared: usize) {
        self.lines.expect(declared);
    }

    /// True once the end of data was seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Bytes of message kept so far.
    pub fn kept(&self) -> usize {
        self.lines.kept()
    }

    /// Drops what was kept and keeps nothing more: the rest is only read to
    /// its end, so the session stays in step, and the message is refused.
    pub fn abandon(&mut self) {
        self.lines.abandon();
    }

    /// The message (CRLF line ends) and what went wrong with it.
    pub fn finish(self) -> (Vec<u8>, ContentFlags) {
        self.lines.finish()
    }
}

/// Receives the chunks of a BDAT transaction (RFC 3030). Chunk boundaries are
/// counted by the session; this normalizes line ends across them.
#[derive(Debug)]
pub struct BdatReceiver {
    lines: Lines,
}

impl BdatReceiver {
    /// A receiver for one message.
    pub fn new(limits: ContentLimits) -> BdatReceiver {
        BdatReceiver {
            lines: Lines::new(limits),
        }
    }

    /// As [`DataReceiver::expect`].
    pub fn expect(&mut self, declared: usize) {
        self.lines.expect(declared);
    }

    /// Feeds chunk bytes (all of them are content).
    pub fn feed(&mut self, input: &[u8]) {
        self.lines.feed(input, |lines, _eol| {
            lines.emit_line(0);
            false
        });
    }

    /// Bytes of message kept so far.
    pub fn kept(&self) -> usize {
        self.lines.kept()
    }

    /// As [`DataReceiver::abandon`].
    pub fn abandon(&mut self) {
        self.lines.abandon();
    }

    /// After `BDAT n LAST`: the message and what went wrong with it. A last line
    /// without an end gets CRLF, so what is stored always ends in one.
    pub fn finish(mut self) -> (Vec<u8>, ContentFlags) {
        if self.lines.pending_cr {
            self.lines.pending_cr = false;
            self.lines.stray_cr();
        }
        if self.lines.line_len > 0 {
            self.lines.emit_line(0);
        }
        self.lines.finish()
    }
}

/// Counts the `Received:` fields in the header section of a message.
pub fn count_received_headers(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}

/// Where the first CRLF in `bytes` begins.
pub fn find_crlf(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = memchr::memchr(b'\n', &bytes[from..]) {
        let lf = from + p;
        if lf > 0 && bytes[lf - 1] == b'\r' {
            return Some(lf - 1);
        }
        from = lf + 1;
    }
    None
}

/// Longest line SMTP carries, without its CRLF (RFC 5321 4.5.3.1.6).
pub const MAX_LINE: usize = 998;

/// Folds lines longer than 998 octets with CRLF SP, as Postfix's
/// `smtp_line_length_limit` does, counting the dot that dot-stuffing will
/// add to a line starting with one. Done once, before the message is signed
/// and spooled: nothing may change its bytes after a DKIM signature covers
/// them. A message without such lines comes back as it is.
pub fn fold_long_lines(message: Vec<u8>) -> Vec<u8> {
    if !has_long_line(&message) {
        return message;
    }
    let mut out = Vec::with_capacity(message.len() + message.len() / 300 + 3);
    let mut rest = &message[..];
    while !rest.is_empty() {
        let (line, next, ended) = match find_crlf(rest) {
            Some(p) => (&rest[..p], &rest[p + 2..], true),
            None => (rest, &rest[rest.len()..], false),
        };
        let mut budget = MAX_LINE - usize::from(line.first() == Some(&b'.'));
        let mut piece = line;
        while piece.len() > budget {
            out.extend_from_slice(&piece[..budget]);
            out.extend_from_slice(b"\r\n ");
            piece = &piece[budget..];
            budget = MAX_LINE - 1;
        }
        out.extend_from_slice(piece);
        if ended {
            out.extend_from_slice(b"\r\n");
        }
        rest = next;
    }
    out
}

/// Whether a line (up to its LF) is longer than [`fold_long_lines`] lets
/// it be. From a line's start it looks back from the farthest end allowed
/// for the last LF before it: every line between is shorter still, so one
/// search covers a dozen lines of ordinary text rather than one.
fn has_long_line(message: &[u8]) -> bool {
    let mut start = 0;
    loop {
        let limit = MAX_LINE - usize::from(message.get(start) == Some(&b'.'));
        if message.len() - start <= limit {
            return false;
        }
        match memchr::memrchr(b'\n', &message[start..=start + limit]) {
            Some(p) => start += p + 1,
            None => return true,
        }
    }
}

/// `message` with `head` in front, moved within its own buffer when it has
/// the room (the receiver's usually does), which spares a new buffer and the
/// fresh pages to put it in; else copied once into a new one.
pub fn prepend(mut message: Vec<u8>, head: &[&[u8]]) -> Vec<u8> {
    let head_len: usize = head.iter().map(|h| h.len()).sum();
    let len = message.len();
    if message.capacity() - len < head_len {
        let mut out = Vec::with_capacity(len + head_len);
        for h in head {
            out.extend_from_slice(h);
        }
        out.extend_from_slice(&message);
        return out;
    }
    message.resize(len + head_len, 0);
    message.copy_within(..len, head_len);
    let mut at = 0;
    for h in head {
        message[at..at + h.len()].copy_from_slice(h);
        at += h.len();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ContentLimits = ContentLimits {
        max_size: 1 << 20,
        max_line: 1000,
        bare_newline: BareNewline::Normalize,
    };

    /// Feeds `input` one byte at a time and all at once; both must agree.
    fn data(input: &[u8]) -> (Option<(Vec<u8>, ContentFlags)>, usize) {
        let mut whole = DataReceiver::new(LIMITS);
        let used = whole.feed(input);
        let mut bytewise = DataReceiver::new(LIMITS);
        let mut used_bytewise = 0;
        for b in input {
            if bytewise.is_done() {
                break;
            }
            used_bytewise += bytewise.feed(std::slice::from_ref(b));
        }
        assert_eq!(
            used, used_bytewise,
            "consumed differs when fed byte by byte: {input:?}"
        );
        assert_eq!(whole.is_done(), bytewise.is_done());
        let done = whole.is_done();
        let (a, b) = (whole.finish(), bytewise.finish());
        assert_eq!(a, b);
        (done.then_some(a), used)
    }

    #[test]
    fn end_of_data_only_at_crlf_dot_crlf() {
        let clean = ContentFlags::default();
        let bare = ContentFlags {
            bare_newline: true,
            ..clean
        };
        for (input, message, flags, rest) in [
            (
                &b"a\r\n.\r\nQUIT\r\n"[..],
                &b"a\r\n"[..],
                clean,
                &b"QUIT\r\n"[..],
            ),
            (b".\r\n", b"", clean, b""),
            (b"..x\r\n..\r\n.\r\n", b".x\r\n.\r\n", clean, b""),
            // The smuggling family: none of these ends the message; the
            // "MAIL FROM" after them stays content.
            (
                b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n",
                b"a\r\n\r\nMAIL FROM:<x@y>\r\n",
                bare,
                b"",
            ),
            (
                b"a\r.\rMAIL FROM:<x@y>\r\n.\r\n",
                b"a.MAIL FROM:<x@y>\r\n",
                bare,
                b"",
            ),
            (
                b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n",
                b"a\r\n\r\nMAIL FROM:<x@y>\r\n",
                bare,
                b"",
            ),
            (
                b"a\r\n.\nMAIL FROM:<x@y>\r\n.\r\n",
                b"a\r\n\r\nMAIL FROM:<x@y>\r\n",
                bare,
                b"",
            ),
            (
                b"a\r.\r\nMAIL FROM:<x@y>\r\n.\r\n",
                b"a.\r\nMAIL FROM:<x@y>\r\n",
                bare,
                b"",
            ),
            (
                b"a\r\n.\rMAIL FROM:<x@y>\r\n.\r\n",
                b"a\r\nMAIL FROM:<x@y>\r\n",
                bare,
                b"",
            ),
            (
                b"a\r\n\0.\r\nMAIL\r\n.\r\n",
                b"a\r\n\0.\r\nMAIL\r\n",
                clean,
                b"",
            ),
            (
                b"a\r\n.\0\r\nMAIL\r\n.\r\n",
                b"a\r\n\0\r\nMAIL\r\n",
                clean,
                b"",
            ),
            (
                b"a\r\n. \r\nMAIL\r\n.\r\n",
                b"a\r\n \r\nMAIL\r\n",
                clean,
                b"",
            ),
            (b"a\r\r\n.\r\n", b"a\r\n", bare, b""),
            (b"a\r\n.\r\r\n.\r\n", b"a\r\n\r\n", bare, b""),
        ] {
            let (got, used) = data(input);
            let (got_msg, got_flags) = got.unwrap_or_else(|| panic!("no end found in {input:?}"));
            assert_eq!(
                String::from_utf8_lossy(&got_msg),
                String::from_utf8_lossy(message),
                "{input:?}"
            );
            assert_eq!(got_flags, flags, "{input:?}");
            assert_eq!(&input[used..], rest, "{input:?}");
        }
    }

    #[test]
    fn no_end_without_crlf_dot_crlf() {
        for input in [
            &b"a\r\n.\r\r\nx"[..],
            b"a\n.\n",
            b"a\r.\r",
            b"a\n.\r\n",
            b"a\r\n.\n",
            b"a\r.\r\n",
            b"a\r\n.",
            b"a\r\n.\r",
        ] {
            let (got, used) = data(input);
            assert!(got.is_none(), "{input:?} ended the message");
            assert_eq!(used, input.len());
        }
    }

    #[test]
    fn limits() {
        let small = ContentLimits {
            max_size: 10,
            ..LIMITS
        };
        let mut r = DataReceiver::new(small);
        r.feed(b"0123456789abc\r\n.\r\n");
        assert!(r.is_done());
        let (msg, flags) = r.finish();
        assert!(flags.too_big && msg.is_empty());

        let mut r = DataReceiver::new(LIMITS);
        r.feed(b"kept\r\n");
        assert_eq!(r.kept(), 6);
        r.abandon();
        r.feed(b"more\r\n.\r\n");
        assert!(r.is_done());
        let (msg, flags) = r.finish();
        assert!(flags.no_memory && msg.is_empty());

        // A declared size is reserved up to a cap, whatever the client says.
        let mut r = DataReceiver::new(LIMITS);
        r.expect(usize::MAX);
        r.feed(b"a\r\n.\r\n");
        let (msg, _) = r.finish();
        assert_eq!(msg, b"a\r\n");
        assert!(msg.capacity() >= LIMITS.max_size && msg.capacity() < 2 * EXPECT_AT_MOST);

        // A message of exactly its declared size is never moved: not when the
        // end-of-data line is read past it, not when the headers are put in
        // front at the end of data.
        let mut body = b"Subject: s\r\n\r\n".to_vec();
        for _ in 0..300 {
            body.extend_from_slice(&[b'a'; 70]);
            body.extend_from_slice(b"\r\n");
        }
        let mut r = DataReceiver::new(LIMITS);
        r.expect(body.len());
        let reserved = r.lines.out.capacity();
        r.feed(&body);
        r.feed(b".\r\n");
        let (msg, _) = r.finish();
        assert_eq!(msg, body);
        assert_eq!(msg.capacity(), reserved);
        let full = prepend(msg, &[b"Received: from a by b\r\n", &[b'x'; 1500]]);
        assert_eq!(full.capacity(), reserved);
        assert!(full.ends_with(&body) && full.starts_with(b"Received: "));

        // Abandoned with the end of data half read: the line is kept to the end.
        let mut r = DataReceiver::new(LIMITS);
        r.feed(b"kept\r\n.");
        r.abandon();
        assert_eq!(r.kept(), 0);
        r.feed(b"\r\n");
        assert!(r.is_done());
        assert!(r.finish().0.is_empty());

        // Refused as too big mid-message: still ends at the end of data only.
        let mut r = DataReceiver::new(small);
        r.feed(b"0123456789\r\n..\r\n.");
        assert!(!r.is_done());
        r.feed(b"\r\n");
        assert!(r.is_done());
        let (msg, flags) = r.finish();
        assert!(flags.too_big && msg.is_empty());

        let mut r = DataReceiver::new(LIMITS);
        let long = vec![b'x'; 1001];
        r.feed(&long);
        r.feed(b"\r\nshort\r\n.\r\n");
        assert!(r.is_done());
        let (msg, flags) = r.finish();
        assert!(flags.line_too_long && !flags.too_big);
        assert!(msg.ends_with(b"\r\nshort\r\n"));
    }

    /// A line past the ceiling keeps exactly the ceiling's bytes, whether
    /// it comes in one piece, in two, or byte by byte.
    #[test]
    fn a_long_line_keeps_the_ceiling_however_it_is_cut() {
        let line = [vec![b'x'; 600], vec![b'y'; 450]].concat();
        let mut pieces: Vec<Vec<&[u8]>> = vec![vec![&line], vec![&line[..600], &line[600..]]];
        pieces.push(line.chunks(1).collect());
        for cut in pieces {
            let mut r = DataReceiver::new(LIMITS);
            for piece in cut {
                r.feed(piece);
            }
            r.feed(b"\r\n.\r\n");
            assert!(r.is_done());
            let (msg, flags) = r.finish();
            assert!(flags.line_too_long);
            assert_eq!(msg, [&line[..1000], b"\r\n"].concat());
        }
    }

    #[test]
    fn crlf_found_past_bare_line_ends() {
        for (input, expected) in [
            (&b""[..], None),
            (b"\r\n", Some(0)),
            (b"ab\ncd\rx\r\n", Some(7)),
            (b"\n\n\r", None),
            (b"a\rb", None),
        ] {
            assert_eq!(find_crlf(input), expected, "{input:?}");
        }
    }

    #[test]
    fn bdat_normalizes_across_chunks() {
        let clean = ContentFlags::default();
        let bare = ContentFlags {
            bare_newline: true,
            ..clean
        };
        for (chunks, message, flags) in [
            (&[&b"a\r"[..], b"\nb\r\n"][..], &b"a\r\nb\r\n"[..], clean),
            (&[b"a\nb"], b"a\r\nb\r\n", bare),
            (&[b"a\r", b"b"], b"ab\r\n", bare),
            (
                &[b"a\r\n.\r\n", b"MAIL FROM:<x@y>\r\n"],
                b"a\r\n.\r\nMAIL FROM:<x@y>\r\n",
                clean,
            ),
            (&[b"x\r"], b"x\r\n", bare),
        ] {
            let mut r = BdatReceiver::new(LIMITS);
            for c in chunks {
                r.feed(c);
            }
            let (msg, got) = r.finish();
            assert_eq!(
                String::from_utf8_lossy(&msg),
                String::from_utf8_lossy(message),
                "{chunks:?}"
            );
            assert_eq!(got, flags, "{chunks:?}");
        }
    }

    #[test]
    fn command_lines() {
        for (input, expected) in [
            (&b"EHLO x\r\nMAIL"[..], CommandLine::Line(8)),
            (b"NOOP\n", CommandLine::Line(5)),
            (b"EHLO", CommandLine::Incomplete),
        ] {
            assert_eq!(next_command_line(input), expected);
        }
        let long = vec![b'a'; MAX_COMMAND_LINE + 1];
        assert_eq!(next_command_line(&long), CommandLine::TooLong(long.len()));
    }

    #[test]
    fn received_headers_counted_in_header_section_only() {
        let msg =
            b"Received: a\r\nreceived: b\r\n\tcontinued\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received_headers(msg), 2);
    }

    /// Line by line, as the rule reads.
    fn has_long_line_by_lines(message: &[u8]) -> bool {
        message
            .split(|&b| b == b'\n')
            .any(|line| line.len() > MAX_LINE - usize::from(line.first() == Some(&b'.')))
    }

    #[test]
    fn long_lines_are_found_as_line_by_line() {
        // Lines of lengths around the limit, with and without a leading
        // dot, in a deterministic pseudo-random mix.
        let mut seed = 0x2545_f491_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..2000 {
            let mut m = Vec::new();
            for _ in 0..next() % 6 {
                let len = match next() % 4 {
                    0 => (next() % 80) as usize,
                    _ => MAX_LINE - 3 + (next() % 5) as usize,
                };
                let mut line = vec![b'x'; len];
                if len > 0 && next() % 2 == 0 {
                    line[0] = b'.';
                }
                if len > 1 && next() % 2 == 0 {
                    line[len - 1] = b'\r';
                }
                m.extend_from_slice(&line);
                if next() % 5 != 0 {
                    m.push(b'\n');
                }
            }
            assert_eq!(has_long_line(&m), has_long_line_by_lines(&m), "{m:?}");
        }
    }

    #[test]
    fn prepend_puts_every_head_in_order_before_the_message() {
        let mut message = Vec::with_capacity(64);
        message.extend_from_slice(b"Subject: x\r\n\r\nbody\r\n");
        let out = prepend(message, &[b"Received: a\r\n", b"", b"X-B: b\r\n"]);
        assert_eq!(out, b"Received: a\r\nX-B: b\r\nSubject: x\r\n\r\nbody\r\n");
        // Without the room: a new buffer, the same bytes.
        assert_eq!(prepend(Vec::new(), &[b"A"]), b"A");
        assert_eq!(prepend(b"body".to_vec(), &[b"H: 1\r\n"]), b"H: 1\r\nbody");
    }

    #[test]
    fn long_lines_are_folded_once() {
        let long = "x".repeat(2000);
        for (input, expected) in [
            ("a\r\nb\r\n".to_string(), "a\r\nb\r\n".to_string()),
            (
                format!("{long}\r\n"),
                format!(
                    "{}\r\n {}\r\n {}\r\n",
                    &long[..998],
                    &long[998..1995],
                    &long[1995..]
                ),
            ),
            (
                long.clone(),
                format!(
                    "{}\r\n {}\r\n {}",
                    &long[..998],
                    &long[998..1995],
                    &long[1995..]
                ),
            ),
        ] {
            let out = fold_long_lines(input.clone().into_bytes());
            assert_eq!(
                String::from_utf8(out.clone()).unwrap(),
                expected,
                "{input:?}"
            );
            assert_eq!(
                fold_long_lines(out.clone()),
                out,
                "folding twice changed {input:?}"
            );
        }
        // A line starting with a dot leaves room for the stuffing dot.
        let dotted = format!(".{}\r\n", "y".repeat(1500));
        let out = fold_long_lines(dotted.into_bytes());
        let first = out.split(|&b| b == b'\n').next().unwrap();
        assert_eq!(first.len(), 997 + 1, "997 octets and the CR");
    }
}
