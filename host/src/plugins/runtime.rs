//! The one wasmtime engine of the relay, its epoch ticker, the compiled-plugin
//! cache, and loading a chain from the config: read, compile (off the async
//! runtime), check imports against grants, link, instantiate and `init`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::config::{Config, Grant, KvConfig, PluginConfig};
use crate::plugins::bindings::{self, v0_1, PluginPre};
use crate::plugins::host::dns::Resolver;
use crate::plugins::host::kv::KvStore;
use crate::plugins::instance::{Archive, HostState, LoadedPlugin, Pre, Services};
use crate::plugins::ticker::Ticker;
use crate::plugins::{ungranted, Chain, Error};

/// Most instances the pool holds, whatever the config says: each reserves
/// address space for a memory slot.
const MAX_POOL: u32 = 10_000;

/// The engine, the services every plugin shares, and the compiled cache.
pub struct Runtime {
    engine: Engine,
    services: Arc<Services>,
    /// Compiled components by content hash, so a reload that keeps a plugin
    /// does not even read the disk cache.
    components: Mutex<HashMap<String, Component>>,
    max_memory_mb: u64,
    /// The `[kv]` the store was opened with.
    kv: KvConfig,
    ticker: Arc<Ticker>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine with a pooling allocator sized from the config
    /// (sessions x plugins, twice over so the old and new chain fit during a
    /// reload), opens the kv store and starts the epoch ticker.
    pub fn new(config: &Config) -> Result<Arc<Runtime>, Error> {
        let kv = KvStore::new(&config.kv).map_err(Error::Kv)?;
        let plugins = config.plugin_chain.len().max(1) as u64;
        let sessions = config.limits.max_connections as u64;
        let instances = (sessions * plugins * 2).clamp(16, MAX_POOL as u64) as u32;
        let slot = config.plugins.max_memory_mb * 1024 * 1024;

        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_memories(instances)
            .total_tables(instances * 2)
            .total_stacks(instances)
            .total_core_instances(instances * 8)
            .max_core_instances_per_component(32)
            .max_memories_per_component(1)
            .max_tables_per_component(4)
            .max_memory_size(usize::try_from(slot).unwrap_or(usize::MAX))
            // Zero a freed slot's table (a guest's function table is some
            // KiB) with memset rather than madvise, so the next instance there
            // takes no page faults filling it: a fresh instance costs a
            // quarter less (`cargo bench --bench plugins`).
            .table_keep_resident(64 * 1024);
        let mut c = wasmtime::Config::new();
        c.epoch_interruption(true)
            .wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // Reserve only the slot: the default 4 GiB per memory times
            // thousands of slots would exhaust the address space.
            .memory_reservation(slot)
            .memory_guard_size(64 * 1024)
            .memory_reservation_for_growth(0);
        let engine = Engine::new(&c).map_err(|e| Error::Engine(format!("{e:#}")))?;
        let ticker = Ticker::start(&engine);
        Ok(Arc::new(Runtime {
            engine,
            services: Arc::new(Services {
                kv,
                dns: Resolver::new(&config.delivery.nameservers),
                pools: config.delivery.pools.keys().cloned().collect(),
            }),
            components: Mutex::new(HashMap::new()),
            max_memory_mb: config.plugins.max_memory_mb,
            kv: config.kv.clone(),
            ticker,
        }))
    }

