//! The engine's vocabulary: backends, configuration, the hooks a caller lends, errors,
//! and the reports a pass produces.

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::dirty::DirtySource;
use crate::hash::{PageHasher, Xxh3};
use crate::hold::{NoWriters, WriterHold};
use crate::region::DomainPolicy;

/// How merges are carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Copy-on-write mappings of a memfd store, done by the engine.
    Remap,
    /// `MADV_MERGEABLE` hints on ranges with duplicates; the kernel's ksmd merges.
    Madvise,
    /// Remap runs of at least `min_run` pages, hint the rest to ksmd.
    Hybrid {
        /// Shortest run (consecutive pages mapping consecutive store pages) remapped.
        min_run: usize,
    },
}

impl Backend {
    /// Short name ("remap", "madvise", "hybrid").
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Remap => "remap",
            Backend::Madvise => "madvise",
            Backend::Hybrid { .. } => "hybrid",
        }
    }
    pub(crate) fn remaps(&self) -> bool {
        !matches!(self, Backend::Madvise)
    }
    pub(crate) fn hints(&self) -> bool {
        !matches!(self, Backend::Remap)
    }
}

/// ksmd's knobs while the engine hints pages to it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct KsmdSettings {
    /// /sys/kernel/mm/ksm/pages_to_scan.
    pub pages_to_scan: u64,
    /// /sys/kernel/mm/ksm/sleep_millisecs.
    pub sleep_ms: u64,
}

impl Default for KsmdSettings {
    fn default() -> Self {
        KsmdSettings {
            pages_to_scan: 100_000,
            sleep_ms: 0,
        }
    }
}

/// Engine configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Backend.
    pub backend: Backend,
    /// Domain policy.
    pub policy: DomainPolicy,
    /// Target length of one hold of a region's writers.
    pub hold_target: Duration,
    /// Fraction of vm.max_map_count the process may use (0.8).
    pub vma_budget_fraction: f64,
    /// Absolute VMA budget, overriding the fraction (tests).
    pub vma_budget: Option<usize>,
    /// Raise vm.max_map_count to this for the engine's lifetime (root), restored after.
    pub raise_max_map_count: Option<u64>,
    /// ksmd's knobs for the madvise and hybrid backends.
    pub ksmd: KsmdSettings,
    /// Worker threads (0: one per CPU).
    pub threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::Remap,
            policy: DomainPolicy::All,
            hold_target: Duration::from_millis(10),
            vma_budget_fraction: 0.8,
            vma_budget: None,
            raise_max_map_count: None,
            ksmd: KsmdSettings::default(),
            threads: 0,
        }
    }
}

/// The capabilities the caller lends the engine.
pub struct Hooks {
    /// Page hasher (xxh3 unless a test injects another).
    pub hasher: Arc<dyn PageHasher>,
    /// Dirty-page source; None: hash stability across two passes.
    pub dirty: Option<Box<dyn DirtySource>>,
    /// Holds a region's writers still.
    pub hold: Arc<dyn WriterHold>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            hasher: Arc::new(Xxh3),
            dirty: None,
            hold: Arc::new(NoWriters),
        }
    }
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A region is not page aligned, empty, or overlaps another.
    #[error("region {label:?}: {why}")]
    BadRegion {
        /// The region's label.
        label: String,
        /// What is wrong.
        why: String,
    },
    /// A configuration value is out of range.
    #[error("configuration: {0}")]
    Config(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What the engine was doing.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Wraps an OS error with what the engine was doing.
pub(crate) fn os(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Os { what, source }
}

/// What one pass did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PassReport {
    /// Pass number (0 is the first).
    pub pass: u64,
    /// Pages the pass looked at (all, or the dirty ones).
    pub pages_examined: u64,
    /// Pages hashed.
    pub pages_hashed: u64,
    /// Pages newly merged into the store.
    pub merged: u64,
    /// Zero pages reclaimed.
    pub zero_reclaimed: u64,
    /// Pages newly hinted MADV_MERGEABLE.
    pub hinted: u64,
    /// Copy-on-write breaks detected.
    pub cow_breaks: u64,
    /// Wall time of the pass, seconds.
    pub seconds: f64,
    /// Of which: collecting dirty pages and reading pagemap.
    pub collect_s: f64,
    /// Hashing.
    pub hash_s: f64,
    /// Planning merges (index lookups).
    pub plan_s: f64,
    /// Filling new store pages.
    pub fill_s: f64,
    /// Reclaiming zero pages.
    pub zero_s: f64,
    /// Verifying and remapping / reclaiming under holds.
    pub merge_s: f64,
}

/// Counters readable from another thread while the engine runs (progress, sampling).
#[derive(Debug, Default)]
pub struct Progress {
    /// Pages saved as the engine counts them (merged pages − store pages + zero pages).
    pub saved_pages: AtomicU64,
    /// Passes completed.
    pub passes: AtomicU64,
    /// Pages hashed so far.
    pub pages_hashed: AtomicU64,
}
