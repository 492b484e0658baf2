//! Integration tests: one binary, modules per area, helpers in `support/`.
//! The real `postern` binary or the library over real TCP, with real clients.

mod attacks;
mod authn;
mod certs;
mod cluster;
mod compliance;
mod core;
mod crash;
mod delivery;
mod dkim;
mod examples;
mod faults;
mod firstparty;
mod kv;
mod lang;
mod mta_sts;
mod once;
mod ops;
mod pinning;
mod platform;
mod plugin_cli;
mod plugins;
mod routes;
mod support;
mod tls_versions;
