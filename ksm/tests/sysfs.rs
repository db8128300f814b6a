//! ksmd's knobs in /sys/kernel/mm/ksm are identical before and after every run that
//! touches them: a normal run, one that fails midway, one that panics midway, and a
//! ksmd-alone run. Serialized across threads and processes with an flock.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ksm::restore::{ksm_counter, ksm_knobs_snapshot, KsmdKnobs};
use ksm::synth::Layout;
use ksm::{Backend, DomainPolicy, Hooks};

fn writable() -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/sys/kernel/mm/ksm/run")
        .is_ok()
}

fn wait_for_sharing(min: u64, secs: u64) -> u64 {
    let t = Instant::now();
    loop {
        let v = ksm_counter("pages_sharing");
        if v >= min || t.elapsed() > Duration::from_secs(secs) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn madvise_run_restores_ksm_sysfs() {
    if !writable() {
        eprintln!("skipped: /sys/kernel/mm/ksm not writable");
        return;
    }
    let _l = sys_lock();
    let before = ksm_knobs_snapshot();
    {
        let w = workload(2, 8, "50:25:25", Layout::Contiguous, 21);
        let mut e = engine(
            &w,
            cfg(Backend::Madvise, DomainPolicy::All),
            hooks_default(),
        );
        e.scan().unwrap();
        e.scan().unwrap();
        assert!(e.stats().pages_hinted > 0);
        assert_eq!(ksm_counter("run"), 1, "ksmd runs during the engine's run");
        assert!(
            wait_for_sharing(100, 10) >= 100,
            "ksmd merged the hinted pages"
        );
        assert_eq!(w.lost_writes(), 0);
    }
    assert_eq!(ksm_knobs_snapshot(), before);
}

/// A dirty source that fails on its second collect.
struct Failing(u32);
impl ksm::DirtySource for Failing {
    fn name(&self) -> &str {
        "failing"
    }
    fn arm(&mut self, _: &[ksm::RegionSpec]) -> std::io::Result<()> {
        Ok(())
    }
    fn collect(&mut self, _: usize, _: &mut Vec<u32>) -> std::io::Result<()> {
        self.0 += 1;
        if self.0 >= 2 {
            return Err(std::io::Error::other("injected failure"));
        }
        Ok(())
    }
}

#[test]
fn madvise_run_failing_midway_restores_ksm_sysfs() {
    if !writable() {
        eprintln!("skipped: /sys/kernel/mm/ksm not writable");
        return;
    }
    let _l = sys_lock();
    let before = ksm_knobs_snapshot();
    {
        let w = workload(2, 4, "50:25:25", Layout::Contiguous, 22);
        let hooks = Hooks {
            dirty: Some(Box::new(Failing(0))),
            ..Hooks::default()
        };
        let mut e = engine(&w, cfg(Backend::Madvise, DomainPolicy::All), hooks);
        e.scan().unwrap();
        assert_ne!(ksm_knobs_snapshot(), before, "the run changed the knobs");
        let mut failed = false;
        for _ in 0..3 {
            if e.scan().is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "the injected failure surfaced");
    }
    assert_eq!(ksm_knobs_snapshot(), before);
}

/// A writer hold that panics on its n-th hold.
struct Panicking(AtomicU32, u32);
impl ksm::WriterHold for Panicking {
    fn hold(&self, _: usize) {
        if self.0.fetch_add(1, Ordering::SeqCst) + 1 == self.1 {
            panic!("injected panic in the writer hold");
        }
    }
    fn release(&self, _: usize) {}
}

#[test]
fn hybrid_run_panicking_midway_restores_ksm_sysfs() {
    if !writable() {
        eprintln!("skipped: /sys/kernel/mm/ksm not writable");
        return;
    }
    let _l = sys_lock();
    let before = ksm_knobs_snapshot();
    let w = workload(2, 4, "50:25:25", Layout::Scattered, 23);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let hooks = Hooks {
            hold: Arc::new(Panicking(AtomicU32::new(0), 1000)),
            ..Hooks::default()
        };
        let mut e = engine(
            &w,
            cfg(Backend::Hybrid { min_run: 4 }, DomainPolicy::All),
            hooks,
        );
        e.scan().unwrap();
        e.scan().unwrap();
        assert!(e.stats().pages_hinted > 0);
        assert_ne!(ksm_knobs_snapshot(), before);
        // A second engine on fresh regions, whose first hold panics midway through
        // hinting, while the first engine's knobs are still set.
        let w2 = workload(2, 4, "50:25:25", Layout::Scattered, 24);
        let hooks2 = Hooks {
            hold: Arc::new(Panicking(AtomicU32::new(0), 1)),
            ..Hooks::default()
        };
        let mut e2 = engine(&w2, cfg(Backend::Madvise, DomainPolicy::All), hooks2);
        e2.scan().unwrap();
        e2.scan().unwrap();
    }));
    assert!(r.is_err(), "the injected panic happened");
    assert_eq!(ksm_knobs_snapshot(), before);
}

#[test]
fn ksmd_alone_run_restores_ksm_sysfs() {
    if !writable() {
        eprintln!("skipped: /sys/kernel/mm/ksm not writable");
        return;
    }
    let _l = sys_lock();
    let before = ksm_knobs_snapshot();
    {
        let w = workload(2, 4, "100:0:0", Layout::Contiguous, 24);
        let _k = KsmdKnobs::start(100_000, 0, None).unwrap();
        for s in w.region_specs() {
            unsafe { ksm::sys::madvise(s.addr, s.len, libc::MADV_MERGEABLE).unwrap() };
        }
        assert!(wait_for_sharing(100, 10) >= 100);
    }
    assert_eq!(ksm_knobs_snapshot(), before);
}
