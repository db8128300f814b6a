//! Synthetic workloads: regions filled with a known mix of identical, zero and unique
//! pages, writer threads that keep rewriting random pages (through a [`WriterGate`]), and
//! a check that every page holds exactly its last written value afterwards. Used by the
//! tests, the benches and `memvirt dedup --synthetic`.
//!
//! Region `r`, page `j`: the *kind* of page `j` is the same in every region (identical
//! guests); an identical page holds template `t` (its rank among the identical pages),
//! so each template has one copy per region; unique pages hold random bytes of their own.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::hold::WriterGate;
use crate::region::{DomainPolicy, RegionSpec, PAGE_SIZE};
use crate::sys;

/// How page kinds are laid out in a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Kinds interleaved at random, page by page.
    Scattered,
    /// Kinds in long runs (64–1024 pages), as a loaded image is.
    Contiguous,
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "scattered" => Ok(Layout::Scattered),
            "contiguous" => Ok(Layout::Contiguous),
            _ => Err(format!(
                "unknown layout {s:?}: expected scattered or contiguous"
            )),
        }
    }
}

/// Percentages of identical, zero and unique pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Mix {
    pub ident: u32,
    pub zero: u32,
    pub unique: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            ident: 50,
            zero: 25,
            unique: 25,
        }
    }
}

impl FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || {
            format!("bad mix {s:?}: expected IDENT:ZERO:UNIQUE percentages adding up to 100, e.g. 50:25:25")
        };
        if parts.len() != 3 {
            return Err(bad());
        }
        let v: Vec<u32> = parts
            .iter()
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        if v.iter().sum::<u32>() != 100 {
            return Err(bad());
        }
        Ok(Mix {
            ident: v[0],
            zero: v[1],
            unique: v[2],
        })
    }
}

/// What a page holds initially.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Template `t`, the same in every region.
    Ident(u32),
    /// All zeros.
    Zero,
    /// Random bytes of its own.
    Unique,
}

/// Parameters of a workload.
#[derive(Clone, Debug)]
pub struct Spec {
    pub regions: usize,
    pub region_bytes: usize,
    pub mix: Mix,
    pub layout: Layout,
    pub seed: u64,
}

#[inline]
fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills a page with the bytes of template `t`.
pub fn template(seed: u64, t: u32, out: &mut [u8]) {
    let mut x = seed ^ 0x1DE7_0000_0000_0000 ^ (t as u64) << 8;
    fill_random(&mut x, out);
}

fn fill_random(x: &mut u64, out: &mut [u8]) {
    for c in out.chunks_exact_mut(8) {
        c.copy_from_slice(&splitmix(x).to_le_bytes());
    }
}

fn unique(seed: u64, r: usize, j: usize, out: &mut [u8]) {
    let mut x = seed ^ 0x0417_0000_0000_0000 ^ ((r as u64) << 40) ^ j as u64;
    fill_random(&mut x, out);
    out[0] = 1; // never all zero
}

/// A workload: its regions (mapped privately, filled) and its layout.
pub struct Workload {
    pub spec: Spec,
    pub addrs: Vec<usize>,
    pub kinds: Vec<Kind>,
    pub templates: u32,
    /// Last template written into each page + 1 (0: initial content).
    pub last: Arc<Vec<AtomicU32>>,
}

impl Workload {
    /// Pages per region.
    pub fn pages_per_region(&self) -> usize {
        self.spec.region_bytes / PAGE_SIZE
    }

