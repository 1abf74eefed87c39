//! Inputs in object storage: the real binary reads `s3://` URLs from a real
//! S3-protocol server (s3s + s3s-fs, SigV4) started in this process on
//! 127.0.0.1 — never a mock of our own code.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use common::rig::{BIN, Rig, SINKS, TOKEN, config, sandbox_options};
use common::{assert_invariant, read_report};
use s3::{S3, SECRET_KEY};

/// `id,first_name,phone,plan,language` rows for phones `from..to` (unique, valid BR mobiles).
fn csv_rows(from: usize, to: usize, delimiter: char) -> String {
    let d = delimiter;
    let mut text = format!("id{d}first_name{d}phone{d}plan{d}language\n");
    for i in from..to {
        text.push_str(&format!(
            "{}{d}Name{i}{d}+55 11 9{:08}{d}gold{d}por\n",
            i + 1,
            60000000 + i * 7
        ));
    }
    text
}

fn gzip(text: &str) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap()
}

fn parquet_rows(from: usize, to: usize) -> Vec<u8> {
    let column = |f: &dyn Fn(usize) -> String| -> ArrayRef {
        Arc::new(StringArray::from((from..to).map(f).collect::<Vec<_>>()))
    };
    let batch = RecordBatch::try_from_iter([
        ("id", column(&|i| (i + 1).to_string())),
        ("first_name", column(&|i| format!("Name{i}"))),
        (
            "phone",
            column(&|i| format!("+55 11 9{:08}", 60000000 + i * 7)),
        ),
        ("plan", column(&|_| "gold".into())),
        ("language", column(&|_| "por".into())),
        ("unused_wide_column", column(&|_| "x".repeat(2000))),
    ])
    .unwrap();
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

/// A prefix with every kind of data part plus objects that are not data.
fn exports(s3: &S3) {
    s3.bucket("crm");
    s3.put("crm", "exports/part-1.csv", csv_rows(0, 10, ',').as_bytes());
    s3.put(
        "crm",
        "exports/part-2.csv.gz",
        &gzip(&csv_rows(10, 20, ',')),
    );
    s3.put(
        "crm",
        "exports/part-3.tsv",
        csv_rows(20, 30, '\t').as_bytes(),
    );
    s3.put("crm", "exports/part-4.parquet", &parquet_rows(30, 40));
    s3.put("crm", "exports/_SUCCESS", b"");
    s3.put("crm", "exports/README.txt", b"nightly export");
}

/// The binary in the rig's directory with the rig's three-sink config
/// (`import.toml`), reporting to `r.csv`, with `args` after `run`.
fn crm_import(rig: &Rig, args: &[&str]) -> Command {
    std::fs::write(
        rig.path("import.toml"),
        config("", "", "").replace("{url}", &rig.url()),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command
        .current_dir(rig.path(""))
        .args(["run", "-q", "--config", "import.toml", "--report", "r.csv"])
        .args(args);
    command
}

/// A dry run of `inputs` with the rig's three-sink config, in the rig's directory.
fn dry_run(rig: &Rig, s3: &S3, inputs: &[&str], secret: &str) -> (Output, String) {
    let mut command = crm_import(rig, &[&["--dry-run"], inputs].concat());
    s3.env_with_secret(&mut command, secret);
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains(SECRET_KEY),
        "the AWS secret leaked: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out, stderr)
}

#[test]
fn a_prefix_reads_its_csv_gzip_tsv_and_parquet_parts_in_key_order() {
    let s3 = S3::start();
    exports(&s3);
    let rig = Rig::new(sandbox_options());
    let (out, stderr) = dry_run(&rig, &s3, &["s3://crm/exports/"], SECRET_KEY);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report = read_report(&rig.path("r.csv"));
    let parts: Vec<(String, u64)> = (1..=4)
        .map(|i| {
            let ext = ["csv", "csv.gz", "tsv", "parquet"][i - 1];
            (format!("s3://crm/exports/part-{i}.{ext}"), 10)
        })
        .collect();
    let inputs: Vec<(&str, u64)> = parts.iter().map(|(n, r)| (n.as_str(), *r)).collect();
    assert_invariant(&report, &SINKS, &inputs);
    assert!(
        report.iter().all(|r| r["status"] == "dry_run"),
        "{report:?}"
    );
    // Key order: the first report rows come from part 1.
    assert_eq!(report[0]["source"], "s3://crm/exports/part-1.csv");
    assert_eq!(
        report.last().unwrap()["source"],
        "s3://crm/exports/part-4.parquet"
    );
}

#[test]
fn a_single_object_and_mixed_local_and_url_inputs_share_one_dedup_set() {
    let s3 = S3::start();
    exports(&s3);
    let rig = Rig::new(sandbox_options());
    // Local rows 5..15 overlap part 1 (0..10) on 5 phones.
    std::fs::write(rig.path("local.csv"), csv_rows(5, 15, ',')).unwrap();
    let (out, stderr) = dry_run(
        &rig,
        &s3,
        &["s3://crm/exports/part-1.csv", "local.csv"],
        SECRET_KEY,
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report = read_report(&rig.path("r.csv"));
    assert_invariant(
        &report,
        &SINKS,
        &[("s3://crm/exports/part-1.csv", 10), ("local.csv", 10)],
    );
    let duplicates: Vec<_> = report
        .iter()
        .filter(|r| r["status"] == "duplicate")
        .collect();
    assert_eq!(duplicates.len(), 5);
    assert!(duplicates.iter().all(|r| r["source"] == "local.csv"));
    assert!(
        duplicates[0]["detail"].contains("s3://crm/exports/part-1.csv:6"),
        "{:?}",
        duplicates[0]
    );
}

#[test]
fn object_errors_are_one_sentence_naming_the_url_and_nothing_is_sent() {
    let s3 = S3::start();
    exports(&s3);
    s3.bucket("empty");
    let rig = Rig::new(sandbox_options());
    rig.input(&[]);
    let cases = [
        (
            "s3://nope/exports/part-1.csv",
            SECRET_KEY,
            "no such bucket or key",
        ),
        (
            "s3://crm/exports/missing.csv",
            SECRET_KEY,
            "no such bucket or key",
        ),
        ("s3://empty/", SECRET_KEY, "no .csv"),
        (
            "s3://crm/exports/part-1.csv",
            "wrong-secret",
            "access denied",
        ),
    ];
    for (url, secret, expected) in cases {
        let mut command = crm_import(&rig, &[url]);
        command
            .env("CHATFUEL_API_TOKEN", TOKEN)
            .env("WENI_API_TOKEN", TOKEN)
            .env("CLOUDHUMANS_API_TOKEN", TOKEN);
        s3.env_with_secret(&mut command, secret);
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(stderr.contains(url), "{url}: {stderr}");
        assert!(stderr.contains(expected), "{url}: {stderr}");
        assert!(!stderr.contains(secret) || secret == SECRET_KEY && !stderr.contains(SECRET_KEY));
        assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    }
    assert!(rig.log().stats.is_empty(), "no request reached a platform");
}

#[test]
fn an_unreachable_endpoint_fails_after_bounded_retries_naming_the_url() {
    let rig = Rig::new(sandbox_options());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let started = std::time::Instant::now();
    let out = crm_import(&rig, &["--dry-run", "s3://crm/exports/part-1.csv"])
        .env("AWS_ACCESS_KEY_ID", "a")
        .env("AWS_SECRET_ACCESS_KEY", "b")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("s3://crm/exports/part-1.csv"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

/// A full `run --sandbox` from S3 reports the same as the run of the same
/// files from local disk, row for row, except `source`.
#[test]
fn a_sandbox_run_from_s3_matches_the_local_run_row_for_row() {
    let s3 = S3::start();
    exports(&s3);
    let rig = Rig::new(sandbox_options());
    let local = rig.path("local");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("part-1.csv"), csv_rows(0, 10, ',')).unwrap();
    std::fs::write(local.join("part-2.csv.gz"), gzip(&csv_rows(10, 20, ','))).unwrap();
    std::fs::write(local.join("part-3.tsv"), csv_rows(20, 30, '\t')).unwrap();
    std::fs::write(local.join("part-4.parquet"), parquet_rows(30, 40)).unwrap();
    let cfg = config("", "", "").replace("{url}", &rig.url());
    std::fs::write(rig.path("import.toml"), cfg).unwrap();
    let run = |input: &str, report: &str, state: &str| {
        let mut command = Command::new(BIN);
        command.current_dir(rig.path("")).args([
            "run",
            "-q",
            "--sandbox",
            "--config",
            "import.toml",
            "--report",
            report,
            input,
        ]);
        s3.env(&mut command);
        // Separate states, so that both runs send everything.
        std::fs::write(
            rig.path("import.toml"),
            config("", "", "").replace("{url}", &rig.url())
                + &format!("\n[state]\npath = \"{state}\"\n"),
        )
        .unwrap();
        let out = command.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        read_report(&rig.path(report))
    };
    let from_s3 = run("s3://crm/exports/", "s3.csv", "s3-state.db");
    let from_disk = run("local", "disk.csv", "disk-state.db");
    assert_eq!(from_s3.len(), from_disk.len());
    assert_eq!(from_s3.len(), 40 * 3);
    let key = |r: &common::Row| {
        let file = Path::new(&r["source"])
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        (file, r["row"].clone(), r["sink"].clone())
    };
    let mut a: Vec<_> = from_s3.iter().map(|r| (key(r), r.clone())).collect();
    let mut b: Vec<_> = from_disk.iter().map(|r| (key(r), r.clone())).collect();
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    for ((ka, ra), (kb, rb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        for column in crm_import::report::COLUMNS
            .iter()
            .filter(|c| **c != "source")
        {
            assert_eq!(ra[*column], rb[*column], "{column} of {ka:?}");
        }
    }
}
