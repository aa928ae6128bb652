//! The node's HTTP API: one router. Raft RPCs under /raft, the operator API under /v1,
//! Prometheus under /metrics. Handlers only parse the request, call one service and answer;
//! writes and linearizable reads that reach a follower are forwarded to the leader by the
//! services (once: a forwarded request is never forwarded again).
mod cluster;
mod vms;

use std::sync::Arc;

use axum::extract::{Json, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::cluster::FORWARDED;
use crate::error::ServiceError;
use crate::host::HostCtx;

type Ctx = State<Arc<HostCtx>>;

pub fn router(ctx: Arc<HostCtx>, prometheus: PrometheusHandle) -> Router {
    let metrics = Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(prometheus);
    cluster::router(ctx.clone())
        .merge(vms::router(ctx))
        .merge(metrics)
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "rejected": self.rejected });
        (self.status, Json(body)).into_response()
    }
}

/// Whether another node forwarded this request (it must not be forwarded again).
fn is_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED)
}

async fn render_metrics(State(p): State<PrometheusHandle>) -> String {
    p.render()
}
