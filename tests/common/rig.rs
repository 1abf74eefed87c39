//! A sandbox started in the test process plus a scratch directory, and the
//! helpers the delivery and state tests share.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{Row, read_report};
use crm_import::sandbox::{Sandbox, SandboxLog, SandboxOptions};

pub const BIN: &str = env!("CARGO_BIN_EXE_crm-import");
pub const TOKEN: &str = "test-token";
pub const SINKS: [&str; 3] = ["chatfuel", "weni", "cloudhumans"];

/// A sandbox in this process plus a scratch directory for config, input and report.
pub struct Rig {
    runtime: tokio::runtime::Runtime,
    sandbox: Option<Sandbox>,
    dir: tempfile::TempDir,
}

pub struct RunResult {
    pub code: i32,
    pub stderr: String,
    pub report: Vec<Row>,
    pub log: SandboxLog,
}

impl Rig {
    pub fn new(options: SandboxOptions) -> Rig {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let sandbox = runtime
            .block_on(Sandbox::start(addr, options))
            .expect("sandbox starts");
        Rig {
            runtime,
            sandbox: Some(sandbox),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn url(&self) -> String {
        self.sandbox.as_ref().unwrap().base_url()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `rows` data rows: `id,first_name,phone,plan,language`.
    pub fn input(&self, rows: &[(String, String)]) -> u64 {
        let mut text = String::from("id,first_name,phone,plan,language\n");
        for (i, (phone, plan)) in rows.iter().enumerate() {
            text.push_str(&format!("{},Name{i},\"{phone}\",{plan},por\n", i + 1));
        }
        std::fs::write(self.path("in.csv"), text).unwrap();
        rows.len() as u64
    }

    /// Runs the binary with `config` (`{url}` replaced by the sandbox URL) and `tokens` per sink.
    pub fn run(&self, config: &str, tokens: [&str; 3]) -> RunResult {
        self.run_args(config, tokens, &[])
    }

    /// The command line of a run, with extra flags.
    fn command(&self, config: &str, tokens: [&str; 3], extra: &[&str], report: &str) -> Command {
        std::fs::write(
            self.path("import.toml"),
            config.replace("{url}", &self.url()),
        )
        .unwrap();
        let mut command = Command::new(BIN);
        command
            .current_dir(self.dir.path())
            .args(["run", "-q", "--config", "import.toml", "--report", report])
            .args(extra)
            .arg("in.csv")
            .env("CHATFUEL_API_TOKEN", tokens[0])
            .env("WENI_API_TOKEN", tokens[1])
            .env("CLOUDHUMANS_API_TOKEN", tokens[2]);
        command
    }

    /// Starts a run without waiting for it (to kill it); its report goes to `report`.
    pub fn spawn(&self, config: &str, report: &str) -> Child {
        self.command(config, [TOKEN; 3], &[], report)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Starts a run with extra flags, its stderr piped (read it with `wait_with_output`).
    pub fn spawn_args(&self, config: &str, extra: &[&str], report: &str) -> Child {
        self.command(config, [TOKEN; 3], extra, report)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The same command line as a run, to adjust before running it.
    pub fn command_for(&self, config: &str, extra: &[&str], report: &str) -> Command {
        self.command(config, [TOKEN; 3], extra, report)
    }

    /// The sandbox's log now.
    pub fn log(&self) -> SandboxLog {
        self.sandbox.as_ref().unwrap().log()
    }

    /// Waits until `condition` holds for the sandbox log, at most `deadline`.
    pub fn wait_until(
        &self,
        deadline: std::time::Duration,
        condition: impl Fn(&SandboxLog) -> bool,
    ) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < deadline {
            if condition(&self.log()) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    }

    /// Runs with extra flags (`--full`, `--dry-run`, …).
    pub fn run_args(&self, config: &str, tokens: [&str; 3], extra: &[&str]) -> RunResult {
        let out = self
            .command(config, tokens, extra, "report.csv")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        for t in tokens {
            assert!(
                !stderr.contains(t) || t == TOKEN && !stderr.contains(TOKEN),
                "a token leaked into stderr"
            );
        }
        let report = read_report(&self.path("report.csv"));
        let report_text = std::fs::read_to_string(self.path("report.csv")).unwrap_or_default();
        for t in tokens {
            assert!(!report_text.contains(t), "a token leaked into the report");
        }
        RunResult {
            code: out.status.code().unwrap_or(-1),
            stderr,
            report,
            log: self.sandbox.as_ref().unwrap().log(),
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // The sandbox's tasks live on this runtime: stop it before the runtime goes.
        let _guard = self.runtime.enter();
        drop(self.sandbox.take());
    }
}

/// `n` distinct valid Brazilian mobiles in mixed notations, with plans.
pub fn phones(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let sub = 9_6000_0000u64 + i as u64 * 7;
            let phone = match i % 3 {
                0 => format!("(11) {}-{:04}", sub / 10_000, sub % 10_000),
                1 => format!("+55 11 {sub}"),
                _ => format!("5511{sub}"),
            };
            let plan = if i % 4 == 0 { "gold" } else { "silver" };
            (phone, plan.to_owned())
        })
        .collect()
}

/// One sink table: `defaults` overridden by the `key = value` lines of `extra`.
pub fn table(name: &str, defaults: &[(&str, &str)], extra: &str) -> String {
    let overrides: Vec<(&str, &str)> = extra
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let mut out = format!("[sinks.{name}]\n");
    for (k, v) in defaults {
        if !overrides.iter().any(|(o, _)| o == k) {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    for (k, v) in overrides {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out
}

/// All three sinks, fast and with small retries; `{url}` is the sandbox.
pub fn config(extra_chatfuel: &str, extra_weni: &str, extra_cloudhumans: &str) -> String {
    let fast = [
        ("base_url", "\"{url}\""),
        ("rate", "\"2000/s\""),
        ("concurrency", "4"),
        ("timeout", "\"2s\""),
        ("retry_backoff", "\"5ms\""),
        ("max_retries", "20"),
    ];
    let with = |own: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        own.iter().chain(fast.iter()).copied().collect()
    };
    let chatfuel = with(&[
        ("automation_id", "\"62ed0d816e5d77079f07db49\""),
        ("property_columns", "{ pricingPlan = \"plan\" }"),
        ("properties", "{ source = \"crm_import\" }"),
    ]);
    let weni = with(&[
        ("name", "\"{first_name}\""),
        ("language", "\"{language}\""),
        ("groups", "[\"CRM import\"]"),
        ("fields", "{ plan = \"{plan}\", signup = \"{id}\" }"),
        ("field_types", "{ signup = \"numeric\" }"),
        ("actions_rate", "\"2000/s\""),
    ]);
    let cloudhumans = with(&[
        ("account_id", "\"1\""),
        ("inbox_id", "\"2\""),
        ("template_name", "\"welcome_v2\""),
        ("buttons", "[\"{id}\"]"),
        ("params", "{ name = \"{first_name}\" }"),
    ]);
    format!(
        "[input]\nphone_column = \"phone\"\ndefault_region = \"BR\"\nid_column = \"id\"\n\n{}\n{}\n{}",
        table("chatfuel", &chatfuel, extra_chatfuel),
        table("weni", &weni, extra_weni),
        table("cloudhumans", &cloudhumans, extra_cloudhumans)
    )
}

pub fn sandbox_options() -> SandboxOptions {
    SandboxOptions {
        token: TOKEN.into(),
        ..SandboxOptions::default()
    }
}

pub fn by_sink<'a>(report: &'a [Row], sink: &str) -> Vec<&'a Row> {
    report.iter().filter(|r| r["sink"] == sink).collect()
}

/// Phones (E.164) the sandbox received per platform, with how many times.
pub fn received(log: &SandboxLog) -> [HashMap<String, usize>; 3] {
    let mut chatfuel = HashMap::new();
    for r in &log.chatfuel().requests {
        for p in &r.phones {
            *chatfuel.entry(p.clone()).or_insert(0) += 1;
        }
    }
    let mut weni = HashMap::new();
    for c in log.weni().contacts.iter().filter(|c| c.active) {
        for u in &c.urns {
            let phone = format!("+{}", u.trim_start_matches("whatsapp:"));
            *weni.entry(phone).or_insert(0) += 1;
        }
    }
    let mut cloudhumans = HashMap::new();
    for m in &log.cloudhumans().messages {
        *cloudhumans.entry(m.phone_number.clone()).or_insert(0) += 1;
    }
    [chatfuel, weni, cloudhumans]
}
