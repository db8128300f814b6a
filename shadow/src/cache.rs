//! Translation caches: a set-associative LRU array ([`LruCache`]) and, built from it, the
//! two-level TLB model ([`Tlb`]) that both the nested and the shadow path put in front of
//! their walks, so the two are compared with the same hardware around them.
//!
//! Default sizes ([`CacheConfig::default`]) follow the AMD Family 10h ("Barcelona") core,
//! which is the machine Bhargava, Serebrin, Spadini and Manne model in "Accelerating
//! Two-Dimensional Page Walks for Virtualized Systems" (ASPLOS 2008):
//!
//! * L1 data TLB: 48 entries, fully associative, all page sizes; L2 TLB: 512 entries for
//!   4 KiB pages and 128 for 2 MiB pages, 4-way (AMD, Software Optimization Guide for
//!   Family 10h Processors, pub. 40546; also AnandTech, "Barcelona's TLB", 2008).
//! * Page walk cache (guest paging-structure entries): 24 entries, fully associative —
//!   the size of Barcelona's PWC used as the baseline by Bhargava et al.
//! * Nested TLB (guest-physical → host-physical for the walk's own accesses): 16 entries,
//!   fully associative, as evaluated by Bhargava et al.
//! * Nested paging-structure cache (EPT/NPT upper-level entries): 24 entries, the same
//!   structure as the PWC (Bhargava et al. cache nested entries in the PWC too; we keep
//!   them in a separate array of the same size so each can be reported).
//!
//! The paging-structure caches are modelled as Intel's are (SDM vol. 3A §4.10.3): tagged
//! by the upper bits of the address, each entry lets a walk skip the levels above it.

use crate::paging::{PageSize, Permissions};
use serde::Serialize;

/// Hit and miss counts of one cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Lookups that found an entry.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
}

impl CacheStats {
    /// hits / (hits + misses), or 0 with no lookups.
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

const EMPTY: u64 = u64::MAX;

/// Open-addressing hash index from key to slot, so that a lookup in a wide (fully
/// associative) set costs one or two probes instead of a scan of every way. It changes
/// nothing in what the cache holds or evicts.
#[derive(Debug, Clone)]
struct SlotIndex {
    keys: Vec<u64>,
    slots: Vec<u32>,
    mask: usize,
}

impl SlotIndex {
    fn new(entries: usize) -> Self {
        let cap = (entries * 4).next_power_of_two().max(8);
        SlotIndex {
            keys: vec![EMPTY; cap],
            slots: vec![0; cap],
            mask: cap - 1,
        }
    }

    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize & self.mask
    }

