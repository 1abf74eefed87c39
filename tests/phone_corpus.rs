//! Agreement of our E.164 layer with libphonenumber (Python `phonenumbers`
//! 9.0.33, the same metadata version as the `phonenumber` crate) on a committed
//! corpus of messy numbers from 24 regions (`fixtures/gen_phone_corpus.py`).
//!
//! Fails on any disagreement (issue 11: agreement stays 100%). Rows where both readings are valid numbers
//! (`alternative` set) are counted apart: there we expect our documented choice.

use std::collections::HashMap;

use crm_import::phone::PhoneNormalizer;

#[test]
fn agreement_with_libphonenumber_is_total() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/phone_corpus.csv");
    let mut reader = csv::Reader::from_path(path).expect("corpus present");
    let mut normalizers: HashMap<String, PhoneNormalizer> = HashMap::new();
    let (mut total, mut agree, mut ambiguous, mut ambiguous_as_chosen) = (0, 0, 0, 0);
    let mut disagreements = Vec::new();
    for record in reader.records() {
        let record = record.expect("corpus row");
        let (raw, region, expected, alternative) = (&record[0], &record[1], &record[2], &record[3]);
        let normalizer = normalizers.entry(region.to_owned()).or_insert_with(|| {
            PhoneNormalizer::new((!region.is_empty()).then(|| region.to_owned()))
        });
        let got = normalizer
            .normalize(raw, None)
            .map(|p| p.to_string())
            .unwrap_or_default();
        if !alternative.is_empty() {
            ambiguous += 1;
            if got == alternative {
                ambiguous_as_chosen += 1;
            } else {
                disagreements.push(format!(
                    "{raw:?} [{region}] expected our choice {alternative}, got {got:?}"
                ));
            }
            continue;
        }
        total += 1;
        if got == expected {
            agree += 1;
        } else {
            disagreements.push(format!(
                "{raw:?} [{region}] libphonenumber {expected:?}, we {got:?}"
            ));
        }
    }
    let rate = agree as f64 / total as f64;
    eprintln!(
        "phone corpus: {agree}/{total} agree ({:.3}%); both-valid readings: {ambiguous_as_chosen}/{ambiguous} as documented",
        rate * 100.0
    );
    for d in &disagreements {
        eprintln!("  {d}");
    }
    // The same corpus through the crate's own parse + is_valid, for comparison.
    let mut reader = csv::Reader::from_path(path).expect("corpus present");
    let mut crate_agree = 0;
    for record in reader.records() {
        let record = record.expect("corpus row");
        if !record[3].is_empty() {
            continue;
        }
        let region = record[1].parse::<phonenumber::country::Id>().ok();
        let got = phonenumber::parse(region, &record[0])
            .ok()
            .filter(phonenumber::is_valid)
            .map(|n| n.format().mode(phonenumber::Mode::E164).to_string())
            .unwrap_or_default();
        if got == record[2] {
            crate_agree += 1;
        }
    }
    eprintln!(
        "phonenumber crate alone: {crate_agree}/{total} agree ({:.3}%)",
        crate_agree as f64 / total as f64 * 100.0
    );
    assert!(
        agree >= crate_agree,
        "our layer must not do worse than the crate"
    );
    assert!(total >= 8000, "corpus too small: {total}");
    assert_eq!(
        agree,
        total,
        "agreement {:.3}% < 100%: every disagreement is listed above",
        rate * 100.0
    );
    assert_eq!(
        ambiguous_as_chosen, ambiguous,
        "both-valid readings must follow the documented choice"
    );
}
