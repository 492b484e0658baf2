//! The bindings of the relay's WIT worlds: Rust types and traits for the
//! `postern:relay` package (`wit/postern.wit`, now 0.2.0), and the exports of
//! the 0.1.0 world (`wit/0.1.0/postern.wit`) so plugins built for it keep
//! working. Everything else in the host uses these paths.
//!
//! A 0.1.0 plugin's imports are served by the 0.2.0 host functions, linked
//! under the 0.1.0 names: those interfaces are unchanged or only grew, and
//! component types match by structure, not by name. Only the exports differ
//! (the `hook` enum grew), hence a second set of export bindings.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "postern:relay/plugin",
    // Host functions are async so a DNS lookup never blocks a runtime thread,
    // and trappable so a host-side failure can end the call instead of lying.
    // The context of a hook and its metadata are at hand, so reading them
    // needs no await.
    imports: {
        "postern:relay/context": trappable,
        "postern:relay/metadata": trappable,
        default: async | trappable,
    },
    exports: { default: async },
    with: {
        "postern:relay/message.message": super::host::message::MessageRef,
    },
});

pub use self::postern::relay::{context, dns, kv, log, message, metadata, types};

/// The `postern:relay@0.1.0` world: its export bindings (its import traits
/// are generated too, but the relay links the 0.2.0 ones in their place).
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/0.1.0",
        world: "postern:relay/plugin",
        imports: {
            "postern:relay/context": trappable,
            default: async | trappable,
        },
        exports: { default: async },
        with: {
            "postern:relay/message.message": crate::plugins::host::message::MessageRef,
        },
    });

    pub use self::postern::relay::types;
}
