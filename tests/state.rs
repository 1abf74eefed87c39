//! Incremental sync and crash safety: the real binary against the sandbox
//! (in this test process), with the SQLite state in the run's directory.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::assert_invariant;
use common::rig::*;
use crm_import::sandbox::Faults;

fn requests(log: &crm_import::sandbox::SandboxLog) -> u64 {
    log.stats.values().map(|s| s.requests).sum()
}

#[test]
fn an_unchanged_rerun_sends_nothing_and_a_1_percent_change_sends_exactly_that() {
    let rig = Rig::new(sandbox_options());
    let mut rows = phones(300);
    let n = rig.input(&rows);
    let first = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(first.code, 0, "{}", first.stderr);

    // Unchanged: zero requests of any kind (no Weni preparation either).
    let before = requests(&first.log);
    let second = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(
        requests(&second.log),
        before,
        "an unchanged re-run makes no request at all"
    );
    assert_invariant(&second.report, &SINKS, &[("in.csv", n)]);
    assert!(
        second.report.iter().all(|r| r["status"] == "unchanged"),
        "every row unchanged"
    );

    // Change the plan of 1% of the rows (3 of 300).
    for i in [10, 150, 299] {
        rows[i].1 = "platinum".into();
    }
    rig.input(&rows);
    let chatfuel_before = second.log.chatfuel().requests.len();
    let weni_writes_before = second.log.weni().writes.len();
    let third = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert_invariant(&third.report, &SINKS, &[("in.csv", n)]);
    let changed: HashSet<String> = [11, 151, 300].iter().map(|r| r.to_string()).collect();
    for r in &third.report {
        let expected = match (r["sink"].as_str(), changed.contains(&r["row"])) {
            ("chatfuel", true) => "sent",
            ("weni", true) => "updated",
            _ => "unchanged", // CloudHumans sends a template at most once per phone
        };
        assert_eq!(r["status"], expected, "{r:?}");
    }
    let new_chatfuel = &third.log.chatfuel().requests[chatfuel_before..];
    assert_eq!(
        new_chatfuel.len(),
        1,
        "the changed rows are batched together"
    );
    assert_eq!(new_chatfuel[0].phones.len(), 3);
    assert_eq!(third.log.weni().writes.len() - weni_writes_before, 3);
}

/// A re-run loads the state from per-scope snapshots; a contact forgotten by
/// hand (README "Resetting", with the sqlite3 shell) must still be sent again,
/// not hidden by a snapshot taken before it was forgotten.
#[test]
fn a_contact_forgotten_by_hand_is_sent_again_despite_the_snapshot() {
    let rig = Rig::new(sandbox_options());
    let rows = phones(40);
    let n = rig.input(&rows);
    let first = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let state = rusqlite::Connection::open(rig.path("crm-import-state.db")).unwrap();
    let snapshots: i64 = state
        .query_row("SELECT count(*) FROM snapshots", [], |r| r.get(0))
        .unwrap();
    assert_eq!(snapshots, 3, "the run left one snapshot per sink");
    let forgotten = state
        .execute(
            "DELETE FROM delivered WHERE phone = 5511960000000
             AND scope_id IN (SELECT id FROM scopes WHERE sink = 'weni')",
            [],
        )
        .unwrap();
    assert_eq!(forgotten, 1);
    drop(state);

    let weni_writes = first.log.weni().writes.len();
    let second = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_invariant(&second.report, &SINKS, &[("in.csv", n)]);
    for r in &second.report {
        let resent = r["sink"] == "weni" && r["phone_e164"] == "+5511960000000";
        let expected = if resent { "updated" } else { "unchanged" };
        assert_eq!(r["status"], expected, "{r:?}");
    }
    assert_eq!(second.log.weni().writes.len(), weni_writes + 1);
}

