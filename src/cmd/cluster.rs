//! `tern cluster ...` and `tern host ...`: operator commands against a node's HTTP API.
use anyhow::Context;
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tern_consensus::state::Host;
use tern_node::client::{url, OperatorConfig};

/// Where the CLI sends requests: any node of the cluster.
#[derive(Args)]
pub struct ServerArg {
    /// A node's API address (host:port); default: the config file's `server`.
    #[arg(long, global = true, env = "TERN_SERVER", default_value_t = default_server())]
    pub server: String,
}

#[derive(Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    server: ServerArg,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Leader, term, members and apply position as seen by the node.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Create a join token: a new host joins with `tern node --join ADDR --join-token TOKEN`.
    JoinToken {
        /// How long it stays valid, e.g. 1h, 30m (default 1h).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Args)]
pub struct HostArgs {
    #[command(flatten)]
    server: ServerArg,
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Subcommand)]
enum HostCommand {
    /// List hosts in the committed cluster state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a host from the cluster state and from Raft (refused while it owns VMs).
    Remove { id: u64 },
    /// Enter (evacuating its VMs) or exit maintenance mode.
    Maintenance {
        #[arg(value_enum)]
        action: super::drs_cluster::MaintenanceAction,
        id: u64,
        /// Wait until the host is empty and in maintenance.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Deserialize)]
struct Member {
    id: u64,
    addr: String,
    voter: bool,
}

#[derive(Deserialize)]
struct Status {
    id: u64,
    state: String,
    leader: Option<u64>,
    term: u64,
    last_log_index: Option<u64>,
    last_applied: Option<u64>,
    members: Vec<Member>,
}

/// The server named by the operator config (`TERN_CONFIG` or ~/.config/tern/config.toml).
fn default_server() -> String {
    OperatorConfig::from_env()
        .ok()
        .and_then(|c| c.server)
        .unwrap_or_else(|| "127.0.0.1:7400".to_string())
}

/// HTTPS with the cluster CA pinned and the operator's token (from `TERN_TOKEN`/`TERN_CA` or
/// the config file).
pub fn client() -> anyhow::Result<reqwest::blocking::Client> {
    Ok(OperatorConfig::from_env()?.blocking_client(std::time::Duration::from_secs(15))?)
}

pub fn decode<T: DeserializeOwned>(
    resp: reqwest::blocking::Response,
) -> anyhow::Result<(T, String)> {
    let status = resp.status();
    let text = resp.text().context("reading reply")?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        anyhow::bail!("{status}: {msg}");
    }
    let value = serde_json::from_str(&text).with_context(|| format!("bad reply: {text}"))?;
    Ok((value, text))
}

pub fn get<T: DeserializeOwned>(server: &str, path: &str) -> anyhow::Result<(T, String)> {
    let resp = client()?
        .get(url(server, path))
        .send()
        .with_context(|| format!("contacting {server}"))?;
    decode(resp)
}

/// POST a JSON body and decode the JSON answer.
pub fn post<B: serde::Serialize, T: DeserializeOwned>(
    server: &str,
    path: &str,
    body: &B,
) -> anyhow::Result<T> {
    let resp = client()?
        .post(url(server, path))
        .json(body)
        .send()
        .with_context(|| format!("contacting {server}"))?;
    Ok(decode(resp)?.0)
}

pub fn run_cluster(args: ClusterArgs) -> anyhow::Result<()> {
    match args.command {
        ClusterCommand::JoinToken { ttl } => {
            let ttl_s = tern_node::cron::parse_duration(&ttl)?.as_secs().max(1);
            let reply: tern_node::access::JoinTokenReply = post(
                &args.server.server,
                "/v1/cluster/join-token",
                &serde_json::json!({ "ttl_s": ttl_s }),
            )?;
            println!("{}", reply.token);
            Ok(())
        }
        ClusterCommand::Status { json } => {
            let (status, raw): (Status, String) = get(&args.server.server, "/v1/status")?;
            if json {
                println!("{raw}");
                return Ok(());
            }
            let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            println!("node:         {} ({})", status.id, status.state);
            println!("leader:       {}", opt(status.leader));
            println!("term:         {}", status.term);
            println!("last log:     {}", opt(status.last_log_index));
            println!("last applied: {}", opt(status.last_applied));
            println!("members:");
            for m in &status.members {
                let role = if m.voter { "voter" } else { "learner" };
                let lead = if Some(m.id) == status.leader {
                    " leader"
                } else {
                    ""
                };
                println!("  {:>4}  {:<22} {role}{lead}", m.id, m.addr);
            }
            Ok(())
        }
    }
}

pub fn run_host(args: HostArgs) -> anyhow::Result<()> {
    let server = &args.server.server;
    match args.command {
        HostCommand::List { json } => {
            let (hosts, raw): (Vec<Host>, String) = get(server, "/v1/hosts")?;
            if json {
                println!("{raw}");
                return Ok(());
            }
            println!(
                "{:>4}  {:<22} {:<22} {:>5} {:>10}",
                "ID", "ADDRESS", "STATE", "CPUS", "MEM MiB"
            );
            for h in hosts {
                let state = serde_json::to_value(h.state)?
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                println!(
                    "{:>4}  {:<22} {:<22} {:>5} {:>10}",
                    h.id, h.address, state, h.capacity.cpus, h.capacity.memory_mib
                );
            }
            Ok(())
        }
        HostCommand::Maintenance { action, id, wait } => {
            super::drs_cluster::run_maintenance(server, action, id, wait)
        }
        HostCommand::Remove { id } => {
            let resp = client()?
                .post(url(server, "/v1/members/remove"))
                .json(&serde_json::json!({ "id": id }))
                .send()
                .with_context(|| format!("contacting {server}"))?;
            let _: (serde_json::Value, String) = decode(resp)?;
            println!("host {id} removed");
            Ok(())
        }
    }
}
