//! The guest page-table walker against tables built in a plain buffer.

use shadow::paging::{pfec, PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PS, PTE_RW, PTE_US};
use shadow::{
    Access, AccessKind, BufferMemory, BumpAllocator, EntryFormat, GuestPhysMemory,
    GuestPhysMemoryMut, MapFlags, PageSize, PageTableBuilder, PagingMode, WalkError, Walker,
};

const MEM: u64 = 64 << 20;
const TABLES: u64 = 48 << 20;

struct Guest {
    mem: BufferMemory,
    alloc: BumpAllocator,
    pt: PageTableBuilder,
}

impl Guest {
    fn new(levels: u8) -> Self {
        let mut mem = BufferMemory::new(0, MEM);
        let mut alloc = BumpAllocator::new(TABLES, MEM);
        let pt = PageTableBuilder::new(&mut mem, &mut alloc, levels, EntryFormat::X86).unwrap();
        Guest { mem, alloc, pt }
    }
    fn map(&mut self, va: u64, pa: u64, size: PageSize, flags: MapFlags) {
        self.pt
            .map(&mut self.mem, &mut self.alloc, va, pa, size, flags)
            .unwrap();
    }
    fn cr3(&self) -> u64 {
        self.pt.root()
    }
    fn entry(&self, va: u64, level: u8) -> u64 {
        self.pt.entry_addr(&self.mem, va, level).unwrap().unwrap()
    }
    fn set_bits(&mut self, va: u64, level: u8, set: u64, clear: u64) {
        let a = self.entry(va, level);
        let v = self.mem.read_u64(a).unwrap();
        self.mem.write_u64(a, (v | set) & !clear).unwrap();
    }
}

fn pf(r: Result<shadow::Translation, WalkError>) -> (u32, u8) {
    match r {
        Err(WalkError::PageFault(p)) => (p.error_code, p.level),
        other => panic!("expected a page fault, got {other:?}"),
    }
}

/// The SDM's rules (vol. 3A §4.6), written out case by case, as the oracle.
fn expected_allowed(flags: MapFlags, access: Access, wp: bool, smep: bool, smap: bool) -> bool {
    match (access.user, access.kind) {
        (true, AccessKind::Read) => flags.user,
        (true, AccessKind::Write) => flags.user && flags.writable,
        (true, AccessKind::Execute) => flags.user && flags.executable,
        (false, AccessKind::Read) => !(flags.user && smap && !access.ac),
        (false, AccessKind::Write) => {
            if flags.user && smap && !access.ac {
                false
            } else {
                flags.writable || !wp
            }
        }
        (false, AccessKind::Execute) => flags.executable && !(flags.user && smep),
    }
}

fn all_accesses() -> Vec<Access> {
    let mut v = Vec::new();
    for kind in [Access::read(), Access::write(), Access::execute()] {
        v.push(kind);
        v.push(kind.user());
        v.push(kind.with_ac());
    }
    v
}

