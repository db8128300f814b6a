//! Deterministic workloads over real guest page tables, and a runner that drives a
//! translation path (nested or shadow) with them.
//!
//! A [`GuestSetup`] builds a guest in a [`Machine`]: `spaces` address spaces whose tables
//! map a virtual range onto a shuffled set of guest-physical data pages (so neighbouring
//! virtual pages are not neighbouring physical pages, as after some uptime). The trace is a
//! pure function of the [`WorkloadSpec`] (seeded xorshift), so the nested and the shadow
//! path see exactly the same accesses and guest table writes:
//!
//! * **sequential** — every 64-byte line of the working set in order, wrapping around;
//! * **random** — uniformly random lines of the working set;
//! * **churn** — random accesses; every `churn_interval` accesses the guest unmaps a
//!   random run of `churn_pages` pages (clears the PTEs, INVLPG each page, as Linux's
//!   `flush_tlb_range` does for short ranges) and maps it again onto other free frames,
//!   like munmap + mmap;
//! * **switch** — `spaces` processes, each with its own tables over its share of the
//!   working set; random accesses in the current one; every `switch_interval` accesses a
//!   CR3 write to the next, and every `exec_every` switches the next process "execs": its
//!   tables are freed and rebuilt from recycled table pages before the switch.
//!
//! Every access is a user-mode read, or a write for one access in four. The runner times
//! the path's own work (translations, write notifications, INVLPG, CR3 writes) and excludes
//! the guest's table edits, which cost the same on both paths.

use crate::builder::{BuildError, MapFlags, PageTableBuilder};
use crate::cache::CacheConfig;
use crate::mem::RecordingMemory;
use crate::nested::{NestedError, NestedMmu, NestedStats};
use crate::paging::{Access, PageSize, PagingMode};
use crate::shadow_mmu::{ShadowError, ShadowMmu, ShadowStats};
use crate::testbed::{Machine, MachineError};
use std::time::Instant;

/// The shape of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// Sequential lines.
    Sequential,
    /// Uniformly random lines.
    Random,
    /// Random lines with periodic unmap/remap of page runs.
    Churn,
    /// Random lines with periodic address-space switches and execs.
    Switch,
}

impl WorkloadKind {
    /// Every kind.
    pub const ALL: [WorkloadKind; 4] = [
        WorkloadKind::Sequential,
        WorkloadKind::Random,
        WorkloadKind::Churn,
        WorkloadKind::Switch,
    ];

    /// The name used on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            WorkloadKind::Sequential => "sequential",
            WorkloadKind::Random => "random",
            WorkloadKind::Churn => "churn",
            WorkloadKind::Switch => "switch",
        }
    }
}

impl std::str::FromStr for WorkloadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        WorkloadKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown workload {s:?}; expected one of sequential, random, churn, switch")
            })
    }
}

/// Everything that determines a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadSpec {
    /// The kind of trace.
    pub kind: WorkloadKind,
    /// Bytes of guest memory the trace touches (rounded up to the guest page size).
    pub working_set: u64,
    /// Guest page size (4 KiB or 2 MiB).
    pub guest_page: PageSize,
    /// Number of accesses (translations).
    pub accesses: u64,
    /// Seed of the trace.
    pub seed: u64,
    /// Accesses between two churn operations.
    pub churn_interval: u64,
    /// Pages unmapped and remapped by one churn operation.
    pub churn_pages: u64,
    /// Address spaces of the switch workload.
    pub spaces: usize,
    /// Accesses between two CR3 switches.
    pub switch_interval: u64,
    /// Switches between two execs.
    pub exec_every: u64,
    /// 5-level guest paging.
    pub la57: bool,
    /// Accesses run before measuring (same trace, counters and timing reset after them),
    /// so results describe a warm steady state rather than first touches.
    pub warmup: u64,
}

