//! Header-section edits that do no I/O: finding the header block and taking
//! out `Authentication-Results:` fields that claim this relay's authserv-id
//! (RFC 8601 5), which only a forger could have written before us.

/// Where the header section ends: the offset just past its last CRLF (the
/// empty line that follows is not included), or the whole message when it
/// has no body.
pub fn header_end(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 0;
    }
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(message.len())
}

/// Where the body starts: past the empty line that ends the header section,
/// or the whole message when there is none.
pub fn body_start(message: &[u8]) -> usize {
    let end = header_end(message);
    if message[end..].starts_with(b"\r\n") {
        end + 2
    } else {
        end
    }
}

/// Each field of the header section as `(start, end)` offsets, folded lines
/// included, CRLF included.
pub fn fields(message: &[u8]) -> Vec<(usize, usize)> {
    let end = header_end(message);
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0;
    while pos < end {
        let line_end = message[pos..end]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| pos + p + 2)
            .unwrap_or(end);
        let continuation = matches!(message[pos], b' ' | b'\t');
        match out.last_mut() {
            Some(last) if continuation => last.1 = line_end,
            _ => out.push((pos, line_end)),
        }
        pos = line_end;
    }
    out
}

/// The name of a field (before the colon), if it has one.
pub fn field_name(field: &[u8]) -> Option<&[u8]> {
    let colon = field.iter().position(|&b| b == b':')?;
    Some(trim(&field[..colon]))
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map(|p| p + 1)
        .unwrap_or(start);
    &b[start..end.max(start)]
}

/// The authserv-id of an `Authentication-Results:` field's value: the first
/// token after any comments and white space.
fn authserv_id(value: &[u8]) -> &[u8] {
    let mut i = 0;
    let mut depth = 0usize;
    while i < value.len() {
        match value[i] {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b'\\' if depth > 0 => i += 1,
            c if depth == 0 && !c.is_ascii_whitespace() => break,
            _ => {}
        }
        i += 1;
    }
    let start = i.min(value.len());
    let len = value[start..]
        .iter()
        .position(|&c| c == b';' || c == b'(' || c.is_ascii_whitespace())
        .unwrap_or(value.len() - start);
    &value[start..start + len]
}

/// The message without `Authentication-Results:` fields whose authserv-id is
/// `ours` (case-insensitive), and how many were removed. Edited in place: a
/// message with none (nearly every one) is handed back untouched, not copied.
pub fn strip_authentication_results(mut message: Vec<u8>, ours: &str) -> (Vec<u8>, usize) {
    let forged: Vec<(usize, usize)> = fields(&message)
        .into_iter()
        .filter(|&(start, end)| {
            let field = &message[start..end];
            field_name(field).is_some_and(|n| n.eq_ignore_ascii_case(b"Authentication-Results"))
                && field.iter().position(|&b| b == b':').is_some_and(|c| {
                    authserv_id(&field[c + 1..]).eq_ignore_ascii_case(ours.as_bytes())
                })
        })
        .collect();
    let Some(&(first, _)) = forged.first() else {
        return (message, 0);
    };
    // Close each gap by moving what follows it forward, front to back.
    let mut write = first;
    for (i, &(_, end)) in forged.iter().enumerate() {
        let next = forged.get(i + 1).map_or(message.len(), |&(start, _)| start);
        message.copy_within(end..next, write);
        write += next - end;
    }
    message.truncate(write);
    (message, forged.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_results_are_removed_and_others_kept() {
        for (input, expected, n) in [
            (
                "Authentication-Results: relay.test; spf=pass\r\nSubject: x\r\n\r\nbody\r\n",
                "Subject: x\r\n\r\nbody\r\n",
                1,
            ),
            (
                "Subject: x\r\nauthentication-results:  (c) RELAY.test;\r\n\tdkim=pass\r\n header.d=a\r\nTo: y\r\n\r\n",
                "Subject: x\r\nTo: y\r\n\r\n",
                1,
            ),
            (
                "Authentication-Results: other.test; spf=pass\r\nAuthentication-Results: relay.test.evil; none\r\n\r\nAuthentication-Results: relay.test; body\r\n",
                "Authentication-Results: other.test; spf=pass\r\nAuthentication-Results: relay.test.evil; none\r\n\r\nAuthentication-Results: relay.test; body\r\n",
                0,
            ),
            (
                "Authentication-Results:relay.test;none\r\n",
                "",
                1,
            ),
            (
                "Authentication-Results: relay.test; a\r\nSubject: s\r\nAuthentication-Results: Relay.Test; b\r\n c\r\nAuthentication-Results: other.test; d\r\nTo: t\r\n\r\nbody\r\n",
                "Subject: s\r\nAuthentication-Results: other.test; d\r\nTo: t\r\n\r\nbody\r\n",
                2,
            ),
        ] {
            let message = input.as_bytes().to_vec();
            let before = message.as_ptr();
            let (out, removed) = strip_authentication_results(message, "relay.test");
            // Edited in place, never copied.
            assert_eq!(out.as_ptr(), before, "{input:?}");
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{input:?}");
            assert_eq!(removed, n, "{input:?}");
        }
    }

    #[test]
    fn fields_follow_folding() {
        let m = b"A: 1\r\n\t2\r\nB: 3\r\n\r\nC: body\r\n";
        assert_eq!(fields(m), vec![(0, 10), (10, 16)]);
        assert_eq!(header_end(b"\r\nbody"), 0);
        assert_eq!(body_start(b"\r\nbody"), 2);
        assert_eq!(body_start(b"A: 1\r\n\r\nbody"), 8);
        assert_eq!(body_start(b"A: 1\r\nB: 2"), 10);
        assert_eq!(fields(b"A: 1"), vec![(0, 4)]);
    }
}
