//! Each sink at its own pace, across nights: independent lanes, the time box,
//! the run lock, signals, `--limit` and `--summary-json` — the real binary
//! against the sandbox on 127.0.0.1.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::rig::{BIN, Rig, SINKS, TOKEN, by_sink, config, phones, received, sandbox_options};
use common::{assert_invariant, read_report};
use crm_import::config::Rate;

/// How many times each phone got a CloudHumans message.
fn times_messaged(rig: &Rig) -> HashMap<String, usize> {
    received(&rig.log())[2].clone()
}

/// Every one of `n` phones got exactly one CloudHumans message.
fn assert_each_messaged_once(rig: &Rig, n: usize) {
    let messaged = times_messaged(rig);
    assert_eq!(messaged.len(), n);
    assert!(
        messaged.values().all(|&times| times == 1),
        "a phone messaged twice"
    );
}

/// With Weni throttled to 10/s, Chatfuel and CloudHumans finish within 1.5×
/// their own plan time while Weni keeps going: no sink waits for another.
#[test]
fn fast_sinks_finish_at_their_own_pace_while_weni_is_throttled() {
    let mut options = sandbox_options();
    options.platform_mut("weni").rate = Some(Rate::parse("10/s").unwrap());
    let rig = Rig::new(options);
    let n = rig.input(&phones(1000));
    let cfg = config(
        "rate = \"5/s\"\nbatch_size = 50\nconcurrency = 2",
        "rate = \"10/s\"\nconcurrency = 1",
        "rate = \"100/s\"\nconcurrency = 4",
    );
    let run = rig.run_args(&cfg, [TOKEN; 3], &["--max-duration", "20s"]);
    assert_eq!(run.code, 2, "Weni cannot finish in 20 s: {}", run.stderr);
    assert_invariant(&run.report, &SINKS, &[("in.csv", n)]);

    // Plans: Chatfuel 1000 phones / 50 = 20 requests at 5/s; CloudHumans 1000 at 100/s.
    let chatfuel = &run.log.chatfuel().requests;
    let messages = &run.log.cloudhumans().messages;
    assert_eq!(chatfuel.iter().map(|r| r.phones.len()).sum::<usize>(), 1000);
    assert_eq!(messages.len(), 1000);
    let span = |first: u64, last: u64| Duration::from_millis(last - first);
    let chatfuel_span = span(chatfuel[0].at_ms, chatfuel[chatfuel.len() - 1].at_ms);
    let messages_span = span(messages[0].at_ms, messages[messages.len() - 1].at_ms);
    let chatfuel_plan = Duration::from_secs_f64(19.0 / 5.0);
    let messages_plan = Duration::from_secs_f64(999.0 / 100.0);
    assert!(
        chatfuel_span <= chatfuel_plan.mul_f64(1.5),
        "Chatfuel took {chatfuel_span:?} for a {chatfuel_plan:?} plan"
    );
    assert!(
        messages_span <= messages_plan.mul_f64(1.5),
        "CloudHumans took {messages_span:?} for a {messages_plan:?} plan"
    );
    // Weni was still going when both had finished.
    let done_at = chatfuel[chatfuel.len() - 1]
        .at_ms
        .max(messages[messages.len() - 1].at_ms);
    let weni_later = run
        .log
        .weni()
        .writes
        .iter()
        .filter(|w| w.at_ms > done_at)
        .count();
    assert!(
        weni_later > 10,
        "only {weni_later} Weni writes after the others finished"
    );
    let weni = by_sink(&run.report, "weni");
    let skipped = weni.iter().filter(|r| r["status"] == "skipped").count();
    assert!(skipped > 500, "{skipped} Weni rows left for the next night");
}

/// `--max-duration` ends the run in time: the rest is `skipped` ("time limit
/// reached"), the report is complete, exit 2; the next run sends exactly what
/// was left and nothing twice.
#[test]
fn max_duration_stops_in_time_and_the_next_run_sends_exactly_the_rest() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(200));
    let cfg = config("", "rate = \"40/s\"", "rate = \"40/s\"");
    let started = Instant::now();
    let first = rig.run_args(&cfg, [TOKEN; 3], &["--max-duration", "2s"]);
    let took = started.elapsed();
    assert_eq!(first.code, 2, "{}", first.stderr);
    // DUR + the longest timeout (2 s in the rig) + a few seconds, with room for a slow machine.
    assert!(took < Duration::from_secs(20), "ran {took:?}");
    assert_invariant(&first.report, &SINKS, &[("in.csv", n)]);
    let mut delivered: BTreeMap<&str, usize> = BTreeMap::new();
    for sink in ["weni", "cloudhumans"] {
        let rows = by_sink(&first.report, sink);
        let sent = rows
            .iter()
            .filter(|r| r["status"] == "created" || r["status"] == "sent")
            .count();
        for r in rows.iter().filter(|r| r["status"] == "skipped") {
            assert_eq!(r["detail"], "time limit reached", "{r:?}");
        }
        assert!(sent > 0 && sent < 200, "{sink}: {sent} sent in 2 s at 40/s");
        assert_eq!(
            sent + rows.iter().filter(|r| r["status"] == "skipped").count(),
            200
        );
        delivered.insert(sink, sent);
    }
    assert!(
        first.stderr.contains("--max-duration reached"),
        "{}",
        first.stderr
    );

    let weni_before = rig.log().weni().writes.len();
    let second = rig.run(&cfg, [TOKEN; 3]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(
        second.log.weni().writes.len() - weni_before,
        200 - delivered["weni"]
    );
    assert_each_messaged_once(&rig, 200);
}

