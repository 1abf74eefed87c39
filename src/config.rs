//! The TOML config file (SPEC "Configuration") → a typed, validated [`Config`].
//!
//! Parsing is two-step: serde reads the raw tables with `deny_unknown_fields`
//! (so a typo such as `phone_colum` is an error naming the key and its line),
//! then [`Config::from_raw`] checks values and fills defaults, naming the
//! dotted key at fault in every error. Columns are checked against the input
//! header later, by [`Config::column_uses`], before any row is processed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::phone::canonical_region;
use crate::template::Template;

/// A config problem, always naming the file and (where there is one) the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: `{key}` {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// `"a"` or `["a", "b"]`.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A TOML scalar accepted where the platform wants text (`account_id = 123` or `"123"`).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn into_text(self) -> String {
        match self {
            Scalar::Text(s) => s,
            Scalar::Integer(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    input: RawInput,
    dedup: Option<RawDedup>,
    report: Option<RawReport>,
    state: Option<RawState>,
    sinks: Option<RawSinks>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawInput {
    phone_column: OneOrMany,
    country_column: Option<String>,
    default_region: Option<String>,
    id_column: Option<String>,
    delimiter: Option<String>,
    encoding: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawDedup {
    keep: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawReport {
    path: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawState {
    path: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawSinks {
    chatfuel: Option<RawChatfuel>,
    weni: Option<RawWeni>,
    cloudhumans: Option<RawCloudHumans>,
}

/// Keys every sink table takes. serde cannot combine `flatten` with
/// `deny_unknown_fields`, so each sink table repeats them and hands them over
/// through [`RawCommonKeys::common`].
#[derive(Debug, Default)]
struct RawCommon {
    enabled: Option<bool>,
    base_url: Option<String>,
    token_env: Option<String>,
    rate: Option<String>,
    concurrency: Option<i64>,
    timeout: Option<String>,
    max_retries: Option<i64>,
    retry_backoff: Option<String>,
}

trait RawCommonKeys {
    fn common(&mut self) -> RawCommon;
}

macro_rules! raw_sink {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct $name {
            enabled: Option<bool>,
            base_url: Option<String>,
            token_env: Option<String>,
            rate: Option<String>,
            concurrency: Option<i64>,
            timeout: Option<String>,
            max_retries: Option<i64>,
            retry_backoff: Option<String>,
            $($field: $ty),*
        }
        impl RawCommonKeys for $name {
            fn common(&mut self) -> RawCommon {
                RawCommon {
                    enabled: self.enabled.take(),
                    base_url: self.base_url.take(),
                    token_env: self.token_env.take(),
                    rate: self.rate.take(),
                    concurrency: self.concurrency.take(),
                    timeout: self.timeout.take(),
                    max_retries: self.max_retries.take(),
                    retry_backoff: self.retry_backoff.take(),
                }
            }
        }
    };
}

raw_sink!(RawChatfuel {
    automation_id: Option<Scalar>,
    batch_size: Option<i64>,
    properties: Option<BTreeMap<String, Scalar>>,
    property_columns: Option<BTreeMap<String, String>>,
});

raw_sink!(RawWeni {
    urn_scheme: Option<String>,
    name: Option<String>,
    language: Option<String>,
    groups: Option<Vec<String>>,
    fields: Option<BTreeMap<String, String>>,
    field_types: Option<BTreeMap<String, String>>,
    mode: Option<String>,
});

raw_sink!(RawCloudHumans {
    account_id: Option<Scalar>,
    inbox_id: Option<Scalar>,
    template_name: Option<String>,
    header_attachment: Option<String>,
    buttons: Option<Vec<String>>,
    params: Option<BTreeMap<String, String>>,
    max_messages: Option<i64>,
});

/// CSV field delimiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delimiter {
    /// Sniffed per file among `,` `;` TAB `|` (`.tsv` files are always TAB).
    Auto,
    Byte(u8),
}

/// Text encoding of CSV input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    /// Excel's "CSV" on Western-European Windows.
    Windows1252,
}

/// `[input]`.
#[derive(Clone, Debug)]
pub struct InputConfig {
    /// Tried in order; the first that yields a valid number wins.
    pub phone_columns: Vec<String>,
    pub country_column: Option<String>,
    /// Canonical (upper-case) region, known to the metadata.
    pub default_region: Option<String>,
    pub id_column: Option<String>,
    pub delimiter: Delimiter,
    pub encoding: Encoding,
}

/// A request rate: at most `count` requests per `per`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// Parses "N/s", "N/min", "N/h" (also "N/sec", "N/m", "N/hour", "N/second", "N/minute").
    pub fn parse(text: &str) -> Option<Rate> {
        let (count, unit) = text.trim().split_once('/')?;
        let count: u32 = count.trim().parse().ok().filter(|&c| c > 0)?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return None,
        };
        Some(Rate { count, per })
    }

    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }

    /// Time to send `requests` at this rate, `concurrency` of them possibly at once at the start.
    pub fn duration_for(&self, requests: u64) -> Duration {
        Duration::from_secs_f64(requests as f64 / self.per_second())
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{}", self.count, unit)
    }
}

