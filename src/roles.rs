//! One role per process, all on the same Kafka topic (a herald built with `--features
//! kafka`): `herald ingest` (the REST API), `herald deliver` (delivery workers sharing the
//! topic's partitions through a Kafka consumer group), `herald nav` (navigation).
//! Gateways are `herald gateway` processes (see `gateway.rs`).
//!
//! The topic is partitioned by key: everything about a device is in the device's
//! partition. Each delivery worker folds the partitions the group gives it and serves
//! their devices. With the embedded store each folds into its own data dir, and `herald
//! ingest` and `herald nav` fold every partition themselves (the projections they read);
//! with the CQL store (`store = "cql"`) every process shares one store, which only the
//! workers write: a worker taking a partition over starts from its shared checkpoint,
//! and ingest and nav read what the workers wrote.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use herald_delivery::directory::StoreDirectory;
use herald_delivery::link::{Gated, Link, NoLink};
use herald_delivery::quic::{QuicLink, QuicLinkConfig};
use herald_delivery::worker::{Worker, WorkerError};
use herald_eventlog::kafka::{OrderedKafkaLog, Polled, Rebalance};
use herald_eventlog::{EventLog, Partitions};
use herald_gateway::link::LinkTls;
use herald_ingest::Ingest;
use herald_projections::StoreError;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, StoreKind};
use crate::serve::{
    Secrets, ingest_config, kafka_config, load_secrets, open_store, shutdown_signal,
};

/// The consumer group whose members share the topic's partitions.
pub const DELIVER_GROUP: &str = "herald-deliver";

/// How long a worker keeps a partition after it was revoked, waiting to be given it back
/// in the same rebalance.
const RELEASE_GRACE: Duration = Duration::from_secs(3);

/// How long a member waits before it takes again a partition it still holds whose
/// worker another process fenced in the shared store (a revocation usually follows).
const RETAKE_DELAY: Duration = Duration::from_secs(2);

/// Resolves at `at`, or never.
async fn retake_due(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The topic, every partition opened, and each partition's handle on Kafka (the first
/// has the producer and group membership).
async fn open_kafka(config: &Config) -> anyhow::Result<(Partitions, Vec<Arc<OrderedKafkaLog>>)> {
    let Some(brokers) = &config.kafka_brokers else {
        bail!(
            "the roles share one log on Kafka: set kafka_brokers (--kafka-brokers, HERALD_KAFKA_BROKERS)"
        );
    };
    let k = kafka_config(
        config,
        brokers,
        i32::try_from(config.kafka_partitions).unwrap_or(1),
    );
    let logs = OrderedKafkaLog::open_topic(k)
        .await
        .with_context(|| format!("cannot open the event log on Kafka at {brokers}"))?;
    let topic = Partitions::new(
        logs.iter()
            .map(|l| l.clone() as Arc<dyn EventLog>)
            .collect(),
    );
    Ok((topic, logs))
}

/// Runs the API on `http` (with `router`) and the follower `workers` until a signal or a
/// failure.
async fn run_until_signal(
    workers: Vec<Worker>,
    config: &Config,
    ingest: &Arc<Ingest>,
    http: (TcpListener, axum::Router),
    shutdown_tx: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let shutdown = shutdown_tx.subscribe();
    let mut tasks = tokio::task::JoinSet::new();
    for w in workers {
        tasks.spawn(w.run(shutdown.clone()));
    }
    let fds = crate::serve::fd_budget(config, false)?;
    let (listener, router) = http;
    let http_task = Some(crate::serve::serve_http(
        "http",
        listener,
        router,
        config,
        &fds,
        ingest.health(),
        shutdown.clone(),
    ));
    let result = tokio::select! {
        _ = shutdown_signal() => { tracing::info!("shutting down"); Ok(()) }
        Some(r) = tasks.join_next() => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("a log follower stopped unexpectedly")),
            Ok(Err(e)) => Err(anyhow::anyhow!("a log follower failed: {e}")),
            Err(e) => Err(anyhow::anyhow!("a log follower panicked: {e}")),
        },
    };
    let _ = shutdown_tx.send(true);
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    result
}

