//! Shadow page tables: fill on miss, write tracking, unsync/resync, INVLPG and CR3.

use shadow::paging::{PTE_ADDR_MASK, PTE_RW};
use shadow::shadow_mmu::ShadowPath;
use shadow::testbed::{Machine, HOST_RAM_BASE};
use shadow::{
    Access, CacheConfig, GuestPhysMemory, GuestPhysMemoryMut, MapFlags, PageSize, PageTableBuilder,
    PagingMode, ShadowError, WalkError, Walker,
};

fn machine() -> Machine {
    Machine::new(64 << 20, 8 << 20, PagingMode::default()).unwrap()
}

fn set_pte(m: &mut Machine, pt: &PageTableBuilder, va: u64, gpa: u64) -> u64 {
    let pte = pt.entry_addr(&m.vm, va, 1).unwrap().unwrap();
    let old = m.vm.read_u64(pte).unwrap();
    m.vm.write_u64(pte, (old & !PTE_ADDR_MASK) | gpa).unwrap();
    pte
}

#[test]
fn fills_on_miss_then_hits_without_exits() {
    let mut m = machine();
    let pt = m.new_address_space().unwrap();
    let va = 0x7000_1000u64;
    m.map(&pt, va, 0x12_3000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    let mut s = m.shadow_mmu(PageSize::Size4K, CacheConfig::NONE, true, pt.root());
    let t = s
        .translate(&m.vm, va + 0x10, Access::write().user())
        .unwrap();
    assert_eq!(
        (t.hpa, t.path),
        (HOST_RAM_BASE + 0x12_3010, ShadowPath::Filled)
    );
    // Missed hardware walk (1: root empty) + guest walk (4) + retried walk (4).
    assert_eq!(t.refs, 9);
    let st = s.stats();
    assert_eq!(
        (
            st.misses,
            st.exits,
            st.fills,
            st.tracked_pages,
            st.shadow_pages
        ),
        (1, 1, 1, 4, 4)
    );
    for _ in 0..3 {
        let h = s.translate(&m.vm, va + 0x20, Access::read()).unwrap();
        assert_eq!(
            (h.hpa, h.path, h.refs),
            (HOST_RAM_BASE + 0x12_3020, ShadowPath::ShadowHit, 4)
        );
    }
    assert_eq!(s.stats().exits, 1);
    assert_eq!(s.stats().hits, 3);
    // With a TLB, the second access is a TLB hit.
    let mut s = m.shadow_mmu(PageSize::Size4K, CacheConfig::default(), true, pt.root());
    s.translate(&m.vm, va, Access::read()).unwrap();
    assert_eq!(
        s.translate(&m.vm, va, Access::read()).unwrap().path,
        ShadowPath::TlbHit
    );
}

#[test]
fn guest_faults_pass_through_with_the_walkers_error_code() {
    let mut m = machine();
    let pt = m.new_address_space().unwrap();
    let va = 0x9000_0000u64;
    m.map(
        &pt,
        va,
        0x40_0000,
        PageSize::Size4K,
        MapFlags {
            writable: false,
            ..MapFlags::ALL
        },
    )
    .unwrap();
    let mut s = m.shadow_mmu(PageSize::Size4K, CacheConfig::NONE, true, pt.root());
    let w = Walker::new(m.mode);
    for (addr, access) in [
        (va, Access::write().user()),
        (va + 0x1000, Access::read()),
        (0x8000_0000_0000, Access::read()),
    ] {
        let want = w.walk(&m.vm, pt.root(), addr, access).unwrap_err();
        assert_eq!(
            s.translate(&m.vm, addr, access),
            Err(ShadowError::Guest(want))
        );
    }
    assert_eq!(
        s.stats().guest_faults,
        2,
        "the non-canonical address never reaches the MMU"
    );
    // Making the page writable (an unsync write) lets the next write fault refill the spte.
    s.translate(&m.vm, va, Access::read()).unwrap();
    let pte = pt.entry_addr(&m.vm, va, 1).unwrap().unwrap();
    let v = m.vm.read_u64(pte).unwrap();
    m.vm.write_u64(pte, v | PTE_RW).unwrap();
    s.notify_write(pte);
    let t = s.translate(&m.vm, va, Access::write().user()).unwrap();
    assert_eq!(t.path, ShadowPath::Filled);
}

#[test]
fn last_level_writes_go_unsync_until_invlpg() {
    let mut m = machine();
    let pt = m.new_address_space().unwrap();
    let va = 0x4000_0000u64;
    m.map(&pt, va, 0x10_0000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    m.map(&pt, va + 0x1000, 0x10_1000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    let mut s = m.shadow_mmu(PageSize::Size4K, CacheConfig::NONE, true, pt.root());
    s.translate(&m.vm, va, Access::read()).unwrap();
    s.translate(&m.vm, va + 0x1000, Access::read()).unwrap();
    let exits = s.stats().exits;
    let pte = set_pte(&mut m, &pt, va, 0x20_0000);
    assert!(s.is_tracked(pte) && !s.is_unsync(pte));
    s.notify_write(pte);
    assert!(s.is_unsync(pte));
    assert_eq!(
        s.stats().exits,
        exits + 1,
        "the first write to a protected page exits"
    );
    let pte2 = set_pte(&mut m, &pt, va + 0x1000, 0x20_1000);
    s.notify_write(pte2);
    assert_eq!(
        s.stats().exits,
        exits + 1,
        "an unsync page takes writes without exits"
    );
    assert_eq!(s.stats().unsyncs, 1);
    // Stale until invalidated, as a TLB may be.
    assert_eq!(
        s.translate(&m.vm, va, Access::read()).unwrap().hpa,
        HOST_RAM_BASE + 0x10_0000
    );
    s.invlpg(&m.vm, va);
    assert_eq!(
        s.translate(&m.vm, va, Access::read()).unwrap().hpa,
        HOST_RAM_BASE + 0x20_0000
    );
    // INVLPG resynced only its own entry; the page stays unsync and the other entry stale.
    assert!(s.is_unsync(pte));
    assert_eq!(
        s.translate(&m.vm, va + 0x1000, Access::read()).unwrap().hpa,
        HOST_RAM_BASE + 0x10_1000
    );
    assert_eq!(s.stats().resynced_sptes, 1);
}

#[test]
fn cr3_write_resyncs_every_unsync_page() {
    let mut m = machine();
    let pt = m.new_address_space().unwrap();
    let (va, vb) = (0x4000_0000u64, 0x8000_0000u64); // different page tables
    m.map(&pt, va, 0x10_0000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    m.map(&pt, vb, 0x11_0000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    let mut s = m.shadow_mmu(PageSize::Size4K, CacheConfig::default(), true, pt.root());
    s.translate(&m.vm, va, Access::read()).unwrap();
    s.translate(&m.vm, vb, Access::read()).unwrap();
    let pa = set_pte(&mut m, &pt, va, 0x30_0000);
    let pb = set_pte(&mut m, &pt, vb, 0x31_0000);
    s.notify_write(pa);
    s.notify_write(pb);
    assert!(s.is_unsync(pa) && s.is_unsync(pb));
    s.write_cr3(&m.vm, pt.root());
    assert!(!s.is_unsync(pa) && !s.is_unsync(pb));
    let st = s.stats();
    assert_eq!((st.resyncs, st.resynced_sptes, st.cr3_writes), (2, 2, 1));
    assert_eq!(
        s.translate(&m.vm, va, Access::read()).unwrap().hpa,
        HOST_RAM_BASE + 0x30_0000
    );
    assert_eq!(
        s.translate(&m.vm, vb, Access::read()).unwrap().hpa,
        HOST_RAM_BASE + 0x31_0000
    );
    // Re-protected: the next write exits again.
    let exits = s.stats().exits;
    s.notify_write(pa);
    assert_eq!(s.stats().exits, exits + 1);
}

#[test]
fn upper_level_writes_and_writes_without_unsync_zap_the_shadow_entry() {
    for unsync in [true, false] {
        let mut m = machine();
        let pt = m.new_address_space().unwrap();
        let va = 0x4000_0000u64;
        m.map(&pt, va, 0x10_0000, PageSize::Size4K, MapFlags::ALL)
            .unwrap();
        // A second page table elsewhere mapping the same va range differently.
        let other = m.new_address_space().unwrap();
        m.map(&other, va, 0x22_0000, PageSize::Size4K, MapFlags::ALL)
            .unwrap();
        let other_pde =
            m.vm.read_u64(other.entry_addr(&m.vm, va, 2).unwrap().unwrap())
                .unwrap();
        let mut s = m.shadow_mmu(PageSize::Size4K, CacheConfig::default(), unsync, pt.root());
        assert_eq!(
            s.translate(&m.vm, va, Access::read()).unwrap().hpa,
            HOST_RAM_BASE + 0x10_0000
        );
        // Point our PDE at the other PT: a level-2 write is never unsync; it zaps.
        let pde = pt.entry_addr(&m.vm, va, 2).unwrap().unwrap();
        m.vm.write_u64(pde, other_pde).unwrap();
        s.notify_write(pde);
        assert!(!s.is_unsync(pde));
        let st = s.stats();
        assert!(st.zapped_sptes >= 1 && st.zapped_pages >= 1, "{st:?}");
        assert_eq!(
            s.translate(&m.vm, va, Access::read()).unwrap().hpa,
            HOST_RAM_BASE + 0x22_0000
        );
        // A last-level write without unsync zaps too and is visible at once.
        let pte = set_pte(&mut m, &other, va, 0x23_0000);
        s.notify_write(pte);
        let want = if unsync { 0x22_0000 } else { 0x23_0000 };
        assert_eq!(
            s.translate(&m.vm, va, Access::read()).unwrap().hpa,
            HOST_RAM_BASE + want
        );
        assert_eq!(s.is_unsync(pte), unsync);
    }
}

#[test]
fn address_spaces_share_shadow_pages_and_switch_on_cr3() {
    let mut m = machine();
    let spaces: Vec<PageTableBuilder> = (0..6).map(|_| m.new_address_space().unwrap()).collect();
    let va = 0x1234_5000u64;
    for (i, pt) in spaces.iter().enumerate() {
        m.map(
            pt,
            va,
            0x10_0000 + i as u64 * 0x1000,
            PageSize::Size4K,
            MapFlags::ALL,
        )
        .unwrap();
    }
    // A shared kernel page table: every space's PML4[511] points at the same PDPT.
    let kva = 0xffff_ff80_0000_0000u64;
    m.map(
        &spaces[0],
        kva,
        0x50_0000,
        PageSize::Size4K,
        MapFlags::KERNEL_DATA,
    )
    .unwrap();
    let k =
        m.vm.read_u64(spaces[0].entry_addr(&m.vm, kva, 4).unwrap().unwrap())
            .unwrap();
    for pt in &spaces[1..] {
        let e = pt.entry_addr(&m.vm, kva, 4).unwrap().unwrap();
        m.vm.write_u64(e, k).unwrap();
    }
    let mut s = m.shadow_mmu(
        PageSize::Size4K,
        CacheConfig::default(),
        true,
        spaces[0].root(),
    );
    for round in 0..2 {
        for (i, pt) in spaces.iter().enumerate() {
            s.write_cr3(&m.vm, pt.root());
            assert_eq!(
                s.translate(&m.vm, va, Access::read()).unwrap().hpa,
                HOST_RAM_BASE + 0x10_0000 + i as u64 * 0x1000
            );
            assert_eq!(
                s.translate(&m.vm, kva, Access::read()).unwrap().hpa,
                HOST_RAM_BASE + 0x50_0000
            );
            assert!(s.translate(&m.vm, kva, Access::read().user()).is_err());
            if round == 0 && i == 0 {
                assert_eq!(s.stats().shadow_pages, 7); // 4 user path + 3 kernel path
            }
        }
    }
    let st = s.stats();
    // Only four roots stay cached: the others were freed and rebuilt each round.
    assert!(st.zapped_pages > 0, "{st:?}");
    // The kernel PDPT/PD/PT shadow pages are shared, not rebuilt per space.
    assert!(st.shadow_pages <= 4 * 4 + 3, "{st:?}");
    assert_eq!(st.cr3_writes, 12);
}

#[test]
fn guest_large_pages_are_split_when_the_host_page_is_smaller() {
    let mut m = machine();
    let pt = m.new_address_space().unwrap();
    let va = 0x4000_0000u64;
    m.map(&pt, va, 0x40_0000, PageSize::Size2M, MapFlags::ALL)
        .unwrap();
    for (host, want) in [
        (PageSize::Size4K, PageSize::Size4K),
        (PageSize::Size2M, PageSize::Size2M),
    ] {
        let mut s = m.shadow_mmu(host, CacheConfig::NONE, true, pt.root());
        let a = s.translate(&m.vm, va + 0x1234, Access::read()).unwrap();
        let b = s.translate(&m.vm, va + 0x1f_f008, Access::read()).unwrap();
        assert_eq!((a.hpa, a.size), (HOST_RAM_BASE + 0x40_1234, want));
        assert_eq!(b.hpa, HOST_RAM_BASE + 0x5f_f008);
        let st = s.stats();
        // 4K host: the second 4 KiB piece is another fill in the same direct page.
        let expect_misses = if want == PageSize::Size4K { 2 } else { 1 };
        assert_eq!(st.misses, expect_misses);
        // Direct pages are not tracked: only the three guest tables are.
        assert_eq!(st.tracked_pages, 3);
    }
}

#[test]
fn addresses_outside_the_memory_map_are_typed_errors() {
    let mut m = machine();
    let pt = m.new_address_space().unwrap();
    m.map(&pt, 0x1000, 0x10_0000_0000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    let mut s = m.shadow_mmu(PageSize::Size4K, CacheConfig::default(), true, pt.root());
    assert_eq!(
        s.translate(&m.vm, 0x1008, Access::read()),
        Err(ShadowError::Unmapped {
            gpa: 0x10_0000_0008
        })
    );
    let _ = WalkError::NonCanonical { gva: 0, bits: 48 };
}

/// Shadow pages are shared by (guest table, level), so a path that loops in the guest
/// tables can be made entirely of sptes filled by other, loop-free walks. The hardware walk
/// of the shadow tables must still see the loop and report what the walker reports.
#[test]
fn loops_assembled_from_shared_shadow_pages_are_still_loops() {
    use shadow::paging::{PTE_P, PTE_US};
    use shadow::TableAllocator;
    let va = |a: u64, b: u64, c: u64, d: u64| (a << 39) | (b << 30) | (c << 21) | (d << 12);
    let mut m = machine();
    let pt = m.new_address_space().unwrap();
    let gva1 = va(1, 2, 3, 4); // R[1] -> C, C[2] -> B, B[3] -> A, A[4] -> data
    m.map(&pt, gva1, 0x10_0000, PageSize::Size4K, MapFlags::ALL)
        .unwrap();
    let table_of =
        |m: &Machine, level| pt.entry_addr(&m.vm, gva1, level).unwrap().unwrap() & !0xfff;
    let (r, b, a) = (pt.root(), table_of(&m, 2), table_of(&m, 1));
    let mut page = || m.guest_tables.alloc_table().unwrap();
    let (d, e, f) = (page(), page(), page());
    let link = PTE_P | PTE_RW | PTE_US;
    let w = |m: &mut Machine, table: u64, i: u64, v: u64| m.vm.write_u64(table + i * 8, v).unwrap();
    w(&mut m, r, 5, a | link); // A also serves as a level-3 table
    w(&mut m, a, 6, d | link);
    w(&mut m, d, 8, e | link);
    w(&mut m, e, 9, 0x11_0000 | link);
    w(&mut m, a, 7, b | link); // ... whose entry 7 leads back to B at level 2
    w(&mut m, b, 10, f | link);
    w(&mut m, f, 11, 0x12_0000 | link);
    let (gva3, gva4, gva2) = (va(5, 6, 8, 9), va(5, 7, 10, 11), va(5, 7, 3, 4));
    let walker = Walker::new(m.mode);
    for caches in [CacheConfig::NONE, CacheConfig::default()] {
        let mut s = m.shadow_mmu(PageSize::Size4K, caches, true, pt.root());
        for g in [gva1, gva3, gva4] {
            let want = walker.walk(&m.vm, pt.root(), g, Access::read()).unwrap();
            assert_eq!(
                s.translate(&m.vm, g, Access::read()).unwrap().hpa,
                HOST_RAM_BASE + want.gpa
            );
        }
        // R[5] -> (A,3) -> [7] -> (B,2) -> [3] -> (A,1) -> [4]: every spte exists.
        let want = walker.walk(&m.vm, pt.root(), gva2, Access::read());
        assert!(
            matches!(want, Err(WalkError::TableLoop { level: 1, .. })),
            "{want:?}"
        );
        assert_eq!(
            s.translate(&m.vm, gva2, Access::read()),
            Err(ShadowError::Guest(want.unwrap_err()))
        );
    }
}
