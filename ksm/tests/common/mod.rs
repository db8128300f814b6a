#![allow(dead_code)]
//! Helpers shared by the engine's tests.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use ksm::synth::{Layout, Mix, Spec, Workload};
use ksm::{Config, DomainPolicy, Engine, Hooks, RegionSpec};

/// Serializes tests that touch /sys/kernel/mm/ksm (or measure the whole process), across
/// threads and processes (cargo test runs tests as threads, nextest as processes): an
/// exclusive flock held for the guard's lifetime.
pub struct SysLock(File);

pub fn sys_lock() -> SysLock {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/memvirt-ksm-tests.lock")
        .expect("lock file");
    // SAFETY: plain flock on our own fd; blocks until free.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock");
    SysLock(f)
}

pub fn workload(regions: usize, mib: usize, mix: &str, layout: Layout, seed: u64) -> Workload {
    Workload::new(Spec {
        regions,
        region_bytes: mib << 20,
        mix: mix.parse::<Mix>().unwrap(),
        layout,
        seed,
    })
    .expect("workload")
}

pub fn engine(w: &Workload, cfg: Config, hooks: Hooks) -> Engine {
    // SAFETY: the workload's regions are private mappings it owns and outlives the engine
    // in every test.
    unsafe { Engine::new(cfg, w.region_specs(), hooks) }.expect("engine")
}

pub fn specs(w: &Workload) -> Vec<RegionSpec> {
    w.region_specs()
}

pub fn cfg(backend: ksm::Backend, policy: DomainPolicy) -> Config {
    Config {
        backend,
        policy,
        ..Config::default()
    }
}

pub fn hooks_default() -> Hooks {
    Hooks::default()
}

pub fn uffd_hooks(hold: Arc<dyn ksm::WriterHold>) -> Hooks {
    Hooks {
        dirty: Some(Box::new(ksm::UffdDirty::new().expect("userfaultfd"))),
        hold,
        ..Hooks::default()
    }
}

/// Physical frame of a virtual address (root only; 0 if not present).
pub fn pfn(addr: usize) -> u64 {
    let pm = ksm::sys::Pagemap::open().unwrap();
    let mut v = Vec::new();
    pm.read(addr, 1, &mut v).unwrap();
    if v[0] & ksm::sys::PM_PRESENT == 0 {
        0
    } else {
        v[0] & ((1 << 55) - 1)
    }
}
