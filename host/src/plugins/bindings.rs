//! The one `bindgen!` of the relay: Rust types and traits for the
//! `postern:relay` WIT package (`wit/postern.wit`). Everything else in the host
//! uses these paths.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "postern:relay/plugin",
    // Host functions are async so a DNS lookup never blocks a runtime thread,
    // and trappable so a host-side failure can end the call instead of lying.
    // The context of a hook is at hand, so reading it needs no await.
    imports: { "postern:relay/context": trappable, default: async | trappable },
    exports: { default: async },
    with: {
        "postern:relay/message.message": super::host::message::MessageRef,
    },
});

pub use self::postern::relay::{context, dns, kv, log, message, types};
