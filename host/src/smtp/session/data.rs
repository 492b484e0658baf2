//! DATA and BDAT, and what happens once a message has ended: limits, the loop
//! check, our `Received:` header, the data hook, and the spool.

use std::sync::Arc;

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::authn::{arc_seal, sign_outbound};
use super::ehlo::printable;
use super::{Flow, Session};
use crate::admin::metrics::{metrics, Label, Source, TxOutcome};
use crate::config::BareNewline;
use crate::envelope::{Address, Envelope, SessionInfo};
use crate::plugins::Scopes;
use crate::policy::{DataTransaction, Verdict};
use crate::queue::QueueId;
use crate::server::Context;
use crate::smtp::codec::{self, BdatReceiver, ContentFlags, ContentLimits, DataReceiver};
use crate::smtp::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn content_limits(&self) -> ContentLimits {
        let l = &self.ctx.config.limits;
        ContentLimits {
            max_size: l.max_message_size,
            max_line: l.max_line_length,
            bare_newline: self.ctx.config.smtp.bare_newline,
        }
    }

    pub(super) async fn data(&mut self) -> Flow {
        if self.bdat.is_some() {
            return self.error_reply(Reply::BAD_SEQUENCE.with_text("DATA not allowed during BDAT"));
        }
        match &self.tx {
            None => return self.error_reply(Reply::NEED_MAIL),
            Some(tx) if tx.recipients.is_empty() => {
                return self.error_reply(Reply::NO_VALID_RECIPIENTS)
            }
            Some(_) => {}
        }
        // RFC 2920: DATA ends a pipelined group. Content that arrived before our
        // 354 was sent blind; Postfix 3.9 answers it the same way.
        if !self.input.is_empty() {
            tracing::info!(peer = %self.info.peer, "content sent before the 354 reply, closing");
            Reply::PIPELINING_VIOLATION.write_to(&mut self.output);
            return Flow::Close;
        }
        self.reply(Reply::START_DATA);
        let mut receiver = DataReceiver::new(self.content_limits());
        if let Some(tx) = &self.tx {
            receiver.expect(tx.params.size);
        }
        let data_timeout = self.ctx.config.limits.data_timeout.0;
        let mut memory = MemoryReservation::new(self.ctx.message_memory.clone());
        loop {
            let used = receiver.feed(&self.input);
            self.input.advance(used);
            if !memory.cover(receiver.kept()) {
                receiver.abandon();
            }
            if receiver.is_done() {
                break;
            }
            if self.read_more_within(data_timeout, false).await.is_err() {
                return Flow::Close;
            }
        }
        let (message, flags) = receiver.finish();
        self.end_of_message(message, flags).await
    }

    pub(super) async fn bdat(&mut self, size: usize, last: bool) -> Flow {
        // The chunk follows the command whatever we answer, so it is always read
        // (RFC 3030 4.2); only then is the reply given.
        let refusal = match &self.tx {
            None => Some(Reply::NEED_MAIL),
            Some(tx) if tx.recipients.is_empty() => Some(Reply::NO_VALID_RECIPIENTS),
            Some(_) => None,
        };
        if refusal.is_none() && self.bdat.is_none() {
            let mut receiver = BdatReceiver::new(self.content_limits());
            if let Some(tx) = &self.tx {
                receiver.expect(tx.params.size);
            }
            self.bdat = Some(receiver);
            self.bdat_memory = Some(MemoryReservation::new(self.ctx.message_memory.clone()));
        }
        let data_timeout = self.ctx.config.limits.data_timeout.0;
        let mut left = size;
        while left > 0 {
            if self.input.is_empty() && self.read_more_within(data_timeout, false).await.is_err() {
                return Flow::Close;
            }
            let take = left.min(self.input.len());
            if let (Some(receiver), Some(memory)) = (&mut self.bdat, &mut self.bdat_memory) {
                receiver.feed(&self.input[..take]);
                if !memory.cover(receiver.kept()) {
                    receiver.abandon();
                }
            }
            self.input.advance(take);
            left -= take;
        }
        if let Some(reply) = refusal {
            return self.error_reply(reply);
        }
        if !last {
            return self.reply(Reply::new(250, "2.0.0", format!("{size} octets received")));
        }
        let Some(receiver) = self.bdat.take() else {
            return self.error_reply(Reply::NEED_MAIL);
        };
        // Held until the message is spooled or refused.
        let _memory = self.bdat_memory.take();
        let (message, flags) = receiver.finish();
        self.end_of_message(message, flags).await
    }

    /// The message has ended: check it, run the data hook, spool it, reply.
    async fn end_of_message(&mut self, message: Vec<u8>, flags: ContentFlags) -> Flow {
        let Some(envelope) = self.tx.take() else {
            return self.error_reply(Reply::NEED_MAIL);
        };
        let id = QueueId::generate();
        let sender = envelope.sender.to_string();
        let recipients: Vec<&str> = envelope
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect();
        let recipients = recipients.join(",");
        let size = message.len();
        let (flow, outcome) = self.complete_message(&id, envelope, message, flags).await;
        metrics().transactions.inc(outcome);
        // The transaction's one record. Everything the client chose (names,
        // addresses) is passed as a string, which both log formats escape.
        let reply = self
            .data_reply
            .take()
            .map(|r| r.to_string())
            .unwrap_or_default();
        tracing::info!(
            queue_id = %id,
            peer = %self.info.peer,
            helo = self.info.helo.as_deref().unwrap_or(""),
            tls = self.info.tls.as_ref().map(|t| t.version.as_str()).unwrap_or("none"),
            auth = self.info.auth_user.as_deref().unwrap_or(""),
            sender = sender.as_str(),
            recipients = recipients.as_str(),
            size,
            verdicts = self.hooks.take_verdicts().as_str(),
            reply = reply.trim_end(),
            outcome = outcome.as_str(),
            "transaction"
        );
        flow
    }

    /// [`Session::end_of_message`] once the transaction is taken: the reply,
    /// and how the transaction ended for the counters.
    async fn complete_message(
        &mut self,
        id: &QueueId,
        envelope: Envelope,
        message: Vec<u8>,
        flags: ContentFlags,
    ) -> (Flow, TxOutcome) {
        let refused = TxOutcome::Refused;
        // The transaction ends here, whatever the outcome.
        let scopes = Scopes {
            session: self.metadata.session.clone(),
            transaction: self.metadata.transaction.take(),
        };
        self.bdat = None;
        if flags.bare_newline && self.ctx.config.smtp.bare_newline == BareNewline::Reject {
            return (self.error_reply(Reply::BARE_NEWLINE), refused);
        }
        if flags.too_big {
            return (self.error_reply(Reply::MESSAGE_TOO_BIG), refused);
        }
        if flags.no_memory {
            tracing::warn!(peer = %self.info.peer, "limits.max_message_memory exhausted; message refused for now");
            return (self.error_reply(Reply::SPOOL_ERROR), TxOutcome::Failed);
        }
        if flags.line_too_long {
            return (self.error_reply(Reply::DATA_LINE_TOO_LONG), refused);
        }
        if codec::count_received_headers(&message) > self.ctx.config.limits.max_received_headers {
            return (self.error_reply(Reply::MAIL_LOOP), refused);
        }
        let authenticated = self.authenticate_message(message).await;
        let message = authenticated.message;
        let authentication = std::mem::take(&mut self.authn);
        if let Some(reply) = authenticated.refuse {
            self.hooks.end();
            tracing::info!(peer = %self.info.peer, sender = %envelope.sender, reply = %reply, "message refused by DMARC policy");
            return (self.error_reply(reply), refused);
        }
        let received = received_header(
            &self.info,
            &self.ctx.config.hostname,
            self.esmtp,
            id,
            &envelope,
            &self.ctx.config.smtp,
        );
        let results_header = authenticated.header.unwrap_or_default();
        let full = codec::prepend(message, &[received.as_bytes(), results_header.as_bytes()]);

        let mut tx = DataTransaction::new(envelope, full);
        tx.quarantine = authenticated.quarantine;
        tx.authentication = authentication;
        let given: Vec<Address> = tx
            .envelope
            .recipients
            .iter()
            .map(|r| r.address.clone())
            .collect();
        let verdict = self.hooks.data(&self.info, &mut tx, &scopes, id).await;
        // The data hook is the transaction's last.
        self.hooks.end();
        let metadata = scopes.transaction.map(|m| m.snapshot()).unwrap_or_default();
        let trusted = std::mem::take(&mut tx.trusted);
        check_added_recipients(
            &self.ctx,
            &self.info,
            id,
            &given,
            &trusted,
            &mut tx.envelope,
        );
        if !matches!(verdict, Verdict::Continue | Verdict::Accept) {
            return (self.refused(verdict).unwrap_or(Flow::Continue), refused);
        }
        if tx.envelope.recipients.is_empty() {
            tracing::info!(queue_id = %id, peer = %self.info.peer, "every recipient removed by policy; message dropped");
            let reply = Reply::new(
                250,
                "2.0.0",
                format!("Ok: {id} accepted, no recipients left"),
            );
            return (self.reply(reply), TxOutcome::Dropped);
        }
        let signer = self.ctx.signer.clone();
        let message = sign_outbound(signer, self.info.may_relay, tx.message).await;
        let message = match self.sealing() {
            Some(sealing) => {
                arc_seal(sealing, message, &tx.authentication, &tx.envelope.sender).await
            }
            None => message,
        };
        let message = Arc::new(message);
        let size = message.len();
        match self
            .ctx
            .spool
            .store(
                id,
                &tx.envelope,
                Some(&self.info),
                tx.quarantine.clone(),
                metadata,
                message,
            )
            .await
        {
            Ok(spooled) => {
                if let Some(reason) = tx.quarantine.as_deref() {
                    tracing::info!(queue_id = %id, size, reason, "quarantined");
                }
                self.ctx.queued(spooled);
                metrics().received.inc(Source::Smtp);
                let reply = Reply::new(250, "2.0.0", format!("Ok: queued as {id}"));
                (self.reply(reply), TxOutcome::Queued)
            }
            Err(e) => {
                tracing::error!(queue_id = %id, peer = %self.info.peer, error = %e, "could not spool message");
                (self.error_reply(Reply::SPOOL_ERROR), TxOutcome::Failed)
            }
        }
    }
}

