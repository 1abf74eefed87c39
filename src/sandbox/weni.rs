//! Weni (RapidPro API v2) fake: `contacts.json`, `fields.json`, `groups.json`
//! (API.md §1, §5).
//!
//! Enforces: `Authorization: Token <key>` (403 with DRF's detail, never 401);
//! single-object bodies; contact name/language/groups/fields rules; URN rules
//! (bare phone → `whatsapp:` digits; `whatsapp:` digits only, 8–15; `tel:` →
//! `+E.164`); global URN uniqueness among active contacts; `?urn=` upsert
//! (201 then 200, `urns` forbidden in the body), `?uuid=` update (404 on miss);
//! groups replaced and fields merged on update; soft delete freeing the URN;
//! field label rules and key derivation with reserved keys; group name rules;
//! 250-item caps; cursor pagination with `next` URLs; a per-(token, scope)
//! sliding-window throttle (`v2.contacts` and `v2` separately) answered 429
//! with `Retry-After` and DRF's text; the optional `verify_ninth_digit` lookup;
//! `contact_actions.json` (§1.5b: 1–100 UUIDs or URNs, all-or-nothing
//! validation naming the first bad item, non-active contacts refused for
//! `add`, other memberships untouched, 204, the `v2` bucket); contacts seeded
//! before the run (blocked ones, existing memberships); injected
//! `URNs in use by other contacts` races on create.

// Validation helpers return the ready HTTP error response as `Err`; it is the
// early-return path of a fake server, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, Method, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{ConnKill, Fake, SandboxLog, SandboxOptions, Shared, SlidingWindow};

/// Per-org caps (`ORG_LIMIT_DEFAULTS`).
const MAX_FIELDS: usize = 250;
const MAX_GROUPS: usize = 250;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeniContact {
    pub uuid: String,
    pub name: Option<String>,
    pub language: Option<String>,
    pub urns: Vec<String>,
    /// Group names.
    pub groups: Vec<String>,
    pub fields: BTreeMap<String, String>,
    pub active: bool,
    /// Blocked (or stopped): refused by `contact_actions` `add`.
    #[serde(default)]
    pub blocked: bool,
    pub created_on: String,
    pub modified_on: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeniField {
    pub key: String,
    pub label: String,
    pub value_type: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeniGroup {
    pub uuid: String,
    pub name: String,
}

/// One contact write the fake answered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeniWrite {
    pub method: String,
    /// The `?urn=` or `?uuid=` lookup, as decoded.
    pub lookup: String,
    pub status: u16,
    pub at_ms: u64,
    /// Whether the body carried `groups` (which replaces every static membership).
    #[serde(default)]
    pub groups_in_body: bool,
}

/// One `contact_actions.json` request the fake answered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeniAction {
    pub action: String,
    pub group: Option<String>,
    pub contacts: Vec<String>,
    pub status: u16,
    pub at_ms: u64,
}

/// A contact that exists before the run (`SandboxOptions::weni_seed`).
#[derive(Clone, Debug, Default)]
pub struct SeedContact {
    /// Its URN, e.g. `whatsapp:5511960000000`.
    pub urn: String,
    /// Static groups it is in (created when missing).
    pub groups: Vec<String>,
    pub blocked: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WeniLog {
    pub contacts: Vec<WeniContact>,
    pub fields: Vec<WeniField>,
    pub groups: Vec<WeniGroup>,
    pub writes: Vec<WeniWrite>,
    #[serde(default)]
    pub actions: Vec<WeniAction>,
}

pub(crate) struct WeniState {
    throttle: Option<SlidingWindow>,
    page_size: usize,
    verify_ninth_digit: bool,
    contacts: Vec<WeniContact>,
    /// Last-modified order (sequence numbers), parallel to `contacts`.
    modified_seq: Vec<u64>,
    seq: u64,
    /// Active URN → index in `contacts`.
    by_urn: HashMap<String, usize>,
    /// UUID → index in `contacts` (a scan per reference made a 775k-contact
    /// `contact_actions` run quadratic: hours instead of minutes).
    by_uuid: HashMap<String, usize>,
    fields: Vec<WeniField>,
    groups: Vec<WeniGroup>,
    writes: Vec<WeniWrite>,
    actions: Vec<WeniAction>,
    /// Creates still to lose a race (`SandboxOptions::weni_urn_races`).
    races_left: u64,
    /// Origin of the `next` links, when not this server's (`SandboxOptions::weni_next_origin`).
    next_origin: Option<String>,
}

impl WeniState {
    pub(crate) fn new(options: &SandboxOptions) -> WeniState {
        let mut state = WeniState::empty(options);
        for seed in &options.weni_seed {
            state.seed(seed);
        }
        state
    }

