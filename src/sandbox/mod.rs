//! Faithful fakes of the three platforms' APIs (`shared/API.md` §5), on loopback.
//!
//! Used by `run --sandbox` (in-process, ephemeral port, dummy tokens), by
//! `crm-import sandbox --listen ADDR` (standalone, for rehearsals and
//! benchmarks) and by the integration tests. One HTTP server serves all three
//! APIs (their paths do not collide); each platform keeps its own throttle,
//! faults and state.
//!
//! What it enforces is in each platform's module. What every platform shares:
//! - **faults**: latency, a share of 500s, a share of connections dropped before
//!   processing, a share dropped *after* the effect was applied (the case that
//!   makes non-idempotent retries dangerous), and slow responses;
//! - **a log** of what was received and applied ([`SandboxLog`], also served as
//!   JSON at `GET /_sandbox/log`), which tests compare with the report.
//!
//! Connections are accepted by our own loop rather than `axum::serve` so that a
//! handler can drop its connection without answering: hyper has no response
//! for "close the socket now", and that is exactly the fault we must inject.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::config::Rate;

pub mod chatfuel;
pub mod cloudhumans;
pub mod weni;

/// Every fake, in report order. The only place that lists them.
const FAKES: &[Fake] = &[chatfuel::FAKE, weni::FAKE, cloudhumans::FAKE];

/// One platform's fake, as the sandbox drives it without knowing which exist.
pub struct Fake {
    /// The platform's name (as in `[sinks.<name>]`).
    pub name: &'static str,
    /// Builds its state (a `Mutex<State>`, kept type-erased in [`Shared`]).
    pub state: fn(&SandboxOptions) -> Box<dyn Any + Send + Sync>,
    pub routes: fn() -> Router<Arc<Shared>>,
    /// Its log (what it received and applied), as JSON.
    pub log: fn(&Shared) -> serde_json::Value,
    /// One line of what it received, for a run's summary.
    pub summary: fn(&SandboxLog) -> String,
    /// Its 500 answer (each platform's own shape).
    pub server_error: fn() -> Response<Body>,
}

/// What every fake's state can do, so its registry entry is two generic functions.
pub(crate) trait FakeState: Send + 'static {
    fn new(options: &SandboxOptions) -> Self;
    /// What it received and applied, as JSON.
    fn log_json(&self) -> serde_json::Value;
}

/// A fake's state, type-erased for [`Shared`].
pub(crate) fn boxed_state<T: FakeState>(options: &SandboxOptions) -> Box<dyn Any + Send + Sync> {
    Box::new(Mutex::new(T::new(options)))
}

/// A fake's log, from its state.
pub(crate) fn state_log<T: FakeState>(shared: &Shared) -> serde_json::Value {
    shared
        .state::<T>()
        .lock()
        .map(|s| s.log_json())
        .unwrap_or_default()
}

fn fake(name: &str) -> Option<&'static Fake> {
    FAKES.iter().find(|f| f.name == name)
}

/// The token every fake accepts unless told otherwise (`run --sandbox` uses it).
pub const SANDBOX_TOKEN: &str = "sandbox-token";

/// Injected faults, as shares of requests (0.0–1.0) and durations.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Added to every request before anything else.
    pub latency: Duration,
    /// Share answered 500 without any effect.
    pub error_rate: f64,
    /// Share whose connection is dropped before processing (no effect, no answer).
    pub drop_before: f64,
    /// Share whose connection is dropped after the effect was applied (effect, no answer).
    pub drop_after: f64,
    /// Share answered only after `slow_delay` (effect applied first).
    pub slow_rate: f64,
    pub slow_delay: Duration,
}

/// Options of one platform's fake.
#[derive(Clone, Debug, Default)]
pub struct PlatformOptions {
    /// The platform's throttle; `None` = unlimited.
    pub rate: Option<Rate>,
    pub faults: Faults,
    /// Hostile throttling: the first `count` requests are answered 429 with
    /// this raw `Retry-After` value (`inf`, `1e300`, `-5`, an HTTP date…).
    pub retry_after: Option<(String, u64)>,
    /// Every request is answered `307 Temporary Redirect` to this URL.
    pub redirect_to: Option<String>,
}

