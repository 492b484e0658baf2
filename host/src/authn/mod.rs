//! Message authentication: who may claim to send as a domain, and proof that
//! we did. Not to be confused with [`crate::auth`], the SMTP AUTH users who
//! may log in to submit mail.
//!
//! # Layout
//!
//! - [`config`]: `[authentication]` and its per-listener overrides.
//! - [`spf`]: SPF `check_host()` with the RFC 7208 lookup limits.
//! - [`verify`]: SPF at MAIL FROM and of the HELO name; DKIM, ARC and DMARC
//!   of a message (mail-auth over the relay's one resolver; organizational
//!   domains from the Public Suffix List).
//! - [`results`]: the results of one transaction as a plain value, and the
//!   `Authentication-Results:` header made from it.
//! - [`header`]: header-section edits without I/O, such as removing forged
//!   `Authentication-Results:` fields.
//! - [`mta_sts`]: MTA-STS policies (RFC 8461) of the domains mail goes to,
//!   fetched over HTTPS and cached, for MX delivery.
//! - [`seal`]: ARC sets (RFC 8617) added to mail the relay passes on.
//! - [`sign`]: outbound DKIM signing with the keys of `[dkim]`, read again
//!   when their files change; [`keygen`] makes such keys.

pub mod config;
pub mod header;
pub mod keygen;
pub mod mta_sts;
pub mod results;
pub mod seal;
pub mod sign;
pub mod spf;
pub mod verify;

use std::path::PathBuf;

pub use config::{
    ArcSealerConfig, AuthenticationConfig, Checks, DkimConfig, ListenerAuthentication,
};
pub use results::Results;
pub use sign::Signer;
pub use verify::Verifier;

/// Errors of message authentication's setup: keys and their settings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key file that cannot be read, parsed or used.
    #[error("{path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A setting that makes no sense.
    #[error("{0}")]
    Config(String),
}
