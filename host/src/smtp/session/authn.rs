//! Message authentication in the dialogue: SPF when MAIL FROM arrives (so
//! `reject_spf_fail` and the mail-from hook can use it), DKIM, ARC and DMARC
//! once the message has ended. The results travel with the transaction and
//! reach the data hook in [`DataTransaction::authentication`].
//!
//! [`DataTransaction::authentication`]: crate::policy::DataTransaction::authentication

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use crate::authn::header::strip_authentication_results;
use crate::authn::results::{Policy, SpfResult};
use crate::authn::seal::{Client, Sealer};
use crate::authn::{Checks, Results, Signer};
use crate::envelope::Address;
use crate::smtp::codec::{fold_long_lines, prepend};
use crate::smtp::reply::Reply;

/// What the end of a message leaves: the message without forged results,
/// our `Authentication-Results:` header, and the built-in policy's word.
pub(super) struct Authenticated {
    /// The client's message, without fields claiming our authserv-id.
    pub message: Vec<u8>,
    /// Our header, when the client was checked.
    pub header: Option<String>,
    /// `dmarc_enforce` refuses the message.
    pub refuse: Option<Reply>,
    /// `dmarc_enforce` quarantines the message, for this reason.
    pub quarantine: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The checks this client gets, if any: clients that may relay are ours
    /// to sign for, and checked only with `verify_trusted`.
    fn authn_checks(&self) -> Option<Checks> {
        let checks = self
            .ctx
            .config
            .authentication
            .checks(&self.listener.config.authentication);
        (checks.any() && (checks.verify_trusted || !self.info.may_relay)).then_some(checks)
    }

    /// SPF of the HELO name (once per name) and of the sender. `Err` holds the
    /// refusal when `reject_spf_fail` applies.
    pub(super) async fn authenticate_sender(&mut self, sender: &Address) -> Result<Results, Reply> {
        let mut results = Results::default();
        let Some(checks) = self.authn_checks().filter(|c| c.spf) else {
            return Ok(results);
        };
        let ip = self.info.peer.ip();
        let helo = self.info.helo.clone().unwrap_or_default();
        let cached = self.helo_spf.as_ref().filter(|(name, _)| *name == helo);
        results.spf_helo = match cached {
            Some((_, spf)) => spf.clone(),
            None => {
                let spf = self.ctx.verifier.spf_helo(ip, &helo).await;
                self.helo_spf = Some((helo.clone(), spf.clone()));
                spf
            }
        };
        let spf = self.ctx.verifier.spf_mail_from(ip, &helo, sender).await;
        if checks.reject_spf_fail && spf.result == SpfResult::Fail {
            tracing::info!(peer = %self.info.peer, sender = %sender, reason = %spf.reason, "sender refused: SPF fail");
            return Err(Reply::SPF_FAIL);
        }
        results.spf_mail_from = Some(spf);
        Ok(results)
    }

    /// Takes forged `Authentication-Results:` out of `message`, then runs
    /// DKIM, ARC and DMARC into the transaction's results.
    pub(super) async fn authenticate_message(&mut self, message: Vec<u8>) -> Authenticated {
        let hostname = &self.ctx.config.hostname;
        let (message, forged) = strip_authentication_results(message, hostname);
        if forged > 0 {
            tracing::info!(peer = %self.info.peer, removed = forged, "removed Authentication-Results claiming our authserv-id");
        }
        let mut done = Authenticated {
            message,
            header: None,
            refuse: None,
            quarantine: None,
        };
        let Some(checks) = self.authn_checks() else {
            return done;
        };
        self.ctx
            .verifier
            .message(&checks, &done.message, &mut self.authn)
            .await;
        done.header = Some(self.authn.header(hostname, self.info.peer.ip()));
        if let Some(d) = &self.authn.dmarc {
            match d.disposition {
                Policy::Reject => done.refuse = Some(Reply::DMARC_REJECT),
                Policy::Quarantine => {
                    done.quarantine = Some(format!("DMARC policy of {} is quarantine", d.domain))
                }
                Policy::None => {}
            }
        }
        done
    }
}

/// What sealing a message of this session needs: the sealer and the
/// client's address and HELO name.
pub(super) struct Sealing {
    sealer: Arc<Sealer>,
    ip: std::net::IpAddr,
    helo: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// `Some` when this listener seals (`arc_seal`) and a sealer is set.
    pub(super) fn sealing(&self) -> Option<Sealing> {
        let sealer = self.ctx.sealer.clone()?;
        let checks = self
            .ctx
            .config
            .authentication
            .checks(&self.listener.config.authentication);
        checks.arc_seal.then(|| Sealing {
            sealer,
            ip: self.info.peer.ip(),
            helo: self.info.helo.clone().unwrap_or_default(),
        })
    }
}

/// The message with an ARC set first. A message that cannot be sealed (its
/// chain already failed, no header section) goes on as it is.
pub(super) async fn arc_seal(
    sealing: Sealing,
    message: Vec<u8>,
    results: &Results,
    sender: &Address,
) -> Vec<u8> {
    let client = Client {
        ip: sealing.ip,
        helo: &sealing.helo,
        sender: sender.as_str(),
    };
    match sealing.sealer.seal(&message, results, client).await {
        Ok(set) => {
            let mut sealed = set.into_bytes();
            sealed.extend_from_slice(&message);
            sealed
        }
        Err(e) => {
            tracing::info!(peer = %sealing.ip, error = %e, "message not ARC-sealed");
            message
        }
    }
}

/// The message as it is spooled: lines over 998 octets folded, then, when
/// the client may relay, signed with the keys of its `From:` domain. After
/// this no byte of it changes.
pub(super) async fn sign_outbound(
    signer: Arc<Signer>,
    may_relay: bool,
    message: Vec<u8>,
) -> Vec<u8> {
    let message = fold_long_lines(message);
    if !may_relay || !signer.is_enabled() {
        return message;
    }
    // RSA signing takes a millisecond or two of CPU: off the workers that
    // run sessions.
    let message = Arc::new(message);
    let m = message.clone();
    let signatures = match tokio::task::spawn_blocking(move || signer.sign(&m)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "DKIM signing did not finish; message spooled unsigned");
            Vec::new()
        }
    };
    let message = Arc::try_unwrap(message).unwrap_or_else(|m| m.as_ref().clone());
    if signatures.is_empty() {
        return message;
    }
    prepend(message, &[&signatures])
}
