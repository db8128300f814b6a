//! Live guests as a dedup subject: the RAM of N identical built-in guests, merged
//! while their vCPUs are held still and with KVM's dirty log as the dirty-page source.
//!
//! The ground truth comes from a census of guest memory taken when the guests are
//! ready: every resident page is hashed (xxh3-128), zero pages and groups of identical
//! pages are counted, and the result is what a perfect merger could save. The same
//! hashes, taken again after the run, show whether any page changed under the
//! engine: the guests are idle after applying their profile, so any difference is a
//! lost or corrupted write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ksm::synth::Writers;
use ksm::{DirtySource, DomainPolicy, RegionId, RegionSpec, WriterHold};
use xxhash_rust::xxh3::xxh3_128;

use super::subject::Subject;
use super::DedupArgs;
use crate::commands::run::{plan, RunArgs};
use crate::devices::Phase;
use crate::runner::Fleet;
use crate::units::{format_bytes, PAGE_SIZE};
use crate::vstate::memory::{resident_pages, RegionInfo};
use crate::vstate::vcpu::VcpuControl;
use crate::vstate::vm::Vm;

/// Hash of each page of one guest; `None` for pages not resident in host memory.
type Census = Vec<Option<u128>>;

fn census(region: &RegionInfo) -> anyhow::Result<Census> {
    let resident = resident_pages(region).context("mincore on guest memory")?;
    use rayon::prelude::*;
    Ok(resident
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            r.then(|| {
                // SAFETY: the page lies inside the guest's live mapping; guests are idle
                // (halted) while the census is taken, so nothing writes it concurrently.
                let page = unsafe {
                    std::slice::from_raw_parts(
                        (region.host_addr + i as u64 * PAGE_SIZE) as *const u8,
                        PAGE_SIZE as usize,
                    )
                };
                xxh3_128(page)
            })
        })
        .collect())
}

/// Pages saved by a perfect merger over these censuses: every resident zero page, and
/// all but one page of each group of identical pages (within a guest for `Region`).
fn achievable(censuses: &[Census], policy: DomainPolicy) -> u64 {
    let zero = xxh3_128(&[0u8; PAGE_SIZE as usize]);
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
    fleet: Fleet,
    regions: Vec<RegionInfo>,
    before: Vec<Census>,
    mem: u64,
}

impl Guests {
    /// Boots the guests `args` asks for and waits until each has applied its profile.
    pub fn boot(args: &DedupArgs, guests: usize) -> anyhow::Result<Self> {
        let run_args = RunArgs::new(guests, args.mem, args.json);
        let plan = plan(&run_args)?;
        let kvm = crate::vstate::vm::open_kvm(std::path::Path::new("/dev/kvm"))?;
        let mut fleet = Fleet::boot(&kvm, &plan.configs, &plan.image, &plan.profile)?;
        fleet.wait_for(
            Phase::Done,
            Duration::from_secs(300),
            &std::sync::atomic::AtomicBool::new(false),
            |_| {},
        );
        for i in 0..guests {
            if let Some(f) = fleet.failure(i) {
                bail!("guest {i} did not get ready: {f}");
            }
        }
        // Done is written just before the final HLT: wait until every vCPU is still.
        for g in &fleet.guests {
            for v in g.vcpu_controls() {
                v.pause();
            }
        }
        let regions: Vec<RegionInfo> = fleet.guests.iter().map(|g| g.regions()[0]).collect();
        let before = regions.iter().map(census).collect::<anyhow::Result<_>>()?;
        Ok(Guests {
            fleet,
            regions,
            before,
            mem: args.mem,
        })
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
        // Pages whose content differs from the census at ready time. Pages that were
        // resident then and read as zero now were reclaimed zero pages: compare content.
        let zero = xxh3_128(&[0u8; PAGE_SIZE as usize]);
        let mut changed = 0;
        for (r, before) in self.regions.iter().zip(&self.before) {
            for (i, b) in before.iter().enumerate() {
                // SAFETY: inside the guest's live mapping; the guests are idle.
                let page = unsafe {
                    std::slice::from_raw_parts(
                        (r.host_addr + i as u64 * PAGE_SIZE) as *const u8,
                        PAGE_SIZE as usize,
                    )
                };
                if b.unwrap_or(zero) != xxh3_128(page) {
                    changed += 1;
                }
            }
        }
        changed
    }
    fn hold(&self) -> Arc<dyn WriterHold> {
        Arc::new(GuestHold {
            vcpus: self
                .fleet
                .guests
                .iter()
                .map(|g| g.vcpu_controls())
                .collect(),
        })
    }
    fn dirty(&self, _args: &DedupArgs) -> Option<Box<dyn DirtySource>> {
        Some(Box::new(KvmDirty {
            vms: self.fleet.guests.iter().map(|g| g.vm_handle()).collect(),
        }))
    }
    fn start_writers(&self, _args: &DedupArgs) -> Option<Writers> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn achievable_counts_zero_pages_and_duplicate_groups() {
        let z = Some(xxh3_128(&[0u8; 4096]));
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