/// Snapshots are files beside the state (`<state>.snapshots/`), a cache only:
/// one per sink, and one joint file holding all three sinks' hashes, which a
/// re-run with the same sinks reads instead. A re-run whose files were
/// damaged or deleted (a state copied without its directory) reads the rows
/// instead, still sends nothing, and leaves fresh files behind.
#[test]
fn a_rerun_with_damaged_or_missing_snapshot_files_sends_nothing_and_rewrites_them() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(60));
    let first = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let dir = rig.path("crm-import-state.db.snapshots");
    let files = |dir: &std::path::Path, extension: &str| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == extension))
            .collect();
        names.sort();
        names
    };
    let written = files(&dir, "tbl");
    assert_eq!(written.len(), 3, "one file per sink: {written:?}");
    let joint = files(&dir, "jtbl");
    assert_eq!(joint.len(), 1, "and one joint file: {joint:?}");
    let damage = |path: &std::path::Path| {
        let length = std::fs::metadata(path).unwrap().len() as usize;
        std::fs::write(path, vec![0u8; length]).unwrap();
    };
    damage(&joint[0]);
    damage(&written[0]);
    std::fs::remove_file(&written[1]).unwrap();

    let before = requests(&first.log);
    let second = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(requests(&second.log), before, "nothing sent again");
    assert_invariant(&second.report, &SINKS, &[("in.csv", n)]);
    assert!(second.report.iter().all(|r| r["status"] == "unchanged"));
    let rewritten = files(&dir, "tbl");
    assert_eq!(rewritten.len(), 3, "{rewritten:?}");
    assert!(
        !rewritten.contains(&written[0]),
        "the damaged file is replaced"
    );
    assert!(rewritten.contains(&written[2]), "the intact one is kept");
    let rejoined = files(&dir, "jtbl");
    assert_eq!(rejoined.len(), 1, "{rejoined:?}");
    assert_ne!(rejoined, joint, "the damaged joint file is replaced");

    // The third run reads the joint file: one lookup per row, same decisions.
    let third = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert_eq!(requests(&third.log), before, "nothing sent again");
    assert!(third.report.iter().all(|r| r["status"] == "unchanged"));
    assert_eq!(
        files(&dir, "jtbl"),
        rejoined,
        "a current joint file is kept"
    );
}

/// A re-run through the joint file dedups the phones it holds by their slot
/// there, and new phones in the run's own set: either way, every repeat of a
/// phone must be reported as a duplicate of the phone's first row, and every
/// first row must not.
#[test]
fn a_rerun_through_the_joint_file_reports_duplicates_of_known_and_new_phones() {
    let rig = Rig::new(sandbox_options());
    let known = phones(40);
    rig.input(&known);
    let first = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let dir = rig.path("crm-import-state.db.snapshots");
    let joint_files = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "jtbl")
        })
        .count();
    assert_eq!(joint_files, 1, "the second run has a joint file to read");

    // Known phones again, some repeated in another format; new phones, some twice.
    let new_phone = |k: u64| format!("+55 11 {}", 9_7000_0000 + k);
    let mut rows = known.clone();
    rows.push(("+55 11 960000021".into(), "gold".into())); // row 4's phone
    rows.push((new_phone(1), "gold".into()));
    rows.push(known[0].clone());
    rows.push((new_phone(2), "silver".into()));
    rows.push((format!("5511{}", 9_7000_0001), "silver".into())); // new phone 1 again
    rows.push(("(11) 96000-0021".into(), "silver".into())); // row 4's phone again
    rows.push((new_phone(2), "gold".into()));
    let n = rig.input(&rows);
    let second = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_invariant(&second.report, &SINKS, &[("in.csv", n)]);

    // In input order: a sent row's lines come when its request ends.
    let mut in_order: Vec<_> = second.report.iter().collect();
    in_order.sort_by_key(|r| r["row"].parse::<u64>().unwrap());
    let mut first_row_of: HashMap<String, String> = HashMap::new();
    let mut duplicates = 0;
    for r in in_order {
        let first_row = first_row_of
            .entry(r["phone_e164"].clone())
            .or_insert_with(|| r["row"].clone());
        if *first_row == r["row"] {
            assert_ne!(r["status"], "duplicate", "{r:?}");
        } else {
            duplicates += 1;
            assert_eq!(r["status"], "duplicate", "{r:?}");
            assert_eq!(
                r["detail"],
                format!("duplicate of in.csv:{first_row}"),
                "{r:?}"
            );
        }
    }
    assert_eq!(
        duplicates, 5,
        "two repeats of row 4's phone, one of row 1's, two of new phones"
    );
    let unique = second.stderr.lines().find(|l| l.contains("unique phones"));
    assert!(
        unique.is_some_and(|l| l.contains("42 unique phones")),
        "40 known and 2 new phones: {unique:?}"
    );
}

/// CloudHumans rows are checked without a payload hash (it never decides
/// them); the rows it sends must still be recorded with their own hash, as
/// every earlier build recorded them, not with 0.
#[test]
fn cloudhumans_deliveries_record_their_payload_hash() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(25));
    let run = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let state = rusqlite::Connection::open(rig.path("crm-import-state.db")).unwrap();
    let hashes: Vec<i64> = state
        .prepare(
            "SELECT payload_hash FROM delivered
             WHERE scope_id = (SELECT id FROM scopes WHERE sink = 'cloudhumans')",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(hashes.len(), 25);
    assert!(!hashes.contains(&0), "{hashes:?}");
    let distinct: HashSet<i64> = hashes.iter().copied().collect();
    assert_eq!(distinct.len(), 25, "each phone's own hash");
}

