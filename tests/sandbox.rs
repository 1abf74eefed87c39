//! Delivery: the real binary against the sandbox on 127.0.0.1, started in this
//! test process with the faults each test needs. Every test compares the report
//! with what the sandbox received and applied.
//!
//! No test sleeps: each waits for the binary to exit (its own deadline is the
//! sinks' `timeout` × retries, all small here).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::assert_invariant;
use common::rig::*;
use crm_import::config::Rate;
use crm_import::sandbox::Faults;

#[test]
fn clean_run_delivers_every_unique_phone_exactly_once_and_the_report_agrees() {
    let rig = Rig::new(sandbox_options());
    let mut rows = phones(300);
    rows.push(rows[5].clone()); // a duplicate
    rows.push(("12345".into(), "gold".into())); // invalid
    let n = rig.input(&rows);
    let out = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_invariant(&out.report, &SINKS, &[("in.csv", n)]);
    let [chatfuel, weni, cloudhumans] = received(&out.log);
    for (sink, got, ok) in [
        ("chatfuel", &chatfuel, ["sent"].as_slice()),
        ("weni", &weni, ["created"].as_slice()),
        ("cloudhumans", &cloudhumans, ["sent"].as_slice()),
    ] {
        let rows = by_sink(&out.report, sink);
        assert_eq!(rows.len(), 300, "{sink}: one row per unique phone");
        for r in &rows {
            assert!(ok.contains(&r["status"].as_str()), "{sink}: {r:?}");
            assert_eq!(
                got.get(&r["phone_e164"]),
                Some(&1),
                "{sink}: {} received exactly once",
                r["phone_e164"]
            );
            assert_eq!(r["http_status"], if sink == "weni" { "201" } else { "200" });
            assert_eq!(r["attempts"], "1");
        }
        assert_eq!(
            got.len(),
            300,
            "{sink}: nothing received that the report does not show"
        );
    }
    // Weni: the field and group were created before the upserts, with the configured types.
    let weni = out.log.weni();
    let fields: BTreeMap<_, _> = weni
        .fields
        .iter()
        .map(|f| (f.key.as_str(), f.value_type.as_str()))
        .collect();
    assert_eq!(
        fields,
        BTreeMap::from([("plan", "text"), ("signup", "numeric")])
    );
    assert_eq!(out.log.weni().groups.len(), 1);
    let first = weni
        .contacts
        .iter()
        .find(|c| c.urns == ["whatsapp:5511960000000"])
        .expect("row 1's contact");
    assert_eq!(first.groups, vec!["CRM import".to_string()]);
    assert_eq!(first.fields.get("plan").map(String::as_str), Some("gold"));
    assert_eq!(first.language.as_deref(), Some("por"));
    // CloudHumans: template variables at the root and buttons as button_param_N.
    let m = &out.log.cloudhumans().messages[0];
    assert_eq!(m.template_name, "welcome_v2");
    assert!(
        m.extra.contains_key("name") && m.extra.contains_key("button_param_0"),
        "{:?}",
        m.extra
    );
}

