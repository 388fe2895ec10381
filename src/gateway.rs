//! `herald gateway`: a gateway in its own process. It holds device connections and
//! reaches the rest of herald over the QUIC link (`herald_gateway::link`): devices are
//! authenticated and backlogs read through a linked delivery worker, and its events are
//! appended through it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use herald_gateway::link::{LinkLimits, LinkServer, LinkTls};
use herald_gateway::{Gateway, Hub};
use herald_ingest::health::Health;
use tokio::sync::watch;

use crate::config::Config;
use crate::serve::{DeviceListeners, gateway_config, shutdown_signal};

/// Runs until Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let certs = config.link_certs.as_deref().context(
        "herald gateway needs link_certs (--link-certs): the directory `herald certs` wrote",
    )?;
    let fds = crate::serve::fd_budget(&config, true)?;
    let hub = Arc::new(Hub::default());
    let link = LinkServer::bind(
        config.link_addr,
        &LinkTls::in_dir(certs, "gateway"),
        hub.clone(),
        config.gateway_id.clone(),
        LinkLimits {
            caps: herald_net::Caps {
                max_connections: config.link_max_connections,
                max_unauthenticated: config.link_max_handshakes,
                max_unauthenticated_per_source: config.link_max_handshakes_per_source,
            },
            handshake_timeout: Duration::from_secs(config.connect_timeout_s),
        },
    )
    .with_context(|| {
        format!(
            "cannot listen for the link on {} (link_addr)",
            config.link_addr
        )
    })?;
    let gateway = Gateway::new(
        gateway_config(&config, &fds)?,
        hub,
        link.directory(),
        link.log(),
    );
    let devices = DeviceListeners::bind(&config).await?;
    let (shutdown_tx, shutdown) = watch::channel(false);
    // Ready when its listeners accept and a delivery worker is linked (devices are
    // authenticated through one).
    let health = Health::new(None, None);
    health.listener(gateway.gate().clone());
    health.listener(link.gate().clone());
    let linked = link.clone();
    health.check(
        "link",
        Box::new(move || match linked.linked() {
            0 => Err("no delivery worker is linked".into()),
            n => Ok(format!("{n} delivery workers linked")),
        }),
    );
    crate::serve::serve_metrics(&config, &fds, &health, shutdown.clone()).await?;
    tracing::info!(
        devices = %devices.describe(&config), link = %link.local_addr()?, gateway_id = %config.gateway_id,
        "herald gateway serving"
    );

    let link_task = tokio::spawn(link.clone().serve(shutdown.clone()));
    let gateway_task = devices.serve(gateway, shutdown);
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = gateway_task.await;
        let _ = link_task.await;
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}
