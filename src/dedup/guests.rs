//! Live guests as a dedup subject: the RAM of N identical built-in guests, merged
//! while their vCPUs are held still and with KVM's dirty log as the dirty-page source.
//!
//! The ground truth comes from a census of guest memory taken when the guests are
//! ready: every resident page is hashed (xxh3-128), zero pages and groups of identical
//! pages are counted, and the result is what a perfect merger could save. The same
//! hashes, taken again after the run, show whether any page changed under the
//! engine: the guests are idle after applying their profile, so any difference is a
//! lost or corrupted write. With `--guest-writes N` each guest instead keeps rewriting
//! N of its image pages while the engine merges them, and checks its own previous
//! write each time (see the `Writer` mode of the guest program).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

use anyhow::{bail, Context};
use ksm::synth::Writers;
use ksm::{DirtySource, DomainPolicy, RegionId, RegionSpec, WriterHold};
use xxhash_rust::xxh3::xxh3_128;

use super::subject::Subject;
use super::DedupArgs;
use crate::commands::run::{plan, RunArgs};
use crate::devices::Phase;
use crate::guest::layout::{IMAGE_GPA, PARAMS_GPA};
use crate::guest::program::{Mode, CALIBRATE_INSNS_PER_ITER, WRITER_OFFSET};
use crate::runner::Fleet;
use crate::units::{format_bytes, PAGE_SIZE};
use crate::vstate::memory::{resident_pages, RegionInfo};
use crate::vstate::vcpu::VcpuControl;
use crate::vstate::vm::Vm;

/// Hash of each page of one guest; `None` for pages not resident in host memory.
type Census = Vec<Option<u128>>;

/// xxh3-128 of page `i` of a guest region.
///
/// The caller must hold the guest's vCPUs still (or know the guest idle), so nothing
/// writes the page while it is read.
fn page_hash(region: &RegionInfo, i: usize) -> u128 {
    // SAFETY: page `i` lies inside the guest's live mapping (callers iterate the
    // region's own pages), and no vCPU writes it during the read (see above).
    let page = unsafe {
        std::slice::from_raw_parts(
            (region.host_addr + i as u64 * PAGE_SIZE) as *const u8,
            PAGE_SIZE as usize,
        )
    };
    xxh3_128(page)
}

/// xxh3-128 of an all-zero page (what a page that is not resident reads as).
fn zero_page_hash() -> u128 {
    xxh3_128(&[0u8; PAGE_SIZE as usize])
}

fn census(region: &RegionInfo) -> anyhow::Result<Census> {
    let resident = resident_pages(region).context("mincore on guest memory")?;
    use rayon::prelude::*;
    Ok(resident
        .par_iter()
        .enumerate()
        .map(|(i, r)| r.then(|| page_hash(region, i)))
        .collect())
}

/// Pages saved by a perfect merger over these censuses: every resident zero page, and
/// all but one page of each group of identical pages (within a guest for `Region`).
fn achievable(censuses: &[Census], policy: DomainPolicy) -> u64 {
    let zero = zero_page_hash();
    let mut saved = 0u64;
    let mut groups: HashMap<(usize, u128), u64> = HashMap::new();
    for (g, c) in censuses.iter().enumerate() {
        for h in c.iter().flatten() {
            if *h == zero {
                saved += 1;
            } else if policy != DomainPolicy::ZeroOnly {
                let domain = if policy == DomainPolicy::Region { g } else { 0 };
                *groups.entry((domain, *h)).or_default() += 1;
            }
        }
    }
    saved + groups.values().map(|k| k - 1).sum::<u64>()
}

/// Holds a guest still by parking its vCPUs.
struct GuestHold {
    vcpus: Vec<Vec<VcpuControl>>,
}

impl WriterHold for GuestHold {
    fn hold(&self, region: RegionId) {
        for v in &self.vcpus[region] {
            v.pause();
        }
    }
    fn release(&self, region: RegionId) {
        for v in &self.vcpus[region] {
            v.resume();
        }
    }
}