    /// Loads every `[[plugin]]` of the config, in order. Any failure fails the
    /// whole chain, naming the plugin, so a reload keeps the old chain.
    pub async fn load_chain(self: &Arc<Self>, config: &Config) -> Result<Chain, Error> {
        if config.plugins.max_memory_mb > self.max_memory_mb {
            return Err(Error::Engine(format!(
                "plugins.max_memory_mb grew from {} to {}; the pool is sized at start, restart the relay",
                self.max_memory_mb, config.plugins.max_memory_mb
            )));
        }
        if config.kv != self.kv {
            return Err(Error::Kv(
                "[kv] changed; the store is opened at start, restart the relay".into(),
            ));
        }
        let mut plugins = Vec::new();
        for p in &config.plugin_chain {
            plugins.push(Arc::new(self.load_plugin(config, p).await?));
        }
        let keep: Vec<String> = plugins.iter().map(|p| p.hash.clone()).collect();
        self.components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|h, _| keep.contains(h));
        Ok(Chain::new(plugins, Some(self.clone())))
    }

    /// The compiled component for these bytes, and their hash: from memory
    /// when a chain already holds it, else compiled (off the async runtime,
    /// through the disk cache in `cache`) and kept.
    async fn component(
        &self,
        bytes: Vec<u8>,
        cache: PathBuf,
    ) -> Result<(String, Component), String> {
        let hash = hex::encode(Sha256::digest(&bytes));
        let kept = self
            .components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash)
            .cloned();
        if let Some(c) = kept {
            return Ok((hash, c));
        }
        let engine = self.engine.clone();
        let h = hash.clone();
        // Cranelift takes a while: never on a runtime thread.
        let c = tokio::task::spawn_blocking(move || compile(&engine, &bytes, &h, &cache))
            .await
            .map_err(|e| e.to_string())??;
        self.components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash.clone(), c.clone());
        Ok((hash, c))
    }

    /// Loads one `[[plugin]]` entry, and its shadow when it names one.
    async fn load_plugin(&self, config: &Config, p: &PluginConfig) -> Result<LoadedPlugin, Error> {
        let mut plugin = self.load_one(config, p, false).await?;
        if let Some(entry) = p.shadow_entry() {
            plugin.shadow = Some(Arc::new(self.load_one(config, &entry, true).await?));
        }
        Ok(plugin)
    }

    /// Reads, compiles, links and validates one plugin. A shadow's archive
    /// folder is a scratch one, removed with it.
    async fn load_one(
        &self,
        config: &Config,
        p: &PluginConfig,
        shadow: bool,
    ) -> Result<LoadedPlugin, Error> {
        let path = config.plugins_dir().join(&p.path);
        let bytes = tokio::fs::read(&path).await.map_err(|source| Error::Read {
            plugin: p.name.clone(),
            path: path.clone(),
            source,
        })?;
        let marked = ungranted::traps_ungranted(&bytes);
        let (hash, component) = self
            .component(bytes, config.plugin_cache_dir())
            .await
            .map_err(|message| Error::Compile {
                plugin: p.name.clone(),
                message,
            })?;
        check_imports(&self.engine, &component, p, marked)?;
        let pre =
            link(&self.engine, &component, &p.grants, marked).map_err(|message| Error::Link {
                plugin: p.name.clone(),
                message,
            })?;
        let archive = if !p.grants.contains(&Grant::Archive) {
            None
        } else if shadow {
            let dir = tempfile::Builder::new()
                .prefix("postern-shadow-archive-")
                .tempdir()
                .map_err(|source| Error::Archive {
                    plugin: p.name.clone(),
                    path: std::env::temp_dir(),
                    source,
                })?;
            Some(Archive::Scratch(dir))
        } else {
            let dir = config.resolve(&config.plugins.archive_dir).join(&p.name);
            std::fs::create_dir_all(&dir).map_err(|source| Error::Archive {
                plugin: p.name.clone(),
                path: dir.clone(),
                source,
            })?;
            Some(Archive::Folder(dir))
        };
        let mut plugin = LoadedPlugin::new(
            p.clone(),
            hash,
            self.engine.clone(),
            pre,
            self.services.clone(),
            self.ticker.clone(),
            archive,
        );
        plugin.validate().await?;
        Ok(plugin)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// A hash of everything that makes a compiled artifact usable by this engine.
fn engine_key(engine: &Engine) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Compiles a component, through the on-disk cache when it is usable.
fn compile(engine: &Engine, bytes: &[u8], hash: &str, cache: &Path) -> Result<Component, String> {
    let file = match cache_dir(cache) {
        Ok(()) => Some(cache.join(format!("{hash}-{}.cwasm", engine_key(engine)))),
        Err(e) => {
            tracing::warn!(folder = %cache.display(), error = %e, "plugin cache not used");
            None
        }
    };
    if let Some(file) = &file {
        if file.exists() {
            // SAFETY: `deserialize_file` trusts the file to be a compiled
            // artifact from this wasmtime, as native code runs from it. The
            // file is named by the content hash and engine key, and lives in a
            // folder that `cache_dir` checked belongs to this user alone with
            // mode 0700, so only this relay (or its user) wrote it, through
            // `serialize` below; wasmtime also checks its header against the
            // engine's settings and refuses a mismatch.
            match unsafe { Component::deserialize_file(engine, file) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "ignoring unusable cached plugin")
                }
            }
        }
    }
    let started = std::time::Instant::now();
    let component = Component::new(engine, bytes).map_err(|e| format!("{e:#}"))?;
    let compiled = started.elapsed();
    if let Some(file) = &file {
        if let Err(e) = store_cached(&component, file) {
            tracing::warn!(file = %file.display(), error = %e, "cannot cache compiled plugin");
        }
    }
    tracing::info!(
        hash = hash.get(..12).unwrap_or(hash),
        bytes = bytes.len(),
        compile_ms = compiled.as_millis() as u64,
        cache_ms = (started.elapsed() - compiled).as_millis() as u64,
        "plugin compiled"
    );
    Ok(component)
}