/// Everything the sandbox can be told.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// Accepted token, for every platform.
    pub token: String,
    /// Each fake's throttle, faults and hostile answers, by platform name.
    pub platforms: BTreeMap<String, PlatformOptions>,
    /// Weni: page size of GET lists (DRF default 250).
    pub page_size: usize,
    /// Weni: the org's `verify_ninth_digit` switch (API.md §1.3).
    pub weni_verify_ninth_digit: bool,
    /// CloudHumans: account id → inbox ids; empty accepts any.
    pub cloudhumans_accounts: HashMap<String, Vec<String>>,
    /// CloudHumans: known template names; empty accepts any.
    pub cloudhumans_templates: Vec<String>,
    /// Chatfuel: known automation ids; empty accepts any 24-character id.
    pub chatfuel_automations: Vec<String>,
    /// Chatfuel: phones refused (400 naming the first; the batch is not applied).
    pub chatfuel_refused_phones: Vec<String>,
    /// Weni: contacts (blocked or not, in groups) that exist before the run.
    pub weni_seed: Vec<SeedContact>,
    /// Weni: the first N upserts that would create a contact lose a race:
    /// 400 `{"error": "URNs in use by other contacts"}`, nothing applied.
    pub weni_urn_races: u64,
    /// Weni: pagination `next` links point to this origin (a hostile answer:
    /// the client must not send its token there).
    pub weni_next_origin: Option<String>,
    /// Seed of the fault dice, so a failing run can be replayed.
    pub seed: u64,
}

pub use weni::SeedContact;

impl SandboxOptions {
    /// The options of the fake `name` (defaults if never set).
    pub fn platform(&self, name: &str) -> PlatformOptions {
        self.platforms.get(name).cloned().unwrap_or_default()
    }

    /// The options of the fake `name`, to change them.
    pub fn platform_mut(&mut self, name: &str) -> &mut PlatformOptions {
        self.platforms.entry(name.to_owned()).or_default()
    }
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            token: SANDBOX_TOKEN.to_owned(),
            platforms: FAKES
                .iter()
                .map(|f| (f.name.to_owned(), PlatformOptions::default()))
                .collect(),
            page_size: 250,
            weni_verify_ninth_digit: false,
            cloudhumans_accounts: HashMap::new(),
            cloudhumans_templates: Vec::new(),
            chatfuel_automations: Vec::new(),
            chatfuel_refused_phones: Vec::new(),
            weni_seed: Vec::new(),
            weni_urn_races: 0,
            weni_next_origin: None,
            seed: 0x5EED,
        }
    }
}

/// Counters per platform.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Stats {
    pub requests: u64,
    pub throttled: u64,
    pub errors_500: u64,
    pub dropped_before: u64,
    pub dropped_after: u64,
    pub slowed: u64,
}

/// What the fakes received and applied.
/// Each fake's log under its platform's name (typed accessors are in each
/// fake's file, e.g. `log.weni()`), plus request counters per platform.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct SandboxLog {
    #[serde(flatten)]
    pub platforms: BTreeMap<String, serde_json::Value>,
    pub stats: BTreeMap<String, Stats>,
}

impl SandboxLog {
    /// The log of the fake `name`, typed (empty when it received nothing).
    pub fn platform<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> T {
        self.platforms
            .get(name)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    }

    /// What was received, in one line for the run's summary.
    pub fn summary_line(&self) -> String {
        let parts: Vec<String> = FAKES.iter().map(|f| (f.summary)(self)).collect();
        parts.join("; ")
    }
}

/// State shared by every connection.
pub struct Shared {
    pub options: SandboxOptions,
    started: Instant,
    dice: AtomicU64,
    /// Hostile 429s answered so far (see [`PlatformOptions::retry_after`]).
    hostile_429s: AtomicU64,
    stats: Mutex<HashMap<&'static str, Stats>>,
    /// Each fake's `Mutex<State>`, found by type ([`Shared::state`]).
    states: Vec<Box<dyn Any + Send + Sync>>,
    /// Each fake's options, resolved once.
    platforms: HashMap<&'static str, PlatformOptions>,
}

impl Shared {
    fn platform(&self, p: &'static str) -> &PlatformOptions {
        static NONE: std::sync::OnceLock<PlatformOptions> = std::sync::OnceLock::new();
        self.platforms
            .get(p)
            .unwrap_or_else(|| NONE.get_or_init(PlatformOptions::default))
    }