impl WorkloadSpec {
    /// A spec with the default rates: churn 16 pages every 1000 accesses; 4 spaces,
    /// switching every 1000 accesses, exec every 16 switches; 4-level paging.
    pub fn new(kind: WorkloadKind, working_set: u64, guest_page: PageSize, accesses: u64) -> Self {
        WorkloadSpec {
            kind,
            working_set,
            guest_page,
            accesses,
            seed: 0x5eed_1234_abcd_0001,
            churn_interval: 1000,
            churn_pages: 16,
            spaces: 4,
            switch_interval: 1000,
            exec_every: 16,
            la57: false,
            warmup: 0,
        }
    }

    fn space_count(&self) -> usize {
        if self.kind == WorkloadKind::Switch {
            self.spaces.max(1)
        } else {
            1
        }
    }

    fn spare_pages(&self) -> u64 {
        if self.kind == WorkloadKind::Churn {
            self.churn_pages.max(1)
        } else {
            0
        }
    }
}

/// A small, fast, deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }
    /// The next 64 random bits.
    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `0..n` (`n` > 0).
    #[inline(always)]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// First virtual address of every address space's working range.
pub const VA_BASE: u64 = 0x7f00_0000_0000;

#[derive(Debug, Clone)]
struct Space {
    pt: PageTableBuilder,
    /// Guest page i of this space → data frame number (in guest pages).
    frames: Vec<u32>,
}

/// The guest of a workload: a machine, its address spaces and the trace state.
#[derive(Debug, Clone)]
pub struct GuestSetup {
    /// The machine (guest memory, host memory, table allocators).
    pub machine: Machine,
    spec: WorkloadSpec,
    spaces: Vec<Space>,
    spare: Vec<u32>,
    current: usize,
    pages_per_space: u64,
}

/// Errors setting up or running a workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The machine could not be laid out.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Table building failed.
    #[error("building guest tables: {0}")]
    Build(#[from] BuildError),
    /// Working set outside 4 KiB ..= 64 GiB, or another bad parameter.
    #[error("bad workload parameter: {0}")]
    Param(String),
    /// A translation the workload expects to succeed failed.
    #[error("translation of {gva:#x} failed on the {path} path: {reason}")]
    Translation {
        /// The address.
        gva: u64,
        /// Which path.
        path: &'static str,
        /// The error.
        reason: String,
    },
}

impl GuestSetup {
    /// Builds the guest: data frames, shuffled mappings, tables for every address space.
    pub fn build(spec: &WorkloadSpec) -> Result<Self, WorkloadError> {
        if spec.working_set < 4096 || spec.working_set > (64 << 30) {
            return Err(WorkloadError::Param(format!(
                "working set {} bytes; expected 4 KiB ..= 64 GiB",
                spec.working_set
            )));
        }
        if spec.guest_page == PageSize::Size1G {
            return Err(WorkloadError::Param("guest pages must be 4k or 2m".into()));
        }
        let page = spec.guest_page.bytes();
        let spaces = spec.space_count() as u64;
        let total_pages = spec.working_set.div_ceil(page).max(spaces);
        let pages_per_space = total_pages / spaces;
        let data_pages = pages_per_space * spaces + spec.spare_pages();
        let data_bytes = data_pages * page;
        let leaf_tables = pages_per_space.div_ceil(if page == 4096 { 512 } else { 1 << 18 });
        let table_pages = spaces * (leaf_tables + leaf_tables.div_ceil(512) + 8) * 2 + 64;
        let mode = PagingMode {
            la57: spec.la57,
            ..PagingMode::default()
        };
        let mut machine = Machine::new(
            data_bytes + table_pages * 4096 + (2 << 20),
            table_pages * 4096,
            mode,
        )?;
        let mut rng = Rng::new(spec.seed);
        let mut frames: Vec<u32> = (0..data_pages as u32).collect();
        for i in (1..frames.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            frames.swap(i, j);
        }
        let spare = frames.split_off((pages_per_space * spaces) as usize);
        let mut built = Vec::new();
        for s in 0..spaces as usize {
            let mine =
                frames[s * pages_per_space as usize..(s + 1) * pages_per_space as usize].to_vec();
            let pt = machine.new_address_space()?;
            let space = Space { pt, frames: mine };
            map_space(&mut machine, &space, spec.guest_page)?;
            built.push(space);
        }
        Ok(GuestSetup {
            machine,
            spec: *spec,
            spaces: built,
            spare,
            current: 0,
            pages_per_space,
        })
    }

