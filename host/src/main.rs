//! The `postern` command line.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use postern::config::Config;
use postern::delivery::control::{self, Entry, Request};
use postern::delivery::Delivery;
use postern::server::Server;

/// A programmable SMTP relay.
#[derive(Debug, Parser)]
#[command(name = "postern", version, about)]
struct Cli {
    /// The config file (accepted before or after the subcommand).
    #[arg(
        long,
        short,
        global = true,
        env = "POSTERN_CONFIG",
        default_value = "/etc/postern/postern.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay in the foreground; logs go to stderr.
    Serve,
    /// Read a password on stdin and print its hash for `[[user]] password_hash`.
    Passwd,
    /// Check the config file and print what it would run.
    Check,
    /// Inspect and control the queue (of a running or a stopped relay).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Plugin tools: new, check, test, list.
    #[command(subcommand)]
    Plugin(plugin_cli::PluginCommand),
    /// DKIM keys.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DkimCommand {
    /// Make a key pair: the private key goes to a file only its owner can
    /// read, the TXT record to publish is printed.
    Keygen {
        /// The signing domain (`d=`).
        #[arg(long)]
        domain: String,
        /// The selector (`s=`).
        #[arg(long)]
        selector: String,
        /// `rsa` (rsa-sha256) or `ed25519` (ed25519-sha256).
        #[arg(long, default_value = "rsa", value_parser = ["rsa", "ed25519"])]
        algorithm: String,
        /// RSA key size.
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Where to write the private key (default `<domain>.<selector>.pem`);
        /// an existing file is never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Every message: id, age, size, sender, recipients with state, attempts,
    /// next attempt, last reply.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// One message.
    Show {
        /// Queue id.
        id: String,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Retry now: one message, or every one.
    Flush {
        /// Queue id (all when absent).
        id: Option<String>,
    },
    /// Remove a message without a bounce.
    Delete {
        /// Queue id.
        id: String,
    },
    /// Keep a message from being delivered until released.
    Hold {
        /// Queue id.
        id: String,
    },
    /// Release a held (or quarantined) message and try it now.
    Release {
        /// Queue id.
        id: String,
    },
}

mod plugin_cli;

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let config_given =
        matches.value_source("config") != Some(clap::parser::ValueSource::DefaultValue);
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Plugin(command) => plugin_cli::run(command, &cli.config, config_given),
        Command::Serve => serve(&cli.config),
        Command::Passwd => passwd(),
        Command::Queue { command } => queue(&cli.config, command),
        Command::Dkim {
            command:
                DkimCommand::Keygen {
                    domain,
                    selector,
                    algorithm,
                    bits,
                    out,
                },
        } => dkim_keygen(&domain, &selector, &algorithm, bits, out),
        Command::Check => {
            let config = Config::load(&cli.config)?;
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: ok, {} listener(s), spool {}",
                cli.config.display(),
                config.listeners.len(),
                config.resolve(&config.spool.path).display()
            );
            Ok(())
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    init_logging(&config.log.level);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let runtime = postern::plugins::Runtime::new(&config)?;
        let chain = runtime.load_chain(&config).await?;
        tracing::info!(plugins = chain.plugins().len(), "plugin chain loaded");
        let handle = std::sync::Arc::new(postern::plugins::ChainHandle::new(chain));
        let reloader = postern::plugins::reload::Reloader::start(
            path.to_path_buf(),
            &config,
            runtime.clone(),
            handle.clone(),
        )?;
        let control = postern::plugins::reload::control_socket(&config);
        let server = Server::bind(config, handle.clone()).await?;
        let delivery = Delivery::start(server.context(), server.local_addrs())
            .await
            .context("starting delivery")?;
        let grace = server.context().config.limits.shutdown_grace.0;
        let control = tokio::spawn(async move {
            if let Err(e) = postern::plugins::reload::serve_control(control.clone(), handle).await {
                tracing::warn!(socket = %control.display(), error = %e, "plugin control socket unavailable; `postern plugin list` will not work");
            }
        });
        // Last, so that `postern queue` works from the first connection on.
        let server = server.listen()?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        server
            .run(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            })
            .await;
        delivery.shutdown(grace).await;
        drop(reloader);
        control.abort();
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: &str,
    bits: usize,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use postern::authn::keygen::{keygen, Algorithm};
    let algorithm = match algorithm {
        "ed25519" => Algorithm::Ed25519,
        _ => Algorithm::Rsa(bits),
    };
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{domain}.{selector}.pem")));
    let generated = keygen(domain, selector, algorithm, &out)?;
    println!(
        "; private key written to {} (mode 0600); in the config:\n         ;   [[dkim.key]]\n;   domain = {domain:?}\n;   selector = {selector:?}\n;   key = {:?}\n         ; publish this record:",
        out.display(),
        out.display().to_string()
    );
    println!("{}", generated.zone_line());
    Ok(())
}

fn passwd() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "empty password on stdin");
    println!("{}", postern::auth::hash_password(password));
    Ok(())
}

fn queue(path: &std::path::Path, command: QueueCommand) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let spool = config.resolve(&config.spool.path);
    let (req, json, single) = match command {
        QueueCommand::List { json } => (Request::List, json, false),
        QueueCommand::Show { id, json } => (Request::Show { id }, json, true),
        QueueCommand::Flush { id } => (Request::Flush { id }, false, false),
        QueueCommand::Delete { id } => (Request::Delete { id }, false, false),
        QueueCommand::Hold { id } => (Request::Hold { id }, false, false),
        QueueCommand::Release { id } => (Request::Release { id }, false, false),
    };
    let listing = matches!(req, Request::List | Request::Show { .. });
    let entries = control::run(&spool, req).map_err(anyhow::Error::msg)?;
    if !listing {
        return Ok(());
    }
    if json {
        let text = if single {
            serde_json::to_string_pretty(&entries.first())?
        } else {
            serde_json::to_string_pretty(&entries)?
        };
        println!("{text}");
        return Ok(());
    }
    for e in &entries {
        print_entry(e);
    }
    if !single {
        println!("-- {} message(s)", entries.len());
    }
    Ok(())
}

fn print_entry(e: &Entry) {
    let sender = if e.sender.is_empty() { "<>" } else { &e.sender };
    let next = match e.next_attempt {
        Some(t) => format!("next in {}s", t.saturating_sub(e.received + e.age)),
        None => String::new(),
    };
    println!(
        "{}  {:>6}s {:>8}B  {:<8} attempts={} {}  {}",
        e.id, e.age, e.size, e.state, e.attempts, next, sender
    );
    if let Some(reason) = &e.hold_reason {
        println!("    held: {reason}");
    }
    for r in &e.recipients {
        println!(
            "    {} ({}, {} attempt(s)){}",
            r.address,
            serde_json::to_value(r.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            r.attempts,
            r.last_reply
                .as_deref()
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        );
    }
    if let Some(record) = &e.record {
        if let Some(client) = &record.client {
            println!(
                "    from {} (helo {}) on {}{}",
                client.peer,
                client.helo.as_deref().unwrap_or("?"),
                client.local,
                client
                    .auth_user
                    .as_deref()
                    .map(|u| format!(", authenticated as {u}"))
                    .unwrap_or_default()
            );
        }
        for (plugin, key, value) in record.metadata.iter() {
            println!("    metadata {plugin}.{key} = {}", value.escape_debug());
        }
    }
}
