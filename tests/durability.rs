//! "Accepted means durable", checked on a real run of the `herald` binary.
//!
//! # Method
//! `herald serve` runs under `strace -f -tt -y -xx -s 1048576 --seccomp-bpf -e
//! trace=write,writev,pwrite64,pwritev,sendto,sendmsg,fsync,fdatasync,sync_file_range`.
//! The test creates an app and a device, sends [`PUSHES`] unicast pushes from
//! [`CONCURRENCY`] concurrent clients (so group commit puts several in one sync), stops
//! the server with SIGTERM and parses the trace:
//!
//! - `-y` names each fd's file (`<data>/log/N.seg` for the event log's segments, `socket:[inode]`
//!   for a TCP connection); `-xx` prints every byte of data and paths as `\xNN`, so the
//!   data is decoded without ambiguity; `-s` is large enough that no write is truncated.
//! - Order is the order of lines in the trace file. strace prints a syscall's completion
//!   before it resumes the thread, so anything the thread causes afterwards (waking the HTTP
//!   handler, which then writes the response) appears on a later line. A syscall that other
//!   threads interrupted is split into `... <unfinished ...>` (its start, and its data) and
//!   `<... name resumed>) = R` (its completion); the pair is matched by thread id.
//! - Each journal file's writes are concatenated in trace order, so a message id split over
//!   two writes is still found; the journal write of a message is the write holding the
//!   last byte of its first occurrence. Each socket's writes are concatenated likewise; the
//!   answer to a push is the response (from its `HTTP/1.1 ` status line) that holds
//!   `"message_id":"<id>"`.
//!
//! [`check`] then requires, for every message id: a completed journal write holding it; a
//! successful `fsync`/`fdatasync` of the same journal path that *started* after that write
//! completed (`sync_file_range` does not count: it makes nothing durable); and a `202`
//! response whose first byte was written *after* that sync completed. It reports how many
//! pushes violate this and describes the first one.
//!
//! The second test runs the same under `eatmydata` (an `LD_PRELOAD` that turns the sync
//! calls into no-ops) and requires the check to fail for every push, for exactly that
//! reason, so the first test is shown to be able to fail. Unit tests on hand-written traces
//! (the `checker` module) run without strace and guard the parser and the checker against
//! passing vacuously or missing a reordering.
//!
//! strace and eatmydata are stock Debian packages (scripts/test installs them). Without them
//! the two run tests are skipped with a printed reason, or fail if `HERALD_REQUIRE_TOOLS=1`.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN, create_app_at, free_port, tool};
use serde_json::json;

/// Pushes per run.
const PUSHES: usize = 200;
/// Concurrent clients sending them.
const CONCURRENCY: usize = 8;

const WRITES: &[&str] = &[
    "write", "writev", "pwrite64", "pwritev", "sendto", "sendmsg",
];
const SYNCS: &[&str] = &["fsync", "fdatasync"];

// ------------------------------------------------------------------------------------------
// Parsing strace output.

/// One completed syscall from the trace.
#[derive(Debug, Clone)]
struct Syscall {
    name: String,
    /// The fd's path as `-y` printed it (decoded); empty if none.
    path: String,
    /// The data of every string argument, concatenated (taken from the start line).
    data: Vec<u8>,
    /// strace cut a string argument short (`"..."...`).
    truncated: bool,
    /// Line index where the syscall started, and where it completed.
    start: usize,
    end: usize,
    start_time: String,
    end_time: String,
    /// What follows ` = ` on the completion line.
    result: String,
}

impl Syscall {
    fn ok(&self) -> bool {
        let r = self.result.trim();
        !r.is_empty() && r.as_bytes()[0].is_ascii_digit()
    }

    fn is_write(&self) -> bool {
        WRITES.contains(&self.name.as_str())
    }

    fn is_sync(&self) -> bool {
        SYNCS.contains(&self.name.as_str())
    }
}

#[derive(Debug, Default)]
struct Trace {
    calls: Vec<Syscall>,
    /// Syscalls that started but never completed (the process ended inside them).
    never_completed: usize,
}

