//! The engine: passes over the registered regions (see the crate documentation for the
//! design in prose).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rayon::prelude::*;

use crate::config::{os, Backend, Config, Error, Hooks, PassReport, Progress};
use crate::dirty::DirtySource;
use crate::hash::{is_zero_page, pages_equal, PageHasher, ZERO_HASH};
use crate::hold::WriterHold;
use crate::index::{index_key, Entry, Index};
use crate::region::{DomainPolicy, RegionId, RegionSpec, PAGE_SIZE};
use crate::restore::{FileRestore, KsmdKnobs};
use crate::stats::{HoldStats, RegionStats, Stats};
use crate::store::{Store, NO_SLOT};
use crate::sys;

/// Writes every page of a buffer (calloc'd memory is not resident until written, and the
/// compiler may drop plain stores of zero into it).
pub(crate) fn touch<T>(v: &mut [T]) {
    let bytes = std::mem::size_of_val(v);
    let p = v.as_mut_ptr() as *mut u8;
    let mut off = 0;
    while off < bytes {
        // SAFETY: in bounds of the slice; rewriting a byte with its own value.
        unsafe { std::ptr::write_volatile(p.add(off), std::ptr::read_volatile(p.add(off))) };
        off += 4096;
    }
}

// Page flags.
const HASHED: u16 = 1 << 0;
const ZERO: u16 = 1 << 1;
const ZERO_DONE: u16 = 1 << 2;
const MERGED: u16 = 1 << 3;
const FILEVMA: u16 = 1 << 4;
const HINTED: u16 = 1 << 5;
const INDEXED: u16 = 1 << 6;
const RECENT: u16 = 1 << 7;
const SKIPPED: u16 = 1 << 8;

/// Where each global page lives: shared with the worker threads.
struct Layout {
    starts: Vec<usize>,
    addrs: Vec<usize>,
}

impl Layout {
    #[inline]
    fn region_of(&self, p: usize) -> usize {
        self.starts.partition_point(|&s| s <= p) - 1
    }

    #[inline]
    fn addr(&self, p: usize) -> usize {
        let r = self.region_of(p);
        self.addrs[r] + (p - self.starts[r]) * PAGE_SIZE
    }

    #[inline]
    fn page(&self, p: usize) -> &[u8] {
        // SAFETY: the caller of Engine::new guaranteed the region is mapped; other threads
        // may write it concurrently (it is external memory, like a guest's).
        unsafe { std::slice::from_raw_parts(self.addr(p) as *const u8, PAGE_SIZE) }
    }
}

struct Region {
    spec: RegionSpec,
    first: usize,
    pages: usize,
    dkey: u32,
    stats: RegionStats,
}

#[derive(Clone, Copy)]
struct Plan {
    page: u32,
    slot: u32,
}

/// Buffers a pass needs, kept across passes and touched when the engine starts, so a
/// pass allocates nothing big (and the process's resident size only moves with merges).
#[derive(Default)]
struct Scratch {
    work: Vec<u32>,
    to_hash: Vec<u32>,
    pm: Vec<u64>,
    results: Vec<(u64, bool)>,
    candidates: Vec<u32>,
    zeros: Vec<u32>,
    plans: Vec<Plan>,
    fills: Vec<(u32, u32)>,
}

impl Scratch {
    fn new(n: usize) -> Scratch {
        fn touched<T: Clone>(n: usize, v: T) -> Vec<T> {
            let mut x = vec![v; n];
            touch(&mut x);
            x.clear();
            x
        }
        Scratch {
            work: touched(n, 0),
            to_hash: touched(n, 0),
            pm: touched(n.min(65536), 0),
            results: touched(n, (0, false)),
            candidates: touched(n, 0),
            zeros: touched(n, 0),
            plans: touched(n, Plan { page: 0, slot: 0 }),
            fills: touched(n / 2, (0, 0)),
        }
    }
}

struct VmaBudget {
    limit: usize,
    budget: usize,
    est: usize,
    exhausted: bool,
    reached: u64,
}

impl VmaBudget {
    fn take(&mut self, n: usize) -> bool {
        if self.exhausted {
            return false;
        }
        // No recount here: this runs while writers are held, and reading /proc/self/maps
        // takes tens of ms with 50k mappings. fit_budget() recounts before each pass.
        if self.est + n <= self.budget {
            self.est += n;
            return true;
        }
        self.exhausted = true;
        self.reached += 1;
        false
    }
}

/// The same-page merging engine.
pub struct Engine {
    cfg: Config,
    regions: Vec<Region>,
    starts: Vec<usize>,
    layout: Layout,
    npages: usize,
    hasher: Arc<dyn PageHasher>,
    dirty: Option<Box<dyn DirtySource>>,
    hold: Arc<dyn WriterHold>,
    pool: rayon::ThreadPool,
    tids: Arc<Mutex<Vec<i32>>>,
    hash: Vec<u64>,
    slot: Vec<u32>,
    flags: Vec<u16>,
    recent: Vec<u32>,
    scratch: Scratch,
    index: Index,
    store: Option<Store>,
    pagemap: sys::Pagemap,
    vma: VmaBudget,
    ksmd: Option<KsmdKnobs>,
    _max_map_count: Option<FileRestore>,
    progress: Arc<Progress>,
    pass: u64,
    // totals
    merged_pages: u64,
    zero_pages: u64,
    hinted_pages: u64,
    cow_breaks: u64,
    volatile_now: u64,
    unshared_now: u64,
    pages_hashed: u64,
    hash_seconds: f64,
    merge_seconds: f64,
    holds: HoldStats,
    hint_refused: bool,
    batch: usize,
}

