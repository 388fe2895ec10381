//! Admin routes beyond app creation: reading the log (`herald replay` uses these).
//! (Being written.)

use std::sync::Arc;

use axum::Router;

use crate::Ingest;

/// The admin routes, merged into the API router.
pub fn routes() -> Router<Arc<Ingest>> {
    Router::new()
}
