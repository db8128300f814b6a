//! The subcommands of the `memvirt` binary that belong to the VMM core:
//! `probe`, `run` and `demo`. (`dedup` and `translate` live beside their crates.)

pub mod probe;
pub mod run;