#[test]
fn every_page_size_and_permission_combination() {
    let sizes = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];
    let mut g = Guest::new(4);
    let mut cases = Vec::new();
    let mut va = 0x0000_0040_0000_0000u64;
    for size in sizes {
        for bits in 0..8u8 {
            let flags = MapFlags {
                writable: bits & 1 != 0,
                user: bits & 2 != 0,
                executable: bits & 4 != 0,
                global: false,
            };
            let pa = 0x4000_0000 * 2 + size.bytes() * bits as u64; // aligned for every size
            g.map(va, pa, size, flags);
            cases.push((va, pa, size, flags));
            va += 1 << 30; // own 1 GiB slot for every case
        }
    }
    let mut checked = 0;
    for wp in [true, false] {
        for smep in [false, true] {
            for smap in [false, true] {
                let mode = PagingMode {
                    wp,
                    smep,
                    smap,
                    ..PagingMode::default()
                };
                let w = Walker::new(mode);
                for &(va, pa, size, flags) in &cases {
                    let off = size.bytes() - 8;
                    for access in all_accesses() {
                        let r = w.walk(&g.mem, g.cr3(), va + off, access);
                        let want = expected_allowed(flags, access, wp, smep, smap);
                        match r {
                            Ok(t) => {
                                assert!(want, "{size} {flags:?} {access:?} wp={wp} smep={smep} smap={smap} was allowed");
                                assert_eq!(t.gpa, pa + off);
                                assert_eq!(t.size, size);
                                assert_eq!(t.perms.writable, flags.writable);
                                assert_eq!(t.perms.user, flags.user);
                                assert_eq!(t.perms.executable, flags.executable);
                                assert_eq!(t.entry_gpas().len(), 5 - size.level() as usize);
                            }
                            Err(WalkError::PageFault(p)) => {
                                assert!(!want, "{size} {flags:?} {access:?} wp={wp} smep={smep} smap={smap} faulted");
                                assert_eq!(p.level, size.level());
                                let mut ec = pfec::PRESENT;
                                if access.is_write() {
                                    ec |= pfec::WRITE;
                                }
                                if access.user {
                                    ec |= pfec::USER;
                                }
                                if access.kind == AccessKind::Execute {
                                    ec |= pfec::FETCH;
                                }
                                assert_eq!(p.error_code, ec);
                            }
                            Err(e) => panic!("unexpected {e}"),
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 3 * 8 * 8 * 9);
}

#[test]
fn permissions_accumulate_over_upper_levels() {
    let mut g = Guest::new(4);
    let va = 0x7f00_0000_1000;
    g.map(va, 0x5000, PageSize::Size4K, MapFlags::ALL);
    let w = Walker::new(PagingMode::default());
    assert!(w.walk(&g.mem, g.cr3(), va, Access::write().user()).is_ok());
    // A read-only PDPTE makes the whole subtree read-only for user writes.
    g.set_bits(va, 3, 0, PTE_RW);
    assert_eq!(
        pf(w.walk(&g.mem, g.cr3(), va, Access::write().user())),
        (pfec::PRESENT | pfec::WRITE | pfec::USER, 1)
    );
    // A supervisor-only PML4E hides it from user mode.
    g.set_bits(va, 3, PTE_RW, 0);
    g.set_bits(va, 4, 0, PTE_US);
    assert_eq!(
        pf(w.walk(&g.mem, g.cr3(), va, Access::read().user())),
        (pfec::PRESENT | pfec::USER, 1)
    );
    // NX on the PD entry forbids fetches; without NXE the bit is reserved instead.
    g.set_bits(va, 4, PTE_US, 0);
    g.set_bits(va, 2, PTE_NX, 0);
    assert_eq!(
        pf(w.walk(&g.mem, g.cr3(), va, Access::execute())),
        (pfec::PRESENT | pfec::FETCH, 1)
    );
    let no_nxe = Walker::new(PagingMode {
        nxe: false,
        ..PagingMode::default()
    });
    // Reserved-bit faults stop at the entry (level 2); I/D is not reported without NXE/SMEP.
    assert_eq!(
        pf(no_nxe.walk(&g.mem, g.cr3(), va, Access::execute())),
        (pfec::PRESENT | pfec::RSVD, 2)
    );
}

#[test]
fn not_present_faults_name_the_level_and_access() {
    let mut g = Guest::new(4);
    let va = 0xffff_8000_0020_3000;
    g.map(va, 0x9000, PageSize::Size4K, MapFlags::ALL);
    let w = Walker::new(PagingMode::default());
    for level in [1u8, 2, 3, 4] {
        g.set_bits(va, level, 0, PTE_P);
        assert_eq!(
            pf(w.walk(&g.mem, g.cr3(), va, Access::write().user())),
            (pfec::WRITE | pfec::USER, level)
        );
        assert_eq!(
            pf(w.walk(&g.mem, g.cr3(), va, Access::execute())),
            (pfec::FETCH, level)
        );
        g.set_bits(va, level, PTE_P, 0);
    }
    assert!(w.walk(&g.mem, g.cr3(), va, Access::read()).is_ok());
    // An address nobody mapped stops at the first empty level.
    let (ec, level) = pf(w.walk(&g.mem, g.cr3(), 0x1000, Access::read()));
    assert_eq!((ec, level), (0, 4));
}

#[test]
fn reserved_bits_fault_with_rsvd() {
    let mut g = Guest::new(4);
    let va4k = 0x1000_0000;
    let va2m = 0x4000_0000;
    g.map(va4k, 0x3000, PageSize::Size4K, MapFlags::ALL);
    g.map(va2m, 0x20_0000, PageSize::Size2M, MapFlags::ALL);
    let w = Walker::new(PagingMode {
        max_phys_bits: 40,
        ..PagingMode::default()
    });
    assert!(w.walk(&g.mem, g.cr3(), va4k, Access::read()).is_ok());
    // An address bit above MAXPHYADDR in the PTE.
    g.set_bits(va4k, 1, 1 << 45, 0);
    assert_eq!(
        pf(w.walk(&g.mem, g.cr3(), va4k, Access::read())),
        (pfec::PRESENT | pfec::RSVD, 1)
    );
    // ... but with MAXPHYADDR 52 it is an address bit.
    let t = Walker::new(PagingMode::default())
        .walk(&g.mem, g.cr3(), va4k, Access::read())
        .unwrap();
    assert_eq!(t.gpa, (1 << 45) | 0x3000);
    // A 2 MiB leaf with bit 13 set (must be zero).
    g.set_bits(va2m, 2, 1 << 13, 0);
    assert_eq!(
        pf(w.walk(&g.mem, g.cr3(), va2m, Access::write())),
        (pfec::PRESENT | pfec::RSVD | pfec::WRITE, 2)
    );
    // PS in a PML4 entry is reserved.
    g.set_bits(va2m, 4, PTE_PS, 0);
    assert_eq!(
        pf(w.walk(&g.mem, g.cr3(), va2m, Access::read().user())),
        (pfec::PRESENT | pfec::RSVD | pfec::USER, 4)
    );
    // A 1 GiB leaf without 1 GiB page support.
    let mut g = Guest::new(4);
    g.map(0x8000_0000, 0x4000_0000, PageSize::Size1G, MapFlags::ALL);
    let no1g = Walker::new(PagingMode {
        gb_pages: false,
        ..PagingMode::default()
    });
    assert_eq!(
        pf(no1g.walk(&g.mem, g.cr3(), 0x8000_0000, Access::read())),
        (pfec::PRESENT | pfec::RSVD, 3)
    );
}

#[test]
fn five_level_paging_uses_bits_48_to_56() {
    let mut g = Guest::new(5);
    let va = 0x00ab_cdef_1234_5000u64 & 0x00ff_ffff_ffff_f000; // bit 56 clear: canonical
    let va2 = (va ^ (1 << 50)) & !0x1f_ffff; // another PML5 slot, 2 MiB aligned
    g.map(va, 0x7000, PageSize::Size4K, MapFlags::ALL);
    g.map(va2, 0x20_0000, PageSize::Size2M, MapFlags::ALL);
    let w5 = Walker::new(PagingMode::default().with_la57(true));
    let t = w5
        .walk(&g.mem, g.cr3(), va + 0x123, Access::read())
        .unwrap();
    assert_eq!(t.gpa, 0x7123);
    assert_eq!(t.entry_gpas().len(), 5);
    assert_eq!(t.first_level(), 5);
    for (i, &e) in t.entry_gpas().iter().enumerate() {
        assert_eq!(e, g.entry(va, 5 - i as u8));
    }
    let t2 = w5
        .walk(&g.mem, g.cr3(), va2 + 0x1_0008, Access::read())
        .unwrap();
    assert_eq!(
        (t2.gpa, t2.size, t2.entry_gpas().len()),
        (0x21_0008, PageSize::Size2M, 4)
    );
    // The same address is non-canonical for 4-level paging.
    let w4 = Walker::new(PagingMode::default());
    assert_eq!(
        w4.walk(&g.mem, g.cr3(), va, Access::read()),
        Err(WalkError::NonCanonical { gva: va, bits: 48 })
    );
    assert!(matches!(
        w5.walk(&g.mem, g.cr3(), 0x0100_0000_0000_0000, Access::read()),
        Err(WalkError::NonCanonical { bits: 57, .. })
    ));
}

#[test]
fn accessed_and_dirty_bits_are_set_only_on_success() {
    let mut g = Guest::new(4);
    let va = 0x2000_0000;
    g.map(
        va,
        0x8000,
        PageSize::Size4K,
        MapFlags {
            writable: false,
            ..MapFlags::ALL
        },
    );
    let w = Walker::new(PagingMode::default());
    let cr3 = g.cr3();
    assert!(w
        .walk_and_set_ad(&mut g.mem, cr3, va, Access::write())
        .is_err());
    for level in 1..=4 {
        assert_eq!(
            g.mem.read_u64(g.entry(va, level)).unwrap() & PTE_A,
            0,
            "A set on a failed walk at level {level}"
        );
    }
    let t = w
        .walk_and_set_ad(&mut g.mem, cr3, va, Access::read())
        .unwrap();
    for &e in t.entry_gpas() {
        let v = g.mem.read_u64(e).unwrap();
        assert_eq!(v & (PTE_A | PTE_D), PTE_A);
    }
    g.set_bits(va, 1, PTE_RW, 0);
    w.walk_and_set_ad(&mut g.mem, cr3, va, Access::write())
        .unwrap();
    assert_eq!(g.mem.read_u64(g.entry(va, 1)).unwrap() & PTE_D, PTE_D);
    assert_eq!(
        g.mem.read_u64(g.entry(va, 2)).unwrap() & PTE_D,
        0,
        "D is only for leaves"
    );
}

#[test]
fn bad_tables_give_typed_errors() {
    let mut g = Guest::new(4);
    let va = 0x3000_0000;
    g.map(va, 0x1000, PageSize::Size4K, MapFlags::ALL);
    let w = Walker::new(PagingMode::default());
    // CR3 outside guest memory.
    assert!(matches!(
        w.walk(&g.mem, 0x1_0000_0000, va, Access::read()),
        Err(WalkError::TableOutsideMemory { level: 4, entry_gpa, .. }) if entry_gpa >> 12 == 0x1_0000_0000 >> 12
    ));
    // A PDE pointing outside guest memory.
    let pde = g.entry(va, 2);
    g.mem
        .write_u64(pde, 0x40_0000_0000 | PTE_P | PTE_RW)
        .unwrap();
    assert!(matches!(
        w.walk(&g.mem, g.cr3(), va, Access::read()),
        Err(WalkError::TableOutsideMemory { level: 1, .. })
    ));
    // A PDPTE pointing back at the PML4: a loop.
    let pdpte = g.entry(va, 3);
    g.mem.write_u64(pdpte, g.cr3() | PTE_P | PTE_RW).unwrap();
    assert_eq!(
        w.walk(&g.mem, g.cr3(), va, Access::read()),
        Err(WalkError::TableLoop {
            gva: va,
            level: 2,
            table_gpa: g.cr3()
        })
    );
    // Non-canonical.
    assert!(matches!(
        w.walk(&g.mem, g.cr3(), 0x8000_0000_0000, Access::read()),
        Err(WalkError::NonCanonical { .. })
    ));
}

#[test]
fn recursive_self_map_works_when_allowed() {
    let mut g = Guest::new(4);
    let cr3 = g.cr3();
    g.mem
        .write_u64(cr3 + 510 * 8, cr3 | PTE_P | PTE_RW)
        .unwrap();
    // Indices 510/510/510/510: the PML4 page itself, read as data.
    let va = 0xffff_ff7f_bfdf_e000u64;
    let strict = Walker::new(PagingMode::default());
    assert!(matches!(
        strict.walk(&g.mem, cr3, va, Access::read()),
        Err(WalkError::TableLoop { level: 3, .. })
    ));
    let t = strict
        .allow_recursive_tables(true)
        .walk(&g.mem, cr3, va + 8, Access::read())
        .unwrap();
    assert_eq!(t.gpa, cr3 + 8);
    assert_eq!(t.entry_gpas(), &[cr3 + 510 * 8; 4]);
    let _ = PTE_US;
}
