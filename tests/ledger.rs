//! A ledger and a transport you can trust: each test is named after a way
//! the tool could lose or double-deliver rows, or leak a token, and drives the
//! real binary against the sandbox on 127.0.0.1.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::rig::{Rig, SINKS, TOKEN, by_sink, config, phones, received, sandbox_options};
use common::{assert_invariant, read_report};

fn only_cloudhumans() -> String {
    config("enabled = false", "enabled = false", "")
}

/// Regression: `--sandbox` wrote the production state, so the real run after
/// a rehearsal sent nothing.
#[test]
fn sandbox_rehearsal_never_touches_the_configured_state() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(30));
    let cfg = config("", "", "");
    let rehearsal = rig
        .command_for(&cfg, &["--sandbox"], "rehearsal.csv")
        .output()
        .unwrap();
    assert_eq!(
        rehearsal.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rehearsal.stderr)
    );
    assert!(!rig.path("crm-import-state.db").exists());
    assert!(rig.path("crm-import-state.db.sandbox.db").exists());
    assert!(
        rig.log().cloudhumans().messages.is_empty(),
        "the rehearsal used its own fakes"
    );

    let real = rig.run(&cfg, [TOKEN; 3]);
    assert_eq!(real.code, 0, "{}", real.stderr);
    assert_invariant(&real.report, &SINKS, &[("in.csv", n)]);
    assert!(real.report.iter().all(|r| r["status"] != "unchanged"));
    assert_eq!(
        received(&real.log)[2].len(),
        30,
        "every message went out for real"
    );
}

/// Regression: the state key had no endpoint, so pointing Weni at another org
/// (here: the same server under another name) sent nothing.
#[test]
fn pointing_weni_at_another_base_url_starts_it_from_nothing() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(20));
    assert_eq!(rig.run(&config("", "", ""), [TOKEN; 3]).code, 0);
    let elsewhere = rig.url().replace("127.0.0.1", "localhost");
    let cfg = config("", &format!("base_url = \"{elsewhere}\""), "");
    let rerun = rig.run(&cfg, [TOKEN; 3]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    for r in by_sink(&rerun.report, "weni") {
        assert_eq!(r["status"], "updated", "{r:?}");
    }
    for sink in ["chatfuel", "cloudhumans"] {
        for r in by_sink(&rerun.report, sink) {
            assert_eq!(r["status"], "unchanged", "{r:?}");
        }
    }
}

/// A state file written by the previous version (schema 1, made by that
/// binary from the demo fixture) is upgraded in place: its deliveries belong
/// to the endpoints of the config that first opens it, and nothing is resent.
#[test]
fn a_schema_1_state_file_is_upgraded_in_place_and_keeps_its_deliveries() {
    let rig = Rig::new(sandbox_options());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(manifest.join("fixtures/contacts.csv"), rig.path("in.csv")).unwrap();
    std::fs::copy(
        manifest.join("fixtures/state-v1.db"),
        rig.path("crm-import-state.db"),
    )
    .unwrap();
    let demo = std::fs::read_to_string(manifest.join("fixtures/demo.toml")).unwrap();
    let cfg = demo
        .replace("path = \"../crm-import-report.csv\"", "path = \"r.csv\"")
        .replace(
            "path = \"../crm-import-state.db\"",
            "path = \"crm-import-state.db\"",
        )
        .replace("[sinks.chatfuel]", "[sinks.chatfuel]\nbase_url = \"{url}\"")
        .replace("[sinks.weni]", "[sinks.weni]\nbase_url = \"{url}\"")
        .replace(
            "[sinks.cloudhumans]",
            "[sinks.cloudhumans]\nbase_url = \"{url}\"",
        );
    let run = rig.run(&cfg, [TOKEN; 3]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sink_rows: Vec<_> = run
        .report
        .iter()
        .filter(|r| !r["sink"].is_empty())
        .collect();
    assert_eq!(sink_rows.len(), 14 * 3);
    assert!(
        sink_rows.iter().all(|r| r["status"] == "unchanged"),
        "{sink_rows:?}"
    );
    let stats = &run.log.stats;
    assert!(
        stats.values().all(|s| s.requests == 0),
        "no request: {stats:?}"
    );

    let db = rusqlite::Connection::open(rig.path("crm-import-state.db")).unwrap();
    let version: String = db
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, "2");
    let weni_scope: String = db
        .query_row("SELECT scope FROM scopes WHERE sink = 'weni'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(weni_scope, rig.url(), "claimed by this config's endpoint");
}

/// Regression: a token with a trailing `\r` (a CRLF `.env` file) made every
/// CloudHumans row `unknown` for good.
#[test]
fn a_token_with_a_trailing_cr_is_trimmed() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(5));
    let with_cr = format!("{TOKEN}\r");
    let run = rig.run(&only_cloudhumans(), [&with_cr, &with_cr, &with_cr]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.report.iter().all(|r| r["status"] == "sent"),
        "{:?}",
        run.report
    );
}

