//! `herald replay`: streams the event log as JSON lines. (Being written.)

/// Arguments of `herald replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {}

/// Runs `herald replay`.
pub fn run(_args: ReplayArgs) -> anyhow::Result<()> {
    anyhow::bail!("herald replay is not implemented yet")
}