/// Decodes a C-escaped string as strace prints it, from `s[0]` up to (not including) an
/// unescaped `end`. Returns the bytes and the index just after `end` (or `s.len()`).
fn unescape(s: &[u8], end: u8) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == end {
            return (out, i + 1);
        }
        if c != b'\\' || i + 1 >= s.len() {
            out.push(c);
            i += 1;
            continue;
        }
        let e = s[i + 1];
        i += 2;
        match e {
            b'x' => {
                let hex = std::str::from_utf8(&s[i..(i + 2).min(s.len())]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                let mut n = 1;
                while n < 3 && i < s.len() && (b'0'..=b'7').contains(&s[i]) {
                    v = v * 8 + u32::from(s[i] - b'0');
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'v' => out.push(0x0b),
            b'f' => out.push(0x0c),
            other => out.push(other),
        }
    }
    (out, s.len())
}

/// Fills `path`, `data` and `truncated` of `call` from the argument text of a start line.
fn parse_args(call: &mut Syscall, args: &str) {
    let b = args.as_bytes();
    let mut i = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if i > 0 && b.get(i) == Some(&b'<') {
        let (path, used) = unescape(&b[i + 1..], b'>');
        call.path = String::from_utf8_lossy(&path).into_owned();
        i += 1 + used;
    }
    while i < b.len() {
        if b[i] == b'"' {
            let (bytes, used) = unescape(&b[i + 1..], b'"');
            call.data.extend_from_slice(&bytes);
            i += 1 + used;
            if b[i..].starts_with(b"...") {
                call.truncated = true;
            }
        } else {
            i += 1;
        }
    }
}

impl Trace {
    /// Parses `strace -f -tt -y` output (one `TID TIME BODY` per line).
    fn parse(text: &str) -> Trace {
        let mut trace = Trace::default();
        let mut pending: HashMap<u32, Syscall> = HashMap::new();
        for (line_no, line) in text.lines().enumerate() {
            let Some((tid, rest)) = line.trim_start().split_once(' ') else {
                continue;
            };
            let Ok(tid) = tid.parse::<u32>() else {
                continue;
            };
            let Some((time, body)) = rest.trim_start().split_once(' ') else {
                continue;
            };
            if let Some(resumed) = body.strip_prefix("<... ") {
                // `<... NAME resumed>...) = RESULT`: the completion of a pending syscall.
                let name = resumed.split(' ').next().unwrap_or("");
                if let Some(mut call) = pending.remove(&tid)
                    && call.name == name
                {
                    call.end = line_no;
                    call.end_time = time.to_owned();
                    call.result = body
                        .rsplit_once(") = ")
                        .map(|(_, r)| r.to_owned())
                        .unwrap_or_default();
                    trace.calls.push(call);
                }
                continue;
            }
            let Some((name, args)) = body.split_once('(') else {
                continue; // `--- SIG... ---`, `+++ exited ... +++`
            };
            if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
                continue;
            }
            let mut call = Syscall {
                name: name.to_owned(),
                path: String::new(),
                data: Vec::new(),
                truncated: false,
                start: line_no,
                end: line_no,
                start_time: time.to_owned(),
                end_time: time.to_owned(),
                result: String::new(),
            };
            if let Some(args) = args.strip_suffix("<unfinished ...>") {
                parse_args(&mut call, args);
                if pending.insert(tid, call).is_some() {
                    trace.never_completed += 1;
                }
            } else if let Some((args, result)) = args.rsplit_once(") = ") {
                parse_args(&mut call, args);
                call.result = result.to_owned();
                trace.calls.push(call);
            }
        }
        trace.never_completed += pending.len();
        trace
    }
}

// ------------------------------------------------------------------------------------------
// The check.

/// The bytes written to one fd path, in trace order, with the syscall each range came from.
#[derive(Default)]
struct Stream {
    bytes: Vec<u8>,
    /// (start offset in `bytes`, index into `Trace::calls`), ascending.
    pieces: Vec<(usize, usize)>,
}

impl Stream {
    fn push(&mut self, call_index: usize, data: &[u8]) {
        self.pieces.push((self.bytes.len(), call_index));
        self.bytes.extend_from_slice(data);
    }

