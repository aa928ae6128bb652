//! Placeholder: replaced by the issue that builds this command.
use clap::Args;

#[derive(Args)]
pub struct SimArgs {}

pub fn run(_args: SimArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
