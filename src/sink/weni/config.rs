//! `[sinks.weni]`: the URN scheme, the contact's name, language, groups and fields.

use std::collections::BTreeMap;

use crate::config::{CommonDefaults, ConfigError, Rate, SinkCommon, sink_common, template_key};
use crate::sink::{ParseContext, SinkKind, raw_table};
use crate::template::Template;

crate::raw_sink_table!(RawWeni {
    urn_scheme: Option<String>,
    name: Option<String>,
    language: Option<String>,
    groups: Option<Vec<String>>,
    fields: Option<BTreeMap<String, String>>,
    field_types: Option<BTreeMap<String, String>>,
    mode: Option<String>,
    group_mode: Option<String>,
    actions_rate: Option<String>,
});

/// Weni's upsert key scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrnScheme {
    /// `whatsapp:5511987654321` (digits, no `+`).
    Whatsapp,
    /// `tel:+5511987654321`.
    Tel,
}

/// What the Weni sink does with each row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeniMode {
    Upsert,
    Delete,
}

/// `[sinks.weni]`.
#[derive(Clone, Debug)]
pub struct WeniConfig {
    pub common: SinkCommon,
    pub urn_scheme: UrnScheme,
    pub name: Option<Template>,
    pub language: Option<Template>,
    pub groups: Vec<String>,
    pub fields: BTreeMap<String, Template>,
    /// Type of each field the tool may have to create; default "text".
    pub field_types: BTreeMap<String, String>,
    pub mode: WeniMode,
    pub group_mode: GroupMode,
    /// Pace of `contact_actions` requests (the API's separate `v2` bucket).
    pub actions_rate: Rate,
}

/// How contacts get into `groups` (SPEC "Weni groups never remove memberships").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupMode {
    /// The upsert carries no `groups`; contacts are added through
    /// `contact_actions`, their other memberships untouched.
    Add,
    /// The upsert carries `groups`: Weni sets exactly those static groups.
    Replace,
}

/// Weni value types (API.md §1.4).
const VALUE_TYPES: [&str; 6] = ["text", "numeric", "datetime", "state", "district", "ward"];

/// Weni reserved field keys (API.md §1.4): the fixed names plus every URN scheme.
pub const RESERVED_KEYS: [&str; 23] = [
    "id",
    "name",
    "first_name",
    "language",
    "groups",
    "uuid",
    "created_on",
    "created_by",
    "modified_by",
    "is",
    "has",
    "tel",
    "whatsapp",
    "mailto",
    "ext",
    "facebook",
    "instagram",
    "telegram",
    "twitter",
    "twitterid",
    "viber",
    "line",
    "discord",
];

/// Whether `key` is a field key Weni would derive from a label equal to it (API.md §1.4).
fn valid_field_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    key.len() <= 36
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !key.ends_with('_')
        && !key.contains("__")
        && !RESERVED_KEYS.contains(&key)
}

