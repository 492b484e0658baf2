//! Hot reload: `notify` watches the plugins folder and the config file, SIGHUP
//! asks too. A file being written produces a burst of events; the reload waits
//! until every file written to has been closed by its writer (or renamed into
//! place) and a short settle has passed, or, for writers that keep a file
//! open, until the events stop for [`DEBOUNCE`]. So a half-written `.wasm` is
//! not what gets loaded. Then the config is re-read and the whole chain loaded
//! and validated off to the side; only a chain that loaded completely is
//! swapped in. A failure leaves the running chain in place and the log names
//! the plugin and why.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{Config, HookName};
use crate::plugins::instance::LoadedPlugin;
use crate::plugins::{ChainHandle, Error, Runtime};

/// Quiet time after the last file event before reloading, while a file that
/// was written to has not been closed.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// Quiet time once every file written to is closed: long enough for a
/// writer's next step (a config saved right after its plugin) to be seen.
pub const SETTLE: Duration = Duration::from_millis(25);

/// What a watched file, or a signal, says about a reload.
#[derive(Debug)]
enum Change {
    /// Data is being written to this file.
    Writing(PathBuf),
    /// Its writer closed this file, or it was renamed into place: complete.
    Complete(PathBuf),
    /// SIGHUP.
    Signal,
}

/// Watches and reloads until dropped.
pub struct Reloader {
    _watcher: Option<notify::RecommendedWatcher>,
    task: JoinHandle<()>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reloader {
    /// Starts watching (when `plugins.watch` is on) and listening for SIGHUP.
    pub fn start(
        config_path: PathBuf,
        config: &Config,
        runtime: Arc<Runtime>,
        handle: Arc<ChainHandle>,
    ) -> Result<Reloader, Error> {
        let (tx, rx) = mpsc::unbounded_channel::<Change>();
        let started = config.clone();
        let watcher = if config.plugins.watch {
            Some(watch(&config_path, &config.plugins_dir(), tx.clone())?)
        } else {
            None
        };
        let hup = tx.clone();
        let task = tokio::spawn(async move {
            let signals = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
            let mut signals = match signals {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; reload on file changes only");
                    None
                }
            };
            let forward = async move {
                if let Some(s) = signals.as_mut() {
                    while s.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading the config and the plugin chain");
                        let _ = hup.send(Change::Signal);
                    }
                }
            };
            tokio::join!(forward, run(rx, config_path, started, runtime, handle));
        });
        Ok(Reloader {
            _watcher: watcher,
            task,
        })
    }
}

