//! Who may act on the cluster: operators' API tokens with their roles, and the join tokens a
//! new host presents. Only hashes are kept (the secrets are shown once, to whoever created
//! them); checking a presented secret means hashing it and looking the hash up here.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::CommandError;

/// What an operator's token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessRole {
    /// Read only.
    Auditor,
    /// VMs, migrations, maintenance, DRS apply, schedules.
    Operator,
    /// Everything, including tokens, join tokens, cluster settings and membership.
    Admin,
}

impl AccessRole {
    /// Whether this role includes everything `other` may do (admin > operator > auditor).
    pub fn includes(self, other: AccessRole) -> bool {
        self >= other
    }
}

impl std::str::FromStr for AccessRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(AccessRole::Admin),
            "operator" => Ok(AccessRole::Operator),
            "auditor" => Ok(AccessRole::Auditor),
            other => Err(format!(
                "unknown role {other:?} (admin, operator or auditor)"
            )),
        }
    }
}

impl std::fmt::Display for AccessRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccessRole::Admin => "admin",
            AccessRole::Operator => "operator",
            AccessRole::Auditor => "auditor",
        })
    }
}

/// An operator's API token. `name` is the principal the audit trail records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub name: String,
    pub role: AccessRole,
    /// Hex SHA-256 of the secret; cleared when the state is shown through the API.
    pub hash: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: Option<u64>,
}

/// A token that lets one or more new hosts join until it expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: u64,
}

/// The access section of `ClusterState`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessState {
    /// By name.
    pub tokens: BTreeMap<String, ApiToken>,
    /// Token hash -> name, so a presented token is found in O(log n).
    pub token_names: BTreeMap<String, String>,
    /// Join token hash -> token.
    pub join_tokens: BTreeMap<String, JoinToken>,
}

/// Changes to the access section (variants of `Command`, applied through `AccessState::apply`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessChange<'a> {
    CreateToken {
        name: &'a str,
        role: AccessRole,
        hash: &'a str,
        expires_at_ms: Option<u64>,
    },
    RevokeToken {
        name: &'a str,
    },
    CreateJoinToken {
        hash: &'a str,
        expires_at_ms: u64,
    },
}

fn invalid(reason: impl Into<String>) -> CommandError {
    CommandError::Invalid {
        reason: reason.into(),
    }
}

fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

impl AccessState {
    /// Validate and apply one change; on error nothing changed.
    pub fn apply(
        &mut self,
        change: AccessChange<'_>,
        actor: &str,
        at_ms: u64,
    ) -> Result<(), CommandError> {
        match change {
            AccessChange::CreateToken {
                name,
                role,
                hash,
                expires_at_ms,
            } => {
                if name.is_empty()
                    || name.len() > 64
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
                {
                    return Err(invalid(
                        "a token name is 1-64 characters of letters, digits, - _ . @",
                    ));
                }
                if !valid_hash(hash) {
                    return Err(invalid("a token hash is 64 hex digits"));
                }
                if self.tokens.contains_key(name) {
                    return Err(invalid(format!("token {name:?} already exists")));
                }
                if self.token_names.contains_key(hash) {
                    return Err(invalid("a token with that secret already exists"));
                }
                self.token_names.insert(hash.to_string(), name.to_string());
                self.tokens.insert(
                    name.to_string(),
                    ApiToken {
                        name: name.to_string(),
                        role,
                        hash: hash.to_string(),
                        created_at_ms: at_ms,
                        created_by: actor.to_string(),
                        expires_at_ms,
                    },
                );
            }
            AccessChange::RevokeToken { name } => {
                let token = self
                    .tokens
                    .remove(name)
                    .ok_or_else(|| invalid(format!("no token {name:?}")))?;
                self.token_names.remove(&token.hash);
            }
            AccessChange::CreateJoinToken {
                hash,
                expires_at_ms,
            } => {
                if !valid_hash(hash) {
                    return Err(invalid("a join token hash is 64 hex digits"));
                }
                if expires_at_ms <= at_ms {
                    return Err(invalid("a join token must expire in the future"));
                }
                // Expired join tokens are dropped here, so they never pile up.
                self.join_tokens.retain(|_, t| t.expires_at_ms > at_ms);
                self.join_tokens.insert(
                    hash.to_string(),
                    JoinToken {
                        created_at_ms: at_ms,
                        created_by: actor.to_string(),
                        expires_at_ms,
                    },
                );
            }
        }
        Ok(())
    }