/// KVM's dirty log as the engine's dirty-page source (one memslot per guest).
struct KvmDirty {
    vms: Vec<Arc<Vm>>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl DirtySource for KvmDirty {
    fn name(&self) -> &str {
        "kvm-dirty-log"
    }
    fn arm(&mut self, _regions: &[RegionSpec]) -> std::io::Result<()> {
        for vm in &self.vms {
            vm.set_dirty_logging(0, true).map_err(io_err)?;
        }
        Ok(())
    }
    fn collect(&mut self, region: RegionId, out: &mut Vec<u32>) -> std::io::Result<()> {
        let pages = self.vms[region].take_dirty_pages(0).map_err(io_err)?;
        out.extend(pages.into_iter().map(|p| p as u32));
        Ok(())
    }
}

/// N identical guests, booted and ready.
pub struct Guests {
    fleet: Mutex<Fleet>,
    regions: Vec<RegionInfo>,
    before: Vec<Census>,
    mem: u64,
    /// Image pages each guest keeps rewriting (`--guest-writes`).
    writer_pages: u64,
}

impl Guests {
    /// Boots the guests `args` asks for and waits until each has applied its profile.
    pub fn boot(args: &DedupArgs, guests: usize) -> anyhow::Result<Self> {
        let run_args = RunArgs::new(guests, args.mem, args.json);
        let mut plan = plan(&run_args)?;
        let kvm = crate::vstate::vm::open_kvm(std::path::Path::new("/dev/kvm"))?;
        let writer_pages = args.guest_writes;
        if writer_pages > plan.profile.image_pages() {
            bail!(
                "--guest-writes {writer_pages}: expected at most the image's {} pages",
                plan.profile.image_pages()
            );
        }
        if writer_pages > 0 {
            // Space the rounds so that pages stay unwritten for a while: they are
            // merged, then written again (copy-on-write breaks), again and again.
            let cal = crate::probe::calibrate_with(&kvm).context("measuring guest speed")?;
            let delay = (args.guest_write_period_ms as f64 * 1e6
                / (cal.ns_per_instruction * CALIBRATE_INSNS_PER_ITER as f64))
                as u64;
            for c in &mut plan.configs {
                c.mode = Mode::Writer;
                c.loop_count = writer_pages;
                c.delay = delay;
            }
        }
        let mut fleet = Fleet::boot(&kvm, &plan.configs, &plan.image, &plan.profile)?;
        let settled = if writer_pages > 0 {
            Phase::Ready
        } else {
            Phase::Done
        };
        fleet.wait_for(
            settled,
            Duration::from_secs(300),
            &std::sync::atomic::AtomicBool::new(false),
            |_| {},
        );
        for i in 0..guests {
            if let Some(f) = fleet.failure(i) {
                bail!("guest {i} did not get ready: {f}");
            }
        }
        // Hold every vCPU still for the census (idle guests are halting anyway).
        let controls: Vec<VcpuControl> = fleet
            .guests
            .iter()
            .flat_map(|g| g.vcpu_controls())
            .collect();
        for v in &controls {
            v.pause();
        }
        let regions: Vec<RegionInfo> = fleet.guests.iter().map(|g| g.regions()[0]).collect();
        let before = regions.iter().map(census).collect::<anyhow::Result<_>>()?;
        controls.iter().for_each(|v| v.resume());
        Ok(Guests {
            fleet: Mutex::new(fleet),
            regions,
            before,
            mem: args.mem,
            writer_pages,
        })
    }

    fn fleet(&self) -> std::sync::MutexGuard<'_, Fleet> {
        self.fleet.lock().expect("fleet")
    }

    /// Rounds each writer guest has completed (its result-block counter).
    fn rounds(&self) -> Vec<u64> {
        self.fleet()
            .guests
            .iter()
            .map(|g| g.results().counter)
            .collect()
    }