/// Recipients a data-hook plugin added face the access rules that RCPT
/// does, and the recipient limit: a plugin that takes addresses from the
/// message must not make the relay open. Those a plugin granted
/// `recipients` added (`trusted`: the administrator's own aliases and
/// journal addresses) face only the limit. Those refused are dropped and
/// logged; the message goes on to the others.
pub(crate) fn check_added_recipients(
    ctx: &Context,
    info: &SessionInfo,
    id: &QueueId,
    given: &[Address],
    trusted: &[Address],
    envelope: &mut Envelope,
) {
    let access = &ctx.access;
    let mut room = ctx.config.limits.max_recipients.saturating_sub(given.len());
    envelope.recipients.retain_mut(|r| {
        if given.contains(&r.address) {
            return true;
        }
        if room == 0 {
            tracing::warn!(queue_id = %id, rcpt = %r.address, "recipient added by a plugin dropped: limits.max_recipients reached");
            return false;
        }
        if trusted.contains(&r.address) {
            room -= 1;
            return true;
        }
        match access.check_recipient(info.may_relay, &r.address) {
            Ok(address) => {
                r.address = address;
                room -= 1;
                true
            }
            Err(reply) => {
                tracing::warn!(queue_id = %id, peer = %info.peer, rcpt = %r.address, reply = %reply, "recipient added by a plugin dropped: the access rules refuse it for this client");
                false
            }
        }
    });
}

