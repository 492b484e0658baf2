//! `postern:relay/context`: what the running hook is about. The relay
//! converts the session, envelope, recipient and headers once per hook for
//! the whole chain; a plugin gets a copy in its memory only when it asks,
//! so a hook that does not look at them costs no guest allocations.

use crate::plugins::bindings::context::Host;
use crate::plugins::bindings::types as wit;
use crate::plugins::instance::HostState;

/// The context of one hook call, shared by every plugin of the chain (one
/// `Arc` per hook, so handing it to each plugin costs one reference count).
#[derive(Debug, Default)]
pub struct HookContext {
    /// The client session; none during route.
    pub session: Option<wit::Session>,
    /// The envelope; none during connect.
    pub envelope: Option<wit::Envelope>,
    /// The recipient, during rcpt and route.
    pub recipient: Option<wit::Address>,
    /// The header section, during route.
    pub headers: Option<String>,
}

impl HostState {
    fn hook_context(&self) -> Option<&HookContext> {
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
}