/// What `herald ingest` and `herald nav` share: the topic, their own projections of
/// every partition folded by followers, the API state (with navigation following the
/// heartbeats), and the HTTP listener.
async fn api_process(
    config: &Config,
) -> anyhow::Result<(Vec<Worker>, Arc<Ingest>, watch::Sender<bool>, TcpListener)> {
    let Secrets {
        admin_token,
        keyring,
        jwt_secret,
    } = load_secrets(config, true)?;
    let (topic, _) = open_kafka(config).await?;
    let (_db, store) = open_store(config, &topic).await?;
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (workers, applied) = if config.store == StoreKind::Cql {
        // The delivery workers fold every partition into the shared store: this process
        // only reads it, and learns how far each partition is applied from the store's
        // checkpoints.
        let applied = follow_checkpoints(store.clone(), topic.count(), shutdown.clone());
        (Vec::new(), applied)
    } else {
        let workers = (0..topic.count())
            .map(|p| {
                Worker::for_partition(
                    &topic,
                    p,
                    store.clone(),
                    Arc::new(NoLink),
                    keyring.clone(),
                    None,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let applied = workers.iter().map(Worker::applied).collect();
        (workers, applied)
    };
    let ingest = Ingest::partitioned(
        ingest_config(config, admin_token),
        topic.clone(),
        store,
        applied,
        keyring,
        jwt_secret.as_bytes(),
    );
    ingest.overview();
    for log in topic.all() {
        follow_navigation(&ingest, log.clone(), shutdown.clone());
    }
    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (http_addr)", config.http_addr))?;
    Ok((workers, ingest, shutdown_tx, http))
}

/// `herald ingest`: the REST API. Appends to Kafka; reads its own projections.
pub async fn ingest(config: Config) -> anyhow::Result<()> {
    let (workers, ingest, shutdown_tx, http) = api_process(&config).await?;
    tracing::info!(http = %http.local_addr()?, topic = %config.kafka_topic, partitions = workers.len(), "herald ingest serving");
    let router = herald_ingest::router(ingest.clone());
    run_until_signal(workers, &config, &ingest, (http, router), shutdown_tx).await
}

/// `herald nav`: `GET /v1/nav` alone, from the gateways' heartbeats in the log.
pub async fn nav(config: Config) -> anyhow::Result<()> {
    let (workers, ingest, shutdown_tx, http) = api_process(&config).await?;
    tracing::info!(http = %http.local_addr()?, "herald nav serving");
    let router = herald_ingest::nav_router(ingest.clone());
    run_until_signal(workers, &config, &ingest, (http, router), shutdown_tx).await
}

/// How often a process reading a shared store asks how far each partition is applied.
const CHECKPOINT_POLL: Duration = Duration::from_millis(20);

/// How far the shared store has applied each of `count` partitions, polled from its
/// checkpoints until `shutdown`.
fn follow_checkpoints(
    store: Arc<dyn herald_projections::view::Store>,
    count: u32,
    mut shutdown: watch::Receiver<bool>,
) -> Vec<watch::Receiver<u64>> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..count).map(|_| watch::channel(0)).unzip();
    tokio::spawn(async move {
        loop {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.checkpoints(count)).await {
                Ok(Ok(checkpoints)) => {
                    for (tx, c) in senders.iter().zip(checkpoints) {
                        tx.send_if_modified(|v| {
                            let newer = c > *v;
                            if newer {
                                *v = c;
                            }
                            newer
                        });
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot read the store's checkpoints");
                }
                Err(_) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECKPOINT_POLL) => {},
                _ = shutdown.changed() => return,
            }
        }
    });
    receivers
}