/// A token that cannot form a header is refused at start, naming the
/// variable, never the value, with nothing sent.
#[test]
fn a_token_that_cannot_form_a_header_exits_1_naming_the_variable() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(5));
    let bad = "abc\u{1}secret-value";
    let out = rig
        .command_for(&only_cloudhumans(), &[], "r.csv")
        .env("CLOUDHUMANS_API_TOKEN", bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CLOUDHUMANS_API_TOKEN"), "{stderr}");
    assert!(!stderr.contains("secret-value"), "{stderr}");
    assert!(rig.log().stats.is_empty(), "nothing was sent");
}

/// Regression: `Retry-After: inf` or `1e300` panicked inside a sink worker and
/// the rows vanished; `-5`, `abc` and a past date must not pause either.
#[test]
fn hostile_retry_after_values_mean_backoff_and_every_row_arrives() {
    for value in ["inf", "1e300", "-5", "abc", "Wed, 21 Oct 2015 07:28:00 GMT"] {
        let mut options = sandbox_options();
        options.platform_mut("cloudhumans").retry_after = Some((value.into(), 1));
        let rig = Rig::new(options);
        let n = rig.input(&phones(5));
        let run = rig.run(&only_cloudhumans(), [TOKEN; 3]);
        assert_eq!(run.code, 0, "Retry-After {value}: {}", run.stderr);
        assert_invariant(&run.report, &["cloudhumans"], &[("in.csv", n)]);
        assert_eq!(
            run.log.cloudhumans().messages.len(),
            5,
            "Retry-After {value}"
        );
        assert_eq!(run.log.stats["cloudhumans"].throttled, 1);
    }
}

/// Regression: a pause ignored Ctrl-C, so Weni's `Retry-After: 3600` kept an
/// interrupted run alive for an hour.
#[test]
fn an_hour_long_retry_after_is_cut_short_by_a_signal() {
    let mut options = sandbox_options();
    options.platform_mut("weni").retry_after = Some(("3600".into(), u64::MAX));
    let rig = Rig::new(options);
    let n = rig.input(&phones(10));
    let cfg = config("enabled = false", "", "enabled = false");
    let child = rig.spawn_args(&cfg, &[], "paused.csv");
    assert!(rig.wait_until(Duration::from_secs(30), |log| {
        log.stats.get("weni").is_some_and(|s| s.throttled >= 1)
    }));
    let signalled = Instant::now();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "{:?}",
        signalled.elapsed()
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_invariant(
        &read_report(&rig.path("paused.csv")),
        &["weni"],
        &[("in.csv", n)],
    );
}

