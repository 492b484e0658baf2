//! The plugin chain: the ordered `[[plugin]]` list run at each hook after the
//! built-in access rules. With no plugins configured every hook answers
//! `Continue` and the host defaults apply.

use std::sync::{Arc, RwLock};

use crate::envelope::{Envelope, Recipient, SessionInfo};
use crate::policy::{DataTransaction, Route, RouteQuery, Verdict};

/// One loaded chain. Sessions hold an `Arc<Chain>` for their whole life, so a
/// reload never changes the rules under a transaction in flight.
#[derive(Debug, Default)]
pub struct Chain {}

impl Chain {
    /// A chain without plugins.
    pub fn empty() -> Chain {
        Chain {}
    }

    /// connect hook.
    pub async fn connect(&self, _session: &SessionInfo) -> Verdict {
        Verdict::Continue
    }

    /// mail-from hook.
    pub async fn mail_from(&self, _session: &SessionInfo, _envelope: &Envelope) -> Verdict {
        Verdict::Continue
    }

    /// rcpt hook.
    pub async fn rcpt(
        &self,
        _session: &SessionInfo,
        _envelope: &Envelope,
        _rcpt: &Recipient,
    ) -> Verdict {
        Verdict::Continue
    }

    /// data hook: may change the transaction.
    pub async fn data(&self, _session: &SessionInfo, _tx: &mut DataTransaction) -> Verdict {
        Verdict::Continue
    }

    /// route hook, per recipient at delivery.
    pub async fn route(&self, _query: RouteQuery<'_>) -> Route {
        Route::Default
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
