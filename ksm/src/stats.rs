//! Statistics, with the kernel's names where they exist (see
//! Documentation/admin-guide/mm/ksm.rst), and the kernel's own accounting next to them.

use std::time::Duration;

use serde::Serialize;

use crate::region::DomainPolicy;
use crate::restore::ksm_counter;
use crate::sys;

/// Lengths of the holds of writers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HoldStats {
    /// Number of holds.
    pub count: u64,
    /// Longest hold, milliseconds.
    pub max_ms: f64,
    /// Mean hold, milliseconds.
    pub mean_ms: f64,
    /// Sum of holds, milliseconds.
    pub total_ms: f64,
}

impl HoldStats {
    /// Records one hold.
    pub fn record(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        self.count += 1;
        self.total_ms += ms;
        self.max_ms = self.max_ms.max(ms);
        self.mean_ms = self.total_ms / self.count as f64;
    }
}

/// Per-region counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RegionStats {
    /// The region's label.
    pub label: String,
    /// Pages in the region.
    pub pages: u64,
    /// Pages currently mapping a store page, unwritten.
    pub merged: u64,
    /// Zero pages currently reclaimed.
    pub zero: u64,
    /// Pages hashed, stable, with no duplicate found.
    pub unshared: u64,
    /// Pages hinted MADV_MERGEABLE.
    pub hinted: u64,
    /// Merged pages written since (copy-on-write breaks).
    pub cow_breaks: u64,
}

/// Engine statistics.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// Backend name.
    pub backend: String,
    /// Domain policy.
    pub policy: DomainPolicy,
    /// How stability is decided (dirty source name or the two-pass hash rule).
    pub stability: String,
    /// Pages in all regions.
    pub pages: u64,
    /// Store pages in use (the kernel: KSM pages in use).
    pub pages_shared: u64,
    /// Region pages mapping a store page, beyond one per store page: the saving.
    pub pages_sharing: u64,
    /// Pages hashed and stable that no other page matched.
    pub pages_unshared: u64,
    /// Pages that changed too fast to merge in the last pass.
    pub pages_volatile: u64,
    /// All-zero pages reclaimed (MADV_DONTNEED).
    pub ksm_zero_pages: u64,
    /// Passes completed (each covers all pages, the incremental ones through the dirty
    /// source).
    pub full_scans: u64,
    /// Saved bytes minus the engine's metadata, as the kernel defines it.
    pub general_profit: i64,
    /// Merged pages written since their merge.
    pub cow_breaks: u64,
    /// Resident pages of the store (memfd st_blocks).
    pub store_pages: u64,
    /// Store pages freed by PUNCH_HOLE.
    pub store_punched: u64,
    /// Mappings of the process now (/proc/self/maps).
    pub vma_count: u64,
    /// vm.max_map_count.
    pub vma_limit: u64,
    /// The engine's budget of mappings.
    pub vma_budget: u64,
    /// Batches in which the budget was reached (remapping stopped, pages hinted or left).
    pub vma_budget_reached: u64,
    /// Pages hinted MADV_MERGEABLE.
    pub pages_hinted: u64,
    /// Hints withheld because ksmd would merge across domains.
    pub hints_refused_by_domain: bool,
    /// Pages hashed so far.
    pub pages_hashed: u64,
    /// Pages hashed per second of hashing (wall, all workers).
    pub hash_pages_per_sec: f64,
    /// Seconds spent verifying, remapping and reclaiming.
    pub merge_seconds: f64,
    /// Holds of writers.
    pub holds: HoldStats,
    /// Bytes of the engine's per-page metadata and index.
    pub metadata_bytes: u64,
    /// Bytes saved as the engine counts them (store merges and zero pages; not ksmd's).
    pub saved_bytes_claimed: u64,
    /// Per region.
    pub regions: Vec<RegionStats>,
}

/// The kernel's KSM counters (/sys/kernel/mm/ksm, system-wide) and this process's
/// (/proc/self/ksm_stat).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct KernelKsm {
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    pub ksm_zero_pages: u64,
    pub full_scans: u64,
    pub general_profit: i64,
    pub process_merging_pages: i64,
    pub process_zero_pages: i64,
    pub process_profit: i64,
}

impl KernelKsm {
    /// Reads the counters now.
    pub fn read() -> KernelKsm {
        let st = sys::ksm_stat();
        let get = |k: &str| st.iter().find(|(n, _)| n == k).map(|x| x.1).unwrap_or(0);
        KernelKsm {
            pages_shared: ksm_counter("pages_shared"),
            pages_sharing: ksm_counter("pages_sharing"),
            pages_unshared: ksm_counter("pages_unshared"),
            pages_volatile: ksm_counter("pages_volatile"),
            ksm_zero_pages: ksm_counter("ksm_zero_pages"),
            full_scans: ksm_counter("full_scans"),
            general_profit: sys::read_u64("/sys/kernel/mm/ksm/general_profit")
                .map(|v| v as i64)
                .unwrap_or(0),
            process_merging_pages: get("ksm_merging_pages"),
            process_zero_pages: get("ksm_zero_pages"),
            process_profit: get("ksm_process_profit"),
        }
    }

    /// Pages the kernel says it saves: pages_sharing + ksm_zero_pages.
    pub fn saved_pages(&self) -> u64 {
        self.pages_sharing + self.ksm_zero_pages
    }
}

/// Claimed and measured savings side by side.
#[derive(Clone, Debug, Serialize)]
pub struct Agreement {
    /// Bytes saved by the counters.
    pub claimed_bytes: u64,
    /// Bytes saved by the kernel's accounting of the process (Pss before − Pss after).
    pub measured_bytes: i64,
    /// (measured − claimed) / claimed, percent.
    pub diff_pct: f64,
    /// Within the tolerance.
    pub agree: bool,
    /// The tolerance, percent.
    pub tolerance_pct: f64,
}

impl Agreement {
    /// Compares claimed with measured, within `tolerance_pct` percent of the claim.
    pub fn check(claimed_bytes: u64, measured_bytes: i64, tolerance_pct: f64) -> Agreement {
        let diff = measured_bytes as f64 - claimed_bytes as f64;
        let diff_pct = if claimed_bytes == 0 {
            if measured_bytes.unsigned_abs() < 1 << 20 {
                0.0
            } else {
                100.0
            }
        } else {
            diff / claimed_bytes as f64 * 100.0
        };
        Agreement {
            claimed_bytes,
            measured_bytes,
            diff_pct,
            agree: diff_pct.abs() <= tolerance_pct,
            tolerance_pct,
        }
    }
}
