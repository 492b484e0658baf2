//! RCPT TO.

use smtp_proto::RcptTo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Flow, Session};
use crate::envelope::{Address, Notify, Recipient};
use crate::smtp::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn rcpt(&mut self, to: RcptTo<String>, line: &[u8]) -> Flow {
        let Some(tx) = &self.tx else {
            return self.error_reply(Reply::NEED_MAIL);
        };
        if tx.recipients.len() >= self.ctx.config.limits.max_recipients {
            return self.error_reply(Reply::TOO_MANY_RECIPIENTS);
        }
        // smtp-proto reads both `<>` and `<postmaster>` as ""; only the second is valid.
        if to.address.is_empty() && !contains_ignore_case(line, b"<postmaster>") {
            return self.error_reply(Reply::BAD_RECIPIENT);
        }
        let address = Address(to.address);
        if address.is_utf8() && !tx.params.smtputf8 {
            return self.error_reply(Reply::new(
                553,
                "5.6.7",
                "Non-ASCII address requires SMTPUTF8 in MAIL FROM",
            ));
        }
        // Built-in access rules first: a plugin may refuse what they allow, never the reverse.
        let address = match self
            .ctx
            .access
            .check_recipient(self.info.may_relay, &address)
        {
            Ok(a) => a,
            Err(reply) => {
                tracing::info!(peer = %self.info.peer, rcpt = %address, reply = %reply, "recipient refused");
                return self.error_reply(reply);
            }
        };
        let recipient = Recipient {
            address,
            orcpt: to.orcpt,
            notify: notify(to.flags),
        };
        let verdict = self
            .hooks
            .rcpt(&self.info, tx, &recipient, &self.authn, &self.metadata)
            .await;
        if let Some(flow) = self.refused(verdict) {
            return flow;
        }
        let tx = self
            .tx
            .as_mut()
            .expect("checked above; hooks cannot end the transaction");
        if !tx.recipients.iter().any(|r| r.address == recipient.address) {
            tx.recipients.push(recipient);
        }
        self.reply(Reply::RECIPIENT_OK)
    }
}

fn notify(flags: u64) -> Option<Notify> {
    use smtp_proto::*;
    let any = RCPT_NOTIFY_NEVER | RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY;
    (flags & any != 0).then_some(Notify {
        never: flags & RCPT_NOTIFY_NEVER != 0,
        success: flags & RCPT_NOTIFY_SUCCESS != 0,
        failure: flags & RCPT_NOTIFY_FAILURE != 0,
        delay: flags & RCPT_NOTIFY_DELAY != 0,
    })
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}