#[test]
fn rerun_updates_weni_contacts_with_200() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(20));
    let first = rig.run(&config("", "", ""), [TOKEN; 3]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    // --full: the state would otherwise (rightly) skip every unchanged row.
    let second = rig.run_args(&config("", "", ""), [TOKEN; 3], &["--full"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_invariant(&second.report, &SINKS, &[("in.csv", n)]);
    assert!(
        by_sink(&second.report, "weni")
            .iter()
            .all(|r| r["status"] == "updated" && r["http_status"] == "200")
    );
    assert_eq!(
        second.log.weni().contacts.len(),
        20,
        "upsert by URN creates no duplicates"
    );
}

#[test]
fn faults_and_429_storms_lose_nothing_and_never_message_twice() {
    let faults = Faults {
        error_rate: 0.10,
        drop_after: 0.05,
        drop_before: 0.05,
        ..Faults::default()
    };
    let mut options = sandbox_options();
    for platform in options.platforms.values_mut() {
        platform.faults = faults.clone();
    }
    // Throttles well below the client's rate: 429 storms on every platform.
    options.platform_mut("chatfuel").rate = Some(Rate::parse("20/s").unwrap());
    options.platform_mut("weni").rate = Some(Rate::parse("150/s").unwrap());
    options.platform_mut("cloudhumans").rate = Some(Rate::parse("150/s").unwrap());
    let rig = Rig::new(options);
    let n = rig.input(&phones(400));
    // Small Chatfuel batches so that Chatfuel makes enough requests to meet faults.
    let out = rig.run(&config("batch_size = 10", "", ""), [TOKEN; 3]);
    assert!(out.code == 0 || out.code == 2, "{}", out.stderr);
    assert_invariant(&out.report, &SINKS, &[("in.csv", n)]);
    let stats = &out.log.stats;
    for sink in SINKS {
        let s = &stats[sink];
        assert!(
            s.errors_500 > 0 && s.dropped_before + s.dropped_after > 0,
            "{sink}: faults injected: {s:?}"
        );
        assert!(s.throttled > 0, "{sink}: 429s injected: {s:?}");
    }
    let [chatfuel, weni, cloudhumans] = received(&out.log);
    // Idempotent sinks retry through everything: all delivered.
    for (sink, got) in [("chatfuel", &chatfuel), ("weni", &weni)] {
        for r in by_sink(&out.report, sink) {
            assert!(
                ["sent", "created", "updated"].contains(&r["status"].as_str()),
                "{sink}: {r:?}"
            );
            assert!(
                got.contains_key(&r["phone_e164"]),
                "{sink}: reported delivered but not received: {r:?}"
            );
        }
    }
    // CloudHumans: never twice; `sent` means received; `unknown` only where the answer was lost.
    let mut unknown = 0;
    for r in by_sink(&out.report, "cloudhumans") {
        let times = cloudhumans.get(&r["phone_e164"]).copied().unwrap_or(0);
        assert!(times <= 1, "{} messaged {times} times", r["phone_e164"]);
        match r["status"].as_str() {
            "sent" => assert_eq!(times, 1, "{r:?}"),
            "unknown" => unknown += 1,
            other => panic!("unexpected cloudhumans status {other}: {r:?}"),
        }
    }
    assert!(
        unknown > 0,
        "drops happened, so some outcomes must be unknown"
    );
    assert_eq!(out.code, 2, "unknown rows make exit 2");
}

#[test]
fn refused_auth_stops_only_its_sink() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(50));
    let out = rig.run(
        &config("concurrency = 1", "", ""),
        ["wrong-chatfuel-token", TOKEN, TOKEN],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_invariant(&out.report, &SINKS, &[("in.csv", n)]);
    let chatfuel = by_sink(&out.report, "chatfuel");
    let rejected: Vec<_> = chatfuel
        .iter()
        .filter(|r| r["status"] == "rejected")
        .collect();
    assert!(!rejected.is_empty() && rejected.iter().all(|r| r["http_status"] == "401"));
    assert!(
        chatfuel
            .iter()
            .all(|r| r["status"] == "rejected" || r["status"] == "skipped"),
        "the rest of the sink is skipped"
    );
    assert!(out.log.chatfuel().requests.is_empty());
    assert_eq!(
        out.log.stats["chatfuel"].requests, 1,
        "stopped at once, not burning through the file"
    );
    assert!(
        by_sink(&out.report, "weni")
            .iter()
            .all(|r| r["status"] == "created")
    );
    assert!(
        by_sink(&out.report, "cloudhumans")
            .iter()
            .all(|r| r["status"] == "sent")
    );
    assert!(!out.stderr.contains("wrong-chatfuel-token"));

    // Every sink refused: exit 1 (a fresh rig: no state says the rows went already).
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(50));
    let out = rig.run(&config("", "", ""), ["bad", "bad", "bad"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        by_sink(&out.report, "weni")
            .iter()
            .all(|r| r["status"] == "skipped"),
        "Weni refused during preparation"
    );
}

#[test]
fn platform_refusals_end_rejected_with_the_api_message() {
    let mut options = sandbox_options();
    options.cloudhumans_templates = vec!["welcome_v2".into()];
    let rig = Rig::new(options);
    let n = rig.input(&phones(5));
    let out = rig.run(&config("", "", "template_name = \"nope\""), [TOKEN; 3]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_invariant(&out.report, &SINKS, &[("in.csv", n)]);
    for r in by_sink(&out.report, "cloudhumans") {
        assert_eq!(r["status"], "rejected");
        assert_eq!(r["http_status"], "422");
        assert_eq!(r["attempts"], "1", "4xx is never retried");
        assert!(
            r["detail"].contains("Template not found: nope"),
            "{}",
            r["detail"]
        );
    }
    assert!(out.log.cloudhumans().messages.is_empty());
}

#[test]
fn chatfuel_batches_are_capped_at_1000_and_grouped_by_property_set() {
    let rig = Rig::new(sandbox_options());
    let rows = phones(2600);
    let plans: HashMap<String, String> = rows
        .iter()
        .enumerate()
        .map(|(i, (_, plan))| ((i + 1).to_string(), plan.clone()))
        .collect();
    rig.input(&rows);
    let out = rig.run(
        &config("", "enabled = false", "enabled = false"),
        [TOKEN; 3],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let requests = &out.log.chatfuel().requests;
    let (gold, silver) = (650, 1950);
    assert_eq!(requests.len(), 1 + 2, "ceil(650/1000) + ceil(1950/1000)");
    // Map each phone back to its plan through the report.
    let plan_of: HashMap<&str, &str> = out
        .report
        .iter()
        .map(|r| (r["phone_e164"].as_str(), plans[&r["record_id"]].as_str()))
        .collect();
    let mut per_plan: HashMap<String, usize> = HashMap::new();
    for request in requests {
        assert!(request.phones.len() <= 1000);
        let plan = &request.properties["pricingPlan"];
        assert_eq!(request.properties["source"], "crm_import");
        for phone in &request.phones {
            assert_eq!(plan_of[phone.as_str()], plan, "a batch mixes property sets");
        }
        *per_plan.entry(plan.clone()).or_insert(0) += request.phones.len();
    }
    assert_eq!(per_plan["gold"], gold);
    assert_eq!(per_plan["silver"], silver);
}

#[test]
fn weni_delete_mode() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(10));
    let upsert = config("enabled = false", "", "enabled = false");
    assert_eq!(rig.run(&upsert, [TOKEN; 3]).code, 0);
    // Delete rows 1..10 after adding one phone that Weni never saw.
    let mut rows = phones(10);
    rows.push(("+55 21 98888-7777".into(), "gold".into()));
    let n2 = rig.input(&rows);
    let delete = config("enabled = false", "mode = \"delete\"", "enabled = false");
    let out = rig.run(&delete, [TOKEN; 3]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_invariant(&out.report, &["weni"], &[("in.csv", n2)]);
    let weni = by_sink(&out.report, "weni");
    assert_eq!(
        weni.iter().filter(|r| r["status"] == "deleted").count(),
        n as usize
    );
    let missing: Vec<_> = weni.iter().filter(|r| r["status"] == "not_found").collect();
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0]["phone_e164"], "+5521988887777");
    assert!(out.log.weni().contacts.iter().all(|c| !c.active));
}

