//! Logs and traces: `tracing` to stderr (text or JSON lines, filtered by `HERALD_LOG`),
//! and, with an OTLP endpoint, the same spans exported to an OpenTelemetry collector.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What the spans exported over OTLP are, unless `HERALD_OTLP_FILTER` says otherwise:
/// herald's per-push, per-entry and per-connection spans (debug level) and everything
/// at info.
const OTLP_FILTER: &str = "info,herald_ingest=debug,herald_delivery=debug,herald_gateway=debug";

/// Keeps the OTLP exporter alive; dropping it sends what is still buffered.
pub struct Tracing {
    otel: Option<SdkTracerProvider>,
}

impl Drop for Tracing {
    fn drop(&mut self) {
        if let Some(provider) = self.otel.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("herald: the last traces could not be sent: {e}");
        }
    }
}

/// The OTLP/HTTP traces URL of `endpoint` (a collector's base URL, as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is given, or the full `/v1/traces` URL).
fn traces_url(endpoint: &str) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/v1/traces")
    }
}

/// Starts logging in `format`, and exporting spans to `otlp_endpoint` (OTLP over HTTP
/// with protobuf) if one is given.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Tracing> {
    let filter = EnvFilter::try_from_env("HERALD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn,scylla=warn"));
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.trim().is_empty()) else {
        // One filter for the whole subscriber. (`EnvFilter` as a per-layer filter was
        // seen to drop some info lines when a directive enabled debug for another
        // target, so it is a per-layer filter only where it must be: beside OTLP.)
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let registry = tracing_subscriber::registry().with(filter);
        match format {
            LogFormat::Text => registry.with(fmt).init(),
            LogFormat::Json => registry.with(fmt.json()).init(),
        }
        return Ok(Tracing { otel: None });
    };
    let url = traces_url(endpoint);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(&url)
        .build()
        .with_context(|| format!("cannot export traces to {url} (otlp_endpoint)"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("herald").build())
        .build();
    let otel_filter = EnvFilter::try_from_env("HERALD_OTLP_FILTER")
        .unwrap_or_else(|_| EnvFilter::new(OTLP_FILTER));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("herald"))
        .with_filter(otel_filter);
    // The log lines and the exported spans have filters of their own.
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    }
    .with_filter(filter);
    tracing_subscriber::registry().with(fmt).with(otel).init();
    let provider = Some(provider);
    Ok(Tracing { otel: provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_is_the_endpoint_and_v1_traces() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