/// Regression: redirects were followed — a POST became a GET and
/// CloudHumans' `api_access_token` followed to the other host. A 3xx ends the
/// row `rejected` with the location, and the other port receives nothing.
#[test]
fn a_307_to_another_port_is_rejected_and_that_port_receives_nothing() {
    let elsewhere = Rig::new(sandbox_options());
    let mut options = sandbox_options();
    let target = format!("{}/somewhere?token=x", elsewhere.url());
    options.platform_mut("chatfuel").redirect_to = Some(target.clone());
    options.platform_mut("weni").redirect_to = Some(target.clone());
    options.platform_mut("cloudhumans").redirect_to = Some(target);
    let rig = Rig::new(options);
    let n = rig.input(&phones(6));
    let run = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert_invariant(&run.report, &SINKS, &[("in.csv", n)]);
    for sink in ["chatfuel", "cloudhumans"] {
        for r in by_sink(&run.report, sink) {
            assert_eq!(r["status"], "rejected", "{r:?}");
            assert_eq!(r["http_status"], "307");
            assert!(r["detail"].contains("redirected to"), "{r:?}");
            assert!(!r["detail"].contains("token=x"), "no query string: {r:?}");
        }
    }
    for r in by_sink(&run.report, "weni") {
        assert!(r["detail"].contains("redirected to"), "{r:?}");
    }
    assert!(
        elsewhere.log().stats.is_empty(),
        "{:?}",
        elsewhere.log().stats
    );
}

/// Regression: absurd durations panicked (`Duration::from_secs_f64`) instead
/// of naming the key.
#[test]
fn an_absurd_timeout_is_a_config_error_naming_the_key() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(2));
    for (key, value) in [
        ("timeout", "99999999999999999999s"),
        ("retry_backoff", "1e300s"),
    ] {
        let cfg = config("", &format!("{key} = \"{value}\""), "");
        let run = rig.run(&cfg, [TOKEN; 3]);
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(
            run.stderr.contains(&format!("sinks.weni.{key}")),
            "{}",
            run.stderr
        );
    }
    assert!(rig.log().stats.is_empty());
}

/// Regression: an unterminated quote swallowed the rest of the file into one
/// record (unbounded memory). Now: exit 1 naming the file and the line where
/// the row started, after a bounded read.
#[test]
fn an_unterminated_quote_in_a_50_mb_file_names_the_file_and_line() {
    let rig = Rig::new(sandbox_options());
    let mut text = String::from("id,first_name,phone,plan,language\n");
    for i in 0..10 {
        text.push_str(&format!("{i},A,+5511960000{i:03},gold,por\n"));
    }
    text.push_str("10,\"Broken,+5511960000999,gold,por\n");
    let filler = "11,B,+5511960001000,gold,por\n".repeat(50 * 1024 * 1024 / 28);
    text.push_str(&filler);
    std::fs::write(rig.path("in.csv"), text).unwrap();
    let run = rig.run_args(&config("", "", ""), [TOKEN; 3], &["--dry-run"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("in.csv") && run.stderr.contains("line 12"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("unterminated quote"), "{}", run.stderr);
}

/// Regression: when the report could not be written (disk full), rows kept
/// going out with no accountant. Now no new request starts and the run exits
/// 1 naming the report and the OS error.
#[test]
fn a_report_on_a_full_disk_stops_delivery_and_exits_1() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(200));
    std::os::unix::fs::symlink("/dev/full", rig.path("full.csv")).unwrap();
    let cfg = config("enabled = false", "rate = \"20/s\"", "enabled = false");
    let out = rig.command_for(&cfg, &[], "full.csv").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("full.csv"), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let writes = rig.log().weni().writes.len();
    assert!(
        writes < 150,
        "{writes} contacts were sent after the report failed"
    );
}

