//! criterion benches of the hot paths: phone normalization (ours vs the
//! `phonenumber` crate's parse + is_valid, side by side), CSV reading, the
//! report's CSV encoding (ours vs `csv::Writer`, side by side), and the whole
//! dry pipeline on a generated 100k-row export.
//!
//! The 100k fixture is generated in-process (a small deterministic generator
//! below), so `cargo bench` needs no Python.

use std::hint::black_box;
use std::io::Write;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crm_import::config::Config;
use crm_import::phone::{E164, PhoneNormalizer};
use crm_import::pipeline::{self, RunOptions};
use crm_import::report::{Encoding, ReportRow, Status, write_with_csv_crate};
use crm_import::sink::SinkKind;

/// Phone texts in the shapes CRM exports hold (national, international, punctuation).
fn sample_phones(n: usize) -> Vec<String> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ddds = ["11", "21", "31", "48", "51", "55", "61", "71", "81", "85"];
    (0..n)
        .map(|_| {
            let r = next();
            let ddd = ddds[(r % 10) as usize];
            let sub = 960_000_000 + (r >> 8) % 39_999_999;
            match (r >> 40) % 4 {
                0 => format!("({ddd}) {}-{:04}", sub / 10_000, sub % 10_000),
                1 => format!("+55 {ddd} {sub}"),
                2 => format!("55{ddd}{sub}"),
                _ => format!("0{ddd} {} {:04}", sub / 10_000, sub % 10_000),
            }
        })
        .collect()
}

fn write_fixture(path: &Path, rows: usize) {
    let phones = sample_phones(rows);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create fixture"));
    writeln!(
        f,
        "id,first_name,last_name,phone,mobile,country,plan,language,city"
    )
    .unwrap();
    for (i, p) in phones.iter().enumerate() {
        let plan = ["gold", "silver", "bronze"][i % 3];
        writeln!(f, "{i},Ana,Silva,\"{p}\",,BR,{plan},por,São Paulo").unwrap();
    }
}

fn normalization(c: &mut Criterion) {
    let phones = sample_phones(1000);
    let mut group = c.benchmark_group("normalize_1000_br_numbers");
    group.throughput(Throughput::Elements(phones.len() as u64));
    let mut ours = PhoneNormalizer::new(Some("BR".into()));
    group.bench_function("crm_import_phone", |b| {
        b.iter(|| {
            for p in &phones {
                black_box(ours.normalize(p, None).ok());
            }
        })
    });
    let br: phonenumber::country::Id = "BR".parse().unwrap();
    group.sample_size(10);
    group.bench_function("phonenumber_crate_parse_is_valid", |b| {
        b.iter(|| {
            for p in &phones {
                let n = phonenumber::parse(Some(br), p).ok();
                black_box(n.filter(phonenumber::is_valid));
            }
        })
    });
    group.finish();
}

/// The phone corpus (24 regions, messy): the case where the crate's 100-entry
/// regex LRU thrashes and recompiles.
fn normalization_mixed_regions(c: &mut Criterion) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/phone_corpus.csv");
    let mut rdr = csv::Reader::from_path(path).expect("corpus");
    let rows: Vec<(String, String)> = rdr
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[0].to_owned(), r[1].to_owned())
        })
        .collect();
    let mut group = c.benchmark_group("normalize_corpus_24_regions");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.sample_size(10);
    let mut ours = PhoneNormalizer::new(None);
    group.bench_function("crm_import_phone", |b| {
        b.iter(|| {
            for (raw, region) in &rows {
                black_box(ours.normalize(raw, Some(region)).ok());
            }
        })
    });
    group.bench_function("phonenumber_crate_parse_is_valid", |b| {
        b.iter(|| {
            for (raw, region) in &rows {
                let id = region.parse::<phonenumber::country::Id>().ok();
                let n = phonenumber::parse(id, raw).ok();
                black_box(n.filter(phonenumber::is_valid));
            }
        })
    });
    group.finish();
}

