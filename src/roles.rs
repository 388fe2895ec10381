//! One role per process, all on the same Kafka topic (a herald built with `--features
//! kafka`): `herald ingest` (the REST API), `herald deliver` (delivery workers: one active,
//! the others standing by, chosen by a Kafka consumer group), `herald nav` (navigation).
//! Gateways are `herald gateway` processes (see `gateway.rs`).
//!
//! Every role process keeps the projections it reads in its own data dir, folded from the
//! one-partition topic: one total order, so every process's fold is the same and a
//! standby that takes over numbers every entry exactly as the worker it replaces.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use herald_delivery::directory::StoreDirectory;
use herald_delivery::link::{Gated, Link, NoLink};
use herald_delivery::quic::{QuicLink, QuicLinkConfig};
use herald_delivery::worker::Worker;
use herald_eventlog::EventLog;
use herald_eventlog::kafka::{KafkaConfig, OrderedKafkaLog, Polled, Rebalance};
use herald_gateway::link::LinkTls;
use herald_ingest::Ingest;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::serve::{Secrets, ingest_config, load_secrets, open_store, shutdown_signal};

/// The consumer group whose one member holding partition 0 is the active worker.
pub const DELIVER_GROUP: &str = "herald-deliver";

/// How long an active worker keeps its links after its partition was revoked, waiting to
/// be given it back in the same rebalance.
const RELEASE_GRACE: Duration = Duration::from_secs(3);

async fn open_kafka(config: &Config) -> anyhow::Result<Arc<OrderedKafkaLog>> {
    let Some(brokers) = &config.kafka_brokers else {
        bail!(
            "the roles share one log on Kafka: set kafka_brokers (--kafka-brokers, HERALD_KAFKA_BROKERS)"
        );
    };
    let mut k = KafkaConfig::new(brokers.clone());
    k.topic.clone_from(&config.kafka_topic);
    k.replication_factor = config.kafka_replication;
    k.timeout = Duration::from_millis(config.kafka_timeout_ms);
    OrderedKafkaLog::open(k)
        .await
        .with_context(|| format!("cannot open the event log on Kafka at {brokers}"))
}

/// Runs `serve_http` and the follower `worker` until a signal or a failure.
async fn run_until_signal(
    worker: Worker,
    http: Option<(TcpListener, axum::Router)>,
    shutdown_tx: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let shutdown = shutdown_tx.subscribe();
    let mut worker_task = tokio::spawn(worker.run(shutdown.clone()));
    let http_task = http.map(|(listener, router)| {
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    });
    let result = tokio::select! {
        _ = shutdown_signal() => { tracing::info!("shutting down"); Ok(()) }
        r = &mut worker_task => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("the log follower stopped unexpectedly")),
            Ok(Err(e)) => Err(anyhow::anyhow!("the log follower failed: {e}")),
            Err(e) => Err(anyhow::anyhow!("the log follower panicked: {e}")),
        },
    };
    let _ = shutdown_tx.send(true);
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    result
}

/// What `herald ingest` and `herald nav` share: the log, their own projections folded
/// by a follower, the API state (with navigation following the heartbeats), and the
/// HTTP listener.
async fn api_process(
    config: &Config,
) -> anyhow::Result<(Worker, Arc<Ingest>, watch::Sender<bool>, TcpListener)> {
    let Secrets {
        admin_token,
        keyring,
        jwt_secret,
    } = load_secrets(config, true)?;
    let kafka = open_kafka(config).await?;
    let log: Arc<dyn EventLog> = kafka.clone();
    let (_db, store) = open_store(config, &log)?;
    let worker = Worker::new(
        log.clone(),
        store.clone(),
        Arc::new(NoLink),
        keyring.clone(),
    )?;
    let ingest = Ingest::new(
        ingest_config(config, admin_token),
        log.clone(),
        store,
        worker.applied(),
        keyring,
        jwt_secret.as_bytes(),
    );
    let (shutdown_tx, shutdown) = watch::channel(false);
    follow_navigation(&ingest, log, shutdown);
    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (http_addr)", config.http_addr))?;
    Ok((worker, ingest, shutdown_tx, http))
}

/// `herald ingest`: the REST API. Appends to Kafka; reads its own projections.
pub async fn ingest(config: Config) -> anyhow::Result<()> {
    let (worker, ingest, shutdown_tx, http) = api_process(&config).await?;
    tracing::info!(http = %http.local_addr()?, topic = %config.kafka_topic, "herald ingest serving");
    run_until_signal(
        worker,
        Some((http, herald_ingest::router(ingest))),
        shutdown_tx,
    )
    .await
}