/// Parses "30s", "500ms", "2min", "1h".
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    (seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// Keys every sink has, validated.
#[derive(Clone, Debug)]
pub struct SinkCommon {
    pub base_url: String,
    /// Name of the environment variable holding the token (never the token).
    pub token_env: String,
    pub rate: Rate,
    pub concurrency: usize,
    pub timeout: Duration,
    pub max_retries: u32,
    /// First backoff step; each retry doubles it (full jitter, at most 30 s).
    pub retry_backoff: Duration,
}

/// `[sinks.chatfuel]`.
#[derive(Clone, Debug)]
pub struct ChatfuelConfig {
    pub common: SinkCommon,
    pub automation_id: String,
    pub batch_size: usize,
    /// Same literal values for every phone.
    pub properties: BTreeMap<String, String>,
    /// Property name → column; rows are batched by identical property sets.
    pub property_columns: BTreeMap<String, String>,
    /// `property_columns` bound to projected-column indices by the pipeline.
    pub bound_property_columns: Vec<(String, usize)>,
}

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
}

/// `[sinks.cloudhumans]`.
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

/// One enabled sink.
#[derive(Clone, Debug)]
pub enum SinkConfig {
    Chatfuel(ChatfuelConfig),
    Weni(WeniConfig),
    CloudHumans(CloudHumansConfig),
}

/// The three platforms, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SinkKind {
    Chatfuel,
    Weni,
    CloudHumans,
}

impl SinkKind {
    /// The name used in the report's `sink` column and in config tables.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Chatfuel => "chatfuel",
            SinkKind::Weni => "weni",
            SinkKind::CloudHumans => "cloudhumans",
        }
    }
}

impl SinkConfig {
    pub fn kind(&self) -> SinkKind {
        match self {
            SinkConfig::Chatfuel(_) => SinkKind::Chatfuel,
            SinkConfig::Weni(_) => SinkKind::Weni,
            SinkConfig::CloudHumans(_) => SinkKind::CloudHumans,
        }
    }

    pub fn common(&self) -> &SinkCommon {
        match self {
            SinkConfig::Chatfuel(c) => &c.common,
            SinkConfig::Weni(c) => &c.common,
            SinkConfig::CloudHumans(c) => &c.common,
        }
    }

