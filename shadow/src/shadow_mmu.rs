//! Shadow page tables in the manner of KVM's shadow MMU
//! (Linux Documentation/virt/kvm/x86/mmu.rst).
//!
//! A *shadow page* is a 512-entry table the hardware walks instead of a guest table. Each
//! indirect shadow page mirrors one guest table page at one level, keyed by (guest-physical
//! page, level), and is shared by every address space whose tables use that page, as KVM
//! shares them by (gfn, role). The root of an address space is the shadow page of its CR3
//! table; a few recent roots stay cached (KVM keeps three previous roots), older ones are
//! freed. A *direct* shadow page has no guest table behind it: it splits a guest large page
//! the host cannot map whole (guest 2 MiB page over 4 KiB host pages).
//!
//! Shadow entries (sptes) are x86 entries whose address is host-physical: a lower shadow
//! page, or the host page backing the guest page. Their R/W, U/S and NX bits are the guest
//! entry's, so a hardware walk of the shadow tables accumulates exactly the permissions the
//! guest walk would.
//!
//! **Filling.** A translation first tries the TLB, then walks the shadow tables (as the CPU
//! does, counting its memory references, with a paging-structure cache in front). If an
//! spte is missing or forbids the access, real hardware would take a page fault that exits
//! to the hypervisor; the model counts that exit, walks the guest tables in software, and
//! either reports the guest's own fault (which KVM would inject) or creates the missing
//! shadow pages and fills the sptes along the path, composing the guest translation with the
//! memory map.
//!
//! **Write tracking.** Every guest page that has an indirect shadow page is *tracked*. The
//! VMM reports writes to guest memory with [`ShadowMmu::notify_write`] (fed from KVM's dirty
//! log, or from the workload that made the write). A write to a tracked page would, under
//! real shadow paging, hit a write-protected page and exit. If every shadow page of that
//! guest page is a last-level table and unsync is enabled, the pages are marked *unsync*
//! and unprotected: the guest may now write them freely (no more exits) and the sptes may go
//! stale, which the architecture allows until the guest invalidates. Otherwise the write is
//! emulated: the spte shadowing the written entry is zapped (and shadow pages left without a
//! parent are freed, recursively). INVLPG resyncs the one spte of an unsync page that maps
//! the address; a CR3 write resyncs every unsync page, re-protecting it — KVM's
//! `kvm_mmu_sync_roots`.
//!
//! Not modelled: guest accessed/dirty bits (sptes are not made read-only to catch first
//! writes), write-flooding detection, and write-protecting data mappings of table pages
//! (writes arrive through `notify_write` instead).

use crate::cache::{CacheConfig, CacheStats, LruCache, Tlb, TlbEntry};
use crate::mem::{GuestPhysMemory, MemoryMap};
use crate::paging::{
    level_shift, table_index, Access, PageSize, PagingMode, Permissions, PTE_ADDR_MASK, PTE_G,
    PTE_NX, PTE_P, PTE_PS, PTE_RW, PTE_US,
};
use crate::walker::{WalkError, Walker};
use serde::Serialize;
use std::collections::HashMap;

/// Host-physical address at which shadow page `i` lives: `SHADOW_PAGE_BASE + i * 4096`.
pub const SHADOW_PAGE_BASE: u64 = 0x000f_0000_0000_0000;

/// Roots kept per vCPU: the current one and three previous (KVM_MMU_NUM_PREV_ROOTS = 3).
const CACHED_ROOTS: usize = 4;

/// Configuration of the shadow MMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShadowConfig {
    /// The guest's paging mode.
    pub guest_mode: PagingMode,
    /// Largest host page backing guest memory (4 KiB or 2 MiB): sptes never map more.
    pub host_page: PageSize,
    /// TLB and walk-cache sizes (the nested-only fields are ignored).
    pub caches: CacheConfig,
    /// Let last-level shadow pages go unsync on guest writes instead of zapping entries.
    pub unsync: bool,
}

/// Why a shadow translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// The guest walk failed: the fault (or error) the guest would see.
    #[error(transparent)]
    Guest(#[from] WalkError),
    /// The guest maps the address to guest-physical memory outside the memory map (MMIO).
    #[error("guest-physical {gpa:#x} is not in the memory map (MMIO or a hole)")]
    Unmapped {
        /// The guest-physical address.
        gpa: u64,
    },
}