    #[inline(always)]
    fn get(&self, key: u64) -> Option<u32> {
        let mut i = self.home(key);
        loop {
            let k = self.keys[i];
            if k == key {
                return Some(self.slots[i]);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn insert(&mut self, key: u64, slot: u32) {
        let mut i = self.home(key);
        while self.keys[i] != EMPTY && self.keys[i] != key {
            i = (i + 1) & self.mask;
        }
        self.keys[i] = key;
        self.slots[i] = slot;
    }

    /// Removes `key`, shifting later entries of its probe run back (no tombstones).
    fn remove(&mut self, key: u64) {
        let mut i = self.home(key);
        loop {
            if self.keys[i] == EMPTY {
                return;
            }
            if self.keys[i] == key {
                break;
            }
            i = (i + 1) & self.mask;
        }
        let mut j = i;
        loop {
            j = (j + 1) & self.mask;
            let k = self.keys[j];
            if k == EMPTY {
                break;
            }
            let h = self.home(k);
            // Move k back to the hole at i unless its home lies cyclically in (i, j].
            if (j.wrapping_sub(h) & self.mask) >= (j.wrapping_sub(i) & self.mask) {
                self.keys[i] = k;
                self.slots[i] = self.slots[j];
                i = j;
            }
        }
        self.keys[i] = EMPTY;
    }

    fn clear(&mut self) {
        self.keys.fill(EMPTY);
    }
}

/// A set-associative cache of `Copy` values under `u64` keys with exact LRU replacement
/// in each set (a recency list per set, so hits and evictions cost O(1) however wide the
/// set). The set is chosen by the key's low bits. Zero entries make a cache that is
/// always empty.
#[derive(Debug, Clone)]
pub struct LruCache<V: Copy> {
    set_mask: usize,
    ways: usize,
    keys: Vec<u64>,
    vals: Vec<Option<V>>,
    /// Recency list links (slot indices); per set, `head` is the most recently used.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: Vec<u32>,
    tail: Vec<u32>,
    index: SlotIndex,
    stats: CacheStats,
}

const NIL: u32 = u32::MAX;

impl<V: Copy> LruCache<V> {
    /// `entries` entries in sets of `ways` (`ways` ≥ `entries` means fully associative).
    /// The number of sets is rounded down to a power of two.
    pub fn new(entries: usize, ways: usize) -> Self {
        let ways = ways.clamp(1, entries.max(1));
        let sets = if entries == 0 {
            0
        } else {
            prev_pow2((entries / ways).max(1))
        };
        let n = sets * ways;
        let mut c = LruCache {
            set_mask: sets.saturating_sub(1),
            ways: if entries == 0 { 0 } else { ways },
            keys: vec![EMPTY; n],
            vals: vec![None; n],
            prev: vec![NIL; n],
            next: vec![NIL; n],
            head: vec![NIL; sets],
            tail: vec![NIL; sets],
            index: SlotIndex::new(n),
            stats: CacheStats::default(),
        };
        c.reset_lists();
        c
    }

    fn reset_lists(&mut self) {
        for set in 0..self.head.len() {
            let base = set * self.ways;
            for w in 0..self.ways {
                let i = base + w;
                self.prev[i] = if w == 0 { NIL } else { (i - 1) as u32 };
                self.next[i] = if w + 1 == self.ways {
                    NIL
                } else {
                    (i + 1) as u32
                };
            }
            self.head[set] = base as u32;
            self.tail[set] = (base + self.ways - 1) as u32;
        }
    }

    /// Total entries.
    pub fn capacity(&self) -> usize {
        self.keys.len()
    }

    #[inline(always)]
    fn set_of(&self, slot: usize) -> usize {
        slot / self.ways
    }

    #[inline(always)]
    fn unlink(&mut self, i: usize, set: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head[set] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail[set] = p;
        } else {
            self.prev[n as usize] = p;
        }
    }

    #[inline(always)]
    fn push_front(&mut self, i: usize, set: usize) {
        let h = self.head[set];
        self.prev[i] = NIL;
        self.next[i] = h;
        if h == NIL {
            self.tail[set] = i as u32;
        } else {
            self.prev[h as usize] = i as u32;
        }
        self.head[set] = i as u32;
    }

    #[inline(always)]
    fn push_back(&mut self, i: usize, set: usize) {
        let t = self.tail[set];
        self.next[i] = NIL;
        self.prev[i] = t;
        if t == NIL {
            self.head[set] = i as u32;
        } else {
            self.next[t as usize] = i as u32;
        }
        self.tail[set] = i as u32;
    }

    #[inline(always)]
    fn touch(&mut self, i: usize) {
        let set = self.set_of(i);
        if self.head[set] != i as u32 {
            self.unlink(i, set);
            self.push_front(i, set);
        }
    }

    /// Looks `key` up, counting a hit or a miss and refreshing its LRU position.
    #[inline(always)]
    pub fn lookup(&mut self, key: u64) -> Option<V> {
        if let Some(i) = self.index.get(key) {
            let i = i as usize;
            self.touch(i);
            self.stats.hits += 1;
            return self.vals[i];
        }
        self.stats.misses += 1;
        None
    }

    /// Inserts or replaces `key`, evicting the least recently used entry of its set
    /// (empty entries are used first).
    #[inline]
    pub fn insert(&mut self, key: u64, value: V) {
        if self.ways == 0 {
            return;
        }
        if let Some(i) = self.index.get(key) {
            self.vals[i as usize] = Some(value);
            self.touch(i as usize);
            return;
        }
        let set = key as usize & self.set_mask;
        let victim = self.tail[set] as usize;
        if self.keys[victim] != EMPTY {
            self.index.remove(self.keys[victim]);
        }
        self.keys[victim] = key;
        self.vals[victim] = Some(value);
        self.touch(victim);
        self.index.insert(key, victim as u32);
    }

    fn drop_slot(&mut self, i: usize) {
        self.index.remove(self.keys[i]);
        self.keys[i] = EMPTY;
        self.vals[i] = None;
        let set = self.set_of(i);
        self.unlink(i, set);
        self.push_back(i, set);
    }

    /// Removes `key` if present.
    pub fn invalidate(&mut self, key: u64) {
        if let Some(i) = self.index.get(key) {
            self.drop_slot(i as usize);
        }
    }

    /// Keeps only the entries for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &V) -> bool) {
        for i in 0..self.keys.len() {
            if let Some(v) = &self.vals[i] {
                if !keep(self.keys[i], v) {
                    self.drop_slot(i);
                }
            }
        }
    }

    /// Empties the cache (statistics are kept).
    pub fn clear(&mut self) {
        self.keys.fill(EMPTY);
        self.vals.fill(None);
        self.index.clear();
        self.reset_lists();
    }

    /// Hit/miss counts so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}

fn prev_pow2(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// Sizes of the two-level TLB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TlbConfig {
    /// L1 entries (all page sizes).
    pub l1_entries: usize,
    /// L1 associativity (≥ entries: fully associative).
    pub l1_ways: usize,
    /// L2 entries for 4 KiB pages.
    pub l2_4k_entries: usize,
    /// L2 entries for 2 MiB pages.
    pub l2_2m_entries: usize,
    /// L2 associativity.
    pub l2_ways: usize,
}

impl Default for TlbConfig {
    /// AMD Family 10h: 48-entry fully associative L1; 512 (4 KiB) + 128 (2 MiB) 4-way L2.
    fn default() -> Self {
        TlbConfig {
            l1_entries: 48,
            l1_ways: 48,
            l2_4k_entries: 512,
            l2_2m_entries: 128,
            l2_ways: 4,
        }
    }
}

impl TlbConfig {
    /// No TLB at all.
    pub const NONE: TlbConfig = TlbConfig {
        l1_entries: 0,
        l1_ways: 1,
        l2_4k_entries: 0,
        l2_2m_entries: 0,
        l2_ways: 1,
    };
}

/// Sizes of every translation cache of a path; zero disables a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CacheConfig {
    /// The TLB.
    pub tlb: TlbConfig,
    /// Paging-structure (page walk) cache entries for the first-dimension walk: the guest
    /// tables in the nested path, the shadow tables in the shadow path.
    pub walk_cache_entries: usize,
    /// Nested TLB entries (nested path only).
    pub nested_tlb_entries: usize,
    /// Nested paging-structure cache entries (nested path only).
    pub nested_walk_cache_entries: usize,
}

impl Default for CacheConfig {
    /// Barcelona / Bhargava et al. (ASPLOS 2008) sizes: see the module documentation.
    fn default() -> Self {
        CacheConfig {
            tlb: TlbConfig::default(),
            walk_cache_entries: 24,
            nested_tlb_entries: 16,
            nested_walk_cache_entries: 24,
        }
    }
}

impl CacheConfig {
    /// Every cache disabled: each translation is a full walk (for exact reference counts).
    pub const NONE: CacheConfig = CacheConfig {
        tlb: TlbConfig::NONE,
        walk_cache_entries: 0,
        nested_tlb_entries: 0,
        nested_walk_cache_entries: 0,
    };
}

/// A cached translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbEntry {
    /// Output address of the start of the page (host-physical).
    pub page: u64,
    /// Guest-physical address of the start of the page.
    pub gpa_page: u64,
    /// Size the entry covers (the smaller of the guest and host page sizes).
    pub size: PageSize,
    /// Size of the guest page it is part of: INVLPG anywhere in that page drops it.
    pub guest_size: PageSize,
    /// Effective permissions.
    pub perms: Permissions,
    /// Survives CR3 writes when CR4.PGE is set.
    pub global: bool,
}