/// `herald nav`: `GET /v1/nav` alone, from the gateways' heartbeats in the log.
pub async fn nav(config: Config) -> anyhow::Result<()> {
    let (worker, ingest, shutdown_tx, http) = api_process(&config).await?;
    tracing::info!(http = %http.local_addr()?, "herald nav serving");
    run_until_signal(
        worker,
        Some((http, herald_ingest::nav_router(ingest))),
        shutdown_tx,
    )
    .await
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

/// `herald deliver`: folds the log and, while it is the group's active worker, links to
/// the gateways, forwards new entries and answers their requests.
pub async fn deliver(config: Config) -> anyhow::Result<()> {
    let Secrets { keyring, .. } = load_secrets(&config, true)?;
    if config.link_gateways.is_empty() {
        bail!("herald deliver needs the gateways to link to: link_gateways (--link-gateway)");
    }
    let certs = config
        .link_certs
        .clone()
        .context("herald deliver needs link_certs (--link-certs)")?;
    let kafka = open_kafka(&config).await?;
    let log: Arc<dyn EventLog> = kafka.clone();
    let (_db, store) = open_store(&config, &log)?;
    let gateway_list = config.link_gateways.clone();
    let quic = QuicLink::new(QuicLinkConfig {
        gateways: config.link_gateways.clone(),
        tls: LinkTls::in_dir(&certs, "worker"),
        worker_id: format!("deliver:{}", std::process::id()),
    })
    .context("cannot set up the link to the gateways")?;
    let gated = Arc::new(Gated::new(quic.clone() as Arc<dyn Link>));
    let worker = Worker::new(log.clone(), store.clone(), gated.clone(), keyring.clone())?;
    let directory = Arc::new(
        StoreDirectory::new(store, keyring)
            .with_freshness(log.durable_end(), worker.applied())
            .waiting_for_registrations(),
    );
    let (shutdown_tx, shutdown) = watch::channel(false);
    let stop = shutdown.clone();
    let mut applied = worker.applied();
    let kafka_for_group = kafka.clone();
    tokio::spawn(async move {
        // Join the group only once this worker has folded the log as it stands: a worker
        // that took over with a stale store would refuse devices it does not know yet.
        let target = *log.durable_end().borrow();
        tracing::info!(
            target,
            "catching up with the log before joining the delivery group"
        );
        if applied.wait_for(|a| *a >= target).await.is_err() {
            return;
        }
        let member = match kafka_for_group.kafka().membership(DELIVER_GROUP) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot join the delivery workers' group");
                return;
            }
        };
        tracing::info!(gateways = ?gateway_list, "herald deliver standing by");
        // While this member holds partition 0 it is the active worker. A revocation is
        // acted on only if the partition is not given back within RELEASE_GRACE: every
        // member joining or leaving revokes and reassigns (eager protocol), and the same
        // member usually gets it back; relinking every gateway each time would make every
        // session reread its inbox for nothing.
        let mut active: Option<watch::Sender<bool>> = None;
        let mut release_at: Option<tokio::time::Instant> = None;
        let mut committed = None;
        loop {
            if *stop.borrow() {
                break;
            }
            match member.poll(16, Duration::from_millis(200)).await {
                Ok(Polled::Rebalance(Rebalance::Assigned(p))) if p.contains(&0) => {
                    release_at = None;
                    if active.is_none() {
                        tracing::info!(
                            "this worker is now the active one: linking to the gateways"
                        );
                        let (tx, rx) = watch::channel(false);
                        gated.set_active(true);
                        quic.run(directory.clone(), log.clone(), rx);
                        active = Some(tx);
                    }
                }
                Ok(Polled::Rebalance(Rebalance::Revoked(p))) if p.contains(&0) => {
                    if active.is_some() && release_at.is_none() {
                        release_at = Some(tokio::time::Instant::now() + RELEASE_GRACE);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "delivery group membership");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            // The group's offset is what the active worker has folded and stored (the
            // store commits before `applied` moves): the group's lag is honest.
            if active.is_some() {
                let done = *applied.borrow();
                if committed != Some(done) {
                    let next = std::collections::HashMap::from([(0, done as i64)]);
                    match member.commit(&next) {
                        Ok(()) => committed = Some(done),
                        Err(e) => tracing::debug!(error = %e, "cannot commit the group's offset"),
                    }
                }
            }
            if release_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
                release_at = None;
                if let Some(tx) = active.take() {
                    tracing::info!("this worker stands by again: unlinking");
                    gated.set_active(false);
                    let _ = tx.send(true);
                }
            }
        }
        if let Some(tx) = active {
            let _ = tx.send(true);
        }
    });
    run_until_signal(worker, None, shutdown_tx).await
}
