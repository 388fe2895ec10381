//! An accept loop out of file descriptors backs off instead of spinning, reports itself
//! as not accepting, and takes the waiting connections once descriptors are free.
//!
//! Using every descriptor up would break other tests of the same process, so the test
//! runs itself again in a child process (`HERALD_BACKOFF_CHILD` set) and checks that
//! the child passed.

use std::fs::File;
use std::time::Duration;

use herald_net::{Caps, Gate, accept};

const CHILD: &str = "HERALD_BACKOFF_CHILD";

fn accept_errors(listener: &str) -> f64 {
    let text = herald_telemetry::metrics::render();
    text.lines()
        .filter(|l| l.starts_with("herald_listener_accept_errors_total{"))
        .filter(|l| l.contains(&format!("listener=\"{listener}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn in_child() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gate = Gate::new(
        "backoff",
        Caps {
            max_connections: 100,
            max_unauthenticated: 100,
            max_unauthenticated_per_source: 100,
        },
        None,
    );
    // Three clients connect (the kernel completes the handshakes; they wait in the
    // backlog), then the process uses up its descriptors.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(std::net::TcpStream::connect(addr).expect("connect"));
    }
    let mut held = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(24), "EMFILE, not {e}");
                break;
            }
        }
    }
    let accepting = {
        let gate = gate.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(accept(&listener, &gate).await);
            }
            got
        })
    };
    // Two seconds out of descriptors: the pauses double from 5 ms to a second, so the
    // loop tries about ten times, not thousands.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries = accept_errors("backoff");
    assert!(
        (2.0..=14.0).contains(&tries),
        "{tries} accept errors in 2 s"
    );
    assert!(!gate.health().accepting, "reported as not accepting");
    assert!(!accepting.is_finished());
    // Descriptors come back: the waiting connections are taken.
    drop(held);
    let got = tokio::time::timeout(Duration::from_secs(5), accepting)
        .await
        .expect("accepted once descriptors were free")
        .expect("task");
    assert_eq!(got.len(), 3);
    assert!(gate.health().accepting);
    assert_eq!(gate.health().connections, 3);
    println!("CHILD-OK tries={tries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_loop_out_of_descriptors_backs_off_and_recovers() {
    if std::env::var(CHILD).is_ok() {
        in_child().await;
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "an_accept_loop_out_of_descriptors_backs_off_and_recovers",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "child failed:\n{stdout}\n{stderr}"
    );
}
