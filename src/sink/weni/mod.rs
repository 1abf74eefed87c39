//! Weni (RapidPro API v2): one upsert per contact, keyed by its URN.
//!
//! Before the first upsert, `prepare` lists the org's fields and groups
//! (following pagination) and creates the missing ones — only when a Weni row
//! will actually be sent. Each contact is then `POST contacts.json?urn=…`
//! (201 → `created`, 200 → `updated`), which is an idempotent upsert, so a
//! retry after a timeout is safe. `mode = "delete"`: `DELETE ?urn=` (204 →
//! `deleted`, 404 → `not_found`).
//!
//! Groups (`group_mode`): an upsert that carries `groups` *replaces* every
//! static membership of the contact (API.md §1.3), which would silently take
//! existing contacts out of the customer's other groups. So by default
//! (`"add"`) the upsert carries no `groups`, and [`groups`] adds the upserted
//! contacts to each configured group through `contact_actions` (§1.5b), up to
//! 100 UUIDs a request, on its own limiter (`actions_rate`, the API's separate
//! `v2` bucket). A row is recorded as delivered only once its upsert *and* its
//! group adds succeeded; both are idempotent, so a crash in between is
//! completed by the next run. `"replace"` sends `groups` in the upsert.
//!
//! A create can race another write (400 `URNs in use by other contacts`):
//! that is transient and retried like a 5xx.

mod config;
mod groups;

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::OnceCell;

pub use config::{GroupMode, RESERVED_KEYS, UrnScheme, WeniConfig, WeniMode};

use super::http::{Ended, Verdict};
use super::lane::{Lane, worker_pool};
use super::{
    Check, Delivery, GroupCounts, ParseContext, Payload, PlanCounts, Platform, RowView, Sink,
    SinkItem, SinkKind,
};
use crate::config::{ColumnUse, ConfigError};
use crate::phone::{E164, weni_digit_count_ok};
use crate::report::Status;
use crate::state::{PayloadHasher, Scope};

/// The registry entry.
pub const PLATFORM: Platform = Platform {
    name: "weni",
    parse,
};

fn parse(
    value: toml::Value,
    kind: SinkKind,
    ctx: &ParseContext<'_>,
) -> Result<Box<dyn Sink>, ConfigError> {
    Ok(Box::new(Weni {
        kind,
        config: config::parse(value, kind, ctx)?,
    }))
}

/// The Weni sink.
#[derive(Debug)]
pub struct Weni {
    kind: SinkKind,
    pub config: WeniConfig,
}

impl Sink for Weni {
    crate::sink_accessors!();

    fn column_uses(&self) -> Vec<ColumnUse> {
        let c = &self.config;
        let mut uses = Vec::new();
        if let Some(t) = &c.name {
            uses.extend(ColumnUse::of_template("sinks.weni.name", t));
        }
        if let Some(t) = &c.language {
            uses.extend(ColumnUse::of_template("sinks.weni.language", t));
        }
        for (k, t) in &c.fields {
            uses.extend(ColumnUse::of_template(&format!("sinks.weni.fields.{k}"), t));
        }
        uses
    }

    fn bind(&mut self, index_of: &dyn Fn(&str) -> usize) {
        let c = &mut self.config;
        for t in c
            .name
            .iter_mut()
            .chain(c.language.iter_mut())
            .chain(c.fields.values_mut())
        {
            t.bind(index_of);
        }
    }

    fn check(&self, row: RowView<'_>, phone: E164, hash: bool) -> Check {
        check(&self.config, row, phone, hash)
    }

    fn build(&self, row: RowView<'_>, _phone: E164, _group: u64) -> Payload {
        Payload::Json(body(&self.config, row))
    }

    /// One Weni org per `base_url` (a token belongs to one org).
    fn state_scope(&self) -> Scope {
        Scope {
            sink: "weni",
            scope: self.config.common.base_url.clone(),
            legacy: String::new(),
        }
    }

    fn plan(&self, rows: u64, _groups: &GroupCounts) -> PlanCounts {
        let c = &self.config;
        let prepare = if rows == 0 || c.mode == WeniMode::Delete {
            0
        } else {
            2 + c.fields.len() as u64 + c.groups.len() as u64
        };
        let adds = (self.adds_groups() && rows > 0).then(|| super::SecondaryPlan {
            what: "contact_actions",
            requests: rows.div_ceil(groups::BATCH as u64) * c.groups.len() as u64,
            rate: c.actions_rate,
        });
        PlanCounts {
            requests: rows,
            prepare_requests: prepare,
            note: if prepare > 0 {
                format!(" + up to {prepare} to prepare fields and groups")
            } else {
                String::new()
            },
            secondary: adds,
        }
    }

