//! AUTH PLAIN and LOGIN (RFC 4954, 4616), only over TLS.

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Flow, Session};
use crate::admin::metrics::{metrics, Result_};
use crate::auth::Checked;
use crate::smtp::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn auth(&mut self, mechanism: u64, initial: String) -> Flow {
        if !self.ctx.auth.enabled() {
            return self.error_reply(Reply::NOT_IMPLEMENTED);
        }
        if self.info.auth_user.is_some() {
            return self.error_reply(Reply::ALREADY_AUTHENTICATED);
        }
        if self.tx.is_some() {
            return self.error_reply(
                Reply::BAD_SEQUENCE.with_text("AUTH not allowed during a mail transaction"),
            );
        }
        if self.info.tls.is_none() {
            return self.error_reply(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        let ip = self.info.peer.ip();
        if self.ctx.auth.is_throttled(ip) {
            return self.error_reply(Reply::AUTH_THROTTLED);
        }
        let credentials = match mechanism {
            smtp_proto::AUTH_PLAIN => self.plain(initial).await,
            smtp_proto::AUTH_LOGIN => self.login(initial).await,
            _ => return self.error_reply(Reply::UNSUPPORTED_MECHANISM),
        };
        let (user, password) = match credentials {
            Ok(c) => c,
            Err(reply) => return self.error_reply(reply),
        };
        match self.ctx.auth.check(ip, &user, &password).await {
            Checked::Ok => {
                tracing::info!(peer = %self.info.peer, user, "authenticated");
                metrics().auth.inc(Result_::Ok);
                self.info.auth_user = Some(user);
                self.info.may_relay = true;
                self.reply(Reply::AUTH_OK)
            }
            Checked::Failed => {
                tracing::info!(peer = %self.info.peer, user, "authentication failed");
                metrics().auth.inc(Result_::Failed);
                self.error_reply(Reply::AUTH_FAILED)
            }
            // Other attempts from this address used up its tries meanwhile.
            Checked::Throttled => self.error_reply(Reply::AUTH_THROTTLED),
        }
    }

    /// PLAIN: `authzid NUL authcid NUL password`, in the command or after a 334.
    async fn plain(&mut self, initial: String) -> Result<(String, String), Reply> {
        let response = if initial.is_empty() {
            self.challenge("").await?
        } else {
            decode(initial.as_bytes())?
        };
        let mut parts = response.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Reply::new(501, "5.5.2", "Malformed PLAIN response"));
        };
        if !authzid.is_empty() && authzid != authcid {
            return Err(Reply::new(
                535,
                "5.7.8",
                "Authorization identity differs from authentication identity",
            ));
        }
        Ok((utf8(authcid)?, utf8(password)?))
    }

    /// LOGIN: user name and password, each after its own 334.
    async fn login(&mut self, initial: String) -> Result<(String, String), Reply> {
        let user = if initial.is_empty() {
            self.challenge("Username:").await?
        } else {
            decode(initial.as_bytes())?
        };
        let password = self.challenge("Password:").await?;
        Ok((utf8(&user)?, utf8(&password)?))
    }

    /// Sends `334 base64(prompt)` and reads the client's base64 answer.
    async fn challenge(&mut self, prompt: &str) -> Result<Vec<u8>, Reply> {
        let prompt = base64::engine::general_purpose::STANDARD.encode(prompt);
        self.output
            .extend_from_slice(format!("334 {prompt}\r\n").as_bytes());
        let line =
            self.read_line()
                .await
                .ok_or(Reply::new(501, "5.5.2", "Authentication aborted"))?;
        if line == b"*" {
            return Err(Reply::new(501, "5.0.0", "Authentication cancelled"));
        }
        decode(&line)
    }
}

fn decode(b64: &[u8]) -> Result<Vec<u8>, Reply> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| Reply::new(501, "5.5.2", "Invalid base64 in authentication response"))
}

fn utf8(b: &[u8]) -> Result<String, Reply> {
    String::from_utf8(b.to_vec()).map_err(|_| Reply::new(501, "5.5.2", "Credentials are not UTF-8"))
}