    pub fn common_mut(&mut self) -> &mut SinkCommon {
        match self {
            SinkConfig::Chatfuel(c) => &mut c.common,
            SinkConfig::Weni(c) => &mut c.common,
            SinkConfig::CloudHumans(c) => &mut c.common,
        }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The config file, for messages.
    pub path: PathBuf,
    pub input: InputConfig,
    /// Resolved against the config file's directory.
    pub report_path: PathBuf,
    /// Resolved against the config file's directory.
    pub state_path: PathBuf,
    /// Enabled sinks, in report order (chatfuel, weni, cloudhumans).
    pub sinks: Vec<SinkConfig>,
}

/// Where a column is used, for "column not in header" errors.
#[derive(Clone, Debug)]
pub struct ColumnUse {
    pub column: String,
    /// Dotted config key, e.g. `sinks.weni.fields.plan`.
    pub key: String,
}

/// Weni value types (API.md §1.4).
const WENI_VALUE_TYPES: [&str; 6] = ["text", "numeric", "datetime", "state", "district", "ward"];

/// Weni reserved field keys (API.md §1.4): the fixed names plus every URN scheme.
pub const WENI_RESERVED_KEYS: [&str; 23] = [
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

impl Config {
    /// Reads and validates the config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text; `path` locates relative paths and names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        Config::from_raw(raw, path)
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();

        let input = raw.input;
        let phone_columns = match input.phone_column {
            OneOrMany::One(c) => vec![c],
            OneOrMany::Many(cs) => cs,
        };
        if phone_columns.is_empty() || phone_columns.iter().any(|c| c.trim().is_empty()) {
            return Err(invalid(
                "input.phone_column",
                "must name at least one column, and no empty names".into(),
            ));
        }
        let default_region = match input.default_region {
            None => None,
            Some(r) => Some(canonical_region(&r).ok_or_else(|| {
                invalid(
                    "input.default_region",
                    format!(
                        "is \"{r}\", which is not a known ISO 3166 alpha-2 region (e.g. \"BR\")"
                    ),
                )
            })?),
        };
        let delimiter = match input.delimiter.as_deref() {
            None | Some("auto") => Delimiter::Auto,
            Some("\\t") | Some("\t") | Some("tab") | Some("TAB") => Delimiter::Byte(b'\t'),
            Some(d) if d.len() == 1 && d.is_ascii() => Delimiter::Byte(d.as_bytes()[0]),
            Some(d) => {
                return Err(invalid(
                    "input.delimiter",
                    format!(
                        "is \"{d}\"; use \"auto\" or one character such as \",\" \";\" \"\\t\" \"|\""
                    ),
                ));
            }
        };
        let encoding = match input
            .encoding
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("utf-8") | Some("utf8") => Encoding::Utf8,
            Some("windows-1252") | Some("cp1252") | Some("latin1") | Some("iso-8859-1") => {
                Encoding::Windows1252
            }
            Some(e) => {
                return Err(invalid(
                    "input.encoding",
                    format!("is \"{e}\"; use \"utf-8\" or \"windows-1252\""),
                ));
            }
        };
        if let Some(dedup) = raw.dedup
            && let Some(keep) = dedup.keep
            && keep != "first"
        {
            return Err(invalid(
                "dedup.keep",
                format!("is \"{keep}\"; only \"first\" is supported"),
            ));
        }
        let report_path = base_dir.join(
            raw.report
                .and_then(|r| r.path)
                .unwrap_or_else(|| "crm-import-report.csv".into()),
        );
        let state_path = base_dir.join(
            raw.state
                .and_then(|s| s.path)
                .unwrap_or_else(|| "crm-import-state.db".into()),
        );

        let mut sinks = Vec::new();
        if let Some(mut raw_sinks) = raw.sinks {
            if let Some(mut c) = raw_sinks.chatfuel.take() {
                let common = c.common();
                if common.enabled != Some(false) {
                    sinks.push(SinkConfig::Chatfuel(chatfuel(c, common, &invalid)?));
                }
            }
            if let Some(mut c) = raw_sinks.weni.take() {
                let common = c.common();
                if common.enabled != Some(false) {
                    sinks.push(SinkConfig::Weni(weni(c, common, &invalid)?));
                }
            }
            if let Some(mut c) = raw_sinks.cloudhumans.take() {
                let common = c.common();
                if common.enabled != Some(false) {
                    sinks.push(SinkConfig::CloudHumans(cloudhumans(c, common, &invalid)?));
                }
            }
        }

        Ok(Config {
            path: path.to_owned(),
            input: InputConfig {
                phone_columns,
                country_column: input.country_column,
                default_region,
                id_column: input.id_column,
                delimiter,
                encoding,
            },
            report_path,
            state_path,
            sinks,
        })
    }

