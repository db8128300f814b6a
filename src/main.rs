use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "memvirt", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Userspace KSM engine on synthetic regions, optionally against ksmd.
    Dedup(memvirt::dedup::DedupArgs),
    /// Nested (EPT/NPT) model vs shadow page tables on address traces.
    Translate(memvirt::translate::TranslateArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dedup(a) => memvirt::dedup::run(&a),
        Command::Translate(a) => memvirt::translate::run(&a),
    }
}
