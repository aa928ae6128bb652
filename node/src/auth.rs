//! Who is calling and what they may do. A peer node names itself in `x-tern-node` and proves it
//! with its certificate (signed by the cluster CA for that node id, checked in the TLS
//! handshake) and must be a current member. An operator presents a bearer token, found by its
//! hash in the committed access section; its role decides which routes and commands it may use.
//! Everything not listed needs admin: new routes are closed by default.
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rustls::pki_types::CertificateDer;
use tern_consensus::access::{AccessRole, AccessState};
use tern_consensus::network::NODE_HEADER;
use tern_consensus::state::Command;
use tern_consensus::ConsensusNode;

use crate::pki::{cert_names_node, sha256_hex};

/// The client certificate the TLS handshake verified (None: the client presented none).
#[derive(Clone, Debug, Default)]
pub struct PeerCert(pub Option<CertificateDer<'static>>);

/// The authenticated caller of a request (an extension set by `authorize`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A member node, proven by its certificate.
    Node(u64),
    /// An operator, by the name of its API token.
    Operator { name: String, role: AccessRole },
}

impl Principal {
    /// The name the audit trail records.
    pub fn actor(&self) -> String {
        match self {
            Principal::Node(id) => format!("host/{id}"),
            Principal::Operator { name, .. } => name.clone(),
        }
    }

    /// Who the audit trail names for a request that `claimed` to act for someone: a member
    /// node forwards for the operator it authenticated; an operator is only ever itself.
    pub fn actor_for(&self, claimed: Option<String>) -> String {
        match (self, claimed) {
            (Principal::Node(_), Some(c)) => c,
            _ => self.actor(),
        }
    }

    /// Whether this caller may run `command` (nodes may run anything: they act for the cluster
    /// or forward an operator's request they already authorized).
    pub fn may(&self, command: &Command) -> Result<(), AuthError> {
        match self {
            Principal::Node(_) => Ok(()),
            Principal::Operator { role, .. } => {
                let need = command_role(command);
                if role.includes(need) {
                    Ok(())
                } else {
                    Err(AuthError::Forbidden(format!(
                        "this command needs the {need} role; the token has {role}"
                    )))
                }
            }
        }
    }
}

/// What a route needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Anyone: the cluster CA (public), and certifying and joining (the service checks the
    /// join token).
    Public,
    /// A member node only (Raft, load reports, migration prepare).
    Peer,
    /// An operator with at least this role, or a member node.
    Role(AccessRole),
}

/// The least a caller needs for `method path`.
pub fn route_need(method: &Method, path: &str) -> Need {
    if path.starts_with("/raft/") {
        return Need::Peer;
    }
    match (method.as_str(), path) {
        ("GET", "/v1/cluster/ca")
        | ("POST", "/v1/members/certify")
        | ("POST", "/v1/members/join") => Need::Public,
        ("POST", "/v1/load") | ("POST", "/v1/migrations/prepare") => Need::Peer,
        ("GET", _) => Need::Role(AccessRole::Auditor),
        ("POST", "/v1/vms")
        | ("POST", "/v1/migrations")
        | ("POST", "/v1/drs/apply")
        // The command itself is checked again by the handler (`Principal::may`).
        | ("POST", "/v1/write") => Need::Role(AccessRole::Operator),
        ("POST", p) if is_operator_path(p) => Need::Role(AccessRole::Operator),
        _ => Need::Role(AccessRole::Admin),
    }
}

fn is_operator_path(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(
        parts.as_slice(),
        ["v1", "vms", _, "start" | "stop" | "destroy"]
            | ["v1", "tasks", _, "cancel"]
            | ["v1", "hosts", _, "maintenance"]
    )
}

/// The role a command needs through `/v1/write`.
pub fn command_role(command: &Command) -> AccessRole {
    match command {
        Command::CreateVm { .. }
        | Command::SetVmState { .. }
        | Command::DeleteVm { .. }
        | Command::CreateTask { .. }
        | Command::UpdateTask { .. }
        | Command::PutSchedule { .. }
        | Command::DeleteSchedule { .. }
        | Command::SetHostState { .. } => AccessRole::Operator,
        _ => AccessRole::Admin,
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401: no or unknown credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// 403: known caller, not allowed.
    #[error("forbidden: {0}")]
    Forbidden(String),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            AuthError::Unauthenticated(m) => (StatusCode::UNAUTHORIZED, m),
            AuthError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
        };
        let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// What a request presents.
pub struct Credentials<'a> {
    pub cert: Option<&'a CertificateDer<'static>>,
    pub claimed_node: Option<&'a str>,
    pub bearer: Option<&'a str>,
}

