//! One loaded plugin and its instances: the store state every instance
//! carries, the memory limiter, the deadline, the warm pool, and the call of a
//! hook with its failure classified.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use crate::config::{Grant, HookName, Instances, PluginConfig};
use crate::plugins::bindings::types as wit;
use crate::plugins::bindings::{v0_1, Plugin, PluginPre};
use crate::plugins::host::context::HookContext;
use crate::plugins::host::dns::Resolver;
use crate::plugins::host::kv::KvStore;
use crate::plugins::host::message::MessageRef;
use crate::plugins::stats::Stats;
use crate::plugins::ticker::{Busy, Ticker};
use crate::plugins::{convert, TICK};
use crate::policy::{Route, Routing, Verdict};

/// Warm instances kept idle per plugin; more are dropped when returned.
const MAX_IDLE: usize = 32;
/// Guest time `init` may take.
const INIT_TIMEOUT: Duration = Duration::from_secs(1);
/// Table elements an instance may grow to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// What every plugin instance shares: the host-side services.
#[derive(Debug, Default)]
pub struct Services {
    /// The key-value store (`[kv]`).
    pub kv: KvStore,
    /// The relay's resolver.
    pub dns: Resolver,
    /// The names of the smart-host pools delivery has (`context.get-pools`):
    /// those of the config the relay started with, as delivery's are.
    pub pools: Vec<String>,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::new(&[])
    }
}

/// Caps linear memory and remembers whether the cap was hit and the peak.
struct Limiter {
    cap: usize,
    hit: bool,
    peak: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.hit = true;
            return Ok(false);
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The data of one instance's store.
pub struct HostState {
    /// The plugin's name: log tag and key-value space.
    pub(crate) plugin: String,
    /// The name its metadata is kept under (a shadow's is the live plugin's).
    pub(crate) metadata_name: String,
    /// Granted `recipients`: its added and replaced recipients skip the
    /// relay access rules.
    pub(crate) may_add_recipients: bool,

    pub(crate) services: Arc<Services>,
    pub(crate) table: ResourceTable,
    /// What the hook in progress is about (`postern:relay/context`); none
    /// between calls.
    pub(crate) context: Option<Arc<HookContext>>,
    wasi: WasiCtx,
    limiter: Limiter,
    /// Epoch ticks of guest time used since the call began or the last host
    /// call returned.
    used_ticks: u64,
    budget_ticks: u64,
    timed_out: bool,
}

impl HostState {
    /// Every host function calls this when it returns: the deadline counts
    /// guest time, and the host call had its own limit.
    pub(crate) fn host_call_done(&mut self) {
        self.used_ticks = 0;
    }

    fn arm(&mut self, budget_ticks: u64) {
        self.used_ticks = 0;
        self.timed_out = false;
        self.limiter.hit = false;
        self.budget_ticks = budget_ticks;
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl crate::plugins::bindings::types::Host for HostState {}

/// A plugin failure; each becomes the plugin's `on_error` verdict.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest trapped (panic, unreachable, stack overflow...).
    #[error("trapped: {0}")]
    Trap(String),
    /// It ran past its deadline.
    #[error("ran past its {0:?} deadline")]
    Timeout(Duration),
    /// It tried to grow memory past its cap.
    #[error("hit its memory cap of {0} MiB")]
    Memory(u64),
    /// It answered something the relay refuses (a reply with CR/LF, a code
    /// that does not fit the verdict, a bad route).
    #[error("invalid answer: {0}")]
    Invalid(String),
    /// It called a host interface it was not granted (a Python or
    /// JavaScript plugin, whose component imports them all).
    #[error("{0}")]
    NotGranted(crate::plugins::ungranted::NotGranted),
    /// No instance could be made (pool exhausted, `init` trapped).
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
    /// `init` answered that its config is not usable.
    #[error("init refused its config: {0}")]
    ConfigRefused(String),
}

impl CallError {
    /// The kind, as counted in the stats.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Trap(_) => "trap",
            CallError::Timeout(_) => "timeout",
            CallError::Memory(_) => "memory",
            CallError::Invalid(_) => "invalid",
            CallError::NotGranted(_) => "not-granted",
            CallError::Instantiate(_) | CallError::ConfigRefused(_) => "instantiate",
        }
    }
}

/// One hook call: what it is about (read by the guest on request) and its
/// arguments.
pub struct Call {
    /// Session, envelope, recipient, headers, metadata.
    pub context: Arc<HookContext>,
    /// The hook and its arguments.
    pub args: Args,
}

