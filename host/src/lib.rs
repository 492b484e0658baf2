//! Postern: a programmable SMTP relay whose policy lives in WebAssembly plugins.
//!
//! # Layout
//!
//! The modules follow one message through the relay:
//!
//! - [`config`]: the TOML config, checked on load.
//! - [`server`]: listeners, connection limits, shutdown; hands each connection to a session.
//! - [`proxy`]: the PROXY protocol header a load balancer may put first.
//! - [`smtp`]: the inbound protocol. [`smtp::codec`] and [`smtp::command`] do no I/O
//!   (line framing, DATA/BDAT receivers closed to smuggling, command parsing);
//!   [`smtp::session`] runs the dialogue, one file per verb; [`smtp::reply`] is
//!   every reply the relay sends; [`smtp::certs`] holds the listeners'
//!   certificates, picked by SNI and reloaded when their files change.
//! - [`relay`]: who may relay where (built-in access rules, run before any plugin).
//! - [`auth`]: AUTH users and the failure throttle.
//! - [`authn`]: message authentication (SPF, DKIM, DMARC, ARC), a different
//!   thing from [`auth`]: it judges who may send as a domain, not who may log in.
//! - [`policy`]: what a hook answers ([`policy::Verdict`], [`policy::Route`]).
//! - [`plugins`]: the plugin chain run at each hook.
//! - [`envelope`]: sender, recipients, parameters, client facts.
//! - [`metadata`]: what plugins remember per session and per message.
//! - [`queue`]: the durable spool; a 250 after DATA means it is fsynced here.
//!   Its index keeps the messages by state for `/metrics`.
//! - [`record`]: one transaction as JSON (session facts, envelope, metadata),
//!   shown by `postern queue show --json` and replayed by `postern plugin test`.
//! - [`delivery`]: the queue manager and SMTP client that take spooled mail to
//!   the next hop, retry it, bounce it, and the `postern queue` commands.
//! - [`admin`]: beside the flow: metrics, the HTTP listener and the control
//!   socket with the JSON API that operators and the command line use.

pub mod admin;
pub mod auth;
pub mod authn;
pub mod config;
pub mod delivery;
pub mod envelope;
pub mod metadata;
pub mod plugins;
pub mod policy;
pub mod proxy;
pub mod queue;
pub mod record;
pub mod relay;
pub mod server;
pub mod smtp;
