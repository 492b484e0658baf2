//! Delivery status notifications (RFC 3464, with RFC 3461's parameters): a
//! `multipart/report` with a human-readable part, a `message/delivery-status`
//! part with one block per recipient, and the original message (RET=FULL, or
//! no RET) or only its headers (RET=HDRS). Sent from the null sender, so a
//! report that cannot be delivered is never reported on in turn.

use std::borrow::Cow;

use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;

use super::state::{RcptState, Status};
use crate::authn::header::header_end;
use crate::envelope::{Envelope, Recipient, Ret};
use crate::queue::QueuedMeta;

/// Which recipients a DSN must be sent about, per RFC 3461 NOTIFY: failures
/// unless NOTIFY excludes FAILURE (or is NEVER), successes only with
/// NOTIFY=SUCCESS and only when the next hop did not take the duty on.
pub fn wants_notice(rcpt: &Recipient, state: &RcptState) -> bool {
    let notify = rcpt.notify.unwrap_or_default();
    match state.status {
        Status::Failed => rcpt.notify.is_none() || (notify.failure && !notify.never),
        Status::Delivered => notify.success && !notify.never && !state.dsn_relayed,
        Status::Pending | Status::Deferred => false,
    }
}

/// Whether a still-deferred recipient is owed a delay notice: only when it asked
/// for one (NOTIFY=DELAY), and only once.
pub fn wants_delay_notice(rcpt: &Recipient, state: &RcptState) -> bool {
    state.is_open()
        && state.attempts > 0
        && !state.delay_notified
        && rcpt.notify.is_some_and(|n| n.delay && !n.never)
}

/// Builds the report about `items` for the sender of `meta`'s message.
pub fn build(
    hostname: &str,
    meta: &QueuedMeta,
    message: &[u8],
    items: &[(&Recipient, &RcptState)],
) -> Vec<u8> {
    let all_failed = items.iter().all(|(_, s)| s.status == Status::Failed);
    let all_delivered = items.iter().all(|(_, s)| s.status == Status::Delivered);
    let subject = if all_failed {
        "Undelivered Mail Returned to Sender"
    } else if all_delivered {
        "Successful Mail Delivery Report"
    } else if items.iter().all(|(_, s)| s.is_open()) {
        "Delayed Mail (still being retried)"
    } else {
        "Delivery Status Notification"
    };

    let mut text = format!("This is the mail system at host {hostname}.\r\n\r\n");
    if items.iter().any(|(_, s)| s.status == Status::Failed) {
        text.push_str(
            "Your message could not be delivered to one or more recipients.\r\n\
             It is attached below.\r\n\r\n",
        );
    }
    if items.iter().any(|(_, s)| s.is_open()) {
        text.push_str(
            "Delivery to the recipients marked delayed below has been delayed.\r\n\
             The mail system will keep trying; you need not send the message again.\r\n\r\n",
        );
    }
    if items.iter().any(|(_, s)| s.status == Status::Delivered) {
        text.push_str(
            "Your message was delivered to the recipients marked delivered below.\r\n\r\n",
        );
    }
    for (rcpt, state) in items {
        let what = match state.status {
            Status::Delivered => "delivered".to_string(),
            _ => state.last_reply.clone().unwrap_or_else(|| "failed".into()),
        };
        text.push_str(&format!("<{}>: {}\r\n", rcpt.address, what));
    }

    let mut status = format!("Reporting-MTA: dns; {hostname}\r\n");
    if let Some(envid) = &meta.envelope.params.envid {
        status.push_str(&format!("Original-Envelope-Id: {}\r\n", one_line(envid)));
    }
    status.push_str(&format!(
        "Arrival-Date: {}\r\n",
        Date::new(meta.received as i64).to_rfc822()
    ));
    for (rcpt, state) in items {
        status.push_str("\r\n");
        if let Some(orcpt) = &rcpt.orcpt {
            status.push_str(&format!(
                "Original-Recipient: {}\r\n",
                one_line(&orcpt_with_type(orcpt))
            ));
        }
        let addr_type = if rcpt.address.is_utf8() {
            "utf-8"
        } else {
            "rfc822"
        };
        status.push_str(&format!(
            "Final-Recipient: {addr_type}; {}\r\n",
            rcpt.address
        ));
        let (action, default_status) = match state.status {
            Status::Delivered => ("delivered", "2.0.0"),
            Status::Pending | Status::Deferred => ("delayed", "4.0.0"),
            Status::Failed => ("failed", "5.0.0"),
        };
        status.push_str(&format!("Action: {action}\r\n"));
        status.push_str(&format!(
            "Status: {}\r\n",
            state.enhanced.as_deref().unwrap_or(default_status)
        ));
        if let Some(remote) = &state.remote {
            status.push_str(&format!("Remote-MTA: dns; {}\r\n", one_line(remote)));
        }
        if let Some(reply) = &state.last_reply {
            status.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", one_line(reply)));
        }
    }

    let headers_only = !all_failed_or_some(items) || meta.envelope.params.ret == Some(Ret::Hdrs);
    let returned = if headers_only {
        let end = header_end(message);
        MimePart::new(
            ContentType::new("text/rfc822-headers"),
            BodyPart::Binary(Cow::Owned(message[..end].to_vec())),
        )
    } else {
        MimePart::new(
            ContentType::new("message/rfc822"),
            BodyPart::Binary(Cow::Owned(message.to_vec())),
        )
    };
    let eight_bit = if message.is_ascii() { "7bit" } else { "8bit" };
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        BodyPart::Multipart(vec![
            MimePart::new(ContentType::new("text/plain"), BodyPart::Text(text.into())),
            MimePart::new(
                ContentType::new("message/delivery-status"),
                BodyPart::Binary(Cow::Owned(status.into_bytes())),
            )
            .transfer_encoding("7bit"),
            // message/* parts may not be base64- or QP-encoded (RFC 2046 5.2.1).
            returned.transfer_encoding(eight_bit),
        ]),
    );
    MessageBuilder::new()
        .from((
            "Mail Delivery System".to_string(),
            format!("MAILER-DAEMON@{hostname}"),
        ))
        .to(meta.envelope.sender.as_str())
        .subject(subject)
        .message_id(format!("{}.dsn@{hostname}", meta.id))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report)
        .write_to_vec()
        .unwrap_or_default()
}