/// The arguments of one hook call.
pub enum Args {
    /// connect.
    Connect,
    /// helo.
    Helo,
    /// mail-from.
    MailFrom,
    /// rcpt.
    Rcpt,
    /// data.
    Data(MessageRef),
    /// route.
    Route,
    /// delivered.
    Delivered(wit::DeliveryReport),
}

impl Call {
    /// A call of the hook `args` stands for, about `context`.
    pub fn new(context: Arc<HookContext>, args: Args) -> Call {
        Call { context, args }
    }

    /// The same call on copies of its inputs (the message with the edits so
    /// far, the metadata), whose changes are discarded: a shadow's call.
    pub fn fork(&self) -> Call {
        let args = match &self.args {
            Args::Connect => Args::Connect,
            Args::Helo => Args::Helo,
            Args::MailFrom => Args::MailFrom,
            Args::Rcpt => Args::Rcpt,
            Args::Data(m) => Args::Data(m.fork()),
            Args::Route => Args::Route,
            Args::Delivered(r) => Args::Delivered(r.clone()),
        };
        Call::new(Arc::new(self.context.fork()), args)
    }

    /// The hook this call is for.
    pub fn hook(&self) -> HookName {
        self.args.hook()
    }
}

impl Args {
    /// The hook these are the arguments of.
    pub fn hook(&self) -> HookName {
        match self {
            Args::Connect => HookName::Connect,
            Args::Helo => HookName::Helo,
            Args::MailFrom => HookName::MailFrom,
            Args::Rcpt => HookName::Rcpt,
            Args::Data(_) => HookName::Data,
            Args::Route => HookName::Route,
            Args::Delivered(_) => HookName::Delivered,
        }
    }
}

/// One pass of a hook along the chain. It keeps the epoch ticker running
/// while the plugins are called, and times each call from the end of the one
/// before, so a call costs one clock read for its latency figure.
pub struct Pass<'a> {
    _ticking: Busy<'a>,
    clock: Instant,
}

impl<'a> Pass<'a> {
    /// Starts a pass; the plugins of one chain share `ticker`.
    pub fn begin(ticker: &'a Ticker) -> Pass<'a> {
        Pass {
            _ticking: ticker.busy(),
            clock: Instant::now(),
        }
    }

    /// Microseconds since the pass began or the last lap.
    fn lap(&mut self) -> u64 {
        let now = Instant::now();
        let micros = now.duration_since(self.clock).as_micros();
        self.clock = now;
        u64::try_from(micros).unwrap_or(u64::MAX)
    }
}

/// The deadline of one hook, and the same in epoch ticks.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    time: Duration,
    ticks: u64,
}

impl Deadline {
    /// The epoch is global, so the first tick of a call comes anywhere within
    /// one tick of its start: one tick more than the deadline holds means the
    /// guest is never cut early, and at most one tick late.
    fn new(time: Duration) -> Deadline {
        let whole = time.as_micros().div_ceil(TICK.as_micros());
        Deadline {
            time,
            ticks: u64::try_from(whole).unwrap_or(u64::MAX).saturating_add(1),
        }
    }
}

/// Why a warm instance was retired while intact (an instance that failed a
/// call is dropped too, and counted as that call's error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// Its memory passed the plugin's high-water mark.
    Memory,
    /// It served the plugin's `retire_after_uses` calls.
    Uses,
}

impl Retired {
    /// The word in counters and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Retired::Memory => "memory",
            Retired::Uses => "uses",
        }
    }
}

/// A checked answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// From connect, helo, mail-from, rcpt, data.
    Verdict(Verdict),
    /// From route.
    Route(Routing),
    /// From delivered, which answers nothing.
    Done,
}

/// A plugin's exports, in the world it was built for.
enum Exports {
    /// `postern:relay@0.2.0`.
    Current(Plugin),
    /// `postern:relay@0.1.0`: no helo or delivered hooks.
    V0_1(v0_1::Plugin),
}

/// A linked plugin, ready to instantiate, in the world it was built for.
pub(crate) enum Pre {
    /// `postern:relay@0.2.0`.
    Current(PluginPre<HostState>),
    /// `postern:relay@0.1.0`.
    V0_1(v0_1::PluginPre<HostState>),
}

/// One instance with its store.
pub struct Instance {
    store: Store<HostState>,
    plugin: Exports,
    uses: u32,
}

