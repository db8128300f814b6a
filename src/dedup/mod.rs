//! `memvirt dedup`: runs the userspace KSM engine (crate `ksm`) on synthetic regions,
//! optionally side by side with the kernel's ksmd.

use clap::Args;

/// Command-line arguments of `memvirt dedup`.
#[derive(Debug, Args)]
pub struct DedupArgs {
    /// Run on synthetic regions instead of guests.
    #[arg(long)]
    pub synthetic: bool,
}

/// Runs `memvirt dedup` with the given arguments.
pub fn run(args: &DedupArgs) -> anyhow::Result<()> {
    anyhow::bail!("memvirt dedup is not built yet (args: {args:?})")
}
