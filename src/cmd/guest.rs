//! `tern guest-image`: writes the built-in test guest so other tools (QEMU) can boot it.
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct GuestImageArgs {
    /// Where to write the image (a multiboot v1 ELF; boot it with QEMU's -kernel).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: GuestImageArgs) -> anyhow::Result<()> {
    let image = tern_hypervisor::guest_image::IMAGE;
    std::fs::write(&args.out, image)
        .with_context(|| format!("cannot write the guest image to {}", args.out.display()))?;
    println!("wrote {} bytes to {}", image.len(), args.out.display());
    Ok(())
}
