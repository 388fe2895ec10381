//! `herald top`: the admin console's overview in a terminal, for operators on a server
//! without a browser. It reads the same stream the page does
//! (`GET /v1/admin/overview/stream`, Server-Sent Events, a sample a second) with the
//! admin token, and draws the figures and their last minutes as sparklines.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use herald_telemetry::overview::{HISTORY, Sample};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Sparkline};
use tokio::sync::mpsc;

/// Arguments of `herald top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The server's REST API.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    api: String,
    #[command(flatten)]
    server: crate::replay::ServerDir,
    /// Print one frame as text once a sample arrived, and exit (for scripts, and where
    /// there is no terminal).
    #[arg(long)]
    once: bool,
}

/// What the stream hands the screen.
enum Update {
    History(Vec<Sample>),
    Sample(Sample),
    Failed(String),
}

/// Runs `herald top`.
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let token = args.server.admin_token()?;
    let api = args.api.trim_end_matches('/').to_owned();
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(stream(api.clone(), token, tx));
    let mut samples: VecDeque<Sample> = VecDeque::with_capacity(HISTORY);
    if args.once || !std::io::stdout().is_terminal() {
        // Wait for a fresh sample, so the rates are the server's current ones.
        loop {
            match rx.recv().await {
                Some(Update::History(h)) => samples.extend(h),
                Some(Update::Sample(s)) => {
                    samples.push_back(s);
                    break;
                }
                Some(Update::Failed(e)) => bail!(e),
                None => bail!("the overview stream ended"),
            }
        }
        let mut terminal = Terminal::new(TestBackend::new(110, 32))?;
        terminal.draw(|f| draw(f, f.area(), &api, &samples, None))?;
        print!("{}", text_of(terminal.backend()));
        return Ok(());
    }
    interactive(&api, &mut rx, &mut samples).await
}

async fn interactive(
    api: &str,
    rx: &mut mpsc::Receiver<Update>,
    samples: &mut VecDeque<Sample>,
) -> anyhow::Result<()> {
    let mut terminal = ratatui::init();
    let mut problem: Option<String> = None;
    let result: anyhow::Result<()> = async {
        loop {
            terminal.draw(|f| draw(f, f.area(), api, samples, problem.as_deref()))?;
            // Keys are polled between samples: at most 100 ms late.
            let key = tokio::task::block_in_place(|| -> std::io::Result<Option<KeyCode>> {
                if event::poll(Duration::from_millis(100))?
                    && let TermEvent::Key(k) = event::read()?
                {
                    if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
                        return Ok(Some(KeyCode::Esc));
                    }
                    return Ok(Some(k.code));
                }
                Ok(None)
            })?;
            if matches!(key, Some(KeyCode::Char('q') | KeyCode::Esc)) {
                return Ok(());
            }
            while let Ok(update) = rx.try_recv() {
                match update {
                    Update::History(h) => {
                        samples.clear();
                        samples.extend(h);
                        problem = None;
                    }
                    Update::Sample(s) => {
                        if samples.len() == HISTORY {
                            samples.pop_front();
                        }
                        samples.push_back(s);
                        problem = None;
                    }
                    Update::Failed(e) => problem = Some(e),
                }
            }
        }
    }
    .await;
    ratatui::restore();
    result
}

