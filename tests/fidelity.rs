//! Platform fidelity: Weni groups without collateral damage, Chatfuel split
//! retries, Weni create races — the real binary against the sandbox.

mod common;

use std::time::Duration;

use common::rig::{Rig, TOKEN, by_sink, config, phones, received, sandbox_options};
use common::{assert_invariant, read_report};
use crm_import::sandbox::SandboxLog;
use crm_import::sandbox::weni::SeedContact;

fn only_weni(extra: &str) -> String {
    config("enabled = false", extra, "enabled = false")
}

/// The WhatsApp URN of the i-th phone of `phones()`.
fn urn_of(i: usize) -> String {
    format!("whatsapp:5511{}", 9_6000_0000u64 + i as u64 * 7)
}

fn groups_of(log: &SandboxLog, urn: &str) -> Vec<String> {
    let weni = log.weni();
    let contact = weni
        .contacts
        .iter()
        .find(|c| c.urns.iter().any(|u| u == urn))
        .unwrap_or_else(|| panic!("{urn} is not in Weni"));
    contact.groups.clone()
}

fn total_requests(log: &SandboxLog) -> u64 {
    log.stats.values().map(|s| s.requests).sum()
}

/// `group_mode = "add"` (the default): a contact in `VIP` before the import
/// is still in `VIP` after it, and also in the configured group; no upsert
/// carries `groups`; `contact_actions` takes at most 100 contacts; a blocked
/// contact ends `updated` with the refusal in `detail` while the rest of its
/// batch is added; an unchanged re-run makes no request.
#[test]
fn weni_adds_to_groups_without_touching_other_memberships() {
    let mut options = sandbox_options();
    options.weni_seed = vec![
        SeedContact {
            urn: urn_of(0),
            groups: vec!["VIP".into()],
            blocked: false,
        },
        SeedContact {
            urn: urn_of(5),
            groups: Vec::new(),
            blocked: true,
        },
    ];
    let rig = Rig::new(options);
    let n = rig.input(&phones(250));
    let cfg = only_weni("");
    let run = rig.run(&cfg, [TOKEN; 3]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_invariant(&run.report, &["weni"], &[("in.csv", n)]);

    let mut vip = groups_of(&run.log, &urn_of(0));
    vip.sort();
    assert_eq!(vip, ["CRM import", "VIP"], "the VIP membership is kept");
    assert!(run.log.weni().writes.iter().all(|w| !w.groups_in_body));
    let actions = &run.log.weni().actions;
    assert!(
        actions.len() >= 3,
        "{} contact_actions requests",
        actions.len()
    );
    assert!(
        actions
            .iter()
            .all(|a| a.contacts.len() <= 100 && a.action == "add")
    );

    let blocked = run.report.iter().find(|r| r["row"] == "6").unwrap();
    assert_eq!(blocked["status"], "updated", "{blocked:?}");
    assert!(
        blocked["detail"].contains("Non-active contacts cannot be added to groups"),
        "{blocked:?}"
    );
    for i in (0..250).filter(|&i| i != 5) {
        assert!(
            groups_of(&run.log, &urn_of(i)).contains(&"CRM import".to_owned()),
            "contact {i} is in the group"
        );
    }

    let before = total_requests(&run.log);
    let again = rig.run(&cfg, [TOKEN; 3]);
    let blocked_again = again.report.iter().find(|r| r["row"] == "6").unwrap();
    assert_eq!(
        blocked_again["status"], "updated",
        "the refused add is tried again"
    );
    let unchanged = by_sink(&again.report, "weni")
        .iter()
        .filter(|r| r["status"] == "unchanged")
        .count();
    assert_eq!(unchanged, 249);
    // Only the blocked contact is sent again: the preparation's two lists
    // (fields, groups), its upsert and its add.
    assert_eq!(total_requests(&again.log) - before, 4);
}

/// With nothing blocked, an unchanged re-run makes zero requests.
#[test]
fn an_unchanged_rerun_with_groups_makes_no_request() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(30));
    let cfg = only_weni("");
    assert_eq!(rig.run(&cfg, [TOKEN; 3]).code, 0);
    let before = total_requests(&rig.log());
    let again = rig.run(&cfg, [TOKEN; 3]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.report.iter().all(|r| r["status"] == "unchanged"));
    assert_eq!(total_requests(&again.log), before);
}

/// `group_mode = "replace"` keeps the old behaviour: the upsert carries
/// `groups` and Weni sets exactly those.
#[test]
fn weni_replace_mode_sends_groups_in_the_upsert() {
    let mut options = sandbox_options();
    options.weni_seed = vec![SeedContact {
        urn: urn_of(0),
        groups: vec!["VIP".into()],
        blocked: false,
    }];
    let rig = Rig::new(options);
    rig.input(&phones(3));
    let run = rig.run(&only_weni("group_mode = \"replace\""), [TOKEN; 3]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.log.weni().writes.iter().all(|w| w.groups_in_body));
    assert!(run.log.weni().actions.is_empty());
    assert_eq!(groups_of(&run.log, &urn_of(0)), ["CRM import"]);
}

