//! The `#[plugin]` attribute of `postern-sdk`: it reads which hooks an
//! `impl Plugin for T` block writes, so `export!` can tell the relay to call only
//! those. Rust has no way to ask at compile or run time whether a trait's
//! default method was overridden, hence an attribute that sees the source.

use proc_macro::{Delimiter, TokenStream, TokenTree};

/// The hook methods of the `Plugin` trait and their `Hook` variant names.
const HOOKS: &[(&str, &str)] = &[
    ("connect", "Connect"),
    ("mail_from", "MailFrom"),
    ("rcpt", "Rcpt"),
    ("data", "Data"),
    ("route", "Route"),
    ("helo", "Helo"),
    ("delivered", "Delivered"),
];

/// Put on `impl Plugin for T { ... }`: records the hooks the block defines, so
/// the relay calls only those. See `postern_sdk::Plugin`.
#[proc_macro_attribute]
pub fn plugin(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return error("#[plugin] takes no arguments");
    }
    let tokens: Vec<TokenTree> = item.clone().into_iter().collect();
    // The implementing type is everything between `for` and the body.
    let Some(for_at) = tokens
        .iter()
        .position(|t| matches!(t, TokenTree::Ident(i) if i.to_string() == "for"))
    else {
        return error("#[plugin] goes on `impl Plugin for YourType { ... }`");
    };
    let Some(TokenTree::Group(body)) = tokens.last() else {
        return error("#[plugin] goes on `impl Plugin for YourType { ... }`");
    };
    if body.delimiter() != Delimiter::Brace {
        return error("#[plugin] goes on `impl Plugin for YourType { ... }`");
    }
    let self_ty: TokenStream = tokens[for_at + 1..tokens.len() - 1]
        .iter()
        .cloned()
        .collect();

    let mut found = Vec::new();
    let mut after_fn = false;
    for t in body.stream() {
        match &t {
            TokenTree::Ident(i) if i.to_string() == "fn" => after_fn = true,
            TokenTree::Ident(i) if after_fn => {
                let name = i.to_string();
                if let Some((_, variant)) = HOOKS.iter().find(|(m, _)| *m == name) {
                    found.push(*variant);
                }
                after_fn = false;
            }
            _ => after_fn = false,
        }
    }
    let list = found
        .iter()
        .map(|v| format!("::postern_sdk::Hook::{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let extra: TokenStream = format!(
        "impl ::postern_sdk::__private::Hooks for {self_ty} {{ \
             const HOOKS: &'static [::postern_sdk::Hook] = &[{list}]; \
         }}"
    )
    .parse()
    .unwrap_or_else(|_| error("#[plugin]: cannot name the implementing type"));
    let mut out = item;
    out.extend(extra);
    out
}

fn error(message: &str) -> TokenStream {
    format!("::core::compile_error!({message:?});")
        .parse()
        .expect("a compile_error! invocation is valid Rust")
}
