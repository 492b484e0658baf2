//! Helpers shared by the integration tests.

pub mod relay;
pub mod smtp;
pub mod tls;