const SIZES: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

#[inline(always)]
fn tlb_key(gva: u64, size: PageSize) -> u64 {
    ((gva >> size.shift()) & ((1 << 52) - 1)) | ((size.level() as u64) << 58)
}

/// A two-level TLB: a small fully associative L1 for all page sizes backed by L2 arrays
/// for 4 KiB and 2 MiB pages (1 GiB entries live in L1 only, as on Barcelona).
#[derive(Debug, Clone)]
pub struct Tlb {
    l1: LruCache<TlbEntry>,
    l2_4k: LruCache<TlbEntry>,
    l2_2m: LruCache<TlbEntry>,
    /// Per page size: whether any entry of that size may be present.
    present: [bool; 3],
    stats: CacheStats,
}

impl Tlb {
    /// A TLB of the given sizes.
    pub fn new(cfg: TlbConfig) -> Self {
        Tlb {
            l1: LruCache::new(cfg.l1_entries, cfg.l1_ways),
            l2_4k: LruCache::new(cfg.l2_4k_entries, cfg.l2_ways),
            l2_2m: LruCache::new(cfg.l2_2m_entries, cfg.l2_ways),
            present: [false; 3],
            stats: CacheStats::default(),
        }
    }

    /// Looks up the translation of `gva`, counting a hit or a miss.
    #[inline(always)]
    pub fn lookup(&mut self, gva: u64) -> Option<TlbEntry> {
        for (i, size) in SIZES.into_iter().enumerate() {
            if !self.present[i] {
                continue;
            }
            let key = tlb_key(gva, size);
            if let Some(e) = self.l1.lookup(key) {
                self.stats.hits += 1;
                return Some(e);
            }
            let l2 = match size {
                PageSize::Size4K => &mut self.l2_4k,
                PageSize::Size2M => &mut self.l2_2m,
                PageSize::Size1G => continue,
            };
            if let Some(e) = l2.lookup(key) {
                self.l1.insert(key, e);
                self.stats.hits += 1;
                return Some(e);
            }
        }
        self.stats.misses += 1;
        None
    }