/// Some recipient failed: the failure notice carries the content per RET.
fn all_failed_or_some(items: &[(&Recipient, &RcptState)]) -> bool {
    items.iter().any(|(_, s)| s.status == Status::Failed)
}

/// The envelope of the report: null sender, to the original sender.
pub fn envelope(meta: &QueuedMeta, to: &str, report: &[u8]) -> Envelope {
    let mut params = crate::envelope::MailParams::default();
    if !report.is_ascii() {
        params.body = crate::envelope::Body::EightBitMime;
    }
    params.smtputf8 = meta.envelope.params.smtputf8 || !to.is_ascii();
    let mut env = Envelope::new(crate::envelope::Address::null(), params);
    let mut rcpt = Recipient::new(to);
    // A report is never reported on (RFC 3461 6.2), even if our null sender
    // were somehow rewritten.
    rcpt.notify = Some(crate::envelope::Notify {
        never: true,
        ..Default::default()
    });
    env.recipients.push(rcpt);
    env
}

/// ORCPT as `addr-type;address`: the session keeps only the address when the
/// client used the common `rfc822` type.
pub fn orcpt_with_type(orcpt: &str) -> String {
    if orcpt.contains(';') {
        orcpt.to_string()
    } else {
        format!("rfc822;{orcpt}")
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Address, MailParams, Notify};

    fn meta(ret: Option<Ret>) -> QueuedMeta {
        let mut envelope = Envelope::new(
            Address("sender@origin.test".into()),
            MailParams {
                ret,
                envid: Some("ENV-1".into()),
                ..Default::default()
            },
        );
        let mut r = Recipient::new("rcpt@dest.test");
        r.orcpt = Some("rfc822;rcpt@dest.test".into());
        envelope.recipients.push(r);
        QueuedMeta {
            version: 1,
            id: "0000000000001AAAA".into(),
            received: 1_700_000_000,
            envelope,
            client: None,
            hold: None,
            size: 0,
            crc32: None,
            metadata: Default::default(),
        }
    }

    fn failed() -> RcptState {
        RcptState {
            status: Status::Failed,
            attempts: 1,
            last_reply: Some("550 5.1.1 No such user".into()),
            remote: Some("mx.dest.test [127.0.0.2]".into()),
            enhanced: Some("5.1.1".into()),
            notified: false,
            dsn_relayed: false,
            delay_notified: false,
        }
    }

    #[test]
    fn report_structure() {
        let message = b"Subject: hello\r\nFrom: a@origin.test\r\n\r\nsecret body\r\n";
        for (ret, body_returned) in [
            (None, true),
            (Some(Ret::Full), true),
            (Some(Ret::Hdrs), false),
        ] {
            let m = meta(ret);
            let st = failed();
            let out = build(
                "relay.test",
                &m,
                message,
                &[(&m.envelope.recipients[0], &st)],
            );
            use mail_parser::MimeHeaders;
            let parsed = mail_parser::MessageParser::default().parse(&out).unwrap();
            let ct = parsed.content_type().unwrap();
            assert_eq!(ct.c_type, "multipart");
            assert_eq!(ct.subtype(), Some("report"));
            assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
            let text = String::from_utf8_lossy(&out);
            for needle in [
                "Reporting-MTA: dns; relay.test",
                "Original-Envelope-Id: ENV-1",
                "Original-Recipient: rfc822;rcpt@dest.test",
                "Final-Recipient: rfc822; rcpt@dest.test",
                "Action: failed",
                "Status: 5.1.1",
                "Diagnostic-Code: smtp; 550 5.1.1 No such user",
                "Auto-Submitted: auto-replied",
                "Subject: hello",
            ] {
                assert!(
                    text.contains(needle),
                    "{ret:?}: missing {needle:?} in\n{text}"
                );
            }
            assert_eq!(text.contains("secret body"), body_returned, "{ret:?}");
        }
    }

    #[test]
    fn notify_rules() {
        let mut r = Recipient::new("a@b.test");
        let mut st = failed();
        assert!(wants_notice(&r, &st));
        r.notify = Some(Notify {
            never: true,
            ..Default::default()
        });
        assert!(!wants_notice(&r, &st));
        r.notify = Some(Notify {
            success: true,
            ..Default::default()
        });
        assert!(!wants_notice(&r, &st));
        st.status = Status::Delivered;
        assert!(wants_notice(&r, &st));
        st.dsn_relayed = true;
        assert!(!wants_notice(&r, &st));
        r.notify = None;
        st.dsn_relayed = false;
        assert!(!wants_notice(&r, &st));
    }
}
