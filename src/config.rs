//! The TOML config file (SPEC "Configuration") → a typed, validated [`Config`].
//!
//! Parsing is two-step: serde reads the raw tables with `deny_unknown_fields`
//! (so a typo such as `phone_colum` is an error naming the key and its line),
//! then [`Config::from_raw`] checks values and fills defaults, naming the
//! dotted key at fault in every error. Columns are checked against the input
//! header later, by [`Config::column_uses`], before any row is processed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::phone::canonical_region;
use crate::sink::{ParseContext, REGISTRY, RawCommon, Sink, SinkKind};
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
pub enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    pub fn into_text(self) -> String {
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
    /// `[sinks.<name>]` tables, each read by its platform (see `sink::REGISTRY`).
    sinks: Option<toml::Table>,
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

/// The longest duration any key or flag takes: a year.
pub const MAX_DURATION_SECS: f64 = 365.0 * 86_400.0;

/// Parses "30s", "500ms", "2min", "1h" (positive, at most a year).
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
    // At most a year: anything longer is a typo, and `from_secs_f64` would panic past u64 seconds.
    (seconds > 0.0 && seconds <= MAX_DURATION_SECS)
        .then(|| Duration::try_from_secs_f64(seconds).ok())
        .flatten()
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
    /// Bound on establishing the connection: a request that never connected is
    /// retried and ends `failed`, never `unknown`.
    pub connect_timeout: Duration,
    pub max_retries: u32,
    /// First backoff step; each retry doubles it (full jitter, at most 30 s).
    pub retry_backoff: Duration,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The config file, for messages.
    pub path: PathBuf,
    pub input: InputConfig,
    /// Resolved against the config file's directory.
    pub report_path: PathBuf,
    /// Resolved against the config file's directory.
    pub state_path: PathBuf,
    /// Enabled sinks, in report order (the registry's).
    pub sinks: Vec<Box<dyn Sink>>,
}

/// Where a column is used, for "column not in header" errors.
#[derive(Clone, Debug)]
pub struct ColumnUse {
    pub column: String,
    /// Dotted config key, e.g. `sinks.weni.fields.plan`.
    pub key: String,
}

impl ColumnUse {
    /// Every column `template` reads, for config key `key`.
    pub fn of_template(key: &str, template: &Template) -> impl Iterator<Item = ColumnUse> {
        template.columns().map(move |column| ColumnUse {
            column: column.to_owned(),
            key: key.to_owned(),
        })
    }
}

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

        let sinks = parse_sinks(raw.sinks.unwrap_or_default(), path)?;

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
            uses.extend(sink.column_uses());
        }
        uses
    }
}

/// Reads every `[sinks.<name>]` table through its platform's parser, in registry order.
fn parse_sinks(mut tables: toml::Table, path: &Path) -> Result<Vec<Box<dyn Sink>>, ConfigError> {
    if let Some(unknown) = tables.keys().find(|k| SinkKind::by_name(k).is_none()) {
        let known: Vec<&str> = REGISTRY.iter().map(|p| p.name).collect();
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("sinks.{unknown}"),
            message: format!("is not a known platform; use one of {}", known.join(", ")),
        });
    }
    let ctx = ParseContext { path };
    let mut sinks = Vec::new();
    for (i, platform) in REGISTRY.iter().enumerate() {
        if let Some(table) = tables.remove(platform.name) {
            let enabled = table.get("enabled").and_then(toml::Value::as_bool) != Some(false);
            let sink = (platform.parse)(table, SinkKind(i as u8), &ctx)?;
            if enabled {
                sinks.push(sink);
            }
        }
    }
    Ok(sinks)
}

/// Defaults of the keys every sink has.
pub struct CommonDefaults {
    pub base_url: &'static str,
    pub token_env: &'static str,
    pub rate: &'static str,
    pub concurrency: usize,
}

