//! The `memvirt` command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "memvirt",
    version,
    about = "A KVM virtual machine monitor whose subject is memory"
)]
struct Cli {
    /// The KVM device.
    #[arg(long, global = true, default_value = "/dev/kvm", value_name = "PATH")]
    kvm: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report what this host offers: KVM, translation mode, measured guest speed, KSM, THP, limits.
    Probe(memvirt::commands::probe::ProbeArgs),
    /// Boot N identical guests and report boot times, exits and memory.
    Run(memvirt::commands::run::RunArgs),
    /// The main job on the built-in guest: 4 guests × 256 MiB, explained.
    Demo(memvirt::commands::run::DemoArgs),
    /// Userspace KSM engine on synthetic regions, optionally against ksmd.
    Dedup(memvirt::dedup::DedupArgs),
    /// Nested (EPT/NPT) model vs shadow page tables on address traces.
    Translate(memvirt::translate::TranslateArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Probe(a) => memvirt::commands::probe::run(a, &cli.kvm),
        Command::Run(a) => memvirt::commands::run::run(a, &cli.kvm),
        Command::Demo(a) => memvirt::commands::run::demo(a, &cli.kvm),
        Command::Dedup(a) => memvirt::dedup::run(a),
        Command::Translate(a) => memvirt::translate::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