    /// The unexpired token whose secret hashes to `hash`.
    pub fn token(&self, hash: &str, now_ms: u64) -> Option<&ApiToken> {
        let token = self.tokens.get(self.token_names.get(hash)?)?;
        match token.expires_at_ms {
            Some(at) if at <= now_ms => None,
            _ => Some(token),
        }
    }

    /// Whether `hash` is an unexpired join token.
    pub fn join_token_valid(&self, hash: &str, now_ms: u64) -> bool {
        self.join_tokens
            .get(hash)
            .is_some_and(|t| t.expires_at_ms > now_ms)
    }

    /// The section with every secret's hash removed, for showing through the API.
    pub fn redacted(&self) -> AccessState {
        let mut shown = self.clone();
        shown.token_names.clear();
        shown.join_tokens.clear();
        for t in shown.tokens.values_mut() {
            t.hash.clear();
        }
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const H2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn create(s: &mut AccessState, name: &str, hash: &str) -> Result<(), CommandError> {
        s.apply(
            AccessChange::CreateToken {
                name,
                role: AccessRole::Operator,
                hash,
                expires_at_ms: Some(1_000),
            },
            "admin",
            10,
        )
    }

    #[test]
    fn a_token_is_found_by_its_hash_until_it_expires_or_is_revoked() {
        let mut s = AccessState::default();
        create(&mut s, "alice", H1).unwrap();
        let t = s.token(H1, 999).unwrap();
        assert_eq!((t.name.as_str(), t.role), ("alice", AccessRole::Operator));
        assert_eq!(t.created_by, "admin");
        assert!(s.token(H1, 1_000).is_none(), "expired");
        assert!(s.token(H2, 0).is_none(), "unknown secret");
        s.apply(AccessChange::RevokeToken { name: "alice" }, "admin", 20)
            .unwrap();
        assert!(s.token(H1, 0).is_none());
        assert!(s.token_names.is_empty());
    }

    #[test]
    fn bad_token_changes_are_refused_and_change_nothing() {
        let mut s = AccessState::default();
        create(&mut s, "alice", H1).unwrap();
        let before = s.clone();
        assert!(create(&mut s, "alice", H2).is_err(), "duplicate name");
        assert!(create(&mut s, "bob", H1).is_err(), "duplicate secret");
        assert!(create(&mut s, "", H2).is_err(), "empty name");
        assert!(create(&mut s, "a b", H2).is_err(), "space in name");
        assert!(create(&mut s, "bob", "abc").is_err(), "not a hash");
        assert!(s
            .apply(AccessChange::RevokeToken { name: "bob" }, "x", 1)
            .is_err());
        assert!(s
            .apply(
                AccessChange::CreateJoinToken {
                    hash: H2,
                    expires_at_ms: 5
                },
                "x",
                5
            )
            .is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn join_tokens_expire_and_expired_ones_are_dropped() {
        let mut s = AccessState::default();
        let join = |s: &mut AccessState, hash, exp, at| {
            s.apply(
                AccessChange::CreateJoinToken {
                    hash,
                    expires_at_ms: exp,
                },
                "admin",
                at,
            )
        };
        join(&mut s, H1, 100, 0).unwrap();
        assert!(s.join_token_valid(H1, 99));
        assert!(!s.join_token_valid(H1, 100));
        assert!(!s.join_token_valid(H2, 0));
        join(&mut s, H2, 300, 200).unwrap();
        assert_eq!(s.join_tokens.len(), 1, "the expired one was dropped");
    }

    #[test]
    fn redaction_removes_every_hash() {
        let mut s = AccessState::default();
        create(&mut s, "alice", H1).unwrap();
        let shown = s.redacted();
        assert_eq!(shown.tokens["alice"].hash, "");
        assert!(shown.token_names.is_empty() && shown.join_tokens.is_empty());
        let text = serde_json::to_string(&shown).unwrap();
        assert!(!text.contains(H1));
    }

    #[test]
    fn roles_are_ordered() {
        assert!(AccessRole::Admin.includes(AccessRole::Operator));
        assert!(AccessRole::Operator.includes(AccessRole::Auditor));
        assert!(!AccessRole::Auditor.includes(AccessRole::Operator));
        assert!(!AccessRole::Operator.includes(AccessRole::Admin));
        assert_eq!("operator".parse::<AccessRole>(), Ok(AccessRole::Operator));
        assert!("root".parse::<AccessRole>().is_err());
    }
}