    /// Caches the translation of the page containing `gva`.
    #[inline]
    pub fn insert(&mut self, gva: u64, entry: TlbEntry) {
        let key = tlb_key(gva, entry.size);
        self.present[entry.size.level() as usize - 1] = true;
        self.l1.insert(key, entry);
        match entry.size {
            PageSize::Size4K => self.l2_4k.insert(key, entry),
            PageSize::Size2M => self.l2_2m.insert(key, entry),
            PageSize::Size1G => {}
        }
    }

    /// Drops every entry translating `gva` (INVLPG), including every piece of a guest
    /// large page that was cached as smaller entries ("splintered" over smaller host pages).
    pub fn invalidate_page(&mut self, gva: u64) {
        for size in SIZES {
            let key = tlb_key(gva, size);
            self.l1.invalidate(key);
            self.l2_4k.invalidate(key);
            self.l2_2m.invalidate(key);
        }
        let splinter = |key: u64, e: &TlbEntry| {
            let page_va = (key & ((1 << 52) - 1)) << e.size.shift();
            e.guest_size == e.size
                || (page_va ^ gva) & !e.guest_size.offset_mask() & ((1 << 57) - 1) != 0
        };
        self.l1.retain(splinter);
        self.l2_4k.retain(splinter);
    }

    /// Drops every entry, or every non-global entry when `keep_global` (a CR3 write with
    /// CR4.PGE).
    pub fn flush(&mut self, keep_global: bool) {
        if keep_global {
            self.l1.retain(|_, e| e.global);
            self.l2_4k.retain(|_, e| e.global);
            self.l2_2m.retain(|_, e| e.global);
        } else {
            self.l1.clear();
            self.l2_4k.clear();
            self.l2_2m.clear();
            self.present = [false; 3];
        }
    }

