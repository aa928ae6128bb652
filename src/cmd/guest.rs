//! Placeholder: replaced by the issue that builds this command.
use clap::Args;

#[derive(Args)]
pub struct GuestImageArgs {}

pub fn run(_args: GuestImageArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
