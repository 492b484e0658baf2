//! EHLO and HELO.

use std::borrow::Cow;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Flow, Session};
use crate::smtp::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn ehlo(&mut self, host: String, esmtp: bool) -> Flow {
        // RFC 5321 4.1.4: EHLO in the middle of a transaction resets it.
        self.reset_transaction();
        self.info.helo = Some(printable(&host));
        let verdict = self.hooks.helo(&self.info, &self.metadata).await;
        if let Some(flow) = self.refused(verdict) {
            // Refused: no greeting took place, so MAIL needs another EHLO.
            self.info.helo = None;
            return flow;
        }
        self.esmtp = esmtp;
        let greeting = format!(
            "{} Hello {} [{}]",
            self.ctx.config.hostname,
            printable(&host),
            self.info.peer.ip()
        );
        if !esmtp {
            return self.reply(Reply::new(250, "", greeting));
        }
        let mut lines: Vec<Cow<'static, str>> = vec![
            greeting.into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.ctx.config.limits.max_message_size).into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "DSN".into(),
            "CHUNKING".into(),
        ];
        if self.info.tls.is_none() && self.listener.offers_starttls() {
            lines.push("STARTTLS".into());
        }
        // AUTH only over TLS: the credentials would otherwise cross in clear text.
        if self.info.tls.is_some() && self.ctx.auth.enabled() && self.info.auth_user.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        self.reply(Reply::lines(250, "", lines))
    }
}

/// The client's name as it may appear in replies and headers: no control
/// characters, bounded length.
pub(super) fn printable(s: &str) -> String {
    s.chars()
        .take(255)
        .map(|c| if c.is_control() || c == ' ' { '?' } else { c })
        .collect()
}