#[test]
fn full_and_resend_flags_and_dry_run_reading_the_state() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(20));
    assert_eq!(rig.run(&config("", "", ""), [TOKEN; 3]).code, 0);
    let state = rig.path("crm-import-state.db");
    let modified = std::fs::metadata(&state).unwrap().modified().unwrap();

    // A dry run shows what would be skipped, and never writes the state.
    let dry = rig.run_args(&config("", "", ""), [TOKEN; 3], &["--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(dry.report.iter().all(|r| r["status"] == "unchanged"));
    assert_eq!(
        std::fs::metadata(&state).unwrap().modified().unwrap(),
        modified
    );

    // --full resends to Chatfuel and Weni, never to CloudHumans.
    let messages = rig.log().cloudhumans().messages.len();
    let full = rig.run_args(&config("", "", ""), [TOKEN; 3], &["--full"]);
    assert_eq!(full.code, 0, "{}", full.stderr);
    assert_invariant(&full.report, &SINKS, &[("in.csv", n)]);
    for r in &full.report {
        let expected = match r["sink"].as_str() {
            "chatfuel" => "sent",
            "weni" => "updated",
            _ => "unchanged",
        };
        assert_eq!(r["status"], expected);
    }
    assert_eq!(full.log.cloudhumans().messages.len(), messages);

    // --resend-messages sends the templates again.
    let again = rig.run_args(&config("", "", ""), [TOKEN; 3], &["--resend-messages"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.log.cloudhumans().messages.len(), messages + 20);
}

/// The state loads while the first chunks are parsed: the merger keeps up
/// to `LOAD_AHEAD_CHUNKS` more chunks than usual until the load ends, then
/// the bound shrinks back. An input far past that window (69 chunks of 1,024
/// rows) must still be accounted for row by row, in input order, with what
/// the state says about each.
#[test]
fn a_run_past_the_chunks_read_ahead_while_the_state_loads_accounts_for_every_row() {
    let rig = Rig::new(sandbox_options());
    let rows = phones(70_000);
    rig.input(&rows[..20]);
    assert_eq!(rig.run(&config("", "", ""), [TOKEN; 3]).code, 0);
    let n = rig.input(&rows);
    let dry = rig.run_args(&config("", "", ""), [TOKEN; 3], &["--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert_invariant(&dry.report, &SINKS, &[("in.csv", n)]);
    let mut previous = 0;
    for r in &dry.report {
        let row: u64 = r["row"].parse().unwrap();
        assert!(row >= previous, "row {row} after row {previous}");
        previous = row;
        let expected = if row <= 20 { "unchanged" } else { "dry_run" };
        assert_eq!(r["status"], expected, "{r:?}");
    }
}

#[test]
fn rows_that_failed_or_were_skipped_are_sent_by_the_next_run() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(30));
    let refused = rig.run(&config("", "", ""), ["wrong", TOKEN, TOKEN]);
    assert_eq!(refused.code, 2);
    let retried = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(retried.code, 0, "{}", retried.stderr);
    assert_invariant(&retried.report, &SINKS, &[("in.csv", n)]);
    for r in &retried.report {
        let expected = if r["sink"] == "chatfuel" {
            "sent"
        } else {
            "unchanged"
        };
        assert_eq!(r["status"], expected, "{r:?}");
    }
}

#[test]
fn a_message_in_flight_at_a_crash_ends_unknown_and_is_not_resent() {
    // CloudHumans applies each message, then answers only after 30 s: we kill the
    // run while its requests hang, after their effect.
    let mut options = sandbox_options();
    options.platform_mut("cloudhumans").faults = Faults {
        slow_rate: 1.0,
        slow_delay: Duration::from_secs(30),
        ..Faults::default()
    };
    let rig = Rig::new(options);
    let n = rig.input(&phones(10));
    let cfg = config(
        "enabled = false",
        "enabled = false",
        "concurrency = 3\ntimeout = \"60s\"",
    );
    let mut child = rig.spawn(&cfg, "killed.csv");
    assert!(rig.wait_until(
        Duration::from_secs(30),
        |log| log.cloudhumans().messages.len() >= 3
    ));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let hung: HashSet<String> = rig
        .log()
        .cloudhumans()
        .messages
        .iter()
        .map(|m| m.phone_number.clone())
        .collect();
    assert_eq!(hung.len(), 3);

    // The next run (the platform is healthy again) must not message those 3 again.
    let out = rig.run(
        &cfg.replace("timeout = \"60s\"", "timeout = \"100ms\""),
        [TOKEN; 3],
    );
    assert_invariant(&out.report, &["cloudhumans"], &[("in.csv", n)]);
    for r in &out.report {
        if hung.contains(&r["phone_e164"]) {
            assert_eq!(r["status"], "unknown", "{r:?}");
            assert!(r["detail"].contains("--resend-unknown"), "{}", r["detail"]);
        }
    }
    let counts = times_messaged(&rig);
    for phone in &hung {
        assert_eq!(counts[phone], 1, "{phone} was messaged again");
    }
}

fn times_messaged(rig: &Rig) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in rig.log().cloudhumans().messages {
        *counts.entry(m.phone_number).or_insert(0) += 1;
    }
    counts
}

#[test]
fn kill_9_at_several_moments_then_rerun_loses_nothing_and_never_messages_twice() {
    let mut options = sandbox_options();
    for platform in options.platforms.values_mut() {
        platform.faults.latency = Duration::from_millis(3);
    }
    let rig = Rig::new(options);
    let rows = phones(240);
    let n = rig.input(&rows);
    // Slow enough that a run lasts about two seconds: room to kill it mid-way.
    let cfg = config(
        "batch_size = 10\nrate = \"40/s\"",
        "rate = \"150/s\"",
        "rate = \"150/s\"",
    );
    let mut reports = Vec::new();
    for (i, threshold) in [5usize, 60, 150].into_iter().enumerate() {
        let name = format!("killed-{i}.csv");
        let mut child = rig.spawn(&cfg, &name);
        let reached = rig.wait_until(Duration::from_secs(60), |log| {
            log.cloudhumans().messages.len() >= threshold
        });
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(reached, "the run reached {threshold} messages");
        // A killed run's report holds the rows it finished (maybe none yet).
        let text = std::fs::read_to_string(rig.path(&name)).unwrap_or_default();
        reports.push(text.lines().count().saturating_sub(1));
    }
    let last = rig.run(&cfg, [TOKEN; 3]);
    assert!(last.code == 0 || last.code == 2, "{}", last.stderr);
    // The last run's report covers every input row on its own.
    assert_invariant(&last.report, &SINKS, &[("in.csv", n)]);
    // No CloudHumans phone messaged twice, across all runs.
    for (phone, times) in times_messaged(&rig) {
        assert_eq!(times, 1, "{phone} messaged {times} times");
    }
    // Every valid unique phone ends delivered (or unknown for CloudHumans).
    let delivered = ["sent", "created", "updated", "unchanged"];
    for r in &last.report {
        let ok = delivered.contains(&r["status"].as_str())
            || (r["sink"] == "cloudhumans" && r["status"] == "unknown");
        assert!(ok, "{r:?}");
    }
    // And what the sandbox holds matches: every phone reached Chatfuel and Weni.
    let [chatfuel, weni, _] = received(&last.log);
    assert_eq!(chatfuel.len(), 240);
    assert_eq!(weni.len(), 240);
    // The killed runs' reports hold only rows they finished (a partial file is fine).
    assert!(reports.iter().all(|&rows| rows <= n as usize * 3));
}

#[test]
fn ctrl_c_finishes_requests_in_flight_flushes_state_and_report_and_exits_2() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(200));
    // Weni at 50/s: about four seconds of sending, interrupted after 20 contacts.
    let cfg = config("enabled = false", "rate = \"50/s\"", "enabled = false");
    let mut child = rig.spawn(&cfg, "interrupted.csv");
    assert!(rig.wait_until(Duration::from_secs(30), |log| log.weni().writes.len() >= 20));
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "an interrupted run exits 2");
    let report = common::read_report(&rig.path("interrupted.csv"));
    // Every row was read before the interrupt (one chunk), so every row is accounted for.
    assert_invariant(&report, &["weni"], &[("in.csv", n)]);
    let created: HashSet<String> = report
        .iter()
        .filter(|r| r["status"] == "created")
        .map(|r| r["row"].clone())
        .collect();
    // A row is `created` once its upsert and its group add are done; rows
    // upserted whose add had not gone out at the interrupt are `skipped` too.
    let upserted = rig.log().weni().writes.len();
    assert!(
        !created.is_empty() && created.len() <= upserted && upserted < 200,
        "{} created, {upserted} upserted",
        created.len()
    );
    for r in report.iter().filter(|r| r["status"] != "created") {
        assert_eq!(r["status"], "skipped", "{r:?}");
        assert!(r["detail"].contains("interrupted"), "{}", r["detail"]);
    }
    // The state holds what was delivered: the next run sends only the rest.
    let writes_before = rig.log().weni().writes.len();
    let next = rig.run(&cfg, [TOKEN; 3]);
    assert_eq!(next.code, 0, "{}", next.stderr);
    for r in &next.report {
        if created.contains(&r["row"]) {
            assert_eq!(r["status"], "unchanged", "{r:?}");
        } else {
            // `updated` for a contact upserted before the interrupt but not yet in its group.
            assert!(
                r["status"] == "created" || r["status"] == "updated",
                "{r:?}"
            );
        }
    }
    assert_eq!(
        next.log.weni().writes.len() - writes_before,
        200 - created.len()
    );
}
