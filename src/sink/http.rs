//! What every uploader shares: the HTTP client, the rate limit, retries with
//! backoff, the sink-wide pause on 429, and the stop on refused auth.
//!
//! Each HTTP outcome is classified once into a [`Verdict`]; [`Uploader::execute`]
//! is the only place that branches on it, in this fixed order (Vector's layers):
//! pause (429) → rate limit (governor) → request with timeout → classify → retry?
//! Concurrency is the number of worker tasks a sink runs (see `sink::run`).

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use governor::{Quota, RateLimiter};

use crate::config::SinkCommon;
use crate::shutdown::Shutdown;
use crate::sink::SinkKind;

/// Pause after a 429 that has no `Retry-After`, doubled for each 429 in a row (max 60 s).
const DEFAULT_429_PAUSE: Duration = Duration::from_secs(1);
const MAX_429_PAUSE: Duration = Duration::from_secs(60);
/// Consecutive 429s one request tolerates before it ends `failed`.
const MAX_RATE_LIMITED: u32 = 50;
/// Ceiling of one backoff sleep.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A `Retry-After` beyond this is treated as absent (SPEC "Retry-After").
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// One HTTP outcome, classified.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Done (2xx, or a sink-specific success such as Weni delete's 404).
    Success,
    /// Try again after backoff: 5xx, or a request that may not have been applied
    /// and is safe to repeat.
    Retry(String),
    /// 429: pause the whole sink, then try again.
    RateLimited(Option<Duration>),
    /// The platform refused this record (4xx other than 429): never retried.
    Reject(String),
    /// Auth refused (401/403): stop the sink.
    Fatal(String),
    /// A non-idempotent request may have been applied and got no answer.
    Unknown(String),
}

/// How a request ended after all its attempts.
#[derive(Clone, Debug, PartialEq)]
pub enum Ended {
    Success,
    Rejected(String),
    Failed(String),
    Unknown(String),
    /// Never attempted (the sink had stopped).
    Skipped(String),
    /// Auth refused: this request's rows are `rejected`, the sink stops.
    AuthRefused(String),
}

/// The result of [`Uploader::execute`].
#[derive(Clone, Debug)]
pub struct Finished {
    pub ended: Ended,
    /// Last HTTP status received, if any.
    pub http_status: Option<u16>,
    /// HTTP attempts made.
    pub attempts: u32,
    /// Body of the last answer.
    pub body: Bytes,
}

/// Counters for the summary and the rate benchmark.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub requests: AtomicU64,
    pub throttled: AtomicU64,
    pub retries: AtomicU64,
    /// When the first and the latest request left.
    window: Mutex<Option<(Instant, Instant)>>,
    /// Requests the limiter lets leave at once at the start (its burst).
    burst: u64,
}

impl UploadStats {
    fn with_burst(burst: u64) -> UploadStats {
        UploadStats {
            burst,
            ..UploadStats::default()
        }
    }

    fn record_request(&self) {
        self.record_request_at(Instant::now());
    }

    fn record_request_at(&self, now: Instant) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut w) = self.window.lock() {
            *w = Some(w.map_or((now, now), |(first, _)| (first, now)));
        }
    }

    /// Requests per second between the first and the last request, not
    /// counting the start-up burst: those left together at the first
    /// instant, and counting them made three requests at `1/s` (two at once,
    /// the third a second later) read "2.00 req/s achieved" in the README's
    /// sandbox run.
    pub fn achieved_rate(&self) -> Option<f64> {
        let (first, last) = (*self.window.lock().ok()?)?;
        let paced = self
            .requests
            .load(Ordering::Relaxed)
            .saturating_sub(self.burst.max(1));
        let secs = last.duration_since(first).as_secs_f64();
        (paced > 0 && secs > 0.0).then(|| paced as f64 / secs)
    }
}

