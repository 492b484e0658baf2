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
//! - [`reload`]: hot reload on file changes and SIGHUP, and the control socket.
//! - [`stats`]: counters for `postern plugin list`.
//! - [`ticker`]: the epoch ticker behind deadlines, parked while idle.

pub mod bindings;
pub mod check;
pub mod convert;
pub mod host;
pub mod instance;
pub mod reload;
pub mod runtime;
pub mod stats;
pub mod ticker;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::config::{HookName, OnError};
use crate::envelope::{Envelope, Recipient, SessionInfo};
use crate::plugins::host::context::HookContext;
use crate::plugins::host::message::{MessageRef, MessageState};
use crate::plugins::instance::{Answer, Args, Call, CallError, Instance, LoadedPlugin, Pass};
use crate::policy::{DataTransaction, Route, RouteQuery, Verdict};
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

    fn handling(&self, hook: HookName) -> bool {
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
    /// for the transaction's log record.
    trail: Vec<(Arc<LoadedPlugin>, HookName, &'static str)>,
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
            .map(|(p, hook, kind)| format!("{}:{hook}={kind}", p.name()))
            .collect();
        words.join(" ")
    }

    /// Runs a verdict hook: the first answer other than `Continue` ends it.
    async fn verdict(&mut self, call: Call<'_>) -> Verdict {
        let hook = call.hook();
        let Some(mut pass) = self.chain.pass() else {
            return Verdict::Continue;
        };
        for (p, held) in self.chain.plugins.iter().zip(&mut self.held) {
            if !p.handles(hook) {
                continue;
            }
            let v = match p.call(held, &call, &mut pass).await {
                Ok(Answer::Verdict(v)) => v,
                Ok(Answer::Route(_)) => on_error(
                    p,
                    hook,
                    CallError::Invalid("a route from a verdict hook".into()),
                ),
                Err(e) => on_error(p, hook, e),
            };
            self.trail
                .push((p.clone(), hook, instance::verdict_kind(&v)));
            if v != Verdict::Continue {
                return v;
            }
        }
        Verdict::Continue
    }

    /// connect hook. Not part of a transaction: the instances go back at once.
    pub async fn connect(&mut self, session: &SessionInfo) -> Verdict {
        if !self.chain.handling(HookName::Connect) {
            return Verdict::Continue;
        }
        let context = Arc::new(HookContext {
            session: Some(convert::session(session)),
            ..HookContext::default()
        });
        let verdict = self
            .verdict(Call {
                context: &context,
                args: Args::Connect,
            })
            .await;
        self.end();
        verdict
    }

    /// mail-from hook.
    pub async fn mail_from(&mut self, session: &SessionInfo, envelope: &Envelope) -> Verdict {
        if !self.chain.handling(HookName::MailFrom) {
            return Verdict::Continue;
        }
        let context = Arc::new(transaction_context(session, envelope));
        self.verdict(Call {
            context: &context,
            args: Args::MailFrom,
        })
        .await
    }

    /// rcpt hook.
    pub async fn rcpt(
        &mut self,
        session: &SessionInfo,
        envelope: &Envelope,
        rcpt: &Recipient,
    ) -> Verdict {
        if !self.chain.handling(HookName::Rcpt) {
            return Verdict::Continue;
        }
        let context = Arc::new(HookContext {
            recipient: Some(convert::address(&rcpt.address)),
            ..transaction_context(session, envelope)
        });
        self.verdict(Call {
            context: &context,
            args: Args::Rcpt,
        })
        .await
    }

    /// data hook: may change the transaction. The message is shared by the
    /// plugins (and parsed only if one of them asks for its structure); each
    /// sees the edits of those before it, and the edits are applied to `tx`
    /// whatever the verdict.
    pub async fn data(&mut self, session: &SessionInfo, tx: &mut DataTransaction) -> Verdict {
        if !self.chain.handling(HookName::Data) {
            return Verdict::Continue;
        }
        let context = Arc::new(transaction_context(session, &tx.envelope));
        let raw = Arc::new(std::mem::take(&mut tx.message));
        let state = Arc::new(Mutex::new(MessageState::new(
            raw,
            tx.envelope.recipients.clone(),
        )));
        let message = MessageRef(state.clone());
        let verdict = self
            .verdict(Call {
                context: &context,
                args: Args::Data(&message),
            })
            .await;
        drop(message);
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

    /// route hook, per recipient at delivery. A plugin failure with
    /// `on_error = "tempfail"` answers `Reject` with a 4xx reply, which delivery
    /// should treat as "try again later".
    pub async fn route(&mut self, query: RouteQuery<'_>) -> Route {
        if !self.chain.handling(HookName::Route) {
            return Route::Default;
        }
        // The section without the empty line that ends it.
        let section = query
            .headers
            .strip_suffix(b"\r\n")
            .filter(|s| s.ends_with(b"\r\n"))
            .unwrap_or(query.headers);
        let context = Arc::new(HookContext {
            session: None,
            envelope: Some(convert::envelope(query.envelope)),
            recipient: Some(convert::address(&query.recipient.address)),
            headers: Some(String::from_utf8_lossy(section).into_owned()),
        });
        let call = Call {
            context: &context,
            args: Args::Route,
        };
        let Some(mut pass) = self.chain.pass() else {
            return Route::Default;
        };
        for (p, held) in self.chain.plugins.iter().zip(&mut self.held) {
            if !p.handles(HookName::Route) {
                continue;
            }
            let route = match p.call(held, &call, &mut pass).await {
                Ok(Answer::Route(r)) => r,
                Ok(Answer::Verdict(_)) => route_error(
                    p,
                    CallError::Invalid("a verdict from the route hook".into()),
                ),
                Err(e) => route_error(p, e),
            };
            if route != Route::Default {
                return route;
            }
        }
        Route::Default
    }
}

/// The context of a transaction's hooks: its session and envelope.
fn transaction_context(session: &SessionInfo, envelope: &Envelope) -> HookContext {
    HookContext {
        session: Some(convert::session(session)),
        envelope: Some(convert::envelope(envelope)),
        recipient: None,
        headers: None,
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
pub struct ChainHandle(RwLock<Arc<Chain>>);

impl ChainHandle {
    /// Wraps a loaded chain.
    pub fn new(chain: Chain) -> ChainHandle {
        ChainHandle(RwLock::new(Arc::new(chain)))
    }

    /// The chain new sessions use.
    pub fn current(&self) -> Arc<Chain> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the chain; sessions already running keep theirs.
    pub fn swap(&self, chain: Chain) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(chain);
    }
}