    /// CR3 of the current address space.
    pub fn cr3(&self) -> u64 {
        self.spaces[self.current].pt.root()
    }

    /// Bytes of the working range of one address space.
    pub fn span(&self) -> u64 {
        self.pages_per_space * self.spec.guest_page.bytes()
    }

    /// Guest-physical address the current space maps `gva` to (for checks).
    pub fn expected_gpa(&self, gva: u64) -> u64 {
        let page = self.spec.guest_page.bytes();
        let i = (gva - VA_BASE) / page;
        self.spaces[self.current].frames[i as usize] as u64 * page + (gva % page)
    }
}

fn map_space(m: &mut Machine, s: &Space, size: PageSize) -> Result<(), WorkloadError> {
    let page = size.bytes();
    for (i, &f) in s.frames.iter().enumerate() {
        m.map(
            &s.pt,
            VA_BASE + i as u64 * page,
            f as u64 * page,
            size,
            MapFlags::USER_DATA,
        )?;
    }
    Ok(())
}

/// One of the two translation paths, as the runner drives it.
pub trait TranslationPath {
    /// "nested" or "shadow".
    fn name(&self) -> &'static str;
    /// Translates `gva`; returns the host-physical address.
    fn translate(&mut self, guest: &GuestSetup, gva: u64, access: Access) -> Result<u64, String>;
    /// The guest wrote the entry at guest-physical `gpa`.
    fn notify_write(&mut self, gpa: u64);
    /// The guest executed INVLPG `gva`.
    fn invlpg(&mut self, guest: &GuestSetup, gva: u64);
    /// The guest wrote CR3.
    fn write_cr3(&mut self, guest: &GuestSetup, cr3: u64);
    /// Forgets the path's counters (the end of the warm-up).
    fn reset_stats(&mut self);
}

impl TranslationPath for NestedMmu {
    fn name(&self) -> &'static str {
        "nested"
    }
    #[inline]
    fn translate(&mut self, guest: &GuestSetup, gva: u64, access: Access) -> Result<u64, String> {
        NestedMmu::translate(self, guest.machine.vm.host(), gva, access)
            .map(|t| t.hpa)
            .map_err(|e: NestedError| e.to_string())
    }
    fn notify_write(&mut self, _gpa: u64) {
        // The hardware reads guest tables directly: nothing to keep in sync.
    }
    fn invlpg(&mut self, _guest: &GuestSetup, gva: u64) {
        NestedMmu::invlpg(self, gva)
    }
    fn write_cr3(&mut self, _guest: &GuestSetup, cr3: u64) {
        NestedMmu::write_cr3(self, cr3)
    }
    fn reset_stats(&mut self) {
        NestedMmu::reset_stats(self)
    }
}