/// The default classification of an HTTP answer (sinks may special-case before calling it).
/// Redirects are never followed: a 3xx is a refusal (the caller names the location).
pub fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Verdict {
    match status {
        200..=299 => Verdict::Success,
        300..=399 => Verdict::Reject(format!(
            "HTTP {status}: the platform redirected the request; redirects are not followed"
        )),
        429 => Verdict::RateLimited(retry_after),
        503 if retry_after.is_some() => Verdict::RateLimited(retry_after),
        401 | 403 => Verdict::Fatal(format!("auth refused: {}", error_text(status, body))),
        400..=499 => Verdict::Reject(error_text(status, body)),
        _ => Verdict::Retry(error_text(status, body)),
    }
}

/// A short, single-line reason from an error body (JSON flattened, text trimmed).
pub fn error_text(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let detail = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => {
            let mut parts = Vec::new();
            for (k, v) in map {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                parts.push(
                    if k == "detail" || k == "error" || k == "message" || k == "result" {
                        v
                    } else {
                        format!("{k}: {v}")
                    },
                );
            }
            parts.join("; ")
        }
        _ => text.to_owned(),
    };
    let mut detail = detail.replace(['\n', '\r'], " ");
    if detail.len() > 300 {
        let mut cut = 300;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push('…');
    }
    if detail.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {detail}")
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3). A value
/// that is missing, unparsable, negative or beyond an hour is `None` (the
/// caller backs off exponentially instead): a hostile `inf` or `1e300` must
/// neither panic nor pause a sink for days.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let pause = if value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().ok()?)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        // A date in the past means "now".
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
    };
    (pause <= MAX_RETRY_AFTER).then_some(pause)
}

/// A small xorshift for backoff jitter: quality does not matter, and it avoids a
/// crate for one random number per retry.
fn jitter_fraction() -> f64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// One sink's connection to its platform.
pub struct Uploader {
    pub kind: SinkKind,
    client: reqwest::Client,
    limiter: RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        governor::clock::DefaultClock,
    >,
    /// May a request that might have been applied be sent again? (CloudHumans: no.)
    idempotent: bool,
    max_retries: u32,
    timeout: Duration,
    backoff: Duration,
    /// Sink-wide pause after a 429.
    paused_until: Mutex<Option<tokio::time::Instant>>,
    consecutive_429: AtomicU32,
    /// The run's stop: pauses and backoffs end early, no request starts after it.
    shutdown: Shutdown,
    stopped: AtomicBool,
    stop_reason: Mutex<Option<String>>,
    pub stats: UploadStats,
}

