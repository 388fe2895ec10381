//! Operators' view: Prometheus `/metrics` (parsed by a Prometheus text-format parser,
//! its counters checked against what the test did), the admin API's access rules, and the
//! admin page in a real browser.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test]
async fn metrics_count_what_a_scripted_run_did() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut conn = connect(&dev).await;
    let before = Scrape::of(&server).await;
    let app_label = [("app_id", app.app_id.as_str())];
    assert_eq!(
        before.value("herald_pushes_accepted_total", &app_label),
        0.0
    );

    const N: usize = 25;
    let mut last = String::new();
    for i in 0..N {
        last = app.push(&dev.device_id, json!({"n": i})).await;
    }
    let got = recv_n(&mut conn, N).await;
    assert_eq!(got.len(), N);
    app.wait_acked(&last, 1).await;

    // The delivery worker counts acks once it has folded them; the status above read
    // the same projection, so they are in.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let s = Scrape::of(&server).await;
        if s.value("herald_delivered_total", &app_label) >= N as f64 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    assert_eq!(delta("herald_pushes_accepted_total", &app_label), N as f64);
    assert_eq!(
        delta("herald_inbox_entries_stored_total", &app_label),
        N as f64
    );
    assert_eq!(delta("herald_delivered_total", &app_label), N as f64);
    let route = [
        ("route", "/v1/messages"),
        ("method", "POST"),
        ("status", "202"),
    ];
    assert_eq!(delta("herald_http_requests_total", &route), N as f64);
    assert_eq!(
        delta(
            "herald_http_request_duration_seconds_count",
            &[("route", "/v1/messages"), ("method", "POST")]
        ),
        N as f64
    );
    assert_eq!(delta("herald_gateway_publishes_total", &[]), N as f64);
    assert_eq!(delta("herald_gateway_acks_total", &[]), N as f64);
    assert_eq!(delta("herald_ack_latency_seconds_count", &[]), N as f64);
    // Each push and each ack is an event; group commits cover them.
    assert!(delta("herald_log_appended_events_total", &[]) >= 2.0 * N as f64);
    assert!(delta("herald_log_sync_seconds_count", &[]) >= 1.0);
    assert_eq!(after.value("herald_gateway_connections", &[]), 1.0);
    assert!(after.value("herald_gateway_connects_total", &[]) >= 1.0);
    assert_eq!(after.value("herald_gateway_inflight", &[]), 0.0);
    assert_eq!(
        after.value("herald_delivery_lag_records", &[("partition", "0")]),
        0.0
    );
    assert!(
        after.help()["herald_pushes_accepted_total"].contains("202"),
        "every metric says what it counts"
    );

    // A refused request is counted under its route and status; an unknown path once.
    let (code, _) = app
        .push_raw(json!({"to": {"device_id": "not-a-uuid"}, "data": 1}))
        .await;
    assert_ne!(code, 202);
    let r = reqwest::get(format!("{}/no/such/route", server.base()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    conn.disconnect().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = Scrape::of(&server).await;
        let refused = s.value(
            "herald_http_requests_total",
            &[("route", "/v1/messages"), ("status", &code.to_string())],
        );
        let unmatched = s.value("herald_http_requests_total", &[("route", "unmatched")]);
        let gone = s.value("herald_gateway_disconnects_total", &[]);
        if refused == 1.0 && unmatched == 1.0 && gone == 1.0 {
            assert_eq!(s.value("herald_gateway_connections", &[]), 0.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refused {refused}, unmatched {unmatched}, disconnects {gone}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The admin operations `/openapi.json` lists (every operation secured by the admin
/// token), as (method, path) with `{id}`s filled from `ids`.
async fn admin_operations(server: &Server, ids: &[(&str, &str)]) -> Vec<(String, String)> {
    let doc: serde_json::Value = reqwest::get(format!("{}/openapi.json", server.base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let admin = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("admin_token").is_some()));
            if admin {
                let mut p = path.clone();
                for (prefix, id) in ids {
                    if p.starts_with(prefix) {
                        p = p.replace("{id}", id);
                    }
                }
                ops.push((method.to_uppercase(), p));
            }
        }
    }
    ops.sort();
    ops
}

/// Every admin route refuses a request without the admin credential: none (401), a wrong
/// token (401), an expired or forged session (401), an app's token (403), a device's
/// credentials (403); and answers the admin token and a console session. The page
/// itself is public and holds no data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admin_route_is_reachable_without_the_admin_credential() {
    let server = Server::start_configured("admin_session_ttl_s = 2\n", &[]).await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut conn = connect(&dev).await;
    let m = app.push(&dev.device_id, json!("walk")).await;
    recv_n(&mut conn, 1).await;
    let ops = admin_operations(
        &server,
        &[
            ("/v1/admin/apps", &app.app_id),
            ("/v1/admin/devices", &dev.device_id),
            ("/v1/admin/messages", &m),
        ],
    )
    .await;
    for want in [
        "/v1/apps",
        "/v1/admin/events",
        "/v1/admin/apps",
        "/v1/admin/overview",
        "/v1/admin/overview/stream",
        "/v1/admin/session",
    ] {
        assert!(ops.iter().any(|(_, p)| p == want), "{want} in {ops:?}");
    }
    let rotate = format!("/v1/admin/apps/{}/secret", app.app_id);
    assert!(ops.iter().any(|(_, p)| *p == rotate), "{rotate} in {ops:?}");
    assert!(ops.len() >= 8, "{ops:?}");

    let http = reqwest::Client::new();
    // Log in: a wrong token is refused; the right one sets an HttpOnly, SameSite=Strict
    // cookie and puts nothing in a URL.
    let login = |token: &str| {
        http.post(format!("{}/admin/login", server.base()))
            .json(&json!({ "token": token }))
            .send()
    };
    assert_eq!(login("wrong").await.unwrap().status(), 401);
    let r = login(ADMIN).await.unwrap();
    assert_eq!(r.status(), 204);
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    let session = set_cookie.split(';').next().unwrap().trim().to_owned();
    assert!(session.starts_with("herald_admin="));
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", dev.device_id, dev.device_token))
    };
    let forged = format!("herald_admin={}", app.token);

    type Cred = (&'static str, Option<(&'static str, String)>, u16);
    let creds = |session: &str| -> Vec<Cred> {
        vec![
            ("nothing", None, 401),
            (
                "a wrong bearer",
                Some(("authorization", "Bearer nope".into())),
                401,
            ),
            (
                "a device token as a bearer",
                Some(("authorization", format!("Bearer {}", dev.device_token))),
                401,
            ),
            (
                "an app token",
                Some(("authorization", format!("Bearer {}", app.token))),
                403,
            ),
            (
                "a device's id and token",
                Some(("authorization", format!("Basic {basic}"))),
                403,
            ),
            (
                "an app token as the session",
                Some(("cookie", forged.clone())),
                401,
            ),
            ("the session", Some(("cookie", session.to_owned())), 0),
            (
                "the admin token",
                Some(("authorization", format!("Bearer {ADMIN}"))),
                0,
            ),
        ]
    };
    let call = |method: &str, path: &str, cred: &Option<(&str, String)>| {
        let url = format!("{}{path}", server.base());
        let mut req = match method {
            "GET" => http.get(url),
            "POST" => http.post(url).json(&json!({"name": "walk"})),
            "PUT" => http.put(url).json(&json!({})),
            "DELETE" => http.delete(url),
            other => panic!("method {other}"),
        };
        if let Some((k, v)) = cred {
            req = req.header(*k, v.as_str());
        }
        req.send()
    };
    for (method, path) in &ops {
        for (who, cred, want) in creds(&session) {
            let r = call(method, path, &cred).await.unwrap();
            let status = r.status().as_u16();
            if want == 0 {
                assert!(
                    (200..300).contains(&status),
                    "{method} {path} with {who}: {status}"
                );
            } else {
                assert_eq!(status, want, "{method} {path} with {who}");
                let body: serde_json::Value = r.json().await.unwrap();
                assert!(body["error"]["code"].is_string(), "{method} {path}: {body}");
            }
        }
    }

    // The page and its assets are public and hold no data; the admin API behind them
    // is not.
    let page = http
        .get(format!("{}/admin", server.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!page.text().await.unwrap().contains(&app.app_id));

    // The session expires (2 s here): 401 with a code saying so.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for (method, path) in &ops {
        let r = call(method, path, &Some(("cookie", session.clone())))
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path} with an expired session");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "session_expired", "{body}");
    }
}