fn store_cached(component: &Component, file: &Path) -> Result<(), String> {
    use std::io::Write as _;
    let bytes = component.serialize().map_err(|e| format!("{e:#}"))?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
    f.write_all(&bytes).map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    // A reader sees the old name or the whole file, never half of it.
    std::fs::rename(&tmp, file).map_err(|e| e.to_string())
}

/// Creates the cache folder with mode 0700 and refuses one that anybody but
/// this user owns or can write to.
fn cache_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| e.to_string())?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!("owned by uid {}, not this user ({me})", meta.uid()));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make it private (mode 0700): {e}"))?;
    }
    Ok(())
}

/// What grant, if any, an import of the `postern:relay` package needs.
fn grant_for(interface: &str) -> Option<Option<Grant>> {
    match interface {
        "types" | "message" | "context" | "metadata" => Some(None),
        "log" => Some(Some(Grant::Log)),
        "kv" => Some(Some(Grant::Kv)),
        "dns" => Some(Some(Grant::Dns)),
        _ => None,
    }
}

/// Refuses a plugin that imports a host interface it was not granted, or
/// anything the relay does not provide, naming the import. A component
/// `marked` by its SDK build (see [`ungranted`]) may import interfaces it
/// was not granted: they are linked to functions that trap.
fn check_imports(
    engine: &Engine,
    component: &Component,
    p: &PluginConfig,
    marked: bool,
) -> Result<(), Error> {
    for (name, item) in component.component_type().imports(engine) {
        // World-level `use` shows up as type imports; only instances are
        // interfaces with functions in them.
        if !matches!(
            item.ty,
            wasmtime::component::types::ComponentItem::ComponentInstance(_)
        ) {
            continue;
        }
        if let Some(rest) = name.strip_prefix("postern:relay/") {
            let interface = rest.split('@').next().unwrap_or(rest);
            match grant_for(interface) {
                Some(None) => {}
                Some(Some(g)) if p.grants.contains(&g) || marked => {}
                Some(Some(g)) => {
                    return Err(Error::NotGranted {
                        plugin: p.name.clone(),
                        interface: name.to_string(),
                        grant: g.as_str(),
                    })
                }
                None => {
                    return Err(Error::UnknownImport {
                        plugin: p.name.clone(),
                        import: name.to_string(),
                    })
                }
            }
        } else if !name.starts_with("wasi:") {
            return Err(Error::UnknownImport {
                plugin: p.name.clone(),
                import: name.to_string(),
            });
        }
    }
    Ok(())
}

/// The `postern:relay` version a component was built for: 0.1.0 if it
/// imports any interface of that version, else the current one.
fn world_version(engine: &Engine, component: &Component) -> &'static str {
    let old = component
        .component_type()
        .imports(engine)
        .any(|(name, _)| name.starts_with("postern:relay/") && name.ends_with("@0.1.0"));
    if old {
        "0.1.0"
    } else {
        "0.2.0"
    }
}

