//! Property: on random page tables (including corrupted ones) and random addresses, the
//! plain walker, the nested model and the shadow tables always give the same answer, with
//! and without caches, before and after random table writes followed by a CR3 write.

use proptest::prelude::*;
use shadow::nested::NestedAccess;
use shadow::testbed::Machine;
use shadow::{
    Access, AccessKind, CacheConfig, GuestPhysMemoryMut, MapFlags, MemoryMap, MemoryRegion,
    NestedError, NestedMmu, PageSize, PagingMode, ShadowError, ShadowMmu, WalkError, Walker,
};

const HOLE_START: u64 = 8 << 20;
const HOLE_END: u64 = 16 << 20;
const RAM_END: u64 = 24 << 20;

#[derive(Debug, Clone)]
struct Mapping {
    slot: u64,
    size: PageSize,
    gpa_frame: u64,
    flags: u8,
}

#[derive(Debug, Clone)]
struct Corruption {
    /// Hit the entry at `level` on the walk path of mapping `table_pick` rather than a
    /// random entry (`slot`) of a random table.
    on_path: bool,
    level: u8,
    table_pick: usize,
    slot: u64,
    kind: u8,
    raw: u64,
}

fn mapping() -> impl Strategy<Value = Mapping> {
    (0u64..64, prop_oneof![6 => Just(PageSize::Size4K), 3 => Just(PageSize::Size2M), 1 => Just(PageSize::Size1G)], 0u64..12, 0u8..16)
        .prop_map(|(slot, size, gpa_frame, flags)| Mapping { slot, size, gpa_frame, flags })
}

fn corruption() -> impl Strategy<Value = Corruption> {
    (
        any::<bool>(),
        1u8..=5,
        any::<usize>(),
        0u64..512,
        0u8..5,
        any::<u64>(),
    )
        .prop_map(|(on_path, level, table_pick, slot, kind, raw)| Corruption {
            on_path,
            level,
            table_pick,
            slot,
            kind,
            raw,
        })
}

/// Virtual address of mapping slot `slot`: spread over PML4/PDPT/PD/PT indices.
fn slot_va(slot: u64, size: PageSize, la57: bool) -> u64 {
    let top = if la57 { (slot & 3) << 48 } else { 0 };
    let va = top
        | ((slot & 7) << 39)
        | (((slot >> 3) & 3) << 30)
        | ((slot & 5) << 21)
        | ((slot & 3) << 12);
    va & !size.offset_mask()
}

fn flags(bits: u8) -> MapFlags {
    MapFlags {
        writable: bits & 1 != 0,
        user: bits & 2 != 0,
        executable: bits & 4 != 0,
        global: bits & 8 != 0,
    }
}

fn access(bits: u8) -> Access {
    let kind = match bits % 3 {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Execute,
    };
    Access {
        kind,
        user: bits & 4 != 0,
        ac: bits & 8 != 0,
    }
}

struct Models {
    nested: Vec<NestedMmu>,
    shadows: Vec<ShadowMmu>,
}

