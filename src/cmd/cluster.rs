//! Placeholder: replaced by the issue that builds this command.
use clap::Args;

#[derive(Args)]
pub struct ClusterArgs {}

#[derive(Args)]
pub struct HostArgs {}

pub fn run_cluster(_args: ClusterArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}

pub fn run_host(_args: HostArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
