//! The plugin chain: the ordered `[[plugin]]` list run at each hook after the
//! built-in access rules. With no plugins configured every hook answers
//! `Continue` and the host defaults apply.
//!
//! # Layout
//!
//! - [`bindings`]: the one `bindgen!` of the WIT world.
//! - [`runtime`]: the engine, the epoch ticker, the compiled cache, loading.
//! - [`instance`]: one loaded plugin, its warm pool, limits and calls.
//! - [`host`]: the host interfaces (log, kv, dns, message).
//! - [`check`] and [`convert`]: what a plugin's answer must satisfy.
//! - [`delivered`]: the queue of delivery reports for the `delivered` hook.
//! - [`retention`]: removes archived files past `archive_retention`.
//! - [`reload`]: hot reload on file changes and SIGHUP, and the control socket.
//! - [`shadow`]: a new version run beside the live one, its answers counted.
//! - [`stats`]: counters for `postern plugin list`.
//! - [`ticker`]: the epoch ticker behind deadlines, parked while idle.
//! - [`ungranted`]: interfaces a Python or JavaScript plugin imports but
//!   was not granted, linked to functions that trap.

pub mod bindings;
pub mod check;
pub mod convert;
pub mod delivered;
pub mod host;
pub mod instance;
pub mod reload;
pub mod retention;
pub mod runtime;
pub mod shadow;
pub mod stats;
pub mod ticker;
pub mod ungranted;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::authn::Results;
use crate::config::{HookName, OnError};
use crate::envelope::{Envelope, Recipient, SessionInfo};
use crate::metadata::{Access, SharedMetadata};
use crate::plugins::bindings::types as wit;
use crate::plugins::host::context::HookContext;
use crate::plugins::host::message::{MessageRef, MessageState};
use crate::plugins::instance::{Answer, Args, Call, CallError, Instance, LoadedPlugin, Pass};
use crate::policy::{DataTransaction, Queued, Route, RouteQuery, Routing, Verdict};
use crate::queue::QueueId;
use crate::smtp::reply::Reply;

pub use runtime::Runtime;

/// The epoch tick: deadlines are counted in these, and a running guest yields
/// to the scheduler once per tick. Under load the ticker wakes once per tick,
/// and each wake-up costs a context switch (and, in a virtual machine, timer
/// exits), so the tick is as long as deadline precision allows: a deadline
/// fires at most one tick late, and a busy guest holds a worker at most this
/// long.
pub const TICK: Duration = Duration::from_millis(5);

