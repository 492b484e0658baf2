//! `postern:relay/log`: plugin log lines go to the relay's tracing output,
//! tagged with the plugin's name.

use crate::plugins::bindings::log::{Host, Level};
use crate::plugins::instance::HostState;

impl Host for HostState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.host_call_done();
        // A plugin's text never reaches the log as more than one line.
        let message = message.escape_debug().to_string();
        let plugin = self.plugin.as_str();
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }
}
