//! Integration tests: one binary, modules per area, helpers in `support/`.

mod delivery;
mod support;
