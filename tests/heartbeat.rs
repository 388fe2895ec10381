//! The SDK's adaptive heartbeat against a simulated carrier NAT (a proxy that forgets a
//! connection idle for 5 minutes and then drops its packets silently), in time scaled
//! 60x: the heartbeat settles just under the NAT's timeout, and pushes sent at random
//! moments (some into a path already dead) all arrive, once, within an interval.
//! The 5-, 15- and 30-minute figures are the benchmark's (`bench/run --scenario
//! device-cost`).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use herald_client::sim::{CostScenario, device_cost};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_settles_under_a_5_minute_nat_and_loses_no_push() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let creds = herald_client::register_on(&app.http, &app.base, &app.app_key, Some("wifi"))
        .await
        .unwrap();
    // herald suggests wifi's interval from its table: where the heartbeat starts.
    assert_eq!(creds.keep_alive_s, Some(300));
    let scenario = CostScenario {
        nat: Duration::from_secs(300),
        time_scale: 1.0 / 60.0,
        network: "wifi".into(),
        push_every: Duration::from_secs(10 * 60),
        max_learning: Duration::from_secs(4 * 3600),
        steady_intervals: 6,
        push_intervals: 4,
        seed: 7,
    };
    let gateway = format!("127.0.0.1:{}", server.mqtt_port).parse().unwrap();
    let device_id = creds.device_id.clone();
    let report = device_cost(&creds, gateway, &scenario, |i| {
        let app = &app;
        let device_id = device_id.clone();
        async move { Ok(app.push(&device_id, json!({"n": i})).await) }
    })
    .await
    .unwrap();
    eprintln!("{report:#?}");
    let settled = report.settled.expect("the heartbeat did not settle");
    assert!(settled < scenario.nat, "{report:?}");
    assert!(
        settled.as_secs_f64() >= 0.85 * scenario.nat.as_secs_f64(),
        "{report:?}"
    );
    assert!(
        report.dead_paths >= 1,
        "the NAT was never found: {report:?}"
    );
    assert!(report.pushes > 0);
    assert_eq!(
        (report.lost, report.duplicates, report.late),
        (0, 0, 0),
        "{report:?}"
    );
    // Idle at a 5-minute NAT: about one wake-up per settled interval.
    let per_day = 86_400.0 / settled.as_secs_f64();
    assert!(
        report.wakeups_per_day <= per_day * 1.2,
        "{} wake-ups a day at a {settled:?} interval",
        report.wakeups_per_day
    );
}