    /// A fake's state: each fake keeps one `Mutex<T>`, built at start.
    pub(crate) fn state<T: 'static>(&self) -> &Mutex<T> {
        self.states
            .iter()
            .find_map(|s| s.downcast_ref::<Mutex<T>>())
            .expect("every fake's state is built when the sandbox starts")
    }

    /// Milliseconds since the sandbox started (timestamps in the log).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A number in [0, 1): splitmix64 over an atomic counter. Hand-written so the
    /// fault dice are reproducible from `seed` and lock-free; no crate needed for 5 lines.
    fn roll(&self) -> f64 {
        let mut z = self
            .dice
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn count(&self, p: &'static str, f: impl FnOnce(&mut Stats)) {
        if let Ok(mut stats) = self.stats.lock() {
            f(stats.entry(p).or_default());
        }
    }

    /// Runs the pre-processing faults. `Some(response)` short-circuits the request.
    pub(crate) async fn before(&self, p: &'static str, kill: &ConnKill) -> Option<Response<Body>> {
        self.count(p, |s| s.requests += 1);
        if let Some(hostile) = self.hostile_answer(p) {
            return Some(hostile);
        }
        let faults = &self.platform(p).faults;
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }
        if faults.drop_before > 0.0 && self.roll() < faults.drop_before {
            self.count(p, |s| s.dropped_before += 1);
            kill.drop_connection().await;
        }
        if faults.error_rate > 0.0 && self.roll() < faults.error_rate {
            self.count(p, |s| s.errors_500 += 1);
            return Some(fake(p).map_or_else(
                || StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                |f| (f.server_error)(),
            ));
        }
        None
    }

    /// A redirect, or a 429 with a hostile `Retry-After`, when configured.
    fn hostile_answer(&self, p: &'static str) -> Option<Response<Body>> {
        let options = self.platform(p);
        if let Some(location) = &options.redirect_to {
            return Some(
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [("location", location.as_str())],
                    "",
                )
                    .into_response(),
            );
        }
        let (value, count) = options.retry_after.as_ref()?;
        let seen = self.hostile_429s.fetch_add(1, Ordering::Relaxed);
        if seen >= *count {
            return None;
        }
        self.throttled(p);
        Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", value.as_str())],
                r#"{"detail": "Request was throttled."}"#,
            )
                .into_response(),
        )
    }

    /// Runs the post-effect faults, then lets `response` go.
    pub(crate) async fn after(
        &self,
        p: &'static str,
        kill: &ConnKill,
        response: Response<Body>,
    ) -> Response<Body> {
        let faults = &self.platform(p).faults;
        if faults.drop_after > 0.0 && self.roll() < faults.drop_after {
            self.count(p, |s| s.dropped_after += 1);
            kill.drop_connection().await;
        }
        if faults.slow_rate > 0.0 && self.roll() < faults.slow_rate {
            self.count(p, |s| s.slowed += 1);
            tokio::time::sleep(faults.slow_delay).await;
        }
        response
    }

    pub(crate) fn throttled(&self, p: &'static str) {
        self.count(p, |s| s.throttled += 1);
    }

    /// A snapshot of everything received and applied.
    pub fn log(&self) -> SandboxLog {
        let stats = self
            .stats
            .lock()
            .map(|s| {
                s.iter()
                    .map(|(p, st)| (p.to_string(), st.clone()))
                    .collect()
            })
            .unwrap_or_default();
        SandboxLog {
            platforms: FAKES
                .iter()
                .map(|f| (f.name.to_owned(), (f.log)(self)))
                .collect(),
            stats,
        }
    }
}

/// Lets a handler close its own connection without answering.
#[derive(Clone)]
pub struct ConnKill(Arc<Notify>);

impl ConnKill {
    /// Closes the connection; never returns (the request future is dropped with it).
    pub async fn drop_connection(&self) -> ! {
        self.0.notify_one();
        std::future::pending::<()>().await;
        unreachable!("the connection task drops this future")
    }
}

/// A sliding-window throttle (DRF's `SimpleRateThrottle`): only admitted requests count.
pub struct SlidingWindow {
    rate: Rate,
    hits: HashMap<String, VecDeque<Instant>>,
}

impl SlidingWindow {
    pub fn new(rate: Rate) -> SlidingWindow {
        SlidingWindow {
            rate,
            hits: HashMap::new(),
        }
    }

