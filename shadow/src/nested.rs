//! The two-dimensional (nested) walk: EPT/NPT tables built in host memory, and a model of
//! the hardware that walks guest tables through them, with its caches.
//!
//! With nested paging every guest page-table access is itself a guest-physical address that
//! must be translated by the host's tables before it can be read. A guest walk of n levels
//! over host tables of m levels therefore reads n guest entries, each preceded by an m-step
//! host walk, and finishes with an m-step host walk of the final address:
//! n(m+1) + m = (n+1)(m+1) − 1 references — 24 for 4/4, 19 when 2 MiB host leaves make
//! m = 3, 35 for 5/5. [`NestedMmu`] counts exactly these reads. Its caches remove most of
//! them in steady state:
//!
//! * a TLB (guest-virtual → host-physical, for the smaller of the guest and host pages);
//! * a guest paging-structure cache ("combined" entries, Intel SDM vol. 3A §28.4.1):
//!   upper guest-virtual bits → host-physical address of a lower guest table, so a walk
//!   skips the guest levels above it and their host walks;
//! * a nested TLB (Bhargava et al., ASPLOS 2008): guest-physical page → host-physical page
//!   for the walk's own accesses, skipping whole host walks;
//! * a nested paging-structure cache: upper guest-physical bits → host-physical address of
//!   a lower EPT table.
//!
//! Guest INVLPG drops the page's TLB entries and the guest paging-structure cache; a guest
//! CR3 write flushes non-global TLB entries and that cache; neither touches the nested
//! caches, which only [`NestedMmu::invept`] flushes (as INVEPT does).

use crate::builder::{BuildError, EntryFormat, MapFlags, PageTableBuilder, TableAllocator};
use crate::cache::{CacheConfig, CacheStats, LruCache, Tlb, TlbEntry};
use crate::mem::{GuestPhysMemory, GuestPhysMemoryMut, MemoryMap};
use crate::paging::{
    level_shift, table_index, Access, PageSize, PagingMode, Permissions, PTE_ADDR_MASK,
};
use crate::walker::{CoreError, WalkError, WalkStart, Walker};
use serde::Serialize;

/// Which access of a nested walk hit a hole in the host tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NestedAccess {
    /// Reading a guest page-table entry.
    GuestTable,
    /// The translated address itself.
    Data,
}

impl std::fmt::Display for NestedAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NestedAccess::GuestTable => "a guest page-table entry",
            NestedAccess::Data => "the translated address",
        })
    }
}

/// Why a nested translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NestedError {
    /// The guest walk itself failed (the fault the guest would see).
    #[error(transparent)]
    Guest(#[from] WalkError),
    /// A guest-physical address is not mapped by the host tables (an EPT violation / NPF).
    #[error(
        "EPT violation at guest-physical {gpa:#x} ({during}): no host mapping at level {level}"
    )]
    EptViolation {
        /// The guest-physical address.
        gpa: u64,
        /// Level of the host entry that was not present.
        level: u8,
        /// What the access was for.
        during: NestedAccess,
    },
    /// A host table entry lies outside host memory (broken host tables).
    #[error("host table entry at host-physical {hpa:#x} (level {level}) is outside host memory")]
    HostTableOutsideMemory {
        /// The entry's host-physical address.
        hpa: u64,
        /// Its level.
        level: u8,
    },
}

/// A host leaf found by a nested walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLeaf {
    /// Host-physical address of the translated byte.
    pub hpa: u64,
    /// Size of the host page.
    pub size: PageSize,
}

/// EPT (or NPT) tables in host memory mapping guest-physical addresses to host-physical ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NestedTables {
    root: u64,
    levels: u8,
    format: EntryFormat,
    host_page: PageSize,
}

