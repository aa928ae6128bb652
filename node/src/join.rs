//! How a node gets its identity. A bootstrapping node creates the cluster CA, its own
//! certificate and an admin token (written as an operator config for whoever started it). A
//! joining node presents a join token: it fetches the cluster CA and checks it against the
//! fingerprint the token carries, has its CSR signed (`/v1/members/certify`), and then asks to
//! be added (`/v1/members/join`), first as a learner, as a voter once caught up.
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tern_consensus::access::AccessRole;
use tern_consensus::state::Command;

use crate::access::{new_api_secret, CaReply, CertifyBody, CertifyReply, JoinToken};
use crate::client::{admin_config_path, default_path, url, OperatorConfig};
use crate::cluster::Cluster;
use crate::members::JoinBody;
use crate::pki::{
    fingerprint, node_key_and_csr, operator_client_config, sha256_hex, ClusterCa,
    FetchOnlyVerifier, NodeTls,
};
use crate::NodeConfig;

/// This node's TLS identity, created on first start; with the admin token's secret when this
/// start created a new cluster.
pub async fn identity(
    cfg: &NodeConfig,
    addrs: &[String],
) -> anyhow::Result<(NodeTls, Option<String>)> {
    if let Some(tls) = NodeTls::load(&cfg.data, cfg.id)? {
        return Ok((tls, None));
    }
    if cfg.bootstrap {
        let hosts: Vec<String> = addrs.iter().map(|a| crate::pki::host_of(a)).collect();
        let tls = NodeTls::bootstrap(cfg.id, &hosts)?;
        tls.save(&cfg.data)?;
        let secret = new_api_secret();
        write_admin_config(
            &cfg.data,
            &addrs[addrs.len() - 1],
            &secret,
            &tls.ca.cert_pem,
        )?;
        return Ok((tls, Some(secret)));
    }
    let (Some(seed), Some(token)) = (&cfg.join, &cfg.join_token) else {
        anyhow::bail!("a new node needs --bootstrap, or --join ADDR with --join-token");
    };
    let token = JoinToken::parse(token).map_err(|e| anyhow::anyhow!("--join-token: {e}"))?;
    let mut delay = Duration::from_millis(200);
    loop {
        match certify(seed, cfg.id, addrs, &token, &cfg.data).await {
            Ok(tls) => return Ok((tls, None)),
            Err(e) => tracing::warn!("certifying through {seed}: {e:#}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The admin config goes into the data directory and, for the user who started the node, to
/// `client::default_path()` (`TERN_CONFIG` or `~/.config/tern/config.toml`).
fn write_admin_config(data: &Path, server: &str, secret: &str, ca: &str) -> anyhow::Result<()> {
    let cfg = OperatorConfig {
        server: Some(server.to_string()),
        token: Some(secret.to_string()),
        ca: Some(ca.to_string()),
    };
    cfg.write(&admin_config_path(data))?;
    if let Some(path) = default_path() {
        match cfg.write(&path) {
            Ok(()) => println!(
                "admin config for this cluster written to {}",
                path.display()
            ),
            Err(e) => tracing::warn!("writing the admin config: {e}"),
        }
    }
    Ok(())
}

async fn certify(
    seed: &str,
    id: u64,
    addrs: &[String],
    token: &JoinToken,
    data: &Path,
) -> anyhow::Result<NodeTls> {
    // The CA is fetched over an unverified connection and then checked against the token.
    let fetch = reqwest::Client::builder()
        .use_preconfigured_tls(FetchOnlyVerifier::client_config())
        .timeout(Duration::from_secs(5))
        .build()?;
    let ca: CaReply = fetch
        .get(url(seed, "/v1/cluster/ca"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    if fingerprint(&ca.ca)? != token.ca_fingerprint {
        anyhow::bail!("the cluster CA at {seed} does not match the join token's fingerprint");
    }
    let (key, csr) = node_key_and_csr(id)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(operator_client_config(&ca.ca)?)
        .timeout(Duration::from_secs(10))
        .build()?;
    let body = CertifyBody {
        id,
        addrs: addrs.to_vec(),
        csr,
        join_token: token.to_string(),
    };
    let reply = client
        .post(url(seed, "/v1/members/certify"))
        .json(&body)
        .send()
        .await?;
    let status = reply.status();
    if !status.is_success() {
        anyhow::bail!("{status}: {}", reply.text().await.unwrap_or_default());
    }
    let reply: CertifyReply = reply.json().await?;
    if reply.ca != ca.ca {
        anyhow::bail!("the seed answered with another CA");
    }
    let tls = NodeTls::new(
        id,
        ClusterCa::from_pem(reply.ca, reply.ca_key),
        reply.cert,
        key,
    );
    tls.save(data).context("saving the node identity")?;
    tracing::info!(id, "certified by the cluster");
    Ok(tls)
}

/// Ask the seed (forwarded to the leader) to add us, until it works, backing off.
pub async fn join_loop(
    tls: std::sync::Arc<NodeTls>,
    seed: String,
    id: u64,
    addr: String,
    join_token: String,
) {
    let body = JoinBody {
        id,
        addr,
        join_token: Some(join_token),
    };
    let mut delay = Duration::from_millis(200);
    loop {
        match join_once(&tls, &seed, &body).await {
            Ok(()) => return,
            Err(e) => tracing::warn!("join via {seed}: {e:#}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn join_once(tls: &NodeTls, seed: &str, body: &JoinBody) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(operator_client_config(&tls.ca.cert_pem)?)
        // Joining waits until this node has caught up as a learner.
        .timeout(Duration::from_secs(60))
        .build()?;
    let reply = client
        .post(url(seed, "/v1/members/join"))
        .json(body)
        .send()
        .await?;
    let status = reply.status();
    if !status.is_success() {
        anyhow::bail!("{status}: {}", reply.text().await.unwrap_or_default());
    }
    Ok(())
}

/// Commit the bootstrap admin token, retrying until this new cluster has a leader.
pub async fn create_admin_token(cluster: Cluster, secret: String) {
    let command = Command::CreateToken {
        name: "admin".into(),
        role: AccessRole::Admin,
        hash: sha256_hex(secret.as_bytes()),
        expires_at_ms: None,
    };
    loop {
        match cluster
            .propose("bootstrap".into(), None, command.clone(), false)
            .await
        {
            Ok(_) => return,
            Err(e) if e.rejected.is_some() => {
                tracing::warn!("admin token: {e}");
                return;
            }
            Err(e) => tracing::debug!("admin token: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
