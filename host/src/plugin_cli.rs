//! `postern plugin new|check|test|list`: tools for plugin authors and
//! operators.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Subcommand;

use postern::config::{Config, Grant};
use postern::plugins::{reload, Runtime};

mod new;
mod replay;

pub use new::Lang;

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Create a plugin NAME in the current folder, with a README that says
    /// how to build it: a crate (`cargo build --release --target
    /// wasm32-wasip2`), a Python module (`python3 SDK/python/build.py`) or
    /// a JavaScript module (`node SDK/js/build.mjs`). Each blocks the
    /// recipient domains its config lists.
    New {
        /// Plugin and folder name.
        name: String,
        /// The language: rust, python or js.
        #[arg(long, value_enum, default_value_t = Lang::Rust)]
        lang: Lang,
    },
    /// Say whether FILE.wasm fits the plugin world, and which hooks and grants
    /// it needs. With --config, the `[[plugin]]` entry whose path has this
    /// file's name supplies its config and grants, as the relay would load it.
    Check {
        /// The component.
        file: PathBuf,
    },
    /// Run the plugin's hooks (connect, helo, mail-from, rcpt, data, route)
    /// without a relay: against one transaction (--message, --from, --to),
    /// printing each answer, or against a folder of `.eml` files (--messages),
    /// printing a table of answers per hook. A `NAME.json` transaction record
    /// beside `NAME.eml` (as `postern queue show --json` prints under
    /// `record`) gives its session facts, envelope and metadata; without one
    /// the envelope comes from the From, To and Cc fields. With --against
    /// OLD.wasm both versions run and only the transactions where they answer
    /// differently are printed (exit status 1 if there are any). With
    /// --config, the `[[plugin]]` entry whose path has this file's name
    /// supplies its config, grants and limits (for OLD, its own entry if the
    /// config has one, else the same).
    Test {
        /// The component.
        file: PathBuf,
        /// The message (RFC 5322, LF or CRLF line ends).
        #[arg(
            long,
            required_unless_present = "messages",
            conflicts_with = "messages"
        )]
        message: Option<PathBuf>,
        /// Envelope sender (with --message).
        #[arg(long, requires = "message")]
        from: Option<String>,
        /// Envelope recipients (with --message).
        #[arg(long, requires = "message")]
        to: Vec<String>,
        /// A folder of `.eml` files, each with an optional `.json` record.
        #[arg(long)]
        messages: Option<PathBuf>,
        /// An older version of the plugin to compare with.
        #[arg(long)]
        against: Option<PathBuf>,
    },
    /// Show the loaded chain of the running relay: name, content hash, hooks,
    /// load time, and per hook calls, answers, errors and latency.
    List,
}

