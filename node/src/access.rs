//! Trust services: operators' tokens, join tokens, the cluster CA and the admission of a new
//! node (a join token and a CSR in, a certificate naming the node out). Secrets are returned
//! once, when created; the state keeps only their hashes.
use std::sync::Arc;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tern_consensus::access::{AccessRole, ApiToken};
use tern_consensus::state::Command;

use crate::auth::Principal;
use crate::cluster::{now_ms, Cluster};
use crate::error::ServiceError;
use crate::pki::{fingerprint, random_secret, sha256_hex, NodeTls};

/// What the trust services need: the cluster client and this node's identity (the CA).
#[derive(Clone)]
pub struct Access {
    pub cluster: Cluster,
    pub tls: Arc<NodeTls>,
}

fn err(status: StatusCode, message: impl Into<String>) -> ServiceError {
    ServiceError::new(status, message)
}

/// A join token as handed to a joining node: its secret and the fingerprint of the cluster CA,
/// which the joiner checks before trusting the CA it fetches.
pub struct JoinToken {
    pub secret: String,
    pub ca_fingerprint: String,
}

impl JoinToken {
    pub fn parse(text: &str) -> Result<JoinToken, String> {
        let (secret, fp) = text
            .trim()
            .split_once('.')
            .ok_or("a join token is SECRET.CA_FINGERPRINT")?;
        let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64(secret) || !hex64(fp) {
            return Err("a join token is two groups of 64 hex digits joined by '.'".into());
        }
        Ok(JoinToken {
            secret: secret.to_string(),
            ca_fingerprint: fp.to_lowercase(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.secret, self.ca_fingerprint)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CaReply {
    pub ca: String,
    pub fingerprint: String,
}

/// The cluster CA certificate (public: a joiner checks it against its join token).
pub fn cluster_ca(a: &Access) -> Result<CaReply, ServiceError> {
    let fp = fingerprint(&a.tls.ca.cert_pem).map_err(|e| ServiceError::internal(e.to_string()))?;
    Ok(CaReply {
        ca: a.tls.ca.cert_pem.clone(),
        fingerprint: fp,
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinTokenBody {
    /// Seconds the token stays valid (default one hour).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinTokenReply {
    pub token: String,
    pub expires_at_ms: u64,
}

/// A new join token, committed (hash only) before it is returned.
pub async fn create_join_token(
    a: &Access,
    who: &Principal,
    body: JoinTokenBody,
) -> Result<JoinTokenReply, ServiceError> {
    let ttl_s = body.ttl_s.unwrap_or(3600).clamp(1, 30 * 86_400);
    let token = JoinToken {
        secret: random_secret(),
        ca_fingerprint: cluster_ca(a)?.fingerprint,
    };
    let expires_at_ms = now_ms() + ttl_s * 1000;
    a.cluster
        .propose(
            who.actor(),
            None,
            Command::CreateJoinToken {
                hash: sha256_hex(token.secret.as_bytes()),
                expires_at_ms,
            },
            false,
        )
        .await?;
    Ok(JoinTokenReply {
        token: token.to_string(),
        expires_at_ms,
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateTokenBody {
    pub name: String,
    pub role: AccessRole,
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateTokenReply {
    pub name: String,
    pub role: AccessRole,
    /// Shown once; only its hash is kept.
    pub token: String,
    pub expires_at_ms: Option<u64>,
}

/// A new operator token's secret: recognisable in a config file or a leaked log.
pub fn new_api_secret() -> String {
    format!("tern_{}", random_secret())
}

/// A new operator token, committed (hash only) before its secret is returned.
pub async fn create_token(
    a: &Access,
    who: &Principal,
    body: CreateTokenBody,
) -> Result<CreateTokenReply, ServiceError> {
    let secret = new_api_secret();
    let expires_at_ms = body
        .expires_in_s
        .map(|s| now_ms().saturating_add(s.saturating_mul(1000)));
    a.cluster
        .propose(
            who.actor(),
            None,
            Command::CreateToken {
                name: body.name.clone(),
                role: body.role,
                hash: sha256_hex(secret.as_bytes()),
                expires_at_ms,
            },
            false,
        )
        .await?;
    Ok(CreateTokenReply {
        name: body.name,
        role: body.role,
        token: secret,
        expires_at_ms,
    })
}

/// The tokens (names, roles, expiry; hashes removed).
pub fn list_tokens(a: &Access) -> Vec<ApiToken> {
    let view = a.cluster.node.local_view();
    view.state.access.redacted().tokens.into_values().collect()
}

pub async fn revoke_token(
    a: &Access,
    who: &Principal,
    name: String,
) -> Result<serde_json::Value, ServiceError> {
    a.cluster
        .propose(
            who.actor(),
            None,
            Command::RevokeToken { name: name.clone() },
            false,
        )
        .await?;
    Ok(serde_json::json!({ "revoked": name }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyBody {
    pub id: u64,
    /// Addresses (host:port) the node is reached at; its certificate names their hosts.
    pub addrs: Vec<String>,
    pub csr: String,
    pub join_token: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyReply {
    pub cert: String,
    pub ca: String,
    pub ca_key: String,
}

/// Admit a node: with a valid join token, sign its CSR for the node id it asks for, unless
/// that id is already a member (a join token cannot be used to impersonate a member).
pub fn certify(a: &Access, body: CertifyBody) -> Result<CertifyReply, ServiceError> {
    check_join_token(&a.cluster, &body.join_token)?;
    let metrics = a.cluster.node.raft.metrics().borrow().clone();
    if metrics
        .membership_config
        .membership()
        .get_node(&body.id)
        .is_some()
    {
        return Err(err(
            StatusCode::CONFLICT,
            format!("node {} is already a member", body.id),
        ));
    }
    if body.addrs.is_empty() || body.addrs.len() > 4 {
        return Err(err(StatusCode::BAD_REQUEST, "give 1 to 4 addresses"));
    }
    let hosts: Vec<String> = body.addrs.iter().map(|a| crate::pki::host_of(a)).collect();
    let cert = a
        .tls
        .ca
        .issue_node_cert(&body.csr, body.id, &hosts)
        .map_err(|e| err(StatusCode::BAD_REQUEST, format!("csr: {e}")))?;
    tracing::info!(id = body.id, "certified a joining node");
    Ok(CertifyReply {
        cert,
        ca: a.tls.ca.cert_pem.clone(),
        ca_key: a.tls.ca.key_pem().to_string(),
    })
}

/// A presented join token must be committed and unexpired (401 otherwise).
pub fn check_join_token(cluster: &Cluster, presented: &str) -> Result<(), ServiceError> {
    let unauthorized = |m: &str| err(StatusCode::UNAUTHORIZED, m);
    let token = JoinToken::parse(presented).map_err(|e| unauthorized(&e))?;
    let view = cluster.node.local_view();
    if view
        .state
        .access
        .join_token_valid(&sha256_hex(token.secret.as_bytes()), now_ms())
    {
        Ok(())
    } else {
        Err(unauthorized("unknown or expired join token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_parse_and_print_back() {
        let text = format!("{}.{}", "a".repeat(64), "B".repeat(64));
        let t = JoinToken::parse(&text).unwrap();
        assert_eq!(t.secret, "a".repeat(64));
        assert_eq!(t.ca_fingerprint, "b".repeat(64));
        for bad in [
            "",
            "abc",
            &"a".repeat(129),
            &format!("{}.zz", "a".repeat(64)),
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
    }
}
