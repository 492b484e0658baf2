//! `postern plugin new NAME --lang rust|python|js`: a plugin that builds as
//! is, with the same example policy in each language (refuse recipients of
//! the domains its config lists) and a README that says how to build it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// The SDK this binary was built with; `POSTERN_SDK` points elsewhere.
const SDK_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk");

/// The language of a new plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A crate built with cargo for wasm32-wasip2.
    Rust,
    /// A module built with componentize-py.
    Python,
    /// A module built with componentize-js.
    Js,
}

/// Names derived from the plugin's name.
struct Names<'a> {
    /// As given: folder, crate, `[[plugin]] name`.
    name: &'a str,
    /// With `-` as `_`: Rust crate and Python module name, `.wasm` file stem.
    ident: String,
    /// CamelCase: the plugin's type or class.
    ty: String,
}

/// Creates the plugin folder `name` in the current folder.
pub fn scaffold(name: &str, lang: Lang) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.starts_with(|c: char| c.is_ascii_alphabetic());
    if !valid {
        bail!("{name:?} is not a plugin name (letters, digits, - and _, starting with a letter)");
    }
    let dir = Path::new(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let sdk = std::env::var_os("POSTERN_SDK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SDK_DIR));
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "the postern SDK is not at {} (set POSTERN_SDK)",
            sdk.display()
        )
    })?;
    let ident = name.replace('-', "_");
    let ty = ident
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    let names = Names { name, ident, ty };
    let (files, build) = match lang {
        Lang::Rust => rust(&names, &sdk),
        Lang::Python => python(&names, &sdk)?,
        Lang::Js => js(&names, &sdk)?,
    };
    std::fs::create_dir_all(dir)?;
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "created {name}/ (SDK: {})\nbuild it: cd {name} && {build}",
        sdk.display()
    );
    Ok(())
}