    fn seed(&mut self, seed: &SeedContact) {
        for name in &seed.groups {
            if !self.groups.iter().any(|g| &g.name == name) {
                let uuid = super::uuid(self.groups.len() as u64 + 1, 0x6A0B);
                self.groups.push(WeniGroup {
                    uuid,
                    name: name.clone(),
                });
            }
        }
        let urn = normalize_urn(&seed.urn).unwrap_or_else(|_| seed.urn.clone());
        let index = create(self, vec![urn]);
        self.contacts[index].groups = seed.groups.clone();
        self.contacts[index].blocked = seed.blocked;
    }

    fn empty(options: &SandboxOptions) -> WeniState {
        WeniState {
            actions: Vec::new(),
            races_left: options.weni_urn_races,
            next_origin: options.weni_next_origin.clone(),
            throttle: options.platform(NAME).rate.map(SlidingWindow::new),
            page_size: options.page_size.max(1),
            verify_ninth_digit: options.weni_verify_ninth_digit,
            contacts: Vec::new(),
            modified_seq: Vec::new(),
            seq: 0,
            by_urn: HashMap::new(),
            by_uuid: HashMap::new(),
            fields: Vec::new(),
            groups: Vec::new(),
            writes: Vec::new(),
        }
    }

    pub(crate) fn log(&self) -> WeniLog {
        WeniLog {
            contacts: self.contacts.clone(),
            fields: self.fields.clone(),
            groups: self.groups.clone(),
            writes: self.writes.clone(),
            actions: self.actions.clone(),
        }
    }

    fn contact_json(&self, c: &WeniContact) -> Value {
        let groups: Vec<Value> = c
            .groups
            .iter()
            .filter_map(|name| self.groups.iter().find(|g| &g.name == name))
            .map(|g| json!({"uuid": g.uuid, "name": g.name}))
            .collect();
        let fields: Map<String, Value> = self
            .fields
            .iter()
            .map(|f| {
                (
                    f.key.clone(),
                    c.fields
                        .get(&f.key)
                        .map(|v| Value::from(v.as_str()))
                        .unwrap_or(Value::Null),
                )
            })
            .collect();
        json!({
            "uuid": c.uuid, "name": c.name, "language": c.language, "urns": c.urns,
            "groups": groups, "fields": fields, "blocked": c.blocked, "stopped": false,
            "created_on": c.created_on, "modified_on": c.modified_on, "last_seen_on": null,
        })
    }

    fn touch(&mut self, index: usize) {
        self.seq += 1;
        self.modified_seq[index] = self.seq;
        self.contacts[index].modified_on = super::now_iso8601();
    }
}

impl super::FakeState for WeniState {
    fn new(options: &SandboxOptions) -> Self {
        WeniState::new(options)
    }

    fn log_json(&self) -> serde_json::Value {
        serde_json::to_value(self.log()).unwrap_or_default()
    }
}

/// This fake's name (the platform's).
const NAME: &str = "weni";

/// The sandbox's registry entry.
pub(crate) const FAKE: Fake = Fake {
    name: NAME,
    state: super::boxed_state::<WeniState>,
    routes,
    log: super::state_log::<WeniState>,
    summary,
    server_error,
};

impl SandboxLog {
    /// What the Weni fake received and applied.
    pub fn weni(&self) -> WeniLog {
        self.platform(NAME)
    }
}

fn summary(log: &SandboxLog) -> String {
    let log = log.weni();
    format!(
        "weni {} contact(s), {} field(s), {} group(s), {} group add(s)",
        log.contacts.len(),
        log.fields.len(),
        log.groups.len(),
        log.actions.len()
    )
}

/// Weni's own 500.
fn server_error() -> Response<Body> {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [("content-type", "text/plain")],
        "Server Error. Site administrators have been notified.",
    )
        .into_response()
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/v2/contacts.json", any(contacts))
        .route("/api/v2/fields.json", any(fields))
        .route("/api/v2/groups.json", any(groups))
        .route("/api/v2/contact_actions.json", any(contact_actions))
}

fn detail(status: StatusCode, message: &str) -> Response<Body> {
    super::json(status, json!({"detail": message}))
}

fn errors(map: Map<String, Value>) -> Response<Body> {
    super::json(StatusCode::BAD_REQUEST, Value::Object(map))
}

fn one_error(key: &str, message: impl Into<String>) -> Response<Body> {
    let mut map = Map::new();
    map.insert(key.to_owned(), json!([message.into()]));
    errors(map)
}

/// Auth, then the scope's throttle. `Err` is the response to send.
fn gate(shared: &Shared, headers: &HeaderMap, scope: &str) -> Result<(), Response<Body>> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    let token = match auth {
        None => {
            return Err(detail(
                StatusCode::FORBIDDEN,
                "Authentication credentials were not provided.",
            ));
        }
        Some(a) => a.strip_prefix("Token ").unwrap_or(""),
    };
    if token != shared.options.token {
        return Err(detail(StatusCode::FORBIDDEN, "Invalid token"));
    }
    let wait = shared.state::<WeniState>().lock().ok().and_then(|mut s| {
        s.throttle
            .as_mut()
            .and_then(|t| t.check(&format!("{token}:{scope}")).err())
    });
    if let Some(wait) = wait {
        shared.throttled(NAME);
        let mut response = detail(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("Request was throttled. Expected available in {wait} seconds."),
        );
        if let Ok(v) = wait.to_string().parse() {
            response.headers_mut().insert("retry-after", v);
        }
        return Err(response);
    }
    Ok(())
}

