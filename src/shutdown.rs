//! One cancellation signal every stage watches: a signal (SIGTERM, Ctrl-C),
//! the `--max-duration` time box, or a failure that makes delivery unsafe
//! (the report or a spool cannot be written).
//!
//! Built on `tokio_util`'s `CancellationToken` so that a sleeping pause
//! (`Retry-After`, backoff) can be cut short with `select!`; the first reason
//! given is kept, because it is the one the report's `detail` must name.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Why the run stops starting requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM or SIGINT (the signal's name): stop reading too.
    Signal(&'static str),
    /// `--max-duration` elapsed: reading goes on so the report is complete.
    TimeLimit(Duration),
    /// Something the run cannot vouch for without (the report, a spool): exit 1.
    Failure(String),
}

impl StopReason {
    /// The report's `detail` for a row that was not sent because of this.
    pub fn detail(&self) -> String {
        match self {
            StopReason::Signal(name) => {
                format!("interrupted ({name}) before sending; the next run sends it")
            }
            StopReason::TimeLimit(_) => "time limit reached".to_owned(),
            StopReason::Failure(why) => format!("not sent: {why}"),
        }
    }
}

/// Cheap to clone; every clone sees the same stop.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    token: CancellationToken,
    reason: OnceLock<StopReason>,
    /// Signals received (the second one quits at once).
    signals: AtomicU32,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Stops the run for `reason` (the first reason given wins).
    pub fn stop(&self, reason: StopReason) {
        let _ = self.inner.reason.set(reason);
        self.inner.token.cancel();
    }

    /// Records a signal and stops; returns how many signals were received.
    pub fn signal(&self, name: &'static str) -> u32 {
        let n = self.inner.signals.fetch_add(1, Ordering::SeqCst) + 1;
        self.stop(StopReason::Signal(name));
        n
    }

    /// Why the run is stopping, once it is.
    pub fn reason(&self) -> Option<&StopReason> {
        self.inner.reason.get()
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// Whether the reader must stop (a signal or a failure; not the time limit).
    pub fn stops_reading(&self) -> bool {
        self.inner.signals.load(Ordering::SeqCst) > 0
            || matches!(self.reason(), Some(StopReason::Failure(_)))
    }

    /// Completes when the run starts stopping.
    pub async fn stopped(&self) {
        self.inner.token.cancelled().await
    }

    /// Sleeps `pause`, or less if the run stops meanwhile; `false` if it was cut short.
    pub async fn sleep(&self, pause: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = self.stopped() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_only_signals_stop_reading() {
        let s = Shutdown::new();
        assert!(!s.is_stopping());
        s.stop(StopReason::TimeLimit(Duration::from_secs(1)));
        assert!(s.is_stopping() && !s.stops_reading());
        assert_eq!(s.signal("SIGTERM"), 1);
        assert_eq!(s.reason().unwrap().detail(), "time limit reached");
        assert!(s.stops_reading());
        assert_eq!(s.signal("SIGTERM"), 2);
    }

    #[test]
    fn a_pause_is_cut_short_by_a_stop() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let s = Shutdown::new();
        let stopper = s.clone();
        let slept = rt.block_on(async move {
            let pause = tokio::spawn(async move { s.sleep(Duration::from_secs(3600)).await });
            tokio::time::sleep(Duration::from_secs(1)).await;
            stopper.signal("SIGINT");
            pause.await.unwrap()
        });
        assert!(!slept, "an hour's pause ends with the signal");
    }
}