/// Reads and validates the table.
pub fn parse(
    value: toml::Value,
    kind: SinkKind,
    ctx: &ParseContext<'_>,
) -> Result<WeniConfig, ConfigError> {
    let mut raw: RawWeni = raw_table(value, kind, ctx)?;
    let defaults = CommonDefaults {
        base_url: "https://flows.weni.ai",
        token_env: "WENI_API_TOKEN",
        rate: "3000/h",
        concurrency: 4,
    };
    let common = sink_common(raw.common(), kind, defaults, ctx)?;
    let urn_scheme = match raw.urn_scheme.as_deref() {
        None | Some("whatsapp") => UrnScheme::Whatsapp,
        Some("tel") => UrnScheme::Tel,
        Some(s) => {
            return Err(ctx.invalid(
                "sinks.weni.urn_scheme",
                format!("is \"{s}\"; use \"whatsapp\" or \"tel\""),
            ));
        }
    };
    let mode = match raw.mode.as_deref() {
        None | Some("upsert") => WeniMode::Upsert,
        Some("delete") => WeniMode::Delete,
        Some(m) => {
            return Err(ctx.invalid(
                "sinks.weni.mode",
                format!("is \"{m}\"; use \"upsert\" or \"delete\""),
            ));
        }
    };
    let name = raw
        .name
        .map(|t| template_key("sinks.weni.name", &t, ctx))
        .transpose()?;
    let language = match raw.language {
        None => None,
        Some(text) => {
            let t = template_key("sinks.weni.language", &text, ctx)?;
            if t.columns().next().is_none()
                && !(text.len() == 3 && text.bytes().all(|b| b.is_ascii_lowercase()))
            {
                return Err(ctx.invalid(
                    "sinks.weni.language",
                    format!(
                        "is \"{text}\"; Weni wants an ISO 639-3 code such as \"por\", \"eng\", \"spa\""
                    ),
                ));
            }
            Some(t)
        }
    };
    let groups = raw.groups.unwrap_or_default();
    for (i, g) in groups.iter().enumerate() {
        if g.trim().is_empty() || g.trim() != g || g.chars().count() > 64 {
            return Err(ctx.invalid(
                &format!("sinks.weni.groups[{i}]"),
                format!(
                    "is \"{g}\"; Weni group names are 1 to 64 characters with no leading or trailing space"
                ),
            ));
        }
    }
    let mut fields = BTreeMap::new();
    for (key, text) in raw.fields.unwrap_or_default() {
        if !valid_field_key(&key) {
            return Err(ctx.invalid(
                &format!("sinks.weni.fields.{key}"),
                "is not a usable Weni field key: lower-case letters, digits and single underscores, starting with a letter, at most 36 characters, not a reserved name".into(),
            ));
        }
        let t = template_key(&format!("sinks.weni.fields.{key}"), &text, ctx)?;
        fields.insert(key, t);
    }
    let field_types = raw.field_types.unwrap_or_default();
    for (key, ty) in &field_types {
        if !VALUE_TYPES.contains(&ty.as_str()) {
            return Err(ctx.invalid(
                &format!("sinks.weni.field_types.{key}"),
                format!("is \"{ty}\"; use one of {}", VALUE_TYPES.join(", ")),
            ));
        }
    }
    let group_mode = match raw.group_mode.as_deref() {
        None | Some("add") => GroupMode::Add,
        Some("replace") => GroupMode::Replace,
        Some(m) => {
            return Err(ctx.invalid(
                "sinks.weni.group_mode",
                format!("is \"{m}\"; use \"add\" (keep other groups) or \"replace\""),
            ));
        }
    };
    let actions_text = raw.actions_rate.unwrap_or_else(|| "3000/h".into());
    let actions_rate = Rate::parse(&actions_text).ok_or_else(|| {
        ctx.invalid(
            "sinks.weni.actions_rate",
            format!("is \"{actions_text}\"; write requests per second, minute or hour: \"3000/h\""),
        )
    })?;
    Ok(WeniConfig {
        common,
        urn_scheme,
        name,
        language,
        groups,
        fields,
        field_types,
        mode,
        group_mode,
        actions_rate,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse(table: &str) -> Result<Config, crate::config::ConfigError> {
        let text =
            format!("[input]\nphone_column = [\"mobile\", \"phone\"]\nid_column = \"id\"\n{table}");
        Config::parse(&text, Path::new("/etc/crm/import.toml"))
    }

    #[test]
    fn bad_keys_are_named() {
        let err = parse("[sinks.weni]\nrat = \"1/s\"\n").unwrap_err();
        assert!(err.to_string().contains("rat"), "{err}");
        let err = parse("[sinks.weni]\nrate = \"fast\"\n").unwrap_err();
        assert!(err.to_string().contains("sinks.weni.rate"), "{err}");
        let err = parse("[sinks.weni]\nbase_url = \"http://flows.weni.ai\"\n").unwrap_err();
        assert!(err.to_string().contains("sinks.weni.base_url"), "{err}");
    }

    #[test]
    fn a_disabled_table_is_checked_but_skipped() {
        let c = parse("[sinks.weni]\nenabled = false\n").unwrap();
        assert!(c.sinks.is_empty());
        let err = parse("[sinks.weni]\nenabled = false\nmode = \"purge\"\n").unwrap_err();
        assert!(err.to_string().contains("sinks.weni.mode"), "{err}");
    }

    #[test]
    fn columns_are_listed() {
        let c = parse(
            r#"[sinks.weni]
name = "{first_name} {last_name}"
fields = { plan = "{plan}" }
"#,
        )
        .unwrap();
        assert_eq!(c.sinks.len(), 1);
        let cols: Vec<_> = c.column_uses().into_iter().map(|u| u.column).collect();
        assert_eq!(
            cols,
            ["mobile", "phone", "id", "first_name", "last_name", "plan"]
        );
    }
}