/// How a translation was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ShadowPath {
    /// The TLB had it.
    TlbHit,
    /// A walk of the shadow tables found it (no exit).
    ShadowHit,
    /// A shadow page fault: the guest tables were walked in software and sptes filled.
    Filled,
}

/// One successful shadow translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShadowTranslation {
    /// Host-physical address.
    pub hpa: u64,
    /// Size the spte (and TLB entry) maps.
    pub size: PageSize,
    /// Memory references: hardware walks of the shadow tables plus guest entries read in
    /// software on a fault.
    pub refs: u32,
    /// How it was served.
    pub path: ShadowPath,
}

/// Counters of the shadow MMU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ShadowStats {
    /// Translations asked for.
    pub translations: u64,
    /// TLB hits and misses.
    pub tlb: CacheStats,
    /// Shadow walks that started below the root thanks to the walk cache, or not.
    pub walk_cache: CacheStats,
    /// Translations served by the shadow tables without an exit (TLB hits included).
    pub hits: u64,
    /// Shadow page faults (exits) that the shadow tables could not serve.
    pub misses: u64,
    /// Sptes written by fills.
    pub fills: u64,
    /// Misses that turned out to be guest faults (injected into the guest).
    pub guest_faults: u64,
    /// Sptes zapped (cleared) by tracked writes, replacement or page teardown.
    pub zapped_sptes: u64,
    /// Shadow pages freed.
    pub zapped_pages: u64,
    /// Shadow pages created.
    pub created_pages: u64,
    /// Times a tracked guest page went unsync.
    pub unsyncs: u64,
    /// Shadow pages resynced at a CR3 write (or before being shared again).
    pub resyncs: u64,
    /// Sptes rewritten by resyncs and INVLPG.
    pub resynced_sptes: u64,
    /// Guest writes to tracked pages that exited (write-protection faults).
    pub tracked_writes: u64,
    /// Guest writes to pages not tracked (no cost).
    pub untracked_writes: u64,
    /// INVLPGs executed (each exits).
    pub invlpgs: u64,
    /// CR3 writes (each exits).
    pub cr3_writes: u64,
    /// Guest table pages currently write-tracked.
    pub tracked_pages: u64,
    /// Shadow pages currently allocated.
    pub shadow_pages: u64,
    /// Exits real shadow paging would take: misses, tracked writes, INVLPG, CR3 writes.
    pub exits: u64,
    /// Shadow-table entries read by (modelled) hardware walks.
    pub hardware_refs: u64,
    /// Guest-table entries read in software (fault handling, resync).
    pub software_refs: u64,
    /// Largest number of references of one translation.
    pub max_refs: u32,
}

