//! The one way tests talk to nodes: HTTPS with the cluster CA pinned and the admin token that
//! the bootstrapping node wrote into its data directory (`DATA/admin.toml`). A test registers
//! its cluster's addresses once (`register`); every helper then finds the credentials by the
//! address it talks to.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tern_node::client::{admin_config_path, OperatorConfig};

fn clusters() -> &'static Mutex<HashMap<String, PathBuf>> {
    static CLUSTERS: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    CLUSTERS.get_or_init(Default::default)
}

/// The nodes at `addrs` belong to the cluster bootstrapped with data directory `bootstrap_data`.
pub fn register(bootstrap_data: &Path, addrs: &[String]) {
    let mut map = clusters().lock().unwrap();
    for a in addrs {
        map.insert(a.clone(), admin_config_path(bootstrap_data));
    }
}

/// Where the admin config of `addr`'s cluster is (for `TERN_CONFIG` of CLI processes).
pub fn config_path(addr: &str) -> PathBuf {
    clusters()
        .lock()
        .unwrap()
        .get(addr)
        .cloned()
        .unwrap_or_else(|| panic!("{addr} belongs to no registered cluster"))
}

/// The admin credentials of `addr`'s cluster, once its bootstrap node has written them.
pub fn admin(addr: &str) -> Option<OperatorConfig> {
    OperatorConfig::read(&config_path(addr)).ok()
}

/// An admin client for `addr` (None until the bootstrap node has written its config).
pub fn client(addr: &str, timeout: Duration) -> Option<reqwest::blocking::Client> {
    admin(addr)?.blocking_client(timeout).ok()
}

/// A client for `addr` that trusts the cluster CA but sends `token` (or none).
pub fn client_with_token(
    addr: &str,
    token: Option<&str>,
    timeout: Duration,
) -> reqwest::blocking::Client {
    let cfg = admin(addr).expect("the cluster's admin config");
    let tls = tern_node::pki::operator_client_config(cfg.ca.as_deref().unwrap()).unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
    }
    reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .default_headers(headers)
        .timeout(timeout)
        .build()
        .unwrap()
}

pub fn url(addr: &str, path: &str) -> String {
    tern_node::client::url(addr, path)
}

/// A fresh join token from `addr`'s cluster (admin), retried until the cluster answers.
pub fn join_token(addr: &str) -> String {
    super::wait_for("a join token", Duration::from_secs(20), || {
        let resp = client(addr, Duration::from_secs(5))?
            .post(url(addr, "/v1/cluster/join-token"))
            .json(&serde_json::json!({ "ttl_s": 3600 }))
            .send()
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let v: serde_json::Value = resp.json().ok()?;
        v["token"].as_str().map(str::to_string)
    })
}

/// POST as member node `id` (with its certificate from its data directory `data`) to node
/// `target` at `addr`: what a peer may call that an operator may not. Returns (status, body).
pub fn post_as_node(
    data: &Path,
    id: u64,
    target: u64,
    addr: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let tls = tern_node::pki::NodeTls::load(data, id)
        .unwrap()
        .expect("node identity");
    let peers = tern_consensus::network::PeerTls {
        config: std::sync::Arc::new(tls.peer_client_config().unwrap()),
        self_id: id,
        source_ip: None,
    };
    let (client, base) = peers
        .client(target, addr, Some(Duration::from_secs(10)))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = client
            .post(format!("{base}{path}"))
            .json(body)
            .send()
            .await
            .expect("post as node");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    })
}
