//! `[authentication]`: which inbound checks run and what they may enforce,
//! with per-listener overrides (`[listener.authentication]`), since an
//! internal submission listener has no use for SPF.

use std::path::PathBuf;

use serde::Deserialize;

/// `[authentication]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthenticationConfig {
    /// SPF of the MAIL FROM domain and of the HELO name (RFC 7208 2.3).
    pub spf: bool,
    /// DKIM verification of every signature.
    pub dkim: bool,
    /// DMARC evaluation (needs the SPF and DKIM results it aligns).
    pub dmarc: bool,
    /// ARC chain validation.
    pub arc: bool,
    /// Verify mail from clients that may relay (`relay.networks`, AUTH)
    /// too; by default their mail is ours to sign, not to check.
    pub verify_trusted: bool,
    /// Refuse MAIL FROM with `550 5.7.23` when SPF says `fail`.
    pub reject_spf_fail: bool,
    /// Apply the sender's DMARC policy: `p=reject` is refused with
    /// `550 5.7.1`, `p=quarantine` is spooled on hold.
    pub dmarc_enforce: bool,
    /// Domains whose ARC seal we trust: a DMARC failure under a valid ARC
    /// chain last sealed by one of them is not enforced (mailing lists and
    /// forwarders that break the original signatures).
    pub trusted_arc_sealers: Vec<String>,
    /// Add an ARC set (RFC 8617) to the mail this relay receives, for the
    /// hops after it; needs `arc_sealer`.
    pub arc_seal: bool,
    /// The domain, selector and key ARC sets are sealed with.
    pub arc_sealer: Option<ArcSealerConfig>,
}

/// `[authentication.arc_sealer]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArcSealerConfig {
    /// The sealing domain (`d=`).
    pub domain: String,
    /// The selector (`s=`): the key record is `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM private key, RSA (2048 bits or more) or Ed25519.
    pub key: PathBuf,
}

impl Default for AuthenticationConfig {
    fn default() -> Self {
        AuthenticationConfig {
            spf: true,
            dkim: true,
            dmarc: true,
            arc: true,
            verify_trusted: false,
            reject_spf_fail: false,
            dmarc_enforce: false,
            trusted_arc_sealers: Vec::new(),
            arc_seal: false,
            arc_sealer: None,
        }
    }
}

/// `[listener.authentication]`: any key left out keeps the
/// `[authentication]` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerAuthentication {
    /// Overrides `authentication.spf`.
    pub spf: Option<bool>,
    /// Overrides `authentication.dkim`.
    pub dkim: Option<bool>,
    /// Overrides `authentication.dmarc`.
    pub dmarc: Option<bool>,
    /// Overrides `authentication.arc`.
    pub arc: Option<bool>,
    /// Overrides `authentication.verify_trusted`.
    pub verify_trusted: Option<bool>,
    /// Overrides `authentication.reject_spf_fail`.
    pub reject_spf_fail: Option<bool>,
    /// Overrides `authentication.dmarc_enforce`.
    pub dmarc_enforce: Option<bool>,
    /// Overrides `authentication.arc_seal`.
    pub arc_seal: Option<bool>,
}

/// The checks in force on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// SPF at MAIL FROM and of the HELO name.
    pub spf: bool,
    /// DKIM.
    pub dkim: bool,
    /// DMARC.
    pub dmarc: bool,
    /// ARC.
    pub arc: bool,
    /// Clients that may relay are verified too.
    pub verify_trusted: bool,
    /// SPF `fail` refuses MAIL FROM.
    pub reject_spf_fail: bool,
    /// DMARC policies are applied.
    pub dmarc_enforce: bool,
    /// Received mail gets an ARC set.
    pub arc_seal: bool,
}

impl Checks {
    /// True when any check runs.
    pub fn any(&self) -> bool {
        self.spf || self.dkim || self.dmarc || self.arc
    }
}

impl AuthenticationConfig {
    /// The checks of a listener with these overrides.
    pub fn checks(&self, o: &ListenerAuthentication) -> Checks {
        Checks {
            spf: o.spf.unwrap_or(self.spf),
            dkim: o.dkim.unwrap_or(self.dkim),
            dmarc: o.dmarc.unwrap_or(self.dmarc),
            arc: o.arc.unwrap_or(self.arc),
            verify_trusted: o.verify_trusted.unwrap_or(self.verify_trusted),
            reject_spf_fail: o.reject_spf_fail.unwrap_or(self.reject_spf_fail),
            dmarc_enforce: o.dmarc_enforce.unwrap_or(self.dmarc_enforce),
            arc_seal: o.arc_seal.unwrap_or(self.arc_seal),
        }
    }

    /// Checks the combinations that cannot work: `(key, message)` of the
    /// first, `prefix` naming the table (`authentication` or
    /// `listener[N].authentication`).
    pub fn validate(&self, prefix: &str, checks: &Checks) -> Result<(), (String, String)> {
        if checks.reject_spf_fail && !checks.spf {
            return Err((
                format!("{prefix}.reject_spf_fail"),
                "needs spf = true".into(),
            ));
        }
        if checks.dmarc_enforce && !checks.dmarc {
            return Err((
                format!("{prefix}.dmarc_enforce"),
                "needs dmarc = true".into(),
            ));
        }
        if checks.arc_seal && self.arc_sealer.is_none() {
            return Err((
                format!("{prefix}.arc_seal"),
                "needs [authentication.arc_sealer] with domain, selector and key".into(),
            ));
        }
        for (i, d) in self.trusted_arc_sealers.iter().enumerate() {
            if d.is_empty() || d.contains(['@', ' ', '/']) {
                return Err((
                    format!("authentication.trusted_arc_sealers[{i}]"),
                    format!("{d:?} is not a domain"),
                ));
            }
        }
        Ok(())
    }
}