fn csv_reading(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("100k.csv");
    write_fixture(&path, 100_000);
    let mut group = c.benchmark_group("read_csv_100k");
    group.throughput(Throughput::Elements(100_000));
    group.sample_size(10);
    group.bench_function("csv_byte_records", |b| {
        b.iter(|| {
            let mut rdr = csv::Reader::from_path(&path).unwrap();
            let mut rec = csv::ByteRecord::new();
            let mut n = 0;
            while rdr.read_byte_record(&mut rec).unwrap() {
                n += rec.len();
            }
            black_box(n)
        })
    });
    group.finish();
}

fn dry_pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("100k.csv");
    write_fixture(&input, 100_000);
    let config_path = dir.path().join("bench.toml");
    std::fs::write(
        &config_path,
        r#"[input]
phone_column = ["phone", "mobile"]
country_column = "country"
default_region = "BR"
id_column = "id"
[sinks.chatfuel]
automation_id = "62ed0d816e5d77079f07db49"
property_columns = { pricingPlan = "plan" }
[sinks.weni]
name = "{first_name} {last_name}"
language = "{language}"
fields = { plan = "{plan}", city = "{city}" }
[sinks.cloudhumans]
account_id = "1"
inbox_id = "2"
template_name = "t"
params = { name = "{first_name}" }
"#,
    )
    .unwrap();
    let options = RunOptions {
        inputs: vec![input.to_string_lossy().into_owned()],
        dry_run: true,
        report_path: Some(dir.path().join("report.csv")),
        ..RunOptions::default()
    };
    let mut group = c.benchmark_group("dry_run_100k");
    group.throughput(Throughput::Elements(100_000));
    group.sample_size(10);
    group.bench_function("csv_to_report", |b| {
        b.iter(|| {
            black_box(
                pipeline::run(Config::load(&config_path).unwrap(), &options)
                    .unwrap()
                    .report_rows(),
            )
        })
    });
    group.finish();
}

/// The report writer's CSV encoding (hand-written, see `report::Encoding`)
/// beside the `csv` crate's `Writer` on the same 10,000 rows.
fn report_encoding(c: &mut Criterion) {
    let phones = sample_phones(10_000);
    let raws: Vec<String> = phones.iter().map(|p| format!("\"{p}\"")).collect();
    let ids: Vec<String> = (0..phones.len()).map(|i| i.to_string()).collect();
    let rows: Vec<ReportRow<'_>> = (0..phones.len())
        .map(|i| ReportRow {
            source: "crm-export.csv",
            row: i as u64 + 1,
            record_id: &ids[i],
            phone_raw: &raws[i],
            phone_e164: Some(E164(5_511_987_650_000 + i as u64)),
            sink: Some(SinkKind::from_index(i % 3)),
            status: if i % 10 == 0 {
                Status::Rejected
            } else {
                Status::DryRun
            },
            http_status: None,
            attempts: 0,
            detail: if i % 10 == 0 {
                "Contact name cannot exceed 100 characters."
            } else {
                ""
            },
        })
        .collect();
    let mut group = c.benchmark_group("report_encode_10k_rows");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function("crm_import_encoding_csv", |b| {
        let mut out = Vec::with_capacity(1 << 20);
        b.iter(|| {
            out.clear();
            for r in &rows {
                Encoding::Csv.encode(r, &mut out);
            }
            black_box(out.len())
        })
    });
    group.bench_function("csv_crate_writer", |b| {
        b.iter(|| {
            let mut w = csv::Writer::from_writer(Vec::with_capacity(1 << 20));
            for r in &rows {
                write_with_csv_crate(r, &mut w).unwrap();
            }
            black_box(w.into_inner().unwrap().len())
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    normalization,
    normalization_mixed_regions,
    csv_reading,
    report_encoding,
    dry_pipeline
);
criterion_main!(benches);
