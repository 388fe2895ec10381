//! The device-cost scenario: what an idle phone pays to stay reachable through herald.
//!
//! One `herald serve`; for each NAT timeout (5, 15 and 30 minutes; 5 and 15 in the quick
//! run) one device registered on wifi runs the SDK's adaptive heartbeat behind a NAT
//! simulator, in time scaled 60x, all NATs at once (`herald_client::sim::device_cost`).
//! Pushes go to each device at random moments (exponential gaps, mean 20 minutes of
//! device time) while it learns, some of them into paths already dead, and again after
//! an idle window of 10 settled intervals (4 in the quick run) that gives the idle cost. The run fails unless every push arrived
//! once within the heartbeat interval in force when it was sent, every heartbeat settled
//! within 15 % under its NAT's timeout, and at the 30-minute NAT the idle device costs
//! at most 0.5 MB a month and 60 radio wake-ups a day.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use herald_client::sim::{CostReport, CostScenario, device_cost};
use serde_json::json;

use crate::api;
use crate::procs::{Bins, Kind, Server};

/// Device time per real time.
const SCALE: f64 = 1.0 / 60.0;

/// Runs the scenario; returns the markdown table.
pub async fn run(bins: &Bins, http: &reqwest::Client, quick: bool) -> anyhow::Result<String> {
    let nats: &[u64] = if quick { &[5, 15] } else { &[5, 15, 30] };
    let server = Server::start(Kind::Herald, bins).await?;
    let app = api::create_app(http, &server.base()).await?;
    let gateway: SocketAddr = format!("127.0.0.1:{}", server.mqtt_port).parse()?;
    let mut runs = Vec::new();
    for (i, &minutes) in nats.iter().enumerate() {
        let creds =
            herald_client::register_on(http, &server.base(), &app.app_key, Some("wifi")).await?;
        let scenario = CostScenario {
            nat: Duration::from_secs(minutes * 60),
            time_scale: SCALE,
            network: "wifi".into(),
            push_every: Duration::from_secs(20 * 60),
            max_learning: Duration::from_secs(12 * 3600),
            steady_intervals: if quick { 4 } else { 10 },
            push_intervals: if quick { 3 } else { 5 },
            seed: 0x5eed + i as u64,
        };
        let (http, app) = (http.clone(), app.clone());
        runs.push(tokio::spawn(async move {
            let device_id = creds.device_id.clone();
            device_cost(&creds, gateway, &scenario, move |_| {
                let (http, app, device_id) = (http.clone(), app.clone(), device_id.clone());
                async move {
                    api::push(
                        &http,
                        &app,
                        json!({"device_id": device_id}),
                        crate::now_us(),
                    )
                    .await
                }
            })
            .await
        }));
    }
    let mut reports = Vec::new();
    for r in runs {
        reports.push(r.await.context("a device-cost run panicked")??);
    }
    server.stop().await;
    let table = render(&reports);
    check(&reports).with_context(|| format!("device-cost:\n{table}"))?;
    Ok(table)
}

fn minutes(d: Duration) -> String {
    format!("{:.1} min", d.as_secs_f64() / 60.0)
}

fn render(reports: &[CostReport]) -> String {
    let mut t = String::from(
        "| NAT timeout | settled heartbeat | learning (dead paths) | idle wake-ups / day | idle MB / month | learning cost (once per network) | pushes: lost, late / sent | latest push |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in reports {
        let settled = match r.settled {
            Some(s) => format!(
                "{} ({:.0} % of the NAT's)",
                minutes(s),
                100.0 * s.as_secs_f64() / r.nat.as_secs_f64()
            ),
            None => "did not settle".into(),
        };
        t.push_str(&format!(
            "| {} | {} | {} ({}) | {:.1} | {:.3} | {:.1} KB | {}, {} / {} | {:.1} s |\n",
            minutes(r.nat),
            settled,
            minutes(r.learning),
            r.dead_paths,
            r.wakeups_per_day,
            r.bytes_per_month / 1e6,
            r.learning_cost.bytes as f64 / 1e3,
            r.lost,
            r.late,
            r.pushes,
            r.max_delay.as_secs_f64(),
        ));
    }
    t.push_str(
        "\nLatest push: device time from the push's 202 to its arrival (the time herald takes is real time, 60x more in device time). One device per NAT, wifi, the SDK's adaptive heartbeat starting from herald's suggestion (300 s), time scaled 60x; bytes at the IP level (52 B of IPv4+TCP headers per packet, a pure ACK for every segment not answered within 40 ms, TCP handshakes and FINs, retransmissions into a dead path every 200 ms doubling until the 10 s pong timeout), plain MQTT (no TLS); a wake-up is a packet more than 10 s after the previous one; idle = everything but PUBLISH and its acknowledgements, over an idle window of settled intervals with no push, times a day or 30 days.\n",
    );
    t
}

fn check(reports: &[CostReport]) -> anyhow::Result<()> {
    for r in reports {
        let nat = minutes(r.nat);
        let Some(settled) = r.settled else {
            bail!("{nat}: the heartbeat did not settle");
        };
        if settled >= r.nat || settled.as_secs_f64() < 0.85 * r.nat.as_secs_f64() {
            bail!("{nat}: settled at {settled:?}, not within 15 % under the NAT's timeout");
        }
        if r.lost > 0 || r.duplicates > 0 || r.late > 0 {
            bail!(
                "{nat}: pushes lost {}, shown twice {}, later than an interval {}",
                r.lost,
                r.duplicates,
                r.late
            );
        }
        if r.nat >= Duration::from_secs(30 * 60)
            && (r.bytes_per_month > 500_000.0 || r.wakeups_per_day > 60.0)
        {
            bail!(
                "{nat}: {:.0} B a month and {:.1} wake-ups a day (at most 500,000 and 60)",
                r.bytes_per_month,
                r.wakeups_per_day
            );
        }
    }
    Ok(())
}