impl NestedTables {
    /// Builds tables of `levels` (4 or 5) levels in `host` for every region of `map`, using
    /// `host_page` leaves (4 KiB or 2 MiB; 2 MiB only where guest and host addresses are both
    /// 2 MiB-aligned and the region covers the whole page, 4 KiB elsewhere). Table pages
    /// come from `alloc`, which must hand out host-physical pages outside guest RAM.
    pub fn build<M: GuestPhysMemoryMut + ?Sized, A: TableAllocator + ?Sized>(
        host: &mut M,
        alloc: &mut A,
        map: &MemoryMap,
        levels: u8,
        host_page: PageSize,
        format: EntryFormat,
    ) -> Result<Self, BuildError> {
        let b = PageTableBuilder::new(host, alloc, levels, format)?;
        let big = PageSize::Size2M.bytes();
        for r in map.regions() {
            let mut gpa = r.gpa;
            let end = r.gpa + r.size;
            while gpa < end {
                let hpa = r.hpa + (gpa - r.gpa);
                if host_page != PageSize::Size4K
                    && gpa % big == 0
                    && hpa % big == 0
                    && gpa + big <= end
                {
                    b.map(host, alloc, gpa, hpa, PageSize::Size2M, MapFlags::ALL)?;
                    gpa += big;
                } else {
                    b.map(host, alloc, gpa, hpa, PageSize::Size4K, MapFlags::ALL)?;
                    gpa += 0x1000;
                }
            }
        }
        Ok(NestedTables {
            root: b.root(),
            levels,
            format,
            host_page,
        })
    }

    /// Host-physical address of the root table (the EPTP / nCR3 address).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Table depth m.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// The leaf size asked for at build time.
    pub fn host_page(&self) -> PageSize {
        self.host_page
    }

    /// Uncached translation of `gpa`, adding one to `refs` per entry read.
    pub fn translate<M: GuestPhysMemory + ?Sized>(
        &self,
        host: &M,
        gpa: u64,
        refs: &mut u32,
    ) -> Result<HostLeaf, NestedError> {
        self.walk_from(
            host,
            gpa,
            (self.levels, self.root),
            refs,
            NestedAccess::Data,
            |_, _| {},
        )
    }

    /// Walks from `table` at `level`; `on_table(level, table_hpa)` sees every lower table.
    #[inline(always)]
    fn walk_from<M: GuestPhysMemory + ?Sized>(
        &self,
        host: &M,
        gpa: u64,
        (mut level, mut table): (u8, u64),
        refs: &mut u32,
        during: NestedAccess,
        mut on_table: impl FnMut(u8, u64),
    ) -> Result<HostLeaf, NestedError> {
        if gpa >> (12 + 9 * self.levels as u32) != 0 {
            return Err(NestedError::EptViolation {
                gpa,
                level: self.levels,
                during,
            });
        }
        loop {
            let addr = table + table_index(gpa, level) * 8;
            let e = host
                .read_u64(addr)
                .map_err(|_| NestedError::HostTableOutsideMemory { hpa: addr, level })?;
            *refs += 1;
            if !self.format.is_present(e) {
                return Err(NestedError::EptViolation { gpa, level, during });
            }
            if self.format.is_leaf(e, level) {
                let size = PageSize::from_level(level).unwrap_or(PageSize::Size1G);
                let base = e & PTE_ADDR_MASK & !size.offset_mask();
                return Ok(HostLeaf {
                    hpa: base | (gpa & size.offset_mask()),
                    size,
                });
            }
            table = e & PTE_ADDR_MASK;
            level -= 1;
            on_table(level, table);
        }
    }
}

/// Configuration of the nested model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NestedConfig {
    /// The guest's paging mode.
    pub guest_mode: PagingMode,
    /// Cache sizes (all zero for exact architectural reference counts).
    pub caches: CacheConfig,
}

/// What the nested model did for one translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NestedTranslation {
    /// Host-physical address.
    pub hpa: u64,
    /// Guest-physical address.
    pub gpa: u64,
    /// Size of the TLB entry it made (the smaller of guest and host page).
    pub size: PageSize,
    /// Memory references made (0 on a TLB hit).
    pub refs: u32,
    /// Whether the TLB answered.
    pub tlb_hit: bool,
}