impl TranslationPath for ShadowMmu {
    fn name(&self) -> &'static str {
        "shadow"
    }
    #[inline]
    fn translate(&mut self, guest: &GuestSetup, gva: u64, access: Access) -> Result<u64, String> {
        ShadowMmu::translate(self, &guest.machine.vm, gva, access)
            .map(|t| t.hpa)
            .map_err(|e: ShadowError| e.to_string())
    }
    fn notify_write(&mut self, gpa: u64) {
        ShadowMmu::notify_write(self, gpa)
    }
    fn invlpg(&mut self, guest: &GuestSetup, gva: u64) {
        ShadowMmu::invlpg(self, &guest.machine.vm, gva)
    }
    fn write_cr3(&mut self, guest: &GuestSetup, cr3: u64) {
        ShadowMmu::write_cr3(self, &guest.machine.vm, cr3)
    }
    fn reset_stats(&mut self) {
        ShadowMmu::reset_stats(self)
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunOutcome {
    /// Translations made.
    pub translations: u64,
    /// Nanoseconds spent in the path (translations, notifications, INVLPG, CR3 writes).
    pub path_ns: u64,
    /// Nanoseconds spent editing guest tables (excluded from `path_ns`).
    pub guest_edit_ns: u64,
    /// Guest table entries written.
    pub table_writes: u64,
    /// INVLPGs issued.
    pub invlpgs: u64,
    /// CR3 writes issued.
    pub cr3_writes: u64,
    /// Order-dependent hash of every host-physical address returned: equal across paths
    /// exactly when they translated every access identically.
    pub checksum: u64,
}

/// Runs the workload of `guest` through `path`. Every access must translate.
pub fn run<P: TranslationPath>(
    guest: &mut GuestSetup,
    path: &mut P,
) -> Result<RunOutcome, WorkloadError> {
    let spec = guest.spec;
    let mut rng = Rng::new(spec.seed ^ 0xacce55);
    let mut out = RunOutcome::default();
    let line_count = guest.span() / 64;
    let mut seq = 0u64;
    let mut switches = 0u64;
    let mut start = Instant::now();
    for i in 0..spec.warmup + spec.accesses {
        if i == spec.warmup && i > 0 {
            path.reset_stats();
            out = RunOutcome {
                checksum: out.checksum,
                ..RunOutcome::default()
            };
            start = Instant::now();
        }
        if i > 0 && spec.kind == WorkloadKind::Churn && i % spec.churn_interval.max(1) == 0 {
            churn(guest, path, &mut rng, &mut out)?;
        }
        if i > 0 && spec.kind == WorkloadKind::Switch && i % spec.switch_interval.max(1) == 0 {
            switches += 1;
            let next = (guest.current + 1) % guest.spaces.len();
            if spec.exec_every > 0 && switches.is_multiple_of(spec.exec_every) {
                exec(guest, next, path, &mut out)?;
            }
            guest.current = next;
            out.cr3_writes += 1;
            path.write_cr3(guest, guest.cr3());
        }
        let line = if spec.kind == WorkloadKind::Sequential {
            let l = seq;
            seq = if seq + 1 == line_count { 0 } else { seq + 1 };
            l
        } else {
            rng.below(line_count)
        };
        let gva = VA_BASE + line * 64;
        let access = if i % 4 == 3 {
            Access::write().user()
        } else {
            Access::read().user()
        };
        let hpa =
            path.translate(guest, gva, access)
                .map_err(|reason| WorkloadError::Translation {
                    gva,
                    path: path.name(),
                    reason,
                })?;
        out.checksum = (out.checksum.rotate_left(5) ^ hpa).wrapping_mul(0x100_0000_01b3);
    }
    out.translations = spec.accesses;
    out.path_ns = (start.elapsed().as_nanos() as u64).saturating_sub(out.guest_edit_ns);
    Ok(out)
}

/// Unmaps a random run of pages (INVLPG each) and maps it onto other frames.
fn churn<P: TranslationPath>(
    guest: &mut GuestSetup,
    path: &mut P,
    rng: &mut Rng,
    out: &mut RunOutcome,
) -> Result<(), WorkloadError> {
    let size = guest.spec.guest_page;
    let page = size.bytes();
    let run = guest.spec.churn_pages.clamp(1, guest.pages_per_space);
    let first = rng.below(guest.pages_per_space - run + 1);
    let space = guest.current;
    let t0 = Instant::now();
    let pt = guest.spaces[space].pt;
    let mut rec = RecordingMemory::new(&mut guest.machine.vm);
    for p in first..first + run {
        pt.unmap(&mut rec, VA_BASE + p * page, size)?;
    }
    let writes = rec.into_writes();
    out.guest_edit_ns += t0.elapsed().as_nanos() as u64;
    out.table_writes += writes.len() as u64;
    for w in writes {
        path.notify_write(w);
    }
    for p in first..first + run {
        out.invlpgs += 1;
        path.invlpg(guest, VA_BASE + p * page);
    }
    // mmap again onto the spare frames; the old frames become the spares.
    let t1 = Instant::now();
    let s = &mut guest.spaces[space];
    for (k, p) in (first..first + run).enumerate() {
        let k = k % guest.spare.len().max(1);
        if let Some(spare) = guest.spare.get_mut(k) {
            std::mem::swap(&mut s.frames[p as usize], spare);
        }
    }
    let mut rec = RecordingMemory::new(&mut guest.machine.vm);
    for p in first..first + run {
        let f = guest.spaces[space].frames[p as usize] as u64;
        pt.map(
            &mut rec,
            &mut guest.machine.guest_tables,
            VA_BASE + p * page,
            f * page,
            size,
            MapFlags::USER_DATA,
        )?;
    }
    let writes = rec.into_writes();
    out.guest_edit_ns += t1.elapsed().as_nanos() as u64;
    out.table_writes += writes.len() as u64;
    for w in writes {
        path.notify_write(w);
    }
    Ok(())
}

/// Frees address space `idx`'s tables and builds them again from recycled table pages.
fn exec<P: TranslationPath>(
    guest: &mut GuestSetup,
    idx: usize,
    path: &mut P,
    out: &mut RunOutcome,
) -> Result<(), WorkloadError> {
    let t0 = Instant::now();
    let old = guest.spaces[idx].pt;
    old.free_all(&guest.machine.vm, &mut guest.machine.guest_tables)?;
    let mut rec = RecordingMemory::new(&mut guest.machine.vm);
    let pt = PageTableBuilder::new(
        &mut rec,
        &mut guest.machine.guest_tables,
        guest.machine.mode.levels(),
        crate::EntryFormat::X86,
    )?;
    let page = guest.spec.guest_page.bytes();
    for (i, &f) in guest.spaces[idx].frames.iter().enumerate() {
        pt.map(
            &mut rec,
            &mut guest.machine.guest_tables,
            VA_BASE + i as u64 * page,
            f as u64 * page,
            guest.spec.guest_page,
            MapFlags::USER_DATA,
        )?;
    }
    let writes = rec.into_writes();
    guest.spaces[idx].pt = pt;
    out.guest_edit_ns += t0.elapsed().as_nanos() as u64;
    out.table_writes += writes.len() as u64;
    for w in writes {
        path.notify_write(w);
    }
    Ok(())
}

/// A finished run of one path, with the path's own counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathRun<S> {
    /// Timing and checksum.
    pub outcome: RunOutcome,
    /// The path's counters.
    pub stats: S,
}

