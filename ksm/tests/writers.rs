//! Writers running while the engine merges: no write may be lost.

mod common;

use std::sync::Arc;

use common::*;
use ksm::synth::{Layout, Writers};
use ksm::{Backend, DomainPolicy, WriterGate};

fn run(dirty: bool) {
    let w = workload(2, 8, "60:20:20", Layout::Scattered, 11);
    let gate = Arc::new(WriterGate::new(2));
    let hooks = if dirty {
        uffd_hooks(gate.clone())
    } else {
        ksm::Hooks {
            hold: gate.clone(),
            ..Default::default()
        }
    };
    let mut e = engine(&w, cfg(Backend::Remap, DomainPolicy::All), hooks);
    let target = 1_000_000;
    // Merge first, so the writers land on merged pages (COW breaks) while merging of
    // the pages they rewrite goes on; the hash rule needs two passes before it merges.
    let mut passes = 0;
    let mut merged = 0;
    while merged == 0 && passes < 5 {
        merged += e.scan().unwrap().merged;
        passes += 1;
    }
    assert!(merged > 0, "the engine merged before the writers started");
    let writers = Writers::start(&w, gate.clone(), 2, 0.0, Some(target));
    while writers.writes() < target {
        let r = e.scan().unwrap();
        merged += r.merged;
        passes += 1;
    }
    let writes = writers.stop();
    // Converge after the writers stop, then check every page.
    for _ in 0..3 {
        merged += e.scan().unwrap().merged;
    }
    let st = e.stats();
    assert!(writes >= target, "{writes} writes");
    assert!(
        merged > 1000 && passes >= 2,
        "merging went on during the writes: {passes} passes, {merged} merges"
    );
    assert_eq!(w.lost_writes(), 0, "{st:#?}");
    assert!(st.cow_breaks > 0);
    assert!(st.holds.count > 0);
}

#[test]
fn million_writes_during_merging_lose_nothing_with_dirty_tracking() {
    run(true);
}

#[test]
fn million_writes_during_merging_lose_nothing_with_hash_rule() {
    run(false);
}
