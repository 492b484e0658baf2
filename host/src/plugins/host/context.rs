//! `postern:relay/context`: what the running hook is about. The relay
//! converts the session, envelope, recipient, headers and authentication
//! results once per hook for
//! the whole chain; a plugin gets a copy in its memory only when it asks,
//! so a hook that does not look at them costs no guest allocations.

use crate::metadata::Access;
use crate::plugins::bindings::context::{self, Host};
use crate::plugins::bindings::types as wit;
use crate::plugins::instance::HostState;

/// The context of one hook call, shared by every plugin of the chain (one
/// `Arc` per hook, so handing it to each plugin costs one reference count).
#[derive(Debug, Default, Clone)]
pub struct HookContext {
    /// The client session (at route and delivered, as stored with the
    /// message; none for the relay's own bounces).
    pub session: Option<wit::Session>,
    /// The envelope; none during connect and helo.
    pub envelope: Option<wit::Envelope>,
    /// The recipient, during rcpt, route and delivered.
    pub recipient: Option<wit::Address>,
    /// The header section, during route.
    pub headers: Option<String>,
    /// The authentication results, during mail-from, rcpt and data.
    pub authentication: Option<context::Authentication>,
    /// The queue id, from data on.
    pub queue_id: Option<String>,
    /// The session's metadata; none at route and delivered.
    pub session_metadata: Option<Access>,
    /// The transaction's metadata; none before mail-from.
    pub transaction_metadata: Option<Access>,
}

impl HookContext {
    /// The same context with metadata whose writes change nothing here: what a
    /// shadow plugin gets.
    pub fn fork(&self) -> HookContext {
        HookContext {
            session_metadata: self.session_metadata.as_ref().map(Access::fork),
            transaction_metadata: self.transaction_metadata.as_ref().map(Access::fork),
            ..self.clone()
        }
    }
}

impl HostState {
    pub(crate) fn hook_context(&self) -> Option<&HookContext> {
        self.context.as_deref()
    }
}

/// The value, or the trap for a plugin that asks for what its hook does
/// not have.
fn present<T: Clone>(value: Option<&T>, what: &str) -> wasmtime::Result<T> {
    value
        .cloned()
        .ok_or_else(|| wasmtime::Error::msg(format!("the running hook has no {what}")))
}

impl Host for HostState {
    fn get_session(&mut self) -> wasmtime::Result<wit::Session> {
        self.host_call_done();
        present(
            self.hook_context().and_then(|c| c.session.as_ref()),
            "session",
        )
    }

    fn find_session(&mut self) -> wasmtime::Result<Option<wit::Session>> {
        self.host_call_done();
        Ok(self.hook_context().and_then(|c| c.session.clone()))
    }

    fn get_envelope(&mut self) -> wasmtime::Result<wit::Envelope> {
        self.host_call_done();
        present(
            self.hook_context().and_then(|c| c.envelope.as_ref()),
            "envelope",
        )
    }

    fn get_recipient(&mut self) -> wasmtime::Result<wit::Address> {
        self.host_call_done();
        present(
            self.hook_context().and_then(|c| c.recipient.as_ref()),
            "recipient",
        )
    }

    fn get_headers(&mut self) -> wasmtime::Result<String> {
        self.host_call_done();
        present(
            self.hook_context().and_then(|c| c.headers.as_ref()),
            "headers",
        )
    }

    fn get_queue_id(&mut self) -> wasmtime::Result<Option<String>> {
        self.host_call_done();
        Ok(self.hook_context().and_then(|c| c.queue_id.clone()))
    }

    fn get_pools(&mut self) -> wasmtime::Result<Vec<String>> {
        self.host_call_done();
        Ok(self.services.pools.clone())
    }

    fn get_authentication(&mut self) -> wasmtime::Result<context::Authentication> {
        self.host_call_done();
        present(
            self.hook_context().and_then(|c| c.authentication.as_ref()),
            "authentication results",
        )
    }
}
