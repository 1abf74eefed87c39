//! `[sinks.cloudhumans]`: account, inbox, template and its variables.

use std::collections::BTreeMap;

use crate::config::{CommonDefaults, ConfigError, Scalar, SinkCommon, sink_common, template_key};
use crate::sink::{ParseContext, SinkKind, raw_table};
use crate::template::Template;

crate::raw_sink_table!(RawCloudHumans {
    account_id: Option<Scalar>,
    inbox_id: Option<Scalar>,
    template_name: Option<String>,
    header_attachment: Option<String>,
    buttons: Option<Vec<String>>,
    params: Option<BTreeMap<String, String>>,
    max_messages: Option<i64>,
});

/// `[sinks.cloudhumans]`, validated.
#[derive(Clone, Debug)]
pub struct CloudHumansConfig {
    pub common: SinkCommon,
    pub account_id: String,
    pub inbox_id: String,
    pub template_name: String,
    pub header_attachment: Option<Template>,
    pub buttons: Vec<Template>,
    pub params: BTreeMap<String, Template>,
    /// Safety cap per run; rows past it end `skipped`.
    pub max_messages: Option<u64>,
}

/// Reads and validates the table.
pub fn parse(
    value: toml::Value,
    kind: SinkKind,
    ctx: &ParseContext<'_>,
) -> Result<CloudHumansConfig, ConfigError> {
    let mut raw: RawCloudHumans = raw_table(value, kind, ctx)?;
    let defaults = CommonDefaults {
        base_url: "https://cloudchat.cloudhumans.com",
        token_env: "CLOUDHUMANS_API_TOKEN",
        rate: "10/s",
        concurrency: 4,
    };
    let common = sink_common(raw.common(), kind, defaults, ctx)?;
    let required = |value: Option<String>, key: &str| {
        value
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| ctx.invalid(key, "is required".into()))
    };
    let account_id = required(
        raw.account_id.map(Scalar::into_text),
        "sinks.cloudhumans.account_id",
    )?;
    let inbox_id = required(
        raw.inbox_id.map(Scalar::into_text),
        "sinks.cloudhumans.inbox_id",
    )?;
    let template_name = required(raw.template_name, "sinks.cloudhumans.template_name")?;
    let header_attachment = raw
        .header_attachment
        .map(|t| template_key("sinks.cloudhumans.header_attachment", &t, ctx))
        .transpose()?;
    let buttons = raw
        .buttons
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, t)| template_key(&format!("sinks.cloudhumans.buttons[{i}]"), t, ctx))
        .collect::<Result<_, _>>()?;
    let mut params = BTreeMap::new();
    for (key, text) in raw.params.unwrap_or_default() {
        const RESERVED: [&str; 4] = [
            "inbox_id",
            "phone_number",
            "template_name",
            "header_attachment",
        ];
        if RESERVED.contains(&key.as_str()) || key.starts_with("button_param_") {
            return Err(ctx.invalid(
                &format!("sinks.cloudhumans.params.{key}"),
                "collides with a key the tool sets itself".into(),
            ));
        }
        let t = template_key(&format!("sinks.cloudhumans.params.{key}"), &text, ctx)?;
        params.insert(key, t);
    }
    let max_messages = match raw.max_messages {
        None => None,
        Some(m) if m >= 0 => Some(m as u64),
        Some(m) => {
            return Err(ctx.invalid(
                "sinks.cloudhumans.max_messages",
                format!("is {m}; use a number ≥ 0"),
            ));
        }
    };
    Ok(CloudHumansConfig {
        common,
        account_id,
        inbox_id,
        template_name,
        header_attachment,
        buttons,
        params,
        max_messages,
    })
}
