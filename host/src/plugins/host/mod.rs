//! Host interfaces a plugin may import. `types`, `message`, `context` and
//! `metadata` are always linked; `log`, `kv` and `dns` only when the plugin's
//! `grants` name them, so a plugin that imports one it was not granted fails
//! to load.

pub mod body;
pub mod context;
pub mod dns;
pub mod kv;
pub mod log;
pub mod message;
pub mod metadata;
