//! CloudHumans (CloudChat, a Chatwoot fork) fake:
//! `POST /api/v1/accounts/{account_id}/conversations/create_proactive_whatsapp_conversation`
//! (API.md §2, §5).
//!
//! Enforces Chatwoot's auth answers (401 with its three bodies), unknown
//! account/inbox → 404, required `inbox_id`/`phone_number`/`template_name` →
//! 422, E.164 `+[1-9]` + 1–14 digits → 422, `header_attachment` an http(s) URL
//! ≤ 2,000 chars. **Every accepted call records one outbound template
//! message**, so a duplicate send after a retry is visible. Throttle:
//! rack-attack's fixed window per client IP, answered 429 `text/plain`
//! `Retry later\n` **without** `Retry-After`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ConnKill, Fake, FixedWindow, SandboxLog, SandboxOptions, Shared};

/// One template message the fake "sent".
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CloudHumansMessage {
    pub account_id: String,
    pub inbox_id: String,
    pub phone_number: String,
    pub template_name: String,
    /// Every other root key (`header_attachment`, `button_param_N`, template variables).
    pub extra: BTreeMap<String, Value>,
    /// Conversation display id returned.
    pub conversation_id: u64,
    pub at_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CloudHumansLog {
    pub messages: Vec<CloudHumansMessage>,
}

pub(crate) struct CloudHumansState {
    throttle: Option<FixedWindow>,
    accounts: HashMap<String, Vec<String>>,
    templates: Vec<String>,
    next_conversation: HashMap<String, u64>,
    log: CloudHumansLog,
}

impl CloudHumansState {
    pub(crate) fn new(options: &SandboxOptions) -> CloudHumansState {
        CloudHumansState {
            throttle: options.platform(NAME).rate.map(FixedWindow::new),
            accounts: options.cloudhumans_accounts.clone(),
            templates: options.cloudhumans_templates.clone(),
            next_conversation: HashMap::new(),
            log: CloudHumansLog::default(),
        }
    }

    pub(crate) fn log(&self) -> CloudHumansLog {
        self.log.clone()
    }
}

impl super::FakeState for CloudHumansState {
    fn new(options: &SandboxOptions) -> Self {
        CloudHumansState::new(options)
    }

    fn log_json(&self) -> serde_json::Value {
        serde_json::to_value(self.log()).unwrap_or_default()
    }
}

/// This fake's name (the platform's).
const NAME: &str = "cloudhumans";

/// The sandbox's registry entry.
pub(crate) const FAKE: Fake = Fake {
    name: NAME,
    state: super::boxed_state::<CloudHumansState>,
    routes,
    log: super::state_log::<CloudHumansState>,
    summary,
    server_error,
};

impl SandboxLog {
    /// What the CloudHumans fake received and applied.
    pub fn cloudhumans(&self) -> CloudHumansLog {
        self.platform(NAME)
    }
}

fn summary(log: &SandboxLog) -> String {
    let log = log.cloudhumans();
    format!("cloudhumans {} message(s)", log.messages.len())
}

/// CloudHumans's own 500.
fn server_error() -> Response<Body> {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [("content-type", "application/json")],
        r#"{"status":500,"error":"Internal Server Error"}"#,
    )
        .into_response()
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new().route(
        "/api/v1/accounts/{account_id}/conversations/create_proactive_whatsapp_conversation",
        post(create_proactive),
    )
}

