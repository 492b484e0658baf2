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

pub mod config;
pub mod header;
pub mod results;
pub mod spf;
pub mod verify;

pub use config::{AuthenticationConfig, Checks, ListenerAuthentication};
pub use results::Results;
pub use verify::Verifier;