impl Uploader {
    pub fn new(
        kind: SinkKind,
        common: &SinkCommon,
        idempotent: bool,
        shutdown: Shutdown,
    ) -> Result<Uploader, reqwest::Error> {
        // No redirects: a 301/302 would turn a POST into a GET, and a redirect
        // to another host would carry the token there (SPEC "Transport").
        let client = reqwest::Client::builder()
            .user_agent(concat!("crm-import/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(common.concurrency)
            .connect_timeout(common.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        // GCRA: requests leave evenly spaced at the configured rate. A burst of 2
        // (never more than `concurrency`, as SPEC allows) lets a request that
        // left late because of timer granularity be caught up, so the long-run
        // rate is the configured one instead of slightly below it.
        let period = common.rate.per / common.rate.count;
        let burst =
            NonZeroU32::new(common.concurrency.clamp(1, 2) as u32).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period.max(Duration::from_micros(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Ok(Uploader {
            kind,
            client,
            limiter: RateLimiter::direct(quota),
            idempotent,
            max_retries: common.max_retries,
            timeout: common.timeout,
            backoff: common.retry_backoff,
            paused_until: Mutex::new(None),
            consecutive_429: AtomicU32::new(0),
            shutdown,
            stopped: AtomicBool::new(false),
            stop_reason: Mutex::new(None),
            stats: UploadStats::with_burst(u64::from(burst.get())),
        })
    }

    /// Whether auth was refused: the rest of the sink's rows are `skipped`.
    pub fn stopped(&self) -> Option<String> {
        if self.stopped.load(Ordering::Relaxed) {
            self.stop_reason.lock().ok().and_then(|r| r.clone())
        } else {
            None
        }
    }

    fn stop(&self, reason: &str) {
        if let Ok(mut r) = self.stop_reason.lock()
            && r.is_none()
        {
            *r = Some(reason.to_owned());
        }
        self.stopped.store(true, Ordering::Relaxed);
    }

    fn pause_for(&self, after: Option<Duration>) {
        let n = self.consecutive_429.fetch_add(1, Ordering::Relaxed);
        let pause = after.unwrap_or_else(|| {
            (DEFAULT_429_PAUSE * 2u32.saturating_pow(n.min(6))).min(MAX_429_PAUSE)
        });
        let until = tokio::time::Instant::now() + pause;
        if let Ok(mut p) = self.paused_until.lock()
            && p.is_none_or(|current| current < until)
        {
            *p = Some(until);
        }
    }

    /// Waits out the sink-wide pause; a stop of the run cuts it short.
    async fn wait_while_paused(&self) {
        loop {
            let until = self.paused_until.lock().ok().and_then(|p| *p);
            match until {
                Some(until) if until > tokio::time::Instant::now() => {
                    let pause = until - tokio::time::Instant::now();
                    if !self.shutdown.sleep(pause).await {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Why no further attempt may start, if none may: the sink stopped (auth)
    /// or the run is stopping.
    fn no_more_attempts(&self, attempts: u32, last: Option<&str>) -> Option<Ended> {
        if let Some(reason) = self.stopped() {
            return Some(if attempts == 0 {
                Ended::Skipped(format!("{} stopped: {reason}", self.kind.name()))
            } else {
                Ended::Failed(format!(
                    "{} stopped before a retry: {reason}",
                    self.kind.name()
                ))
            });
        }
        let stop = self.shutdown.reason()?.detail();
        Some(match (attempts, last) {
            (0, _) => Ended::Skipped(stop),
            (_, Some(last)) => Ended::Failed(format!("{last}; no retry: {stop}")),
            (_, None) => Ended::Failed(format!("no retry: {stop}")),
        })
    }

    /// Sends the request built by `make` until it succeeds, is refused, or
    /// retries run out. `special` lets a sink classify an answer (status and body) itself (e.g.
    /// Weni delete's 404 is a success); it returns `None` to use [`classify`].
    pub async fn execute(
        &self,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        special: impl Fn(u16, &[u8]) -> Option<Verdict>,
    ) -> Finished {
        let mut attempts = 0u32;
        let mut retries = 0u32;
        let mut rate_limited = 0u32;
        let mut http_status = None;
        let mut body = Bytes::new();
        let mut last_reason: Option<String> = None;
        loop {
            self.wait_while_paused().await;
            if !self.shutdown.is_stopping() {
                tokio::select! {
                    _ = self.limiter.until_ready() => {}
                    _ = self.shutdown.stopped() => {}
                }
                self.wait_while_paused().await;
            }
            if let Some(ended) = self.no_more_attempts(attempts, last_reason.as_deref()) {
                return Finished {
                    ended,
                    http_status,
                    attempts,
                    body,
                };
            }
            attempts += 1;
            self.stats.record_request();
            let verdict = match make(&self.client).timeout(self.timeout).build() {
                Ok(request) => {
                    self.attempt(request, attempts, &special, &mut http_status, &mut body)
                        .await
                }
                // Built but never sent (e.g. a header that cannot be encoded): nothing left.
                Err(e) => Verdict::Reject(format!("cannot build the request: {}", root_cause(&e))),
            };
            if !matches!(verdict, Verdict::RateLimited(_)) {
                self.consecutive_429.store(0, Ordering::Relaxed);
            }
            let ended = match verdict {
                Verdict::Success => Ended::Success,
                Verdict::Reject(reason) => Ended::Rejected(reason),
                Verdict::Unknown(reason) => Ended::Unknown(reason),
                Verdict::Fatal(reason) => {
                    self.stop(&reason);
                    Ended::AuthRefused(reason)
                }
                Verdict::RateLimited(after) => {
                    self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    last_reason =
                        Some(format!("HTTP {}: rate limited", http_status.unwrap_or(429)));
                    rate_limited += 1;
                    if rate_limited > MAX_RATE_LIMITED {
                        Ended::Failed(format!(
                            "still rate limited (429) after {rate_limited} tries"
                        ))
                    } else {
                        self.pause_for(after);
                        continue;
                    }
                }
                Verdict::Retry(reason) => {
                    if retries >= self.max_retries {
                        Ended::Failed(format!("{reason} (gave up after {attempts} attempts)"))
                    } else {
                        retries += 1;
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        // Exponential backoff with full jitter (saturating: a huge
                        // `retry_backoff` must not overflow), cut short by a stop.
                        let ceiling = self
                            .backoff
                            .saturating_mul(2u32.saturating_pow(retries.min(16) - 1))
                            .min(MAX_BACKOFF);
                        self.shutdown
                            .sleep(ceiling.mul_f64(jitter_fraction()))
                            .await;
                        last_reason = Some(reason);
                        continue;
                    }
                }
            };
            return Finished {
                ended,
                http_status,
                attempts,
                body,
            };
        }
    }
}

impl Uploader {
    /// Sends one attempt and classifies its outcome; logs one line per attempt
    /// (`RUST_LOG=crm_import=debug` or `-v`): sink, method, path without its
    /// query, status, latency, attempt. Never a header or a body.
    async fn attempt(
        &self,
        request: reqwest::Request,
        attempt: u32,
        special: &impl Fn(u16, &[u8]) -> Option<Verdict>,
        http_status: &mut Option<u16>,
        body: &mut Bytes,
    ) -> Verdict {
        let method = request.method().clone();
        let path = request.url().path().to_owned();
        let started = Instant::now();
        let verdict = match self.client.execute(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                *http_status = Some(status);
                let after = retry_after(response.headers());
                let location = redirect_location(&response);
                // A failure while reading the body still leaves the status: an answer is an answer.
                *body = response.bytes().await.unwrap_or_default();
                match (special(status, body), location) {
                    (Some(verdict), _) => verdict,
                    (None, Some(location)) => Verdict::Reject(format!(
                        "HTTP {status}: redirected to {location}; redirects are not followed"
                    )),
                    (None, None) => classify(status, after, body),
                }
            }
            // Connect errors happen before the request leaves: always safe to retry.
            Err(e) if e.is_connect() => {
                Verdict::Retry(format!("cannot connect: {}", root_cause(&e)))
            }
            Err(e) => {
                let what = if e.is_timeout() {
                    format!("no answer within {:?}", self.timeout)
                } else {
                    format!("connection lost: {}", root_cause(&e))
                };
                if self.idempotent {
                    Verdict::Retry(what)
                } else {
                    Verdict::Unknown(format!(
                        "{what}; the request may have been applied, so it is not resent"
                    ))
                }
            }
        };
        tracing::debug!(
            sink = self.kind.name(),
            %method,
            path,
            status = http_status.map_or(0, |s| s),
            latency_ms = started.elapsed().as_millis() as u64,
            attempt,
            "http attempt"
        );
        verdict
    }
}

/// The `Location` of a redirect answer, without its query string (it may hold secrets).
fn redirect_location(response: &reqwest::Response) -> Option<String> {
    if !response.status().is_redirection() {
        return None;
    }
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(no Location header)");
    Some(location.split('?').next().unwrap_or("").to_owned())
}

/// The innermost error message (reqwest's own text is "error sending request").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut current = e;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's sandbox run said "2.00 req/s achieved (configured 1/s)"
    /// for Chatfuel's three requests: the limiter's burst of two left at once,
    /// the third a second later. The burst is not a rate.
    #[test]
    fn achieved_rate_of_a_short_run_does_not_count_the_start_up_burst() {
        let start = Instant::now();
        let stats = UploadStats::with_burst(2);
        stats.record_request_at(start);
        stats.record_request_at(start);
        assert_eq!(stats.achieved_rate(), None, "a burst alone has no rate");
        stats.record_request_at(start + Duration::from_secs(1));
        assert_eq!(stats.achieved_rate(), Some(1.0));
        for k in 2..=10 {
            stats.record_request_at(start + Duration::from_secs(k));
        }
        assert_eq!(stats.achieved_rate(), Some(1.0), "paced at 1/s throughout");
        // Without a burst (concurrency 1) the first request is the only one at t=0.
        let single = UploadStats::with_burst(1);
        for k in 0..=4 {
            single.record_request_at(start + Duration::from_millis(500 * k));
        }
        assert_eq!(single.achieved_rate(), Some(2.0));
    }

    #[test]
    fn classification() {
        assert_eq!(classify(201, None, b"{}"), Verdict::Success);
        assert_eq!(
            classify(429, Some(Duration::from_secs(3)), b""),
            Verdict::RateLimited(Some(Duration::from_secs(3)))
        );
        assert!(
            matches!(classify(403, None, br#"{"detail": "Invalid token"}"#), Verdict::Fatal(r) if r.contains("Invalid token"))
        );
        assert!(matches!(classify(401, None, b""), Verdict::Fatal(_)));
        assert_eq!(
            classify(400, None, br#"{"name": ["Contact name cannot be empty."]}"#),
            Verdict::Reject("HTTP 400: name: [\"Contact name cannot be empty.\"]".into())
        );
        assert!(matches!(
            classify(502, None, b"bad gateway"),
            Verdict::Retry(_)
        ));
    }

    fn headers(value: &str) -> reqwest::header::HeaderMap {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, value.parse().unwrap());
        h
    }

    /// Regression: `Retry-After: inf` or `1e300` panicked inside a sink worker
    /// (`Duration::from_secs_f64`), and the batch's rows vanished from the report.
    #[test]
    fn hostile_retry_after_values_never_panic_and_mean_backoff() {
        for hostile in [
            "inf",
            "1e300",
            "-5",
            "abc",
            "NaN",
            "3601",
            "99999999999999999999",
        ] {
            assert_eq!(retry_after(&headers(hostile)), None, "{hostile}");
        }
        assert_eq!(retry_after(&headers("7")), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO),
            "a past date means now"
        );
        let soon = std::time::SystemTime::now() + Duration::from_secs(120);
        let at = retry_after(&headers(&httpdate::fmt_http_date(soon))).unwrap();
        assert!(
            (Duration::from_secs(110)..=Duration::from_secs(121)).contains(&at),
            "{at:?}"
        );
        assert_eq!(retry_after(&reqwest::header::HeaderMap::new()), None);
    }

    #[test]
    fn redirects_are_refusals_and_503_with_retry_after_is_a_pause() {
        assert!(matches!(classify(302, None, b""), Verdict::Reject(_)));
        assert_eq!(
            classify(503, Some(Duration::from_secs(2)), b""),
            Verdict::RateLimited(Some(Duration::from_secs(2)))
        );
        assert!(matches!(classify(503, None, b""), Verdict::Retry(_)));
    }

    #[test]
    fn error_text_is_one_short_line() {
        let long = "x".repeat(1000);
        let t = error_text(500, format!("line1\n{long}").as_bytes());
        assert!(!t.contains('\n') && t.len() < 320, "{t}");
        assert_eq!(error_text(401, b""), "HTTP 401");
    }
}