/// Whether `url` is `http(s)://` on a loopback host (127.0.0.0/8, ::1, localhost).
fn is_loopback_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or("");
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Validates the keys every sink has.
pub fn sink_common(
    raw: RawCommon,
    kind: SinkKind,
    defaults: CommonDefaults,
    ctx: &ParseContext<'_>,
) -> Result<SinkCommon, ConfigError> {
    let key = |k: &str| format!("sinks.{}.{k}", kind.name());
    let base_url = raw.base_url.unwrap_or_else(|| defaults.base_url.to_owned());
    // A token must never cross the network in clear text (SPEC "Transport").
    if !(base_url.starts_with("https://") || is_loopback_url(&base_url)) {
        return Err(ctx.invalid(
            &key("base_url"),
            format!("is \"{base_url}\"; it must start with https:// (http:// only on loopback)"),
        ));
    }
    let token_env = raw
        .token_env
        .unwrap_or_else(|| defaults.token_env.to_owned());
    if token_env.is_empty()
        || token_env
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(ctx.invalid(
            &key("token_env"),
            "must be the NAME of an environment variable (letters, digits, _), never the token itself"
                .into(),
        ));
    }
    let rate_text = raw.rate.unwrap_or_else(|| defaults.rate.to_owned());
    let rate = Rate::parse(&rate_text).ok_or_else(|| {
        ctx.invalid(
            &key("rate"),
            format!("is \"{rate_text}\"; write requests per second, minute or hour: \"1/s\", \"50/min\", \"3000/h\""),
        )
    })?;
    let concurrency = int_key(
        raw.concurrency,
        defaults.concurrency as i64,
        1..=256,
        &key("concurrency"),
        ctx,
    )? as usize;
    let timeout = duration_key(raw.timeout, "30s", &key("timeout"), ctx)?;
    let connect_timeout = duration_key(raw.connect_timeout, "10s", &key("connect_timeout"), ctx)?;
    let max_retries = int_key(raw.max_retries, 8, 0..=100, &key("max_retries"), ctx)? as u32;
    let retry_backoff = duration_key(raw.retry_backoff, "250ms", &key("retry_backoff"), ctx)?;
    Ok(SinkCommon {
        base_url: base_url.trim_end_matches('/').to_owned(),
        token_env,
        rate,
        concurrency,
        timeout,
        connect_timeout,
        max_retries,
        retry_backoff,
    })
}

/// An integer key within `range`, or its default.
pub fn int_key(
    value: Option<i64>,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
    key: &str,
    ctx: &ParseContext<'_>,
) -> Result<i64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if range.contains(&v) => Ok(v),
        Some(v) => Err(ctx.invalid(
            key,
            format!("is {v}; use {} to {}", range.start(), range.end()),
        )),
    }
}

/// A duration key ("30s", "250ms"), or its default.
pub fn duration_key(
    value: Option<String>,
    default: &str,
    key: &str,
    ctx: &ParseContext<'_>,
) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    parse_duration(&text).ok_or_else(|| {
        ctx.invalid(
            key,
            format!("is \"{text}\"; write a positive duration of at most a year, such as \"{default}\" or \"500ms\""),
        )
    })
}

/// A `{column}` template key.
pub fn template_key(
    key: &str,
    text: &str,
    ctx: &ParseContext<'_>,
) -> Result<Template, ConfigError> {
    Template::parse(text).map_err(|e| ctx.invalid(key, e.to_string()))
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
    fn unknown_keys_and_platforms_are_named() {
        let err = parse("[input]\nphone_column = \"p\"\nphone_colum = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("phone_colum"), "{err}");
        let err = parse("[input]\nphone_column = \"p\"\n[sinks.telegram]\n").unwrap_err();
        assert!(err.to_string().contains("sinks.telegram"), "{err}");
    }

    #[test]
    fn bad_region() {
        let err = parse("[input]\nphone_column = \"p\"\ndefault_region = \"XX\"\n").unwrap_err();
        assert!(err.to_string().contains("input.default_region"), "{err}");
    }

    #[test]
    fn rates_and_durations_parse_without_panicking() {
        assert_eq!(Rate::parse("50/min").unwrap().per_second(), 50.0 / 60.0);
        assert_eq!(
            Rate::parse("3000/h").unwrap().per,
            Duration::from_secs(3600)
        );
        assert!(Rate::parse("0/s").is_none());
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("6h"), Some(Duration::from_secs(6 * 3600)));
        for absurd in ["99999999999999999999s", "0s", "-5s", "1e300s", "inf", ""] {
            assert_eq!(parse_duration(absurd), None, "{absurd}");
        }
    }

    #[test]
    fn plain_http_only_on_loopback() {
        assert!(is_loopback_url("http://127.0.0.1:8080"));
        assert!(is_loopback_url("http://localhost:9/x"));
        assert!(is_loopback_url("http://[::1]:80"));
        assert!(!is_loopback_url("http://example.com"));
        assert!(!is_loopback_url("http://127.0.0.1.example.com"));
    }
}