fn not_allowed(method: &Method) -> Response<Body> {
    detail(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("Method \"{method}\" not allowed."),
    )
}

/// A write's parsed body and the locked state.
type Write<'a> = (Map<String, Value>, std::sync::MutexGuard<'a, WeniState>);

/// A write's body (one JSON object) and the locked state, or the error response.
fn body_and_state<'a>(shared: &'a Shared, body: &[u8]) -> Result<Write<'a>, Response<Body>> {
    let body = object_body(body)?;
    let state = shared
        .state::<WeniState>()
        .lock()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())?;
    Ok((body, state))
}

/// Parses a write body: must be one JSON object.
fn object_body(body: &[u8]) -> Result<Map<String, Value>, Response<Body>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(one_error(
            "non_field_errors",
            "Request body should be a single JSON object",
        )),
    }
}

/// The `next` URL of a cursor page.
fn page(
    origin: &str,
    path: &str,
    query: &HashMap<String, String>,
    items: Vec<Value>,
    size: usize,
) -> Value {
    let offset: usize = query
        .get("cursor")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let end = (offset + size).min(items.len());
    let next = (end < items.len()).then(|| {
        let mut params: Vec<String> = query
            .iter()
            .filter(|(k, _)| *k != "cursor")
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect();
        params.push(format!("cursor={end}"));
        format!("{origin}{path}?{}", params.join("&"))
    });
    let results: Vec<Value> = items.into_iter().skip(offset).take(size).collect();
    json!({"next": next, "previous": null, "results": results})
}

/// Percent-encodes a query value (everything but unreserved characters).
fn urlencode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned()
}

/// API.md §1.3.1: validates and normalizes one URN.
pub fn normalize_urn(raw: &str) -> Result<String, String> {
    let invalid = || format!("Invalid URN: {raw}. Ensure phone numbers contain country codes.");
    let raw = raw.trim();
    let phone_digits = |path: &str| -> Result<String, String> {
        let digits: String = path.chars().filter(|c| c.is_ascii_digit()).collect();
        if digits.len() < 8 {
            Err("Phone number must have at least 8 digits.".into())
        } else if digits.len() > 15 {
            Err("Phone number cannot exceed 15 digits.".into())
        } else {
            Ok(digits)
        }
    };
    match raw.split_once(':') {
        Some(("whatsapp", path)) => {
            let path = path.trim();
            if path.is_empty() || !path.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            Ok(format!("whatsapp:{}", phone_digits(path)?))
        }
        Some(("tel", path)) => {
            let international = path.trim_start().starts_with('+');
            let digits = phone_digits(path)?;
            if !international && (digits.len() < 11 || digits.starts_with('0')) {
                // Would need the org's country: the fake's org has none.
                return Err(invalid());
            }
            Ok(format!("tel:+{digits}"))
        }
        Some(("mailto", path)) if path.contains('@') => {
            Ok(format!("mailto:{}", path.to_lowercase()))
        }
        Some(("ext", path)) if !path.is_empty() => Ok(raw.to_owned()),
        Some(_) => Err(invalid()),
        None => {
            let bare = raw.strip_prefix('+').unwrap_or(raw);
            if !bare.is_empty() && bare.bytes().all(|b| b.is_ascii_digit()) {
                Ok(format!("whatsapp:{}", phone_digits(bare)?))
            } else {
                Err(invalid())
            }
        }
    }
}

/// Weni's Brazilian 9th-digit variant of a `whatsapp:55…` URN (API.md §1.3).
fn ninth_digit_variant(urn: &str) -> Option<String> {
    let path = urn.strip_prefix("whatsapp:55")?;
    match path.len() {
        11 if path.as_bytes()[2] == b'9' => {
            Some(format!("whatsapp:55{}{}", &path[..2], &path[3..]))
        }
        10 => Some(format!("whatsapp:55{}9{}", &path[..2], &path[2..])),
        _ => None,
    }
}

async fn contacts(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnKill>,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    serve(&shared, &kill, &headers, "v2.contacts", || match method {
        Method::GET => list_contacts(&shared, &headers, &query),
        Method::POST => write_contact(&shared, &query, &body),
        Method::DELETE => delete_contact(&shared, &query),
        _ => not_allowed(&method),
    })
    .await
}

