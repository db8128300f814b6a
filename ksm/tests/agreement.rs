//! Claimed savings agree with the kernel's accounting (Pss from /proc/self/smaps_rollup)
//! within 2%, for each backend. One test in its own binary: it measures the whole
//! process, so nothing else may run in it meanwhile; it holds the sysfs lock because the
//! madvise and hybrid backends run ksmd.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ksm::restore::ksm_counter;
use ksm::stats::{Agreement, KernelKsm};
use ksm::synth::Layout;
use ksm::{Backend, DomainPolicy, PAGE_SIZE};

fn measure(backend: Backend, layout: Layout) -> Agreement {
    if backend != Backend::Remap {
        ksm::restore::settle_ksmd(Duration::from_secs(10));
    }
    let w = workload(4, 8, "50:25:25", layout, 31);
    let mut e = engine(&w, cfg(backend, DomainPolicy::All), hooks_default());
    let k0 = KernelKsm::read();
    let before = ksm::sys::smaps_rollup().unwrap();
    e.scan().unwrap();
    e.scan().unwrap();
    e.scan().unwrap();
    if backend != Backend::Remap {
        // Let ksmd finish: two more full scans after the hints, and stable counters.
        let f0 = ksm_counter("full_scans");
        let t = Instant::now();
        let mut last = u64::MAX;
        while t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
            let s = ksm_counter("pages_sharing");
            if ksm_counter("full_scans") >= f0 + 3 && s == last {
                eprintln!("ksmd settled after {:?}", t.elapsed());
                break;
            }
            last = s;
        }
    }
    let after = ksm::sys::smaps_rollup().unwrap();
    let st = e.stats();
    let kernel = KernelKsm::read()
        .saved_pages()
        .saturating_sub(k0.saved_pages())
        * PAGE_SIZE as u64;
    let claimed = st.saved_bytes_claimed + if backend != Backend::Remap { kernel } else { 0 };
    let measured = before.pss as i64 - after.pss as i64;
    let a = Agreement::check(claimed, measured, 2.0);
    assert!(claimed > 0, "{backend:?} saved nothing: {st:#?}");
    assert_eq!(w.lost_writes(), 0);
    drop(e);
    drop(w);
    a
}

#[test]
fn claimed_saving_agrees_with_smaps_for_each_backend() {
    let _l = sys_lock();
    let mut report = Vec::new();
    report.push(("remap", measure(Backend::Remap, Layout::Contiguous)));
    let ksm_ok = std::fs::OpenOptions::new()
        .write(true)
        .open("/sys/kernel/mm/ksm/run")
        .is_ok();
    if ksm_ok {
        report.push((
            "hybrid",
            measure(Backend::Hybrid { min_run: 8 }, Layout::Scattered),
        ));
        report.push(("madvise", measure(Backend::Madvise, Layout::Scattered)));
    } else {
        eprintln!("madvise/hybrid skipped: /sys/kernel/mm/ksm not writable");
    }
    for (name, a) in &report {
        eprintln!(
            "{name}: claimed {} measured {} diff {:+.3}%",
            a.claimed_bytes, a.measured_bytes, a.diff_pct
        );
    }
    for (name, a) in &report {
        assert!(a.agree, "{name}: {a:?}");
    }
}