/// Why a chain could not be loaded; each names the plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `.wasm` could not be read.
    #[error("plugin {plugin}: cannot read {}: {source}", path.display())]
    Read {
        /// The plugin.
        plugin: String,
        /// Its file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a valid component.
    #[error("plugin {plugin}: not a valid component: {message}")]
    Compile {
        /// The plugin.
        plugin: String,
        /// The compiler's message.
        message: String,
    },
    /// It imports a host interface that its `grants` do not name.
    #[error("plugin {plugin}: imports {interface}, which it was not granted (add \"{grant}\" to its grants)")]
    NotGranted {
        /// The plugin.
        plugin: String,
        /// The interface, as imported.
        interface: String,
        /// The grant that would allow it.
        grant: &'static str,
    },
    /// It imports something the relay does not provide.
    #[error("plugin {plugin}: imports {import}, which the relay does not provide")]
    UnknownImport {
        /// The plugin.
        plugin: String,
        /// The import.
        import: String,
    },
    /// It does not fit the `plugin` world.
    #[error("plugin {plugin}: does not fit the postern:relay/plugin world: {message}")]
    Link {
        /// The plugin.
        plugin: String,
        /// Wasmtime's message.
        message: String,
    },
    /// `init` failed, trapped, or named hooks the config does not allow.
    #[error("plugin {plugin}: {message}")]
    Init {
        /// The plugin.
        plugin: String,
        /// What went wrong.
        message: String,
    },
    /// `init` answered that the plugin's config (`[plugin.config]`) is not
    /// usable.
    #[error("plugin {plugin}: init refused its config: {message}")]
    ConfigRefused {
        /// The plugin.
        plugin: String,
        /// The plugin's own words.
        message: String,
    },
    /// Its archive folder could not be created.
    #[error("plugin {plugin}: archive folder {}: {source}", path.display())]
    Archive {
        /// The plugin.
        plugin: String,
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The kv store could not be opened.
    #[error("kv store: {0}")]
    Kv(String),
    /// The engine could not be built or no longer fits the config.
    #[error("plugin runtime: {0}")]
    Engine(String),
    /// The config file (on reload).
    #[error(transparent)]
    Config(#[from] crate::config::Error),
}

/// One loaded chain. Sessions hold an `Arc<Chain>` for their whole life, so a
/// reload never changes the rules under a transaction in flight.
#[derive(Debug, Default)]
pub struct Chain {
    plugins: Vec<Arc<LoadedPlugin>>,
    /// Keeps the engine's ticker running while any chain is in use.
    _runtime: Option<Arc<Runtime>>,
}

impl Chain {
    /// A chain without plugins.
    pub fn empty() -> Chain {
        Chain::default()
    }

    pub(crate) fn new(plugins: Vec<Arc<LoadedPlugin>>, runtime: Option<Arc<Runtime>>) -> Chain {
        Chain {
            plugins,
            _runtime: runtime,
        }
    }

    /// The plugins, in chain order.
    pub fn plugins(&self) -> &[Arc<LoadedPlugin>] {
        &self.plugins
    }

    /// True when some plugin of the chain handles `hook`.
    pub fn handles(&self, hook: HookName) -> bool {
        self.plugins.iter().any(|p| p.handles(hook))
    }

    /// A pass of one hook along this chain; none without plugins.
    fn pass(&self) -> Option<Pass<'_>> {
        self.plugins.first().map(|p| Pass::begin(p.ticker()))
    }

    /// A lease on this chain for one session: the hooks are called through
    /// it, and each plugin's instance stays lent to it until the transaction
    /// ends ([`Lease::end`]).
    pub fn lease(self: &Arc<Self>) -> Lease {
        Lease {
            chain: self.clone(),
            held: (0..self.plugins.len()).map(|_| None).collect(),
            trail: Vec::new(),
            shadows: Vec::new(),
        }
    }
}

/// A session's hold on its chain, and the instances lent to its transaction
/// in progress: one per plugin, taken from the warm pool at the plugin's
/// first hook of the transaction (or made, with `instances = "fresh"`) and
/// given back when the transaction ends, so no two transactions share an
/// instance at the same time. Dropping the lease ends the transaction too.
pub struct Lease {
    chain: Arc<Chain>,
    /// By chain position.
    held: Vec<Option<Instance>>,
    /// Each plugin's verdict at each hook since [`Lease::take_verdicts`],
    /// for the transaction's log record, the plugin by chain position.
    trail: Vec<(usize, HookName, &'static str)>,
    /// Shadow calls of the session's hooks still to run: the session runs
    /// them once the client has the reply ([`Lease::run_shadows`]).
    shadows: Vec<shadow::Pending>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("plugins", &self.chain.plugins.len())
            .field("held", &self.held.iter().filter(|h| h.is_some()).count())
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.end();
        // A session that ended before flushing its last reply still has its
        // shadows compared, in a task of their own.
        shadow::spawn(std::mem::take(&mut self.shadows));
    }
}

impl Lease {
    /// The chain this lease is on.
    pub fn chain(&self) -> &Arc<Chain> {
        &self.chain
    }

    /// Ends the transaction: every instance it holds goes back to its plugin.
    pub fn end(&mut self) {
        for (p, held) in self.chain.plugins.iter().zip(&mut self.held) {
            if let Some(instance) = held.take() {
                p.release(instance);
            }
        }
    }

    /// The verdicts given since the last call (or since the lease began), as
    /// `plugin:hook=verdict` words; a plugin failure shows as what its
    /// `on_error` made of it.
    pub fn take_verdicts(&mut self) -> String {
        let words: Vec<String> = self
            .trail
            .drain(..)
            .map(|(i, hook, kind)| format!("{}:{hook}={kind}", self.chain.plugins[i].name()))
            .collect();
        words.join(" ")
    }

    /// Runs the shadow calls of the hooks called so far and counts their
    /// answers. The session calls this once the client has its reply, so a
    /// shadow adds no latency; it runs inline, as a second plugin in the
    /// chain would, rather than in a task of its own per call.
    pub async fn run_shadows(&mut self) {
        for pending in std::mem::take(&mut self.shadows) {
            pending.compare().await;
        }
    }

    /// Runs a verdict hook: the first answer other than `Continue` ends it.
    /// A plugin with a shadow has the shadow's call kept, on a copy of its
    /// inputs, for [`Lease::run_shadows`].
    async fn verdict(&mut self, call: Call) -> Verdict {
        let hook = call.hook();
        let Some(mut pass) = self.chain.pass() else {
            return Verdict::Continue;
        };
        for (i, (p, held)) in self.chain.plugins.iter().zip(&mut self.held).enumerate() {
            if !p.handles(hook) {
                continue;
            }
            // Before the live call, so the shadow sees what the live one saw.
            let shadow_call = p.shadow.as_ref().map(|_| call.fork());
            let v = match p.call(held, &call, &mut pass).await {
                Ok(Answer::Verdict(v)) => v,
                Ok(_) => on_error(
                    p,
                    hook,
                    CallError::Invalid("a route from a verdict hook".into()),
                ),
                Err(e) => on_error(p, hook, e),
            };
            self.trail.push((i, hook, instance::verdict_kind(&v)));
            if let Some(call) = shadow_call {
                self.shadows.push(shadow::Pending {
                    live: p.clone(),
                    call,
                    live_answer: Answer::Verdict(v.clone()),
                });
            }
            if v != Verdict::Continue {
                return v;
            }
        }
        Verdict::Continue
    }

    /// connect hook. Not part of a transaction: the instances go back at once.
    pub async fn connect(&mut self, session: &SessionInfo, scopes: &Scopes) -> Verdict {
        self.session_hook(Args::Connect, session, scopes).await
    }

    /// helo hook, after EHLO or HELO (and after the EHLO that follows
    /// STARTTLS). Not part of a transaction: the instances go back at once.
    pub async fn helo(&mut self, session: &SessionInfo, scopes: &Scopes) -> Verdict {
        self.session_hook(Args::Helo, session, scopes).await
    }

    /// A hook of the session outside any transaction (connect, helo).
    async fn session_hook(
        &mut self,
        args: Args,
        session: &SessionInfo,
        scopes: &Scopes,
    ) -> Verdict {
        if !self.chain.handles(args.hook()) {
            return Verdict::Continue;
        }
        let context = Arc::new(HookContext {
            session: Some(convert::session(session)),
            ..scopes.context()
        });
        let verdict = self.verdict(Call::new(context, args)).await;
        self.end();
        verdict
    }

    /// mail-from hook; `authn` holds the SPF results.
    pub async fn mail_from(
        &mut self,
        session: &SessionInfo,
        envelope: &Envelope,
        authn: &Results,
        scopes: &Scopes,
    ) -> Verdict {
        if !self.chain.handles(HookName::MailFrom) {
            return Verdict::Continue;
        }
        let context = Arc::new(transaction_context(session, envelope, authn, scopes));
        self.verdict(Call::new(context, Args::MailFrom)).await
    }

    /// rcpt hook; `authn` holds the SPF results.
    pub async fn rcpt(
        &mut self,
        session: &SessionInfo,
        envelope: &Envelope,
        rcpt: &Recipient,
        authn: &Results,
        scopes: &Scopes,
    ) -> Verdict {
        if !self.chain.handles(HookName::Rcpt) {
            return Verdict::Continue;
        }
        let context = Arc::new(HookContext {
            recipient: Some(convert::address(&rcpt.address)),
            ..transaction_context(session, envelope, authn, scopes)
        });
        self.verdict(Call::new(context, Args::Rcpt)).await
    }

    /// data hook: may change the transaction. The message is shared by the
    /// plugins (and parsed only if one of them asks for its structure); each
    /// sees the edits of those before it, and the edits are applied to `tx`
    /// whatever the verdict. `queue_id` is the id the message will have.
    pub async fn data(
        &mut self,
        session: &SessionInfo,
        tx: &mut DataTransaction,
        scopes: &Scopes,
        queue_id: &QueueId,
    ) -> Verdict {
        if !self.chain.handles(HookName::Data) {
            return Verdict::Continue;
        }
        let context = Arc::new(HookContext {
            queue_id: Some(queue_id.to_string()),
            ..transaction_context(session, &tx.envelope, &tx.authentication, scopes)
        });
        let raw = Arc::new(std::mem::take(&mut tx.message));
        let state = Arc::new(Mutex::new(MessageState::new(
            raw,
            tx.envelope.recipients.clone(),
        )));
        let message = MessageRef(state.clone());
        let verdict = self.verdict(Call::new(context, Args::Data(message))).await;
        let state = match Arc::try_unwrap(state) {
            Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
            // An instance still holds a handle (it cannot, as calls delete
            // theirs, but the edits must not be lost if one did).
            Err(shared) => std::mem::replace(
                &mut *shared.lock().unwrap_or_else(|e| e.into_inner()),
                MessageState::new(Arc::new(Vec::new()), Vec::new()),
            ),
        };
        state.finish(tx);
        verdict
    }

    /// route hook, per recipient at delivery. The first route other than
    /// `Default` ends the hook; the sender is the first one a plugin gave, so
    /// a forwarder early in the chain can rewrite the sender of a recipient
    /// a router after it sends on. A plugin failure with `on_error =
    /// "tempfail"` answers `Reject` with a 4xx reply, which delivery should
    /// treat as "try again later".
    pub async fn route(&mut self, query: RouteQuery<'_>) -> Routing {
        if !self.chain.handles(HookName::Route) {
            return Route::Default.into();
        }
        // The section without the empty line that ends it.
        let section = query
            .headers
            .strip_suffix(b"\r\n")
            .filter(|s| s.ends_with(b"\r\n"))
            .unwrap_or(query.headers);
        let context = Arc::new(HookContext {
            recipient: Some(convert::address(&query.recipient.address)),
            headers: Some(String::from_utf8_lossy(section).into_owned()),
            ..queued_context(query.queued)
        });
        let call = Call::new(context, Args::Route);
        let Some(mut pass) = self.chain.pass() else {
            return Route::Default.into();
        };
        let mut sender = None;
        for (p, held) in self.chain.plugins.iter().zip(&mut self.held) {
            if !p.handles(HookName::Route) {
                continue;
            }
            let shadow_call = p.shadow.as_ref().map(|_| call.fork());
            let routing = match p.call(held, &call, &mut pass).await {
                Ok(Answer::Route(r)) => r,
                Ok(_) => route_error(
                    p,
                    CallError::Invalid("a verdict from the route hook".into()),
                )
                .into(),
                Err(e) => route_error(p, e).into(),
            };
            if let Some(call) = shadow_call {
                shadow::compare(p, &call, &Answer::Route(routing.clone())).await;
            }
            sender = sender.or(routing.sender);
            if routing.route != Route::Default {
                return Routing {
                    route: routing.route,
                    sender,
                };
            }
        }
        Routing {
            route: Route::Default,
            sender,
        }
    }

    /// delivered hook: every plugin that handles it hears of the attempt;
    /// answers and failures change nothing (a failure is logged and counted).
    pub async fn delivered(&mut self, queued: Queued<'_>, report: wit::DeliveryReport) {
        if !self.chain.handles(HookName::Delivered) {
            return;
        }
        let context = Arc::new(HookContext {
            recipient: Some(report.recipient.clone()),
            ..queued_context(queued)
        });
        let call = Call::new(context, Args::Delivered(report));
        if let Some(mut pass) = self.chain.pass() {
            for (p, held) in self.chain.plugins.iter().zip(&mut self.held) {
                if !p.handles(HookName::Delivered) {
                    continue;
                }
                let shadow_call = p.shadow.as_ref().map(|_| call.fork());
                let answer = match p.call(held, &call, &mut pass).await {
                    Ok(answer) => answer,
                    Err(e) => {
                        tracing::warn!(plugin = p.name(), hook = %HookName::Delivered, error = %e, "plugin failed");
                        Answer::Done
                    }
                };
                if let Some(call) = shadow_call {
                    shadow::compare(p, &call, &answer).await;
                }
            }
        }
        self.end();
    }
}

/// The metadata a hook may read and write: the session's, and the
/// transaction's once MAIL FROM began one.
#[derive(Debug, Clone, Default)]
pub struct Scopes {
    /// The session's values.
    pub session: Option<SharedMetadata>,
    /// The transaction's values.
    pub transaction: Option<SharedMetadata>,
}

impl Scopes {
    /// A context with these scopes and nothing else.
    fn context(&self) -> HookContext {
        HookContext {
            session_metadata: self.session.clone().map(Access::Writable),
            transaction_metadata: self.transaction.clone().map(Access::Writable),
            ..HookContext::default()
        }
    }
}

/// The context of a transaction's hooks: its session, envelope,
/// authentication results and metadata.
fn transaction_context(
    session: &SessionInfo,
    envelope: &Envelope,
    authn: &Results,
    scopes: &Scopes,
) -> HookContext {
    HookContext {
        session: Some(convert::session(session)),
        envelope: Some(convert::envelope(envelope)),
        authentication: Some(convert::authentication(authn)),
        ..scopes.context()
    }
}

/// The context of a delivery hook: the message's envelope, the session facts
/// and metadata stored with it (read only), its queue id.
fn queued_context(q: Queued<'_>) -> HookContext {
    HookContext {
        session: q.client.map(convert::session),
        envelope: Some(convert::envelope(q.envelope)),
        queue_id: Some(q.id.to_string()),
        transaction_metadata: Some(Access::ReadOnly(q.metadata.clone())),
        ..HookContext::default()
    }
}

/// A plugin failure turned into its `on_error` verdict, and logged.
fn on_error(p: &LoadedPlugin, hook: HookName, e: CallError) -> Verdict {
    tracing::warn!(plugin = p.name(), %hook, error = %e, on_error = ?p.config.on_error, "plugin failed");
    match p.config.on_error {
        OnError::Tempfail => Verdict::Tempfail(Reply::PLUGIN_TEMPFAIL),
        OnError::Continue => Verdict::Continue,
        OnError::Reject => Verdict::Reject(Reply::POLICY_REJECT),
    }
}

fn route_error(p: &LoadedPlugin, e: CallError) -> Route {
    match on_error(p, HookName::Route, e) {
        Verdict::Continue => Route::Default,
        Verdict::Reject(r) | Verdict::Tempfail(r) | Verdict::Disconnect(r) => Route::Reject(r),
        Verdict::Accept => Route::Default,
    }
}

/// The current chain, swapped atomically on reload.
#[derive(Debug)]
pub struct ChainHandle {
    chain: RwLock<Arc<Chain>>,
    /// Delivery reports the `delivered` hook never got: its queue was full.
    pub delivered_dropped: AtomicU64,
}

impl ChainHandle {
    /// Wraps a loaded chain.
    pub fn new(chain: Chain) -> ChainHandle {
        ChainHandle {
            chain: RwLock::new(Arc::new(chain)),
            delivered_dropped: AtomicU64::new(0),
        }
    }

    /// The chain new sessions use.
    pub fn current(&self) -> Arc<Chain> {
        self.chain.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the chain; sessions already running keep theirs.
    pub fn swap(&self, chain: Chain) {
        *self.chain.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(chain);
    }
}