/// Chatwoot's `+`, `[1-9]`, then 1–14 digits.
fn e164_ok(phone: &str) -> bool {
    let Some(digits) = phone.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

fn unprocessable(value: Value) -> Response<Body> {
    super::json(StatusCode::UNPROCESSABLE_ENTITY, value)
}

/// A JSON scalar as Rails would read it into a string param.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

async fn create_proactive(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnKill>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    if let Some(response) = shared.before(NAME, &kill).await {
        return response;
    }
    // rack-attack runs before the app: every client is 127.0.0.1 here, one bucket.
    let throttled = shared
        .state::<CloudHumansState>()
        .lock()
        .ok()
        .and_then(|mut s| s.throttle.as_mut().and_then(|t| t.check("127.0.0.1").err()));
    if throttled.is_some() {
        shared.throttled(NAME);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "text/plain")],
            "Retry later\n",
        )
            .into_response();
    }
    let token = headers
        .get("api_access_token")
        .or_else(|| headers.get("api-access-token"))
        .and_then(|v| v.to_str().ok());
    match token {
        None => {
            return super::json(
                StatusCode::UNAUTHORIZED,
                json!({"errors": ["You need to sign in or sign up before continuing."]}),
            );
        }
        Some(t) if t != shared.options.token => {
            return super::json(
                StatusCode::UNAUTHORIZED,
                json!({"error": "Invalid Access Token"}),
            );
        }
        Some(_) => {}
    }
    let response = apply(&shared, &account_id, &body);
    shared.after(NAME, &kill, response).await
}

fn apply(shared: &Shared, account_id: &str, body: &[u8]) -> Response<Body> {
    let Ok(mut state) = shared.state::<CloudHumansState>().lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let not_found = || {
        super::json(
            StatusCode::NOT_FOUND,
            json!({"error": "Resource could not be found"}),
        )
    };
    if !state.accounts.is_empty() && !state.accounts.contains_key(account_id) {
        return not_found();
    }
    let Ok(Value::Object(mut params)) = serde_json::from_slice::<Value>(body) else {
        return unprocessable(json!({"error": "param is missing or the value is empty: inbox_id"}));
    };
    let mut required = BTreeMap::new();
    for key in ["inbox_id", "phone_number", "template_name"] {
        match params.remove(key).as_ref().and_then(text) {
            Some(v) => {
                required.insert(key, v);
            }
            None => {
                return unprocessable(
                    json!({"error": format!("param is missing or the value is empty: {key}")}),
                );
            }
        }
    }
    let (inbox_id, phone, template) = (
        &required["inbox_id"],
        &required["phone_number"],
        &required["template_name"],
    );
    if let Some(inboxes) = state.accounts.get(account_id)
        && !inboxes.iter().any(|i| i == inbox_id)
    {
        return not_found();
    }
    if !e164_ok(phone) {
        return unprocessable(
            json!({"message": "Phone number should be in e164 format", "attributes": ["phone_number"]}),
        );
    }
    if !state.templates.is_empty() && !state.templates.iter().any(|t| t == template) {
        return unprocessable(
            json!({"message": format!("Template not found: {template}"), "attributes": ["template_name"]}),
        );
    }
    if let Some(header) = params.get("header_attachment") {
        let ok = header.as_str().is_some_and(|u| {
            (u.starts_with("http://") || u.starts_with("https://")) && u.len() <= 2000
        });
        if !ok {
            return unprocessable(
                json!({"message": "Header attachment must be an http(s) URL", "attributes": ["header_attachment"]}),
            );
        }
    }
    let counter = state
        .next_conversation
        .entry(account_id.to_owned())
        .or_insert(0);
    *counter += 1;
    let id = *counter;
    let at_ms = shared.now_ms();
    state.log.messages.push(CloudHumansMessage {
        account_id: account_id.to_owned(),
        inbox_id: inbox_id.clone(),
        phone_number: phone.clone(),
        template_name: template.clone(),
        extra: params.into_iter().collect(),
        conversation_id: id,
        at_ms,
    });
    super::json(
        StatusCode::OK,
        json!({
            "id": id,
            "uuid": super::uuid(id, 0xC10D),
            "account_id": account_id.parse::<u64>().map(Value::from).unwrap_or(Value::from(account_id)),
            "inbox_id": inbox_id.parse::<u64>().map(Value::from).unwrap_or(Value::from(inbox_id.as_str())),
            "status": "open",
            "meta": {"sender": {"phone_number": phone}},
        }),
    )
}
