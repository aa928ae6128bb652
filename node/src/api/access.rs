//! Trust routes: the cluster CA (public), join tokens, operators' tokens, and the admission of
//! a joining node (`/v1/members/certify`, public: the handler's service checks the join token).
use axum::extract::{Json, Path, State};
use axum::routing::{get, post};
use axum::{Extension, Router};
use tern_consensus::access::ApiToken;

use crate::access::{
    self, Access, CaReply, CertifyBody, CertifyReply, CreateTokenBody, CreateTokenReply,
    JoinTokenBody, JoinTokenReply,
};
use crate::auth::Principal;
use crate::error::ServiceError;

pub(super) fn router(a: Access) -> Router {
    Router::new()
        .route("/v1/cluster/ca", get(cluster_ca))
        .route("/v1/cluster/join-token", post(create_join_token))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}/revoke", post(revoke_token))
        .route("/v1/members/certify", post(certify))
        .with_state(a)
}

async fn cluster_ca(State(a): State<Access>) -> Result<Json<CaReply>, ServiceError> {
    Ok(Json(access::cluster_ca(&a)?))
}

async fn create_join_token(
    State(a): State<Access>,
    Extension(who): Extension<Principal>,
    Json(body): Json<JoinTokenBody>,
) -> Result<Json<JoinTokenReply>, ServiceError> {
    Ok(Json(access::create_join_token(&a, &who, body).await?))
}

async fn create_token(
    State(a): State<Access>,
    Extension(who): Extension<Principal>,
    Json(body): Json<CreateTokenBody>,
) -> Result<Json<CreateTokenReply>, ServiceError> {
    Ok(Json(access::create_token(&a, &who, body).await?))
}

async fn list_tokens(State(a): State<Access>) -> Json<Vec<ApiToken>> {
    Json(access::list_tokens(&a))
}

async fn revoke_token(
    State(a): State<Access>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    Ok(Json(access::revoke_token(&a, &who, name).await?))
}

async fn certify(
    State(a): State<Access>,
    Json(body): Json<CertifyBody>,
) -> Result<Json<CertifyReply>, ServiceError> {
    Ok(Json(access::certify(&a, body)?))
}
