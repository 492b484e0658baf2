//! Command parsing, with no I/O: one line in, a [`Request`] or the reply that
//! explains what is wrong with it. The grammar is smtp-proto's (Stalwart's
//! RFC 5321 parser); this module maps its errors to our replies.

use smtp_proto::{Error as ProtoError, Request};

use crate::smtp::reply::Reply;

/// Parses one command line (with its line end).
pub fn parse(line: &[u8]) -> Result<Request<String>, Reply> {
    let mut iter = line.iter();
    match Request::parse(&mut iter) {
        Ok(request) => Ok(request.into_owned()),
        Err(e) => Err(error_reply(&e)),
    }
}

fn error_reply(e: &ProtoError) -> Reply {
    match e {
        ProtoError::UnknownCommand => Reply::UNKNOWN_COMMAND,
        ProtoError::InvalidSenderAddress => Reply::BAD_SENDER,
        ProtoError::InvalidRecipientAddress => Reply::BAD_RECIPIENT,
        ProtoError::SyntaxError { syntax } => {
            Reply::SYNTAX_ERROR.with_text(format!("Syntax: {syntax}"))
        }
        ProtoError::InvalidParameter { param } => {
            Reply::SYNTAX_ERROR.with_text(format!("Invalid parameter {param}"))
        }
        ProtoError::UnsupportedParameter { param } => {
            let param: String = param
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect();
            Reply::UNSUPPORTED_PARAMETER.with_text(format!("Unsupported parameter {param}"))
        }
        // A whole line was handed over, so "needs more data" means it was cut short.
        ProtoError::NeedsMoreData { .. } => Reply::SYNTAX_ERROR,
        ProtoError::ResponseTooLong | ProtoError::InvalidResponse { .. } => Reply::SYNTAX_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_maps_errors() {
        let ok = |line: &str| parse(line.as_bytes()).map(|r| r.name()).map_err(|r| r.code);
        for (line, expected) in [
            ("EHLO client.test\r\n", Ok("EHLO")),
            ("helo client.test\r\n", Ok("HELO")),
            (
                "MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME\r\n",
                Ok("MAIL"),
            ),
            ("MAIL FROM:<>\r\n", Ok("MAIL")),
            ("RCPT TO:<postmaster>\r\n", Ok("RCPT")),
            ("DATA\r\n", Ok("DATA")),
            ("BDAT 100 LAST\r\n", Ok("BDAT")),
            ("STARTTLS\r\n", Ok("STARTTLS")),
            ("NOOP\n", Ok("NOOP")),
            ("FOO\r\n", Err(500)),
            ("MAIL FROM:<a@b.test> FROB=1\r\n", Err(555)),
            ("MAIL FROM:a\r\n", Err(501)),
            ("RCPT TO:<a b>\r\n", Err(501)),
            ("EHLO\r\n", Err(501)),
        ] {
            assert_eq!(ok(line), expected, "{line:?}");
        }
    }

    #[test]
    fn source_routes_and_quotes_are_unwrapped() {
        for (line, address) in [
            (
                "RCPT TO:<@ours.test:user@other.test>\r\n",
                "user@other.test",
            ),
            (
                "RCPT TO:<\"user@other.test\"@ours.test>\r\n",
                "user@other.test@ours.test",
            ),
            (
                "RCPT TO:<user%other.test@ours.test>\r\n",
                "user%other.test@ours.test",
            ),
        ] {
            match parse(line.as_bytes()) {
                Ok(Request::Rcpt { to }) => assert_eq!(to.address, address, "{line:?}"),
                other => panic!("{line:?}: {other:?}"),
            }
        }
    }
}
