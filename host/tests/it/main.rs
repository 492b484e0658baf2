//! Integration tests: the real `postern` binary over real TCP, with real clients.

mod core;
mod crash;
mod support;
