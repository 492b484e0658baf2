//! MAIL FROM.

use smtp_proto::MailFrom;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Flow, Session};
use crate::config::ListenerMode;
use crate::envelope::{Address, Body, Envelope, MailParams, Ret};
use crate::metadata::SharedMetadata;
use crate::smtp::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn mail(&mut self, from: MailFrom<String>) -> Flow {
        if self.info.helo.is_none() {
            return self.error_reply(Reply::NEED_HELO);
        }
        if self.tx.is_some() {
            return self.error_reply(Reply::NESTED_MAIL);
        }
        if self.listener.config.mode == ListenerMode::Submission && self.info.auth_user.is_none() {
            return self.error_reply(Reply::AUTH_REQUIRED);
        }
        let params = match self.mail_params(&from) {
            Ok(p) => p,
            Err(reply) => return self.error_reply(reply),
        };
        let sender = Address(from.address);
        if sender.is_utf8() && !params.smtputf8 {
            return self.error_reply(Reply::new(
                553,
                "5.6.7",
                "Non-ASCII address requires the SMTPUTF8 parameter",
            ));
        }
        let authn = match self.authenticate_sender(&sender).await {
            Ok(results) => results,
            Err(reply) => return self.error_reply(reply),
        };
        let envelope = Envelope::new(sender, params);
        let limit = self.ctx.config.plugins.max_metadata_size;
        self.metadata.transaction = Some(SharedMetadata::new(limit));
        // The transaction's verdicts start here.
        self.hooks.take_verdicts();
        let verdict = self
            .hooks
            .mail_from(&self.info, &envelope, &authn, &self.metadata)
            .await;
        if let Some(flow) = self.refused(verdict) {
            // No transaction began: the instances go back.
            self.hooks.end();
            self.metadata.transaction = None;
            return flow;
        }
        self.tx = Some(envelope);
        self.authn = authn;
        self.reply(Reply::SENDER_OK)
    }

    /// Checks MAIL FROM parameters against what EHLO advertised.
    fn mail_params(&self, from: &MailFrom<String>) -> Result<MailParams, Reply> {
        use smtp_proto::*;
        let max = self.ctx.config.limits.max_message_size;
        if from.size > max {
            return Err(Reply::MESSAGE_TOO_BIG
                .with_text(format!("Message size exceeds fixed limit of {max} bytes")));
        }
        let unsupported = |name: &str| {
            Reply::UNSUPPORTED_PARAMETER.with_text(format!("Unsupported parameter {name}"))
        };
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            return Err(unsupported("BODY=BINARYMIME"));
        }
        for (flag, name) in [
            (MAIL_REQUIRETLS, "REQUIRETLS"),
            (MAIL_CONPERM, "CONPERM"),
            (MAIL_BY_NOTIFY | MAIL_BY_RETURN | MAIL_BY_TRACE, "BY"),
        ] {
            if from.flags & flag != 0 {
                return Err(unsupported(name));
            }
        }
        if from.mtrk.is_some()
            || from.hold_for != 0
            || from.hold_until != 0
            || from.trans_id.is_some()
        {
            return Err(unsupported("(not advertised)"));
        }
        if (from.flags & MAIL_BODY_8BITMIME != 0 || from.flags & MAIL_SMTPUTF8 != 0) && !self.esmtp
        {
            return Err(Reply::SYNTAX_ERROR.with_text("ESMTP parameters need EHLO"));
        }
        Ok(MailParams {
            size: from.size,
            body: if from.flags & MAIL_BODY_8BITMIME != 0 {
                Body::EightBitMime
            } else {
                Body::SevenBit
            },
            smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
            ret: if from.flags & MAIL_RET_FULL != 0 {
                Some(Ret::Full)
            } else if from.flags & MAIL_RET_HDRS != 0 {
                Some(Ret::Hdrs)
            } else {
                None
            },
            envid: from.env_id.clone(),
        })
    }
}
