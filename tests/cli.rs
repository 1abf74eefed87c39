//! The real binary on real files: inputs of every kind, bad input of every
//! kind, and the report invariant (one row per record-level outcome, else one
//! per enabled sink).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

mod common;

use common::read_report;

use arrow_array::{
    ArrayRef, DictionaryArray, Int64Array, RecordBatch, StringArray, types::Int32Type,
};
use parquet::arrow::ArrowWriter;

const BIN: &str = env!("CARGO_BIN_EXE_crm-import");

/// A scratch directory with a config, inputs, and the report after a run.
struct Case {
    dir: tempfile::TempDir,
}

struct Output {
    code: i32,
    stderr: String,
    /// Report rows as maps column → value.
    report: Vec<HashMap<String, String>>,
}

const CONFIG: &str = r#"
[input]
phone_column   = ["phone", "mobile"]
country_column = "country"
default_region = "BR"
id_column      = "id"

[report]
path = "report.csv"

[sinks.chatfuel]
automation_id    = "62ed0d816e5d77079f07db49"
property_columns = { pricingPlan = "plan" }

[sinks.weni]
name   = "{first_name}"
fields = { plan = "{plan}" }
"#;

impl Case {
    fn new() -> Case {
        let case = Case {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        case.write("import.toml", CONFIG.as_bytes());
        case
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn config(&self, text: &str) {
        self.write("import.toml", text.as_bytes());
    }

    /// Runs `crm-import run --config import.toml --dry-run ARGS...` in the case's directory.
    fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None)
    }

    fn run_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let report = self.path("report.csv");
        let _ = std::fs::remove_file(&report);
        let mut child = Command::new(BIN)
            .current_dir(self.dir.path())
            .args(["run", "--config", "import.toml", "--dry-run", "-q"])
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary runs");
        if let Some(bytes) = stdin {
            child.stdin.take().unwrap().write_all(bytes).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains("panicked"),
            "the binary panicked: {stderr}"
        );
        Output {
            code: out.status.code().unwrap_or(-1),
            stderr,
            report: read_report(&report),
        }
    }
}

impl Output {
    /// The report rows of `source`:`row`.
    fn rows(&self, source: &str, row: u64) -> Vec<&HashMap<String, String>> {
        self.report
            .iter()
            .filter(|r| r["source"] == source && r["row"] == row.to_string())
            .collect()
    }

    fn status(&self, source: &str, row: u64) -> String {
        let rows = self.rows(source, row);
        assert!(!rows.is_empty(), "no report row for {source}:{row}");
        rows[0]["status"].clone()
    }

    fn assert_invariant(&self, sinks: &[&str], inputs: &[(&str, u64)]) {
        common::assert_invariant(&self.report, sinks, inputs);
    }
}

const CSV: &str = "id,first_name,phone,mobile,country,plan\n\
1,Ana,(11) 98765-4321,,BR,gold\n\
2,Bia,+55 21 99876-5432,,,silver\n\
3,Caio,011 98765-4321,,br,gold\n\
4,Davi,n/a,(48) 99123-4567,BR,bronze\n\
5,Eva,12345,,BR,gold\n";

#[test]
fn demo_fixture_dry_run_meets_the_report_invariant() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let case = Case::new();
    let report = case.path("demo-report.csv");
    let out = Command::new(BIN)
        .current_dir(root)
        .args([
            "run",
            "-q",
            "--config",
            "fixtures/demo.toml",
            "--dry-run",
            "--report",
        ])
        .arg(&report)
        .arg("fixtures/contacts.csv")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let output = Output {
        code: 0,
        stderr: String::new(),
        report: read_report(&report),
    };
    let data_rows = std::fs::read_to_string(root.join("fixtures/contacts.csv"))
        .unwrap()
        .matches("\n")
        .count() as u64
        - 2; // header, and row 10 spans two lines
    output.assert_invariant(
        &["chatfuel", "weni", "cloudhumans"],
        &[("fixtures/contacts.csv", data_rows)],
    );
    assert_eq!(output.status("fixtures/contacts.csv", 3), "duplicate");
    assert_eq!(
        output.rows("fixtures/contacts.csv", 3)[0]["detail"],
        "duplicate of fixtures/contacts.csv:1"
    );
    assert_eq!(output.status("fixtures/contacts.csv", 25), "malformed");
    // Row 10 holds an embedded newline and still counts once; row 11 follows it.
    assert_eq!(
        output.rows("fixtures/contacts.csv", 11)[0]["record_id"],
        "11"
    );
    // Summary (stderr) shows the request plan.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Request plan") && stderr.contains("chatfuel"),
        "{stderr}"
    );
}