impl<'a> Credentials<'a> {
    pub fn from_parts(headers: &'a HeaderMap, peer: Option<&'a PeerCert>) -> Self {
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        Credentials {
            cert: peer.and_then(|p| p.0.as_ref()),
            claimed_node: headers.get(NODE_HEADER).and_then(|v| v.to_str().ok()),
            bearer,
        }
    }
}

/// Decide who the caller is. `is_member(id)`: whether node `id` may talk to this node now.
pub fn authenticate(
    creds: &Credentials<'_>,
    is_member: impl Fn(u64) -> bool,
    access: &AccessState,
    now_ms: u64,
) -> Result<Principal, AuthError> {
    if let Some(claim) = creds.claimed_node {
        let id: u64 = claim
            .parse()
            .map_err(|_| AuthError::Unauthenticated(format!("bad {NODE_HEADER}: {claim:?}")))?;
        let Some(cert) = creds.cert else {
            return Err(AuthError::Unauthenticated(format!(
                "node {id} presented no cluster certificate"
            )));
        };
        if !cert_names_node(cert, id) {
            return Err(AuthError::Unauthenticated(format!(
                "the certificate does not name node {id}"
            )));
        }
        if !is_member(id) {
            return Err(AuthError::Forbidden(format!(
                "node {id} is not a member of this cluster"
            )));
        }
        return Ok(Principal::Node(id));
    }
    let Some(secret) = creds.bearer else {
        return Err(AuthError::Unauthenticated(
            "an API token is required (Authorization: Bearer ...)".into(),
        ));
    };
    match access.token(&sha256_hex(secret.as_bytes()), now_ms) {
        Some(t) => Ok(Principal::Operator {
            name: t.name.clone(),
            role: t.role,
        }),
        None => Err(AuthError::Unauthenticated(
            "unknown, revoked or expired API token".into(),
        )),
    }
}

/// Whether `principal` meets `need` (a `Need::Public` route is checked by its handler).
pub fn permits(principal: &Principal, need: Need) -> Result<(), AuthError> {
    match (principal, need) {
        (_, Need::Public) | (Principal::Node(_), _) => Ok(()),
        (Principal::Operator { .. }, Need::Peer) => Err(AuthError::Forbidden(
            "only member nodes may call this".into(),
        )),
        (Principal::Operator { role, .. }, Need::Role(need)) if role.includes(need) => Ok(()),
        (Principal::Operator { role, .. }, Need::Role(need)) => Err(AuthError::Forbidden(format!(
            "this needs the {need} role; the token has {role}"
        ))),
    }
}

