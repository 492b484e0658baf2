//! Capability interfaces (log, kv, dns) that a plugin imports but was not
//! granted.
//!
//! A Rust plugin imports only what it calls, so an import it was not granted
//! is a mistake, and the relay refuses to load it (`check_imports`). The
//! Python and JavaScript toolchains import every interface of the world
//! whether the plugin calls it or not. Their SDK builds say so with a custom
//! section, [`SECTION`], holding `trap`; for such a component the relay links
//! each ungranted interface to functions that trap with a [`NotGranted`]
//! error, so the plugin loads, works as long as it uses only what it was
//! granted, and a call to anything else ends the hook with the plugin's
//! `on_error` answer and a log line naming the interface.
//!
//! The marker chooses only when an ungranted call fails (at load, or at the
//! call), never whether it succeeds: nothing ungranted is ever linked to a
//! working function.

use wasmtime::component::types::{ComponentInstance, ComponentItem};
use wasmtime::component::Linker;
use wasmtime::Engine;

use crate::config::Grant;
use crate::plugins::instance::HostState;

/// The custom section that marks a component whose toolchain imports every
/// interface of the world.
pub const SECTION: &str = "postern:ungranted";

/// What [`SECTION`] holds when ungranted interfaces should trap.
pub const TRAP: &[u8] = b"trap";

/// A call of a function of an interface the plugin was not granted.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "called {interface} `{function}`, which it was not granted (add \"{grant}\" to its grants)"
)]
pub struct NotGranted {
    /// The interface as imported, e.g. `postern:relay/kv@0.2.0`.
    pub interface: String,
    /// The function called.
    pub function: String,
    /// The grant that would allow it.
    pub grant: &'static str,
}

/// True when the component's top-level [`SECTION`] says `trap`. Reads only
/// the section headers of the outer component (nested modules are skipped
/// whole), and answers false for anything it cannot read.
pub fn traps_ungranted(bytes: &[u8]) -> bool {
    custom_section(bytes, SECTION) == Some(TRAP)
}

/// The payload of the first top-level custom section called `name`.
fn custom_section<'a>(bytes: &'a [u8], name: &str) -> Option<&'a [u8]> {
    // Magic number and version/layer: 8 bytes.
    let mut rest = bytes.get(8..)?;
    while let Some((&id, after)) = rest.split_first() {
        let (size, after) = leb_u32(after)?;
        let (body, next) = after.split_at_checked(usize::try_from(size).ok()?)?;
        if id == 0 {
            let (len, body) = leb_u32(body)?;
            let (found, payload) = body.split_at_checked(usize::try_from(len).ok()?)?;
            if found == name.as_bytes() {
                return Some(payload);
            }
        }
        rest = next;
    }
    None
}

/// An unsigned LEB128 `u32` and what follows it.
fn leb_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let mut value: u32 = 0;
    for (i, &b) in bytes.iter().enumerate().take(5) {
        let bits = u32::from(b & 0x7f);
        // The fifth byte may carry only the top four bits.
        if i == 4 && bits > 0x0f {
            return None;
        }
        value |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

/// Links every function of the imported instance `name` (an interface the
/// plugin was not granted) to one that traps with [`NotGranted`]. The
/// interfaces this is used for (log, kv, dns) define no resources, so their
/// functions are all there is to provide.
pub(crate) fn link_trapping(
    linker: &mut Linker<HostState>,
    engine: &Engine,
    name: &str,
    ty: &ComponentInstance,
    grant: Grant,
) -> wasmtime::Result<()> {
    let mut instance = linker.instance(name)?;
    for (function, item) in ty.exports(engine) {
        if !matches!(item.ty, ComponentItem::ComponentFunc(_)) {
            continue;
        }
        let call = NotGranted {
            interface: name.to_string(),
            function: function.to_string(),
            grant: grant.as_str(),
        };
        instance.func_new(function, move |_store, _ty, _params, _results| {
            Err(wasmtime::Error::new(call.clone()))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component preamble followed by `sections` (id, payload).
    fn component(sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"\0asm\x0d\0\x01\0".to_vec();
        for (id, body) in sections {
            out.push(*id);
            out.extend(leb(body.len()));
            out.extend(body);
        }
        out
    }

    fn leb(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    fn custom(name: &str, payload: &[u8]) -> (u8, Vec<u8>) {
        let mut body = leb(name.len());
        body.extend(name.as_bytes());
        body.extend(payload);
        (0, body)
    }

    #[test]
    fn the_marker_is_found_after_other_sections_and_only_when_it_says_trap() {
        let module = (1, vec![0xaa; 300]);
        let names = custom("component-name", b"\x00\x01x");
        for (sections, expected) in [
            (
                vec![module.clone(), names.clone(), custom(SECTION, TRAP)],
                true,
            ),
            (vec![custom(SECTION, TRAP), module.clone()], true),
            (vec![module.clone(), names.clone()], false),
            (vec![custom(SECTION, b"refuse")], false),
            (vec![custom("postern:ungranted2", TRAP)], false),
            (vec![], false),
        ] {
            assert_eq!(
                traps_ungranted(&component(&sections)),
                expected,
                "{sections:?}"
            );
        }
    }

    #[test]
    fn truncated_or_malformed_bytes_read_as_unmarked() {
        let whole = component(&[(1, vec![0; 40]), custom(SECTION, TRAP)]);
        assert!(traps_ungranted(&whole));
        for end in 0..whole.len() {
            assert!(!traps_ungranted(&whole[..end]), "cut at {end}");
        }
        // A size that runs past the end, and a LEB128 that never ends.
        assert!(!traps_ungranted(
            b"\0asm\x0d\0\x01\0\x00\xff\xff\xff\xff\x0f"
        ));
        assert!(!traps_ungranted(
            b"\0asm\x0d\0\x01\0\x00\x80\x80\x80\x80\x80\x80"
        ));
    }

    #[test]
    fn leb128_reads_u32_and_refuses_overflow() {
        for (bytes, expected) in [
            (&[0x00][..], Some(0)),
            (&[0x7f][..], Some(127)),
            (&[0x80, 0x01][..], Some(128)),
            (&[0xff, 0xff, 0xff, 0xff, 0x0f][..], Some(u32::MAX)),
            (&[0xff, 0xff, 0xff, 0xff, 0x1f][..], None),
            (&[0x80][..], None),
        ] {
            assert_eq!(leb_u32(bytes).map(|(v, _)| v), expected, "{bytes:?}");
        }
    }
}
