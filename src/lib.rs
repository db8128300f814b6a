//! memvirt (overview to be written with the VMM core)
pub mod dedup;
pub mod translate;