impl ShadowStats {
    /// Mean references per translation (hardware plus software).
    pub fn mean_refs(&self) -> f64 {
        if self.translations == 0 {
            0.0
        } else {
            (self.hardware_refs + self.software_refs) as f64 / self.translations as f64
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SpKey {
    gpa: u64,
    level: u8,
    direct: bool,
    /// Direct pages: the leaf bits (G) their entries carry.
    bits: u64,
}

#[derive(Debug, Clone)]
struct SpMeta {
    key: SpKey,
    live: bool,
    unsync: bool,
    roots: u32,
    /// (parent shadow page, slot) pairs pointing here.
    parents: Vec<(u32, u16)>,
}

#[derive(Debug, Clone, Copy)]
struct WalkCacheEntry {
    sp: u32,
    perms: Permissions,
    visited: [u64; 5],
    nvisited: u8,
}

enum HwWalk {
    Hit {
        hpa: u64,
        size: PageSize,
        perms: Permissions,
        global: bool,
    },
    Miss,
}

#[inline(always)]
fn sp_addr(i: u32) -> u64 {
    SHADOW_PAGE_BASE + ((i as u64) << 12)
}

#[inline(always)]
fn sp_index(spte: u64) -> u32 {
    (((spte & PTE_ADDR_MASK) - SHADOW_PAGE_BASE) >> 12) as u32
}

const GUEST_BITS: u64 = PTE_P | PTE_RW | PTE_US | PTE_NX;
const NO_GPA: u64 = u64::MAX;

/// Shadow page tables of one vCPU's guest.
#[derive(Debug, Clone)]
pub struct ShadowMmu {
    cfg: ShadowConfig,
    walker: Walker,
    map: MemoryMap,
    cr3: u64,
    root: Option<u32>,
    recent_roots: Vec<u32>,
    /// Shadow page contents, indexed by shadow page number.
    pages: Vec<[u64; 512]>,
    /// Guest table page of each shadow page (NO_GPA for direct pages), for loop checks.
    page_gpa: Vec<u64>,
    meta: Vec<SpMeta>,
    free: Vec<u32>,
    index: HashMap<SpKey, u32>,
    by_gfn: HashMap<u64, Vec<u32>>,
    unsync: Vec<u32>,
    tlb: Tlb,
    pwc: LruCache<WalkCacheEntry>,
    check_loops: bool,
    /// Guest pages shadowed at more than one level: only these can close a loop, so the
    /// hardware walk skips its loop check while there are none.
    multi_level_gfns: usize,
    /// TLB hits whose cached permissions refused the access (walked again).
    tlb_denied: u64,
    stats: ShadowStats,
}

impl ShadowMmu {
    /// A shadow MMU for guest memory laid out by `map`, with CR3 initially `cr3`.
    pub fn new(cfg: ShadowConfig, map: MemoryMap, cr3: u64) -> Self {
        ShadowMmu {
            cfg,
            walker: Walker::new(cfg.guest_mode),
            map,
            cr3,
            root: None,
            recent_roots: Vec::new(),
            pages: Vec::new(),
            page_gpa: Vec::new(),
            meta: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            by_gfn: HashMap::new(),
            unsync: Vec::new(),
            tlb: Tlb::new(cfg.caches.tlb),
            pwc: LruCache::new(cfg.caches.walk_cache_entries, usize::MAX),
            check_loops: true,
            multi_level_gfns: 0,
            tlb_denied: 0,
            stats: ShadowStats::default(),
        }
    }

    /// Allow recursive (self-referencing) guest tables, as [`Walker::allow_recursive_tables`].
    pub fn allow_recursive_tables(mut self, allow: bool) -> Self {
        self.walker = self.walker.allow_recursive_tables(allow);
        self.check_loops = !allow;
        self
    }

    /// The current guest CR3.
    pub fn cr3(&self) -> u64 {
        self.cr3
    }

    /// Counters so far.
    pub fn stats(&self) -> ShadowStats {
        let mut s = self.stats;
        s.tlb = self.tlb.stats();
        s.hits += s.tlb.hits - self.tlb_denied;
        s.tracked_pages = self.by_gfn.len() as u64;
        s.shadow_pages = (self.meta.len() - self.free.len()) as u64;
        s
    }

    /// Forgets every counter (shadow pages and caches are kept): for a steady state.
    pub fn reset_stats(&mut self) {
        self.stats = ShadowStats::default();
        self.tlb.reset_stats();
        self.tlb_denied = 0;
    }

    /// Whether the guest page containing `gpa` is write-tracked.
    pub fn is_tracked(&self, gpa: u64) -> bool {
        self.by_gfn.contains_key(&(gpa & !0xfff))
    }

    /// Whether some shadow page of the guest page containing `gpa` is unsync.
    pub fn is_unsync(&self, gpa: u64) -> bool {
        self.by_gfn
            .get(&(gpa & !0xfff))
            .is_some_and(|l| l.iter().any(|&s| self.meta[s as usize].unsync))
    }

    /// Translates `gva` for `access` in the current address space; `mem` is guest-physical
    /// memory (read only when the shadow tables miss).
    #[inline]
    pub fn translate<M: GuestPhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        gva: u64,
        access: Access,
    ) -> Result<ShadowTranslation, ShadowError> {
        self.stats.translations += 1;
        if let Some(e) = self.tlb.lookup(gva) {
            if e.perms.allows(access, &self.cfg.guest_mode) {
                // Counted as a hit in `stats()` from the TLB's own count.
                return Ok(ShadowTranslation {
                    hpa: e.page | (gva & e.size.offset_mask()),
                    size: e.size,
                    refs: 0,
                    path: ShadowPath::TlbHit,
                });
            }
            self.tlb.invalidate_page(gva);
            self.tlb_denied += 1;
        }
        self.translate_slow(mem, gva, access)
    }

    /// TLB miss: walk the shadow tables, and on a shadow miss handle the exit.
    #[inline(never)]
    fn translate_slow<M: GuestPhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        gva: u64,
        access: Access,
    ) -> Result<ShadowTranslation, ShadowError> {
        if !self.cfg.guest_mode.is_canonical(gva) {
            return Err(WalkError::NonCanonical {
                gva,
                bits: self.cfg.guest_mode.va_bits(),
            }
            .into());
        }
        if self.root.is_none() {
            // KVM loads the root (kvm_mmu_load) before entering the guest.
            self.ensure_root(mem);
        }
        let mut refs = 0u32;
        if let HwWalk::Hit {
            hpa,
            size,
            perms,
            global,
        } = self.hw_walk(gva, access, &mut refs)
        {
            self.stats.hits += 1;
            self.finish(gva, hpa, size, perms, global, refs);
            return Ok(ShadowTranslation {
                hpa,
                size,
                refs,
                path: ShadowPath::ShadowHit,
            });
        }
        // Shadow page fault: exit, walk the guest tables in software, fill.
        self.stats.misses += 1;
        self.stats.exits += 1;
        let t = match self.walker.walk(mem, self.cr3, gva, access) {
            Ok(t) => t,
            Err(e) => {
                self.stats.guest_faults += 1;
                self.stats.hardware_refs += refs as u64;
                return Err(e.into());
            }
        };
        let sw = t.entry_gpas().len() as u32;
        self.stats.software_refs += sw as u64;
        refs += sw;
        let host = match self.map.gpa_to_hpa(t.gpa) {
            Some(h) => h,
            None => {
                self.stats.hardware_refs += (refs - sw) as u64;
                return Err(ShadowError::Unmapped { gpa: t.gpa });
            }
        };
        self.fill(mem, &t, host);
        // The guest instruction restarts and the hardware walks the shadow tables again.
        let mut retry = 0u32;
        let hit = self.hw_walk(gva, access, &mut retry);
        refs += retry;
        match hit {
            HwWalk::Hit {
                hpa,
                size,
                perms,
                global,
            } => {
                self.finish(gva, hpa, size, perms, global, refs - sw);
                self.stats.max_refs = self.stats.max_refs.max(refs);
                Ok(ShadowTranslation {
                    hpa,
                    size,
                    refs,
                    path: ShadowPath::Filled,
                })
            }
            HwWalk::Miss => {
                // Only reachable if the guest's answer cannot be expressed in sptes; serve
                // it from the software walk (the access is emulated).
                self.stats.hardware_refs += (refs - sw) as u64;
                Ok(ShadowTranslation {
                    hpa: host,
                    size: PageSize::Size4K,
                    refs,
                    path: ShadowPath::Filled,
                })
            }
        }
    }

    #[inline(always)]
    fn finish(
        &mut self,
        gva: u64,
        hpa: u64,
        size: PageSize,
        perms: Permissions,
        global: bool,
        hw_refs: u32,
    ) {
        self.stats.hardware_refs += hw_refs as u64;
        self.stats.max_refs = self.stats.max_refs.max(hw_refs);
        let mask = size.offset_mask();
        self.tlb.insert(
            gva,
            TlbEntry {
                page: hpa & !mask,
                gpa_page: 0,
                size,
                guest_size: size,
                perms,
                global,
            },
        );
    }

    /// The hardware walk of the shadow tables.
    #[inline(always)]
    fn hw_walk(&mut self, gva: u64, access: Access, refs: &mut u32) -> HwWalk {
        let Some(root) = self.root else {
            return HwWalk::Miss;
        };
        let mode = self.cfg.guest_mode;
        let mut level = mode.levels();
        let mut sp = root;
        let mut perms = Permissions::ALL;
        let mut visited = [0u64; 5];
        let mut nvisited = 0usize;
        if self.pwc.capacity() > 0 {
            let mut hit = false;
            for l in 2..=mode.levels() {
                if let Some(e) = self.pwc.lookup(((gva >> level_shift(l)) << 3) | l as u64) {
                    level = l - 1;
                    sp = e.sp;
                    perms = e.perms;
                    visited = e.visited;
                    nvisited = e.nvisited as usize;
                    hit = true;
                    break;
                }
            }
            if hit {
                self.stats.walk_cache.hits += 1;
            } else {
                self.stats.walk_cache.misses += 1;
            }
        }
        let check_loops = self.check_loops && self.multi_level_gfns > 0;
        loop {
            if check_loops {
                let g = self.page_gpa[sp as usize];
                if g != NO_GPA {
                    if visited[..nvisited].contains(&g) {
                        return HwWalk::Miss;
                    }
                    visited[nvisited] = g;
                    nvisited += 1;
                }
            }
            let spte = self.pages[sp as usize][table_index(gva, level) as usize];
            *refs += 1;
            if spte & PTE_P == 0 {
                return HwWalk::Miss;
            }
            perms = perms.accumulate(spte, mode.nxe);
            if level == 1 || spte & PTE_PS != 0 {
                if !perms.allows(access, &mode) {
                    return HwWalk::Miss;
                }
                let size = PageSize::from_level(level).unwrap_or(PageSize::Size1G);
                let mask = size.offset_mask();
                return HwWalk::Hit {
                    hpa: (spte & PTE_ADDR_MASK & !mask) | (gva & mask),
                    size,
                    perms,
                    global: spte & PTE_G != 0,
                };
            }
            sp = sp_index(spte);
            if self.pwc.capacity() > 0 {
                self.pwc.insert(
                    ((gva >> level_shift(level)) << 3) | level as u64,
                    WalkCacheEntry {
                        sp,
                        perms,
                        visited,
                        nvisited: nvisited as u8,
                    },
                );
            }
            level -= 1;
        }
    }

    /// TLB and walk cache flush after sptes changed under them (KVM's remote TLB flush).
    fn flush_hardware(&mut self) {
        self.tlb.flush(false);
        self.pwc.clear();
    }

    fn alloc_page(&mut self, key: SpKey) -> u32 {
        let meta = SpMeta {
            key,
            live: true,
            unsync: false,
            roots: 0,
            parents: Vec::new(),
        };
        let gpa = if key.direct { NO_GPA } else { key.gpa };
        let i = if let Some(i) = self.free.pop() {
            self.pages[i as usize] = [0; 512];
            self.page_gpa[i as usize] = gpa;
            self.meta[i as usize] = meta;
            i
        } else {
            self.pages.push([0; 512]);
            self.page_gpa.push(gpa);
            self.meta.push(meta);
            (self.meta.len() - 1) as u32
        };
        self.stats.created_pages += 1;
        i
    }

    /// The shadow page for `key`, created (and tracked, for indirect pages) if needed.
    fn get_page<M: GuestPhysMemory + ?Sized>(&mut self, mem: &M, key: SpKey) -> u32 {
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        if !key.direct {
            // The guest page is about to be write-protected again: bring any unsync shadow
            // page of it back in sync first.
            if let Some(list) = self.by_gfn.get(&key.gpa) {
                let stale: Vec<u32> = list
                    .iter()
                    .copied()
                    .filter(|&s| self.meta[s as usize].unsync)
                    .collect();
                for s in stale {
                    self.sync_page(mem, s);
                }
            }
        }
        let i = self.alloc_page(key);
        self.index.insert(key, i);
        if !key.direct {
            let list = self.by_gfn.entry(key.gpa).or_default();
            list.push(i);
            if list.len() == 2 {
                self.multi_level_gfns += 1;
                // Walk-cache entries made without loop checks lack their visited tables.
                self.pwc.clear();
            }
        }
        i
    }

    fn link(&mut self, parent: u32, slot: usize, child: u32, bits: u64) {
        self.pages[parent as usize][slot] = sp_addr(child) | bits;
        self.meta[child as usize]
            .parents
            .push((parent, slot as u16));
    }

    /// Clears one spte, unlinking (and freeing, if orphaned) the shadow page it points to.
    fn drop_spte(&mut self, sp: u32, slot: usize) {
        let spte = self.pages[sp as usize][slot];
        if spte & PTE_P == 0 {
            return;
        }
        self.pages[sp as usize][slot] = 0;
        self.stats.zapped_sptes += 1;
        let level = self.meta[sp as usize].key.level;
        if level > 1 && spte & PTE_PS == 0 {
            let child = sp_index(spte);
            let m = &mut self.meta[child as usize];
            m.parents.retain(|&(p, s)| !(p == sp && s as usize == slot));
            if m.parents.is_empty() && m.roots == 0 {
                self.zap_page(child);
            }
        }
    }

    /// Frees a shadow page: unlinks it from its parents and drops its entries.
    fn zap_page(&mut self, sp: u32) {
        if !self.meta[sp as usize].live {
            return;
        }
        let parents = std::mem::take(&mut self.meta[sp as usize].parents);
        for (p, slot) in parents {
            let e = &mut self.pages[p as usize][slot as usize];
            if *e & PTE_P != 0 && *e & PTE_ADDR_MASK == sp_addr(sp) {
                *e = 0;
                self.stats.zapped_sptes += 1;
            }
        }
        for slot in 0..512 {
            self.drop_spte(sp, slot);
        }
        let key = self.meta[sp as usize].key;
        self.index.remove(&key);
        if !key.direct {
            if let Some(list) = self.by_gfn.get_mut(&key.gpa) {
                let before = list.len();
                list.retain(|&s| s != sp);
                if before == 2 && list.len() == 1 {
                    self.multi_level_gfns -= 1;
                }
                if list.is_empty() {
                    self.by_gfn.remove(&key.gpa);
                }
            }
        }
        if self.meta[sp as usize].unsync {
            self.unsync.retain(|&s| s != sp);
        }
        let m = &mut self.meta[sp as usize];
        m.live = false;
        m.unsync = false;
        self.free.push(sp);
        self.stats.zapped_pages += 1;
        if self.root == Some(sp) {
            self.root = None;
        }
    }

    /// The spte for a guest leaf entry mapping host page `hpa` with a page of `size`.
    fn leaf_spte(guest_entry: u64, hpa: u64, size: PageSize) -> u64 {
        let mut e = hpa | (guest_entry & (GUEST_BITS | PTE_G));
        if size != PageSize::Size4K {
            e |= PTE_PS;
        }
        e
    }

    /// Creates the shadow path for a successful guest walk `t` whose byte `t.gpa` is at
    /// host-physical `host`.
    fn fill<M: GuestPhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        t: &crate::walker::Translation,
        host: u64,
    ) {
        let levels = self.cfg.guest_mode.levels();
        let gva = t.gva;
        let values = t.entry_values();
        let addr_mask = PTE_ADDR_MASK & ((1u64 << self.cfg.guest_mode.max_phys_bits) - 1);
        let mut flushed = false;
        let mut sp = self.ensure_root(mem);
        let leaf_level = t.leaf_level();
        // Indirect levels: mirror guest tables.
        for level in (leaf_level + 1..=levels).rev() {
            let gentry = values[(levels - level) as usize];
            let next = gentry & addr_mask;
            let slot = table_index(gva, level) as usize;
            let spte = self.pages[sp as usize][slot];
            let want_key = SpKey {
                gpa: next,
                level: level - 1,
                direct: false,
                bits: 0,
            };
            if spte & PTE_P != 0 && spte & PTE_PS == 0 {
                let child = sp_index(spte);
                if self.meta[child as usize].key == want_key
                    && spte & GUEST_BITS == gentry & GUEST_BITS
                {
                    sp = child;
                    continue;
                }
            }
            if spte & PTE_P != 0 {
                self.drop_spte(sp, slot);
                flushed = true;
            }
            let child = self.get_page(mem, want_key);
            self.link(sp, slot, child, gentry & GUEST_BITS);
            sp = child;
        }
        // The leaf: whole, or split into direct pages when the host page is smaller.
        let gleaf = *values.last().unwrap_or(&0);
        let mut size = t.size;
        if size > self.cfg.host_page
            || !self
                .map
                .maps_contiguously(t.page_gpa(), size.bytes(), size.bytes())
        {
            size = if self.cfg.host_page >= PageSize::Size2M
                && t.size > PageSize::Size2M
                && self
                    .map
                    .maps_contiguously(t.gpa & !0x1f_ffff, 0x20_0000, 0x20_0000)
            {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
        }
        let mut level = leaf_level;
        let mut bits = gleaf & GUEST_BITS;
        while level > size.level() {
            let slot = table_index(gva, level) as usize;
            let span_mask = (1u64 << level_shift(level)) - 1;
            let key = SpKey {
                gpa: t.gpa & !span_mask,
                level: level - 1,
                direct: true,
                bits: gleaf & PTE_G,
            };
            let spte = self.pages[sp as usize][slot];
            if spte & PTE_P != 0
                && spte & PTE_PS == 0
                && self.meta[sp_index(spte) as usize].key == key
                && spte & GUEST_BITS == bits
            {
                sp = sp_index(spte);
            } else {
                if spte & PTE_P != 0 {
                    self.drop_spte(sp, slot);
                    flushed = true;
                }
                let child = self.get_page(mem, key);
                self.link(sp, slot, child, bits);
                sp = child;
            }
            bits = PTE_P | PTE_RW | PTE_US;
            level -= 1;
        }
        let slot = table_index(gva, level) as usize;
        let mask = size.offset_mask();
        let hpa_page = host & !mask;
        let old = self.pages[sp as usize][slot];
        if old & PTE_P != 0 {
            if old & PTE_PS == 0 && level > 1 {
                self.drop_spte(sp, slot);
            }
            flushed = true;
        }
        let leaf_bits = (gleaf & PTE_G) | bits;
        self.pages[sp as usize][slot] = Self::leaf_spte(leaf_bits, hpa_page, size);
        self.stats.fills += 1;
        if flushed {
            self.flush_hardware();
        }
    }

    fn mark_sync(&mut self, sp: u32) {
        if self.meta[sp as usize].unsync {
            self.meta[sp as usize].unsync = false;
            self.unsync.retain(|&s| s != sp);
        }
    }

    /// The root shadow page for the current CR3, created if needed.
    fn ensure_root<M: GuestPhysMemory + ?Sized>(&mut self, mem: &M) -> u32 {
        if let Some(r) = self.root {
            return r;
        }
        let levels = self.cfg.guest_mode.levels();
        let key = SpKey {
            gpa: self.walker.root_table(self.cr3),
            level: levels,
            direct: false,
            bits: 0,
        };
        let r = self.get_page(mem, key);
        self.adopt_root(r);
        r
    }

    fn adopt_root(&mut self, r: u32) {
        self.root = Some(r);
        if let Some(pos) = self.recent_roots.iter().position(|&x| x == r) {
            self.recent_roots.remove(pos);
        } else {
            self.meta[r as usize].roots += 1;
        }
        self.recent_roots.push(r);
        while self.recent_roots.len() > CACHED_ROOTS {
            let old = self.recent_roots.remove(0);
            let m = &mut self.meta[old as usize];
            m.roots -= 1;
            if m.roots == 0 && m.parents.is_empty() {
                self.zap_page(old);
                self.flush_hardware();
            }
        }
    }

    /// Re-reads every guest entry behind the present sptes of unsync page `sp` and makes
    /// the sptes agree; the page is then in sync (write-protected) again.
    fn sync_page<M: GuestPhysMemory + ?Sized>(&mut self, mem: &M, sp: u32) {
        let gpa = self.meta[sp as usize].key.gpa;
        let mut changed = false;
        for slot in 0..512 {
            let spte = self.pages[sp as usize][slot];
            if spte & PTE_P == 0 {
                continue;
            }
            self.stats.software_refs += 1;
            let new = mem
                .read_u64(gpa + slot as u64 * 8)
                .ok()
                .and_then(|g| self.spte_for_guest_pte(g));
            if new != Some(spte) {
                self.pages[sp as usize][slot] = new.unwrap_or(0);
                self.stats.resynced_sptes += 1;
                changed = true;
            }
        }
        self.mark_sync(sp);
        self.stats.resyncs += 1;
        if changed {
            self.flush_hardware();
        }
    }

    /// The spte a last-level guest entry maps to, or `None` if it is not present, has a
    /// reserved bit set, or points outside the memory map.
    fn spte_for_guest_pte(&self, g: u64) -> Option<u64> {
        let mode = &self.cfg.guest_mode;
        if g & PTE_P == 0 || g & mode.reserved_mask() != 0 {
            return None;
        }
        let gpa = g & PTE_ADDR_MASK & ((1u64 << mode.max_phys_bits) - 1);
        let hpa = self.map.gpa_to_hpa(gpa)?;
        Some(Self::leaf_spte(g, hpa, PageSize::Size4K))
    }

    /// Reports a guest write to guest-physical `gpa` (8-byte entry granularity).
    pub fn notify_write(&mut self, gpa: u64) {
        let gfn = gpa & !0xfff;
        let Some(list) = self.by_gfn.get(&gfn) else {
            self.stats.untracked_writes += 1;
            return;
        };
        let all_last_level = list.iter().all(|&s| self.meta[s as usize].key.level == 1);
        if self.cfg.unsync && all_last_level {
            let to_unsync: Vec<u32> = list
                .iter()
                .copied()
                .filter(|&s| !self.meta[s as usize].unsync)
                .collect();
            if !to_unsync.is_empty() {
                // The first write hits the write-protected page: exit, unprotect, unsync.
                self.stats.exits += 1;
                self.stats.tracked_writes += 1;
                self.stats.unsyncs += 1;
                for s in to_unsync {
                    self.meta[s as usize].unsync = true;
                    self.unsync.push(s);
                }
            }
            return;
        }
        // Write-protected page: the write exits and is emulated; zap the shadowing sptes.
        self.stats.exits += 1;
        self.stats.tracked_writes += 1;
        let slot = ((gpa & 0xfff) >> 3) as usize;
        let list = list.clone();
        let mut zapped = false;
        for s in list {
            if self.meta[s as usize].live && self.pages[s as usize][slot] & PTE_P != 0 {
                self.drop_spte(s, slot);
                zapped = true;
            }
        }
        if zapped {
            self.flush_hardware();
        }
    }

    /// Guest INVLPG of `gva`: exits; drops the TLB entries and walk cache; if the
    /// last-level shadow page mapping `gva` is unsync, resyncs that one spte from `mem`.
    pub fn invlpg<M: GuestPhysMemory + ?Sized>(&mut self, mem: &M, gva: u64) {
        self.stats.exits += 1;
        self.stats.invlpgs += 1;
        self.tlb.invalidate_page(gva);
        self.pwc.clear();
        let Some(mut sp) = self.root else { return };
        let mut level = self.cfg.guest_mode.levels();
        loop {
            let slot = table_index(gva, level) as usize;
            let spte = self.pages[sp as usize][slot];
            if level == 1 {
                let m = &self.meta[sp as usize];
                if m.unsync && !m.key.direct {
                    self.stats.software_refs += 1;
                    let new = mem
                        .read_u64(m.key.gpa + slot as u64 * 8)
                        .ok()
                        .and_then(|g| self.spte_for_guest_pte(g));
                    if new != Some(spte) {
                        self.pages[sp as usize][slot] = new.unwrap_or(0);
                        self.stats.resynced_sptes += 1;
                    }
                }
                return;
            }
            if spte & PTE_P == 0 || spte & PTE_PS != 0 {
                return;
            }
            sp = sp_index(spte);
            level -= 1;
        }
    }

    /// Guest CR3 write: exits; switches to (or creates) the root for `cr3`, keeping a few
    /// recent roots cached; flushes non-global TLB entries and the walk cache; resyncs every
    /// unsync shadow page from `mem`.
    pub fn write_cr3<M: GuestPhysMemory + ?Sized>(&mut self, mem: &M, cr3: u64) {
        self.stats.exits += 1;
        self.stats.cr3_writes += 1;
        self.cr3 = cr3;
        self.tlb.flush(self.cfg.guest_mode.pge);
        self.pwc.clear();
        let levels = self.cfg.guest_mode.levels();
        let key = SpKey {
            gpa: self.walker.root_table(cr3),
            level: levels,
            direct: false,
            bits: 0,
        };
        let r = self.get_page(mem, key);
        self.adopt_root(r);
        for sp in std::mem::take(&mut self.unsync) {
            if self.meta[sp as usize].live && self.meta[sp as usize].unsync {
                self.sync_page(mem, sp);
            }
        }
    }

    /// Drops every shadow page (as KVM's "zap all" on a memslot change).
    pub fn zap_all(&mut self) {
        let live: Vec<u32> = (0..self.meta.len() as u32)
            .filter(|&i| self.meta[i as usize].live)
            .collect();
        for sp in live {
            self.meta[sp as usize].roots = 0;
            self.zap_page(sp);
        }
        self.recent_roots.clear();
        self.root = None;
        self.flush_hardware();
    }
}
