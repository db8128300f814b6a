//! Hot-path costs of the software MMU: the plain walker on hot tables, a shadow-table hit,
//! and the nested walk per memory reference.
//!
//! Run briefly on shared machines:
//! `cargo bench -p memvirt-shadow --bench mmu -- --warm-up-time 1 --measurement-time 3`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shadow::testbed::Machine;
use shadow::{Access, CacheConfig, MapFlags, PageSize, PageTableBuilder, PagingMode, Walker};

const HOT_PAGES: u64 = 64;
const VA: u64 = 0x7f00_0000_0000;

/// A guest with `HOT_PAGES` pages of `size` mapped from `VA` (tables fit in L1 cache).
fn hot_guest(la57: bool, size: PageSize) -> (Machine, PageTableBuilder, Vec<u64>) {
    let mut m = Machine::new(256 << 20, 8 << 20, PagingMode::default().with_la57(la57)).unwrap();
    let pt = m.new_address_space().unwrap();
    let mut addrs = Vec::new();
    for i in 0..HOT_PAGES {
        let gpa = (i * size.bytes()) % (128 << 20);
        m.map(&pt, VA + i * size.bytes(), gpa, size, MapFlags::ALL)
            .unwrap();
        addrs.push(VA + i * size.bytes() + 0x88);
    }
    (m, pt, addrs)
}

fn walker(c: &mut Criterion) {
    let mut g = c.benchmark_group("walker_hot");
    g.throughput(Throughput::Elements(1));
    for (name, la57, size) in [
        ("4level_4k", false, PageSize::Size4K),
        ("4level_2m", false, PageSize::Size2M),
        ("5level_4k", true, PageSize::Size4K),
    ] {
        let (m, pt, addrs) = hot_guest(la57, size);
        let w = Walker::new(m.mode);
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) & (HOT_PAGES as usize - 1);
                black_box(
                    w.walk(&m.vm, pt.root(), black_box(addrs[i]), Access::read())
                        .unwrap()
                        .gpa,
                )
            })
        });
    }
    g.finish();
}

fn shadow_hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("shadow_hit");
    g.throughput(Throughput::Elements(1));
    // "tlb_l1": 32 hot pages fit the 48-entry L1 TLB; "tlb_l2": 64 pages cycle through it
    // (LRU misses every time) and hit the 512-entry L2; "shadow_walk": no TLB, every
    // translation walks the four shadow levels.
    for (name, caches, pages) in [
        ("tlb_l1", CacheConfig::default(), 32usize),
        ("tlb_l2", CacheConfig::default(), 64),
        ("shadow_walk", CacheConfig::NONE, 64),
    ] {
        let (m, pt, mut addrs) = hot_guest(false, PageSize::Size4K);
        addrs.truncate(pages);
        let mut s = m.shadow_mmu(PageSize::Size4K, caches, true, pt.root());
        for &a in &addrs {
            s.translate(&m.vm, a, Access::read()).unwrap();
        }
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) & (pages - 1);
                black_box(
                    s.translate(&m.vm, black_box(addrs[i]), Access::read())
                        .unwrap()
                        .hpa,
                )
            })
        });
        assert_eq!(
            s.stats().misses,
            pages as u64,
            "the benchmark must measure hits only"
        );
    }
    g.finish();
}

fn nested_walk(c: &mut Criterion) {
    let mut g = c.benchmark_group("nested_walk_uncached");
    for (name, la57, host, refs) in [
        ("4x4_host4k", false, PageSize::Size4K, 24u64),
        ("4x4_host2m", false, PageSize::Size2M, 19),
        ("5x5_host4k", true, PageSize::Size4K, 35),
    ] {
        let (mut m, pt, addrs) = hot_guest(la57, PageSize::Size4K);
        let mut n = m.nested_mmu(host, CacheConfig::NONE, pt.root()).unwrap();
        assert_eq!(
            n.translate(m.vm.host(), addrs[0], Access::read())
                .unwrap()
                .refs as u64,
            refs
        );
        // Elements = memory references: criterion's rate is references per second.
        g.throughput(Throughput::Elements(refs));
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("per_reference", name), &refs, |b, _| {
            b.iter(|| {
                i = (i + 1) & (HOT_PAGES as usize - 1);
                black_box(
                    n.translate(m.vm.host(), black_box(addrs[i]), Access::read())
                        .unwrap()
                        .hpa,
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, walker, shadow_hit, nested_walk);
criterion_main!(benches);