fn check(
    m: &Machine,
    models: &mut Models,
    walker: &Walker,
    cr3: u64,
    gva: u64,
    acc: Access,
) -> Result<(), TestCaseError> {
    let want = walker.walk(&m.vm, cr3, gva, acc);
    let want_hpa = want
        .as_ref()
        .ok()
        .and_then(|t| m.vm.map().gpa_to_hpa(t.gpa));
    for (i, n) in models.nested.iter_mut().enumerate() {
        let got = n.translate(m.vm.host(), gva, acc);
        match (&want, &got) {
            (Ok(t), Ok(g)) => {
                prop_assert_eq!(g.gpa, t.gpa, "nested #{} gpa for {:#x}", i, gva);
                prop_assert_eq!(Some(g.hpa), want_hpa);
            }
            (
                Ok(t),
                Err(NestedError::EptViolation {
                    gpa,
                    during: NestedAccess::Data,
                    ..
                }),
            ) => {
                prop_assert_eq!(*gpa, t.gpa);
                prop_assert!(want_hpa.is_none());
            }
            (
                Err(WalkError::TableOutsideMemory { .. }),
                Err(NestedError::EptViolation {
                    during: NestedAccess::GuestTable,
                    ..
                }),
            ) => {}
            (Err(w), Err(NestedError::Guest(g))) => {
                prop_assert_eq!(w, g, "nested #{} for {:#x}", i, gva)
            }
            _ => prop_assert!(
                false,
                "nested #{} disagrees for {:#x} {:?}: walker {:?}, nested {:?}",
                i,
                gva,
                acc,
                want,
                got
            ),
        }
    }
    for (i, s) in models.shadows.iter_mut().enumerate() {
        let got = s.translate(&m.vm, gva, acc);
        match (&want, &got) {
            (Ok(_), Ok(g)) => {
                prop_assert_eq!(Some(g.hpa), want_hpa, "shadow #{} for {:#x}", i, gva)
            }
            (Ok(t), Err(ShadowError::Unmapped { gpa })) => {
                prop_assert_eq!(*gpa, t.gpa);
                prop_assert!(want_hpa.is_none());
            }
            (Err(w), Err(ShadowError::Guest(g))) => {
                prop_assert_eq!(w, g, "shadow #{} for {:#x}", i, gva)
            }
            _ => prop_assert!(
                false,
                "shadow #{} disagrees for {:#x} {:?}: walker {:?}, shadow {:?}",
                i,
                gva,
                acc,
                want,
                got
            ),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn walker_nested_and_shadow_agree(
        la57 in any::<bool>(),
        mode_bits in 0u8..16,
        maps in prop::collection::vec(mapping(), 1..24),
        before in prop::collection::vec(corruption(), 0..4),
        after in prop::collection::vec(corruption(), 0..4),
        queries in prop::collection::vec((0u64..64, any::<u64>(), 0u8..16, any::<bool>()), 1..48),
    ) {
        // PGE off: a CR3 write then flushes every TLB entry, so after phase-2 writes all
        // models must agree again (with PGE, stale global entries are architecturally fine).
        let mode = PagingMode {
            la57, wp: mode_bits & 1 != 0, smep: mode_bits & 2 != 0, smap: mode_bits & 4 != 0, nxe: mode_bits & 8 != 0,
            pge: false, ..PagingMode::default()
        };
        let map = MemoryMap::new(vec![
            MemoryRegion { gpa: 0, size: HOLE_START, hpa: shadow::testbed::HOST_RAM_BASE },
            MemoryRegion { gpa: HOLE_END, size: RAM_END - HOLE_END, hpa: shadow::testbed::HOST_RAM_BASE + HOLE_END + (2 << 20) },
        ]).unwrap();
        let mut m = Machine::from_map(map, 4 << 20, HOLE_START, mode).unwrap();
        let pt = m.new_address_space().unwrap();
        let mut tables = vec![pt.root()];
        for mp in &maps {
            let va = slot_va(mp.slot, mp.size, la57);
            // Data frames: low RAM, the hole, or the high region, all size-aligned.
            let gpa = (mp.gpa_frame * (2 << 20)) & !mp.size.offset_mask();
            // Conflicting sizes at one slot are refused by the builder; that is fine.
            let _ = m.map(&pt, va, gpa, mp.size, flags(mp.flags));
        }
        // Every table page the builder handed out.
        tables.extend(m.guest_tables.used().step_by(0x1000).filter(|&t| t != pt.root()));
        let levels = mode.levels();
        // Returns the entry written, or None when the path led outside guest memory.
        let corrupt = |m: &mut Machine, c: &Corruption, tables: &[u64]| -> Option<u64> {
            let mp = &maps[c.table_pick % maps.len()];
            let on_path = if c.on_path {
                pt.entry_addr(&m.vm, slot_va(mp.slot, mp.size, la57), c.level.min(levels)).ok().flatten()
            } else {
                None
            };
            let addr = on_path.unwrap_or(tables[c.table_pick % tables.len()] + c.slot * 8);
            let other = tables[(c.raw as usize >> 3) % tables.len()];
            let value = match c.kind {
                0 => 0,
                1 => other | (c.raw & 0x8000_0000_0000_01ff), // another table: loops, sharing
                2 => (HOLE_START + (c.raw & 0x3f_f000)) | (c.raw & 0x1ff), // into the hole
                4 => pt.root() | 0x7 | (c.raw & 0x160), // back to the root: a loop on this path
                _ => c.raw, // anything
            };
            m.vm.write_u64(addr, value).ok().map(|_| addr)
        };
        for c in &before { corrupt(&mut m, c, &tables); }

        let walker = Walker::new(mode);
        let mut models = Models { nested: Vec::new(), shadows: Vec::new() };
        for host in [PageSize::Size4K, PageSize::Size2M] {
            for caches in [CacheConfig::NONE, CacheConfig::default()] {
                models.nested.push(m.nested_mmu(host, caches, pt.root()).unwrap());
                for unsync in [true, false] {
                    models.shadows.push(m.shadow_mmu(host, caches, unsync, pt.root()));
                }
            }
        }
        let addr_of = |q: &(u64, u64, u8, bool)| {
            if q.3 {
                let mp = &maps[q.0 as usize % maps.len()];
                slot_va(mp.slot, mp.size, la57) + (q.1 & mp.size.offset_mask() & !7)
            } else {
                // Anything: canonical (sign-extended) or, one time in four, not.
                let bits = if la57 { 57 } else { 48 };
                if q.2 & 3 == 0 { q.1 } else { (((q.1 << (64 - bits)) as i64) >> (64 - bits)) as u64 }
            }
        };
        // Twice: the second round runs on warm TLBs, walk caches and shadow tables.
        for _ in 0..2 {
            for q in &queries {
                check(&m, &mut models, &walker, pt.root(), addr_of(q), access(q.2))?;
            }
        }
        // Phase 2: the guest rewrites entries; the shadow hears of each write; then CR3.
        for c in &after {
            if let Some(addr) = corrupt(&mut m, c, &tables) {
                for s in &mut models.shadows { s.notify_write(addr); }
            }
        }
        for n in &mut models.nested { n.write_cr3(pt.root()); }
        for s in &mut models.shadows { s.write_cr3(&m.vm, pt.root()); }
        for q in &queries {
            check(&m, &mut models, &walker, pt.root(), addr_of(q), access(q.2))?;
        }
    }
}
