//! The 2-D nested walk: exact reference counts, caches, EPT violations, INVLPG/CR3.

use shadow::nested::NestedAccess;
use shadow::paging::{PTE_ADDR_MASK, PTE_P, PTE_RW};
use shadow::testbed::{Machine, HOST_RAM_BASE};
use shadow::{
    Access, CacheConfig, GuestPhysMemory, GuestPhysMemoryMut, MapFlags, MemoryMap, MemoryRegion,
    NestedError, PageSize, PagingMode, WalkError, Walker,
};

fn machine(la57: bool) -> Machine {
    Machine::new(64 << 20, 8 << 20, PagingMode::default().with_la57(la57)).unwrap()
}

/// (guest levels, guest page, host page) → architectural worst case (n+1)(m+1)-1.
#[test]
fn uncached_walks_make_exactly_n_plus_1_times_m_plus_1_minus_1_references() {
    let cases = [
        (false, PageSize::Size4K, PageSize::Size4K, 24),
        (false, PageSize::Size4K, PageSize::Size2M, 19),
        (false, PageSize::Size2M, PageSize::Size4K, 19),
        (false, PageSize::Size2M, PageSize::Size2M, 15),
        (false, PageSize::Size1G, PageSize::Size4K, 14),
        (true, PageSize::Size4K, PageSize::Size4K, 35),
        (true, PageSize::Size4K, PageSize::Size2M, 29),
    ];
    for (la57, gpage, hpage, want) in cases {
        let mut m = if gpage == PageSize::Size1G {
            Machine::new(1 << 30, 8 << 20, PagingMode::default().with_la57(la57)).unwrap()
        } else {
            machine(la57)
        };
        let pt = m.new_address_space().unwrap();
        let va = 0x7f12_3440_0000u64 & !gpage.offset_mask();
        let gpa = if gpage == PageSize::Size1G {
            0
        } else {
            0x40_0000
        };
        m.map(&pt, va, gpa, gpage, MapFlags::ALL).unwrap();
        let mut mmu = m.nested_mmu(hpage, CacheConfig::NONE, pt.root()).unwrap();
        let addr = va + gpage.bytes() / 2 + 0x18;
        for _ in 0..3 {
            let t = mmu.translate(m.vm.host(), addr, Access::read()).unwrap();
            assert_eq!(t.refs, want, "la57={la57} guest {gpage} host {hpage}");
            assert!(!t.tlb_hit);
            let walk = Walker::new(m.mode)
                .walk(&m.vm, pt.root(), addr, Access::read())
                .unwrap();
            assert_eq!(t.gpa, walk.gpa);
            assert_eq!(t.hpa, HOST_RAM_BASE + walk.gpa);
        }
        let s = mmu.stats();
        assert_eq!(s.max_refs, want);
        assert_eq!(s.total_refs(), 3 * want as u64);
        assert_eq!(
            s.guest_refs,
            3 * (m.mode.levels() as u64 + 1 - gpage.level() as u64)
        );
    }
}

#[test]
fn caches_remove_references_in_steady_state() {
    let mut m = machine(false);
    let pt = m.new_address_space().unwrap();
    let va = 0x1_0000_0000u64;
    for i in 0..4 {
        m.map(
            &pt,
            va + i * 0x1000,
            0x10_0000 + i * 0x1000,
            PageSize::Size4K,
            MapFlags::ALL,
        )
        .unwrap();
    }
    let mut mmu = m
        .nested_mmu(PageSize::Size4K, CacheConfig::default(), pt.root())
        .unwrap();
    let host = m.vm.host();
    // Cold caches still help within the first walk: the four guest tables sit in one
    // guest 2 MiB page, so after the root's full host walk (4 + 1 read) each lower table
    // needs only its EPT PTE (1 + 1 read) thanks to the nested walk cache, and the data
    // page, in another 2 MiB page of the same 1 GiB, needs the EPT PD and PT entries (2):
    // 5 + 3 * 2 + 2 = 13 instead of 24.
    let first = mmu.translate(host, va, Access::read()).unwrap();
    assert_eq!(first.refs, 13);
    let again = mmu.translate(host, va + 8, Access::write()).unwrap();
    assert!(again.tlb_hit);
    assert_eq!(again.refs, 0);
    // Next page in the same guest PT: the walk cache gives the PT's host address, the
    // guest PTE is read (1), and the new data page needs only the EPT PTE (1).
    let next = mmu.translate(host, va + 0x1000, Access::read()).unwrap();
    assert_eq!(next.refs, 2);
    assert_eq!(next.hpa, HOST_RAM_BASE + 0x10_1000);
    let s = mmu.stats();
    assert_eq!(s.tlb.hits, 1);
    assert_eq!(s.walk_cache.hits, 1);
    assert!(s.nested_walk_cache.hits >= 1);
}