    /// Maps and fills the regions (first touch of every page).
    pub fn new(spec: Spec) -> std::io::Result<Workload> {
        let n = spec.region_bytes / PAGE_SIZE;
        let mut rng = spec.seed ^ 0x5EED;
        let mut kinds = Vec::with_capacity(n);
        let pick = |u: u64| -> u8 {
            let v = (u % 100) as u32;
            if v < spec.mix.ident {
                0
            } else if v < spec.mix.ident + spec.mix.zero {
                1
            } else {
                2
            }
        };
        let mut t = 0u32;
        let mut push = |k: u8, kinds: &mut Vec<Kind>| {
            kinds.push(match k {
                0 => {
                    t += 1;
                    Kind::Ident(t - 1)
                }
                1 => Kind::Zero,
                _ => Kind::Unique,
            })
        };
        match spec.layout {
            Layout::Scattered => {
                for _ in 0..n {
                    let k = pick(splitmix(&mut rng));
                    push(k, &mut kinds);
                }
            }
            Layout::Contiguous => {
                while kinds.len() < n {
                    let k = pick(splitmix(&mut rng));
                    let len = 64 + (splitmix(&mut rng) % 961) as usize;
                    for _ in 0..len.min(n - kinds.len()) {
                        push(k, &mut kinds);
                    }
                }
            }
        }
        let templates = t;
        let mut addrs = Vec::new();
        for _ in 0..spec.regions {
            let a = sys::map_anon(spec.region_bytes)? as usize;
            // SAFETY: our own fresh mapping. 4 KiB pages, as a guest without THP.
            unsafe { sys::madvise(a, spec.region_bytes, libc::MADV_NOHUGEPAGE) }?;
            addrs.push(a);
        }
        let w = Workload {
            last: Arc::new((0..n * spec.regions).map(|_| AtomicU32::new(0)).collect()),
            spec,
            addrs,
            kinds,
            templates,
        };
        let seed = w.spec.seed;
        (0..w.spec.regions).into_par_iter().for_each(|r| {
            let base = w.addrs[r];
            for (j, k) in w.kinds.iter().enumerate() {
                // SAFETY: our own mapping, not yet shared with anyone.
                let page = unsafe {
                    std::slice::from_raw_parts_mut((base + j * PAGE_SIZE) as *mut u8, PAGE_SIZE)
                };
                match *k {
                    Kind::Ident(t) => template(seed, t, page),
                    Kind::Zero => unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) },
                    Kind::Unique => unique(seed, r, j, page),
                }
            }
        });
        Ok(w)
    }

    /// The regions as the engine takes them (all in domain 0).
    pub fn region_specs(&self) -> Vec<RegionSpec> {
        self.addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| RegionSpec {
                addr: a,
                len: self.spec.region_bytes,
                label: format!("region{i}"),
                domain: 0,
            })
            .collect()
    }

    /// Total bytes of all regions.
    pub fn total_bytes(&self) -> u64 {
        (self.spec.region_bytes * self.spec.regions) as u64
    }

    /// Content id of a global page now: template id, or u32::MAX-1 for zero, u32::MAX
    /// for unique.
    fn content_id(&self, g: usize) -> u32 {
        let last = self.last[g].load(Ordering::Relaxed);
        if last != 0 {
            return last - 1;
        }
        match self.kinds[g % self.pages_per_region()] {
            Kind::Ident(t) => t,
            Kind::Zero => u32::MAX - 1,
            Kind::Unique => u32::MAX,
        }
    }

    /// Pages that can be saved at best under `policy`, given what the pages hold now:
    /// every zero page, and every copy of a content beyond the first within a domain.
    pub fn achievable_pages(&self, policy: DomainPolicy) -> u64 {
        let n = self.pages_per_region();
        let mut zero = 0u64;
        let mut ids: Vec<(u32, u32)> = Vec::with_capacity(n * self.spec.regions);
        for g in 0..n * self.spec.regions {
            let id = self.content_id(g);
            if id == u32::MAX - 1 {
                zero += 1;
            } else if id != u32::MAX {
                let dom = match policy {
                    DomainPolicy::All => 0,
                    _ => (g / n) as u32,
                };
                ids.push((dom, id));
            }
        }
        if policy == DomainPolicy::ZeroOnly {
            return zero;
        }
        ids.par_sort_unstable();
        let total = ids.len() as u64;
        let mut distinct = 0u64;
        for i in 0..ids.len() {
            if i == 0 || ids[i] != ids[i - 1] {
                distinct += 1;
            }
        }
        zero + total - distinct
    }

    /// Pages whose content is not what was last written (or initially placed): lost writes
    /// or corruption. Must be 0.
    pub fn lost_writes(&self) -> u64 {
        let n = self.pages_per_region();
        let seed = self.spec.seed;
        (0..n * self.spec.regions)
            .into_par_iter()
            .map_init(
                || vec![0u8; PAGE_SIZE],
                |buf, g| {
                    let (r, j) = (g / n, g % n);
                    // SAFETY: region memory stays mapped for the workload's lifetime.
                    let page = unsafe {
                        std::slice::from_raw_parts(
                            (self.addrs[r] + j * PAGE_SIZE) as *const u8,
                            PAGE_SIZE,
                        )
                    };
                    let last = self.last[g].load(Ordering::Acquire);
                    let expect_zero = last == 0 && self.kinds[j] == Kind::Zero;
                    if expect_zero {
                        return u64::from(page.iter().any(|&b| b != 0));
                    }
                    if last != 0 {
                        template(seed, last - 1, buf);
                    } else {
                        match self.kinds[j] {
                            Kind::Ident(t) => template(seed, t, buf),
                            Kind::Unique => unique(seed, r, j, buf),
                            Kind::Zero => unreachable!(),
                        }
                    }
                    u64::from(page != &buf[..])
                },
            )
            .sum()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for &a in &self.addrs {
            // SAFETY: our own mappings (the engine may have remapped parts; munmap takes
            // whatever is there).
            let _ = unsafe { sys::munmap(a, self.spec.region_bytes) };
        }
    }
}

