//! The fakes answer as the real APIs do (shared/API.md §5): auth failures,
//! schemas, Weni semantics, and each platform's 429. Plain HTTP against the
//! sandbox on 127.0.0.1, plus the standalone `crm-import sandbox` binary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crm_import::config::Rate;
use crm_import::sandbox::{Sandbox, SandboxOptions};
use serde_json::{Value, json};

const TOKEN: &str = "t0k3n";

fn start(options: SandboxOptions) -> (tokio::runtime::Runtime, Sandbox) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sandbox = rt
        .block_on(Sandbox::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            options,
        ))
        .unwrap();
    (rt, sandbox)
}

fn options() -> SandboxOptions {
    SandboxOptions {
        token: TOKEN.into(),
        ..SandboxOptions::default()
    }
}

/// (status, headers, body) of one request.
async fn call(request: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, String) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

#[test]
fn auth_failures_answer_like_each_platform() {
    let (rt, sandbox) = start(options());
    let base = sandbox.base_url();
    rt.block_on(async {
        let c = reqwest::Client::new();
        // Chatfuel: 401 with an empty body.
        let (s, _, body) = call(
            c.post(format!(
                "{base}/api/contacts/62ed0d816e5d77079f07db49/whatsapp/"
            ))
            .json(&json!({})),
        )
        .await;
        assert_eq!((s, body.as_str()), (401, ""));
        // Weni: 403 (never 401) with DRF's detail.
        let (s, _, body) = call(c.get(format!("{base}/api/v2/fields.json"))).await;
        assert_eq!(s, 403);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["detail"],
            "Authentication credentials were not provided."
        );
        let (s, _, body) = call(
            c.get(format!("{base}/api/v2/fields.json"))
                .header("authorization", "Token nope"),
        )
        .await;
        assert_eq!(
            (
                s,
                serde_json::from_str::<Value>(&body).unwrap()["detail"].clone()
            ),
            (403, json!("Invalid token"))
        );
        // CloudHumans: Chatwoot's two 401 bodies.
        let url = format!(
            "{base}/api/v1/accounts/1/conversations/create_proactive_whatsapp_conversation"
        );
        let (s, _, body) = call(c.post(&url).json(&json!({}))).await;
        assert_eq!(s, 401);
        assert!(body.contains("You need to sign in"));
        let (s, _, body) = call(
            c.post(&url)
                .header("api_access_token", "nope")
                .json(&json!({})),
        )
        .await;
        assert_eq!(
            (s, body.as_str()),
            (401, r#"{"error":"Invalid Access Token"}"#)
        );
    });
}

