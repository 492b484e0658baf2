//! Every SMTP reply the relay sends goes through [`Reply`]: a code, an RFC 3463
//! enhanced status code and a text. Named constants keep the wording in one place.

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply. Multi-line replies (EHLO, HELP) are built with [`Reply::lines`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code (RFC 5321 4.2).
    pub code: u16,
    /// Enhanced status code (RFC 3463), e.g. "2.0.0"; empty for the greeting and EHLO.
    pub enhanced: Cow<'static, str>,
    /// Human-readable text; lines are separated by `\n` and each is sent as one
    /// reply line. Built through [`Reply::new`] or [`Reply::lines`], which keep
    /// CR and LF out of a line.
    text: Cow<'static, str>,
}

macro_rules! replies {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $enh:literal, $text:literal;)*) => {
        impl Reply {
            $($(#[$doc])* pub const $name: Reply = Reply {
                code: $code,
                enhanced: Cow::Borrowed($enh),
                text: Cow::Borrowed($text),
            };)*
        }
    };
}

replies! {
    /// 250 2.0.0 Ok
    OK = 250, "2.0.0", "Ok";
    /// 250 2.1.0 sender ok
    SENDER_OK = 250, "2.1.0", "Sender ok";
    /// 250 2.1.5 recipient ok
    RECIPIENT_OK = 250, "2.1.5", "Recipient ok";
    /// 252: VRFY is never answered with real data (it would leak valid addresses).
    CANNOT_VRFY = 252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery";
    /// 221 closing
    BYE = 221, "2.0.0", "Bye";
    /// 220 before TLS handshake
    READY_FOR_TLS = 220, "2.0.0", "Ready to start TLS";
    /// 235 authentication succeeded
    AUTH_OK = 235, "2.7.0", "Authentication successful";
    /// 354 DATA go ahead
    START_DATA = 354, "", "End data with <CR><LF>.<CR><LF>";
    /// 421 shutting down
    SHUTTING_DOWN = 421, "4.3.2", "Service shutting down, try again later";
    /// 421 command timeout
    TIMEOUT = 421, "4.4.2", "Timeout exceeded, closing connection";
    /// 421 too many connections
    TOO_MANY_CONNECTIONS = 421, "4.7.0", "Too many connections, try again later";
    /// 421 too many errors
    TOO_MANY_ERRORS = 421, "4.7.0", "Too many errors, closing connection";
    /// 451 local error
    LOCAL_ERROR = 451, "4.3.0", "Local error in processing, try again later";
    /// 452 spool could not store the message
    SPOOL_ERROR = 452, "4.3.1", "Insufficient system storage, try again later";
    /// 452 too many recipients
    TOO_MANY_RECIPIENTS = 452, "4.5.3", "Too many recipients";
    /// 454 TLS not available
    TLS_UNAVAILABLE = 454, "4.7.0", "TLS not available";
    /// 454 temporary AUTH failure
    AUTH_TEMPFAIL = 454, "4.7.0", "Temporary authentication failure";
    /// 500 unknown command
    UNKNOWN_COMMAND = 500, "5.5.2", "Command not recognized";
    /// 500 line too long
    LINE_TOO_LONG = 500, "5.5.6", "Line too long";
    /// 501 syntax error in parameters
    SYNTAX_ERROR = 501, "5.5.4", "Syntax error in parameters or arguments";
    /// 501 bad sender address
    BAD_SENDER = 501, "5.1.7", "Bad sender address syntax";
    /// 501 bad recipient address
    BAD_RECIPIENT = 501, "5.1.3", "Bad recipient address syntax";
    /// 502 command not implemented
    NOT_IMPLEMENTED = 502, "5.5.1", "Command not implemented";
    /// 503 bad sequence
    BAD_SEQUENCE = 503, "5.5.1", "Bad sequence of commands";
    /// 503 need HELO/EHLO
    NEED_HELO = 503, "5.5.1", "Send HELO/EHLO first";
    /// 503 need MAIL
    NEED_MAIL = 503, "5.5.1", "Need MAIL command first";
    /// 503 need RCPT
    NEED_RCPT = 503, "5.5.1", "Need RCPT command first";
    /// 503 nested MAIL
    NESTED_MAIL = 503, "5.5.1", "Sender already specified";
    /// 503 already authenticated
    ALREADY_AUTHENTICATED = 503, "5.5.1", "Already authenticated";
    /// 555 MAIL/RCPT parameter not recognized (RFC 5321 4.2.3)
    UNSUPPORTED_PARAMETER = 555, "5.5.4", "Unsupported parameter";
    /// 504 unsupported AUTH mechanism
    UNSUPPORTED_MECHANISM = 504, "5.5.4", "Unrecognized authentication mechanism";
    /// 530 AUTH required (submission)
    AUTH_REQUIRED = 530, "5.7.0", "Authentication required";
    /// 530 STARTTLS first (AUTH only over TLS)
    TLS_REQUIRED = 530, "5.7.0", "Must issue a STARTTLS command first";
    /// 535 credentials rejected
    AUTH_FAILED = 535, "5.7.8", "Authentication credentials invalid";
    /// 454 the client's address reached the limit of failed AUTH attempts
    AUTH_THROTTLED = 454, "4.7.0", "Too many failed authentication attempts, try again later";
    /// 550 unknown recipient
    UNKNOWN_USER = 550, "5.1.1", "Recipient address rejected: user unknown";
    /// 552 message too big
    MESSAGE_TOO_BIG = 552, "5.3.4", "Message size exceeds fixed limit";
    /// 552 a line exceeds the ceiling
    DATA_LINE_TOO_LONG = 552, "5.3.4", "Message line exceeds the maximum length";
    /// 554 relay denied
    RELAY_DENIED = 554, "5.7.1", "Relay access denied";
    /// 554 mail loop
    MAIL_LOOP = 554, "5.4.6", "Too many Received headers: mail loop detected";
    /// 554 content pipelined past DATA without waiting for 354
    PIPELINING_VIOLATION = 554, "5.5.0", "Improper use of SMTP command pipelining";
    /// 550 bare CR or LF in message with bare_newline = reject
    BARE_NEWLINE = 550, "5.5.2", "Message contains bare CR or LF line endings, which are not allowed";
    /// 554 no valid recipients
    NO_VALID_RECIPIENTS = 554, "5.5.1", "No valid recipients";
    /// 451 policy plugin failure
    PLUGIN_TEMPFAIL = 451, "4.3.0", "Temporary policy failure, try again later";
    /// 550 policy plugin rejection (default text)
    POLICY_REJECT = 550, "5.7.1", "Rejected by policy";
    /// 550 SPF fail at MAIL FROM with `reject_spf_fail` (RFC 7372)
    SPF_FAIL = 550, "5.7.23", "SPF validation failed: the sender's domain does not authorize this client";
    /// 550 DMARC `p=reject` with `dmarc_enforce`
    DMARC_REJECT = 550, "5.7.1", "Rejected by the DMARC policy of the From: domain";
}