#[test]
fn cloudhumans_timeout_after_sending_is_unknown_and_never_resent() {
    let mut options = sandbox_options();
    options.platform_mut("cloudhumans").faults = Faults {
        slow_rate: 1.0,
        slow_delay: Duration::from_secs(3),
        ..Faults::default()
    };
    let rig = Rig::new(options);
    let n = rig.input(&phones(6));
    let out = rig.run(
        &config("enabled = false", "enabled = false", "timeout = \"300ms\""),
        [TOKEN; 3],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_invariant(&out.report, &["cloudhumans"], &[("in.csv", n)]);
    for r in by_sink(&out.report, "cloudhumans") {
        assert_eq!(r["status"], "unknown", "{r:?}");
        assert_eq!(r["attempts"], "1");
    }
    let phones: HashSet<_> = out
        .log
        .cloudhumans()
        .messages
        .iter()
        .map(|m| m.phone_number.clone())
        .collect();
    assert_eq!(out.log.cloudhumans().messages.len(), 6, "each applied once");
    assert_eq!(phones.len(), 6);
}

#[test]
fn connection_refused_is_retried_then_failed() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(3));
    let cloudhumans = format!("max_retries = 2\nbase_url = \"http://{closed}\"");
    let out = rig.run(
        &config("enabled = false", "enabled = false", &cloudhumans),
        [TOKEN; 3],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_invariant(&out.report, &["cloudhumans"], &[("in.csv", n)]);
    for r in by_sink(&out.report, "cloudhumans") {
        assert_eq!(
            r["status"], "failed",
            "never left, so retried and failed, not unknown: {r:?}"
        );
        assert_eq!(r["attempts"], "3");
        assert!(r["detail"].contains("cannot connect"), "{}", r["detail"]);
    }
}

#[test]
fn weni_preparation_follows_pagination_and_creates_only_what_is_missing() {
    let mut options = sandbox_options();
    options.page_size = 1;
    let rig = Rig::new(options);
    let n = rig.input(&phones(4));
    let weni = "fields = { plan = \"{plan}\", signup = \"{id}\", nick = \"{first_name}\" }\ngroups = [\"A\", \"B\"]";
    let first = rig.run(
        &config("enabled = false", weni, "enabled = false"),
        [TOKEN; 3],
    );
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.log.weni().fields.len(), 3);
    assert_eq!(first.log.weni().groups.len(), 2);
    let before = first.log.stats["weni"].requests;
    let second = rig.run_args(
        &config("enabled = false", weni, "enabled = false"),
        [TOKEN; 3],
        &["--full"],
    );
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_invariant(&second.report, &["weni"], &[("in.csv", n)]);
    // One page per field (3) and per group (2), then the 4 upserts and their
    // group adds (contact_actions): nothing created again.
    let adds = (second.log.weni().actions.len() - first.log.weni().actions.len()) as u64;
    assert!(adds >= 2, "both groups were added to");
    assert_eq!(second.log.stats["weni"].requests - before, 3 + 2 + n + adds);
    assert_eq!(second.log.weni().fields.len(), 3);
}

#[test]
fn max_messages_sends_the_first_n_in_input_order_and_skips_the_rest() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(20));
    let out = rig.run(
        &config("enabled = false", "enabled = false", "max_messages = 5"),
        [TOKEN; 3],
    );
    assert_eq!(out.code, 2, "skipped rows make exit 2: {}", out.stderr);
    assert_invariant(&out.report, &["cloudhumans"], &[("in.csv", n)]);
    for r in &out.report {
        let row: u64 = r["row"].parse().unwrap();
        let expected = if row <= 5 { "sent" } else { "skipped" };
        assert_eq!(r["status"], expected, "{r:?}");
        if row > 5 {
            assert_eq!(r["detail"], "max_messages (5) reached");
        }
    }
    assert_eq!(out.log.cloudhumans().messages.len(), 5);
}
