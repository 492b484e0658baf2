//! The inbound SMTP protocol.

pub mod certs;
pub mod codec;
pub mod command;
pub mod reply;
pub mod session;
pub mod tls;