/// Every Weni endpoint: injected faults, auth, the scope's throttle, the
/// handler, then the post-effect faults.
async fn serve(
    shared: &Shared,
    kill: &ConnKill,
    headers: &HeaderMap,
    scope: &str,
    handle: impl FnOnce() -> Response<Body>,
) -> Response<Body> {
    if let Some(response) = shared.before(NAME, kill).await {
        return response;
    }
    if let Err(response) = gate(shared, headers, scope) {
        return response;
    }
    let response = handle();
    shared.after(NAME, kill, response).await
}

/// A GET list: `items` built from the state, one cursor page of them.
fn list(
    shared: &Shared,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    path: &str,
    items: impl FnOnce(&WeniState) -> Vec<Value>,
) -> Response<Body> {
    let Ok(state) = shared.state::<WeniState>().lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let items = items(&state);
    super::json(
        StatusCode::OK,
        page(
            &state
                .next_origin
                .clone()
                .unwrap_or_else(|| format!("http://{}", host(headers))),
            path,
            query,
            items,
            state.page_size,
        ),
    )
}

fn list_contacts(
    shared: &Shared,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Response<Body> {
    list(shared, headers, query, "/api/v2/contacts.json", |state| {
        let mut order: Vec<usize> = (0..state.contacts.len())
            .filter(|&i| state.contacts[i].active)
            .collect();
        if let Some(urn) = query.get("urn") {
            let urn = normalize_urn(urn).unwrap_or_default();
            order.retain(|&i| state.contacts[i].urns.contains(&urn));
        }
        if let Some(uuid) = query.get("uuid") {
            order.retain(|&i| &state.contacts[i].uuid == uuid);
        }
        order.sort_by_key(|&i| std::cmp::Reverse(state.modified_seq[i]));
        order
            .iter()
            .map(|&i| state.contact_json(&state.contacts[i]))
            .collect()
    })
}

fn write_contact(shared: &Shared, query: &HashMap<String, String>, body: &[u8]) -> Response<Body> {
    let at_ms = shared.now_ms();
    let Ok(mut state) = shared.state::<WeniState>().lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let lookups: Vec<&str> = ["name", "urn", "uuid"]
        .into_iter()
        .filter(|k| query.contains_key(*k))
        .collect();
    if lookups.len() > 1 {
        return detail(
            StatusCode::BAD_REQUEST,
            "URL can only contain one of the following parameters: name, urn, uuid",
        );
    }
    let body = match object_body(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let lookup_text = query
        .get("urn")
        .or(query.get("uuid"))
        .cloned()
        .unwrap_or_default();
    let groups_in_body = body.contains_key("groups");
    let response = upsert(&mut state, query, body);
    let status = response.status().as_u16();
    state.writes.push(WeniWrite {
        method: "POST".into(),
        lookup: lookup_text,
        status,
        at_ms,
        groups_in_body,
    });
    response
}

/// Validated body of a contact write.
struct ContactWrite {
    name: Option<Option<String>>,
    language: Option<Option<String>>,
    urns: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    fields: Option<Vec<(String, Option<String>)>>,
}

fn validate(
    state: &WeniState,
    body: &Map<String, Value>,
    urn_in_url: bool,
) -> Result<ContactWrite, Response<Body>> {
    let mut errs = Map::new();
    let mut add = |k: &str, v: Value| {
        errs.insert(k.to_owned(), v);
    };
    let name = match body.get("name") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) => {
            let t = s.trim();
            if t.is_empty() {
                add("name", json!(["Contact name cannot be empty."]));
            } else if t.chars().count() > 100 {
                add(
                    "name",
                    json!(["Contact name cannot exceed 100 characters."]),
                );
            }
            Some(Some(t.to_owned()))
        }
        Some(_) => {
            add("name", json!(["Not a valid string."]));
            None
        }
    };
    let language = match body.get("language") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) if s.len() == 3 && s.bytes().all(|b| b.is_ascii_lowercase()) => {
            Some(Some(s.clone()))
        }
        Some(_) => {
            add("language", json!(["Not a valid ISO639-3 language code."]));
            None
        }
    };
    let urns = match body.get("urns") {
        None => None,
        Some(_) if urn_in_url => {
            add("urns", json!(["Field not allowed when using URN in URL"]));
            None
        }
        Some(Value::Array(items)) if items.len() <= 100 => {
            let mut out = Vec::new();
            let mut item_errors = Map::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str().map(normalize_urn) {
                    Some(Ok(u)) => out.push(u),
                    Some(Err(e)) => {
                        item_errors.insert(i.to_string(), json!([e]));
                    }
                    None => {
                        item_errors.insert(i.to_string(), json!(["Not a valid string."]));
                    }
                }
            }
            if !item_errors.is_empty() {
                add("urns", Value::Object(item_errors));
            }
            Some(out)
        }
        Some(_) => {
            add(
                "urns",
                json!(["This field can only contain up to 100 items."]),
            );
            None
        }
    };
    let groups = match body.get("groups") {
        None => None,
        Some(Value::Array(items)) if items.len() <= 100 => {
            let mut out = Vec::new();
            for item in items {
                let reference = match item {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => {
                        add("groups", json!(["Must be a string or integer"]));
                        continue;
                    }
                };
                match state.groups.iter().find(|g| {
                    g.uuid == reference || g.name.to_lowercase() == reference.to_lowercase()
                }) {
                    Some(g) => out.push(g.name.clone()),
                    None => add("groups", json!([format!("No such object: {reference}")])),
                }
            }
            Some(out)
        }
        Some(_) => {
            add(
                "groups",
                json!(["This field can only contain up to 100 items."]),
            );
            None
        }
    };
    let fields = match body.get("fields") {
        None => None,
        Some(Value::Object(map)) if map.len() <= 100 => {
            let mut out = Vec::new();
            let mut per_key = Map::new();
            for (key, value) in map {
                if !state.fields.iter().any(|f| &f.key == key) {
                    add(
                        "fields",
                        json!([format!("Invalid contact field key: {key}")]),
                    );
                    continue;
                }
                match value {
                    Value::String(s) if s.is_empty() => out.push((key.clone(), None)),
                    Value::String(s) => {
                        out.push((key.clone(), Some(s.chars().take(640).collect())))
                    }
                    Value::Number(n) => out.push((key.clone(), Some(n.to_string()))),
                    Value::Null => out.push((key.clone(), None)),
                    _ => {
                        per_key.insert(key.clone(), json!(["Not a valid string."]));
                    }
                }
            }
            if !per_key.is_empty() {
                add("fields", Value::Object(per_key));
            }
            Some(out)
        }
        Some(_) => {
            add(
                "fields",
                json!(["This field can only contain up to 100 items."]),
            );
            None
        }
    };
    if !errs.is_empty() {
        return Err(errors(errs));
    }
    Ok(ContactWrite {
        name,
        language,
        urns,
        groups,
        fields,
    })
}