    fn deliver(self: Arc<Self>, lane: Arc<Lane>) -> Delivery {
        Box::pin(run(self, lane))
    }
}

impl Weni {
    /// Whether upserted contacts are then added to groups through `contact_actions`.
    fn adds_groups(&self) -> bool {
        let c = &self.config;
        c.mode == WeniMode::Upsert && c.group_mode == GroupMode::Add && !c.groups.is_empty()
    }
}

/// The URN of a number in the configured scheme (API.md §1.3.1).
pub fn urn(scheme: UrnScheme, phone: E164) -> String {
    let mut out = String::with_capacity(24);
    write_urn(scheme, phone, &mut out);
    out
}

/// Appends the URN of `phone` to `out` (the allocation-free form of [`urn`]).
fn write_urn(scheme: UrnScheme, phone: E164, out: &mut String) {
    match scheme {
        UrnScheme::Whatsapp => {
            out.push_str("whatsapp:");
            out.push_str(itoa::Buffer::new().format(phone.0));
        }
        UrnScheme::Tel => {
            out.push_str("tel:");
            phone.write_to(out);
        }
    }
}

/// Weni's own rules that libphonenumber does not know: 8–15 digits, name ≤ 100
/// characters, a 3-letter language code.
fn check(config: &WeniConfig, row: RowView<'_>, phone: E164, with_hash: bool) -> Check {
    if !weni_digit_count_ok(phone) {
        return Check::Rejected(
            format!(
                "Weni needs 8 to 15 digits; {phone} has {}",
                phone.digit_count()
            )
            .into(),
        );
    }
    let mut hash = PayloadHasher::default();
    let rejected = crate::template::with_scratch(|buf| {
        // Same bytes as `urn()`, written into the scratch buffer: this runs per row.
        if with_hash {
            buf.clear();
            write_urn(config.urn_scheme, phone, buf);
            hash.add(buf.as_bytes());
        }
        if config.mode == WeniMode::Delete {
            hash.add(b"delete");
            return None;
        }
        hash.add(b"name");
        match config
            .name
            .as_ref()
            .and_then(|t| t.render_ref(|i| row.cell(i), buf))
        {
            Some(name) => {
                // Byte length first: ≤ 100 bytes is ≤ 100 characters, without counting them.
                if name.len() > 100 && name.chars().count() > 100 {
                    return Some(Check::Rejected(
                        "Contact name cannot exceed 100 characters.".into(),
                    ));
                }
                hash.add(name.as_bytes());
            }
            None => {
                hash.add(b"\0");
            }
        }
        hash.add(b"language");
        match config
            .language
            .as_ref()
            .and_then(|t| t.render_ref(|i| row.cell(i), buf))
        {
            Some(language) => {
                if !(language.len() == 3 && language.bytes().all(|b| b.is_ascii_lowercase())) {
                    return Some(Check::Rejected(
                        format!("Not a valid ISO639-3 language code: \"{language}\".").into(),
                    ));
                }
                hash.add(language.as_bytes());
            }
            None => {
                hash.add(b"\0");
            }
        }
        if !with_hash {
            return None;
        }
        // The payload hash covers everything the upsert body carries.
        for group in &config.groups {
            hash.add(b"group").add(group.as_bytes());
        }
        for (key, t) in &config.fields {
            if let Some(value) = t.render_ref(|i| row.cell(i), buf) {
                hash.add(key.as_bytes()).add(value.as_bytes());
            }
        }
        None
    });
    if let Some(rejected) = rejected {
        return rejected;
    }
    Check::Ready {
        group: 0,
        hash: if with_hash { hash.finish() } else { 0 },
    }
}

/// The upsert body: keys whose placeholders render empty are left out, so an
/// empty cell never clears data in Weni. `Null` in delete mode.
pub fn body(config: &WeniConfig, row: RowView<'_>) -> Value {
    if config.mode == WeniMode::Delete {
        return Value::Null;
    }
    let mut body = Map::new();
    if let Some(name) = config.name.as_ref().and_then(|t| t.render(|i| row.cell(i))) {
        body.insert("name".into(), name.into());
    }
    if let Some(language) = config
        .language
        .as_ref()
        .and_then(|t| t.render(|i| row.cell(i)))
    {
        body.insert("language".into(), language.into());
    }
    if config.group_mode == GroupMode::Replace && !config.groups.is_empty() {
        body.insert("groups".into(), json!(config.groups));
    }
    let fields: Map<String, Value> = config
        .fields
        .iter()
        .filter_map(|(key, t)| {
            t.render(|i| row.cell(i))
                .map(|v| (key.clone(), Value::from(v)))
        })
        .collect();
    if !fields.is_empty() {
        body.insert("fields".into(), Value::Object(fields));
    }
    Value::Object(body)
}