#[test]
fn weni_upsert_semantics_fields_and_groups() {
    let (rt, sandbox) = start(options());
    let base = sandbox.base_url();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let auth = format!("Token {TOKEN}");
        let post = |path: &str| {
            c.post(format!("{base}/api/v2/{path}"))
                .header("authorization", &auth)
        };
        // Fields: key derived from the label; reserved keys refused; uniqueness.
        let (s, _, body) =
            call(post("fields.json").json(&json!({"label": "Nick name", "value_type": "text"})))
                .await;
        assert_eq!(s, 201);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["key"],
            "nick_name"
        );
        let (s, _, body) =
            call(post("fields.json").json(&json!({"label": "NICK NAME", "value_type": "text"})))
                .await;
        assert_eq!(s, 400);
        assert!(
            body.contains("This field must be unique."),
            "labels are unique case-insensitively: {body}"
        );
        let (s, _, body) =
            call(post("fields.json").json(&json!({"label": "nick-name", "value_type": "text"})))
                .await;
        assert_eq!(s, 400);
        assert!(
            body.contains("nick_name")
                && body.contains("conflicts with an existing contact field."),
            "{body}"
        );
        let (s, _, body) =
            call(post("fields.json").json(&json!({"label": "Created By", "value_type": "text"})))
                .await;
        assert_eq!(s, 400);
        assert!(body.contains("is invalid or a reserved name"), "{body}");
        let (s, _, _) = call(post("groups.json").json(&json!({"name": "VIP"}))).await;
        assert_eq!(s, 201);
        // ?urn= upsert: 201, then 200 for the same contact; urns in the body are refused.
        let upsert = |body: Value| {
            post("contacts.json")
                .query(&[("urn", "whatsapp:5511987654321")])
                .json(&body)
        };
        let (s, _, first) = call(upsert(
            json!({"name": "Ana", "groups": ["vip"], "fields": {"nick_name": "A"}}),
        ))
        .await;
        assert_eq!(s, 201, "{first}");
        let first: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(
            first["groups"][0]["name"], "VIP",
            "groups resolve by name, case-insensitively"
        );
        let (s, _, second) = call(upsert(json!({"name": "Ana Silva"}))).await;
        assert_eq!(s, 200);
        let second: Value = serde_json::from_str(&second).unwrap();
        assert_eq!(second["uuid"], first["uuid"]);
        assert_eq!(second["fields"]["nick_name"], "A", "fields merge");
        let (s, _, body) = call(upsert(json!({"urns": ["whatsapp:5511900000000"]}))).await;
        assert_eq!(s, 400);
        assert!(
            body.contains("Field not allowed when using URN in URL"),
            "{body}"
        );
        let (s, _, body) = call(upsert(json!({"fields": {"plan": "x"}}))).await;
        assert_eq!(s, 400);
        assert!(body.contains("Invalid contact field key: plan"), "{body}");
        // A whatsapp URN with '+' is invalid; a taken URN on plain create is refused.
        let (s, _, _) = call(
            post("contacts.json")
                .query(&[("urn", "whatsapp:+5511987654321")])
                .json(&json!({})),
        )
        .await;
        assert_eq!(s, 400);
        let (s, _, body) =
            call(post("contacts.json").json(&json!({"urns": ["whatsapp:5511987654321"]}))).await;
        assert_eq!(s, 400);
        assert!(body.contains("URN belongs to another contact"), "{body}");
        // Soft delete frees the URN: 204, then 404.
        let delete = || {
            c.delete(format!("{base}/api/v2/contacts.json"))
                .header("authorization", &auth)
                .query(&[("urn", "whatsapp:5511987654321")])
        };
        assert_eq!(call(delete()).await.0, 204);
        assert_eq!(call(delete()).await.0, 404);
    });
}

#[test]
fn throttles_answer_like_each_platform() {
    let mut o = options();
    o.platform_mut("weni").rate = Rate::parse("2/min");
    o.platform_mut("cloudhumans").rate = Rate::parse("2/min");
    let (rt, sandbox) = start(o);
    let base = sandbox.base_url();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let weni = || {
            c.get(format!("{base}/api/v2/groups.json"))
                .header("authorization", format!("Token {TOKEN}"))
        };
        assert_eq!(call(weni()).await.0, 200);
        assert_eq!(call(weni()).await.0, 200);
        let (s, headers, body) = call(weni()).await;
        assert_eq!(s, 429);
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry));
        assert!(
            body.contains(&format!(
                "Request was throttled. Expected available in {retry} seconds."
            )),
            "{body}"
        );
        // Fields share the v2 scope with groups; contacts have their own bucket.
        let contacts = c
            .get(format!("{base}/api/v2/contacts.json"))
            .header("authorization", format!("Token {TOKEN}"));
        assert_eq!(call(contacts).await.0, 200);

        let url = format!(
            "{base}/api/v1/accounts/1/conversations/create_proactive_whatsapp_conversation"
        );
        let send = || {
            c.post(&url).header("api_access_token", TOKEN).json(
                &json!({"inbox_id": "2", "phone_number": "+5511987654321", "template_name": "t"}),
            )
        };
        assert_eq!(call(send()).await.0, 200);
        assert_eq!(call(send()).await.0, 200);
        let (s, headers, body) = call(send()).await;
        assert_eq!((s, body.as_str()), (429, "Retry later\n"));
        assert!(
            headers.get("retry-after").is_none(),
            "rack-attack sends no Retry-After"
        );
        assert_eq!(headers["content-type"], "text/plain");
    });
    assert_eq!(
        sandbox.log().cloudhumans().messages.len(),
        2,
        "every accepted call is one message"
    );
}

#[test]
fn standalone_sandbox_prints_its_address_and_serves_the_log() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crm-import"))
        .args(["sandbox", "--listen", "127.0.0.1:0", "--token", TOKEN])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let log: Value = rt.block_on(async {
        let c = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        c.get(format!("{url}/_sandbox/log"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(log["weni"]["contacts"].as_array().unwrap().is_empty());

    // Anything but loopback is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_crm-import"))
        .args(["sandbox", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback only"));
}
