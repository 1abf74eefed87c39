//! CloudHumans (CloudChat): one proactive WhatsApp template message per phone.
//!
//! **Not idempotent**: every accepted call sends a message. A request that may
//! have reached the server and got no answer (timeout, connection dropped after
//! sending) ends `unknown` and is never resent; an HTTP answer (5xx included)
//! is an answer and may be retried; a connection that was never made is retried.

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::{Check, Payload, RowView, SinkItem, SinkRuntime};
use crate::config::{CloudHumansConfig, SinkConfig};
use crate::phone::E164;
use crate::report::Status;
use crate::state::PayloadHasher;

/// The only per-row rule the API documents beyond E.164: `header_attachment`
/// must be an http(s) URL of at most 2,000 characters.
pub fn check(config: &CloudHumansConfig, row: RowView<'_>, phone: E164, with_hash: bool) -> Check {
    if let Some(header) = &config.header_attachment
        && let Some(url) = header.render(|i| row.cell(i))
        && (!(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2000)
    {
        return Check::Rejected(
            "header_attachment must be an http(s) URL of at most 2000 characters".into(),
        );
    }
    // Recorded for the record only: a template goes to a phone at most once,
    // whatever its variables (SPEC "Incremental sync").
    if !with_hash {
        return Check::Ready { group: 0, hash: 0 };
    }
    let mut hash = PayloadHasher::default();
    hash.add(config.inbox_id.as_bytes())
        .add(&phone.0.to_le_bytes())
        .add(config.template_name.as_bytes());

    crate::template::with_scratch(|buf| {
        let rendered = config
            .header_attachment
            .iter()
            .chain(config.buttons.iter())
            .chain(config.params.values());
        for t in rendered {
            if t.render_into(|i| row.cell(i), buf) {
                hash.add(buf.as_bytes());
            } else {
                hash.add(b"\0");
            }
        }
    });
    Check::Ready {
        group: 0,
        hash: hash.finish(),
    }
}

/// The request body: fixed keys, `button_param_N`, then template variables at the root.
/// Placeholders that render empty leave their key out (API.md §2.2).
pub fn body(config: &CloudHumansConfig, row: RowView<'_>, phone: E164) -> Value {
    let mut body = Map::new();
    body.insert("inbox_id".into(), config.inbox_id.clone().into());
    body.insert("phone_number".into(), phone.to_string().into());
    body.insert("template_name".into(), config.template_name.clone().into());
    if let Some(url) = config
        .header_attachment
        .as_ref()
        .and_then(|t| t.render(|i| row.cell(i)))
    {
        body.insert("header_attachment".into(), url.into());
    }
    for (i, button) in config.buttons.iter().enumerate() {
        if let Some(value) = button.render(|c| row.cell(c)) {
            body.insert(format!("button_param_{i}"), value.into());
        }
    }
    for (key, t) in &config.params {
        if let Some(value) = t.render(|i| row.cell(i)) {
            body.insert(key.clone(), value.into());
        }
    }
    Value::Object(body)
}

/// Sends every message with `concurrency` workers.
pub async fn run(sink: Arc<SinkRuntime>, rx: mpsc::Receiver<SinkItem>) {
    let SinkConfig::CloudHumans(config) = &sink.config else {
        return;
    };
    let concurrency = config.common.concurrency;
    super::worker_pool(concurrency, rx, move |item: SinkItem| {
        let sink = sink.clone();
        async move { send(&sink, item).await }
    })
    .await;
}

async fn send(sink: &SinkRuntime, item: SinkItem) {
    let SinkConfig::CloudHumans(config) = &sink.config else {
        return;
    };
    let url = format!(
        "{}/api/v1/accounts/{}/conversations/create_proactive_whatsapp_conversation",
        config.common.base_url, config.account_id
    );
    let Payload::Json(body) = &item.payload else {
        return;
    };
    if sink.interrupted() {
        sink.report_interrupted(vec![item.meta]);
        return;
    }
    // State before effect: the marker is durable before the message can leave.
    if !sink.mark_in_flight(&item.meta).await {
        sink.report(
            vec![item.meta],
            Status::Failed,
            None,
            "not sent: the state could not record it as in flight",
        );
        return;
    }
    let finished = sink
        .uploader
        .execute(
            |client| {
                client
                    .post(&url)
                    .header("api_access_token", &sink.token)
                    .json(body)
            },
            |_| None,
        )
        .await;
    sink.report_finished(vec![item.meta], &finished, Status::Sent);
}