/// Counters of the nested model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct NestedStats {
    /// Translations asked for.
    pub translations: u64,
    /// Translations that faulted (guest fault or EPT violation).
    pub faults: u64,
    /// TLB hits and misses.
    pub tlb: CacheStats,
    /// Walks that started below the top thanks to the guest paging-structure cache
    /// (hits) or from CR3 (misses).
    pub walk_cache: CacheStats,
    /// Nested TLB hits and misses (one lookup per guest-physical access of a walk).
    pub nested_tlb: CacheStats,
    /// Host walks shortened by the nested paging-structure cache (hits) or not (misses).
    pub nested_walk_cache: CacheStats,
    /// Guest page-table entries read.
    pub guest_refs: u64,
    /// Host (EPT/NPT) entries read.
    pub host_refs: u64,
    /// Largest number of references of one translation.
    pub max_refs: u32,
}

impl NestedStats {
    /// All references.
    pub fn total_refs(&self) -> u64 {
        self.guest_refs + self.host_refs
    }
    /// Mean references per translation.
    pub fn mean_refs(&self) -> f64 {
        if self.translations == 0 {
            0.0
        } else {
            self.total_refs() as f64 / self.translations as f64
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct WalkCacheEntry {
    table_gpa: u64,
    table_hpa: u64,
    perms: Permissions,
    visited: [u64; 5],
    nvisited: u8,
}

#[inline(always)]
fn prefix_key(addr: u64, level: u8) -> u64 {
    ((addr >> level_shift(level)) << 3) | level as u64
}

/// The nested caches and the host tables, kept apart from the guest walker so the walk's
/// read closure can borrow them while the walker runs.
#[derive(Debug, Clone)]
struct HostSide {
    ept: NestedTables,
    ntlb: LruCache<HostLeaf>,
    npwc: LruCache<u64>,
    stats_ntlb: CacheStats,
    stats_npwc: CacheStats,
    host_refs: u64,
}

impl HostSide {
    /// gpa → hpa through the nested TLB, the nested walk cache and the host tables.
    #[inline]
    fn translate<M: GuestPhysMemory + ?Sized>(
        &mut self,
        host: &M,
        gpa: u64,
        refs: &mut u32,
        during: NestedAccess,
    ) -> Result<HostLeaf, NestedError> {
        if self.ntlb.capacity() > 0 {
            for size in [PageSize::Size4K, PageSize::Size2M] {
                if let Some(l) = self
                    .ntlb
                    .lookup(((gpa >> size.shift()) << 2) | size.level() as u64)
                {
                    if l.size == size {
                        self.stats_ntlb.hits += 1;
                        return Ok(HostLeaf {
                            hpa: l.hpa | (gpa & size.offset_mask()),
                            size,
                        });
                    }
                }
            }
            self.stats_ntlb.misses += 1;
        }
        let mut level = self.ept.levels;
        let mut table = self.ept.root;
        if self.npwc.capacity() > 0 {
            let mut hit = false;
            for l in 2..=self.ept.levels {
                if let Some(t) = self.npwc.lookup(prefix_key(gpa, l)) {
                    level = l - 1;
                    table = t;
                    hit = true;
                    break;
                }
            }
            if hit {
                self.stats_npwc.hits += 1;
            } else {
                self.stats_npwc.misses += 1;
            }
        }
        let before = *refs;
        let npwc = &mut self.npwc;
        let leaf = self
            .ept
            .walk_from(host, gpa, (level, table), refs, during, |l, t| {
                // The entry at level l+1 points to table t: cache it under the bits above l.
                npwc.insert(prefix_key(gpa, l + 1), t);
            })?;
        self.host_refs += (*refs - before) as u64;
        let base = leaf.hpa & !leaf.size.offset_mask();
        self.ntlb.insert(
            ((gpa >> leaf.size.shift()) << 2) | leaf.size.level() as u64,
            HostLeaf {
                hpa: base,
                size: leaf.size,
            },
        );
        Ok(leaf)
    }
}

/// The 2-D walk hardware of one vCPU: guest walker, host tables and caches.
#[derive(Debug, Clone)]
pub struct NestedMmu {
    walker: Walker,
    mode: PagingMode,
    cr3: u64,
    host: HostSide,
    tlb: Tlb,
    pwc: LruCache<WalkCacheEntry>,
    stats: NestedStats,
}

impl NestedMmu {
    /// A nested MMU over `ept` with the guest's CR3 initially `cr3`.
    pub fn new(config: NestedConfig, ept: NestedTables, cr3: u64) -> Self {
        let c = config.caches;
        NestedMmu {
            walker: Walker::new(config.guest_mode),
            mode: config.guest_mode,
            cr3,
            host: HostSide {
                ept,
                ntlb: LruCache::new(c.nested_tlb_entries, usize::MAX),
                npwc: LruCache::new(c.nested_walk_cache_entries, usize::MAX),
                stats_ntlb: CacheStats::default(),
                stats_npwc: CacheStats::default(),
                host_refs: 0,
            },
            tlb: Tlb::new(c.tlb),
            pwc: LruCache::new(c.walk_cache_entries, usize::MAX),
            stats: NestedStats::default(),
        }
    }

    /// Allow recursive (self-referencing) guest tables, as [`Walker::allow_recursive_tables`].
    pub fn allow_recursive_tables(mut self, allow: bool) -> Self {
        self.walker = self.walker.allow_recursive_tables(allow);
        self
    }

    /// The host tables.
    pub fn tables(&self) -> &NestedTables {
        &self.host.ept
    }

    /// The current guest CR3.
    pub fn cr3(&self) -> u64 {
        self.cr3
    }

    /// Guest CR3 write: loads `cr3`, flushes non-global TLB entries (all when CR4.PGE is
    /// clear) and the guest paging-structure cache.
    pub fn write_cr3(&mut self, cr3: u64) {
        self.cr3 = cr3;
        self.tlb.flush(self.mode.pge);
        self.pwc.clear();
    }

    /// Guest INVLPG: drops the TLB entries for `gva` and the guest paging-structure cache.
    pub fn invlpg(&mut self, gva: u64) {
        self.tlb.invalidate_page(gva);
        self.pwc.clear();
    }

    /// INVEPT (all contexts): flushes every cache, nested ones included.
    pub fn invept(&mut self) {
        self.tlb.flush(false);
        self.pwc.clear();
        self.host.ntlb.clear();
        self.host.npwc.clear();
    }

    /// Forgets every counter (caches keep their contents): for measuring a steady state.
    pub fn reset_stats(&mut self) {
        self.stats = NestedStats::default();
        self.tlb.reset_stats();
        self.host.stats_ntlb = CacheStats::default();
        self.host.stats_npwc = CacheStats::default();
        self.host.host_refs = 0;
    }

    /// Counters so far.
    pub fn stats(&self) -> NestedStats {
        let mut s = self.stats;
        s.tlb = self.tlb.stats();
        s.nested_tlb = self.host.stats_ntlb;
        s.nested_walk_cache = self.host.stats_npwc;
        s.host_refs = self.host.host_refs;
        s
    }

    /// Translates `gva` for `access` in the current address space, reading guest tables
    /// and host tables from `host` (host-physical memory).
    pub fn translate<M: GuestPhysMemory + ?Sized>(
        &mut self,
        host: &M,
        gva: u64,
        access: Access,
    ) -> Result<NestedTranslation, NestedError> {
        self.stats.translations += 1;
        if let Some(e) = self.tlb.lookup(gva) {
            if e.perms.allows(access, &self.mode) {
                let off = gva & e.size.offset_mask();
                return Ok(NestedTranslation {
                    hpa: e.page | off,
                    gpa: e.gpa_page | off,
                    size: e.size,
                    refs: 0,
                    tlb_hit: true,
                });
            }
            // The cached permissions forbid it: walk again, as the CPU does before faulting.
            self.tlb.invalidate_page(gva);
        }
        let r = self.translate_slow(host, gva, access);
        match &r {
            Ok(t) => self.stats.max_refs = self.stats.max_refs.max(t.refs),
            Err(_) => self.stats.faults += 1,
        }
        r
    }

    /// TLB miss: the 2-D walk with its caches.
    #[inline(never)]
    fn translate_slow<M: GuestPhysMemory + ?Sized>(
        &mut self,
        host: &M,
        gva: u64,
        access: Access,
    ) -> Result<NestedTranslation, NestedError> {
        let mut start = self.walker.start(self.cr3, gva)?;
        let mut known: Option<(u64, u64)> = None;
        if self.pwc.capacity() > 0 {
            for l in 2..=self.mode.levels() {
                if let Some(e) = self.pwc.lookup(prefix_key(gva, l)) {
                    start = WalkStart {
                        level: l - 1,
                        table: e.table_gpa,
                        perms: e.perms,
                        visited: e.visited,
                        nvisited: e.nvisited,
                    };
                    known = Some((e.table_gpa, e.table_hpa));
                    break;
                }
            }
            if known.is_some() {
                self.stats.walk_cache.hits += 1;
            } else {
                self.stats.walk_cache.misses += 1;
            }
        }
        let mut refs = 0u32;
        let mut table_hpa = [0u64; 6];
        let host_side = &mut self.host;
        let walker = self.walker;
        let t = walker
            .walk_core(gva, access, start, |level, table, entry| {
                let hpa = match known {
                    Some((g, h)) if g == table => h,
                    _ => {
                        let leaf = host_side.translate(
                            host,
                            table,
                            &mut refs,
                            NestedAccess::GuestTable,
                        )?;
                        leaf.hpa
                    }
                };
                table_hpa[level as usize] = hpa;
                refs += 1;
                host.read_u64(hpa + (entry - table)).map_err(|_| {
                    NestedError::HostTableOutsideMemory {
                        hpa: hpa + (entry - table),
                        level,
                    }
                })
            })
            .map_err(|e| match e {
                CoreError::Walk(w) => NestedError::Guest(w),
                CoreError::Read(r) => r,
            })?;
        self.stats.guest_refs += t.entry_gpas().len() as u64;
        let leaf = self
            .host
            .translate(host, t.gpa, &mut refs, NestedAccess::Data)?;

        // Cache every guest table the walk went through below the top.
        if self.pwc.capacity() > 0 {
            let mut perms = start.perms;
            let mut visited = start.visited;
            let mut nvisited = start.nvisited as usize;
            let values = t.entry_values();
            let gpas = t.entry_gpas();
            for (i, (&v, &g)) in values.iter().zip(gpas).enumerate() {
                let level = t.first_level() - i as u8;
                if level <= t.leaf_level() {
                    break;
                }
                perms = perms.accumulate(v, self.mode.nxe);
                if nvisited < 5 {
                    visited[nvisited] = g & !0xfff;
                    nvisited += 1;
                }
                let next = v & PTE_ADDR_MASK & ((1u64 << self.mode.max_phys_bits) - 1);
                self.pwc.insert(
                    prefix_key(gva, level),
                    WalkCacheEntry {
                        table_gpa: next,
                        table_hpa: table_hpa[level as usize - 1],
                        perms,
                        visited,
                        nvisited: nvisited as u8,
                    },
                );
            }
        }

        let size = t.size.min(leaf.size);
        let mask = size.offset_mask();
        self.tlb.insert(
            gva,
            TlbEntry {
                page: leaf.hpa & !mask,
                gpa_page: t.gpa & !mask,
                size,
                guest_size: t.size,
                perms: t.perms,
                global: t.global,
            },
        );
        Ok(NestedTranslation {
            hpa: leaf.hpa,
            gpa: t.gpa,
            size,
            refs,
            tlb_hit: false,
        })
    }
}
