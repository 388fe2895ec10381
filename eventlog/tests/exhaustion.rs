//! The embedded log out of file descriptors: a resource it could not get before writing
//! anything refuses that append (`Error::Exhausted`), poisons nothing, and appends
//! succeed again once descriptors are free, without a restart; nothing accepted is lost.
//!
//! The test lowers `RLIMIT_NOFILE` and uses every descriptor up, which would break any
//! other test running in the same process, so it runs itself again in a child process
//! (this test binary, filtered to this test, with `HERALD_EXHAUSTION_CHILD` set) and
//! checks that the child passed.

use std::fs::File;
use std::path::Path;

use herald_eventlog::embedded::{EmbeddedLog, Options};
use herald_eventlog::{Append, Error, EventLog, Health, Record};

const CHILD: &str = "HERALD_EXHAUSTION_CHILD";

fn rec(i: u32) -> Record {
    Record {
        key: format!("k{i}").into_bytes(),
        value: vec![i as u8; 600],
    }
}

/// Opens files until the process may open no more; returns them.
fn use_every_descriptor() -> Vec<File> {
    let mut held = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(24), "EMFILE, not {e}");
                return held;
            }
        }
    }
}

async fn in_child(dir: &Path) {
    use rustix::process::{Resource, Rlimit, setrlimit};
    // A small limit, so using it up is quick.
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(256),
            maximum: None,
        },
    )
    .or_else(|_| {
        let max = rustix::process::getrlimit(Resource::Nofile).maximum;
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(256),
                maximum: max,
            },
        )
    })
    .expect("lower RLIMIT_NOFILE");
    // Segments of 4 KiB: a few appends of 600-byte records roll one.
    let log = EmbeddedLog::open_with(
        dir,
        Options {
            segment_bytes: 4096,
        },
    )
    .expect("open");
    let mut accepted = 0u32;
    let mut held = use_every_descriptor();
    // The first roll uses the spare segment made ahead of time: no new file needed, so
    // appends go on although the process cannot open one.
    for i in 0..8 {
        log.append(vec![rec(i)])
            .await
            .expect("append through the spare");
        accepted += 1;
    }
    // Eventually a roll finds no spare (it could not be made without a descriptor):
    // that append is refused, and so are the ones after it, but the log is not poisoned.
    let mut refused = 0;
    for _ in 0..20 {
        match log.append(vec![rec(accepted)]).await {
            Ok(_) => accepted += 1,
            Err(Error::Exhausted(why)) => {
                assert!(why.starts_with("files"), "{why}");
                refused += 1;
            }
            Err(other) => panic!("expected Exhausted, got {other:?}"),
        }
    }
    assert!(refused > 0, "some append hit the limit");
    assert!(
        matches!(log.health(), Health::Degraded(_)),
        "{:?}",
        log.health()
    );
    // Descriptors come back: the next append succeeds, with no restart.
    held.truncate(held.len().saturating_sub(16));
    let offsets = log.append(vec![rec(accepted)]).await.expect("append again");
    accepted += 1;
    assert_eq!(
        offsets,
        vec![u64::from(accepted) - 1],
        "offsets stayed dense"
    );
    assert_eq!(log.health(), Health::Ok);
    for _ in 0..20 {
        log.append(vec![rec(accepted)]).await.expect("append");
        accepted += 1;
    }
    drop(held);
    // Everything accepted is there, in order, now and after reopening.
    let read = log.read(0, 10_000).await.expect("read");
    assert_eq!(read.len() as u32, accepted);
    drop(log);
    let log = EmbeddedLog::open(dir).expect("reopen");
    let read = log.read(0, 10_000).await.expect("read");
    assert_eq!(read.len() as u32, accepted);
    for (i, r) in read.iter().enumerate() {
        assert_eq!(r.key, format!("k{i}").into_bytes());
    }
    println!("CHILD-OK accepted={accepted} refused={refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_refuses_appends_and_recovers_without_a_restart() {
    if let Ok(dir) = std::env::var(CHILD) {
        in_child(Path::new(&dir)).await;
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "running_out_of_descriptors_refuses_appends_and_recovers_without_a_restart",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, dir.path())
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "child failed:\n{stdout}\n{stderr}"
    );
    println!(
        "{}",
        stdout
            .lines()
            .find(|l| l.contains("CHILD-OK"))
            .unwrap_or("")
    );
}
