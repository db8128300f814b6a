//! `memvirt translate`: runs address traces through the nested (EPT/NPT) model and the
//! shadow page tables of crate `shadow`, side by side.

use clap::Args;

/// Command-line arguments of `memvirt translate`.
#[derive(Debug, Args)]
pub struct TranslateArgs {
    /// Emit JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `memvirt translate` with the given arguments.
pub fn run(args: &TranslateArgs) -> anyhow::Result<()> {
    anyhow::bail!("memvirt translate is not built yet (args: {args:?})")
}