/// Why the sink could not prepare.
#[derive(Clone, Debug)]
struct PrepareFailed {
    reason: String,
}

/// Sends every contact, after preparing fields and groups once.
async fn run(sink: Arc<Weni>, lane: Arc<Lane>) {
    let prepared: Arc<OnceCell<Result<(), PrepareFailed>>> = Arc::new(OnceCell::new());
    let needs_prepare = sink.config.mode == WeniMode::Upsert;
    let concurrency = sink.config.common.concurrency;
    let rx = lane.receiver(concurrency * 2);
    let (adds, adder) = match sink.adds_groups() {
        true => {
            let (tx, rx) = tokio::sync::mpsc::channel(groups::BATCH * 2);
            let adder = groups::Adder::new(&sink.config, &lane);
            (Some(tx), Some(tokio::spawn(adder.run(rx))))
        }
        false => (None, None),
    };
    worker_pool(concurrency, rx, move |item: SinkItem| {
        let (sink, lane, prepared) = (sink.clone(), lane.clone(), prepared.clone());
        let adds = adds.clone();
        async move {
            if lane.shutdown.is_stopping() {
                lane.report_not_sent(vec![item.meta]);
                return;
            }
            if needs_prepare {
                let ready = prepared.get_or_init(|| prepare(&sink, &lane)).await;
                if let Err(failed) = ready {
                    lane.report(vec![item.meta], Status::Skipped, None, &failed.reason);
                    return;
                }
            }
            send(&sink, &lane, item, adds.as_ref()).await;
        }
    })
    .await;
    if let Some(adder) = adder {
        // The workers' senders are gone with the pool: the adder flushes and ends.
        if let Err(e) = adder.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

fn auth(lane: &Lane) -> reqwest::header::HeaderValue {
    lane.secret(&format!("Token {}", lane.token))
}

/// GETs every page of `endpoint` and returns the values of `key` in its results.
async fn list_all(
    lane: &Lane,
    base: &str,
    endpoint: &str,
    key: &str,
) -> Result<Vec<String>, PrepareFailed> {
    let mut url = format!("{base}/api/v2/{endpoint}");
    let mut values = Vec::new();
    loop {
        let finished = lane
            .uploader
            .execute(
                |client| client.get(&url).header("authorization", auth(lane)),
                |_, _| None,
            )
            .await;
        if finished.ended != Ended::Success {
            return Err(PrepareFailed {
                reason: format!(
                    "Weni preparation failed listing {endpoint}: {}",
                    describe(&finished.ended)
                ),
            });
        }
        let page: Value = serde_json::from_slice(&finished.body).map_err(|e| PrepareFailed {
            reason: format!(
                "Weni preparation: {endpoint} answered something that is not JSON: {e}"
            ),
        })?;
        for item in page["results"].as_array().into_iter().flatten() {
            if let Some(v) = item[key].as_str() {
                values.push(v.to_owned());
            }
        }
        match page["next"].as_str() {
            // The token goes only to the sink's own origin (SPEC "Transport").
            Some(next) if !next.is_empty() && !same_origin(next, base) => {
                return Err(PrepareFailed {
                    reason: format!(
                        "Weni preparation: the {endpoint} page links to another origin ({}); the token is not sent there",
                        next.split('?').next().unwrap_or("")
                    ),
                });
            }
            Some(next) if !next.is_empty() => url = next.to_owned(),
            _ => return Ok(values),
        }
    }
}

/// Whether `url` has the scheme, host and port of `base`.
fn same_origin(url: &str, base: &str) -> bool {
    let origin = |u: &str| {
        reqwest::Url::parse(u).ok().map(|u| {
            (
                u.scheme().to_owned(),
                u.host_str().map(str::to_owned),
                u.port_or_known_default(),
            )
        })
    };
    origin(url).is_some() && origin(url) == origin(base)
}

/// The reason text of an ending.
fn describe(ended: &Ended) -> String {
    match ended {
        Ended::Success => "ok".into(),
        Ended::Rejected(r)
        | Ended::Failed(r)
        | Ended::Unknown(r)
        | Ended::Skipped(r)
        | Ended::AuthRefused(r) => r.clone(),
    }
}

/// Creates one field or group; "must be unique" means it exists already (a replay or a race).
async fn create(lane: &Lane, url: &str, body: Value, what: &str) -> Result<(), PrepareFailed> {
    let finished = lane
        .uploader
        .execute(
            |client| {
                client
                    .post(url)
                    .header("authorization", auth(lane))
                    .json(&body)
            },
            |_, _| None,
        )
        .await;
    let text = String::from_utf8_lossy(&finished.body);
    match &finished.ended {
        Ended::Success => Ok(()),
        Ended::Rejected(_) if text.contains("must be unique") => Ok(()),
        other => Err(PrepareFailed {
            reason: format!(
                "Weni preparation failed creating {what}: {}",
                describe(other)
            ),
        }),
    }
}

/// Lists fields and groups and creates the missing ones (API.md §1.4–1.5).
async fn prepare(sink: &Weni, lane: &Lane) -> Result<(), PrepareFailed> {
    let config = &sink.config;
    let base = &config.common.base_url;
    if !config.fields.is_empty() {
        let existing: HashSet<String> = list_all(lane, base, "fields.json", "key")
            .await?
            .into_iter()
            .collect();
        for key in config.fields.keys().filter(|k| !existing.contains(*k)) {
            let value_type = config
                .field_types
                .get(key)
                .map(String::as_str)
                .unwrap_or("text");
            let body = json!({"label": key, "value_type": value_type});
            create(
                lane,
                &format!("{base}/api/v2/fields.json"),
                body,
                &format!("field \"{key}\""),
            )
            .await?;
        }
    }
    if !config.groups.is_empty() {
        let existing: HashSet<String> = list_all(lane, base, "groups.json", "name")
            .await?
            .into_iter()
            .map(|n| n.to_lowercase())
            .collect();
        for group in config
            .groups
            .iter()
            .filter(|g| !existing.contains(&g.to_lowercase()))
        {
            let body = json!({"name": group});
            create(
                lane,
                &format!("{base}/api/v2/groups.json"),
                body,
                &format!("group \"{group}\""),
            )
            .await?;
        }
    }
    Ok(())
}

/// 400 `URNs in use by other contacts`: a create lost a race with another
/// write (API.md §1.3); transient, so retried like a 5xx.
fn urn_race(status: u16, body: &[u8]) -> Option<Verdict> {
    let text = String::from_utf8_lossy(body);
    (status == 400 && text.contains("URNs in use by other contacts"))
        .then(|| Verdict::Retry(super::http::error_text(status, body)))
}

async fn send(
    sink: &Weni,
    lane: &Lane,
    item: SinkItem,
    adds: Option<&tokio::sync::mpsc::Sender<groups::Upserted>>,
) {
    let config = &sink.config;
    let url = format!("{}/api/v2/contacts.json", config.common.base_url);
    let urn = urn(config.urn_scheme, item.meta.phone);
    let query = [("urn", urn.as_str())];
    let Payload::Json(body) = &item.payload else {
        return;
    };
    let finished = match config.mode {
        WeniMode::Upsert => {
            lane.uploader
                .execute(
                    |client| {
                        client
                            .post(&url)
                            .query(&query)
                            .header("authorization", auth(lane))
                            .json(body)
                    },
                    urn_race,
                )
                .await
        }
        WeniMode::Delete => {
            lane.uploader
                .execute(
                    |client| {
                        client
                            .delete(&url)
                            .query(&query)
                            .header("authorization", auth(lane))
                    },
                    // A missing contact is an answer, not an error: `not_found`.
                    |status, _| (status == 404).then_some(Verdict::Success),
                )
                .await
        }
    };
    let success = match (config.mode, finished.http_status) {
        (WeniMode::Upsert, Some(201)) => Status::Created,
        (WeniMode::Upsert, _) => Status::Updated,
        (WeniMode::Delete, Some(404)) => Status::NotFound,
        (WeniMode::Delete, _) => Status::Deleted,
    };
    if let (Some(adds), Ended::Success) = (adds, &finished.ended) {
        // Reported (and recorded) once its group adds are done.
        let uuid = serde_json::from_slice::<Value>(&finished.body)
            .ok()
            .and_then(|v| v["uuid"].as_str().map(str::to_owned));
        let upserted = groups::Upserted {
            meta: item.meta,
            status: success,
            finished,
            uuid,
        };
        if let Err(lost) = adds.send(upserted).await {
            let lost = lost.0;
            lane.report(
                vec![lost.meta],
                Status::Failed,
                Some(&lost.finished),
                "upserted, but the group adder stopped",
            );
        }
        return;
    }
    lane.report_finished(vec![item.meta], &finished, success);
}