    /// Writer pages whose value is neither the guest's last round nor the one in
    /// progress, plus one for every guest that itself noticed a lost write. The guests
    /// are held still for the check (and stay so).
    fn lost_guest_writes(&self) -> u64 {
        let mut fleet = self.fleet();
        for g in &fleet.guests {
            g.pause();
        }
        fleet.poll_events();
        let mut lost = 0;
        for (i, g) in fleet.guests.iter().enumerate() {
            if fleet.failure(i).is_some() {
                lost += 1;
            }
            let r = g.results().counter;
            for p in 0..self.writer_pages {
                let at = IMAGE_GPA + p * PAGE_SIZE + WRITER_OFFSET;
                let v: u64 = g.memory().read_obj(GuestAddress(at)).unwrap_or(u64::MAX);
                if r > 0 && v != r && v != r + 1 {
                    lost += 1;
                }
            }
        }
        lost
    }
}

impl Subject for Guests {
    fn describe(&self) -> String {
        format!(
            "{} live guests × {} (built-in image and profile)",
            self.regions.len(),
            format_bytes(self.mem)
        )
    }
    fn region_specs(&self) -> Vec<RegionSpec> {
        self.regions
            .iter()
            .enumerate()
            .map(|(i, r)| RegionSpec {
                addr: r.host_addr as usize,
                len: r.size as usize,
                label: format!("guest{i}"),
                domain: 0,
            })
            .collect()
    }
    fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
    fn achievable_pages(&self, policy: DomainPolicy) -> u64 {
        achievable(&self.before, policy)
    }
    fn lost_writes(&self) -> u64 {
        let lost = self.lost_guest_writes();
        // Every other page must hold what the census saw at ready time (a page that was
        // not resident then reads as zero). Only the writer pages and the result block
        // change while the guests run.
        let zero = zero_page_hash();
        let first_written = IMAGE_GPA / PAGE_SIZE;
        let written = first_written..first_written + self.writer_pages;
        let results_page = PARAMS_GPA / PAGE_SIZE;
        let mut changed = 0;
        for (r, before) in self.regions.iter().zip(&self.before) {
            for (i, b) in before.iter().enumerate() {
                let page_no = i as u64;
                if written.contains(&page_no) || (self.writer_pages > 0 && page_no == results_page)
                {
                    continue;
                }
                if b.unwrap_or(zero) != page_hash(r, i) {
                    changed += 1;
                }
            }
        }
        lost + changed
    }
    fn hold(&self) -> Arc<dyn WriterHold> {
        Arc::new(GuestHold {
            vcpus: self
                .fleet()
                .guests
                .iter()
                .map(|g| g.vcpu_controls())
                .collect(),
        })
    }
    fn dirty(&self, _args: &DedupArgs) -> Option<Box<dyn DirtySource>> {
        Some(Box::new(KvmDirty {
            vms: self.fleet().guests.iter().map(|g| g.vm_handle()).collect(),
        }))
    }
    fn start_writers(&self, _args: &DedupArgs) -> Option<Writers> {
        None
    }
    fn own_writes(&self) -> u64 {
        self.rounds().iter().map(|r| r * self.writer_pages).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn achievable_counts_zero_pages_and_duplicate_groups() {
        let z = Some(zero_page_hash());
        let a = Some(1u128);
        let b = Some(2u128);
        let g0 = vec![z, a, a, b, None];
        let g1 = vec![z, a, b, None, None];
        let both = [g0, g1];
        // zeros: 2; group a: 3 pages → 2; group b: 2 pages → 1.
        assert_eq!(achievable(&both, DomainPolicy::All), 5);
        // per guest: zeros 2; g0 a×2 → 1; g1 nothing.
        assert_eq!(achievable(&both, DomainPolicy::Region), 3);
        assert_eq!(achievable(&both, DomainPolicy::ZeroOnly), 2);
    }
}