/// Our trace header (RFC 5321 4.4), with the protocol keywords of RFC 3848.
pub(crate) fn received_header(
    info: &SessionInfo,
    hostname: &str,
    esmtp: bool,
    id: &QueueId,
    envelope: &crate::envelope::Envelope,
    smtp: &crate::config::SmtpConfig,
) -> String {
    let helo = printable(info.helo.as_deref().unwrap_or("unknown"));
    let protocol = match (esmtp, info.tls.is_some(), info.auth_user.is_some()) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    };
    let protocol = if envelope.params.smtputf8 {
        format!("UTF8{protocol}")
    } else {
        protocol.to_string()
    };
    let hidden = smtp
        .received_hide_networks
        .iter()
        .any(|n| n.contains(&info.peer.ip()));
    let mut h = if hidden {
        format!("Received: by {hostname} (Postern) with {protocol} id {id}")
    } else {
        format!(
            "Received: from {helo} ([{}])\r\n\tby {hostname} (Postern) with {protocol} id {id}",
            info.peer.ip()
        )
    };
    if let Some(tls) = &info.tls {
        h.push_str(&format!(
            "\r\n\t(using {} with cipher {})",
            tls.version, tls.cipher
        ));
    }
    if let (true, false, Some(user)) = (smtp.received_auth_user, hidden, &info.auth_user) {
        h.push_str(&format!("\r\n\t(authenticated as {})", printable(user)));
    }
    if let [only] = envelope.recipients.as_slice() {
        h.push_str(&format!("\r\n\tfor <{}>", printable(only.address.as_str())));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    h.push_str(&format!(
        ";\r\n\t{}\r\n",
        mail_parser::DateTime::from_timestamp(now).to_rfc822()
    ));
    h
}

/// Memory reserved from `limits.max_message_memory` for one message being
/// received, grown in steps as the message grows and given back on drop.
pub(super) struct MemoryReservation {
    pool: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    held_kib: usize,
}

/// Reservations grow in steps of this many KiB, so a message takes the
/// semaphore a few times, not once per line.
const MEMORY_STEP_KIB: usize = 64;

impl MemoryReservation {
    fn new(pool: Arc<Semaphore>) -> MemoryReservation {
        MemoryReservation {
            pool,
            held: None,
            held_kib: 0,
        }
    }

    /// Makes sure `bytes` are covered; false when the pool has not enough left.
    fn cover(&mut self, bytes: usize) -> bool {
        let need_kib = bytes.div_ceil(1024);
        if need_kib <= self.held_kib {
            return true;
        }
        let want = (need_kib - self.held_kib).div_ceil(MEMORY_STEP_KIB) * MEMORY_STEP_KIB;
        let Ok(n) = u32::try_from(want) else {
            return false;
        };
        match self.pool.clone().try_acquire_many_owned(n) {
            Ok(permit) => {
                match &mut self.held {
                    Some(held) => held.merge(permit),
                    None => self.held = Some(permit),
                }
                self.held_kib += want;
                true
            }
            Err(_) => false,
        }
    }
}
