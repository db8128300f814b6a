//! The remap backend: merging, copy-on-write, the store, domains, the VMA budget.

mod common;

use common::*;
use ksm::synth::Layout;
use ksm::{Backend, DomainPolicy, PAGE_SIZE};

#[test]
fn merges_and_keeps_content_two_pass_rule() {
    let w = workload(3, 8, "50:25:25", Layout::Scattered, 1);
    let mut e = engine(&w, cfg(Backend::Remap, DomainPolicy::All), hooks_default());
    let r0 = e.scan().unwrap();
    assert_eq!(
        r0.merged, 0,
        "nothing merges before a page is seen stable twice"
    );
    let r1 = e.scan().unwrap();
    assert!(r1.merged > 0);
    let s = e.stats();
    let achievable = w.achievable_pages(DomainPolicy::All);
    let saved = s.saved_bytes_claimed / PAGE_SIZE as u64;
    assert!(
        saved * 100 >= achievable * 99,
        "saved {saved} of {achievable}: {s:#?}"
    );
    assert_eq!(w.lost_writes(), 0);
    // A third pass finds nothing new.
    let r2 = e.scan().unwrap();
    assert_eq!(r2.merged, 0);
    assert_eq!(w.lost_writes(), 0);
}

/// A hasher that collides all the time: the first byte modulo 3.
struct Weak;
impl ksm::PageHasher for Weak {
    fn hash(&self, page: &[u8]) -> u64 {
        (page[0] % 3) as u64
    }
}

#[test]
#[allow(clippy::needless_range_loop)]
fn weak_hasher_never_merges_unequal_pages() {
    // 2 regions of 2 MiB: pages hold one of 40 contents that differ only in their last
    // byte, so almost every hash match is a collision.
    let len = 2 << 20;
    let n = len / PAGE_SIZE;
    let mut addrs = Vec::new();
    let content = |r: usize, j: usize| -> u8 { ((r * 7 + j * 13) % 40) as u8 };
    for r in 0..2 {
        let a = ksm::sys::map_anon(len).unwrap() as usize;
        for j in 0..n {
            let p = unsafe {
                std::slice::from_raw_parts_mut((a + j * PAGE_SIZE) as *mut u8, PAGE_SIZE)
            };
            p.fill(0xAB);
            p[PAGE_SIZE - 1] = content(r, j);
        }
        addrs.push(a);
    }
    let specs: Vec<ksm::RegionSpec> = addrs
        .iter()
        .enumerate()
        .map(|(i, &a)| ksm::RegionSpec {
            addr: a,
            len,
            label: format!("r{i}"),
            domain: 0,
        })
        .collect();
    let hooks = ksm::Hooks {
        hasher: std::sync::Arc::new(Weak),
        ..Default::default()
    };
    let mut e =
        unsafe { ksm::Engine::new(cfg(Backend::Remap, DomainPolicy::All), specs, hooks) }.unwrap();
    for _ in 0..4 {
        e.scan().unwrap();
    }
    let st = e.stats();
    assert!(st.pages_sharing > 0, "equal pages still merge: {st:#?}");
    let store = e.store().unwrap();
    let mut slot_content = std::collections::HashMap::new();
    for r in 0..2 {
        for j in 0..n {
            let p = unsafe {
                std::slice::from_raw_parts((addrs[r] + j * PAGE_SIZE) as *const u8, PAGE_SIZE)
            };
            assert!(p[..PAGE_SIZE - 1].iter().all(|&b| b == 0xAB));
            assert_eq!(
                p[PAGE_SIZE - 1],
                content(r, j),
                "page {r}/{j} changed content"
            );
            if let Some(s) = e.page_slot(r, j) {
                assert_eq!(store.page(s), p);
                let c = *slot_content.entry(s).or_insert(content(r, j));
                assert_eq!(c, content(r, j), "slot {s} shared by unequal pages");
            }
        }
    }
    drop(e);
    for a in addrs {
        unsafe { ksm::sys::munmap(a, len).unwrap() };
    }
}