/// A linker with WASI (nothing ambient in it: the store's context decides) and
/// the host interfaces granted, under the names of the world the component
/// was built for. A 0.1.0 plugin gets the same host functions under 0.1.0
/// names (see [`bindings`]). For a `marked` component, the capability
/// interfaces it imports but was not granted are linked to functions that
/// trap (see [`ungranted`]).
fn link(
    engine: &Engine,
    component: &Component,
    grants: &[Grant],
    marked: bool,
) -> Result<Pre, String> {
    let version = world_version(engine, component);
    let mut linker: Linker<HostState> = Linker::new(engine);
    let e = |e: wasmtime::Error| format!("{e:#}");
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(e)?;
    macro_rules! link {
        ($interface:ident) => {{
            let name = format!("postern:relay/{}@{version}", stringify!($interface));
            let mut instance = linker.instance(&name).map_err(e)?;
            bindings::$interface::add_to_linker_instance::<_, HasSelf<_>>(&mut instance, |s| s)
                .map_err(e)?;
        }};
    }
    link!(types);
    link!(message);
    link!(context);
    if version != "0.1.0" {
        link!(metadata);
    }
    for g in grants {
        match g {
            Grant::Log => link!(log),
            Grant::Kv => link!(kv),
            Grant::Dns => link!(dns),
            // Capabilities rather than interfaces.
            Grant::Archive | Grant::Recipients => {}
        }
    }
    if marked {
        for (name, item) in component.component_type().imports(engine) {
            let wasmtime::component::types::ComponentItem::ComponentInstance(ty) = item.ty else {
                continue;
            };
            let Some(rest) = name.strip_prefix("postern:relay/") else {
                continue;
            };
            let interface = rest.split('@').next().unwrap_or(rest);
            if let Some(Some(g)) = grant_for(interface) {
                if !grants.contains(&g) {
                    ungranted::link_trapping(&mut linker, engine, name, &ty, g).map_err(e)?;
                }
            }
        }
    }
    let pre = linker.instantiate_pre(component).map_err(e)?;
    match version {
        "0.1.0" => v0_1::PluginPre::new(pre).map(Pre::V0_1).map_err(e),
        _ => PluginPre::new(pre).map(Pre::Current).map_err(e),
    }
}

/// What a component needs from the relay, for `postern plugin check`.
#[derive(Debug, Clone)]
pub struct Requirements {
    /// SHA-256 of the `.wasm`, hex.
    pub hash: String,
    /// Every import, by name.
    pub imports: Vec<String>,
    /// The grants its `postern:relay` imports need.
    pub grants: Vec<Grant>,
    /// It imports WASI filesystem, so it may expect the `archive` grant.
    pub filesystem: bool,
    /// The world it was built for, e.g. `postern:relay/plugin@0.2.0`.
    pub world: String,
    /// Its SDK build marked it (see [`ungranted`]): it imports every
    /// capability interface whatever it calls, so `grants` are those its
    /// calls need, and the imports name none of them.
    pub ungranted_trap: bool,
}

impl Runtime {
    /// Compiles a component (through the disk cache in `cache`) and lists
    /// what it imports. The compiled component is kept, so loading the same
    /// bytes next does not compile them again.
    pub async fn requirements(
        &self,
        bytes: Vec<u8>,
        cache: PathBuf,
    ) -> Result<Requirements, String> {
        let marked = ungranted::traps_ungranted(&bytes);
        let (hash, component) = self.component(bytes, cache).await?;
        Ok(requirements(&self.engine, &component, hash, marked))
    }
}

/// What a compiled component imports.
fn requirements(
    engine: &Engine,
    component: &Component,
    hash: String,
    ungranted_trap: bool,
) -> Requirements {
    let mut req = Requirements {
        hash,
        imports: Vec::new(),
        grants: Vec::new(),
        filesystem: false,
        world: format!("postern:relay/plugin@{}", world_version(engine, component)),
        ungranted_trap,
    };
    for (name, item) in component.component_type().imports(engine) {
        if !matches!(
            item.ty,
            wasmtime::component::types::ComponentItem::ComponentInstance(_)
        ) {
            continue;
        }
        req.imports.push(name.to_string());
        if name.starts_with("wasi:filesystem/") {
            req.filesystem = true;
        }
        if let Some(rest) = name.strip_prefix("postern:relay/") {
            let interface = rest.split('@').next().unwrap_or(rest);
            if let Some(Some(g)) = grant_for(interface) {
                if !req.grants.contains(&g) {
                    req.grants.push(g);
                }
            }
        }
    }
    req
}