/// The folder a plugin granted `archive` sees as `/archive`.
#[derive(Debug)]
pub enum Archive {
    /// `<plugins.archive_dir>/<name>`.
    Folder(PathBuf),
    /// A shadow's: a temporary folder, removed when the shadow is unloaded.
    Scratch(tempfile::TempDir),
}

impl Archive {
    fn path(&self) -> &std::path::Path {
        match self {
            Archive::Folder(p) => p,
            Archive::Scratch(d) => d.path(),
        }
    }
}

/// A plugin compiled, linked and validated: what the chain calls.
pub struct LoadedPlugin {
    /// The `[[plugin]]` table it was loaded from.
    pub config: PluginConfig,
    /// SHA-256 of the `.wasm`, hex.
    pub hash: String,
    /// The hooks the relay calls.
    pub hooks: Vec<HookName>,
    /// The same, one bit per hook (by [`HookName::index`]).
    hook_bits: u8,
    /// Per hook, by [`HookName::index`].
    deadlines: [Deadline; HookName::ALL.len()],
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// Counters.
    pub stats: Stats,
    config_json: String,
    engine: Engine,
    pre: Pre,
    services: Arc<Services>,
    ticker: Arc<Ticker>,
    archive: Option<Archive>,
    pool: Mutex<Vec<Instance>>,
    /// The new version running beside this one (`shadow` in the config).
    pub shadow: Option<Arc<LoadedPlugin>>,
    /// Limits the shadow's disagreement lines in the log.
    pub(crate) shadow_log: crate::plugins::shadow::LogLimit,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.config.name)
            .field("hash", &self.hash)
            .field("hooks", &self.hooks)
            .finish_non_exhaustive()
    }
}

fn hook_name(h: wit::Hook) -> HookName {
    match h {
        wit::Hook::Connect => HookName::Connect,
        wit::Hook::MailFrom => HookName::MailFrom,
        wit::Hook::Rcpt => HookName::Rcpt,
        wit::Hook::Data => HookName::Data,
        wit::Hook::Route => HookName::Route,
        wit::Hook::Helo => HookName::Helo,
        wit::Hook::Delivered => HookName::Delivered,
    }
}

