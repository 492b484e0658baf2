//! The `postern` command line.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use postern::config::Config;
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
    Serve {
        /// `text` or `json` (overrides `[log] format`).
        #[arg(long)]
        log_format: Option<postern::config::LogFormat>,
    },
    /// Read a password on stdin and print its hash for `[[user]] password_hash`.
    Passwd,
    /// Check the config file and print what it would run.
    Check,
    /// Inspect and control the queue (of a running or a stopped relay).
    Queue {
        #[command(subcommand)]
        command: queue_cli::QueueCommand,
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

mod plugin_cli;
mod queue_cli;

/// mimalloc rather than glibc's malloc: a message's buffers are allocated
/// and freed on different threads, where glibc spends a few percent of the
/// relay's CPU in its arena locks and free-list consolidation. Without
/// transparent huge pages (`no_thp`): mimalloc asks for them by default, and
/// then each fault in its heap zeroes 2 MiB, about a tenth of the relay's CPU
/// with 100 KiB messages, and peak RSS grows by the huge page.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let config_given =
        matches.value_source("config") != Some(clap::parser::ValueSource::DefaultValue);
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Plugin(command) => plugin_cli::run(command, &cli.config, config_given),
        Command::Serve { log_format } => serve(&cli.config, log_format),
        Command::Passwd => passwd(),
        Command::Queue { command } => queue_cli::run(&cli.config, command),
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

fn init_logging(level: &str, format: postern::config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Escape codes only for a person at a terminal, not in a log file.
        postern::config::LogFormat::Text => {
            builder.with_ansi(std::io::stderr().is_terminal()).init()
        }
        postern::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

fn serve(
    path: &std::path::Path,
    log_format: Option<postern::config::LogFormat>,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    init_logging(&config.log.level, log_format.unwrap_or(config.log.format));
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
        let admin = postern::admin::Admin::bind(server.context()).await?;
        let delivery = Delivery::start(server.context(), server.local_addrs())
            .await
            .context("starting delivery")?;
        postern::plugins::retention::start(&server.context().config);
        let admin = admin.serve(delivery.clone());
        let grace = server.context().config.limits.shutdown_grace.0;
        let control = tokio::spawn(async move {
            if let Err(e) = postern::plugins::reload::serve_control(control.clone(), handle).await {
                tracing::warn!(socket = %control.display(), error = %e, "plugin control socket unavailable; `postern plugin list` will not work");
            }
        });
        // Last, so that `postern queue` works from the first connection on.
        let server = server.listen()?;
        admin.set_listening();
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