pub fn run(command: PluginCommand, config: &Path, config_given: bool) -> anyhow::Result<()> {
    match command {
        PluginCommand::New { name, lang } => new::scaffold(&name, lang),
        PluginCommand::Check { file } => {
            tokio_runtime()?.block_on(check(&file, config_given.then_some(config)))
        }
        PluginCommand::Test {
            file,
            message,
            from,
            to,
            messages,
            against,
        } => {
            let config = config_given.then_some(config);
            let transactions = match (&message, &messages) {
                (Some(message), _) => {
                    let from = from.context("--from is needed with --message")?;
                    if to.is_empty() {
                        bail!("--to is needed with --message");
                    }
                    vec![replay::Transaction::given(message, &from, &to)?]
                }
                (None, Some(folder)) => replay::Transaction::folder(folder)?,
                (None, None) => bail!("--message or --messages is needed"),
            };
            let differ = tokio_runtime()?.block_on(replay::run(
                &file,
                against.as_deref(),
                config,
                &transactions,
                message.is_some(),
            ))?;
            if differ {
                std::process::exit(1);
            }
            Ok(())
        }
        PluginCommand::List => list(config),
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// What check and test take from the relay config given with --config: the
/// file's `[[plugin]]` entry, and the `[plugins]` settings that make their
/// compiled code the relay's own (the memory size, and the relay's compiled
/// cache when the relay has created it), so the relay then loads the file
/// from its cache without compiling it.
struct RelayEntry {
    /// The `[[plugin]]` table, as TOML.
    table: String,
    /// Lines for the scratch config's `[plugins]`.
    settings: String,
}

impl RelayEntry {
    fn load(config: &Path, file: &Path) -> anyhow::Result<RelayEntry> {
        let relay = Config::load(config)?;
        let mut settings = format!("max_memory_mb = {}\n", relay.plugins.max_memory_mb);
        // Only a folder the relay made: created here, it would belong to
        // whoever runs the check, and the relay would refuse it.
        let cache = relay.plugin_cache_dir();
        if cache.is_dir() {
            settings.push_str(&format!("cache_dir = {cache:?}\n"));
        }
        Ok(RelayEntry {
            table: entry_for(config, &relay, file)?,
            settings,
        })
    }

    /// The same entry for another file (an older version of the plugin).
    fn with_file(&self, file: &Path) -> anyhow::Result<RelayEntry> {
        let mut doc: toml::Table = toml::from_str(&self.table)?;
        let path = toml::Value::String(file.canonicalize()?.display().to_string());
        if let Some(t) = doc
            .get_mut("plugin")
            .and_then(|p| p.as_array_mut())
            .and_then(|a| a.first_mut())
            .and_then(|t| t.as_table_mut())
        {
            t.insert("path".into(), path);
        }
        Ok(RelayEntry {
            table: toml::to_string(&doc)?,
            settings: self.settings.clone(),
        })
    }
}

/// A throwaway relay config holding one plugin entry, for check and test.
fn scratch_config(
    dir: &Path,
    file: &Path,
    relay: Option<&RelayEntry>,
    grants: &[Grant],
) -> anyhow::Result<Config> {
    let file = file
        .canonicalize()
        .with_context(|| format!("reading {}", file.display()))?;
    let entry = match relay {
        Some(r) => r.table.clone(),
        None => {
            let grants: Vec<String> = grants.iter().map(|g| format!("{:?}", g.as_str())).collect();
            format!(
                "[[plugin]]\nname = \"plugin\"\npath = {file:?}\ngrants = [{}]\n",
                grants.join(", ")
            )
        }
    };
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[spool]\npath = {:?}\n[plugins]\ndir = {:?}\nwatch = false\n{}{entry}",
        dir.join("spool"),
        dir.join("plugins"),
        relay.map(|r| r.settings.as_str()).unwrap_or(""),
    );
    Ok(Config::parse(&text, &dir.join("postern.toml"))?)
}

/// Compiles FILE once, links it with the grants it asks for (or, with
/// `--config`, those of its `[[plugin]]` entry) and runs `init` with the
/// entry's config (or none). A plugin whose `init` refuses to run without its
/// config still fits: without `--config` that is a note, not a failure.
async fn check(file: &Path, config: Option<&Path>) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let dir = tempfile::tempdir()?;
    let relay = config.map(|c| RelayEntry::load(c, file)).transpose()?;
    let first = scratch_config(dir.path(), file, relay.as_ref(), &[])?;
    let rt = Runtime::new(&first)?;
    let req = rt
        .requirements(bytes, first.plugin_cache_dir())
        .await
        .map_err(|e| anyhow::anyhow!("{}: not a valid component: {e}", file.display()))?;
    let mut grants = req.grants.clone();
    if req.filesystem {
        grants.push(Grant::Archive);
    }
    let scratch = scratch_config(dir.path(), file, relay.as_ref(), &grants)?;
    let hooks = match rt.load_chain(&scratch).await {
        Ok(chain) => {
            let hooks: Vec<&str> = chain.plugins()[0]
                .hooks
                .iter()
                .map(|h| h.as_str())
                .collect();
            hooks.join(", ")
        }
        Err(postern::plugins::Error::ConfigRefused { message, .. }) if relay.is_none() => {
            format!(
                "unknown: init refused to run without its config ({message}); \
                 give the relay config with --config and its [[plugin]] entry for this file supplies one"
            )
        }
        Err(e) => bail!("{}: {e}", file.display()),
    };
    println!("{}: fits {}", file.display(), req.world);
    println!("  sha256: {}", req.hash);
    println!("  hooks:  {hooks}");
    let names: Vec<&str> = req.grants.iter().map(|g| g.as_str()).collect();
    if req.ungranted_trap {
        println!(
            "  grants: any of {} (its toolchain imports them all; a call to one not granted gets its on_error answer)",
            names.join(", ")
        );
    } else {
        println!(
            "  grants: {}",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    // The Python and JavaScript toolchains import WASI filesystem whatever
    // the plugin does.
    if req.filesystem && !req.ungranted_trap {
        println!("  note:   imports WASI filesystem; grant \"archive\" if it writes files");
    }
    Ok(())
}

/// The `[[plugin]]` table of `config` whose path names `file`, as TOML text
/// with the path made absolute.
fn entry_for(config: &Path, relay: &Config, file: &Path) -> anyhow::Result<String> {
    let name = file.file_name().context("FILE has no file name")?;
    let p = relay
        .plugin_chain
        .iter()
        .find(|p| p.path.file_name() == Some(name))
        .with_context(|| format!("no [[plugin]] in {} has path {:?}", config.display(), name))?;
    let text = std::fs::read_to_string(config)?;
    let value: toml::Table = toml::from_str(&text)?;
    let tables = value
        .get("plugin")
        .and_then(|v| v.as_array())
        .context("no [[plugin]] tables")?;
    let mut table = tables
        .iter()
        .filter_map(|t| t.as_table())
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(p.name.as_str()))
        .cloned()
        .context("plugin table")?;
    table.insert(
        "path".into(),
        toml::Value::String(file.canonicalize()?.display().to_string()),
    );
    // The file alone is checked or tested, not the shadow beside it.
    table.remove("shadow");
    table.remove("shadow_config");
    let mut doc = toml::Table::new();
    doc.insert(
        "plugin".into(),
        toml::Value::Array(vec![toml::Value::Table(table)]),
    );
    Ok(toml::to_string(&doc)?)
}

fn list(config: &Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    let config = Config::load(config)?;
    let path = reload::control_socket(&config);
    let mut conn = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "no running relay at {} (is `postern serve` running with this config?)",
            path.display()
        )
    })?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body)?;
    let chain: Vec<reload::PluginStatus> = serde_json::from_slice(&body)?;
    if chain.is_empty() {
        println!("no plugins loaded");
    }
    for p in chain {
        print_status(&p, "");
        if p.retired.iter().any(|(_, n)| *n > 0) {
            println!("  instances retired: {}", counts(&p.retired));
        }
        if let Some(dropped) = p.delivered_dropped {
            println!("  delivered reports dropped (queue full): {dropped}");
        }
        if let Some(shadow) = &p.shadow {
            print_status(shadow, "  shadow ");
            for h in p
                .stats
                .iter()
                .filter(|h| h.shadow_agreed + h.shadow_disagreed > 0)
            {
                println!(
                    "  shadow at {:<9} agreed {}  disagreed {}",
                    h.hook, h.shadow_agreed, h.shadow_disagreed
                );
            }
        }
    }
    Ok(())
}

/// One plugin's header line and per-hook counters.
fn print_status(p: &reload::PluginStatus, prefix: &str) {
    let loaded = i64::try_from(p.loaded_at).unwrap_or(0);
    println!(
        "{prefix}{}  sha256:{}  hooks: {}  instances: {}  world: {}  loaded: {}",
        p.name,
        &p.hash[..p.hash.len().min(16)],
        p.hooks.join(","),
        p.instances,
        p.world.rsplit('@').next().unwrap_or(&p.world),
        mail_parser::DateTime::from_timestamp(loaded).to_rfc3339()
    );
    for h in &p.stats {
        println!(
            "{prefix}  {:<9} calls {:>8}  p50 <{}us p90 <{}us p99 <{}us  answers: {}  errors: {}",
            h.hook,
            h.calls,
            h.p50_us,
            h.p90_us,
            h.p99_us,
            counts(&h.answers),
            counts(&h.errors)
        );
    }
}

/// `kind n, kind n`, or `none`.
fn counts(counts: &[(String, u64)]) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