fn apply_write(state: &mut WeniState, index: usize, write: ContactWrite) {
    let contact = &mut state.contacts[index];
    if let Some(name) = write.name {
        contact.name = name;
    }
    if let Some(language) = write.language {
        contact.language = language;
    }
    if let Some(groups) = write.groups {
        contact.groups = groups;
    }
    if let Some(fields) = write.fields {
        for (k, v) in fields {
            match v {
                Some(v) => {
                    contact.fields.insert(k, v);
                }
                None => {
                    contact.fields.remove(&k);
                }
            }
        }
    }
    if let Some(urns) = write.urns {
        // Update replaces the URN list; URNs owned by others are moved here.
        for old in &state.contacts[index].urns.clone() {
            state.by_urn.remove(old);
        }
        for urn in &urns {
            if let Some(&other) = state.by_urn.get(urn) {
                state.contacts[other].urns.retain(|u| u != urn);
            }
            state.by_urn.insert(urn.clone(), index);
        }
        state.contacts[index].urns = urns;
    }
    state.touch(index);
}

fn create(state: &mut WeniState, urns: Vec<String>) -> usize {
    let index = state.contacts.len();
    let now = super::now_iso8601();
    let uuid = super::uuid(index as u64 + 1, 0x3E41);
    state.by_uuid.insert(uuid.clone(), index);
    state.contacts.push(WeniContact {
        uuid,
        name: None,
        language: None,
        urns: urns.clone(),
        groups: Vec::new(),
        fields: BTreeMap::new(),
        active: true,
        blocked: false,
        created_on: now.clone(),
        modified_on: now,
    });
    state.modified_seq.push(0);
    for urn in urns {
        state.by_urn.insert(urn, index);
    }
    index
}

fn upsert(
    state: &mut WeniState,
    query: &HashMap<String, String>,
    body: Map<String, Value>,
) -> Response<Body> {
    if let Some(raw_urn) = query.get("urn") {
        let urn = match normalize_urn(raw_urn) {
            Ok(u) => u,
            Err(e) => return one_error("urn", e),
        };
        let write = match validate(state, &body, true) {
            Ok(w) => w,
            Err(r) => return r,
        };
        let found = state.by_urn.get(&urn).copied().or_else(|| {
            state
                .verify_ninth_digit
                .then(|| ninth_digit_variant(&urn))
                .flatten()
                .and_then(|v| state.by_urn.get(&v).copied())
        });
        if found.is_none() && state.races_left > 0 {
            // Mailroom's insert lost a race with another write (API.md §1.3).
            state.races_left -= 1;
            return super::json(
                StatusCode::BAD_REQUEST,
                json!({"error": "URNs in use by other contacts"}),
            );
        }
        let (index, status) = match found {
            Some(i) => (i, StatusCode::OK),
            None => (create(state, vec![urn]), StatusCode::CREATED),
        };
        apply_write(state, index, write);
        return super::json(status, state.contact_json(&state.contacts[index]));
    }
    if let Some(uuid) = query.get("uuid") {
        let Some(index) = state.by_uuid.get(uuid).copied() else {
            return detail(StatusCode::NOT_FOUND, "Not found.");
        };
        if !state.contacts[index].active {
            return one_error("non_field_errors", "Inactive contacts can't be modified.");
        }
        let write = match validate(state, &body, false) {
            Ok(w) => w,
            Err(r) => return r,
        };
        apply_write(state, index, write);
        return super::json(StatusCode::OK, state.contact_json(&state.contacts[index]));
    }
    let mut write = match validate(state, &body, false) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let urns = write.urns.take().unwrap_or_default();
    if let Some(taken) = urns.iter().find(|u| state.by_urn.contains_key(*u)) {
        return one_error("urns", format!("URN belongs to another contact: {taken}"));
    }
    let index = create(state, urns);
    apply_write(state, index, write);
    super::json(
        StatusCode::CREATED,
        state.contact_json(&state.contacts[index]),
    )
}

