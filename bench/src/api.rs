//! herald's REST API in bulk, for benchmarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::procs::ADMIN;

/// An app and its token.
#[derive(Debug, Clone)]
pub struct App {
    /// The API's base URL.
    pub base: String,
    /// The public key devices register with.
    pub app_key: String,
    /// The app token.
    pub token: String,
}

/// Creates an app and gets its token.
pub async fn create_app(http: &reqwest::Client, base: &str) -> anyhow::Result<App> {
    let a: Value = http
        .post(format!("{base}/v1/apps"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let field = |k: &str| a[k].as_str().map(str::to_owned).context("bad app response");
    // A benchmark measures the server, not an app's limits: the highest each may be.
    http.put(format!("{base}/v1/admin/apps/{}/limits", field("app_id")?))
        .bearer_auth(ADMIN)
        .json(&json!({
            "pushes_per_s": 1_000_000,
            "broadcasts_per_min": 100_000,
            "max_devices": 1_000_000_000u64,
            "max_inbox_entries": 1_000_000,
        }))
        .send()
        .await?
        .error_for_status()?;
    let t: Value = http
        .post(format!("{base}/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &field("client_id")?),
            ("client_secret", &field("client_secret")?),
        ])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(App {
        base: base.to_owned(),
        app_key: field("app_key")?,
        token: t["access_token"].as_str().context("no token")?.to_owned(),
    })
}

/// Registers `n` devices, `concurrency` at a time; returns `(device_id, device_token)`.
pub async fn register(
    http: &reqwest::Client,
    app: &App,
    n: usize,
    concurrency: usize,
    progress: impl Fn(usize) + Send + Sync + 'static,
) -> anyhow::Result<Vec<(String, String)>> {
    let next = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(progress);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (http, app, next, progress) =
            (http.clone(), app.clone(), next.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let r: Value = http
                    .post(format!("{}/v1/devices", app.base))
                    .json(&json!({"app_key": app.app_key, "platform": "sim"}))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                out.push((
                    r["device_id"].as_str().context("no device_id")?.to_owned(),
                    r["device_token"].as_str().context("no token")?.to_owned(),
                ));
                progress(1);
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// Writes devices as `herald-sim --creds` JSON lines.
pub fn write_creds(path: &std::path::Path, devices: &[(String, String)]) -> anyhow::Result<()> {
    let mut s = String::new();
    for (id, token) in devices {
        s.push_str(&json!({"device_id": id, "device_token": token}).to_string());
        s.push('\n');
    }
    std::fs::write(path, s)?;
    Ok(())
}

/// Sends one push; `to` is the `to` object. Returns its message id once it is answered
/// 202.
pub async fn push(
    http: &reqwest::Client,
    app: &App,
    to: Value,
    t_us: u64,
) -> anyhow::Result<String> {
    let r = http
        .post(format!("{}/v1/messages", app.base))
        .bearer_auth(&app.token)
        .json(&json!({"to": to, "data": {"t": t_us}}))
        .send()
        .await?;
    if r.status() != 202 {
        bail!(
            "push answered {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    let body: Value = r.json().await?;
    body["message_id"]
        .as_str()
        .map(str::to_owned)
        .context("no message_id in the answer")
}