/// Builds the guest and runs the workload through the nested model.
pub fn run_nested(
    spec: &WorkloadSpec,
    host_page: PageSize,
    caches: CacheConfig,
) -> Result<PathRun<NestedStats>, WorkloadError> {
    let mut guest = GuestSetup::build(spec)?;
    let cr3 = guest.cr3();
    let mut mmu = guest.machine.nested_mmu(host_page, caches, cr3)?;
    let outcome = run(&mut guest, &mut mmu)?;
    Ok(PathRun {
        outcome,
        stats: mmu.stats(),
    })
}

/// Builds the guest and runs the workload through the shadow MMU.
pub fn run_shadow(
    spec: &WorkloadSpec,
    host_page: PageSize,
    caches: CacheConfig,
    unsync: bool,
) -> Result<PathRun<ShadowStats>, WorkloadError> {
    let mut guest = GuestSetup::build(spec)?;
    let cr3 = guest.cr3();
    let mut mmu = guest.machine.shadow_mmu(host_page, caches, unsync, cr3);
    let outcome = run(&mut guest, &mut mmu)?;
    Ok(PathRun {
        outcome,
        stats: mmu.stats(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::walker::Walker;

    fn small(kind: WorkloadKind, page: PageSize) -> WorkloadSpec {
        let mut s = WorkloadSpec::new(kind, 8 << 20, page, 20_000);
        s.churn_interval = 500;
        s.switch_interval = 700;
        s.exec_every = 3;
        s
    }

    #[test]
    fn guest_tables_map_the_shuffled_frames() {
        let spec = small(WorkloadKind::Random, PageSize::Size4K);
        let g = GuestSetup::build(&spec).unwrap();
        let w = Walker::new(g.machine.mode);
        let mut distinct = std::collections::HashSet::new();
        for i in (0..g.span()).step_by(4096 * 37) {
            let gva = VA_BASE + i + 8;
            let t = w
                .walk(&g.machine.vm, g.cr3(), gva, Access::write().user())
                .unwrap();
            assert_eq!(t.gpa, g.expected_gpa(gva));
            distinct.insert(t.gpa >> 12);
        }
        assert!(distinct.len() > 10);
        // Sequential virtual pages are not sequential physical pages.
        let a = g.expected_gpa(VA_BASE);
        let b = g.expected_gpa(VA_BASE + 4096);
        assert_ne!(b, a + 4096);
    }

    #[test]
    fn both_paths_translate_every_workload_identically() {
        for kind in WorkloadKind::ALL {
            for page in [PageSize::Size4K, PageSize::Size2M] {
                let spec = small(kind, page);
                let n = run_nested(&spec, PageSize::Size4K, CacheConfig::default()).unwrap();
                let s = run_shadow(&spec, PageSize::Size2M, CacheConfig::default(), true).unwrap();
                let z = run_shadow(&spec, PageSize::Size4K, CacheConfig::NONE, false).unwrap();
                assert_eq!(n.outcome.checksum, s.outcome.checksum, "{kind:?} {page}");
                assert_eq!(n.outcome.checksum, z.outcome.checksum, "{kind:?} {page}");
                assert_eq!(n.outcome.translations, 20_000);
                match kind {
                    WorkloadKind::Churn => {
                        assert!(n.outcome.invlpgs > 0 && s.stats.tracked_writes > 0);
                        // Only last-level tables go unsync; 2 MiB leaves live in PDs.
                        assert_eq!(
                            s.stats.unsyncs > 0,
                            page == PageSize::Size4K,
                            "{:?}",
                            s.stats
                        );
                        assert!(z.stats.zapped_sptes > 0, "{:?}", z.stats);
                    }
                    WorkloadKind::Switch => {
                        assert!(
                            s.stats.cr3_writes > 0 && n.outcome.cr3_writes == s.stats.cr3_writes
                        );
                        assert!(
                            s.stats.resyncs > 0 || s.stats.zapped_sptes > 0,
                            "{:?}",
                            s.stats
                        );
                    }
                    _ => assert_eq!(s.stats.exits, s.stats.misses),
                }
            }
        }
    }

    #[test]
    fn warmup_measures_the_steady_state() {
        let mut spec = WorkloadSpec::new(WorkloadKind::Random, 1 << 20, PageSize::Size4K, 20_000);
        let cold = run_shadow(&spec, PageSize::Size4K, CacheConfig::default(), true).unwrap();
        assert_eq!(cold.stats.misses, 256, "every page of 1 MiB faults in once");
        spec.warmup = 20_000;
        let warm = run_shadow(&spec, PageSize::Size4K, CacheConfig::default(), true).unwrap();
        let nested = run_nested(&spec, PageSize::Size4K, CacheConfig::default()).unwrap();
        assert_eq!(warm.stats.misses, 0);
        assert_eq!(warm.stats.translations, 20_000);
        assert_eq!(nested.stats.translations, 20_000);
        assert_eq!(warm.outcome.checksum, nested.outcome.checksum);
    }

    #[test]
    fn traces_are_deterministic_and_seeded() {
        let spec = small(WorkloadKind::Churn, PageSize::Size4K);
        let a = run_nested(&spec, PageSize::Size2M, CacheConfig::default()).unwrap();
        let b = run_nested(&spec, PageSize::Size2M, CacheConfig::default()).unwrap();
        assert_eq!(a.outcome.checksum, b.outcome.checksum);
        let mut other = spec;
        other.seed += 1;
        let c = run_nested(&other, PageSize::Size2M, CacheConfig::default()).unwrap();
        assert_ne!(a.outcome.checksum, c.outcome.checksum);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(GuestSetup::build(&WorkloadSpec::new(
            WorkloadKind::Random,
            100,
            PageSize::Size4K,
            1
        ))
        .is_err());
        assert!(GuestSetup::build(&WorkloadSpec::new(
            WorkloadKind::Random,
            1 << 30,
            PageSize::Size1G,
            1
        ))
        .is_err());
        assert!("nope".parse::<WorkloadKind>().is_err());
        assert_eq!("churn".parse::<WorkloadKind>(), Ok(WorkloadKind::Churn));
    }
}
