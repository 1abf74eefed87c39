//! The payload hashes the state persists, pinned for each sink.
//!
//! A re-run sends a contact again when its payload hash differs from the one
//! stored. If a change to a sink's check altered these values by accident,
//! the next nightly run would resend every contact: for Weni at 3,000
//! requests an hour, days of traffic. The values are those of 3e6d77e (before
//! issue 11's second pass reworked the Chatfuel and Weni checks); a dry run of
//! that build against a state written by the reworked one also found all
//! 775,689 contacts of each sink `unchanged`.

use std::path::Path;

use crm_import::config::Config;
use crm_import::phone::E164;
use crm_import::pipeline::bind_layout;
use crm_import::record::Chunk;
use crm_import::sink::{Check, RowView};

const CONFIG: &str = r#"
[input]
phone_column   = ["phone", "mobile"]
country_column = "country"
id_column      = "id"

[sinks.chatfuel]
automation_id    = "62ed0d816e5d77079f07db49"
properties       = { subscribed = "true", source = "crm_import" }
property_columns = { pricingPlan = "plan" }

[sinks.weni]
name     = "{first_name} {last_name}"
language = "{language}"
groups   = ["CRM import"]
fields   = { plan = "{plan}", city = "{city}", signup = "{signup_date}" }

[sinks.cloudhumans]
account_id    = "123"
inbox_id      = "456"
template_name = "welcome_v2"
header_attachment = "https://cdn.example.com/welcome/{plan}.jpg"
buttons       = ["{id}"]
params        = { name = "{first_name}", custom_code = "{id}" }
"#;

fn value_of(column: &str) -> &'static str {
    match column {
        "id" => "42",
        "phone" => "+55 11 98765-4321",
        "mobile" => "",
        "country" => "BR",
        "plan" => "gold",
        "first_name" => "Ana",
        "last_name" => " Souza ",
        "language" => "por",
        "city" => "São Paulo",
        "signup_date" => "2024-03-01",
        other => panic!("unexpected column {other}"),
    }
}

#[test]
fn payload_hashes_of_every_sink_are_pinned() {
    let mut config = Config::parse(CONFIG, Path::new("/etc/crm/import.toml")).unwrap();
    let layout = bind_layout(&mut config);
    let mut chunk = Chunk::new(0, 0, "crm.csv".into(), layout.columns.len());
    chunk.begin_row(1);
    for (column, _) in &layout.columns {
        chunk.push_cell(value_of(column));
    }
    let row = RowView {
        chunk: &chunk,
        index: 0,
    };
    let phone = E164(5511987654321);
    let hashes: Vec<(String, u64)> = config
        .sinks
        .iter()
        .map(|sink| match sink.check(row, phone, true) {
            Check::Ready { hash, .. } => (sink.kind().name().to_owned(), hash),
            other => panic!("{} did not accept the row: {other:?}", sink.kind().name()),
        })
        .collect();
    let expected: Vec<(String, u64)> = vec![
        ("chatfuel".into(), PINNED_CHATFUEL),
        ("weni".into(), PINNED_WENI),
        ("cloudhumans".into(), PINNED_CLOUDHUMANS),
    ];
    assert_eq!(hashes, expected);
}

/// Computed by 3e6d77e's checks (the same test run on that commit) and by this one.
const PINNED_CHATFUEL: u64 = 7_090_960_975_077_209_241;
const PINNED_WENI: u64 = 3_883_046_962_977_074_055;
const PINNED_CLOUDHUMANS: u64 = 9_863_700_270_376_905_731;