/// Reads the overview stream, reconnecting after a pause when it breaks; an answer that
/// will not change by retrying (401, 403) ends it.
async fn stream(api: String, token: String, tx: mpsc::Sender<Update>) {
    let http = reqwest::Client::new();
    loop {
        let outcome = read_stream(&http, &api, &token, &tx).await;
        let (message, fatal) = match outcome {
            Ok(()) => (
                "the server ended the stream; reconnecting".to_owned(),
                false,
            ),
            Err((e, fatal)) => (e, fatal),
        };
        if tx.send(Update::Failed(message)).await.is_err() || fatal {
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn read_stream(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    tx: &mpsc::Sender<Update>,
) -> Result<(), (String, bool)> {
    let url = format!("{api}/v1/admin/overview/stream");
    let mut r = http
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| (format!("cannot reach {url}: {e}"), false))?;
    match r.status().as_u16() {
        200 => {}
        401 | 403 => {
            return Err((
                format!(
                    "{url} answered {}: check --admin-token or HERALD_ADMIN_TOKEN",
                    r.status()
                ),
                true,
            ));
        }
        other => return Err((format!("{url} answered {other}"), false)),
    }
    let mut parser = SseParser::default();
    loop {
        let chunk = r
            .chunk()
            .await
            .map_err(|e| (format!("the stream broke: {e}"), false))?;
        let Some(chunk) = chunk else {
            return Ok(());
        };
        for (event, data) in parser.feed(&chunk) {
            let update = match event.as_str() {
                "history" => serde_json::from_str(&data).map(Update::History),
                "sample" => serde_json::from_str(&data).map(Update::Sample),
                _ => continue,
            }
            .map_err(|e| (format!("unreadable {event} event: {e}"), true))?;
            if tx.send(update).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Splits a `text/event-stream` into (event, data) pairs as its bytes arrive.
#[derive(Default)]
struct SseParser {
    pending: Vec<u8>,
    event: String,
    data: String,
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if !self.data.is_empty() || !self.event.is_empty() {
                    let event = std::mem::take(&mut self.event);
                    let data = std::mem::take(&mut self.data);
                    out.push((
                        if event.is_empty() {
                            "message".into()
                        } else {
                            event
                        },
                        data,
                    ));
                }
            } else if let Some(v) = line.strip_prefix("event:") {
                self.event = v.trim_start().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        out
    }
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) => format!("{v:.digits$}"),
        None => "—".into(),
    }
}

/// One frame: the figures, then a sparkline per chart of the page.
fn draw(
    f: &mut ratatui::Frame,
    area: Rect,
    api: &str,
    samples: &VecDeque<Sample>,
    problem: Option<&str>,
) {
    let last = samples.back().cloned().unwrap_or_default();
    let rows = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(5),
        Constraint::Min(10),
        Constraint::Length(1),
    ])
    .split(area);
    let when = jiff::Timestamp::from_millisecond(last.ts_ms as i64)
        .map(|t| t.strftime("%H:%M:%S UTC").to_string())
        .unwrap_or_default();
    f.render_widget(
        Paragraph::new(Line::from(vec![
            Span::from("herald top").bold(),
            Span::from(format!("  {api}  {when}  ({} samples)", samples.len())),
        ])),
        rows[0],
    );
    let figures = [
        ("accepted/s", fmt(Some(last.accepted_per_s), 0)),
        ("sent/s", fmt(Some(last.sent_per_s), 0)),
        ("acked/s", fmt(Some(last.acked_per_s), 0)),
        ("ack p50 ms", fmt(last.ack_p50_ms, 1)),
        ("ack p99 ms", fmt(last.ack_p99_ms, 1)),
        ("connected", last.connected.to_string()),
        ("lag", last.lag_records.to_string()),
        ("sync p50 ms", fmt(last.sync_p50_ms, 2)),
        ("sync p99 ms", fmt(last.sync_p99_ms, 2)),
        ("in flight", last.inflight.to_string()),
        ("accepted", last.accepted_total.to_string()),
        ("acked", last.acked_total.to_string()),
    ];
    let cells = Layout::horizontal([Constraint::Ratio(1, 6); 6]).split(rows[1]);
    for (i, chunk) in figures.chunks(2).enumerate() {
        let text: Vec<Line> = chunk
            .iter()
            .map(|(label, value)| {
                Line::from(vec![
                    Span::from(format!("{label:<12}")).fg(Color::Gray),
                    Span::from(value.clone()).bold(),
                ])
            })
            .collect();
        f.render_widget(
            Paragraph::new(text).block(Block::default().borders(Borders::ALL)),
            cells[i],
        );
    }
    type Get = fn(&Sample) -> f64;
    let charts: [(&str, Get); 6] = [
        ("accepted/s", |s| s.accepted_per_s),
        ("acked/s", |s| s.acked_per_s),
        ("ack p99 ms", |s| s.ack_p99_ms.unwrap_or(0.0)),
        ("connected", |s| s.connected as f64),
        ("delivery lag", |s| s.lag_records as f64),
        ("sync p99 ms", |s| s.sync_p99_ms.unwrap_or(0.0)),
    ];
    let grid = Layout::vertical([Constraint::Ratio(1, 3); 3]).split(rows[2]);
    for (r, pair) in charts.chunks(2).enumerate() {
        let cols = Layout::horizontal([Constraint::Ratio(1, 2); 2]).split(grid[r]);
        for (c, (title, get)) in pair.iter().enumerate() {
            let width = cols[c].width.saturating_sub(2) as usize;
            let data: Vec<u64> = samples
                .iter()
                .skip(samples.len().saturating_sub(width))
                .map(|s| (get(s) * 100.0).round().max(0.0) as u64)
                .collect();
            let peak = data.iter().max().copied().unwrap_or(0) as f64 / 100.0;
            f.render_widget(
                Sparkline::default()
                    .block(
                        Block::default()
                            .borders(Borders::ALL)
                            .title(format!(" {title} (max {peak:.1}) ")),
                    )
                    .data(&data)
                    .style(Style::default().fg(Color::Cyan)),
                cols[c],
            );
        }
    }
    let footer = match problem {
        Some(p) => Line::from(Span::from(p.to_owned()).fg(Color::Red)),
        None => Line::from("q quits · this server's process, a sample a second".fg(Color::Gray)),
    };
    f.render_widget(Paragraph::new(footer), rows[3]);
}

/// The text of a drawn frame, one line per row, trailing spaces cut.
fn text_of(backend: &TestBackend) -> String {
    let buf = backend.buffer();
    let width = buf.area.width as usize;
    let mut out = String::new();
    for row in buf.content.chunks(width) {
        let line: String = row.iter().map(|c| c.symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sse_events_split_however_the_bytes_arrive() {
        let stream = b"event: history\ndata: [1,2]\n\n: keep-alive\n\nevent: sample\r\ndata: {\"a\":1}\r\n\r\n";
        for cut in 1..stream.len() {
            let mut p = SseParser::default();
            let mut got = p.feed(&stream[..cut]);
            got.extend(p.feed(&stream[cut..]));
            assert_eq!(
                got,
                vec![
                    ("history".to_owned(), "[1,2]".to_owned()),
                    ("sample".to_owned(), "{\"a\":1}".to_owned())
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_frame_shows_every_figure() {
        let mut samples = VecDeque::new();
        for i in 0..50u64 {
            samples.push_back(Sample {
                ts_ms: 1_790_000_000_000 + i * 1000,
                accepted_per_s: i as f64,
                connected: 7,
                ack_p99_ms: Some(12.5),
                accepted_total: 1225,
                ..Sample::default()
            });
        }
        let mut terminal = Terminal::new(TestBackend::new(110, 32)).unwrap();
        terminal
            .draw(|f| draw(f, f.area(), "http://x", &samples, None))
            .unwrap();
        let text = text_of(terminal.backend());
        for want in [
            "herald top",
            "accepted/s",
            "49",
            "connected",
            "7",
            "12.5",
            "1225",
            "max 49.0",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }
}