/// `[dkim]`: outbound signing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// Header fields signed, each occurrence.
    pub headers: Vec<String>,
    /// Header fields signed once more than they occur, so that none can be
    /// added after signing (RFC 6376 8.15).
    pub oversign: Vec<String>,
    /// Header and body canonicalization, `relaxed/relaxed` by default.
    pub canonicalization: String,
    /// The keys, per domain and selector (`[[dkim.key]]`).
    #[serde(rename = "key")]
    pub keys: Vec<DkimKeyConfig>,
}

impl Default for DkimConfig {
    fn default() -> Self {
        let names = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        DkimConfig {
            headers: names(&[
                "From",
                "Sender",
                "Reply-To",
                "Subject",
                "Date",
                "Message-ID",
                "To",
                "Cc",
                "MIME-Version",
                "Content-Type",
                "Content-Transfer-Encoding",
                "In-Reply-To",
                "References",
                "List-Id",
                "List-Unsubscribe",
                "List-Unsubscribe-Post",
            ]),
            oversign: names(&[
                "From",
                "Sender",
                "Reply-To",
                "Subject",
                "Date",
                "To",
                "Cc",
                "Content-Type",
            ]),
            canonicalization: "relaxed/relaxed".into(),
            keys: Vec::new(),
        }
    }
}

/// One `[[dkim.key]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    /// The signing domain (`d=`): mail whose `From:` domain is this one is
    /// signed with this key.
    pub domain: String,
    /// The selector (`s=`): the key record is `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM private key (RSA of 2048 bits or more, or Ed25519), relative to
    /// the config file; read again when the file changes.
    pub key: PathBuf,
    /// Also sign mail from subdomains of `domain` that have no key of their
    /// own, as `domain`.
    #[serde(default)]
    pub subdomains: bool,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const LISTENER: &str = "[[listener]]\naddress = \"127.0.0.1:25\"\n";

    #[test]
    fn checks_default_on_enforcement_off_and_listeners_override() {
        let c = Config::parse(
            &format!("{LISTENER}[listener.authentication]\nspf = false\n{LISTENER}"),
            Path::new("t.toml"),
        )
        .unwrap();
        let a = &c.authentication;
        let first = a.checks(&c.listeners[0].authentication);
        let second = a.checks(&c.listeners[1].authentication);
        assert!(!first.spf && first.dkim && first.dmarc && first.arc);
        assert!(second.spf && !second.reject_spf_fail && !second.dmarc_enforce);
        assert!(!second.verify_trusted);
    }

    #[test]
    fn errors_name_the_key() {
        for (text, needle) in [
            ("[authentication]\nspf_strict = true\n", "spf_strict"),
            ("[authentication]\nspf = \"yes\"\n", "spf"),
            (
                "[authentication]\nspf = false\nreject_spf_fail = true\n",
                "authentication.reject_spf_fail",
            ),
            (
                "[authentication]\ndmarc = false\ndmarc_enforce = true\n",
                "authentication.dmarc_enforce",
            ),
            (
                "[authentication]\ntrusted_arc_sealers = [\"a@b\"]\n",
                "authentication.trusted_arc_sealers[0]",
            ),
        ] {
            let err = Config::parse(&format!("{LISTENER}{text}"), Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let err = Config::parse(
            &format!(
                "[authentication]\nreject_spf_fail = true\n{LISTENER}[listener.authentication]\nspf = false\n"
            ),
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("listener[0].authentication.reject_spf_fail"),
            "{err}"
        );
        let err = Config::parse(
            &format!("{LISTENER}[listener.authentication]\nsfp = false\n"),
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sfp"), "{err}");
    }

    #[test]
    fn dkim_errors_name_the_key() {
        for (text, needle) in [
            (
                "[dkim]\ncanonicalization = \"loose\"\n",
                "dkim.canonicalization",
            ),
            ("[dkim]\nsign_all = true\n", "sign_all"),
            ("[dkim]\nheaders = [\"Subject\"]\n", "dkim.headers"),
            (
                "[[dkim.key]]\ndomain = \"a.test\"\nselector = \"s\"\nkey = \"missing.pem\"\n",
                "dkim.key[0].key",
            ),
            (
                "[[dkim.key]]\ndomain = \"a.test\"\nselector = \"s 1\"\nkey = \"k.pem\"\n",
                "dkim.key[0].selector",
            ),
            (
                "[[dkim.key]]\ndomain = \"a.test\"\nselector = \"s\"\n",
                "key",
            ),
        ] {
            let err = Config::parse(&format!("{LISTENER}{text}"), Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let c = Config::parse(LISTENER, Path::new("t.toml")).unwrap();
        assert_eq!(c.dkim.canonicalization, "relaxed/relaxed");
        assert!(c.dkim.oversign.iter().any(|h| h == "From"));
    }
}