#[test]
fn ept_violations_are_typed_and_agree_with_the_walker() {
    // RAM at [0, 32M) and [64M, 96M); [32M, 64M) is a hole.
    let map = MemoryMap::new(vec![
        MemoryRegion {
            gpa: 0,
            size: 32 << 20,
            hpa: HOST_RAM_BASE,
        },
        MemoryRegion {
            gpa: 64 << 20,
            size: 32 << 20,
            hpa: HOST_RAM_BASE + (64 << 20),
        },
    ])
    .unwrap();
    let mut m = Machine::from_map(map, 16 << 20, 32 << 20, PagingMode::default()).unwrap();
    let pt = m.new_address_space().unwrap();
    m.map(&pt, 0x1000, 40 << 20, PageSize::Size4K, MapFlags::ALL)
        .unwrap(); // data in the hole
    m.map(&pt, 0x40_0000, 70 << 20, PageSize::Size4K, MapFlags::ALL)
        .unwrap(); // second region
    let mut mmu = m
        .nested_mmu(PageSize::Size2M, CacheConfig::default(), pt.root())
        .unwrap();
    assert!(matches!(
        mmu.translate(m.vm.host(), 0x1000, Access::read()),
        Err(NestedError::EptViolation { gpa, during: NestedAccess::Data, .. }) if gpa == 40 << 20
    ));
    assert_eq!(
        mmu.translate(m.vm.host(), 0x40_0010, Access::read())
            .unwrap()
            .hpa,
        HOST_RAM_BASE + (70 << 20) + 0x10
    );
    // A guest PDE pointing into the hole: the walker says "outside memory", the nested
    // model says the guest table access had no host mapping.
    let pde = pt.entry_addr(&m.vm, 0x40_0000, 2).unwrap().unwrap();
    m.vm.write_u64(pde, (48 << 20) | PTE_P | PTE_RW).unwrap();
    mmu.invlpg(0x40_0000);
    assert!(matches!(
        Walker::new(m.mode).walk(&m.vm, pt.root(), 0x40_0000, Access::read()),
        Err(WalkError::TableOutsideMemory { level: 1, .. })
    ));
    assert!(matches!(
        mmu.translate(m.vm.host(), 0x40_0000, Access::read()),
        Err(NestedError::EptViolation {
            during: NestedAccess::GuestTable,
            ..
        })
    ));
}

