//! `tern token create|list|revoke`: operators' API tokens (admin only). A token's secret is
//! printed once, when created; the cluster keeps only its hash.
use clap::{Args, Subcommand};
use serde_json::json;
use tern_consensus::access::{AccessRole, ApiToken};
use tern_node::access::CreateTokenReply;

use super::cluster::{get, post, ServerArg};

#[derive(Args)]
pub struct TokenArgs {
    #[command(flatten)]
    server: ServerArg,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; its secret is printed once.
    Create {
        /// The principal the audit trail records for this token's actions.
        name: String,
        /// admin (everything), operator (VMs, migrations, maintenance, DRS apply, schedules),
        /// auditor (read only).
        #[arg(long)]
        role: AccessRole,
        /// Lifetime, e.g. 30d, 12h (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List tokens (names, roles, expiry; never secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name.
    Revoke { name: String },
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let server = &args.server.server;
    match args.command {
        TokenCommand::Create {
            name,
            role,
            expires,
            json,
        } => {
            let expires_in_s = expires
                .map(|e| tern_node::cron::parse_duration(&e).map(|d| d.as_secs()))
                .transpose()?;
            let reply: CreateTokenReply = post(
                server,
                "/v1/tokens",
                &json!({ "name": name, "role": role, "expires_in_s": expires_in_s }),
            )?;
            if json {
                println!("{}", serde_json::to_string(&reply)?);
            } else {
                println!(
                    "{} token {:?} created; its secret (shown once):",
                    reply.role, reply.name
                );
                println!("{}", reply.token);
            }
            Ok(())
        }
        TokenCommand::List { json } => {
            let (tokens, raw): (Vec<ApiToken>, String) = get(server, "/v1/tokens")?;
            if json {
                println!("{raw}");
                return Ok(());
            }
            println!("{:<24} {:<9} {:<16} EXPIRES", "NAME", "ROLE", "CREATED BY");
            for t in tokens {
                let expires = t
                    .expires_at_ms
                    .map_or("never".to_string(), tern_node::cron::format_time);
                println!(
                    "{:<24} {:<9} {:<16} {expires}",
                    t.name, t.role, t.created_by
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { name } => {
            let _: serde_json::Value =
                post(server, &format!("/v1/tokens/{name}/revoke"), &json!({}))?;
            println!("token {name:?} revoked");
            Ok(())
        }
    }
}
