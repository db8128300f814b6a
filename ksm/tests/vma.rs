//! The VMA budget (own test binary: it counts this process's mappings, which other tests
//! running in parallel threads would change).

mod common;

use common::*;
use ksm::synth::Layout;
use ksm::{Backend, DomainPolicy};

#[test]
fn vma_budget_reached_is_a_stat_not_a_failure() {
    let w = workload(2, 8, "50:25:25", Layout::Scattered, 7);
    let now = ksm::sys::map_count().unwrap();
    let mut c = cfg(Backend::Remap, DomainPolicy::All);
    c.vma_budget = Some(now + 200);
    let mut e = engine(&w, c, hooks_default());
    for _ in 0..3 {
        e.scan().unwrap();
    }
    let st = e.stats();
    assert!(st.vma_budget_reached > 0, "{st:#?}");
    assert!(st.pages_sharing > 0, "merged until the budget: {st:#?}");
    assert!(st.ksm_zero_pages > 0, "zero pages need no mapping: {st:#?}");
    assert_eq!(w.lost_writes(), 0);
}