/// The README of every template: how to build, where the `.wasm` lands, and
/// the config entry.
fn readme(n: &Names, lang: &str, build: &str, toolchain: &str, wasm: &str) -> String {
    format!(
        "# {name}\n\n\
         A Postern policy plugin in {lang}: it refuses recipients whose domain\n\
         its config lists (550 5.7.1).\n\n\
         Build it (in this folder):\n\n    {build}\n\n\
         {toolchain}\n\n\
         Copy `{wasm}` into the relay's plugins folder and add to its config:\n\n\
         \x20   [[plugin]]\n\
         \x20   name = \"{name}\"\n\
         \x20   path = \"{file}\"\n\
         \x20   [plugin.config]\n\
         \x20   domains = [\"blocked.example\"]\n\n\
         Try it without a relay: `postern plugin test {file} --message m.eml\n\
         --from a@example.org --to b@blocked.example --config postern.toml`.\n",
        name = n.name,
        file = Path::new(wasm)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

fn rust(n: &Names, sdk: &Path) -> (Vec<(String, String)>, String) {
    let Names { name, ident, ty } = n;
    let build = "cargo build --release --target wasm32-wasip2".to_string();
    let wasm = format!("target/wasm32-wasip2/release/{ident}.wasm");
    let manifest = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\npostern-sdk = {{ path = {sdk:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n\
         [profile.release]\nopt-level = \"s\"\nstrip = true\n\n\
         # Its own workspace, wherever it is created.\n[workspace]\n"
    );
    let lib = format!(
        r#"//! {name}: a Postern policy plugin.
//!
//! Build: cargo build --release --target wasm32-wasip2
//! Then copy target/wasm32-wasip2/release/{ident}.wasm into the relay's
//! plugins folder and add to the config:
//!
//!     [[plugin]]
//!     name = "{name}"
//!     path = "{ident}.wasm"
//!     [plugin.config]
//!     domains = ["blocked.example"]
//!
//! The relay lends an instance for one hook call at a time: keep nothing in
//! the plugin's memory from one hook to the next. What a later hook needs
//! goes into `metadata` (per session, or per message, kept by the relay):
//!
//!     metadata::set(Scope::Transaction, "seen", "yes")
//!     metadata::get(Scope::Transaction, "seen")

use postern_sdk::prelude::*;

#[derive(serde::Deserialize)]
struct {ty} {{
    domains: Vec<String>,
}}

#[postern_sdk::plugin]
impl Plugin for {ty} {{
    fn init(config: Config) -> Result<Self, ConfigError> {{
        config.parse()
    }}

    fn rcpt(&self, _session: &Session, rcpt: &Recipient) -> Verdict {{
        if self.domains.iter().any(|d| rcpt.domain().eq_ignore_ascii_case(d)) {{
            return Verdict::reject(550, "5.7.1", "recipient domain is blocked");
        }}
        Verdict::Continue
    }}
}}

postern_sdk::export!({ty});
"#
    );
    let toolchain = format!(
        "It needs Rust with the wasm32-wasip2 target (`rustup target add\n\
         wasm32-wasip2`) and the Postern SDK at {}.",
        sdk.display()
    );
    let readme = readme(n, "Rust", &build, &toolchain, &wasm);
    (
        vec![
            ("Cargo.toml".into(), manifest),
            ("src/lib.rs".into(), lib),
            ("README.md".into(), readme),
        ],
        build,
    )
}

fn python(n: &Names, sdk: &Path) -> anyhow::Result<(Vec<(String, String)>, String)> {
    let Names { name, ident, ty } = n;
    let script = sdk.join("python/build.py");
    let pins = std::fs::read_to_string(sdk.join("python/requirements.txt"))
        .with_context(|| format!("the Python SDK is not in {}", sdk.display()))?;
    let pins: Vec<&str> = pins
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let build = format!("python3 {} {ident}.py -o {ident}.wasm", script.display());
    let module = format!(
        r#""""{name}: a Postern policy plugin that refuses recipients of the
domains its config lists.

    [[plugin]]
    name = "{name}"
    path = "{ident}.wasm"
    [plugin.config]
    domains = ["blocked.example"]

The relay lends an instance for one hook call at a time: keep nothing in
the plugin's memory from one hook to the next. What a later hook needs goes
into metadata (per session, or per message, kept by the relay):

    metadata.set(metadata.TRANSACTION, "seen", "yes")
    metadata.get(metadata.TRANSACTION, "seen")
"""

from postern import ConfigError, Plugin, Verdict, export


class {ty}(Plugin):
    def __init__(self, config):
        domains = config.get("domains")
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise ConfigError("domains: expected a list of domain names")
        self.domains = [d.lower() for d in domains]

    def rcpt(self, session, rcpt):
        if rcpt.domain.lower() in self.domains:
            return Verdict.reject(550, "5.7.1", "recipient domain is blocked")
        return Verdict.CONTINUE


export({ty})
"#
    );
    let toolchain = format!(
        "It needs Python 3 with venv and pip. The first build installs the\n\
         pinned toolchain ({}) from PyPI into the SDK checkout's\n\
         `target/sdk-tools` (or `$POSTERN_TOOLS`); the `postern` package it\n\
         imports is the SDK's, in {}.",
        pins.join(", "),
        sdk.join("python").display()
    );
    let readme = readme(n, "Python", &build, &toolchain, &format!("{ident}.wasm"));
    Ok((
        vec![
            (format!("{ident}.py"), module),
            ("README.md".into(), readme),
        ],
        build,
    ))
}

fn js(n: &Names, sdk: &Path) -> anyhow::Result<(Vec<(String, String)>, String)> {
    let Names { name, ident, ty } = n;
    let script = sdk.join("js/build.mjs");
    let package = std::fs::read_to_string(sdk.join("js/package.json"))
        .with_context(|| format!("the JavaScript SDK is not in {}", sdk.display()))?;
    let package: serde_json::Value = serde_json::from_str(&package)?;
    let pins: Vec<String> = package["dependencies"]
        .as_object()
        .map(|deps| {
            deps.iter()
                .map(|(k, v)| format!("{k}@{}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let build = format!("node {} {ident}.js -o {ident}.wasm", script.display());
    let module = format!(
        r#"// {name}: a Postern policy plugin that refuses recipients of the
// domains its config lists.
//
//     [[plugin]]
//     name = "{name}"
//     path = "{ident}.wasm"
//     [plugin.config]
//     domains = ["blocked.example"]
//
// The relay lends an instance for one hook call at a time: keep nothing in
// the plugin's memory from one hook to the next. What a later hook needs
// goes into metadata (per session, or per message, kept by the relay):
//
//     metadata.set(metadata.TRANSACTION, 'seen', 'yes');
//     metadata.get(metadata.TRANSACTION, 'seen');

import {{ ConfigError, Plugin, Verdict }} from 'postern';

export default class {ty} extends Plugin {{
  constructor(config) {{
    super(config);
    const domains = config.domains;
    if (!Array.isArray(domains) || !domains.every((d) => typeof d === 'string')) {{
      throw new ConfigError('domains: expected a list of domain names');
    }}
    this.domains = domains.map((d) => d.toLowerCase());
  }}

  rcpt(session, rcpt) {{
    if (this.domains.includes(rcpt.domain.toLowerCase())) {{
      return Verdict.reject(550, '5.7.1', 'recipient domain is blocked');
    }}
    return Verdict.CONTINUE;
  }}
}}
"#
    );
    let toolchain = format!(
        "It needs Node.js 18 or later with npm. The first build installs the\n\
         pinned toolchain ({}, with the versions under them locked in\n\
         {}) from npm into the SDK checkout's `target/sdk-tools` (or\n\
         `$POSTERN_TOOLS`); `from 'postern'` is the SDK's `postern.js`.",
        pins.join(", "),
        sdk.join("js/package-lock.json").display()
    );
    let readme = readme(
        n,
        "JavaScript",
        &build,
        &toolchain,
        &format!("{ident}.wasm"),
    );
    Ok((
        vec![
            (format!("{ident}.js"), module),
            ("README.md".into(), readme),
        ],
        build,
    ))
}