    /// Every column the config reads, with the key that reads it.
    pub fn column_uses(&self) -> Vec<ColumnUse> {
        let mut uses = Vec::new();
        let mut add = |column: &str, key: String| {
            uses.push(ColumnUse {
                column: column.to_owned(),
                key,
            })
        };
        for c in &self.input.phone_columns {
            add(c, "input.phone_column".into());
        }
        if let Some(c) = &self.input.country_column {
            add(c, "input.country_column".into());
        }
        if let Some(c) = &self.input.id_column {
            add(c, "input.id_column".into());
        }
        for sink in &self.sinks {
            let prefix = format!("sinks.{}", sink.kind().name());
            let mut templates: Vec<(String, &Template)> = Vec::new();
            match sink {
                SinkConfig::Chatfuel(c) => {
                    for (prop, column) in &c.property_columns {
                        add(column, format!("{prefix}.property_columns.{prop}"));
                    }
                }
                SinkConfig::Weni(c) => {
                    if let Some(t) = &c.name {
                        templates.push((format!("{prefix}.name"), t));
                    }
                    if let Some(t) = &c.language {
                        templates.push((format!("{prefix}.language"), t));
                    }
                    for (k, t) in &c.fields {
                        templates.push((format!("{prefix}.fields.{k}"), t));
                    }
                }
                SinkConfig::CloudHumans(c) => {
                    if let Some(t) = &c.header_attachment {
                        templates.push((format!("{prefix}.header_attachment"), t));
                    }
                    for (i, t) in c.buttons.iter().enumerate() {
                        templates.push((format!("{prefix}.buttons[{i}]"), t));
                    }
                    for (k, t) in &c.params {
                        templates.push((format!("{prefix}.params.{k}"), t));
                    }
                }
            }
            for (key, template) in templates {
                for column in template.columns() {
                    add(column, key.clone());
                }
            }
        }
        uses
    }
}

type Invalid<'a> = dyn Fn(&str, String) -> ConfigError + 'a;

fn common(
    raw: RawCommon,
    kind: SinkKind,
    defaults: (&str, &str, &str, usize),
    invalid: &Invalid<'_>,
) -> Result<SinkCommon, ConfigError> {
    let key = |k: &str| format!("sinks.{}.{k}", kind.name());
    let (base_url, token_env, rate, concurrency) = defaults;
    let base_url = raw.base_url.unwrap_or_else(|| base_url.to_owned());
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err(invalid(
            &key("base_url"),
            format!("is \"{base_url}\"; it must start with http:// or https://"),
        ));
    }
    let token_env = raw.token_env.unwrap_or_else(|| token_env.to_owned());
    if token_env.is_empty()
        || token_env
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(invalid(
            &key("token_env"),
            "must be the NAME of an environment variable (letters, digits, _), never the token itself"
                .into(),
        ));
    }
    let rate_text = raw.rate.unwrap_or_else(|| rate.to_owned());
    let rate = Rate::parse(&rate_text).ok_or_else(|| {
        invalid(
            &key("rate"),
            format!("is \"{rate_text}\"; write requests per second, minute or hour: \"1/s\", \"50/min\", \"3000/h\""),
        )
    })?;
    let concurrency = int_key(
        raw.concurrency,
        concurrency as i64,
        1..=256,
        &key("concurrency"),
        invalid,
    )? as usize;
    let timeout = duration_key(raw.timeout, "30s", &key("timeout"), invalid)?;
    let max_retries = int_key(raw.max_retries, 8, 0..=100, &key("max_retries"), invalid)? as u32;
    let retry_backoff = duration_key(raw.retry_backoff, "250ms", &key("retry_backoff"), invalid)?;
    Ok(SinkCommon {
        base_url: base_url.trim_end_matches('/').to_owned(),
        token_env,
        rate,
        concurrency,
        timeout,
        max_retries,
        retry_backoff,
    })
}

