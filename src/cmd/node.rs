//! Placeholder: replaced by the issue that builds this command.
use clap::Args;

#[derive(Args)]
pub struct NodeArgs {}

pub fn run(_args: NodeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
