//! `[sinks.chatfuel]`: the automation, the batch size and the property set.

use std::collections::BTreeMap;

use crate::config::{CommonDefaults, ConfigError, Scalar, SinkCommon, sink_common};
use crate::sink::{ParseContext, SinkKind, raw_table};

crate::raw_sink_table!(RawChatfuel {
    automation_id: Option<Scalar>,
    batch_size: Option<i64>,
    properties: Option<BTreeMap<String, Scalar>>,
    property_columns: Option<BTreeMap<String, String>>,
});

/// `[sinks.chatfuel]`, validated.
#[derive(Clone, Debug)]
pub struct ChatfuelConfig {
    pub common: SinkCommon,
    pub automation_id: String,
    pub batch_size: usize,
    /// Same literal values for every phone.
    pub properties: BTreeMap<String, String>,
    /// Property name → column; rows are batched by identical property sets.
    pub property_columns: BTreeMap<String, String>,
    /// `property_columns` bound to projected-cell indices.
    pub bound_property_columns: Vec<(String, usize)>,
}

/// Reads and validates the table.
pub fn parse(
    value: toml::Value,
    kind: SinkKind,
    ctx: &ParseContext<'_>,
) -> Result<ChatfuelConfig, ConfigError> {
    let mut raw: RawChatfuel = raw_table(value, kind, ctx)?;
    let defaults = CommonDefaults {
        base_url: "https://panel.chatfuel.com",
        token_env: "CHATFUEL_API_TOKEN",
        rate: "1/s",
        concurrency: 2,
    };
    let common = sink_common(raw.common(), kind, defaults, ctx)?;
    let automation_id = raw
        .automation_id
        .map(Scalar::into_text)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ctx.invalid("sinks.chatfuel.automation_id", "is required".into()))?;
    let batch_size = match raw.batch_size {
        None => 1000,
        Some(b) if (1..=1000).contains(&b) => b as usize,
        Some(b) => {
            return Err(ctx.invalid(
                "sinks.chatfuel.batch_size",
                format!("is {b}, but the Chatfuel API accepts 1 to 1000 phones per request"),
            ));
        }
    };
    let properties: BTreeMap<String, String> = raw
        .properties
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_text()))
        .collect();
    let property_columns = raw.property_columns.unwrap_or_default();
    if let Some(k) = property_columns
        .keys()
        .find(|k| properties.contains_key(*k))
    {
        return Err(ctx.invalid(
            &format!("sinks.chatfuel.property_columns.{k}"),
            "is also set in sinks.chatfuel.properties; keep one".into(),
        ));
    }
    Ok(ChatfuelConfig {
        common,
        automation_id,
        batch_size,
        properties,
        property_columns,
        bound_property_columns: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    #[test]
    fn batch_size_over_the_api_limit_is_named() {
        let err = Config::parse(
            "[input]\nphone_column = \"p\"\n[sinks.chatfuel]\nautomation_id = \"a\"\nbatch_size = 1500\n",
            Path::new("/etc/crm/import.toml"),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("sinks.chatfuel.batch_size"),
            "{err}"
        );
    }
}