impl Engine {
    /// Creates an engine over `regions`.
    ///
    /// # Safety
    /// Every region must be a private mapping the caller owns for the engine's lifetime,
    /// whose pages the engine may replace (`MAP_FIXED`) and discard (`MADV_DONTNEED`
    /// on all-zero pages) while the caller's `hold` hook holds its writers.
    pub unsafe fn new(cfg: Config, specs: Vec<RegionSpec>, hooks: Hooks) -> Result<Engine, Error> {
        let mut sorted: Vec<(usize, usize, &str)> = Vec::new();
        for s in &specs {
            let bad = |why: &str| Error::BadRegion {
                label: s.label.clone(),
                why: why.to_string(),
            };
            if s.addr % PAGE_SIZE != 0 || s.len % PAGE_SIZE != 0 {
                return Err(bad("address and length must be multiples of 4096"));
            }
            if s.len == 0 {
                return Err(bad("empty"));
            }
            sorted.push((s.addr, s.len, &s.label));
        }
        sorted.sort();
        for w in sorted.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(Error::BadRegion {
                    label: w[1].2.to_string(),
                    why: format!("overlaps region {:?}", w[0].2),
                });
            }
        }
        if !(0.0..=1.0).contains(&cfg.vma_budget_fraction) {
            return Err(Error::Config(format!(
                "VMA budget fraction {} not in 0..=1",
                cfg.vma_budget_fraction
            )));
        }
        if let Backend::Hybrid { min_run } = cfg.backend {
            if min_run == 0 {
                return Err(Error::Config("hybrid min_run must be at least 1".into()));
            }
        }
        let mut regions = Vec::new();
        let mut starts = Vec::new();
        let mut first = 0;
        for (i, s) in specs.into_iter().enumerate() {
            let pages = s.pages();
            let dkey = match cfg.policy {
                DomainPolicy::All => s.domain,
                DomainPolicy::Region | DomainPolicy::ZeroOnly => i as u32,
            };
            starts.push(first);
            let stats = RegionStats {
                label: s.label.clone(),
                pages: pages as u64,
                ..Default::default()
            };
            regions.push(Region {
                spec: s,
                first,
                pages,
                dkey,
                stats,
            });
            first += pages;
        }
        let npages = first;
        if npages >= (1 << 31) {
            return Err(Error::Config("more than 2^31 pages".into()));
        }
        let max_map_count = if let Some(v) = cfg.raise_max_map_count {
            Some(
                FileRestore::set("/proc/sys/vm/max_map_count", &v.to_string())
                    .map_err(os("raising vm.max_map_count"))?,
            )
        } else {
            None
        };
        let limit = sys::read_u64("/proc/sys/vm/max_map_count").unwrap_or(65530) as usize;
        let budget = cfg
            .vma_budget
            .unwrap_or((limit as f64 * cfg.vma_budget_fraction) as usize);
        let est = sys::map_count().map_err(os("counting mappings"))?;
        let tids = Arc::new(Mutex::new(Vec::new()));
        let t2 = tids.clone();
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            cfg.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ksm-worker-{i}"))
            .start_handler(move |_| {
                t2.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(sys::gettid())
            })
            .build()
            .map_err(|e| Error::Config(format!("thread pool: {e}")))?;
        let store = if cfg.backend.remaps() {
            Some(Store::new(npages + 1).map_err(os("creating the store memfd"))?)
        } else {
            None
        };
        let mut flags = vec![0u16; npages];
        let mut hash = vec![0u64; npages];
        let mut slot = vec![NO_SLOT; npages];
        // Touch the metadata now so it is part of the baseline the caller may measure.
        touch(&mut flags);
        touch(&mut hash);
        touch(&mut slot);
        let hint_refused = cfg.backend.hints()
            && (cfg.policy != DomainPolicy::All
                || regions.windows(2).any(|w| w[0].dkey != w[1].dkey));
        let mut e = Engine {
            batch: 256,
            index: Index::with_capacity(npages),
            store,
            pagemap: sys::Pagemap::open().map_err(os("opening /proc/self/pagemap"))?,
            vma: VmaBudget {
                limit,
                budget,
                est,
                exhausted: false,
                reached: 0,
            },
            ksmd: None,
            _max_map_count: max_map_count,
            progress: Arc::new(Progress::default()),
            pass: 0,
            merged_pages: 0,
            zero_pages: 0,
            hinted_pages: 0,
            cow_breaks: 0,
            volatile_now: 0,
            unshared_now: 0,
            pages_hashed: 0,
            hash_seconds: 0.0,
            merge_seconds: 0.0,
            holds: HoldStats::default(),
            hint_refused,
            cfg,
            layout: Layout {
                starts: starts.clone(),
                addrs: regions.iter().map(|r| r.spec.addr).collect(),
            },
            regions,
            starts,
            npages,
            hasher: hooks.hasher,
            dirty: hooks.dirty,
            hold: hooks.hold,
            pool,
            tids,
            hash,
            slot,
            flags,
            recent: {
                let mut v = vec![0u32; npages];
                touch(&mut v);
                v.clear();
                v
            },
            scratch: Scratch::new(npages),
        };
        // The dirty source starts tracking when the regions are registered (as KVM's
        // dirty log does when a memslot is created), so the first pass sees all writes.
        if let Some(d) = e.dirty.as_mut() {
            let specs: Vec<RegionSpec> = e.regions.iter().map(|r| r.spec.clone()).collect();
            d.arm(&specs).map_err(os("arming the dirty source"))?;
        }
        e.note_tid();
        // Make sure every worker has started (and registered its tid).
        e.pool.broadcast(|_| ());
        Ok(e)
    }

    fn note_tid(&self) {
        let t = sys::gettid();
        let mut v = self.tids.lock().unwrap_or_else(|e| e.into_inner());
        if !v.contains(&t) {
            v.push(t);
        }
    }

    /// Counters another thread may read while the engine runs.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Thread ids of the engine's threads (workers and the threads that drove it).
    pub fn thread_ids(&self) -> Vec<i32> {
        self.tids.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// CPU seconds used so far by the engine's threads (/proc/self/task/*/stat).
    pub fn cpu_seconds(&self) -> f64 {
        self.thread_ids()
            .into_iter()
            .map(sys::thread_cpu_seconds)
            .sum()
    }

    /// Number of regions.
    pub fn regions(&self) -> usize {
        self.regions.len()
    }

    /// The store's memfd (remap and hybrid backends).
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Store slot a page of a region currently maps intact (unwritten), if any.
    pub fn page_slot(&self, region: RegionId, page: usize) -> Option<u32> {
        let p = self.regions[region].first + page;
        (self.flags[p] & MERGED != 0).then_some(self.slot[p])
    }

    /// Name of the dirty source in use, or the fallback rule.
    pub fn stability_rule(&self) -> &str {
        self.dirty
            .as_ref()
            .map(|d| d.name())
            .unwrap_or("hash-unchanged-across-two-passes")
    }

    #[inline]
    fn region_of(&self, p: usize) -> usize {
        self.starts.partition_point(|&s| s <= p) - 1
    }

    #[inline]
    fn addr(&self, p: usize) -> usize {
        self.layout.addr(p)
    }

    #[inline]
    fn page(&self, p: usize) -> &[u8] {
        self.layout.page(p)
    }

    fn saved_pages(&self) -> u64 {
        let live = self
            .store
            .as_ref()
            .map(|s| s.live_slots() as u64)
            .unwrap_or(0);
        (self.merged_pages + self.zero_pages).saturating_sub(live)
    }

    fn publish(&self) {
        self.progress
            .saved_pages
            .store(self.saved_pages(), Ordering::Relaxed);
    }

    /// Runs one pass: look at the pages written since the last pass (all pages the first
    /// time, or every time without a dirty source), hash them, merge the stable duplicates
    /// and reclaim the zero pages.
    pub fn scan(&mut self) -> Result<PassReport, Error> {
        self.note_tid();
        let t0 = Instant::now();
        let mut rep = PassReport {
            pass: self.pass,
            ..Default::default()
        };
        let full = self.pass == 0 || self.dirty.is_none();
        // 1. Pages to look at.
        let mut sc = std::mem::take(&mut self.scratch);
        let mut work = std::mem::take(&mut sc.work);
        work.clear();
        if full {
            work.extend(0..self.npages as u32);
        } else {
            let w = &mut work;
            let mut tmp = Vec::new();
            let d = self.dirty.as_mut().expect("dirty source");
            for (ri, r) in self.regions.iter().enumerate() {
                tmp.clear();
                d.collect(ri, &mut tmp)
                    .map_err(os("collecting dirty pages"))?;
                w.extend(
                    tmp.iter()
                        .filter(|&&i| (i as usize) < r.pages)
                        .map(|&i| (r.first + i as usize) as u32),
                );
            }
            w.sort_unstable();
            w.dedup();
        }
        rep.pages_examined = work.len() as u64;

        // 2. Copy-on-write breaks and pages still reclaimed: ask pagemap about merged and
        //    zero-reclaimed pages among them.
        let mut to_hash = std::mem::take(&mut sc.to_hash);
        to_hash.clear();
        {
            let pm = &mut sc.pm;
            let mut i = 0;
            while i < work.len() {
                let p0 = work[i] as usize;
                let r = self.region_of(p0);
                let rend = self.regions[r].first + self.regions[r].pages;
                // A run of consecutive work pages within one region, at most 64K pages.
                let mut j = i + 1;
                while j < work.len()
                    && work[j] as usize == work[j - 1] as usize + 1
                    && (work[j] as usize) < rend
                    && j - i < 65536
                {
                    j += 1;
                }
                // A full pass also asks pagemap which pages hold memory at all: a page
                // never touched (not present, not swapped) reads as zero but holds
                // nothing, so reclaiming it would save nothing; it is left alone.
                let need_pm = full
                    || work[i..j]
                        .iter()
                        .any(|&p| self.flags[p as usize] & (MERGED | ZERO_DONE) != 0);
                if need_pm {
                    self.pagemap
                        .read(self.addr(p0), j - i, pm)
                        .map_err(os("reading /proc/self/pagemap"))?;
                }
                for (k, &p) in work[i..j].iter().enumerate() {
                    let p = p as usize;
                    let f = self.flags[p];
                    if f & MERGED != 0 {
                        let e = pm[k];
                        if e & sys::PM_PRESENT != 0 && e & sys::PM_FILE == 0 {
                            // Written since it was merged: the writer has a private copy.
                            self.flags[p] &= !MERGED;
                            self.merged_pages -= 1;
                            self.cow_breaks += 1;
                            self.regions[r].stats.cow_breaks += 1;
                            self.regions[r].stats.merged -= 1;
                            rep.cow_breaks += 1;
                            if let Some(st) = self.store.as_mut() {
                                st.put(self.slot[p]);
                            }
                            to_hash.push(p as u32);
                        }
                        continue;
                    }
                    if f & ZERO_DONE != 0 {
                        // Still discarded (not present): it reads as zero. Dirty sources may
                        // report discarded pages once, without a write.
                        if pm[k] & sys::PM_PRESENT == 0 {
                            continue; // still discarded: reads as zero
                        }
                        self.flags[p] &= !ZERO_DONE;
                        self.zero_pages -= 1;
                        self.regions[r].stats.zero -= 1;
                    }
                    if need_pm && pm[k] & (sys::PM_PRESENT | sys::PM_SWAP) == 0 {
                        continue; // untouched: no memory to save
                    }
                    to_hash.push(p as u32);
                }
                i = j;
            }
        }

        // 3. Hash in parallel.
        let th = Instant::now();
        rep.collect_s = (th - t0).as_secs_f64();
        let mut results = std::mem::take(&mut sc.results);
        {
            let hasher = &*self.hasher;
            let me = &self.layout;
            self.pool.install(|| {
                to_hash
                    .par_iter()
                    .with_min_len(256)
                    .map(|&p| {
                        let pg = me.page(p as usize);
                        if is_zero_page(pg) {
                            (ZERO_HASH, true)
                        } else {
                            (hasher.hash(pg), false)
                        }
                    })
                    .collect_into_vec(&mut results)
            })
        }
        self.hash_seconds += th.elapsed().as_secs_f64();
        rep.hash_s = th.elapsed().as_secs_f64();
        let tp = Instant::now();
        self.pages_hashed += to_hash.len() as u64;
        rep.pages_hashed = to_hash.len() as u64;
        self.progress
            .pages_hashed
            .store(self.pages_hashed, Ordering::Relaxed);

        // 4. Stability, and the candidates of this pass.
        for &p in &self.recent {
            self.flags[p as usize] &= !RECENT;
        }
        let mut candidates = std::mem::take(&mut sc.candidates);
        let mut zeros = std::mem::take(&mut sc.zeros);
        candidates.clear();
        zeros.clear();
        let mut volatile = 0u64;
        let zero_only = self.cfg.policy == DomainPolicy::ZeroOnly;
        for (k, &p) in to_hash.iter().enumerate() {
            let p = p as usize;
            let (h, z) = results[k];
            let f = self.flags[p];
            let had = f & HASHED != 0;
            let changed = !had || self.hash[p] != h || (f & ZERO != 0) != z;
            if changed && f & INDEXED != 0 {
                let key = index_key(self.hash[p], self.dkey_of(p));
                self.index.remove(key, Entry::Page(p as u32));
                self.flags[p] &= !INDEXED;
            }
            self.hash[p] = h;
            self.flags[p] = (self.flags[p] | HASHED) & !ZERO | if z { ZERO } else { 0 };
            let stable = if self.dirty.is_some() {
                self.pass == 0 || f & RECENT == 0
            } else {
                had && !changed
            };
            if !stable {
                volatile += 1;
                continue;
            }
            if z {
                zeros.push(p as u32);
            } else if !zero_only && self.flags[p] & (INDEXED | MERGED) == 0 {
                candidates.push(p as u32);
            }
        }
        if self.dirty.is_some() && self.pass > 0 {
            for &p in &work {
                self.flags[p as usize] |= RECENT;
            }
            std::mem::swap(&mut self.recent, &mut work);
        }
        sc.work = work;
        sc.to_hash = to_hash;
        sc.results = results;
        self.volatile_now = volatile;

        // 5. Plan merges in address order, so new store slots are handed out in runs.
        let mut plans = std::mem::take(&mut sc.plans);
        let mut fills = std::mem::take(&mut sc.fills);
        plans.clear();
        fills.clear();
        let mut new_slots: Vec<u32> = Vec::new();
        if self.cfg.backend.remaps() || self.cfg.backend.hints() {
            self.plan(&candidates, &mut plans, &mut fills, &mut new_slots);
        }

        rep.plan_s = tp.elapsed().as_secs_f64();
        // Zero pages first: the memory they free is what the store's new pages come from
        // (on a VM host, memory touched before is much cheaper than fresh memory).
        let tz = Instant::now();
        let (_, zeroed, _) = self.execute(&mut Vec::new(), &mut zeros)?;
        sc.zeros = zeros;
        sc.candidates = candidates;
        rep.zero_reclaimed = zeroed;
        rep.zero_s = tz.elapsed().as_secs_f64();
        let tf = Instant::now();
        // 6. Fill new store slots from their first page (no hold: every member, the first
        //    too, is compared with the slot under hold before it is remapped).
        if let Some(store) = self.store.as_ref() {
            let me = &self.layout;
            self.pool.install(|| {
                fills.par_iter().for_each(|&(s, q)| {
                    // SAFETY: each slot is filled by one task; the slot is fresh.
                    unsafe { store.fill(s, me.page(q as usize).as_ptr()) }
                })
            });
        }

        // 7. Split plans into remaps and hints.
        let mut hints: Vec<u32> = Vec::new();
        let mut remap_plans: Vec<Plan> = match self.cfg.backend {
            Backend::Remap => plans,
            Backend::Madvise => {
                hints.extend(plans.iter().map(|p| p.page));
                plans.clear();
                plans
            }
            Backend::Hybrid { min_run } => {
                let mut v = plans;
                v.sort_unstable_by_key(|p| p.page);
                let mut keep = Vec::with_capacity(v.len());
                let mut i = 0;
                while i < v.len() {
                    let mut j = i + 1;
                    while j < v.len()
                        && v[j].page == v[j - 1].page + 1
                        && v[j].slot == v[j - 1].slot.wrapping_add(1)
                        && self.region_of(v[j].page as usize) == self.region_of(v[i].page as usize)
                    {
                        j += 1;
                    }
                    if j - i >= min_run {
                        keep.extend_from_slice(&v[i..j]);
                    } else {
                        hints.extend(v[i..j].iter().map(|p| p.page));
                    }
                    i = j;
                }
                keep
            }
        };

        // 8. Verify and remap / reclaim, region by region, in short holds.
        let tm = Instant::now();
        rep.fill_s = (tm - tf).as_secs_f64();
        let over_budget = self.fit_budget(&mut remap_plans);
        let (merged, _, mut skipped) = self.execute(&mut remap_plans, &mut Vec::new())?;
        for &p in &over_budget {
            self.index_page(p as usize);
            self.flags[p as usize] |= SKIPPED;
        }
        skipped.extend(over_budget);
        sc.plans = remap_plans;
        sc.fills = fills;
        rep.merged = merged;
        if matches!(self.cfg.backend, Backend::Hybrid { .. }) {
            hints.extend(skipped);
        }
        // Slots created this pass that nobody maps (verification failed, run too short).
        if let Some(st) = self.store.as_mut() {
            for &s in &new_slots {
                st.discard_if_unused(s);
            }
            let freed = st
                .flush_punches()
                .map_err(os("punching holes in the store"))?;
            for s in freed {
                let key = index_key(st.hash[s as usize], st.key[s as usize]);
                self.index.remove(key, Entry::Slot(s));
            }
        }
        self.merge_seconds += tm.elapsed().as_secs_f64();
        rep.merge_s = tm.elapsed().as_secs_f64();

        // 9. Hints to ksmd.
        if !hints.is_empty() {
            rep.hinted = self.hint(hints)?;
        }

        // Give the pass's temporary buffers back to the kernel, so the process's resident
        // size reflects the merges and not the allocator's free lists.
        if rep.pages_hashed > 4096 {
            // SAFETY: no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
        self.scratch = sc;
        self.pass += 1;
        let mut unshared = 0;
        for r in &self.regions {
            unshared += r.stats.unshared;
        }
        self.unshared_now = unshared;
        rep.seconds = t0.elapsed().as_secs_f64();
        self.publish();
        self.progress.passes.store(self.pass, Ordering::Relaxed);
        Ok(rep)
    }

    #[inline]
    fn dkey_of(&self, p: usize) -> u32 {
        self.regions[self.region_of(p)].dkey
    }

    fn plan(
        &mut self,
        candidates: &[u32],
        plans: &mut Vec<Plan>,
        fills: &mut Vec<(u32, u32)>,
        new_slots: &mut Vec<u32>,
    ) {
        let mut found: Vec<Entry> = Vec::new();
        for &p in candidates {
            let p = p as usize;
            let r = self.region_of(p);
            let dk = self.regions[r].dkey;
            let h = self.hash[p];
            let key = index_key(h, dk);
            found.clear();
            {
                let store = self.store.as_ref();
                let (hash, flags, regions, starts) =
                    (&self.hash, &self.flags, &self.regions, &self.starts);
                self.index.for_each(key, |e| match e {
                    Entry::Slot(s) => {
                        if let Some(st) = store {
                            if st.key[s as usize] == dk && st.hash[s as usize] == h {
                                found.push(e);
                            }
                        }
                    }
                    Entry::Page(q) => {
                        let q = q as usize;
                        let rq = starts.partition_point(|&s| s <= q) - 1;
                        if q != p
                            && regions[rq].dkey == dk
                            && hash[q] == h
                            && flags[q] & (MERGED | ZERO) == 0
                        {
                            found.push(e);
                        }
                    }
                });
            }
            // Slots first (existing merged content), then unmerged pages.
            found.sort_by_key(|e| match e {
                Entry::Slot(_) => 0,
                Entry::Page(_) => 1,
            });
            let choice = if found.len() == 1 {
                Some(found[0])
            } else {
                // Several candidates share the hash: pick one with equal bytes.
                let me = &*self;
                found.iter().copied().find(|e| match *e {
                    Entry::Slot(s) => me
                        .store
                        .as_ref()
                        .map(|st| pages_equal(st.page(s), me.page(p)))
                        .unwrap_or(false),
                    Entry::Page(q) => pages_equal(me.page(q as usize), me.page(p)),
                })
            };
            match choice {
                Some(Entry::Slot(s)) => plans.push(Plan {
                    page: p as u32,
                    slot: s,
                }),
                Some(Entry::Page(q)) => {
                    let s = match self.store.as_mut() {
                        Some(st) => st.alloc(h, dk),
                        None => Some(NO_SLOT), // madvise: no store, the plan is a hint
                    };
                    let Some(s) = s else {
                        self.index_page(p);
                        continue;
                    };
                    self.index.remove(key, Entry::Page(q));
                    self.flags[q as usize] &= !INDEXED;
                    let rq = self.region_of(q as usize);
                    self.regions[rq].stats.unshared =
                        self.regions[rq].stats.unshared.saturating_sub(1);
                    if s != NO_SLOT {
                        self.index.insert(key, Entry::Slot(s));
                        fills.push((s, q));
                        new_slots.push(s);
                    }
                    plans.push(Plan { page: q, slot: s });
                    plans.push(Plan {
                        page: p as u32,
                        slot: s,
                    });
                }
                _ => self.index_page(p),
            }
        }
    }

    /// If remapping all `plans` would take more mappings than the VMA budget has left,
    /// keeps the longest runs (most pages per mapping) and returns the pages left out.
    fn fit_budget(&mut self, plans: &mut Vec<Plan>) -> Vec<u32> {
        if plans.is_empty() {
            return Vec::new();
        }
        plans.sort_unstable_by_key(|p| p.page);
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < plans.len() {
            let mut j = i + 1;
            while j < plans.len()
                && plans[j].page == plans[j - 1].page + 1
                && plans[j].slot == plans[j - 1].slot.wrapping_add(1)
                && self.region_of(plans[j].page as usize) == self.region_of(plans[i].page as usize)
            {
                j += 1;
            }
            runs.push((i, j));
            i = j;
        }
        self.vma.est = sys::map_count().unwrap_or(self.vma.est);
        let room = self.vma.budget.saturating_sub(self.vma.est) / 2;
        if runs.len() <= room {
            return Vec::new();
        }
        self.vma.reached += 1;
        // Longest runs first; equal runs by their first slot, so the copies of one run
        // in every region are kept together (a slot mapped once saves nothing).
        runs.sort_by_key(|&(a, b)| (std::cmp::Reverse(b - a), plans[a].slot));
        let mut keep: Vec<Plan> = Vec::new();
        let mut dropped = Vec::new();
        for (k, &(a, b)) in runs.iter().enumerate() {
            if k < room {
                keep.extend_from_slice(&plans[a..b]);
            } else {
                dropped.extend(plans[a..b].iter().map(|p| p.page));
            }
        }
        keep.sort_unstable_by_key(|p| p.page);
        *plans = keep;
        dropped
    }

    fn index_page(&mut self, p: usize) {
        if self.flags[p] & INDEXED != 0 {
            return;
        }
        let r = self.region_of(p);
        let key = index_key(self.hash[p], self.regions[r].dkey);
        self.index.insert(key, Entry::Page(p as u32));
        self.flags[p] |= INDEXED;
        self.regions[r].stats.unshared += 1;
    }

    /// Verifies and carries out merges and zero reclaims. Returns (merged, zeroed,
    /// pages skipped for the VMA budget).
    fn execute(
        &mut self,
        plans: &mut [Plan],
        zeros: &mut [u32],
    ) -> Result<(u64, u64, Vec<u32>), Error> {
        plans.sort_unstable_by_key(|p| p.page);
        zeros.sort_unstable();
        let mut merged = 0u64;
        let mut zeroed = 0u64;
        let mut skipped: Vec<u32> = Vec::new();
        let mut failed: Vec<u32> = Vec::new();
        let (mut pi, mut zi) = (0usize, 0usize);
        self.vma.exhausted = false;
        for r in 0..self.regions.len() {
            let rend = (self.regions[r].first + self.regions[r].pages) as u32;
            while (pi < plans.len() && plans[pi].page < rend)
                || (zi < zeros.len() && zeros[zi] < rend)
            {
                // One batch: up to self.batch pages of this region.
                let mut pj = pi;
                while pj < plans.len() && plans[pj].page < rend && pj - pi < self.batch {
                    pj += 1;
                }
                let mut zj = zi;
                while zj < zeros.len() && zeros[zj] < rend && zj - zi < self.batch * 4 {
                    zj += 1;
                }
                let bp = &plans[pi..pj];
                let bz = &zeros[zi..zj];
                let (lo, hi) = {
                    let a = bp
                        .first()
                        .map(|p| p.page)
                        .into_iter()
                        .chain(bz.first().copied())
                        .min()
                        .unwrap();
                    let b = bp
                        .last()
                        .map(|p| p.page)
                        .into_iter()
                        .chain(bz.last().copied())
                        .max()
                        .unwrap();
                    (a, b)
                };
                let t = Instant::now();
                self.hold.hold(r);
                let th = Instant::now();
                let res = self.batch_locked(r, bp, bz, &mut skipped, &mut failed);
                self.hold.release(r);
                let held = th.elapsed();
                self.holds.record(held);
                let (m, z) = res?;
                merged += m;
                zeroed += z;
                if let Some(d) = self.dirty.as_mut() {
                    let first = self.regions[r].first;
                    d.replaced(r, lo as usize - first, (hi - lo) as usize + 1)
                        .map_err(os("re-arming the dirty source"))?;
                }
                // Keep holds near the target.
                let target = self.cfg.hold_target.as_secs_f64();
                let took = held.as_secs_f64().max(1e-6);
                if took > target {
                    self.batch = (self.batch / 2).max(16);
                } else if took < target / 3.0 {
                    self.batch = (self.batch * 2).min(1 << 16);
                }
                let _ = t;
                pi = pj;
                zi = zj;
                self.publish();
            }
        }
        // Pages whose merge failed verification or was skipped go to the index, so later
        // pages can still find them.
        for p in failed.iter().chain(skipped.iter()) {
            self.index_page(*p as usize);
        }
        for p in &skipped {
            self.flags[*p as usize] |= SKIPPED;
        }
        Ok((merged, zeroed, skipped))
    }

    fn batch_locked(
        &mut self,
        r: usize,
        bp: &[Plan],
        bz: &[u32],
        skipped: &mut Vec<u32>,
        failed: &mut Vec<u32>,
    ) -> Result<(u64, u64), Error> {
        // Compare every page with its slot, in parallel.
        let ok: Vec<bool> = {
            let me = &self.layout;
            let store = self.store.as_ref();
            self.pool.install(|| {
                bp.par_iter()
                    .with_min_len(64)
                    .map(|pl| match store {
                        Some(st) => pages_equal(me.page(pl.page as usize), st.page(pl.slot)),
                        None => false,
                    })
                    .collect()
            })
        };
        let zok: Vec<bool> = {
            let me = &self.layout;
            self.pool.install(|| {
                bz.par_iter()
                    .with_min_len(256)
                    .map(|&p| is_zero_page(me.page(p as usize)))
                    .collect()
            })
        };
        let mut merged = 0;
        let mut i = 0;
        while i < bp.len() {
            if !ok[i] {
                failed.push(bp[i].page);
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < bp.len()
                && ok[j]
                && bp[j].page == bp[j - 1].page + 1
                && bp[j].slot == bp[j - 1].slot + 1
            {
                j += 1;
            }
            // A run maps consecutive store pages: one mmap, one VMA.
            if !self.vma.take(2) {
                skipped.extend(
                    bp[i..]
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| ok[i + k])
                        .map(|(_, p)| p.page),
                );
                failed.extend(
                    bp[i..]
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| !ok[i + k])
                        .map(|(_, p)| p.page),
                );
                break;
            }
            let p0 = bp[i].page as usize;
            let addr = self.addr(p0);
            let st = self.store.as_mut().expect("remap needs the store");
            // SAFETY: the region is the caller's to replace (Engine::new), writers held.
            unsafe {
                sys::map_private_fixed(
                    addr,
                    (j - i) * PAGE_SIZE,
                    st.fd(),
                    bp[i].slot as u64 * PAGE_SIZE as u64,
                )
            }
            .map_err(os("mmap MAP_FIXED of the store"))?;
            for pl in &bp[i..j] {
                let p = pl.page as usize;
                let f = self.flags[p];
                if f & MERGED != 0 {
                    st.put(self.slot[p]);
                    self.merged_pages -= 1;
                    self.regions[r].stats.merged -= 1;
                }
                st.get(pl.slot);
                self.slot[p] = pl.slot;
                self.flags[p] = (f | MERGED | FILEVMA) & !(INDEXED | SKIPPED);
                if f & INDEXED != 0 {
                    self.regions[r].stats.unshared =
                        self.regions[r].stats.unshared.saturating_sub(1);
                }
            }
            self.merged_pages += (j - i) as u64;
            self.regions[r].stats.merged += (j - i) as u64;
            merged += (j - i) as u64;
            i = j;
        }
        // Zero pages: MADV_DONTNEED over runs of anonymous pages; a zero page inside a
        // store mapping gets a fresh anonymous mapping instead (DONTNEED there would bring
        // back the store's content).
        let mut zeroed = 0;
        let mut i = 0;
        while i < bz.len() {
            if !zok[i] {
                i += 1;
                continue;
            }
            let filevma = self.flags[bz[i] as usize] & FILEVMA != 0;
            let mut j = i + 1;
            while j < bz.len()
                && zok[j]
                && bz[j] == bz[j - 1] + 1
                && (self.flags[bz[j] as usize] & FILEVMA != 0) == filevma
                && j - i < 512
            {
                j += 1;
            }
            let addr = self.addr(bz[i] as usize);
            let len = (j - i) * PAGE_SIZE;
            if filevma {
                if !self.vma.take(2) {
                    i = j;
                    continue;
                }
                // SAFETY: as above.
                unsafe { sys::map_anon_fixed(addr, len) }
                    .map_err(os("mmap of anonymous memory over a zero page"))?;
            } else {
                // SAFETY: the pages are all zero and their writers are held.
                unsafe { sys::madvise(addr, len, libc::MADV_DONTNEED) }
                    .map_err(os("MADV_DONTNEED"))?;
            }
            for &p in &bz[i..j] {
                let p = p as usize;
                let f = self.flags[p];
                if f & MERGED != 0 {
                    if let Some(st) = self.store.as_mut() {
                        st.put(self.slot[p]);
                    }
                    self.merged_pages -= 1;
                    self.regions[r].stats.merged -= 1;
                }
                if filevma {
                    self.slot[p] = NO_SLOT;
                }
                self.flags[p] = (f | ZERO_DONE) & !(MERGED | if filevma { FILEVMA } else { 0 });
            }
            self.zero_pages += (j - i) as u64;
            self.regions[r].stats.zero += (j - i) as u64;
            zeroed += (j - i) as u64;
            i = j;
        }
        Ok((merged, zeroed))
    }

    /// Marks the hinted pages' ranges MADV_MERGEABLE, coalescing nearby ranges so the
    /// number of new VMAs stays within the budget, and starts ksmd with the configured
    /// knobs (restored when the engine is dropped).
    fn hint(&mut self, mut pages: Vec<u32>) -> Result<u64, Error> {
        if self.hint_refused {
            // ksmd would merge across domains: never hint.
            return Ok(0);
        }
        pages.retain(|&p| self.flags[p as usize] & HINTED == 0);
        if pages.is_empty() {
            return Ok(0);
        }
        pages.sort_unstable();
        pages.dedup();
        let room = self
            .vma
            .budget
            .saturating_sub(sys::map_count().unwrap_or(self.vma.est))
            / 2;
        let mut gap = 0usize;
        let ranges = loop {
            let mut ranges: Vec<(usize, usize)> = Vec::new(); // global page ranges [a, b)
            for &p in &pages {
                let p = p as usize;
                if let Some(last) = ranges.last_mut() {
                    if p <= last.1 + gap && self.region_of(p) == self.region_of(last.0) {
                        last.1 = p + 1;
                        continue;
                    }
                }
                ranges.push((p, p + 1));
            }
            if ranges.len() <= room.max(1) || gap > 1 << 20 {
                break ranges;
            }
            gap = if gap == 0 { 1 } else { gap * 2 };
        };
        if self.ksmd.is_none() {
            let k = KsmdKnobs::start(self.cfg.ksmd.pages_to_scan, self.cfg.ksmd.sleep_ms, None)
                .map_err(os("setting ksmd's knobs in /sys/kernel/mm/ksm"))?;
            self.ksmd = Some(k);
        }
        let mut n = 0;
        for (a, b) in ranges {
            // SAFETY: MADV_MERGEABLE changes no content.
            unsafe { sys::madvise(self.addr(a), (b - a) * PAGE_SIZE, libc::MADV_MERGEABLE) }
                .map_err(os("MADV_MERGEABLE"))?;
            for p in a..b {
                if self.flags[p] & HINTED == 0 {
                    self.flags[p] |= HINTED;
                    let r = self.region_of(p);
                    self.regions[r].stats.hinted += 1;
                    n += 1;
                }
            }
        }
        self.hinted_pages += n;
        Ok(n)
    }

    /// Stops ksmd's run and restores its knobs now (also done on drop).
    pub fn stop_ksmd(&mut self) {
        self.ksmd = None;
    }

    /// Statistics: the engine's counters, per region and in total.
    pub fn stats(&self) -> Stats {
        let live = self
            .store
            .as_ref()
            .map(|s| s.live_slots() as u64)
            .unwrap_or(0);
        let vma_count = sys::map_count().unwrap_or(0) as u64;
        let meta = (self.npages * (8 + 4 + 2) + self.index.bytes()) as i64;
        let saved = self.saved_pages();
        Stats {
            backend: self.cfg.backend.name().to_string(),
            policy: self.cfg.policy,
            stability: self.stability_rule().to_string(),
            pages: self.npages as u64,
            pages_shared: live,
            pages_sharing: self.merged_pages.saturating_sub(live),
            pages_unshared: self.unshared_now,
            pages_volatile: self.volatile_now,
            ksm_zero_pages: self.zero_pages,
            full_scans: self.pass,
            general_profit: saved as i64 * PAGE_SIZE as i64 - meta,
            cow_breaks: self.cow_breaks,
            store_pages: self
                .store
                .as_ref()
                .map(|s| s.resident_bytes() / PAGE_SIZE as u64)
                .unwrap_or(0),
            store_punched: self.store.as_ref().map(|s| s.punched()).unwrap_or(0),
            vma_count,
            vma_limit: self.vma.limit as u64,
            vma_budget: self.vma.budget as u64,
            vma_budget_reached: self.vma.reached,
            pages_hinted: self.hinted_pages,
            hints_refused_by_domain: self.hint_refused,
            pages_hashed: self.pages_hashed,
            hash_pages_per_sec: if self.hash_seconds > 0.0 {
                self.pages_hashed as f64 / self.hash_seconds
            } else {
                0.0
            },
            merge_seconds: self.merge_seconds,
            holds: self.holds.clone(),
            metadata_bytes: meta as u64,
            saved_bytes_claimed: saved * PAGE_SIZE as u64,
            regions: self.regions.iter().map(|r| r.stats.clone()).collect(),
        }
    }
}
