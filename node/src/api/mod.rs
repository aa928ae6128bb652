//! The node's HTTP API: one router. Raft RPCs under /raft, the operator API under /v1,
//! Prometheus under /metrics. Handlers only parse the request, call one service and answer;
//! writes and linearizable reads that reach a follower are forwarded to the leader by the
//! services (once: a forwarded request is never forwarded again).
mod access;
mod cluster;
mod vms;

use std::sync::Arc;

use axum::extract::{Json, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::access::Access;
use crate::cluster::FORWARDED;
use crate::error::ServiceError;
use crate::host::HostCtx;
use crate::pki::NodeTls;

type Ctx = State<Arc<HostCtx>>;

/// Every route; the caller layers `auth::authorize` over it (no route is served without it).
pub fn router(ctx: Arc<HostCtx>, prometheus: PrometheusHandle, tls: Arc<NodeTls>) -> Router {
    let metrics = Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(prometheus);
    let trust = Access {
        cluster: ctx.cluster.clone(),
        tls,
    };
    cluster::router(ctx.clone())
        .merge(vms::router(ctx))
        .merge(access::router(trust))
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
