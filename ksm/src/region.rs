//! Regions (the memory the engine works on) and merge domains.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// Size of the pages the engine merges.
pub const PAGE_SIZE: usize = 4096;

/// A merge domain: pages of different domains are never merged with each other.
pub type DomainId = u32;

/// Index of a region, in the order the regions were given to [`crate::Engine::new`].
pub type RegionId = usize;

/// Which pages may be merged with which.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainPolicy {
    /// Merge across regions of the same [`DomainId`].
    All,
    /// Merge only within one region (per-VM salting, as VMware does).
    Region,
    /// Merge nothing but all-zero pages (the Windows "safe pages" policy).
    ZeroOnly,
}

impl FromStr for DomainPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(DomainPolicy::All),
            "region" => Ok(DomainPolicy::Region),
            "zero-only" => Ok(DomainPolicy::ZeroOnly),
            _ => Err(format!(
                "unknown domain policy {s:?}: expected all, region or zero-only"
            )),
        }
    }
}

impl fmt::Display for DomainPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainPolicy::All => "all",
            DomainPolicy::Region => "region",
            DomainPolicy::ZeroOnly => "zero-only",
        })
    }
}

/// A region as the caller registers it.
///
/// The memory must be a private mapping (anonymous, or a private file mapping) that the
/// caller owns for the engine's lifetime: the remap backend replaces its pages with
/// `MAP_FIXED` mappings, and zero pages are discarded with `MADV_DONTNEED`.
#[derive(Clone, Debug)]
pub struct RegionSpec {
    /// Host virtual address (page aligned).
    pub addr: usize,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub len: usize,
    /// A name for reports ("guest0", "region3").
    pub label: String,
    /// Merge domain.
    pub domain: DomainId,
}

impl RegionSpec {
    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }
}