    /// The syscall that wrote byte `offset`.
    fn call_at(&self, offset: usize) -> usize {
        let i = self.pieces.partition_point(|&(start, _)| start <= offset);
        self.pieces[i - 1].1
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// First offset of every UUID-shaped string in `bytes` (one pass).
fn uuid_offsets(bytes: &[u8]) -> HashMap<&[u8], usize> {
    let mut out = HashMap::new();
    for (i, w) in bytes.windows(36).enumerate() {
        let shaped = w.iter().enumerate().all(|(j, &c)| match j {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
        if shaped {
            out.entry(w).or_insert(i);
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Violation {
    /// No completed journal write holds the message id.
    NoJournalWrite,
    /// No socket write holds `"message_id":"<id>"`.
    NoResponse,
    /// The response holding the id is not a 202.
    Not202,
    /// No successful fsync/fdatasync of that journal started after the journal write.
    NoSync,
    /// The 202 started before that sync completed.
    AnsweredBeforeSync,
}

/// What the trace shows, for the run's report.
#[derive(Debug, Default)]
struct Analysis {
    pushes: usize,
    journal_writes: usize,
    journal_syncs: usize,
    /// Ids found in a journal write / answered with a 202.
    journaled: usize,
    answered_202: usize,
    /// Distinct syncs that covered at least one checked id, and the most ids one covered.
    covering_syncs: usize,
    largest_group: usize,
    truncated_writes: usize,
    never_completed: usize,
    violations: Vec<(Violation, String)>,
}

fn describe(c: &Syscall, at: Point) -> String {
    match at {
        Point::Start => format!(
            "{} on {} at {} (line {})",
            c.name,
            c.path,
            c.start_time,
            c.start + 1
        ),
        Point::End => format!(
            "{} on {} completing at {} (line {})",
            c.name,
            c.path,
            c.end_time,
            c.end + 1
        ),
    }
}

#[derive(Clone, Copy)]
enum Point {
    Start,
    End,
}

fn analyze(trace: &Trace, store_dir: &Path, ids: &[String]) -> Analysis {
    let store_prefix = format!("{}/", store_dir.display());
    let is_journal =
        |p: &str| p.starts_with(&store_prefix) && (p.ends_with(".seg") || p.ends_with(".jnl"));
    let is_socket = |p: &str| p.starts_with("socket:") || p.starts_with("TCP");

    let mut journals: HashMap<&str, Stream> = HashMap::new();
    let mut sockets: HashMap<&str, Stream> = HashMap::new();
    let mut syncs: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut a = Analysis {
        pushes: ids.len(),
        never_completed: trace.never_completed,
        ..Analysis::default()
    };
    for (i, c) in trace.calls.iter().enumerate() {
        if c.is_write() && c.ok() {
            if is_journal(&c.path) {
                a.journal_writes += 1;
                journals.entry(&c.path).or_default().push(i, &c.data);
            } else if is_socket(&c.path) {
                sockets.entry(&c.path).or_default().push(i, &c.data);
            } else {
                continue;
            }
            a.truncated_writes += usize::from(c.truncated);
        } else if c.is_sync() && c.ok() && is_journal(&c.path) {
            a.journal_syncs += 1;
            syncs.entry(&c.path).or_default().push(i);
        }
    }
    // `calls` is in completion order; the search below wants start order.
    for list in syncs.values_mut() {
        list.sort_by_key(|&i| trace.calls[i].start);
    }

    // Where each id is first journaled: (call index of the write holding its last byte).
    let mut journaled: HashMap<&[u8], usize> = HashMap::new();
    for stream in journals.values() {
        for (id, off) in uuid_offsets(&stream.bytes) {
            let call = stream.call_at(off + 35);
            let e = journaled.entry(id).or_insert(call);
            if trace.calls[call].end < trace.calls[*e].end {
                *e = call;
            }
        }
    }
    // Where each id is answered: (status, call index of the write with the status line).
    let mut answered: HashMap<Vec<u8>, (String, usize)> = HashMap::new();
    let key = b"\"message_id\":\"";
    for stream in sockets.values() {
        let mut from = 0;
        while let Some(p) = find(&stream.bytes[from..], key) {
            let at = from + p;
            from = at + key.len();
            let Some(id) = stream.bytes.get(from..from + 36) else {
                break;
            };
            let head = stream.bytes[..at]
                .windows(9)
                .rposition(|w| w == b"HTTP/1.1 ");
            let (status, call) = match head {
                Some(h) => (
                    String::from_utf8_lossy(&stream.bytes[h + 9..(h + 12).min(at)]).into_owned(),
                    stream.call_at(h),
                ),
                None => ("no status line".to_owned(), stream.call_at(at)),
            };
            let e = answered
                .entry(id.to_vec())
                .or_insert((status.clone(), call));
            if trace.calls[call].start < trace.calls[e.1].start {
                *e = (status, call);
            }
        }
    }

    let mut per_sync: HashMap<usize, usize> = HashMap::new();
    for id in ids {
        let journal = journaled.get(id.as_bytes()).copied();
        let response = answered.get(id.as_bytes()).cloned();
        a.journaled += usize::from(journal.is_some());
        a.answered_202 += usize::from(response.as_ref().is_some_and(|(s, _)| s == "202"));
        let Some(jw) = journal else {
            let other: Vec<&str> = trace
                .calls
                .iter()
                .filter(|c| c.is_write() && find(&c.data, id.as_bytes()).is_some())
                .map(|c| c.path.as_str())
                .collect();
            a.violations.push((
                Violation::NoJournalWrite,
                format!(
                    "message {id}: no completed write to a log segment ({store_prefix}*.seg) holds it \
                     (writes elsewhere holding it: {other:?})"
                ),
            ));
            continue;
        };
        let jw = &trace.calls[jw];
        let Some((status, rw)) = response else {
            a.violations.push((
                Violation::NoResponse,
                format!("message {id}: no socket write holds \"message_id\":\"{id}\""),
            ));
            continue;
        };
        let rw = &trace.calls[rw];
        if status != "202" {
            a.violations.push((
                Violation::Not202,
                format!(
                    "message {id}: answered with status {status}: {}",
                    describe(rw, Point::Start)
                ),
            ));
            continue;
        }
        let sync = syncs
            .get(jw.path.as_str())
            .and_then(|list| list.iter().find(|&&s| trace.calls[s].start > jw.end));
        let Some(&sync) = sync else {
            a.violations.push((
                Violation::NoSync,
                format!(
                    "message {id}: no successful fsync/fdatasync of {} started after its journal \
                     write ({}); its 202 is {}",
                    jw.path,
                    describe(jw, Point::End),
                    describe(rw, Point::Start)
                ),
            ));
            continue;
        };
        *per_sync.entry(sync).or_default() += 1;
        let s = &trace.calls[sync];
        if rw.start <= s.end {
            a.violations.push((
                Violation::AnsweredBeforeSync,
                format!(
                    "message {id}: 202 written by {}, before {} completed; the journal write \
                     holding it is {} and the first sync after that is {}",
                    describe(rw, Point::Start),
                    if rw.start <= jw.end {
                        "even its journal write"
                    } else {
                        "the sync covering it"
                    },
                    describe(jw, Point::End),
                    describe(s, Point::End)
                ),
            ));
        }
    }
    a.covering_syncs = per_sync.len();
    a.largest_group = per_sync.values().copied().max().unwrap_or(0);
    a
}

/// Every id was answered `202` only after a sync of the journal write holding it completed.
fn check(trace: &Trace, store_dir: &Path, ids: &[String]) -> Result<(), String> {
    if ids.is_empty() {
        return Err("no message ids to check: the check would pass vacuously".into());
    }
    let a = analyze(trace, store_dir, ids);
    let Some((_, first)) = a.violations.first() else {
        return Ok(());
    };
    let mut kinds: HashMap<Violation, usize> = HashMap::new();
    for (k, _) in &a.violations {
        *kinds.entry(*k).or_default() += 1;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort();
    Err(format!(
        "{} of {} pushes violate \"accepted means durable\" ({kinds:?}; {} journal syncs seen, \
         {} truncated writes); first: {first}",
        a.violations.len(),
        a.pushes,
        a.journal_syncs,
        a.truncated_writes
    ))
}

// ------------------------------------------------------------------------------------------
// Running herald under strace.

/// `herald serve` started by strace (optionally through a wrapper such as eatmydata).
struct Traced {
    strace: Child,
    data_dir: PathBuf,
    trace_file: PathBuf,
    log_file: PathBuf,
    http_port: u16,
    _tmp: tempfile::TempDir,
}

impl Traced {
    async fn start(strace: &Path, wrapper: Option<&Path>) -> Traced {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let trace_file = tmp.path().join("strace.txt");
        let log_file = tmp.path().join("herald.log");
        let http_port = free_port();
        let mut cmd = Command::new(strace);
        cmd.args(["-f", "-tt", "-y", "-xx", "-s", "1048576", "--seccomp-bpf"])
            .arg("-e")
            .arg(format!(
                "trace={}",
                [WRITES, SYNCS, &["sync_file_range"]].concat().join(",")
            ))
            .arg("-o")
            .arg(&trace_file)
            .arg("--");
        if let Some(w) = wrapper {
            cmd.arg(w);
        }
        cmd.arg(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--mqtt-addr")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--ws-addr")
            .arg(format!("127.0.0.1:{}", free_port()))
            .env("HERALD_ADMIN_TOKEN", ADMIN)
            .env("HERALD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_file).unwrap());
        let mut t = Traced {
            strace: cmd.spawn().unwrap(),
            data_dir,
            trace_file,
            log_file,
            http_port,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", t.base())).send().await
                && r.status().is_success()
            {
                return t;
            }
            if let Some(status) = t.strace.try_wait().unwrap() {
                panic!(
                    "strace exited ({status}) before herald answered (is ptrace allowed?): {}",
                    t.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "herald did not start under strace: {}",
                t.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The traced herald: strace's child (eatmydata `exec`s it, keeping the pid).
    fn herald_pids(&self) -> Vec<u32> {
        let parent = self.strace.id();
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces, so split after the `)`.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(parent) {
                out.push(pid);
            }
        }
        out
    }

    fn signal(&self, sig: &str) {
        for pid in self.herald_pids() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    /// SIGTERM to herald, waits for strace to finish, returns the trace text.
    fn stop(mut self) -> (String, PathBuf) {
        assert!(
            !self.herald_pids().is_empty(),
            "herald is not running under strace"
        );
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.strace.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "herald did not stop on SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.trace_file).unwrap();
        // The event log's segment files: where a PushAccepted becomes durable.
        let store = self.data_dir.join("log").canonicalize().unwrap();
        (text, store)
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if self.strace.try_wait().ok().flatten().is_none() {
            self.signal("-KILL");
            let _ = self.strace.kill();
            let _ = self.strace.wait();
        }
    }
}

/// Starts herald under strace (and `wrapper`), sends the pushes, stops it, parses the trace.
async fn traced_run(strace: &Path, wrapper: Option<&Path>) -> (Trace, PathBuf, Vec<String>) {
    let server = Traced::start(strace, wrapper).await;
    let app = create_app_at(server.base()).await;
    let dev = app.register().await;
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let (app, device) = (app.clone(), dev.device_id.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (worker..PUSHES).step_by(CONCURRENCY) {
                ids.push(app.push(&device, json!({"n": i})).await);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    assert_eq!(ids.len(), PUSHES);
    let (text, store) = server.stop();
    (Trace::parse(&text), store, ids)
}

fn report(run: &str, a: &Analysis, verdict: &Result<(), String>) {
    println!(
        "{run}: {} pushes; {} journal writes, {} journal fsync/fdatasync seen, {} of them \
         covering pushes (largest group commit: {} pushes); {} ids journaled, {} answered 202; \
         {} violations; {} truncated writes, {} syscalls never completed",
        a.pushes,
        a.journal_writes,
        a.journal_syncs,
        a.covering_syncs,
        a.largest_group,
        a.journaled,
        a.answered_202,
        a.violations.len(),
        a.truncated_writes,
        a.never_completed
    );
    match verdict {
        Ok(()) => println!("{run}: check passed"),
        Err(e) => println!("{run}: check failed: {e}"),
    }
}

/// Every 202 to `POST /v1/messages` reaches the socket only after the fsync of its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_202_is_written_after_the_sync_that_covers_its_event() {
    let Some(strace) = tool("strace") else {
        return;
    };
    let started = Instant::now();
    let (trace, store, ids) = traced_run(&strace, None).await;
    let a = analyze(&trace, &store, &ids);
    let verdict = check(&trace, &store, &ids);
    report("fsync on", &a, &verdict);
    println!("fsync on: run took {:.1?}", started.elapsed());
    assert_eq!(a.truncated_writes, 0, "strace truncated writes: raise -s");
    verdict.unwrap();
    assert_eq!(a.answered_202, PUSHES);
    assert!(a.journal_syncs > 0);
}

/// The same check fails when syncs are no-ops (eatmydata): the test above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_check_fails_when_eatmydata_disables_syncs() {
    let (Some(strace), Some(eatmydata)) = (tool("strace"), tool("eatmydata")) else {
        return;
    };
    let started = Instant::now();
    let (trace, store, ids) = traced_run(&strace, Some(&eatmydata)).await;
    let a = analyze(&trace, &store, &ids);
    let verdict = check(&trace, &store, &ids);
    report("eatmydata", &a, &verdict);
    println!("eatmydata: run took {:.1?}", started.elapsed());
    assert!(verdict.is_err(), "the check passed with syncs disabled");
    assert_eq!(
        a.journal_syncs, 0,
        "eatmydata did not remove the sync syscalls"
    );
    // It fails for the right reason: everything else was seen, only the syncs are missing.
    assert_eq!(a.journaled, PUSHES);
    assert_eq!(a.answered_202, PUSHES);
    assert_eq!(a.violations.len(), PUSHES);
    assert!(a.violations.iter().all(|(k, _)| *k == Violation::NoSync));
}

// ------------------------------------------------------------------------------------------
// The checker itself, on hand-written traces: these need no tools and always run.

mod checker {
    use super::*;

    const A: &str = "0190a6f4-1111-7000-8000-00000000000a";
    const B: &str = "0190a6f4-2222-7000-8000-00000000000b";

    fn store() -> PathBuf {
        PathBuf::from("/d/store")
    }

    fn journal_write(tid: u32, t: u32, payload: &str) -> String {
        format!("{tid} 10:00:00.{t:06} write(11</d/store/0.jnl>, \"\\x01{payload}\\x00\", 99) = 99")
    }

    fn fsync(tid: u32, t: u32) -> String {
        format!("{tid} 10:00:00.{t:06} fsync(11</d/store/0.jnl>) = 0")
    }

    fn answer(tid: u32, t: u32, id: &str) -> String {
        format!(
            "{tid} 10:00:00.{t:06} writev(14<socket:[9{t}]>, [{{iov_base=\"HTTP/1.1 202 \
             Accepted\\r\\ncontent-length: 52\\r\\n\\r\\n\", iov_len=45}}, {{iov_base=\
             \"{{\\\"message_id\\\":\\\"{id}\\\"}}\", iov_len=52}}], 2) = 97"
        )
    }

    fn run(lines: &[String], ids: &[&str]) -> Result<(), String> {
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        check(&Trace::parse(&lines.join("\n")), &store(), &ids)
    }

    #[test]
    fn in_order_passes_and_group_commit_covers_both() {
        let t = [
            journal_write(7, 1, &format!("{A}..{B}")),
            fsync(7, 2),
            answer(8, 3, A),
            answer(9, 4, B),
        ];
        run(&t, &[A, B]).unwrap();
        let a = analyze(
            &Trace::parse(&t.join("\n")),
            &store(),
            &[A.into(), B.into()],
        );
        assert_eq!(
            (a.covering_syncs, a.largest_group, a.answered_202),
            (1, 2, 2)
        );
    }

    #[test]
    fn hex_escaped_output_of_strace_xx_is_decoded() {
        let hex = |s: &str| s.bytes().map(|b| format!("\\x{b:02x}")).collect::<String>();
        let t = [
            format!(
                "7 10:00:00.000001 write(11<{}>, \"{}\", 36) = 36",
                hex("/d/store/0.jnl"),
                hex(A)
            ),
            format!(
                "7 10:00:00.000002 fdatasync(11<{}>) = 0",
                hex("/d/store/0.jnl")
            ),
            format!(
                "8 10:00:00.000003 write(14<{}>, \"{}\", 80) = 80",
                hex("socket:[5]"),
                hex(&format!(
                    "HTTP/1.1 202 Accepted\r\n\r\n{{\"message_id\":\"{A}\"}}"
                ))
            ),
        ];
        run(&t, &[A]).unwrap();
    }

    #[test]
    fn an_answer_written_while_the_sync_is_unfinished_fails() {
        let t = [
            journal_write(7, 1, A),
            "7 10:00:00.000002 fsync(11</d/store/0.jnl> <unfinished ...>".to_owned(),
            answer(8, 3, A),
            "7 10:00:00.000004 <... fsync resumed>) = 0".to_owned(),
        ];
        let e = run(&t, &[A]).unwrap_err();
        assert!(e.contains("AnsweredBeforeSync"), "{e}");
    }

    #[test]
    fn an_unfinished_answer_that_started_after_the_sync_passes() {
        let t = [
            journal_write(7, 1, A),
            fsync(7, 2),
            answer(8, 3, A).replace(") = 97", " <unfinished ...>"),
            "9 10:00:00.000004 write(4<anon_inode:[eventfd]>, \"\\1\", 8) = 8".to_owned(),
            "8 10:00:00.000005 <... writev resumed>) = 97".to_owned(),
        ];
        run(&t, &[A]).unwrap();
    }

    #[test]
    fn a_sync_that_started_before_the_journal_write_finished_does_not_cover_it() {
        let t = [
            journal_write(7, 1, A).replace(") = 99", " <unfinished ...>"),
            fsync(6, 2),
            "7 10:00:00.000003 <... write resumed>) = 99".to_owned(),
            answer(8, 4, A),
        ];
        let e = run(&t, &[A]).unwrap_err();
        assert!(e.contains("NoSync"), "{e}");
    }

    #[test]
    fn a_sync_of_another_file_or_a_failed_sync_does_not_count() {
        let other = [
            journal_write(7, 1, A),
            "7 10:00:00.000002 fsync(12</d/store/1.jnl>) = 0".to_owned(),
            "7 10:00:00.000003 sync_file_range(11</d/store/0.jnl>, 0, 0, 0) = 0".to_owned(),
            answer(8, 4, A),
        ];
        assert!(run(&other, &[A]).unwrap_err().contains("NoSync"));
        let failed = [
            journal_write(7, 1, A),
            "7 10:00:00.000002 fsync(11</d/store/0.jnl>) = -1 EIO (Input/output error)".to_owned(),
            answer(8, 3, A),
        ];
        assert!(run(&failed, &[A]).unwrap_err().contains("NoSync"));
    }

    #[test]
    fn an_id_split_over_two_journal_writes_needs_a_sync_after_the_second() {
        let (head, tail) = A.split_at(20);
        let piece = |t: u32, p: &str| {
            format!("7 10:00:00.{t:06} write(11</d/store/0.jnl>, \"{p}\", 9) = 9")
        };
        let late = [
            piece(1, head),
            fsync(7, 2),
            piece(3, tail),
            answer(8, 4, A),
            fsync(7, 5),
        ];
        assert!(run(&late, &[A]).unwrap_err().contains("AnsweredBeforeSync"));
        let good = [piece(1, head), piece(2, tail), fsync(7, 3), answer(8, 4, A)];
        run(&good, &[A]).unwrap();
    }

    #[test]
    fn missing_pieces_and_empty_input_fail_instead_of_passing() {
        assert!(run(&[], &[]).unwrap_err().contains("vacuously"));
        assert!(run(&[], &[A]).unwrap_err().contains("NoJournalWrite"));
        let unanswered = [journal_write(7, 1, A), fsync(7, 2)];
        assert!(run(&unanswered, &[A]).unwrap_err().contains("NoResponse"));
        let not_in_store = [
            journal_write(7, 1, A).replace("/d/store/", "/elsewhere/"),
            answer(8, 2, A),
        ];
        assert!(
            run(&not_in_store, &[A])
                .unwrap_err()
                .contains("NoJournalWrite")
        );
        let rejected = [
            journal_write(7, 1, A),
            fsync(7, 2),
            answer(8, 3, A).replace("202 Accepted", "500 Internal"),
        ];
        assert!(run(&rejected, &[A]).unwrap_err().contains("Not202"));
    }
}
