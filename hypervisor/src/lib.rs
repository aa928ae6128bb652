//! tern-hypervisor: the embedded KVM VMM (guest memory, vCPUs, devices, state save/restore)
//! and live migration. The only crate in Tern that may contain `unsafe`; every block carries
//! a `// SAFETY:` comment.

pub mod migration;