    /// Forgets the hit and miss counts (contents are kept).
    pub fn reset_stats(&mut self) {
        self.stats = CacheStats::default();
    }

    /// Hits and misses of the whole TLB (a hit in either level is a hit).
    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_least_recently_used_way() {
        let mut c = LruCache::new(2, 2);
        c.insert(1, 10);
        c.insert(2, 20);
        assert_eq!(c.lookup(1), Some(10));
        c.insert(3, 30); // evicts 2, the LRU
        assert_eq!(c.lookup(2), None);
        assert_eq!(c.lookup(1), Some(10));
        assert_eq!(c.lookup(3), Some(30));
        assert_eq!(c.stats(), CacheStats { hits: 3, misses: 1 });
        let mut off: LruCache<u32> = LruCache::new(0, 4);
        off.insert(1, 1);
        assert_eq!(off.lookup(1), None);
    }

    #[test]
    fn wide_sets_behave_like_a_scan_under_churn() {
        // A 48-way fully associative cache against a reference model kept as a Vec.
        let mut c = LruCache::new(48, 48);
        let mut model: Vec<(u64, u64)> = Vec::new(); // (key, last use), LRU = min
        let mut x = 12345u64;
        for t in 1..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 97;
            match x % 5 {
                0 => {
                    c.invalidate(key);
                    model.retain(|&(k, _)| k != key);
                }
                1 | 2 => {
                    let got = c.lookup(key);
                    let pos = model.iter().position(|&(k, _)| k == key);
                    assert_eq!(got, pos.map(|_| key * 3), "lookup {key} at {t}");
                    if let Some(p) = pos {
                        model[p].1 = t;
                    }
                }
                _ => {
                    c.insert(key, key * 3);
                    if let Some(p) = model.iter().position(|&(k, _)| k == key) {
                        model[p].1 = t;
                    } else {
                        if model.len() == 48 {
                            let lru = (0..48).min_by_key(|&i| model[i].1).unwrap();
                            model.remove(lru);
                        }
                        model.push((key, t));
                    }
                }
            }
        }
    }

    #[test]
    fn tlb_levels_sizes_and_invalidation() {
        let mut t = Tlb::new(TlbConfig {
            l1_entries: 2,
            l1_ways: 2,
            l2_4k_entries: 8,
            l2_2m_entries: 4,
            l2_ways: 2,
        });
        let e = |page, size, global| TlbEntry {
            page,
            gpa_page: page,
            size,
            guest_size: size,
            perms: Permissions::ALL,
            global,
        };
        t.insert(0x1000, e(0xa000, PageSize::Size4K, false));
        t.insert(0x2000, e(0xb000, PageSize::Size4K, false));
        t.insert(0x40_0000, e(0x60_0000, PageSize::Size2M, true));
        // 0x1000 fell out of L1 but is in L2.
        assert_eq!(t.lookup(0x1234).map(|e| e.page), Some(0xa000));
        assert_eq!(t.lookup(0x5f_ffff).map(|e| e.page), Some(0x60_0000));
        assert_eq!(t.lookup(0x3000), None);
        t.invalidate_page(0x1fff);
        assert_eq!(t.lookup(0x1000), None);
        t.flush(true);
        assert_eq!(t.lookup(0x2000), None);
        assert!(t.lookup(0x40_0000).is_some());
        t.flush(false);
        assert!(t.lookup(0x40_0000).is_none());
    }
}