fn follow_navigation(
    ingest: &Arc<Ingest>,
    log: Arc<dyn EventLog>,
    shutdown: watch::Receiver<bool>,
) {
    let nav = ingest.navigator();
    tokio::spawn(async move {
        if let Err(e) = nav.follow(log, shutdown).await {
            tracing::error!(error = %e, "navigation stopped following the log");
        }
    });
}

/// One partition this worker folds.
struct Held {
    /// Stops its worker.
    stop: watch::Sender<bool>,
    /// Its worker's forwarding, open once it serves the partition.
    gated: Arc<Gated>,
    applied: watch::Receiver<u64>,
    /// The log's end when it was taken: once applied, the partition is served here.
    target: u64,
    serving: bool,
    /// When it goes, if it was revoked and not given back.
    release_at: Option<tokio::time::Instant>,
    /// Tells this holding's worker task from an earlier one of the same partition.
    generation: u64,
    /// Turns true when its worker has stopped.
    done: watch::Receiver<bool>,
}

/// `herald deliver`: a member of the delivery group. For each partition the group gives
/// it, it folds the partition (from where its own store stands), appends the shares of
/// multi-target events for other partitions, and, once caught up, serves the
/// partition's devices: the gateways send their requests for those devices here
/// (`Owns`), and it forwards their new entries.
pub async fn deliver(config: Config) -> anyhow::Result<()> {
    let Secrets { keyring, .. } = load_secrets(&config, true)?;
    if config.link_gateways.is_empty() {
        bail!("herald deliver needs the gateways to link to: link_gateways (--link-gateway)");
    }
    let certs = config
        .link_certs
        .clone()
        .context("herald deliver needs link_certs (--link-certs)")?;
    let fds = crate::serve::fd_budget(&config, false)?;
    let (topic, kafka_logs) = open_kafka(&config).await?;
    let kafka = kafka_logs[0].clone();
    let (_db, store) = open_store(&config, &topic).await?;
    let count = topic.count();
    let quic = QuicLink::new(QuicLinkConfig {
        gateways: config.link_gateways.clone(),
        tls: LinkTls::in_dir(&certs, "worker"),
        worker_id: format!("deliver:{}", std::process::id()),
    })
    .context("cannot set up the link to the gateways")?;
    // Serving nothing until the group gives it partitions.
    quic.set_owned(count, Vec::new());
    let directory = Arc::new(
        StoreDirectory::new(store.clone(), keyring.clone())
            .partitioned(count)
            .waiting_for_registrations(),
    );
    let (shutdown_tx, shutdown) = watch::channel(false);
    let health = herald_ingest::health::Health::new(Some(topic.clone()), Some(store.clone()));
    crate::serve::serve_metrics(&config, &fds, &health, shutdown.clone()).await?;
    quic.run(directory.clone(), Arc::new(topic.clone()), shutdown.clone());
    let member = kafka
        .kafka()
        .membership(DELIVER_GROUP)
        .context("cannot join the delivery workers' group")?;
    tracing::info!(gateways = ?config.link_gateways, partitions = count, "herald deliver joined the group");

    let mut held: std::collections::BTreeMap<u32, Held> = Default::default();
    type Ended = (u32, u64, Result<(), herald_delivery::worker::WorkerError>);
    let mut tasks: tokio::task::JoinSet<Ended> = tokio::task::JoinSet::new();
    // Workers told to stop and not stopped yet: a partition given back waits for its old
    // worker, so that two never commit the same partition.
    let mut stopping: std::collections::HashMap<u32, watch::Receiver<bool>> = Default::default();
    let mut generation = 0u64;
    let mut committed: std::collections::HashMap<i32, i64> = Default::default();
    // Partitions still assigned here whose worker was fenced in the shared store: taken
    // again at these times, unless the group revokes them first.
    let mut retake: std::collections::BTreeMap<u32, tokio::time::Instant> = Default::default();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let result = loop {
        let polled = tokio::select! {
            _ = &mut signal => { tracing::info!("shutting down"); break Ok(()); }
            Some(done) = tasks.join_next() => {
                match done {
                    Ok((p, g, Err(WorkerError::Store(StoreError::Fenced { .. })))) => {
                        // Another worker took the partition in the shared store since this
                        // one's worker did: the group gave it away and back while the old
                        // worker still ran, or gave it away for good.
                        let Some(h) = held.get(&p).filter(|h| h.generation == g) else {
                            continue;
                        };
                        let assigned = h.release_at.is_none();
                        tracing::warn!(partition = p, assigned, "another worker took the partition over in the shared store");
                        if h.serving {
                            tracing::info!(partition = p, "gave a partition up");
                        }
                        h.gated.set_active(false);
                        directory.serve_partition(p, None);
                        held.remove(&p);
                        committed.remove(&(p as i32));
                        quic.set_owned(
                            count,
                            held.iter().filter(|(_, h)| h.serving).map(|(p, _)| *p).collect(),
                        );
                        if assigned {
                            // Still this member's, as far as it has heard: take it again
                            // shortly (a revocation on its way cancels that), as if given
                            // it then.
                            retake.insert(p, tokio::time::Instant::now() + RETAKE_DELAY);
                        }
                        continue;
                    }
                    Ok((p, _, Err(e))) => break Err(anyhow::anyhow!("the worker of partition {p} failed: {e}")),
                    Ok((p, g, Ok(()))) => {
                        if held.get(&p).is_some_and(|h| h.generation == g) {
                            held.remove(&p);
                        }
                        continue;
                    }
                    Err(e) => break Err(anyhow::anyhow!("a partition worker panicked: {e}")),
                }
            }
            () = retake_due(retake.values().min().copied()) => {
                let now = tokio::time::Instant::now();
                let due: Vec<u32> = retake.iter().filter(|(_, t)| **t <= now).map(|(p, _)| *p).collect();
                for p in &due {
                    retake.remove(p);
                }
                Ok(Polled::Rebalance(Rebalance::Assigned(due.into_iter().map(|p| p as i32).collect())))
            }
            p = member.poll(16, Duration::from_millis(200)) => p,
        };
        let mut changed = false;
        let mut newly_served = Vec::new();
        if matches!(polled, Ok(Polled::Rebalance(_))) {
            // A commit queued before a rebalance may not have been taken: say it again.
            committed.clear();
        }
        match polled {
            Ok(Polled::Rebalance(Rebalance::Assigned(parts))) => {
                let mut new = Vec::new();
                for p in parts.into_iter().filter_map(|p| u32::try_from(p).ok()) {
                    retake.remove(&p);
                    if p >= count {
                        // The topic grew partitions after this process started: a key's
                        // partition would differ between processes. Refuse to serve it.
                        tracing::error!(
                            partition = p,
                            count,
                            "the group assigned a partition the topic did not have at start-up; ignoring it (restart every role after adding partitions)"
                        );
                    } else if let Some(h) = held.get_mut(&p) {
                        h.release_at = None;
                    } else {
                        new.push(p);
                    }
                }
                // Shares of records before the group's offset were appended by the
                // partition's last owner (it commits only what it has stored). One
                // question to the broker for every partition new here.
                let asked: Vec<i32> = new.iter().map(|&p| p as i32).collect();
                let offsets = if new.is_empty() {
                    Vec::new()
                } else {
                    match kafka.kafka().committed_offsets(DELIVER_GROUP, &asked).await {
                        Ok(o) => o,
                        Err(e) => {
                            tracing::warn!(error = %e, partitions = ?new, "cannot read the group's offsets; appending every share again");
                            vec![None; new.len()]
                        }
                    }
                };
                for (p, group_offset) in new.into_iter().zip(offsets) {
                    let share_from = group_offset
                        .and_then(|o| u64::try_from(o).ok())
                        .unwrap_or(0);
                    if let Some(mut done) = stopping.remove(&p) {
                        tracing::debug!(
                            partition = p,
                            "waiting for the partition's last worker to stop"
                        );
                        let _ = done.wait_for(|d| *d).await;
                    }
                    let gated = Arc::new(Gated::new(quic.clone() as Arc<dyn Link>));
                    let worker = Worker::for_partition(
                        &topic,
                        p,
                        store.clone(),
                        gated.clone(),
                        keyring.clone(),
                        Some(share_from),
                    )?;
                    let (stop, stop_rx) = watch::channel(false);
                    let applied = worker.applied();
                    // Where the partition ends now, from the broker: the polled end may
                    // lag (the broker was away a moment ago).
                    let target = match kafka_logs[p as usize].refresh_end().await {
                        Ok(end) => end,
                        Err(e) => {
                            tracing::warn!(partition = p, error = %e, "cannot ask the broker where the partition ends; using the last polled end");
                            *topic.get(p).durable_end().borrow()
                        }
                    };
                    tracing::info!(
                        partition = p,
                        target,
                        share_from,
                        "took a partition; catching up"
                    );
                    generation += 1;
                    let g = generation;
                    let (done_tx, done) = watch::channel(false);
                    tasks.spawn(async move {
                        let r = worker.run(stop_rx).await;
                        let _ = done_tx.send(true);
                        (p, g, r)
                    });
                    held.insert(
                        p,
                        Held {
                            stop,
                            gated,
                            applied,
                            target,
                            serving: false,
                            release_at: None,
                            generation: g,
                            done,
                        },
                    );
                }
            }
            Ok(Polled::Rebalance(Rebalance::Revoked(parts))) => {
                for p in parts.into_iter().filter_map(|p| u32::try_from(p).ok()) {
                    retake.remove(&p);
                    if let Some(h) = held.get_mut(&p) {
                        h.release_at
                            .get_or_insert(tokio::time::Instant::now() + RELEASE_GRACE);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "delivery group membership");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let now = tokio::time::Instant::now();
        held.retain(|p, h| {
            if h.release_at.is_some_and(|t| now >= t) {
                tracing::info!(partition = p, "gave a partition up");
                h.gated.set_active(false);
                directory.serve_partition(*p, None);
                let _ = h.stop.send(true);
                stopping.insert(*p, h.done.clone());
                committed.remove(&(*p as i32));
                changed = true;
                return false;
            }
            true
        });
        for (p, h) in held.iter_mut() {
            if !h.serving && *h.applied.borrow() >= h.target {
                tracing::info!(partition = p, "serving a partition");
                directory
                    .serve_partition(*p, Some((topic.get(*p).durable_end(), h.applied.clone())));
                h.gated.set_active(true);
                h.serving = true;
                changed = true;
                newly_served.push(*p);
            }
        }
        if changed {
            quic.set_owned(
                count,
                held.iter()
                    .filter(|(_, h)| h.serving)
                    .map(|(p, _)| *p)
                    .collect(),
            );
        }
        // What was folded while forwarding was shut (by this worker catching up, or by
        // the last owner stopping) is read again from the inbox, once the gateways know
        // to ask this worker. They also resync when `Owns` shows a partition new here,
        // but a quick release and regain may not show as a change.
        for p in newly_served {
            quic.resync_partition(count, p);
        }
        // The group's offsets are what this worker has folded, stored and shared (the
        // store commits after the shares are durable): the group's lag is honest, and
        // the next owner appends shares only from there.
        let next: std::collections::HashMap<i32, i64> = held
            .iter()
            .filter(|(_, h)| h.serving && h.release_at.is_none())
            .map(|(p, h)| (*p as i32, *h.applied.borrow() as i64))
            .filter(|(p, o)| committed.get(p) != Some(o))
            .collect();
        if !next.is_empty() {
            match member.commit(&next) {
                Ok(()) => committed.extend(next),
                Err(e) => tracing::debug!(error = %e, "cannot commit the group's offsets"),
            }
        }
    };
    let _ = shutdown_tx.send(true);
    for h in held.values() {
        let _ = h.stop.send(true);
    }
    result
}
