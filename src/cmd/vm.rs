//! Placeholder: replaced by the issue that builds this command.
use clap::Args;

#[derive(Args)]
pub struct VmArgs {}

pub fn run(_args: VmArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