/// The admin console in headless Chromium: log in, create an app, push through the REST
/// API, find the message's timeline showing it delivered and acknowledged, see the
/// overview's charts update every second and its counters move. Screenshots are kept
/// in `target/admin-console-shots`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_in_headless_chromium() {
    let Some((node, browser)) = headless_browser() else {
        return;
    };
    let server = Server::start().await;
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-console-shots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let mut cmd = std::process::Command::new(node);
    cmd.arg(browser.join("admin.mjs"))
        .args(["--base", &server.base(), "--token", ADMIN])
        .arg("--shots")
        .arg(&shots)
        .stdin(std::process::Stdio::piped());
    let mut page = Lines::spawn(cmd);
    let step = |line: String, name: &str| -> serde_json::Value {
        let (got, json) = line.split_once(' ').unwrap();
        assert_eq!(got, name, "{line}");
        serde_json::from_str(json).unwrap()
    };

    let logged_in = step(page.next_within(60).await, "logged-in");
    assert_eq!(logged_in["http_only"], true, "{logged_in}");
    assert_eq!(logged_in["same_site"], "Strict", "{logged_in}");
    assert_eq!(logged_in["cookie_readable_by_page"], false, "{logged_in}");
    assert!(
        logged_in["refused"]
            .as_str()
            .unwrap()
            .contains("not the admin token")
    );

    let overview = step(page.next_within(30).await, "overview");
    let per_s = overview["updates"].as_f64().unwrap() / overview["seconds"].as_f64().unwrap();
    assert!(
        per_s >= 0.8,
        "the overview updates once a second: {overview}"
    );
    assert_eq!(overview["charts"], 5, "{overview}");

    // The app the page created works with the REST API, with the secret it rotated to;
    // the one it was created with no longer does.
    let created = step(page.next().await, "app");
    let rotated = step(page.next().await, "rotated");
    // The limits the page set are the app's.
    let limits = step(page.next().await, "limits");
    let status = limits["status"].as_str().unwrap();
    assert!(
        status.contains("pushes / s 7") && status.contains("devices 3"),
        "{limits}"
    );
    let view: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "{}/v1/admin/apps/{}/limits",
            server.base(),
            created["app_id"].as_str().unwrap()
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["set"]["pushes_per_s"], 7, "{view}");
    assert_eq!(view["set"]["max_devices"], 3, "{view}");
    assert_eq!(view["set"]["broadcasts_per_min"], serde_json::Value::Null);
    let mut app = create_app(&server).await;
    app.app_id = created["app_id"].as_str().unwrap().into();
    app.client_id = created["client_id"].as_str().unwrap().into();
    app.client_secret = created["client_secret"].as_str().unwrap().into();
    let old = app
        .http
        .post(format!("{}/oauth/token", app.base))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", app.client_id.as_str()),
            ("client_secret", app.client_secret.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 401, "the secret before the rotation");
    app.client_secret = rotated["client_secret"].as_str().unwrap().into();
    assert_ne!(
        app.client_secret,
        created["client_secret"].as_str().unwrap()
    );
    app.token = app.new_token().await;
    let apps: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/admin/apps", server.base()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = apps
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["app_id"] == created["app_id"])
        .unwrap();
    app.app_key = listed["app_key"].as_str().unwrap().into();
    assert_eq!(listed["name"], "browser-app");

    let dev = app.register().await;
    let mut conn = connect(&dev).await;
    let m = app.push(&dev.device_id, json!({"hello": "console"})).await;
    recv_n(&mut conn, 1).await;
    app.wait_acked(&m, 1).await;
    use std::io::Write;
    writeln!(
        page.child.stdin.as_mut().unwrap(),
        "message {m} {}",
        dev.device_id
    )
    .unwrap();

    let timeline = step(page.next_within(30).await, "timeline");
    let types: Vec<&str> = timeline["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["PushAccepted", "Stored", "DeviceAcked"],
        "{timeline}"
    );
    assert_eq!(timeline["counts"], "1 / 1", "targeted / acked: {timeline}");
    assert_eq!(
        timeline["state"], "delivered",
        "as the app's status says: {timeline}"
    );

    let device = step(page.next().await, "device");
    assert!(
        device["presence"]
            .as_str()
            .unwrap()
            .starts_with("connected to gateway-1"),
        "{device}"
    );
    assert_eq!(
        device["inbox_rows"], 0,
        "acknowledged entries leave the inbox"
    );

    let moved = step(page.next_within(30).await, "overview-moved");
    assert!(
        moved["accepted_total"].as_f64().unwrap() > overview["accepted_total"].as_f64().unwrap(),
        "{moved} after {overview}"
    );
    assert!(moved["acked_total"].as_f64().unwrap() >= 1.0, "{moved}");

    let out = step(page.next().await, "logged-out");
    assert_eq!(out["status"], 401, "{out}");
    assert_eq!(out["token_in_a_url"], false, "{out}");
    for name in ["login", "apps", "limits", "timeline", "device", "overview"] {
        let png = std::fs::read(shots.join(format!("{name}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5000,
            "{name}.png"
        );
    }
    conn.disconnect().await;
}

/// With `--log-format json` and debug logs for herald's crates, one push can be followed
/// by its ids through every stage: ingest (app_id and message_id on the push's span),
/// delivery (device_id and message_id as it is stored and forwarded), the gateway
/// (device_id on the connection's span, message_id as it is sent and acknowledged).
#[tokio::test]
async fn tracing_carries_the_ids_across_ingest_delivery_and_gateway() {
    let server = Server::start_with(&[
        ("HERALD_LOG_FORMAT", "json"),
        (
            "HERALD_LOG",
            "info,herald_ingest=debug,herald_delivery=debug,herald_gateway=debug",
        ),
    ])
    .await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut conn = connect(&dev).await;
    let m = app.push(&dev.device_id, json!("traced")).await;
    recv_n(&mut conn, 1).await;
    app.wait_acked(&m, 1).await;
    conn.disconnect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let lines: Vec<serde_json::Value> = server
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(lines.len() > 5, "JSON lines: {}", server.log());
    // An event's own fields and those of every span it is in.
    let field = |l: &serde_json::Value, name: &str| -> Option<String> {
        let spans = l["spans"].as_array().cloned().unwrap_or_default();
        std::iter::once(&l["fields"])
            .chain(spans.iter())
            .find_map(|s| s[name].as_str().map(str::to_owned))
    };
    let find = |message: &str| {
        lines
            .iter()
            .find(|l| {
                l["fields"]["message"] == message && field(l, "message_id").as_deref() == Some(&m)
            })
            .unwrap_or_else(|| panic!("no {message:?} line for {m} in {}", server.log()))
    };
    let accepted = find("accepted");
    assert_eq!(accepted["target"], "herald_ingest::routes");
    assert_eq!(
        field(accepted, "app_id").as_deref(),
        Some(app.app_id.as_str())
    );
    assert_eq!(field(accepted, "route").as_deref(), Some("/v1/messages"));
    for (message, target) in [
        (
            "stored; forwarding to the gateway",
            "herald_delivery::worker",
        ),
        ("sent", "herald_gateway::session"),
        ("acked", "herald_gateway::server"),
    ] {
        let line = find(message);
        assert_eq!(line["target"], target, "{line}");
        assert_eq!(
            field(line, "device_id").as_deref(),
            Some(dev.device_id.as_str()),
            "{line}"
        );
    }
}

/// `herald top --once` draws the overview of a running server as text: the pushes a
/// scripted run made show in its counters.
#[tokio::test]
async fn herald_top_shows_the_live_figures() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut conn = connect(&dev).await;
    let mut last = String::new();
    for i in 0..7 {
        last = app.push(&dev.device_id, json!(i)).await;
    }
    recv_n(&mut conn, 7).await;
    app.wait_acked(&last, 1).await;
    let top = |token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args([
                "top",
                "--once",
                "--api",
                &server.base(),
                "--admin-token",
                token,
            ])
            .env_remove("HERALD_ADMIN_TOKEN")
            .output()
            .unwrap()
    };
    // The device's acks may be folded a moment after the status said so: draw until
    // the frame shows them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let frame = loop {
        let out = top(ADMIN);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let frame = String::from_utf8(out.stdout).unwrap();
        let figure = |label: &str| -> Option<u64> {
            frame.lines().find_map(|l| {
                let at = l.find(&format!("│{label:<12}"))?;
                l[at + "│".len() + label.len()..]
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.trim_end_matches('│').parse().ok())
            })
        };
        if figure("accepted") == Some(7) && figure("acked") == Some(7) {
            assert_eq!(figure("connected"), Some(1), "{frame}");
            break frame;
        }
        assert!(Instant::now() < deadline, "{frame}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(frame.starts_with("herald top"), "{frame}");
    for chart in ["accepted/s", "ack p99 ms", "delivery lag", "sync p99 ms"] {
        assert!(
            frame.contains(&format!(" {chart} (max")),
            "{chart} in {frame}"
        );
    }
    // A wrong token is a clear error, not a hang.
    let out = top("wrong");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("401") && err.contains("--admin-token"),
        "{err}"
    );
}