/// A second run on a held state exits 1 at once, naming the state file and the
/// holder's pid, having sent nothing; after `kill -9` of the holder, a run proceeds.
#[test]
fn a_second_run_on_a_held_state_exits_1_and_kill_9_releases_the_lock() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(200));
    let cfg = config("enabled = false", "rate = \"20/s\"", "enabled = false");
    let mut holder = rig.spawn(&cfg, "holder.csv");
    assert!(rig.wait_until(Duration::from_secs(30), |log| log.weni().writes.len() >= 5));

    let started = Instant::now();
    let second = rig.command_for(&cfg, &[], "second.csv").output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("crm-import-state.db"), "{stderr}");
    assert!(stderr.contains(&holder.id().to_string()), "{stderr}");
    assert!(
        !rig.path("second.csv").exists(),
        "the second run stopped before writing anything"
    );

    holder.kill().unwrap(); // SIGKILL
    holder.wait().unwrap();
    let writes_at_kill = rig.log().weni().writes.len();
    let third = rig.run(&cfg, [TOKEN; 3]);
    assert_ne!(third.code, 1, "{}", third.stderr);
    assert!(!third.stderr.contains("in use"), "{}", third.stderr);
    assert!(
        rig.log().weni().writes.len() > writes_at_kill,
        "the new run sent"
    );
    assert_eq!(
        received(&rig.log())[1].len(),
        200,
        "every contact is in Weni"
    );
}

/// SIGTERM (what cron, systemd, Kubernetes and Airflow send) mid-run: exit 2,
/// the summary is printed, every row read is reported, the state is
/// consistent, and a re-run completes without a second CloudHumans message.
#[test]
fn sigterm_mid_run_stops_gracefully_and_the_rerun_never_messages_twice() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(200));
    let cfg = config("", "rate = \"50/s\"", "rate = \"50/s\"");
    let child = rig.spawn_args(&cfg, &[], "term.csv");
    assert!(rig.wait_until(Duration::from_secs(30), |log| log.weni().writes.len() >= 20));
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(
        stderr.contains("Report: term.csv"),
        "the summary is printed: {stderr}"
    );
    let report = read_report(&rig.path("term.csv"));
    assert_invariant(&report, &SINKS, &[("in.csv", n)]);
    let skipped: Vec<_> = report.iter().filter(|r| r["status"] == "skipped").collect();
    assert!(!skipped.is_empty());
    for r in skipped {
        assert!(r["detail"].contains("interrupted (SIGTERM)"), "{r:?}");
    }

    let rerun = rig.run(&cfg, [TOKEN; 3]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    assert_each_messaged_once(&rig, 200);
}

