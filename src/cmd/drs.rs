//! Placeholder: replaced by the issue that builds this command.
use clap::Args;

#[derive(Args)]
pub struct DrsArgs {}

pub fn run(_args: DrsArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