/// The OpenTelemetry Collector built by scripts/test (tests/clients/otelcol), or
/// `HERALD_OTELCOL`; `None` with a printed reason without it.
fn otel_collector() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("HERALD_OTELCOL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/clients/otelcol/otelcol-herald")
        });
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("HERALD_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
        panic!("no OpenTelemetry Collector at {}", path.display());
    }
    eprintln!(
        "SKIPPED: no OpenTelemetry Collector at {} (scripts/test builds it with go build)",
        path.display()
    );
    None
}

/// With `HERALD_OTLP_ENDPOINT`, the spans that carry a push's ids reach a real
/// OpenTelemetry Collector over OTLP/HTTP: the push (app_id, message_id) and the device
/// connection it went out on (device_id), from the service `herald`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_opentelemetry_collector_over_otlp() {
    let Some(collector) = otel_collector() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("otelcol.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\n\
             exporters:\n  debug:\n    verbosity: detailed\n\
             service:\n  telemetry:\n    metrics:\n      level: none\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n"
        ),
    )
    .unwrap();
    let out_path = dir.path().join("otelcol.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = std::process::Command::new(&collector)
        .arg("--config")
        .arg(&config)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the collector did not start: {}",
            output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let endpoint = format!("http://127.0.0.1:{port}");
    let server = Server::start_with(&[
        ("HERALD_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ])
    .await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut conn = connect(&dev).await;
    let m = app.push(&dev.device_id, json!("to the collector")).await;
    recv_n(&mut conn, 1).await;
    app.wait_acked(&m, 1).await;
    // A connection's span ends, and is sent, when the connection does.
    conn.disconnect().await;

    let want = [
        format!("message_id: Str({m})"),
        format!("app_id: Str({})", app.app_id),
        format!("device_id: Str({})", dev.device_id),
        "service.name: Str(herald)".to_owned(),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = output();
        if want.iter().all(|w| text.contains(w.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing {:?} in the collector's output:\n{text}\nherald:\n{}",
            want.iter()
                .filter(|w| !text.contains(w.as_str()))
                .collect::<Vec<_>>(),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The console's entry points answer bad input with herald's JSON errors: a malformed or
/// oversized log-in, an unknown field in a log-in or a query, an overview query that is
/// not a number, ids that name nothing.
#[tokio::test]
async fn the_console_api_answers_bad_input_with_clear_errors() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let base = server.base();
    let check = |r: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(r.status(), status, "{}", r.url());
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    };
    let login = |body: String| {
        http.post(format!("{base}/admin/login"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    check(
        login("{\"token\":".into()).await.unwrap(),
        400,
        "malformed_json",
    )
    .await;
    check(
        login(format!("{{\"token\":\"{ADMIN}\",\"remember\":true}}"))
            .await
            .unwrap(),
        422,
        "invalid_request",
    )
    .await;
    check(
        login(format!("{{\"token\":\"{}\"}}", "x".repeat(100_000)))
            .await
            .unwrap(),
        413,
        "body_too_large",
    )
    .await;
    let admin_get = |path: String| http.get(format!("{base}{path}")).bearer_auth(ADMIN).send();
    check(
        admin_get("/v1/admin/overview?since_ms=yesterday".into())
            .await
            .unwrap(),
        400,
        "invalid_query",
    )
    .await;
    check(
        admin_get("/v1/admin/overview?limit=3".into())
            .await
            .unwrap(),
        400,
        "invalid_query",
    )
    .await;
    for path in [
        "/v1/admin/devices/no-such-device",
        "/v1/admin/messages/no-such-message",
    ] {
        check(admin_get(path.into()).await.unwrap(), 404, "not_found").await;
    }
    check(
        admin_get("/v1/admin/devices/%00%FF".into()).await.unwrap(),
        400,
        "invalid_path",
    )
    .await;
    let r = http
        .post(format!("{base}/v1/admin/apps/no-such-app/secret"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    check(r, 404, "not_found").await;
    // Still serving.
    assert_eq!(
        admin_get("/v1/admin/apps".into()).await.unwrap().status(),
        200
    );
}