impl Reply {
    /// A reply with its own text (CR and LF in it become spaces).
    pub fn new(
        code: u16,
        enhanced: impl Into<Cow<'static, str>>,
        text: impl Into<Cow<'static, str>>,
    ) -> Reply {
        Reply {
            code,
            enhanced: enhanced.into(),
            text: one_line(text.into()),
        }
    }

    /// A multi-line reply.
    pub fn lines(
        code: u16,
        enhanced: impl Into<Cow<'static, str>>,
        lines: Vec<Cow<'static, str>>,
    ) -> Reply {
        let text = lines
            .into_iter()
            .map(one_line)
            .collect::<Vec<_>>()
            .join("\n");
        Reply {
            code,
            enhanced: enhanced.into(),
            text: text.into(),
        }
    }

    /// The same code with another text.
    pub fn with_text(&self, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::new(self.code, self.enhanced.clone(), text)
    }

    /// The text, lines separated by `\n`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Positive completion (2xx) or intermediate (3xx).
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Transient negative (4xx).
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Writes the reply in wire form (CRLF line ends, `-` continuation).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(if lines.peek().is_some() { b'-' } else { b' ' });
            if !self.enhanced.is_empty() {
                out.extend_from_slice(self.enhanced.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A reply line never carries a line break: that would let whoever produced
/// the text (a plugin, a remote server) inject protocol.
fn one_line(text: Cow<'static, str>) -> Cow<'static, str> {
    if text.contains(['\r', '\n']) {
        text.replace(['\r', '\n'], " ").into()
    } else {
        text
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.write_to(&mut out);
        let s = String::from_utf8_lossy(&out);
        f.write_str(s.trim_end().replace("\r\n", " / ").as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        for (reply, wire) in [
            (Reply::OK, "250 2.0.0 Ok\r\n"),
            (Reply::START_DATA, "354 End data with <CR><LF>.<CR><LF>\r\n"),
            (
                Reply::new(550, "5.7.1", "no\r\nRCPT TO:<x>"),
                "550 5.7.1 no  RCPT TO:<x>\r\n",
            ),
            (
                Reply::lines(250, "", vec!["mx.test".into(), "PIPELINING".into()]),
                "250-mx.test\r\n250 PIPELINING\r\n",
            ),
        ] {
            let mut out = Vec::new();
            reply.write_to(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), wire);
        }
    }
}