fn delete_contact(shared: &Shared, query: &HashMap<String, String>) -> Response<Body> {
    let at_ms = shared.now_ms();
    let Ok(mut state) = shared.state::<WeniState>().lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let (lookup, index) = if let Some(urn) = query.get("urn") {
        let normalized = normalize_urn(urn).unwrap_or_default();
        (urn.clone(), state.by_urn.get(&normalized).copied())
    } else if let Some(uuid) = query.get("uuid") {
        (uuid.clone(), state.by_uuid.get(uuid).copied())
    } else {
        return detail(
            StatusCode::BAD_REQUEST,
            "URL must contain one of the following parameters: name, urn, uuid",
        );
    };
    let status = match index {
        None => StatusCode::NOT_FOUND,
        Some(i) => {
            // Soft delete: inactive, URNs rewritten so the phone is free again.
            let uuid = state.contacts[i].uuid.clone();
            for urn in std::mem::take(&mut state.contacts[i].urns) {
                state.by_urn.remove(&urn);
            }
            state.contacts[i].urns = vec![format!("deleted:{uuid}")];
            state.contacts[i].active = false;
            state.contacts[i].groups.clear();
            state.touch(i);
            StatusCode::NO_CONTENT
        }
    };
    state.writes.push(WeniWrite {
        method: "DELETE".into(),
        lookup,
        status: status.as_u16(),
        at_ms,
        groups_in_body: false,
    });
    match status {
        StatusCode::NO_CONTENT => StatusCode::NO_CONTENT.into_response(),
        _ => detail(StatusCode::NOT_FOUND, "Not found."),
    }
}

async fn contact_actions(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnKill>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    serve(&shared, &kill, &headers, "v2", || match method {
        Method::POST => apply_action(&shared, &body),
        _ => not_allowed(&method),
    })
    .await
}

/// Actions that take a group, and those that must not.
const GROUP_ACTIONS: [&str; 2] = ["add", "remove"];
const OTHER_ACTIONS: [&str; 5] = [
    "block",
    "unblock",
    "interrupt",
    "archive_messages",
    "delete",
];