/// Regression: Ctrl-C during an all-`unchanged` re-run exited 0. An
/// interrupted run never exits 0.
#[test]
fn an_interrupted_run_never_exits_0() {
    let rig = Rig::new(sandbox_options());
    rig.input(&phones(50));
    let cfg = config("", "", "");
    assert_eq!(rig.run(&cfg, [TOKEN; 3]).code, 0);
    // A slow reader: stdin that stays open, so the run is mid-read when signalled.
    std::fs::write(rig.path("import.toml"), cfg.replace("{url}", &rig.url())).unwrap();
    let mut child = Command::new(BIN)
        .current_dir(rig.path(""))
        .args([
            "run",
            "-q",
            "--config",
            "import.toml",
            "--report",
            "r.csv",
            "-",
        ])
        .env("CHATFUEL_API_TOKEN", TOKEN)
        .env("WENI_API_TOKEN", TOKEN)
        .env("CLOUDHUMANS_API_TOKEN", TOKEN)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"id,first_name,phone,plan,language\n1,Name0,(11) 96000-0000,gold,por\n")
        .unwrap();
    stdin.flush().unwrap();
    // Wait until the run holds the lock (it is past start-up), then interrupt it.
    let lock = rig.path("crm-import-state.db.lock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != child.id().to_string() {
        assert!(Instant::now() < deadline, "the run never took its lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--limit N`: each sink sends its first N rows, the others end `skipped`
/// ("limit"); `--summary-json` counts equal the report's.
#[test]
fn limit_is_a_canary_and_summary_json_matches_the_report() {
    let rig = Rig::new(sandbox_options());
    let n = rig.input(&phones(40));
    let cfg = config("", "", "");
    let run = rig.run_args(
        &cfg,
        [TOKEN; 3],
        &["--limit", "5", "--summary-json", "s.json"],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert_invariant(&run.report, &SINKS, &[("in.csv", n)]);
    for sink in SINKS {
        let rows = by_sink(&run.report, sink);
        let sent: Vec<u64> = rows
            .iter()
            .filter(|r| r["status"] != "skipped")
            .map(|r| r["row"].parse().unwrap())
            .collect();
        let mut sorted = sent.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec![1, 2, 3, 4, 5],
            "{sink}: the first five in input order"
        );
        for r in rows.iter().filter(|r| r["status"] == "skipped") {
            assert_eq!(r["detail"], "limit");
        }
    }
    assert_eq!(received(&run.log)[2].len(), 5);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rig.path("s.json")).unwrap()).unwrap();
    assert_eq!(json["exit_code"], 2);
    assert_eq!(json["input_rows"], 40);
    assert_eq!(json["unique_phones"], 40);
    assert_eq!(json["interrupted"], false);
    assert_eq!(json["report"], "report.csv");
    let mut from_report: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in &run.report {
        let sink = if r["sink"].is_empty() {
            "record"
        } else {
            &r["sink"]
        };
        *from_report
            .entry((sink.to_owned(), r["status"].clone()))
            .or_default() += 1;
    }
    let mut from_json: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (sink, statuses) in json["statuses"].as_object().unwrap() {
        for (status, count) in statuses.as_object().unwrap() {
            from_json.insert((sink.clone(), status.clone()), count.as_u64().unwrap());
        }
    }
    assert_eq!(from_json, from_report);
    for sink in SINKS {
        assert!(
            json["sinks"][sink]["requests"].as_u64().unwrap() >= 1,
            "{sink}"
        );
        assert_eq!(json["sinks"][sink]["throttled"], 0);
    }
}

/// Bad `--max-duration` and `--limit` values: exit 1 naming the flag.
#[test]
fn bad_time_box_and_limit_values_exit_1_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.csv");
    let report = report.to_str().unwrap();
    for (flag, value) in [
        ("--max-duration", "0"),
        ("--max-duration", "-5m"),
        ("--max-duration", "soon"),
        ("--max-duration", "99999999999999999999s"),
        ("--limit", "0"),
        ("--limit", "-3"),
    ] {
        let out = Command::new(BIN)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["run", "--dry-run", "-q", "--config", "fixtures/demo.toml"])
            .args(["--report", report, flag, value, "fixtures/contacts.csv"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The dry run says when a sink's plan does not fit in `--max-duration`.
#[test]
fn the_dry_run_warns_when_a_plan_exceeds_the_time_box() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.csv");
    let out = Command::new(BIN)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--dry-run", "-q", "--config", "fixtures/demo.toml"])
        .args(["--report", report.to_str().unwrap(), "--max-duration", "5s"])
        .arg("fixtures/contacts.csv")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // 14 Weni contacts + preparation at 3000/h take about 19 s.
    assert!(
        stderr.contains("weni: 14 rows to send take")
            && stderr.contains("more than --max-duration"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("chatfuel: 14 rows to send take"),
        "{stderr}"
    );
}

/// A second signal quits at once (exit 130); the state stays consistent, so
/// the next run completes without messaging anyone twice.
#[test]
fn a_second_signal_quits_at_once_with_130() {
    let mut options = sandbox_options();
    // Every answer takes a while, so the first signal leaves requests in flight.
    options.platform_mut("cloudhumans").faults.latency = std::time::Duration::from_millis(300);
    let rig = Rig::new(options);
    rig.input(&phones(200));
    let cfg = config("enabled = false", "enabled = false", "rate = \"50/s\"");
    let mut child = rig.spawn_args(&cfg, &[], "quit.csv");
    assert!(rig.wait_until(Duration::from_secs(30), |log| {
        log.cloudhumans().messages.len() >= 10
    }));
    // Stderr line by line, to know when the first signal has been handled
    // (two signals sent back to back may arrive as one).
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let pid = child.id().to_string();
    let term = || Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    term();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("the first SIGTERM is acknowledged");
        if line.contains("SIGTERM: no new rows") {
            break;
        }
    }
    term();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let rerun = rig.run(&cfg, [TOKEN; 3]);
    assert_ne!(rerun.code, 1, "{}", rerun.stderr);
    let messaged = times_messaged(&rig);
    assert!(
        messaged.values().all(|&times| times == 1),
        "a phone messaged twice"
    );
}