#[test]
fn invlpg_and_cr3_writes_have_their_architectural_effect() {
    let mut m = machine(false);
    let a = m.new_address_space().unwrap();
    let b = m.new_address_space().unwrap();
    let va = 0x5000_0000u64;
    m.map(&a, va, 0x20_0000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    m.map(&b, va, 0x30_0000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    let global = 0x6000_0000u64;
    let gflags = MapFlags {
        global: true,
        ..MapFlags::ALL
    };
    m.map(&a, global, 0x21_0000, PageSize::Size4K, gflags)
        .unwrap();
    let mut mmu = m
        .nested_mmu(PageSize::Size4K, CacheConfig::default(), a.root())
        .unwrap();
    assert_eq!(
        mmu.translate(m.vm.host(), va, Access::read()).unwrap().hpa,
        HOST_RAM_BASE + 0x20_0000
    );
    assert!(mmu.translate(m.vm.host(), global, Access::read()).is_ok());
    // Remap the PTE without INVLPG: the stale TLB entry is still used (architecturally allowed).
    let pte = a.entry_addr(&m.vm, va, 1).unwrap().unwrap();
    let old = m.vm.read_u64(pte).unwrap();
    m.vm.write_u64(pte, (old & !PTE_ADDR_MASK) | 0x22_0000)
        .unwrap();
    assert_eq!(
        mmu.translate(m.vm.host(), va, Access::read()).unwrap().hpa,
        HOST_RAM_BASE + 0x20_0000
    );
    mmu.invlpg(va);
    assert_eq!(
        mmu.translate(m.vm.host(), va, Access::read()).unwrap().hpa,
        HOST_RAM_BASE + 0x22_0000
    );
    // CR3 write: the other address space's mapping; the global page survives the flush.
    mmu.write_cr3(b.root());
    assert_eq!(
        mmu.translate(m.vm.host(), va, Access::read()).unwrap().hpa,
        HOST_RAM_BASE + 0x30_0000
    );
    let g = mmu.translate(m.vm.host(), global, Access::read()).unwrap();
    assert!(g.tlb_hit, "global entries survive CR3 writes with CR4.PGE");
    // ... but not a full flush.
    mmu.invept();
    assert!(matches!(
        mmu.translate(m.vm.host(), global, Access::read()),
        Err(NestedError::Guest(WalkError::PageFault(_)))
    ));
}

#[test]
fn invlpg_drops_every_splinter_of_a_guest_large_page() {
    let mut m = machine(false);
    let pt = m.new_address_space().unwrap();
    let va = 0x4000_0000u64;
    m.map(&pt, va, 0x20_0000, PageSize::Size2M, MapFlags::ALL)
        .unwrap();
    // 4 KiB host pages: the TLB holds the 2 MiB guest page as 4 KiB pieces.
    let mut mmu = m
        .nested_mmu(PageSize::Size4K, CacheConfig::default(), pt.root())
        .unwrap();
    let pieces = [va, va + 0x1000, va + 0x1f_f000];
    for &p in &pieces {
        let t = mmu.translate(m.vm.host(), p, Access::read()).unwrap();
        assert_eq!(t.size, PageSize::Size4K);
    }
    let pde = pt.entry_addr(&m.vm, va, 2).unwrap().unwrap();
    let old = m.vm.read_u64(pde).unwrap();
    m.vm.write_u64(pde, (old & !PTE_ADDR_MASK) | 0x40_0000)
        .unwrap();
    mmu.invlpg(va + 0x1000); // any address in the large page
    for &p in &pieces {
        assert_eq!(
            mmu.translate(m.vm.host(), p, Access::read()).unwrap().hpa,
            HOST_RAM_BASE + 0x40_0000 + (p - va)
        );
    }
}

#[test]
fn npt_format_host_tables_walk_the_same() {
    use shadow::{EntryFormat, NestedConfig, NestedMmu};
    let mut m = machine(false);
    let pt = m.new_address_space().unwrap();
    let va = 0x7000_0000u64;
    m.map(&pt, va, 0x30_0000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    for (host, refs) in [(PageSize::Size4K, 24), (PageSize::Size2M, 19)] {
        let npt = m.build_nested_as(4, host, EntryFormat::X86).unwrap();
        let mut n = NestedMmu::new(
            NestedConfig {
                guest_mode: m.mode,
                caches: CacheConfig::NONE,
            },
            npt,
            pt.root(),
        );
        let t = n
            .translate(m.vm.host(), va + 0x10, Access::write())
            .unwrap();
        assert_eq!((t.hpa, t.refs), (HOST_RAM_BASE + 0x30_0010, refs));
    }
}