/// Writer threads rewriting random pages with other templates through a gate.
pub struct Writers {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    tids: Arc<std::sync::Mutex<Vec<i32>>>,
}

impl Writers {
    /// Starts `threads` writers writing `rate` pages per second in total (0: as fast as
    /// they can), each write a whole template page. Templates are drawn from the first
    /// 64 identical contents, so written pages stay mergeable.
    pub fn start(
        w: &Workload,
        gate: Arc<WriterGate>,
        threads: usize,
        rate: f64,
        max_writes: Option<u64>,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let tids = Arc::new(std::sync::Mutex::new(Vec::new()));
        let ntempl = w.templates.clamp(1, 64);
        let seed = w.spec.seed;
        let pool: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..ntempl)
                .map(|t| {
                    let mut b = vec![0u8; PAGE_SIZE];
                    template(seed, t, &mut b);
                    b
                })
                .collect(),
        );
        let n = w.pages_per_region();
        let total = n * w.spec.regions;
        let addrs = w.addrs.clone();
        let kinds: Arc<Vec<Kind>> = Arc::new(w.kinds.clone());
        let mut hs = Vec::new();
        for i in 0..threads.max(1) {
            let (stop, writes, gate, pool, last, addrs, kinds, tids) = (
                stop.clone(),
                writes.clone(),
                gate.clone(),
                pool.clone(),
                w.last.clone(),
                addrs.clone(),
                kinds.clone(),
                tids.clone(),
            );
            let per_thread = rate / threads.max(1) as f64;
            hs.push(std::thread::spawn(move || {
                tids.lock().unwrap().push(sys::gettid());
                let mut x = seed ^ 0x7717 ^ (i as u64) << 32;
                let t0 = Instant::now();
                let mut mine = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(m) = max_writes {
                        if writes.load(Ordering::Relaxed) >= m {
                            break;
                        }
                    }
                    if per_thread > 0.0 {
                        let due = (t0.elapsed().as_secs_f64() * per_thread) as u64;
                        if mine >= due {
                            std::thread::sleep(Duration::from_micros(500));
                            continue;
                        }
                    }
                    // Each thread owns the pages g ≡ i (mod threads): two writers never race
                    // on one page, so "last written" is well defined.
                    let nt = threads.max(1);
                    let g = (splitmix(&mut x) % (total / nt) as u64) as usize * nt + i;
                    let (r, j) = (g / n, g % n);
                    let cur = match last[g].load(Ordering::Relaxed) {
                        0 => match kinds[j] {
                            Kind::Ident(t) => t,
                            _ => u32::MAX,
                        },
                        l => l - 1,
                    };
                    let mut t = (splitmix(&mut x) % ntempl as u64) as u32;
                    if t == cur {
                        t = (t + 1) % ntempl;
                    }
                    if t == cur {
                        continue; // a single template: nothing else to write
                    }
                    gate.enter(r);
                    // SAFETY: region memory; the gate keeps the engine from remapping it now.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            pool[t as usize].as_ptr(),
                            (addrs[r] + j * PAGE_SIZE) as *mut u8,
                            PAGE_SIZE,
                        )
                    };
                    last[g].store(t + 1, Ordering::Release);
                    gate.exit(r);
                    writes.fetch_add(1, Ordering::Relaxed);
                    mine += 1;
                }
            }));
        }
        Writers {
            stop,
            writes,
            threads: hs,
            tids,
        }
    }

    /// Writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Thread ids of the writers.
    pub fn thread_ids(&self) -> Vec<i32> {
        self.tids.lock().unwrap().clone()
    }

    /// Stops and joins the writers; returns the number of writes.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        self.writes()
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}