/// `kill -9` between the upserts and the group adds: the next run completes
/// the adds (both are idempotent), and every contact ends in the group.
#[test]
fn kill_9_between_upserts_and_group_adds_is_completed_by_the_next_run() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(150));
    // One contact_actions request an hour: the first add goes, the next waits
    // for its turn, and the run is killed while it waits.
    let slow = only_weni("actions_rate = \"1/h\"");
    let mut child = rig.spawn(&slow, "killed.csv");
    assert!(rig.wait_until(Duration::from_secs(60), |log| {
        log.weni().writes.len() == 150 && log.weni().actions.len() == 1
    }));
    child.kill().unwrap();
    child.wait().unwrap();
    let in_group = |log: &SandboxLog| {
        (0..150)
            .filter(|&i| groups_of(log, &urn_of(i)).contains(&"CRM import".to_owned()))
            .count()
    };
    let added_before_kill = in_group(&rig.log());
    assert!(
        added_before_kill < 150,
        "the run died before the second add"
    );

    let rerun = rig.run(&only_weni(""), [TOKEN; 3]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    assert_invariant(&rerun.report, &["weni"], &[("in.csv", n)]);
    assert_eq!(in_group(&rerun.log), 150, "every contact is in the group");
    let unchanged = rerun
        .report
        .iter()
        .filter(|r| r["status"] == "unchanged")
        .count();
    assert_eq!(
        unchanged, added_before_kill,
        "the completed ones are not sent again"
    );
}

/// Chatfuel refuses a batch holding any of 3 chosen phones: the batches are
/// split until exactly those 3 end `rejected` (HTTP 400); every other phone is
/// applied exactly once, within 2·k·⌈log2 b⌉ extra requests.
#[test]
fn chatfuel_split_retries_isolate_the_refused_phones() {
    let mut options = sandbox_options();
    let refused_rows = [10usize, 250, 251];
    options.chatfuel_refused_phones = refused_rows
        .iter()
        .map(|&i| format!("+5511{}", 9_6000_0000u64 + i as u64 * 7))
        .collect();
    let rig = Rig::new(options);
    let n = rig.input(&phones(500));
    let cfg = config(
        "batch_size = 100\nproperty_columns = {}",
        "enabled = false",
        "enabled = false",
    );
    let run = rig.run(&cfg, [TOKEN; 3]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert_invariant(&run.report, &["chatfuel"], &[("in.csv", n)]);
    let rejected: Vec<_> = run
        .report
        .iter()
        .filter(|r| r["status"] == "rejected")
        .collect();
    let mut rows: Vec<usize> = rejected
        .iter()
        .map(|r| r["row"].parse::<usize>().unwrap() - 1)
        .collect();
    rows.sort();
    assert_eq!(rows, refused_rows);
    for r in &rejected {
        assert_eq!(r["http_status"], "400");
        assert!(r["detail"].contains("invalid phone"), "{r:?}");
    }
    let applied = &received(&run.log)[0];
    assert_eq!(applied.len(), 497);
    assert!(
        applied.values().all(|&times| times == 1),
        "a phone applied twice"
    );
    let requests = run.log.stats["chatfuel"].requests;
    let bound = 5 + 2 * 3 * 7; // 5 batches, k = 3, ⌈log2 100⌉ = 7
    assert!(requests <= bound, "{requests} requests, bound {bound}");
}

/// Weni's transient 400 `URNs in use by other contacts` is retried like a 5xx.
#[test]
fn weni_urn_races_are_retried_and_the_contacts_end_created() {
    let mut options = sandbox_options();
    options.weni_urn_races = 5;
    let rig = Rig::new(options);
    rig.input(&phones(20));
    let run = rig.run(&only_weni(""), [TOKEN; 3]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.report.iter().all(|r| r["status"] == "created"),
        "{:?}",
        run.report
    );
    let races = run
        .log
        .weni()
        .writes
        .iter()
        .filter(|w| w.status == 400)
        .count();
    assert_eq!(races, 5);
    let report = read_report(&rig.path("report.csv"));
    assert!(
        report.iter().any(|r| r["attempts"] == "2"),
        "a raced create took two attempts"
    );
}

/// The dry run counts `contact_actions` requests separately, with their own estimate.
#[test]
fn the_dry_run_plans_contact_actions_separately() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(250));
    let run = rig.run_args(
        &only_weni("actions_rate = \"60/min\""),
        [TOKEN; 3],
        &["--dry-run"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("3 contact_actions requests (their own limiter); ≈ 3.0s at 60/min"),
        "{}",
        run.stderr
    );
}
