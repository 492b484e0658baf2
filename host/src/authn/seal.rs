//! ARC sealing (RFC 8617): a relay that passes mail on adds an ARC set, so
//! that hops after it can see what it found even when its changes (a
//! footer, say) break the original DKIM signatures. The set is made last,
//! from the message as it is spooled: its ARC-Authentication-Results holds
//! SPF as checked at MAIL FROM, and DKIM, ARC and DMARC of that message.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

use mail_auth::arc::ArcSealer;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::Done;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::{AuthenticatedMessage, AuthenticationResults, MessageAuthenticator};

use super::config::ArcSealerConfig;
use super::sign::{BorrowedKey, KeyFile, Recheck};
use super::verify::{organizational_domain, spf_output};
use super::{Error, Results};

/// Header fields the ARC-Message-Signature covers, each occurrence.
const SIGNED: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "DKIM-Signature",
    "List-Id",
];

/// Seals with one key, read again when its file changes (as DKIM keys are).
pub struct Sealer {
    key: Mutex<KeyFile>,
    checked: Recheck,
    /// Lowercase signing domain.
    domain: String,
    selector: String,
    auth: MessageAuthenticator,
    /// The authserv-id of the ARC-Authentication-Results.
    hostname: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

/// What the client said, for the SPF part of the results.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// Its address.
    pub ip: IpAddr,
    /// Its HELO name.
    pub helo: &'a str,
    /// The MAIL FROM address.
    pub sender: &'a str,
}

impl Sealer {
    /// Loads the key; `resolve` makes its path absolute.
    pub fn new(
        config: &ArcSealerConfig,
        resolve: impl Fn(&Path) -> std::path::PathBuf,
        auth: MessageAuthenticator,
        hostname: &str,
    ) -> Result<Sealer, Error> {
        Ok(Sealer {
            key: Mutex::new(KeyFile::load(resolve(&config.key))?),
            checked: Recheck::new(),
            domain: config.domain.trim_end_matches('.').to_ascii_lowercase(),
            selector: config.selector.clone(),
            auth,
            hostname: hostname.to_string(),
        })
    }

    /// The ARC set for `message` (three header fields, CRLF-terminated, to
    /// put first), or why there is none: a chain that already failed is
    /// not sealed again (RFC 8617 5.1.2).
    pub async fn seal(
        &self,
        message: &[u8],
        results: &Results,
        client: Client<'_>,
    ) -> Result<String, String> {
        let parsed = AuthenticatedMessage::parse(message).ok_or("no header section")?;
        let dkim = self.auth.verify_dkim(&parsed).await;
        let arc = self.auth.verify_arc(&parsed).await;
        let spf = spf_output(results.spf_mail_from.as_ref());
        let spf_domain = results
            .spf_mail_from
            .as_ref()
            .map_or("", |s| s.domain.as_str());
        let dmarc = self
            .auth
            .verify_dmarc(
                DmarcParameters::new(&parsed, &dkim, spf_domain, &spf)
                    .with_domain_suffix_fn(organizational_domain),
            )
            .await;
        let mut found = AuthenticationResults::new(&self.hostname);
        if results.spf_mail_from.is_some() {
            found = found.with_spf_mailfrom_result(&spf, client.ip, client.sender, client.helo);
        }
        if let Some(helo) = &results.spf_helo {
            found = found.with_spf_ehlo_result(&spf_output(Some(helo)), client.ip, client.helo);
        }
        let found = found
            .with_dkim_results(&dkim, parsed.from())
            .with_arc_result(&arc, client.ip)
            .with_dmarc_result(&dmarc);
        let key = {
            let mut file = self.key.lock().unwrap_or_else(|e| e.into_inner());
            if self.checked.due() {
                file.reload_changed("ARC sealing");
            }
            file.key()
        };
        // Sealers own their key: one per message, borrowing the current key.
        let sealer: ArcSealer<_, Done> = ArcSealer::from_key(BorrowedKey(&*key))
            .domain(&self.domain)
            .selector(&self.selector)
            .headers(SIGNED.iter().copied());
        let set = sealer
            .seal(&parsed, &found, &arc)
            .map_err(|e| e.to_string())?;
        Ok(set.to_header())
    }
}