#[test]
fn write_to_merged_page_gives_private_copy() {
    let w = workload(3, 2, "100:0:0", Layout::Contiguous, 3);
    let mut e = engine(&w, cfg(Backend::Remap, DomainPolicy::All), hooks_default());
    e.scan().unwrap();
    e.scan().unwrap();
    let s0 = e.page_slot(0, 5).expect("merged");
    assert_eq!(e.page_slot(1, 5), Some(s0));
    assert_eq!(e.page_slot(2, 5), Some(s0));
    let before: Vec<u8> = e.store().unwrap().page(s0).to_vec();
    // Write into region 1's copy.
    let p1 = (w.addrs[1] + 5 * PAGE_SIZE) as *mut u8;
    unsafe { std::ptr::write_bytes(p1, 0x5A, 100) };
    let page = |r: usize| unsafe {
        std::slice::from_raw_parts((w.addrs[r] + 5 * PAGE_SIZE) as *const u8, PAGE_SIZE)
    };
    assert!(page(1)[..100].iter().all(|&b| b == 0x5A));
    assert_eq!(&page(1)[100..], &before[100..]);
    assert_eq!(page(0), &before[..], "other mappings unchanged");
    assert_eq!(page(2), &before[..], "other mappings unchanged");
    assert_eq!(e.store().unwrap().page(s0), &before[..], "store unchanged");
    e.scan().unwrap();
    let st = e.stats();
    assert_eq!(st.cow_breaks, 1);
    assert_eq!(e.page_slot(1, 5), None);
    assert_eq!(e.page_slot(0, 5), Some(s0));
}

#[test]
fn store_shrinks_back_when_all_merged_pages_are_written() {
    let w = workload(2, 4, "100:0:0", Layout::Contiguous, 4);
    let mut e = engine(&w, cfg(Backend::Remap, DomainPolicy::All), hooks_default());
    e.scan().unwrap();
    e.scan().unwrap();
    let st = e.stats();
    assert!(st.store_pages >= 1000, "{st:#?}");
    let n = w.pages_per_region();
    for r in 0..2 {
        for j in 0..n {
            unsafe {
                std::ptr::write_volatile(
                    (w.addrs[r] + j * PAGE_SIZE + 64) as *mut u64,
                    (r * n + j) as u64 + 1,
                )
            };
        }
    }
    e.scan().unwrap();
    let st = e.stats();
    assert_eq!(st.cow_breaks as usize, 2 * n);
    assert!(
        st.store_pages <= 2,
        "store still holds {} pages: {st:#?}",
        st.store_pages
    );
    assert_eq!(
        e.store().unwrap().resident_bytes() / PAGE_SIZE as u64,
        st.store_pages
    );
    assert_eq!(st.pages_shared, 0);
}

fn check_domains(policy: DomainPolicy) {
    let w = workload(2, 4, "60:20:20", Layout::Scattered, 5);
    let mut e = engine(&w, cfg(Backend::Remap, policy), hooks_default());
    e.scan().unwrap();
    e.scan().unwrap();
    let st = e.stats();
    assert!(st.ksm_zero_pages > 0);
    let n = w.pages_per_region();
    let mut owner = std::collections::HashMap::new();
    for r in 0..2 {
        for j in 0..n {
            if let Some(s) = e.page_slot(r, j) {
                assert_ne!(
                    policy,
                    DomainPolicy::ZeroOnly,
                    "zero-only merged a non-zero page"
                );
                let o = *owner.entry(s).or_insert(r);
                assert_eq!(o, r, "slot {s} shared across regions under {policy:?}");
            }
        }
    }
    // And by physical frames: touch both copies of every identical page, then compare.
    for j in (0..n).step_by(7) {
        let a0 = w.addrs[0] + j * PAGE_SIZE;
        let a1 = w.addrs[1] + j * PAGE_SIZE;
        let (x, y) = unsafe {
            (
                std::ptr::read_volatile(a0 as *const u64),
                std::ptr::read_volatile(a1 as *const u64),
            )
        };
        if x != 0 && x == y {
            let (f0, f1) = (pfn(a0), pfn(a1));
            if f0 != 0 {
                assert_ne!(
                    f0, f1,
                    "page {j} shares a frame across regions under {policy:?}"
                );
            }
        }
    }
    assert_eq!(w.lost_writes(), 0);
}