/// Tokens never reach the JSONL or Parquet reports, the state database (and
/// its WAL), or a `RUST_LOG=trace` log.
#[test]
fn tokens_never_reach_reports_state_or_trace_logs() {
    let secret = "s3cr3t-Tok3n-8f9a7d6c5b4a";
    let mut options = sandbox_options();
    options.token = secret.into();
    // Some refusals and retries, so error paths are logged too.
    options.platform_mut("weni").faults.error_rate = 0.3;
    let rig = Rig::new(options);
    rig.input(&phones(20));
    let cfg = config("", "", "");
    for report in ["r.jsonl", "r.parquet"] {
        let out = rig
            .command_for(&cfg, &["--full", "--resend-messages"], report)
            .env("RUST_LOG", "trace")
            .env("CHATFUEL_API_TOKEN", secret)
            .env("WENI_API_TOKEN", secret)
            .env("CLOUDHUMANS_API_TOKEN", secret)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("http attempt"),
            "the trace log has the attempts"
        );
        assert!(
            !stderr.contains(secret),
            "a token leaked into the trace log"
        );
        assert!(
            !stderr.contains("8f9a7d6c5b4a"),
            "a token leaked into the trace log"
        );
    }
    assert!(!contains(&rig.path("r.jsonl"), secret));
    assert!(!parquet_text(&rig.path("r.parquet")).contains(secret));
    for file in ["crm-import-state.db", "crm-import-state.db-wal"] {
        assert!(!contains(&rig.path(file), secret), "{file}");
    }
}

fn contains(path: &Path, needle: &str) -> bool {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Every value of a Parquet report, as text.
fn parquet_text(path: &Path) -> String {
    let rows = common::read_parquet_report(path);
    let text: String = rows
        .iter()
        .flat_map(|r| r.values())
        .map(|v| format!("{v}\n"))
        .collect();
    assert!(text.contains("weni"), "the report was read");
    text
}

/// Regression: Weni pagination followed `next` to any origin with the token
/// attached. A `next` link to another origin is refused; that origin receives nothing.
#[test]
fn a_weni_next_link_to_another_origin_is_not_followed() {
    let elsewhere = Rig::new(sandbox_options());
    let mut options = sandbox_options();
    options.page_size = 1;
    options.weni_next_origin = Some(elsewhere.url());
    let rig = Rig::new(options);
    let n = rig.input(&phones(3));
    // The first run creates two fields; then the fields list is two pages long.
    let weni = "fields = { plan = \"{plan}\", signup = \"{id}\" }";
    let cfg = config("enabled = false", weni, "enabled = false");
    assert_eq!(rig.run(&cfg, [TOKEN; 3]).code, 0);
    let run = rig.run_args(&cfg, [TOKEN; 3], &["--full"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert_invariant(&run.report, &["weni"], &[("in.csv", n)]);
    for r in &run.report {
        assert_eq!(r["status"], "skipped", "{r:?}");
        assert!(r["detail"].contains("links to another origin"), "{r:?}");
    }
    assert!(
        elsewhere.log().stats.is_empty(),
        "{:?}",
        elsewhere.log().stats
    );
}

/// A dry run reads a schema-1 state file's deliveries without upgrading it
/// (a dry run never writes the state).
#[test]
fn a_dry_run_reads_a_schema_1_state_file_without_writing_it() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let state = dir.path().join("crm-import-state.db");
    std::fs::copy(manifest.join("fixtures/state-v1.db"), &state).unwrap();
    let before = std::fs::read(&state).unwrap();
    let demo = std::fs::read_to_string(manifest.join("fixtures/demo.toml")).unwrap();
    let cfg = demo
        .replace("path = \"../crm-import-report.csv\"", "path = \"r.csv\"")
        .replace(
            "path = \"../crm-import-state.db\"",
            "path = \"crm-import-state.db\"",
        );
    std::fs::write(dir.path().join("demo.toml"), cfg).unwrap();
    let out = Command::new(common::rig::BIN)
        .args(["run", "-q", "--dry-run", "--config"])
        .arg(dir.path().join("demo.toml"))
        .arg(manifest.join("fixtures/contacts.csv"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = read_report(&dir.path().join("r.csv"));
    let sink_rows: Vec<_> = report.iter().filter(|r| !r["sink"].is_empty()).collect();
    assert_eq!(sink_rows.len(), 14 * 3);
    assert!(
        sink_rows.iter().all(|r| r["status"] == "unchanged"),
        "{sink_rows:?}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "the state file is untouched"
    );
}