/// API.md §1.5b: every item is validated before anything changes.
fn apply_action(shared: &Shared, body: &[u8]) -> Response<Body> {
    let at_ms = shared.now_ms();
    let (body, mut state) = match body_and_state(shared, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let contacts: Vec<String> = body
        .get("contacts")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let action = body
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let group = body.get("group").and_then(Value::as_str).map(str::to_owned);
    let response = match validate_action(&state, &contacts, &action, group.as_deref()) {
        Err(response) => response,
        Ok((indices, group)) => {
            for i in indices {
                let memberships = &mut state.contacts[i].groups;
                match (action.as_str(), &group) {
                    ("add", Some(g)) if !memberships.contains(g) => memberships.push(g.clone()),
                    ("remove", Some(g)) => memberships.retain(|m| m != g),
                    _ => {}
                }
            }
            StatusCode::NO_CONTENT.into_response()
        }
    };
    let status = response.status().as_u16();
    state.actions.push(WeniAction {
        action,
        group,
        contacts,
        status,
        at_ms,
    });
    response
}

/// The contacts' indices and the group's name, or the 400 naming the first bad item.
fn validate_action(
    state: &WeniState,
    contacts: &[String],
    action: &str,
    group: Option<&str>,
) -> Result<(Vec<usize>, Option<String>), Response<Body>> {
    if contacts.is_empty() {
        return Err(one_error("contacts", "Contacts can't be empty."));
    }
    if contacts.len() > 100 {
        return Err(one_error(
            "contacts",
            "This field can only contain up to 100 items.",
        ));
    }
    let group = match (GROUP_ACTIONS.contains(&action), group) {
        (true, Some(reference)) => Some(
            state
                .groups
                .iter()
                .find(|g| g.uuid == reference || g.name.to_lowercase() == reference.to_lowercase())
                .map(|g| g.name.clone())
                .ok_or_else(|| one_error("group", format!("No such object: {reference}")))?,
        ),
        (true, None) => return Err(one_error("group", "This field is required.")),
        (false, _) if !OTHER_ACTIONS.contains(&action) => {
            return Err(one_error(
                "action",
                format!("\"{action}\" is not a valid choice."),
            ));
        }
        (false, Some(_)) => return Err(one_error("group", "For this action group must be empty.")),
        (false, None) => None,
    };
    let mut indices = Vec::with_capacity(contacts.len());
    for reference in contacts {
        let by_urn = normalize_urn(reference)
            .ok()
            .and_then(|u| state.by_urn.get(&u).copied());
        let found = state
            .by_uuid
            .get(reference)
            .copied()
            .filter(|&i| state.contacts[i].active)
            .or(by_urn);
        match found {
            Some(i) => indices.push(i),
            None => {
                return Err(one_error(
                    "contacts",
                    format!("No such object: {reference}"),
                ));
            }
        }
    }
    if action == "add" {
        let blocked: Vec<&str> = indices
            .iter()
            .filter(|&&i| state.contacts[i].blocked)
            .map(|&i| state.contacts[i].uuid.as_str())
            .collect();
        if !blocked.is_empty() {
            return Err(one_error(
                "contacts",
                format!(
                    "Non-active contacts cannot be added to groups: {}",
                    blocked.join(", ")
                ),
            ));
        }
    }
    Ok((indices, group))
}

/// API.md §1.4: lower-case, runs of non-[a-z0-9] → one `_`, trimmed.
pub fn field_key(label: &str) -> String {
    let mut key = String::new();
    let mut pending_sep = false;
    for c in label.to_lowercase().chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if pending_sep && !key.is_empty() {
                key.push('_');
            }
            pending_sep = false;
            key.push(c);
        } else {
            pending_sep = true;
        }
    }
    key
}

async fn fields(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnKill>,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    serve(&shared, &kill, &headers, "v2", || match method {
        Method::GET => list(&shared, &headers, &query, "/api/v2/fields.json", |state| {
            state
                .fields
                .iter()
                .rev()
                .filter(|f| query.get("key").is_none_or(|k| k == &f.key))
                .map(|f| json!({"key": f.key, "label": f.label, "value_type": f.value_type, "pinned": false}))
                .collect()
        }),
        Method::POST => create_field(&shared, &body),
        _ => not_allowed(&method),
    })
    .await
}