#[test]
fn domain_region_never_merges_across_regions() {
    check_domains(DomainPolicy::Region);
}

#[test]
fn domain_zero_only_merges_only_zero_pages() {
    check_domains(DomainPolicy::ZeroOnly);
}

#[test]
fn domain_all_merges_across_regions() {
    let w = workload(2, 2, "100:0:0", Layout::Contiguous, 6);
    let mut e = engine(&w, cfg(Backend::Remap, DomainPolicy::All), hooks_default());
    e.scan().unwrap();
    e.scan().unwrap();
    assert_eq!(e.page_slot(0, 3), e.page_slot(1, 3));
    assert!(e.page_slot(0, 3).is_some());
}

#[test]
fn contiguous_runs_coalesce_into_few_mappings() {
    let w = workload(4, 16, "50:25:25", Layout::Contiguous, 8);
    // Count only the mappings inside the workload: other tests of this binary map and
    // unmap memory concurrently, so the process-wide count is not ours alone.
    let ranges: Vec<(usize, usize)> = specs(&w).iter().map(|s| (s.addr, s.addr + s.len)).collect();
    let maps_inside = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            })
            .filter(|&(a, b)| ranges.iter().any(|&(s, e)| a < e && s < b))
            .count()
    };
    let before = maps_inside();
    let mut e = engine(&w, cfg(Backend::Remap, DomainPolicy::All), hooks_default());
    e.scan().unwrap();
    e.scan().unwrap();
    let st = e.stats();
    let runs = st.pages_sharing + st.pages_shared;
    let added = maps_inside() as i64 - before as i64;
    assert!(
        added < (runs / 32) as i64,
        "{added} new mappings for {runs} merged pages"
    );
}

#[test]
fn untouched_pages_are_neither_read_in_nor_counted_as_saved() {
    // 64 pages of fresh anonymous memory: 8 written with zeros, 8 with one value, the
    // rest never touched. Untouched pages hold no memory, so merging them saves nothing.
    let len = 64 * 4096;
    let base = ksm::sys::map_anon(len).expect("map");
    for p in 0..16 {
        // SAFETY: inside the mapping just created.
        unsafe { *base.add(p * 4096) = if p < 8 { 0 } else { 7 } };
    }
    let spec = ksm::RegionSpec {
        addr: base as usize,
        len,
        label: "fresh".into(),
        domain: 0,
    };
    // SAFETY: the mapping is private, ours, and outlives the engine.
    let mut e = unsafe {
        ksm::Engine::new(
            cfg(ksm::Backend::Remap, ksm::DomainPolicy::All),
            vec![spec],
            hooks_default(),
        )
    }
    .expect("engine");
    for _ in 0..3 {
        e.scan().unwrap();
    }
    let st = e.stats();
    // 8 zero pages reclaimed, 8 identical pages merged into one store page: 15 saved.
    assert_eq!(st.ksm_zero_pages, 8, "{st:#?}");
    assert_eq!((st.pages_shared, st.pages_sharing), (1, 7), "{st:#?}");
    assert_eq!(
        e.progress()
            .saved_pages
            .load(std::sync::atomic::Ordering::Relaxed),
        15
    );
    let mut vec = vec![0u8; 64];
    // SAFETY: mincore over our own mapping with one byte per page.
    assert_eq!(
        unsafe { libc::mincore(base.cast(), len, vec.as_mut_ptr()) },
        0
    );
    assert!(
        vec[16..].iter().all(|b| b & 1 == 0),
        "untouched pages stay untouched"
    );
    drop(e);
    // SAFETY: unmapping what we mapped, after the engine is gone.
    unsafe { libc::munmap(base.cast(), len) };
}
