//! Chatfuel fake: `POST /api/contacts/{automation_id}/whatsapp/` (API.md §3, §5).
//!
//! Enforces: `Authorization: Bearer <token>` (401 with an **empty body**
//! otherwise), a known 24-character automation id (404), `phones` a non-empty
//! array of at most 1,000 numbers with country code, `contact_data.properties`
//! an object of strings. Applies: upserts each phone's properties in the
//! automation and records whether a value actually changed (what fires the
//! "After property is changed" trigger). Throttle (none documented): a fixed
//! window answered 429 with `Retry-After`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ConnKill, Fake, FixedWindow, SandboxLog, SandboxOptions, Shared};

/// Largest batch the API takes.
pub const MAX_PHONES: usize = 1000;

/// One accepted request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatfuelRequest {
    pub automation_id: String,
    pub phones: Vec<String>,
    pub properties: BTreeMap<String, String>,
    /// Milliseconds since the sandbox started.
    pub at_ms: u64,
}

/// What the Chatfuel fake received and holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChatfuelLog {
    pub requests: Vec<ChatfuelRequest>,
    /// automation id → phone → properties.
    pub contacts: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    /// Property changes that would fire an "After property is changed" trigger.
    pub property_changes: u64,
    /// Batches refused because they held a refused phone (nothing applied).
    #[serde(default)]
    pub refused_batches: u64,
}

pub(crate) struct ChatfuelState {
    throttle: Option<FixedWindow>,
    automations: Vec<String>,
    /// Phones this automation refuses: a batch holding any is refused whole.
    refused: Vec<String>,
    log: ChatfuelLog,
}

impl ChatfuelState {
    pub(crate) fn new(options: &SandboxOptions) -> ChatfuelState {
        ChatfuelState {
            throttle: options.platform(NAME).rate.map(FixedWindow::new),
            automations: options.chatfuel_automations.clone(),
            refused: options.chatfuel_refused_phones.clone(),
            log: ChatfuelLog::default(),
        }
    }

    pub(crate) fn log(&self) -> ChatfuelLog {
        self.log.clone()
    }
}

impl super::FakeState for ChatfuelState {
    fn new(options: &SandboxOptions) -> Self {
        ChatfuelState::new(options)
    }

    fn log_json(&self) -> serde_json::Value {
        serde_json::to_value(self.log()).unwrap_or_default()
    }
}

/// This fake's name (the platform's).
const NAME: &str = "chatfuel";

/// The sandbox's registry entry.
pub(crate) const FAKE: Fake = Fake {
    name: NAME,
    state: super::boxed_state::<ChatfuelState>,
    routes,
    log: super::state_log::<ChatfuelState>,
    summary,
    server_error,
};

impl SandboxLog {
    /// What the Chatfuel fake received and applied.
    pub fn chatfuel(&self) -> ChatfuelLog {
        self.platform(NAME)
    }
}

fn summary(log: &SandboxLog) -> String {
    let log = log.chatfuel();
    format!(
        "chatfuel {} request(s) for {} phone(s)",
        log.requests.len(),
        log.requests.iter().map(|r| r.phones.len()).sum::<usize>()
    )
}

/// Chatfuel's own 500.
fn server_error() -> Response<Body> {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [("content-type", "application/json")],
        r#"{"code":500,"message":"HTTP 500 Internal Server Error"}"#,
    )
        .into_response()
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new().route(
        "/api/contacts/{automation_id}/whatsapp/",
        post(create_contacts),
    )
}

fn bad_request(message: &str) -> Response<Body> {
    super::json(
        StatusCode::BAD_REQUEST,
        json!({"success": false, "result": message}),
    )
}

/// Phones "with country code": `+` optional, 7–15 digits, no leading 0.
fn phone_ok(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or(phone);
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

async fn create_contacts(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnKill>,
    Path(automation_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    if let Some(response) = shared.before(NAME, &kill).await {
        return response;
    }
    let throttled = shared
        .state::<ChatfuelState>()
        .lock()
        .ok()
        .and_then(|mut s| {
            s.throttle
                .as_mut()
                .and_then(|t| t.check("automation").err())
        });
    if let Some(wait) = throttled {
        shared.throttled(NAME);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", wait.to_string())],
            axum::Json(json!({"success": false, "result": "Too many requests"})),
        )
            .into_response();
    }
    let expected = format!("Bearer {}", shared.options.token);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let response = apply(&shared, &automation_id, &body);
    shared.after(NAME, &kill, response).await
}

fn apply(shared: &Shared, automation_id: &str, body: &[u8]) -> Response<Body> {
    let Ok(mut state) = shared.state::<ChatfuelState>().lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let known = if state.automations.is_empty() {
        automation_id.chars().count() == 24
    } else {
        state.automations.iter().any(|a| a == automation_id)
    };
    if !known {
        return super::json(
            StatusCode::NOT_FOUND,
            json!({"code": 404, "message": "HTTP 404 Not Found"}),
        );
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return bad_request("Body must be JSON");
    };
    let Some(phones) = value.get("phones").and_then(|p| p.as_array()) else {
        return bad_request("phones is required and must be an array");
    };
    if phones.is_empty() {
        return bad_request("phones must not be empty");
    }
    if phones.len() > MAX_PHONES {
        return bad_request(&format!(
            "at most {MAX_PHONES} phones per request, got {}",
            phones.len()
        ));
    }
    let mut phone_list = Vec::with_capacity(phones.len());
    for p in phones {
        match p.as_str() {
            Some(s) if phone_ok(s) => phone_list.push(s.to_owned()),
            _ => {
                return bad_request(&format!(
                    "invalid phone number (with country code required): {p}"
                ));
            }
        }
    }
    // All-or-nothing, like most batch APIs: one refused phone fails the batch,
    // named in the message, and nothing in it is applied.
    if let Some(refused) = phone_list.iter().find(|p| {
        state
            .refused
            .iter()
            .any(|r| r.trim_start_matches('+') == p.trim_start_matches('+'))
    }) {
        state.log.refused_batches += 1;
        return super::json(
            StatusCode::BAD_REQUEST,
            json!({"success": false, "message": format!("invalid phone: {refused}")}),
        );
    }
    let mut properties = BTreeMap::new();
    match value.pointer("/contact_data/properties") {
        None => {}
        Some(serde_json::Value::Object(map)) => {
            for (k, v) in map {
                match v.as_str() {
                    Some(s) => {
                        properties.insert(k.clone(), s.to_owned());
                    }
                    None => return bad_request(&format!("property {k} must be a string")),
                }
            }
        }
        Some(_) => return bad_request("contact_data.properties must be an object"),
    }
    // Duplicates inside one batch: applied once, deterministically (first wins).
    let mut seen: HashMap<&str, ()> = HashMap::new();
    let at_ms = shared.now_ms();
    let log = &mut state.log;
    let contacts = log.contacts.entry(automation_id.to_owned()).or_default();
    let mut changes = 0;
    for phone in &phone_list {
        if seen.insert(phone.as_str(), ()).is_some() {
            continue;
        }
        let normalized = if phone.starts_with('+') {
            phone.clone()
        } else {
            format!("+{phone}")
        };
        let contact = contacts.entry(normalized).or_default();
        for (k, v) in &properties {
            if contact.get(k) != Some(v) {
                contact.insert(k.clone(), v.clone());
                changes += 1;
            }
        }
    }
    log.property_changes += changes;
    log.requests.push(ChatfuelRequest {
        automation_id: automation_id.to_owned(),
        phones: phone_list,
        properties,
        at_ms,
    });
    super::json(StatusCode::OK, json!({"success": true}))
}
