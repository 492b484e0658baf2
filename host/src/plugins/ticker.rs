//! The engine's one epoch ticker. While any guest code runs it advances the
//! epoch every [`TICK`]: deadlines are counted in ticks, and a running guest
//! yields to the scheduler at each. When no plugin has run for a while it
//! parks, so an idle relay spends no CPU on it; the next call wakes it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;

use wasmtime::Engine;

use crate::plugins::TICK;

/// Ticks in a row with no guest running before the ticker parks (100 ms).
/// Under load calls come far more often than this, so it never parks then,
/// and waking it costs nothing.
const IDLE_TICKS_BEFORE_PARK: u32 = (100 / TICK.as_millis()) as u32;

/// The ticker thread's shared state.
#[derive(Debug)]
pub struct Ticker {
    /// Guest calls (and instantiations) in progress.
    busy: AtomicUsize,
    /// Ticks so far (the engine's epoch cannot be read back).
    ticks: AtomicU64,
    /// Set while the thread is parked (or about to park), so a call unparks
    /// it only then.
    parked: AtomicBool,
    stop: AtomicBool,
    thread: OnceLock<Thread>,
}

/// Marks guest code as running while held.
#[derive(Debug)]
pub struct Busy<'a>(&'a Ticker);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Release);
    }
}

impl Ticker {
    /// Starts the ticker thread for `engine`.
    pub fn start(engine: &Engine) -> Arc<Ticker> {
        let ticker = Arc::new(Ticker {
            busy: AtomicUsize::new(0),
            ticks: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: OnceLock::new(),
        });
        let engine = engine.clone();
        let state = ticker.clone();
        let spawned = std::thread::Builder::new()
            .name("postern-epoch".into())
            .spawn(move || state.run(&engine));
        match spawned {
            Ok(handle) => {
                let _ = ticker.thread.set(handle.thread().clone());
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the plugin epoch ticker; plugin deadlines will not fire")
            }
        }
        ticker
    }

    fn run(&self, engine: &Engine) {
        let mut idle = 0;
        while !self.stop.load(Ordering::Acquire) {
            if self.busy.load(Ordering::SeqCst) == 0 {
                idle += 1;
                if idle > IDLE_TICKS_BEFORE_PARK {
                    // Announce the park, then look again: a call that began in
                    // between either is seen here or sees `parked` and unparks
                    // us (both sides use SeqCst, so one of them must).
                    self.parked.store(true, Ordering::SeqCst);
                    if self.busy.load(Ordering::SeqCst) == 0 {
                        std::thread::park();
                    }
                    self.parked.store(false, Ordering::SeqCst);
                    idle = 0;
                    continue;
                }
            } else {
                idle = 0;
            }
            std::thread::sleep(TICK);
            engine.increment_epoch();
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Call before running guest code; the ticker runs until the guard drops.
    pub fn busy(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
        Busy(self)
    }

    /// Ticks so far.
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    /// Stops the thread (when the runtime is dropped).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The epoch advances while a call is marked busy, stops once the ticker
    /// has parked, and advances again when the next call begins.
    #[test]
    fn parks_when_idle_and_wakes_for_a_call() {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).unwrap();
        let ticker = Ticker::start(&engine);
        // Idle: after the grace ticks it parks and the count stands still.
        let start = Instant::now();
        let mut last = ticker.ticks();
        loop {
            std::thread::sleep(TICK * 50);
            let now = ticker.ticks();
            if now == last {
                break;
            }
            last = now;
            assert!(start.elapsed() < Duration::from_secs(10), "never parked");
        }
        {
            let _busy = ticker.busy();
            let start = Instant::now();
            while ticker.ticks() < last + 5 {
                assert!(start.elapsed() < Duration::from_secs(5), "did not wake");
                std::thread::sleep(TICK);
            }
        }
        ticker.stop();
    }
}