#[test]
fn statuses_details_and_multi_column_phones() {
    let case = Case::new();
    case.write("a.csv", CSV.as_bytes());
    let out = case.run(&["a.csv"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.assert_invariant(&["chatfuel", "weni"], &[("a.csv", 5)]);
    let row1 = out.rows("a.csv", 1);
    assert_eq!(row1.len(), 2);
    assert_eq!(row1[0]["phone_e164"], "+5511987654321");
    assert_eq!(row1[0]["status"], "dry_run");
    assert_eq!(row1[0]["record_id"], "1");
    assert_eq!(out.status("a.csv", 3), "duplicate");
    assert_eq!(out.rows("a.csv", 3)[0]["detail"], "duplicate of a.csv:1");
    // phone "n/a" invalid → mobile column wins, and phone_raw is its text.
    let row4 = out.rows("a.csv", 4);
    assert_eq!(row4[0]["phone_raw"], "(48) 99123-4567");
    assert_eq!(row4[0]["phone_e164"], "+5548991234567");
    assert_eq!(out.status("a.csv", 5), "invalid_phone");
    assert_eq!(out.rows("a.csv", 5)[0]["detail"], "too short for BR");
}

#[test]
fn several_inputs_share_one_dedup_set_and_directories_read_in_name_order() {
    let case = Case::new();
    case.write(
        "in/b.csv",
        b"id,first_name,phone,mobile,country,plan\n9,Zed,+55 11 98765-4321,,,gold\n",
    );
    case.write("in/a.csv", CSV.as_bytes());
    case.write("in/notes.md", b"ignored");
    let out = case.run(&["in"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let a = format!("in{}a.csv", std::path::MAIN_SEPARATOR);
    let b = format!("in{}b.csv", std::path::MAIN_SEPARATOR);
    out.assert_invariant(&["chatfuel", "weni"], &[(&a, 5), (&b, 1)]);
    assert_eq!(out.rows(&b, 1)[0]["detail"], format!("duplicate of {a}:1"));
}

#[test]
fn gzip_tsv_semicolons_bom_and_stdin() {
    let case = Case::new();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(CSV.as_bytes()).unwrap();
    case.write("a.csv.gz", &gz.finish().unwrap());
    case.write("b.tsv", CSV.replace(',', "\t").as_bytes());
    let semicolons = format!("\u{feff}{}", CSV.replace(',', ";"));
    case.write("c.csv", semicolons.as_bytes());
    let out = case.run(&["a.csv.gz", "b.tsv", "c.csv"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.assert_invariant(
        &["chatfuel", "weni"],
        &[("a.csv.gz", 5), ("b.tsv", 5), ("c.csv", 5)],
    );
    assert_eq!(out.status("a.csv.gz", 1), "dry_run");
    assert_eq!(out.status("b.tsv", 1), "duplicate");
    assert_eq!(
        out.rows("c.csv", 2)[0]["record_id"],
        "2",
        "BOM stripped from the id header"
    );

    let out = case.run_with_stdin(&["-"], Some(CSV.as_bytes()));
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.assert_invariant(&["chatfuel", "weni"], &[("-", 5)]);
}

#[test]
fn windows_1252_and_invalid_utf8() {
    let case = Case::new();
    let mut latin = b"id,first_name,phone,mobile,country,plan\n".to_vec();
    latin.extend_from_slice(b"Jo\xe3o,Jo\xe3o,(11) 98765-4321,,BR,gold\n");
    case.write("latin.csv", &latin);
    // Under utf-8 the row is malformed (with a hint), and the run goes on.
    let out = case.run(&["latin.csv"]);
    assert_eq!(
        out.code, 0,
        "record-level statuses never change the exit code: {}",
        out.stderr
    );
    assert_eq!(out.status("latin.csv", 1), "malformed");
    let detail = &out.rows("latin.csv", 1)[0]["detail"];
    assert!(
        detail.contains("windows-1252") && detail.contains("\"id\""),
        "{detail}"
    );

    case.config(&CONFIG.replace(
        "id_column      = \"id\"",
        "id_column = \"id\"\nencoding = \"windows-1252\"",
    ));
    let out = case.run(&["latin.csv"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.rows("latin.csv", 1)[0]["record_id"], "João");
    assert_eq!(out.status("latin.csv", 1), "dry_run");
}

#[test]
fn wrong_field_count_is_malformed_and_the_run_continues() {
    let case = Case::new();
    case.write(
        "a.csv",
        b"id,first_name,phone,mobile,country,plan\n1,Ana,(11) 98765-4321,,BR\n2,Bia,+55 21 99876-5432,,,silver\n",
    );
    let out = case.run(&["a.csv"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.assert_invariant(&["chatfuel", "weni"], &[("a.csv", 2)]);
    assert_eq!(out.status("a.csv", 1), "malformed");
    assert_eq!(
        out.rows("a.csv", 1)[0]["detail"],
        "row has 5 fields, the header has 6"
    );
    assert_eq!(out.status("a.csv", 2), "dry_run");
}

/// Row `n` of the big input of [`chunks_reused_across_inputs_report_only_their_own_rows`]:
/// its CSV line and what its report rows must say.
fn varied_row(n: u64) -> (String, &'static str, String, String) {
    let phone = format!("+55 11 98{:03}-{:04}", n / 10_000, n % 10_000);
    let e164 = format!("+551198{:03}{:04}", n / 10_000, n % 10_000);
    // Names of 1 to 60 bytes, so consecutive chunks hold different amounts of text.
    let name = "x".repeat(1 + (n as usize * 7) % 60);
    match n {
        // A malformed row's cells are not read: no id either.
        _ if n.is_multiple_of(97) => (
            format!("{n},{name},{phone}\n"),
            "malformed",
            String::new(),
            String::new(),
        ),
        _ if n.is_multiple_of(13) => (
            format!("{n},{name},12-{n},,BR,gold\n"),
            "invalid_phone",
            String::new(),
            n.to_string(),
        ),
        _ => (
            format!("{n},{name},{phone},,BR,plan{}\n", n % 5),
            "dry_run",
            e164,
            n.to_string(),
        ),
    }
}

/// The pipeline hands each chunk, its checks and its rendered report bytes
/// back to be filled again (`recycle.rs`). A recycled buffer that kept a row
/// of the chunk before would put another row's id, phone or status in the
/// report: every row here differs from its neighbours, over ≈ 12 chunks of
/// two inputs, through both report paths (CSV rendered on the workers,
/// Parquet written on the report thread).
#[test]
fn chunks_reused_across_inputs_report_only_their_own_rows() {
    let case = Case::new();
    let rows = 12_000u64;
    let mut big = String::from("id,first_name,phone,mobile,country,plan\n");
    for n in 1..=rows {
        big.push_str(&varied_row(n).0);
    }
    case.write("big.csv", big.as_bytes());
    // Duplicates of big.csv's rows 1 and 11,998, then a new number.
    case.write(
        "small.csv",
        b"id,first_name,phone,mobile,country,plan\ns1,Ana,+55 11 98000-0001,,BR,gold\n\
s2,Bia,+55 11 98001-1998,,BR,gold\ns3,Caio,+55 11 99999-0000,,BR,gold\n",
    );
    for report in ["report.csv", "report.parquet"] {
        let out = case.run(&["big.csv", "small.csv", "--report", report]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let out = if report == "report.csv" {
            out
        } else {
            Output {
                report: common::read_parquet_report(&case.path(report)),
                ..out
            }
        };
        out.assert_invariant(
            &["chatfuel", "weni"],
            &[("big.csv", rows), ("small.csv", 3)],
        );
        // Every input row is there (the invariant); each says what its own row holds.
        for r in out.report.iter().filter(|r| r["source"] == "big.csv") {
            let n: u64 = r["row"].parse().unwrap();
            let (_, status, e164, id) = varied_row(n);
            assert_eq!(r["record_id"], id, "{report}: big.csv:{n}");
            assert_eq!(r["status"], status, "{report}: big.csv:{n}");
            assert_eq!(r["phone_e164"], e164, "{report}: big.csv:{n}");
        }
        assert_eq!(
            out.rows("small.csv", 1)[0]["detail"],
            "duplicate of big.csv:1"
        );
        assert_eq!(
            out.rows("small.csv", 2)[0]["detail"],
            "duplicate of big.csv:11998"
        );
        assert_eq!(out.status("small.csv", 3), "dry_run");
        assert_eq!(out.rows("small.csv", 3)[0]["record_id"], "s3");
    }
}

#[test]
fn empty_and_header_only_inputs() {
    let case = Case::new();
    case.write("empty.csv", b"");
    let out = case.run(&["empty.csv"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("empty.csv") && out.stderr.contains("no header"),
        "{}",
        out.stderr
    );

    case.write("header.csv", b"id,first_name,phone,mobile,country,plan\n");
    let out = case.run(&["header.csv"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.report.is_empty());
    assert!(
        case.path("report.csv").exists(),
        "the report is written even when empty"
    );
}

#[test]
fn missing_column_names_file_column_and_key() {
    let case = Case::new();
    case.write(
        "a.csv",
        b"id,first_name,phone,mobile,country\n1,Ana,(11) 98765-4321,,BR\n",
    );
    let out = case.run(&["a.csv"]);
    assert_eq!(out.code, 1);
    let e = &out.stderr;
    assert!(
        e.contains("a.csv")
            && e.contains("\"plan\"")
            && e.contains("sinks.chatfuel.property_columns.pricingPlan"),
        "{e}"
    );
    assert!(
        out.report.is_empty(),
        "no row is processed before every header is checked"
    );
}

#[test]
fn unreadable_and_corrupt_files_are_one_clear_sentence() {
    let case = Case::new();
    let out = case.run(&["nope.csv"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("nope.csv") && out.stderr.contains("cannot read"),
        "{}",
        out.stderr
    );

    // A gzip cut in half: the rows before the cut are read, then the run stops naming the file.
    let big: String = (0..20_000)
        .map(|i| format!("{i},Ana,(11) 9{i:08},,BR,gold\n"))
        .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(format!("id,first_name,phone,mobile,country,plan\n{big}").as_bytes())
        .unwrap();
    let bytes = gz.finish().unwrap();
    case.write("cut.csv.gz", &bytes[..bytes.len() / 2]);
    let out = case.run(&["cut.csv.gz"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("cut.csv.gz") && out.stderr.contains("read failed after data row"),
        "{}",
        out.stderr
    );

    case.write("bad.parquet", b"PAR1 this is not parquet at all");
    let out = case.run(&["bad.parquet"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("bad.parquet") && out.stderr.contains("not a readable Parquet file"),
        "{}",
        out.stderr
    );

    case.write("a.xlsx", b"PK");
    let out = case.run(&["a.xlsx"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("a.xlsx") && out.stderr.contains("unsupported file type"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_config_names_the_key() {
    let case = Case::new();
    case.write("a.csv", CSV.as_bytes());
    case.config(&CONFIG.replace("[sinks.weni]", "[sinks.weni]\nrat = \"1/s\""));
    let out = case.run(&["a.csv"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("import.toml") && out.stderr.contains("rat"),
        "{}",
        out.stderr
    );

    case.config(&CONFIG.replace("property_columns", "batch_size = 1001\nproperty_columns"));
    let out = case.run(&["a.csv"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("sinks.chatfuel.batch_size"),
        "{}",
        out.stderr
    );
}

fn write_parquet(path: &Path, phones: ArrayRef) {
    let n = phones.len();
    let text = |v: &str| Arc::new(StringArray::from(vec![v; n])) as ArrayRef;
    let ids = Arc::new(StringArray::from(
        (1..=n).map(|i| i.to_string()).collect::<Vec<_>>(),
    )) as ArrayRef;
    let batch = RecordBatch::try_from_iter(vec![
        ("id", ids),
        ("first_name", text("Ana")),
        ("phone", phones),
        ("mobile", text("")),
        ("country", text("BR")),
        ("plan", text("gold")),
        ("unused", text("not read")),
    ])
    .unwrap();
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_phone_columns_as_integers_and_dictionaries() {
    let case = Case::new();
    write_parquet(
        &case.path("ints.parquet"),
        Arc::new(Int64Array::from(vec![
            Some(5511987654321),
            None,
            Some(11987654322),
        ])),
    );
    let dict: DictionaryArray<Int32Type> = vec!["(21) 99876-5432", "(21) 99876-5432", "x"]
        .into_iter()
        .collect();
    write_parquet(&case.path("dict.parquet"), Arc::new(dict));
    let out = case.run(&["ints.parquet", "dict.parquet"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.assert_invariant(
        &["chatfuel", "weni"],
        &[("ints.parquet", 3), ("dict.parquet", 3)],
    );
    assert_eq!(
        out.rows("ints.parquet", 1)[0]["phone_e164"],
        "+5511987654321"
    );
    assert_eq!(out.rows("ints.parquet", 1)[0]["phone_raw"], "5511987654321");
    assert_eq!(out.status("ints.parquet", 2), "invalid_phone");
    assert_eq!(
        out.rows("ints.parquet", 3)[0]["phone_e164"],
        "+5511987654322"
    );
    assert_eq!(
        out.rows("dict.parquet", 1)[0]["phone_e164"],
        "+5521998765432"
    );
    assert_eq!(out.status("dict.parquet", 2), "duplicate");
    assert_eq!(out.status("dict.parquet", 3), "invalid_phone");
}

#[test]
fn jsonl_and_parquet_reports() {
    let case = Case::new();
    case.write("a.csv", CSV.as_bytes());
    let out = case.run(&["a.csv", "--report", "out/report.jsonl"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text = std::fs::read_to_string(case.path("out/report.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 3 unique × 2 sinks + 1 duplicate + 1 invalid
    assert_eq!(lines.len(), 8);
    assert_eq!(lines[0]["phone_e164"], "+5511987654321");
    assert_eq!(lines[0]["row"], 1);

    let out = case.run(&["a.csv", "--report", "report.parquet"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let file = std::fs::File::open(case.path("report.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 8);
}

#[test]
fn a_missing_token_variable_is_named_and_nothing_is_sent() {
    let case = Case::new();
    case.write("a.csv", CSV.as_bytes());
    let out = Command::new(BIN)
        .current_dir(case.dir.path())
        .args(["run", "--config", "import.toml", "a.csv"])
        .env_remove("CHATFUEL_API_TOKEN")
        .env_remove("WENI_API_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CHATFUEL_API_TOKEN") && stderr.contains("sinks.chatfuel.token_env"),
        "{stderr}"
    );
    assert!(
        !case.path("report.csv").exists(),
        "nothing processed before the tokens are known"
    );
}