impl LoadedPlugin {
    /// Wraps a linked plugin; [`LoadedPlugin::validate`] must run before use.
    pub(crate) fn new(
        config: PluginConfig,
        hash: String,
        engine: Engine,
        pre: Pre,
        services: Arc<Services>,
        ticker: Arc<Ticker>,
        archive: Option<Archive>,
    ) -> LoadedPlugin {
        LoadedPlugin {
            config_json: config.config_json(),
            deadlines: HookName::ALL.map(|h| Deadline::new(config.timeout(h))),
            config,
            hash,
            hooks: Vec::new(),
            hook_bits: 0,
            loaded_at: SystemTime::now(),
            stats: Stats::default(),
            engine,
            pre,
            services,
            ticker,
            archive,
            pool: Mutex::new(Vec::new()),
            shadow: None,
            shadow_log: Default::default(),
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The WIT world the plugin was built for.
    pub fn world(&self) -> &'static str {
        match self.pre {
            Pre::Current(_) => "postern:relay/plugin@0.2.0",
            Pre::V0_1(_) => "postern:relay/plugin@0.1.0",
        }
    }

    /// True when the relay calls this plugin at `hook`.
    pub fn handles(&self, hook: HookName) -> bool {
        self.hook_bits & (1 << hook.index()) != 0
    }

    /// The epoch ticker the plugin's deadlines count on.
    pub(crate) fn ticker(&self) -> &Ticker {
        &self.ticker
    }

    /// Makes one instance and runs `init`, which decides the hooks: those it
    /// returns, narrowed by the config's `hooks`. The instance joins the pool.
    pub(crate) async fn validate(&mut self) -> Result<(), crate::plugins::Error> {
        let plugin = self.config.name.clone();
        let (instance, offered) = self.instantiate().await.map_err(|e| match e {
            CallError::ConfigRefused(message) => {
                crate::plugins::Error::ConfigRefused { plugin, message }
            }
            other => crate::plugins::Error::Init {
                plugin,
                message: other.to_string(),
            },
        })?;
        let hooks = match &self.config.hooks {
            None => offered,
            Some(wanted) => {
                if let Some(h) = wanted.iter().find(|h| !offered.contains(h)) {
                    return Err(crate::plugins::Error::Init {
                        plugin: self.config.name.clone(),
                        message: format!(
                            "`hooks` names {h}, which the plugin does not handle (it handles: {})",
                            offered
                                .iter()
                                .map(|h| h.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
                wanted.clone()
            }
        };
        self.hook_bits = hooks.iter().fold(0, |bits, h| bits | 1 << h.index());
        self.hooks = hooks;
        self.release(instance);
        Ok(())
    }

    fn new_store(&self) -> Result<Store<HostState>, CallError> {
        let mut wasi = WasiCtx::builder();
        if let Some(dir) = self.archive.as_ref().map(Archive::path) {
            wasi.preopened_dir(dir, "/archive", FsPerms::ReadWrite)
                .map_err(|e| {
                    CallError::Instantiate(format!("archive folder {}: {e}", dir.display()))
                })?;
        }
        let state = HostState {
            plugin: self.config.name.clone(),
            metadata_name: self.config.metadata_name().to_string(),
            may_add_recipients: self.config.grants.contains(&Grant::Recipients),
            services: self.services.clone(),
            table: ResourceTable::new(),
            context: None,
            wasi: wasi.build(),
            limiter: Limiter {
                cap: usize::try_from(self.config.memory_mb * 1024 * 1024).unwrap_or(usize::MAX),
                hit: false,
                peak: 0,
            },
            used_ticks: 0,
            budget_ticks: 1,
            timed_out: false,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // The one ticker advances the epoch every TICK; each tick a running
        // guest is charged one tick and yields to the scheduler, so a busy
        // plugin never holds a runtime thread, and at the budget it traps.
        store.epoch_deadline_callback(|mut ctx| {
            let s = ctx.data_mut();
            s.used_ticks += 1;
            if s.used_ticks >= s.budget_ticks {
                s.timed_out = true;
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(store)
    }

    fn classify(
        &self,
        store: &Store<HostState>,
        deadline: Duration,
        e: wasmtime::Error,
    ) -> CallError {
        let s = store.data();
        if s.timed_out {
            CallError::Timeout(deadline)
        } else if s.limiter.hit {
            CallError::Memory(self.config.memory_mb)
        } else if let Some(call) = e.downcast_ref::<crate::plugins::ungranted::NotGranted>() {
            CallError::NotGranted(call.clone())
        } else {
            CallError::Trap(format!("{e:#}"))
        }
    }

    async fn instantiate(&self) -> Result<(Instance, Vec<HookName>), CallError> {
        let mut store = self.new_store()?;
        let deadline = Deadline::new(INIT_TIMEOUT.max(self.config.timeout(HookName::Connect)));
        let _ticking = self.ticker.busy();
        store.data_mut().arm(deadline.ticks);
        store.set_epoch_deadline(1);
        let instantiated = match &self.pre {
            Pre::Current(pre) => pre
                .instantiate_async(&mut store)
                .await
                .map(Exports::Current),
            Pre::V0_1(pre) => pre.instantiate_async(&mut store).await.map(Exports::V0_1),
        };
        let plugin = match instantiated {
            Ok(p) => p,
            Err(e) => {
                return Err(match self.classify(&store, deadline.time, e) {
                    CallError::Trap(m) => CallError::Instantiate(m),
                    other => other,
                })
            }
        };
        let init = match &plugin {
            Exports::Current(p) => p
                .call_init(&mut store, &self.config_json)
                .await
                .map(|r| r.map(|hooks| hooks.into_iter().map(hook_name).collect())),
            Exports::V0_1(p) => p
                .call_init(&mut store, &self.config_json)
                .await
                .map(|r| r.map(|hooks| hooks.into_iter().map(convert::v0_1::hook).collect())),
        };
        let hooks = match init {
            Ok(Ok(hooks)) => hooks,
            Ok(Err(message)) => return Err(CallError::ConfigRefused(message)),
            Err(e) => {
                return Err(match self.classify(&store, deadline.time, e) {
                    CallError::Trap(m) => CallError::Instantiate(format!("init trapped: {m}")),
                    other => other,
                })
            }
        };
        Ok((
            Instance {
                store,
                plugin,
                uses: 0,
            },
            hooks,
        ))
    }

    async fn acquire(&self) -> Result<Instance, CallError> {
        if self.config.instances != Instances::Fresh {
            let idle = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(i) = idle {
                return Ok(i);
            }
        }
        Ok(self.instantiate().await?.0)
    }

    /// Takes back an instance at the end of the transaction (or, per call,
    /// the call) it was lent to. A fresh-mode instance is dropped; a warm one
    /// rejoins the pool unless [`LoadedPlugin::retirement`] says otherwise.
    pub(crate) fn release(&self, instance: Instance) {
        if self.config.instances == Instances::Fresh {
            return;
        }
        if let Some(reason) = self.retirement(&instance) {
            self.stats.retired(reason);
            let s = instance.store.data();
            let peak_kib = s.limiter.peak / 1024;
            match reason {
                Retired::Memory => tracing::info!(
                    plugin = %self.config.name,
                    uses = instance.uses,
                    peak_kib,
                    cap_mb = self.config.memory_mb,
                    "plugin instance retired at its memory high-water mark"
                ),
                Retired::Uses => tracing::debug!(
                    plugin = %self.config.name,
                    uses = instance.uses,
                    peak_kib,
                    "plugin instance retired after its uses"
                ),
            }
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_IDLE {
            pool.push(instance);
        }
    }

    /// Why a warm instance that served its call should not serve another:
    /// its memory grew past `retire_at_memory_percent` of the cap (memory
    /// never shrinks, and the next call could hit the cap and fail), or it
    /// served `retire_after_uses` calls (0: no limit).
    fn retirement(&self, instance: &Instance) -> Option<Retired> {
        let limiter = &instance.store.data().limiter;
        let percent = usize::from(self.config.retire_at_memory_percent);
        if limiter.peak > limiter.cap / 100 * percent {
            return Some(Retired::Memory);
        }
        let max_uses = self.config.retire_after_uses;
        if max_uses > 0 && instance.uses >= max_uses {
            return Some(Retired::Uses);
        }
        None
    }

    /// Calls one hook on the instance lent to this transaction (`held`),
    /// borrowing one from the pool first if the transaction has none yet
    /// (with `instances = "per-call"` it goes back right after the call).
    /// Traps, deadline and memory overruns retire the instance; an invalid
    /// answer does not (the guest is intact, only its answer is refused).
    pub async fn call(
        &self,
        held: &mut Option<Instance>,
        call: &Call,
        pass: &mut Pass<'_>,
    ) -> Result<Answer, CallError> {
        let hook = call.hook();
        let result = self.call_inner(held, call).await;
        if self.config.instances == Instances::PerCall {
            if let Some(instance) = held.take() {
                self.release(instance);
            }
        }
        self.stats.call(hook, pass.lap());
        match &result {
            Ok(answer) => self.stats.answer(hook, answer_kind(answer)),
            Err(e) => self.stats.error(hook, e.kind()),
        }
        result
    }

    async fn call_inner(
        &self,
        held: &mut Option<Instance>,
        call: &Call,
    ) -> Result<Answer, CallError> {
        let deadline = self.deadlines[call.hook().index()];
        // Out of the slot while the guest runs: if this future is dropped
        // mid-call, the instance goes with it and is never reused.
        let mut instance = match held.take() {
            Some(i) => i,
            None => self.acquire().await?,
        };
        let Instance { store, plugin, .. } = &mut instance;
        store.data_mut().arm(deadline.ticks);
        store.data_mut().context = Some(call.context.clone());
        store.set_epoch_deadline(1);
        let raw = match plugin {
            Exports::Current(plugin) => call_current(plugin, store, &call.args).await?,
            Exports::V0_1(plugin) => call_v0_1(plugin, store, &call.args).await?,
        };
        // The context is the caller's; an idle instance keeps none of it.
        store.data_mut().context = None;
        let raw = match raw {
            Ok(r) => r,
            Err(e) => return Err(self.classify(store, deadline.time, e)),
        };
        instance.uses += 1;
        let answer = match raw {
            Raw::Verdict(v) => convert::verdict(v).map(Answer::Verdict),
            Raw::Route(r) => convert::routing(r).map(Answer::Route),
            Raw::Done => Ok(Answer::Done),
        };
        *held = Some(instance);
        answer.map_err(CallError::Invalid)
    }
}

enum Raw {
    Verdict(wit::Verdict),
    Route(wit::Routing),
    Done,
}

/// Lends the message to the guest for one call: the guest only borrows the
/// handle, and [`take_back`] removes it after the call, so an idle instance
/// never keeps the message alive.
fn lend(
    store: &mut Store<HostState>,
    message: &MessageRef,
) -> Result<(Resource<MessageRef>, u32), CallError> {
    let handle: Resource<MessageRef> = store
        .data_mut()
        .table
        .push(message.clone())
        .map_err(|e| CallError::Instantiate(e.to_string()))?;
    let rep = handle.rep();
    Ok((handle, rep))
}

fn take_back(store: &mut Store<HostState>, rep: u32) {
    let _ = store
        .data_mut()
        .table
        .delete(Resource::<MessageRef>::new_own(rep));
}

/// One hook call on a 0.2.0 plugin.
async fn call_current(
    plugin: &Plugin,
    store: &mut Store<HostState>,
    args: &Args,
) -> Result<wasmtime::Result<Raw>, CallError> {
    Ok(match args {
        Args::Connect => plugin.call_connect(&mut *store).await.map(Raw::Verdict),
        Args::Helo => plugin.call_helo(&mut *store).await.map(Raw::Verdict),
        Args::MailFrom => plugin.call_mail_from(&mut *store).await.map(Raw::Verdict),
        Args::Rcpt => plugin.call_rcpt(&mut *store).await.map(Raw::Verdict),
        Args::Data(m) => {
            let (handle, rep) = lend(store, m)?;
            let r = plugin.call_data(&mut *store, handle).await;
            take_back(store, rep);
            r.map(Raw::Verdict)
        }
        Args::Route => plugin.call_route(&mut *store).await.map(Raw::Route),
        Args::Delivered(report) => plugin
            .call_delivered(&mut *store, report)
            .await
            .map(|()| Raw::Done),
    })
}

/// One hook call on a 0.1.0 plugin, its answer in 0.2.0 terms. Its `init`
/// cannot name the hooks 0.1.0 lacks, so they are never called.
async fn call_v0_1(
    plugin: &v0_1::Plugin,
    store: &mut Store<HostState>,
    args: &Args,
) -> Result<wasmtime::Result<Raw>, CallError> {
    use convert::v0_1::{route, verdict};
    let v = |v| Raw::Verdict(verdict(v));
    Ok(match args {
        Args::Connect => plugin.call_connect(&mut *store).await.map(v),
        Args::MailFrom => plugin.call_mail_from(&mut *store).await.map(v),
        Args::Rcpt => plugin.call_rcpt(&mut *store).await.map(v),
        Args::Data(m) => {
            let (handle, rep) = lend(store, m)?;
            let r = plugin.call_data(&mut *store, handle).await;
            take_back(store, rep);
            r.map(v)
        }
        Args::Route => plugin
            .call_route(&mut *store)
            .await
            .map(|r| Raw::Route(route(r))),
        Args::Helo | Args::Delivered(_) => {
            return Err(CallError::Invalid(
                "a postern:relay@0.1.0 plugin has no such hook".into(),
            ))
        }
    })
}

/// The word for a verdict in counters and logs.
pub(crate) fn verdict_kind(v: &Verdict) -> &'static str {
    match v {
        Verdict::Continue => "continue",
        Verdict::Accept => "accept",
        Verdict::Reject(_) => "reject",
        Verdict::Tempfail(_) => "tempfail",
        Verdict::Disconnect(_) => "disconnect",
    }
}

fn route_kind(r: &Route) -> &'static str {
    match r {
        Route::Default => "default",
        Route::Mx(_) => "mx",
        Route::Smarthost(_) => "smarthost",
        Route::LocalFolder(_) => "local-folder",
        Route::Discard => "discard",
        Route::Reject(_) => "reject",
        Route::Pool(_) => "pool",
    }
}

fn answer_kind(a: &Answer) -> &'static str {
    match a {
        Answer::Verdict(v) => verdict_kind(v),
        Answer::Route(r) => route_kind(&r.route),
        Answer::Done => "done",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline counts one tick more than it holds, since a call may begin
    /// just before a tick: it is never cut early, and at most a tick late.
    #[test]
    fn deadline_ticks_never_cut_early() {
        let ms = Duration::from_millis;
        let ticks = |t| Deadline::new(t).ticks;
        let tick_ms = TICK.as_millis() as u64;
        assert_eq!(ticks(ms(0)), 1);
        assert_eq!(ticks(ms(1)), 2);
        assert_eq!(ticks(TICK), 2);
        assert_eq!(ticks(ms(50)), 50_u64.div_ceil(tick_ms) + 1);
        for d in [1, 7, 20, 50, 2000] {
            let k = ticks(ms(d));
            // The k-th tick comes after more than (k - 1) ticks of the call.
            assert!((k - 1) * tick_ms >= d, "{d} ms: {k} ticks");
            assert!((k - 1) * tick_ms < d + tick_ms, "{d} ms: {k} ticks");
        }
    }
}