/// Whether node `id` may talk to `node`: a current member (voter or learner). A node with no
/// membership yet (just admitted, waiting for its first append) accepts any node the cluster
/// CA certified: only an admitted node holds such a certificate.
pub fn is_member(node: &ConsensusNode, id: u64) -> bool {
    let metrics = node.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let mut nodes = membership.nodes().peekable();
    nodes.peek().is_none() || membership.get_node(&id).is_some()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Middleware on the whole router: authenticate, check the route's need, and hand the
/// principal to the handler as an extension.
pub async fn authorize(
    State(node): State<ConsensusNode>,
    mut request: Request,
    next: Next,
) -> Response {
    let need = route_need(request.method(), request.uri().path());
    let principal = {
        let creds = Credentials::from_parts(request.headers(), request.extensions().get());
        if need == Need::Public && creds.claimed_node.is_none() && creds.bearer.is_none() {
            None
        } else {
            let access = &node.local_view().state.access;
            match authenticate(&creds, |id| is_member(&node, id), access, now_ms()) {
                Ok(p) => Some(p),
                Err(e) => return e.into_response(),
            }
        }
    };
    if let Some(p) = &principal {
        if let Err(e) = permits(p, need) {
            return e.into_response();
        }
        request.extensions_mut().insert(p.clone());
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use tern_consensus::access::AccessChange;

    fn access_with(name: &str, role: AccessRole, secret: &str) -> AccessState {
        let mut a = AccessState::default();
        a.apply(
            AccessChange::CreateToken {
                name,
                role,
                hash: &sha256_hex(secret.as_bytes()),
                expires_at_ms: None,
            },
            "t",
            1,
        )
        .unwrap();
        a
    }

    fn bearer(secret: &str) -> Credentials<'_> {
        Credentials {
            cert: None,
            claimed_node: None,
            bearer: Some(secret),
        }
    }

    #[test]
    fn no_or_unknown_token_is_401_and_a_known_one_names_its_principal() {
        let access = access_with("alice", AccessRole::Operator, "s3cret");
        let none = Credentials {
            cert: None,
            claimed_node: None,
            bearer: None,
        };
        assert!(matches!(
            authenticate(&none, |_| true, &access, 5),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            authenticate(&bearer("guess"), |_| true, &access, 5),
            Err(AuthError::Unauthenticated(_))
        ));
        let p = authenticate(&bearer("s3cret"), |_| true, &access, 5).unwrap();
        assert_eq!(p.actor(), "alice");
    }

    #[test]
    fn a_node_claim_without_a_matching_certificate_is_refused() {
        let access = AccessState::default();
        let no_cert = Credentials {
            cert: None,
            claimed_node: Some("2"),
            bearer: None,
        };
        assert!(matches!(
            authenticate(&no_cert, |_| true, &access, 0),
            Err(AuthError::Unauthenticated(_))
        ));
        let tls = crate::pki::NodeTls::bootstrap(3, &[]).unwrap();
        let cert = CertificateDer::from_pem_slice(tls.cert_pem.as_bytes()).unwrap();
        let as_other = Credentials {
            cert: Some(&cert),
            claimed_node: Some("2"),
            bearer: None,
        };
        assert!(authenticate(&as_other, |_| true, &access, 0).is_err());
        let honest = Credentials {
            cert: Some(&cert),
            claimed_node: Some("3"),
            bearer: None,
        };
        assert_eq!(
            authenticate(&honest, |_| true, &access, 0),
            Ok(Principal::Node(3))
        );
        assert!(matches!(
            authenticate(&honest, |_| false, &access, 0),
            Err(AuthError::Forbidden(_))
        ));
    }

    #[test]
    fn an_auditor_reads_but_never_writes() {
        let auditor = Principal::Operator {
            name: "a".into(),
            role: AccessRole::Auditor,
        };
        let writes = [
            (Method::POST, "/v1/write"),
            (Method::POST, "/v1/vms"),
            (Method::POST, "/v1/vms/web/destroy"),
            (Method::POST, "/v1/migrations"),
            (Method::POST, "/v1/tasks/3/cancel"),
            (Method::POST, "/v1/hosts/2/maintenance"),
            (Method::POST, "/v1/drs/apply"),
            (Method::POST, "/v1/members/remove"),
            (Method::POST, "/v1/tokens"),
            (Method::POST, "/v1/anything-new"),
            (Method::DELETE, "/v1/vms/web"),
            (Method::POST, "/raft/append"),
            (Method::POST, "/v1/load"),
        ];
        for (m, p) in writes {
            assert!(
                matches!(
                    permits(&auditor, route_need(&m, p)),
                    Err(AuthError::Forbidden(_))
                ),
                "{m} {p}"
            );
        }
        for p in ["/v1/state", "/v1/status", "/v1/hosts", "/metrics"] {
            assert_eq!(
                permits(&auditor, route_need(&Method::GET, p)),
                Ok(()),
                "{p}"
            );
        }
    }

    #[test]
    fn an_operator_runs_vms_but_not_the_cluster() {
        let op = Principal::Operator {
            name: "o".into(),
            role: AccessRole::Operator,
        };
        assert_eq!(
            permits(&op, route_need(&Method::POST, "/v1/vms/web/stop")),
            Ok(())
        );
        assert!(permits(&op, route_need(&Method::POST, "/v1/members/remove")).is_err());
        assert!(permits(&op, route_need(&Method::POST, "/raft/vote")).is_err());
        assert!(op.may(&Command::DeleteVm { vm: "web".into() }).is_ok());
        assert!(op.may(&Command::RemoveHost { id: 2 }).is_err());
        assert!(op
            .may(&Command::RevokeToken {
                name: "admin".into()
            })
            .is_err());
        assert!(Principal::Node(1)
            .may(&Command::RemoveHost { id: 2 })
            .is_ok());
    }
}
