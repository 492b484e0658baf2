//! Integration tests: one binary, one module per area; helpers under `support/`.

mod plugins;
