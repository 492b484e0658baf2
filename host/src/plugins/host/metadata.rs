//! `postern:relay/metadata`: the plugin's values for the session and the
//! transaction of the running hook, each under the plugin's own name (a
//! shadow writes under the live plugin's name, into a copy).

use crate::metadata::Access;
use crate::plugins::bindings::metadata::{Host, MetadataError, Scope};
use crate::plugins::instance::HostState;

impl HostState {
    fn scope(&self, scope: Scope) -> Option<&Access> {
        let context = self.hook_context()?;
        match scope {
            Scope::Session => context.session_metadata.as_ref(),
            Scope::Transaction => context.transaction_metadata.as_ref(),
        }
    }

    fn read_value(&self, plugin: &str, scope: Scope, key: &str) -> Option<String> {
        self.scope(scope)?
            .read(|m| m.get(plugin, key).map(str::to_string))
    }
}

impl Host for HostState {
    fn get(&mut self, scope: Scope, key: String) -> wasmtime::Result<Option<String>> {
        self.host_call_done();
        Ok(self.read_value(&self.metadata_name, scope, &key))
    }

    fn set(
        &mut self,
        scope: Scope,
        key: String,
        value: String,
    ) -> wasmtime::Result<Result<(), MetadataError>> {
        self.host_call_done();
        if key.is_empty() {
            return Ok(Err(MetadataError::InvalidKey));
        }
        Ok(match self.scope(scope) {
            None => Err(MetadataError::NoScope),
            Some(Access::ReadOnly(_)) => Err(MetadataError::ReadOnly),
            Some(Access::Writable(m)) => {
                let limit = m.limit();
                m.lock()
                    .set(&self.metadata_name, &key, &value, limit)
                    .map_err(|_| MetadataError::TooLarge)
            }
        })
    }

    fn remove(
        &mut self,
        scope: Scope,
        key: String,
    ) -> wasmtime::Result<Result<bool, MetadataError>> {
        self.host_call_done();
        Ok(match self.scope(scope) {
            None => Err(MetadataError::NoScope),
            Some(Access::ReadOnly(_)) => Err(MetadataError::ReadOnly),
            Some(Access::Writable(m)) => Ok(m.lock().remove(&self.metadata_name, &key)),
        })
    }

    fn keys(&mut self, scope: Scope) -> wasmtime::Result<Vec<String>> {
        self.host_call_done();
        Ok(self
            .scope(scope)
            .map(|a| a.read(|m| m.keys(&self.metadata_name)))
            .unwrap_or_default())
    }

    fn get_from(
        &mut self,
        plugin: String,
        scope: Scope,
        key: String,
    ) -> wasmtime::Result<Option<String>> {
        self.host_call_done();
        Ok(self.read_value(&plugin, scope, &key))
    }
}