fn watch(
    config_path: &Path,
    plugins_dir: &Path,
    tx: mpsc::UnboundedSender<Change>,
) -> Result<notify::RecommendedWatcher, Error> {
    let config_name = config_path.file_name().map(|n| n.to_os_string());
    // Compared by real path: notify reports the watched path made absolute
    // but not resolved, and the config may name the folder relatively or
    // through `..` (the example config does).
    let real = |dir: &Path| std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let plugins_dir_real = real(plugins_dir);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let complete = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_)) => true,
            EventKind::Access(_) => return,
            _ => false,
        };
        let relevant = |p: &PathBuf| {
            let is_wasm = p.extension().is_some_and(|e| e == "wasm")
                && p.parent().is_some_and(|d| real(d) == plugins_dir_real);
            is_wasm
                || (config_name.is_some() && p.file_name().map(|n| n.to_os_string()) == config_name)
        };
        for path in event.paths.into_iter().filter(relevant) {
            let _ = tx.send(if complete {
                Change::Complete(path)
            } else {
                Change::Writing(path)
            });
        }
    })
    .map_err(|e| Error::Engine(format!("cannot watch for plugin changes: {e}")))?;
    if plugins_dir.is_dir() {
        watcher
            .watch(plugins_dir, RecursiveMode::NonRecursive)
            .map_err(|e| Error::Engine(format!("cannot watch {}: {e}", plugins_dir.display())))?;
    }
    // Editors replace the config by rename, so watch its folder, not the file.
    let config_dir = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    watcher
        .watch(config_dir, RecursiveMode::NonRecursive)
        .map_err(|e| Error::Engine(format!("cannot watch {}: {e}", config_dir.display())))?;
    Ok(watcher)
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Change>,
    config_path: PathBuf,
    started: Config,
    runtime: Arc<Runtime>,
    handle: Arc<ChainHandle>,
) {
    // Files written to and not yet closed.
    let mut open = HashSet::new();
    while let Some(mut change) = rx.recv().await {
        loop {
            match change {
                Change::Writing(path) => {
                    open.insert(path);
                }
                Change::Complete(path) => {
                    open.remove(&path);
                }
                Change::Signal => {}
            }
            let quiet = if open.is_empty() { SETTLE } else { DEBOUNCE };
            match tokio::time::timeout(quiet, rx.recv()).await {
                Ok(Some(next)) => change = next,
                Ok(None) => return,
                Err(_) => break,
            }
        }
        // A writer that kept its file open past the quiet time is taken as
        // done; a file still incomplete fails validation and leaves the chain
        // as it is until its next event.
        open.clear();
        let began = std::time::Instant::now();
        let reloaded = reload(&config_path, &runtime, &handle).await;
        let m = crate::admin::metrics::metrics();
        m.reload_duration.observe(began.elapsed());
        m.reloads.inc(match reloaded {
            Ok(_) => crate::admin::metrics::Result_::Ok,
            Err(_) => crate::admin::metrics::Result_::Failed,
        });
        match reloaded {
            Ok(n) => {
                tracing::info!(
                    plugins = n,
                    took_ms = began.elapsed().as_millis() as u64,
                    "plugin chain reloaded"
                );
                // What else changed stays as the relay started until a restart.
                if let Ok(new) = Config::load(&config_path) {
                    let keys = started.restart_needed(&new);
                    if !keys.is_empty() {
                        tracing::warn!(
                            keys = keys.join(", ").as_str(),
                            "config keys changed that need a restart; the running relay keeps their old values"
                        );
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "plugin chain not reloaded; the previous chain stays in place")
            }
        }
    }
}

/// Re-reads the config and swaps in the chain it describes, if it loads.
/// Returns the number of plugins in the new chain.
pub async fn reload(
    config_path: &Path,
    runtime: &Arc<Runtime>,
    handle: &ChainHandle,
) -> Result<usize, Error> {
    let config = Config::load(config_path)?;
    let chain = runtime.load_chain(&config).await?;
    let n = chain.plugins().len();
    handle.swap(chain);
    Ok(n)
}

/// What `postern plugin list` shows for one plugin.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PluginStatus {
    /// Its name.
    pub name: String,
    /// SHA-256 of its `.wasm`.
    pub hash: String,
    /// The hooks called.
    pub hooks: Vec<String>,
    /// How its instances live (`instances`).
    pub instances: String,
    /// Load time, seconds since the Unix epoch.
    pub loaded_at: u64,
    /// Per-hook counters (with the shadow's agreement, when it has one).
    pub stats: Vec<crate::plugins::stats::HookSnapshot>,
    /// The WIT world it was built for.
    #[serde(default)]
    pub world: String,
    /// Its shadow: the new version running beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Box<PluginStatus>>,
    /// For a plugin that handles `delivered`: reports the hook never got
    /// because its queue was full (the queue is the chain's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_dropped: Option<u64>,
    /// Instances retired while intact, by reason (memory, uses).
    #[serde(default)]
    pub retired: Vec<(String, u64)>,
}

/// The current chain, as [`PluginStatus`] rows.
pub fn status(handle: &ChainHandle) -> Vec<PluginStatus> {
    let dropped = handle
        .delivered_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    handle
        .current()
        .plugins()
        .iter()
        .map(|p| PluginStatus {
            delivered_dropped: p.handles(HookName::Delivered).then_some(dropped),
            ..plugin_status(p)
        })
        .collect()
}

fn plugin_status(p: &LoadedPlugin) -> PluginStatus {
    PluginStatus {
        name: p.name().to_string(),
        hash: p.hash.clone(),
        hooks: p.hooks.iter().map(|h| h.to_string()).collect(),
        instances: p.config.instances.as_str().to_string(),
        loaded_at: p
            .loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        stats: p.stats.snapshot(),
        world: p.world().to_string(),
        shadow: p.shadow.as_deref().map(|s| Box::new(plugin_status(s))),
        delivered_dropped: None,
        retired: p
            .stats
            .retirements()
            .into_iter()
            .map(|(reason, n)| (reason.to_string(), n))
            .collect(),
    }
}

/// The control socket's path for a config: in the spool, which belongs to the
/// relay's user.
pub fn control_socket(config: &Config) -> PathBuf {
    config.resolve(&config.spool.path).join("plugins.sock")
}

/// Answers each connection on the control socket with the chain's status as
/// one JSON document. Runs until the task is dropped.
pub async fn serve_control(path: PathBuf, handle: Arc<ChainHandle>) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    // A socket left by a previous run (the spool lock guarantees no other
    // relay uses this spool).
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    loop {
        let (mut conn, _) = listener.accept().await?;
        let body = serde_json::to_vec(&status(&handle)).unwrap_or_default();
        tokio::spawn(async move {
            let _ = conn.write_all(&body).await;
            let _ = conn.shutdown().await;
        });
    }
}
