//! Helpers shared by the integration tests.
#![allow(dead_code)]

use memvirt::guest::program::Mode;
use memvirt::machine::GuestConfig;
use std::path::Path;

/// Opens /dev/kvm, or prints why the test is skipped and returns None.
pub fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    match memvirt::vstate::vm::open_kvm(Path::new("/dev/kvm")) {
        Ok(k) => Some(k),
        Err(e) => {
            println!("skipped {test}: /dev/kvm is not usable here ({e})");
            None
        }
    }
}

/// Whether /dev/kvm is usable; prints the skip reason when it is not.
pub fn have_kvm(test: &str) -> bool {
    kvm_or_skip(test).is_some()
}

/// A small guest config for tests.
pub fn small_config(mem: u64, mode: Mode) -> GuestConfig {
    GuestConfig::new(mem, mode)
}

/// Runs the memvirt binary with `args`; returns (exit code, stdout, stderr).
pub fn memvirt(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memvirt"))
        .args(args)
        .output()
        .expect("running the memvirt binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