/// An integer key within `range`, or its default.
fn int_key(
    value: Option<i64>,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
    key: &str,
    invalid: &Invalid<'_>,
) -> Result<i64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if range.contains(&v) => Ok(v),
        Some(v) => Err(invalid(
            key,
            format!("is {v}; use {} to {}", range.start(), range.end()),
        )),
    }
}

/// A duration key ("30s", "250ms"), or its default.
fn duration_key(
    value: Option<String>,
    default: &str,
    key: &str,
    invalid: &Invalid<'_>,
) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    parse_duration(&text).ok_or_else(|| {
        invalid(
            key,
            format!("is \"{text}\"; write a duration such as \"{default}\" or \"500ms\""),
        )
    })
}

fn template(key: &str, text: &str, invalid: &Invalid<'_>) -> Result<Template, ConfigError> {
    Template::parse(text).map_err(|e| invalid(key, e.to_string()))
}

fn chatfuel(
    raw: RawChatfuel,
    common_keys: RawCommon,
    invalid: &Invalid<'_>,
) -> Result<ChatfuelConfig, ConfigError> {
    let common = common(
        common_keys,
        SinkKind::Chatfuel,
        ("https://panel.chatfuel.com", "CHATFUEL_API_TOKEN", "1/s", 2),
        invalid,
    )?;
    let automation_id = raw
        .automation_id
        .map(Scalar::into_text)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| invalid("sinks.chatfuel.automation_id", "is required".into()))?;
    let batch_size = match raw.batch_size {
        None => 1000,
        Some(b) if (1..=1000).contains(&b) => b as usize,
        Some(b) => {
            return Err(invalid(
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
        return Err(invalid(
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

/// Whether `key` is a field key Weni would derive from a label equal to it (API.md §1.4).
fn valid_weni_field_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    key.len() <= 36
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !key.ends_with('_')
        && !key.contains("__")
        && !WENI_RESERVED_KEYS.contains(&key)
}

fn weni(
    raw: RawWeni,
    common_keys: RawCommon,
    invalid: &Invalid<'_>,
) -> Result<WeniConfig, ConfigError> {
    let common = common(
        common_keys,
        SinkKind::Weni,
        ("https://flows.weni.ai", "WENI_API_TOKEN", "3000/h", 4),
        invalid,
    )?;
    let urn_scheme = match raw.urn_scheme.as_deref() {
        None | Some("whatsapp") => UrnScheme::Whatsapp,
        Some("tel") => UrnScheme::Tel,
        Some(s) => {
            return Err(invalid(
                "sinks.weni.urn_scheme",
                format!("is \"{s}\"; use \"whatsapp\" or \"tel\""),
            ));
        }
    };
    let mode = match raw.mode.as_deref() {
        None | Some("upsert") => WeniMode::Upsert,
        Some("delete") => WeniMode::Delete,
        Some(m) => {
            return Err(invalid(
                "sinks.weni.mode",
                format!("is \"{m}\"; use \"upsert\" or \"delete\""),
            ));
        }
    };
    let name = raw
        .name
        .map(|t| template("sinks.weni.name", &t, invalid))
        .transpose()?;
    let language = match raw.language {
        None => None,
        Some(text) => {
            let t = template("sinks.weni.language", &text, invalid)?;
            if t.columns().next().is_none()
                && !(text.len() == 3 && text.bytes().all(|b| b.is_ascii_lowercase()))
            {
                return Err(invalid(
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
            return Err(invalid(
                &format!("sinks.weni.groups[{i}]"),
                format!(
                    "is \"{g}\"; Weni group names are 1 to 64 characters with no leading or trailing space"
                ),
            ));
        }
    }
    let mut fields = BTreeMap::new();
    for (key, text) in raw.fields.unwrap_or_default() {
        if !valid_weni_field_key(&key) {
            return Err(invalid(
                &format!("sinks.weni.fields.{key}"),
                "is not a usable Weni field key: lower-case letters, digits and single underscores, starting with a letter, at most 36 characters, not a reserved name".into(),
            ));
        }
        let t = template(&format!("sinks.weni.fields.{key}"), &text, invalid)?;
        fields.insert(key, t);
    }
    let field_types = raw.field_types.unwrap_or_default();
    for (key, ty) in &field_types {
        if !WENI_VALUE_TYPES.contains(&ty.as_str()) {
            return Err(invalid(
                &format!("sinks.weni.field_types.{key}"),
                format!("is \"{ty}\"; use one of {}", WENI_VALUE_TYPES.join(", ")),
            ));
        }
    }
    Ok(WeniConfig {
        common,
        urn_scheme,
        name,
        language,
        groups,
        fields,
        field_types,
        mode,
    })
}

fn cloudhumans(
    raw: RawCloudHumans,
    common_keys: RawCommon,
    invalid: &Invalid<'_>,
) -> Result<CloudHumansConfig, ConfigError> {
    let common = common(
        common_keys,
        SinkKind::CloudHumans,
        (
            "https://cloudchat.cloudhumans.com",
            "CLOUDHUMANS_API_TOKEN",
            "10/s",
            4,
        ),
        invalid,
    )?;
    let required = |value: Option<String>, key: &str| {
        value
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| invalid(key, "is required".into()))
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
        .map(|t| template("sinks.cloudhumans.header_attachment", &t, invalid))
        .transpose()?;
    let buttons = raw
        .buttons
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, t)| template(&format!("sinks.cloudhumans.buttons[{i}]"), t, invalid))
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
            return Err(invalid(
                &format!("sinks.cloudhumans.params.{key}"),
                "collides with a key the tool sets itself".into(),
            ));
        }
        let t = template(&format!("sinks.cloudhumans.params.{key}"), &text, invalid)?;
        params.insert(key, t);
    }
    let max_messages = match raw.max_messages {
        None => None,
        Some(m) if m >= 0 => Some(m as u64),
        Some(m) => {
            return Err(invalid(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/crm/import.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("[input]\nphone_column = \"phone\"\n").unwrap();
        assert_eq!(c.input.phone_columns, vec!["phone"]);
        assert_eq!(c.report_path, Path::new("/etc/crm/crm-import-report.csv"));
        assert!(c.sinks.is_empty());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[input]\nphone_column = \"p\"\nphone_colum = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("phone_colum"), "{err}");
        let err =
            parse("[input]\nphone_column = \"p\"\n[sinks.weni]\nrat = \"1/s\"\n").unwrap_err();
        assert!(err.to_string().contains("rat"), "{err}");
    }

    #[test]
    fn batch_size_over_api_limit() {
        let err = parse(
            "[input]\nphone_column = \"p\"\n[sinks.chatfuel]\nautomation_id = \"a\"\nbatch_size = 1500\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("sinks.chatfuel.batch_size"),
            "{err}"
        );
    }

    #[test]
    fn bad_region_and_rate() {
        let err = parse("[input]\nphone_column = \"p\"\ndefault_region = \"XX\"\n").unwrap_err();
        assert!(err.to_string().contains("input.default_region"), "{err}");
        let err =
            parse("[input]\nphone_column = \"p\"\n[sinks.weni]\nrate = \"fast\"\n").unwrap_err();
        assert!(err.to_string().contains("sinks.weni.rate"), "{err}");
    }

    #[test]
    fn rates_parse() {
        assert_eq!(Rate::parse("50/min").unwrap().per_second(), 50.0 / 60.0);
        assert_eq!(
            Rate::parse("3000/h").unwrap().per,
            Duration::from_secs(3600)
        );
        assert!(Rate::parse("0/s").is_none());
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    }

    #[test]
    fn disabled_sink_is_skipped_and_columns_are_listed() {
        let c = parse(
            r#"[input]
phone_column = ["mobile", "phone"]
id_column = "id"
[sinks.chatfuel]
automation_id = "a"
enabled = false
[sinks.weni]
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
