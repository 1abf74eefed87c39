//! CloudHumans (CloudChat): one proactive WhatsApp template message per phone.
//!
//! **Not idempotent**: every accepted call sends a message. A request that may
//! have reached the server and got no answer (timeout, connection dropped after
//! sending) ends `unknown` and is never resent; an HTTP answer (5xx included)
//! is an answer and may be retried; a connection that was never made is retried.
//! The in-flight marker is durable in the state before the request leaves.

mod config;

use std::sync::Arc;

use serde_json::{Map, Value};

pub use config::CloudHumansConfig;

use super::lane::{Lane, worker_pool};
use super::{
    Check, Delivery, GroupCounts, ParseContext, Payload, PlanCounts, Platform, Rerun, RowView,
    Sink, SinkItem, SinkKind,
};
use crate::config::{ColumnUse, ConfigError};
use crate::phone::E164;
use crate::report::Status;
use crate::sandbox::SandboxOptions;
use crate::state::{Known, PayloadHasher, Scope};

/// The registry entry.
pub const PLATFORM: Platform = Platform {
    name: "cloudhumans",
    parse,
};

fn parse(
    value: toml::Value,
    kind: SinkKind,
    ctx: &ParseContext<'_>,
) -> Result<Box<dyn Sink>, ConfigError> {
    Ok(Box::new(CloudHumans {
        kind,
        config: config::parse(value, kind, ctx)?,
    }))
}

/// The CloudHumans sink.
#[derive(Debug)]
pub struct CloudHumans {
    kind: SinkKind,
    pub config: CloudHumansConfig,
}

impl CloudHumans {
    fn templates_mut(&mut self) -> impl Iterator<Item = &mut crate::template::Template> {
        let c = &mut self.config;
        c.header_attachment
            .iter_mut()
            .chain(c.buttons.iter_mut())
            .chain(c.params.values_mut())
    }
}

impl Sink for CloudHumans {
    crate::sink_accessors!();

    fn column_uses(&self) -> Vec<ColumnUse> {
        let c = &self.config;
        let prefix = "sinks.cloudhumans";
        let mut uses = Vec::new();
        if let Some(t) = &c.header_attachment {
            uses.extend(ColumnUse::of_template(
                &format!("{prefix}.header_attachment"),
                t,
            ));
        }
        for (i, t) in c.buttons.iter().enumerate() {
            uses.extend(ColumnUse::of_template(&format!("{prefix}.buttons[{i}]"), t));
        }
        for (k, t) in &c.params {
            uses.extend(ColumnUse::of_template(&format!("{prefix}.params.{k}"), t));
        }
        uses
    }

    fn bind(&mut self, index_of: &dyn Fn(&str) -> usize) {
        for t in self.templates_mut() {
            t.bind(index_of);
        }
    }

    fn check(&self, row: RowView<'_>, phone: E164, hash: bool) -> Check {
        check(&self.config, row, phone, hash)
    }

    fn build(&self, row: RowView<'_>, phone: E164, _group: u64) -> Payload {
        Payload::Json(body(&self.config, row, phone))
    }

    /// A phone gets each template at most once per account and inbox.
    fn state_scope(&self) -> Scope {
        let c = &self.config;
        Scope {
            sink: "cloudhumans",
            scope: format!(
                "{} {} {} {}",
                c.common.base_url, c.account_id, c.inbox_id, c.template_name
            ),
            legacy: c.template_name.clone(),
        }
    }

    /// Sent before → `unchanged` (whatever the variables); in flight when a run
    /// died → `unknown`, never resent unless asked.
    fn decide(&self, known: Known<'_>, rerun: Rerun, _phone: E164, _hash: u64) -> Option<Check> {
        if !rerun.resend_messages && known.delivered().is_some() {
            return Some(Check::Unchanged);
        }
        if !rerun.resend_unknown
            && let Some(since) = known.in_flight_since()
        {
            return Some(Check::Unknown(
                format!(
                    "an interrupted run (at unix time {since}) may have sent template {} already; not resent (--resend-unknown sends it again)",
                    self.config.template_name
                )
                .into(),
            ));
        }
        None
    }

    fn hash_decides(&self) -> bool {
        false
    }

    fn max_rows(&self) -> Option<(u64, &'static str)> {
        self.config.max_messages.map(|m| (m, "max_messages"))
    }

    fn plan(&self, rows: u64, _groups: &GroupCounts) -> PlanCounts {
        PlanCounts {
            requests: rows,
            ..PlanCounts::default()
        }
    }

    fn idempotent(&self) -> bool {
        false
    }

    fn configure_sandbox(&self, options: &mut SandboxOptions) {
        let c = &self.config;
        options
            .cloudhumans_accounts
            .entry(c.account_id.clone())
            .or_default()
            .push(c.inbox_id.clone());
        options.cloudhumans_templates.push(c.template_name.clone());
    }

    fn deliver(self: Arc<Self>, lane: Arc<Lane>) -> Delivery {
        Box::pin(async move {
            let rx = lane.receiver(self.config.common.concurrency * 2);
            let concurrency = self.config.common.concurrency;
            worker_pool(concurrency, rx, move |item: SinkItem| {
                let (sink, lane) = (self.clone(), lane.clone());
                async move { send(&sink, &lane, item).await }
            })
            .await;
        })
    }
}

/// The only per-row rule the API documents beyond E.164: `header_attachment`
/// must be an http(s) URL of at most 2,000 characters.
fn check(config: &CloudHumansConfig, row: RowView<'_>, phone: E164, with_hash: bool) -> Check {
    if let Some(header) = &config.header_attachment {
        let bad_url = crate::template::with_scratch(|url| {
            header.render_into(|i| row.cell(i), url)
                && (!(url.starts_with("http://") || url.starts_with("https://"))
                    || url.len() > 2000)
        });
        if bad_url {
            return Check::Rejected(
                "header_attachment must be an http(s) URL of at most 2000 characters".into(),
            );
        }
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

async fn send(sink: &CloudHumans, lane: &Lane, item: SinkItem) {
    let config = &sink.config;
    let url = format!(
        "{}/api/v1/accounts/{}/conversations/create_proactive_whatsapp_conversation",
        config.common.base_url, config.account_id
    );
    let Payload::Json(body) = &item.payload else {
        return;
    };
    if lane.shutdown.is_stopping() {
        lane.report_not_sent(vec![item.meta]);
        return;
    }
    // State before effect: the marker is durable before the message can leave.
    if !lane.mark_in_flight(&item.meta).await {
        lane.report(
            vec![item.meta],
            Status::Failed,
            None,
            "not sent: the state could not record it as in flight",
        );
        return;
    }
    let finished = lane
        .uploader
        .execute(
            |client| {
                client
                    .post(&url)
                    .header("api_access_token", lane.secret(&lane.token))
                    .json(body)
            },
            |_, _| None,
        )
        .await;
    lane.report_finished(vec![item.meta], &finished, Status::Sent);
}