fn create_field(shared: &Shared, body: &[u8]) -> Response<Body> {
    let (body, mut state) = match body_and_state(shared, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut errs = Map::new();
    let label = body
        .get("label")
        .and_then(|v| v.as_str())
        .map(str::trim)
        .unwrap_or("");
    let value_type = body
        .get("value_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if label.is_empty() {
        errs.insert("label".into(), json!(["This field is required."]));
    } else if label.chars().count() > 36 {
        errs.insert(
            "label".into(),
            json!(["Ensure this field has no more than 36 characters."]),
        );
    } else if !label
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-' || c == '_')
    {
        errs.insert(
            "label".into(),
            json!(["Can only contain letters, numbers, hyphens and underscores."]),
        );
    } else if state
        .fields
        .iter()
        .any(|f| f.label.to_lowercase() == label.to_lowercase())
    {
        errs.insert("label".into(), json!(["This field must be unique."]));
    }
    if value_type.is_empty() {
        errs.insert("value_type".into(), json!(["This field is required."]));
    } else if !["text", "numeric", "datetime", "state", "district", "ward"].contains(&value_type) {
        errs.insert(
            "value_type".into(),
            json!([format!("\"{value_type}\" is not a valid choice.")]),
        );
    }
    if !errs.is_empty() {
        return errors(errs);
    }
    let key = field_key(label);
    let valid_key = key.len() <= 36
        && key.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && !crate::sink::weni::RESERVED_KEYS.contains(&key.as_str());
    if !valid_key {
        return one_error(
            "label",
            format!("Generated key \"{key}\" is invalid or a reserved name."),
        );
    }
    if state.fields.iter().any(|f| f.key == key) {
        return one_error(
            "label",
            format!("Generated key \"{key}\" conflicts with an existing contact field."),
        );
    }
    if state.fields.len() >= MAX_FIELDS {
        return one_error(
            "non_field_errors",
            format!(
                "This org has {MAX_FIELDS} contact fields and the limit is {MAX_FIELDS}. You must delete existing ones before you can create new ones."
            ),
        );
    }
    let field = WeniField {
        key,
        label: label.to_owned(),
        value_type: value_type.to_owned(),
    };
    let out = json!({"key": field.key, "label": field.label, "value_type": field.value_type, "pinned": false});
    state.fields.push(field);
    super::json(StatusCode::CREATED, out)
}

async fn groups(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnKill>,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    serve(&shared, &kill, &headers, "v2", || match method {
        Method::GET if query.contains_key("uuid") && query.contains_key("name") => detail(
            StatusCode::BAD_REQUEST,
            "You may only specify one of the uuid, name parameters",
        ),
        Method::GET => list(&shared, &headers, &query, "/api/v2/groups.json", |state| {
            state
                .groups
                .iter()
                .rev()
                .filter(|g| query.get("uuid").is_none_or(|u| u == &g.uuid))
                .filter(|g| query.get("name").is_none_or(|n| n.to_lowercase() == g.name.to_lowercase()))
                .map(|g| {
                    let count = state.contacts.iter().filter(|c| c.active && c.groups.contains(&g.name)).count();
                    json!({"uuid": g.uuid, "name": g.name, "query": null, "status": "ready", "count": count})
                })
                .collect()
        }),
        Method::POST => create_group(&shared, &body),
        _ => not_allowed(&method),
    })
    .await
}

fn create_group(shared: &Shared, body: &[u8]) -> Response<Body> {
    let (body, mut state) = match body_and_state(shared, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let name = body.get("name").and_then(|v| v.as_str()).unwrap_or("");
    let problem = if name.is_empty() {
        Some("This field is required.".to_owned())
    } else if name.chars().count() > 64 {
        Some("Ensure this field has no more than 64 characters.".to_owned())
    } else if name.trim() != name
        || !name
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    {
        Some("Name contains illegal characters.".to_owned())
    } else if state
        .groups
        .iter()
        .any(|g| g.name.to_lowercase() == name.to_lowercase())
    {
        Some("This field must be unique.".to_owned())
    } else {
        None
    };
    if let Some(problem) = problem {
        return one_error("name", problem);
    }
    if state.groups.len() >= MAX_GROUPS {
        return one_error(
            "non_field_errors",
            format!(
                "This org has {MAX_GROUPS} groups and the limit is {MAX_GROUPS}. You must delete existing ones before you can create new ones."
            ),
        );
    }
    let group = WeniGroup {
        uuid: super::uuid(state.groups.len() as u64 + 1, 0x6207),
        name: name.to_owned(),
    };
    let out = json!({"uuid": group.uuid, "name": group.name, "query": null, "status": "ready", "count": 0});
    state.groups.push(group);
    super::json(StatusCode::CREATED, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urns_follow_weni_rules() {
        assert_eq!(
            normalize_urn("+5511987654321").unwrap(),
            "whatsapp:5511987654321"
        );
        assert_eq!(
            normalize_urn("whatsapp:5511987654321").unwrap(),
            "whatsapp:5511987654321"
        );
        assert!(normalize_urn("whatsapp:+5511987654321").is_err());
        assert_eq!(
            normalize_urn("tel:+55 11 98765-4321").unwrap(),
            "tel:+5511987654321"
        );
        assert_eq!(
            normalize_urn("whatsapp:1234567").unwrap_err(),
            "Phone number must have at least 8 digits."
        );
        assert!(normalize_urn("foo:bar").is_err());
    }

    /// Regression: `contact_actions` found each UUID by scanning every
    /// contact, so populating 775k contacts (benches/state.sh) took hours.
    /// The index must name the same contact the scan did, and skip inactive ones.
    #[test]
    fn contact_actions_find_uuids_through_the_index_not_a_scan() {
        let mut state = WeniState::new(&SandboxOptions::default());
        for n in 0..1000u64 {
            create(&mut state, vec![format!("whatsapp:55119{n:08}")]);
        }
        state.contacts[7].active = false;
        assert_eq!(state.by_uuid.len(), state.contacts.len());
        let uuids: Vec<String> = [3, 999, 500]
            .iter()
            .map(|&i| state.contacts[i].uuid.clone())
            .collect();
        let (indices, _) = validate_action(&state, &uuids, "block", None)
            .unwrap_or_else(|_| panic!("known UUIDs are found"));
        assert_eq!(indices, vec![3, 999, 500]);
        let inactive = vec![state.contacts[7].uuid.clone()];
        assert!(validate_action(&state, &inactive, "block", None).is_err());
    }

    #[test]
    fn field_keys_derive_from_labels() {
        assert_eq!(field_key("Nick name"), "nick_name");
        assert_eq!(field_key("nick-name"), "nick_name");
        assert_eq!(field_key("  Plan  "), "plan");
    }

    #[test]
    fn ninth_digit_variants() {
        assert_eq!(
            ninth_digit_variant("whatsapp:5582999331122").as_deref(),
            Some("whatsapp:558299331122")
        );
        assert_eq!(
            ninth_digit_variant("whatsapp:558299331122").as_deref(),
            Some("whatsapp:5582999331122")
        );
        assert_eq!(ninth_digit_variant("whatsapp:14155550100"), None);
    }
}