    /// `Err(seconds)` to wait when `key` is over its rate.
    pub fn check(&mut self, key: &str) -> Result<(), u64> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&mut self, key: &str, now: Instant) -> Result<(), u64> {
        let window = self.rate.per;
        let hits = self.hits.entry(key.to_owned()).or_default();
        while hits
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            hits.pop_front();
        }
        if hits.len() < self.rate.count as usize {
            hits.push_back(now);
            return Ok(());
        }
        let oldest = hits.front().copied().unwrap_or(now);
        let wait = window.saturating_sub(now.duration_since(oldest));
        Err(wait.as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// A fixed-window throttle (rack-attack's): counts every request in the current window.
pub struct FixedWindow {
    rate: Rate,
    windows: HashMap<String, (Instant, u32)>,
}

impl FixedWindow {
    pub fn new(rate: Rate) -> FixedWindow {
        FixedWindow {
            rate,
            windows: HashMap::new(),
        }
    }

    /// `Err(seconds until the window ends)` when over the rate.
    pub fn check(&mut self, key: &str) -> Result<(), u64> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&mut self, key: &str, now: Instant) -> Result<(), u64> {
        let entry = self.windows.entry(key.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.rate.per {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 <= self.rate.count {
            Ok(())
        } else {
            let left = self.rate.per.saturating_sub(now.duration_since(entry.0));
            Err(left.as_secs_f64().ceil().max(1.0) as u64)
        }
    }
}

/// A running sandbox.
pub struct Sandbox {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: Arc<Notify>,
}

impl Sandbox {
    /// Binds `addr` (must be a loopback address) and serves until dropped.
    pub async fn start(addr: SocketAddr, options: SandboxOptions) -> std::io::Result<Sandbox> {
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the sandbox listens on loopback only (127.0.0.1 or ::1), not {}",
                    addr.ip()
                ),
            ));
        }
        let shared = Arc::new(Shared {
            dice: AtomicU64::new(options.seed),
            hostile_429s: AtomicU64::new(0),
            started: Instant::now(),
            stats: Mutex::new(HashMap::new()),
            states: FAKES.iter().map(|f| (f.state)(&options)).collect(),
            platforms: FAKES
                .iter()
                .map(|f| (f.name, options.platform(f.name)))
                .collect(),
            options,
        });
        let router = router(shared.clone());
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shutdown = Arc::new(Notify::new());
        tokio::spawn(accept_loop(listener, router, shutdown.clone()));
        Ok(Sandbox {
            addr,
            shared,
            shutdown,
        })
    }

    /// `http://127.0.0.1:PORT`: the base URL of all three APIs.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> SandboxLog {
        self.shared.log()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.shutdown.notify_waiters();
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let routes = FAKES
        .iter()
        .fold(Router::new(), |router, f| router.merge((f.routes)()));
    routes
        .route(
            "/_sandbox/log",
            get(
                |axum::extract::State(shared): axum::extract::State<Arc<Shared>>| async move {
                    axum::Json(shared.log())
                },
            ),
        )
        .with_state(shared)
}

async fn accept_loop(listener: TcpListener, router: Router, shutdown: Arc<Notify>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.notified() => return,
        };
        let Ok((stream, _peer)) = accepted else {
            continue;
        };
        let router = router.clone();
        tokio::spawn(async move {
            let kill = ConnKill(Arc::new(Notify::new()));
            let for_requests = kill.clone();
            let service =
                hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(for_requests.clone());
                    let router = router.clone();
                    async move {
                        use tower::ServiceExt;
                        router.oneshot(request.map(Body::new)).await
                    }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = kill.0.notified() => {}
            }
        });
    }
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    (status, axum::Json(value)).into_response()
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for now (DRF's format). Hand-written civil-date
/// conversion (Howard Hinnant's algorithm) to avoid a date crate for one string.
pub(crate) fn now_iso8601() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_micros()
    )
}

/// A random-looking UUID v4 string from a counter (unique within the sandbox).
pub(crate) fn uuid(n: u64, salt: u64) -> String {
    let mut z = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let a = z;
    let b = n ^ 0xA5A5_5A5A_DEAD_BEEF;
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xFFFF,
        a & 0xFFF,
        (b >> 48) & 0xFFF,
        b & 0xFFFF_FFFF_FFFF
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_counts_only_admitted_requests() {
        let mut w = SlidingWindow::new(Rate {
            count: 2,
            per: Duration::from_secs(60),
        });
        assert!(w.check("t").is_ok());
        assert!(w.check("t").is_ok());
        assert!(matches!(w.check("t"), Err(s) if (1..=60).contains(&s)));
        assert!(w.check("other token").is_ok());
    }

    #[test]
    fn fixed_window_resets() {
        let mut w = FixedWindow::new(Rate {
            count: 1,
            per: Duration::from_secs(60),
        });
        let t0 = Instant::now();
        assert!(w.check_at("ip", t0).is_ok());
        assert!(w.check_at("ip", t0 + Duration::from_secs(1)).is_err());
        assert!(
            w.check_at("ip", t0 + Duration::from_secs(61)).is_ok(),
            "a new window starts"
        );
    }

    #[test]
    fn iso_dates_look_like_drf() {
        let s = now_iso8601();
        assert_eq!(s.len(), 27, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'));
    }
}
