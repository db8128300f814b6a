//! # memvirt-ksm: a userspace same-page merging engine
//!
//! Linux's KSM (mm/ksm.c) finds identical anonymous pages and replaces them with one
//! write-protected copy. Its daemon, ksmd, walks the memory of every `MADV_MERGEABLE`
//! area a few pages at a time, keeps two red-black trees keyed by page *content* (the
//! *stable* tree of pages already merged, and the *unstable* tree of candidates seen in
//! this scan, rebuilt every full scan), and only inserts a page into the unstable tree if
//! its checksum did not change since the previous scan. That makes it frugal but slow: it
//! saves nothing until its first full scan ends, it is single-threaded, and once memory is
//! merged it keeps rescanning all of it to notice the few pages that changed.
//!
//! This crate does the same job from inside the process that owns the memory (a VMM),
//! where three things are cheaper than in the kernel's generic path:
//!
//! * **Hashing in parallel.** A pass hashes pages with xxh3 on a rayon pool (~5 M pages/s
//!   per core from RAM), after a one-cache-line check that sends all-zero pages down a
//!   separate path. The *index* ([`index::Index`]) is the counterpart of both of ksm.c's
//!   trees: an open-addressing table from (domain, hash) to either a *store slot* (merged
//!   content — the stable tree) or an *unmerged page* nobody matched yet (the unstable
//!   tree). Unlike the unstable tree it persists across passes, so a page that nobody
//!   wrote is never looked at again.
//!
//! * **Knowing what was written.** The caller lends a [`DirtySource`]: "which pages were
//!   written since you last asked". The VMM answers from KVM's dirty log; for plain regions
//!   [`UffdDirty`] uses userfaultfd's asynchronous write-protection read back with the
//!   PAGEMAP_SCAN ioctl. With a source, a page written in two consecutive intervals is
//!   *volatile* and left alone; every other page is a candidate at once, and after the
//!   first pass the work of a pass grows with the number of pages written, not with the
//!   size of memory. Without one the engine applies ksmd's rule (hash unchanged across two
//!   passes) and rehashes everything each pass.
//!
//! * **Merging without the kernel's help** ([`Backend::Remap`]). Duplicate content is
//!   copied once into a *store* (a memfd, [`store::Store`]) and every page of the group —
//!   the first occurrence too — is replaced by a `MAP_FIXED|MAP_PRIVATE` mapping of its
//!   store page. A later write faults and gives the writer a private copy (copy-on-write),
//!   leaving every other mapping untouched. All-zero pages are simply discarded with
//!   `MADV_DONTNEED` (batched), after which they read as the kernel's zero page.
//!
//! **A hash match never merges.** Between the hash and the remap the page could change,
//!   and with a weak hasher (tests inject one, [`PageHasher`]) distinct pages collide. So
//!   every page is compared byte for byte with the store page it is about to map, and that
//!   comparison and the remap happen while the caller's [`WriterHold`] hook holds the
//!   region's writers still (the VMM parks the guest's vCPUs). Work is cut into batches
//!   whose size adapts so that a hold lasts about 10 ms; the longest and mean holds are
//!   reported.
//!
//! **Mappings are a budget.** Every remapped range is a VMA, and a process may have only
//!   vm.max_map_count of them (65530). Store slots are therefore handed out in address
//!   order, so that pages consecutive in a region map consecutive store pages and one
//!   `mmap` covers the whole run (a loaded image merges in a handful of VMAs). The engine
//!   counts mappings against a budget (80% of the limit by default); when it is reached it
//!   stops remapping, says so in [`Stats::vma_budget_reached`], and — with
//!   [`Backend::Hybrid`] — hands the scattered rest to ksmd. Hybrid remaps runs of at
//!   least K pages and hints shorter ones; [`Backend::Madvise`] only hints: it marks the
//!   ranges that have duplicates `MADV_MERGEABLE`, sets ksmd's knobs for the run and puts
//!   them back afterwards, also on error, on panic and on Ctrl-C ([`restore`]).
//!
//! **Copy-on-write breaks and the store.** A merged page that was written has become
//!   private again: the dirty source reports it, or /proc/self/pagemap shows it present
//!   and no longer a file page. Its store slot loses a reference; a slot nobody maps is
//!   freed with `fallocate(PUNCH_HOLE)`, so the store shrinks back as pages diverge.
//!
//! **Domains.** Each region carries a merge domain, and the [`DomainPolicy`] says what may
//!   merge: `all` (within a domain, across regions), `region` (within one region only)
//!   or `zero-only` (nothing but zero pages). The domain is part of the index key and is
//!   checked again on every match, so no page is merged with a page of another domain;
//!   ksmd cannot honour domains, so the hinting backends refuse to hint unless every
//!   region is in the one domain under `all`.
//!
//! The engine knows nothing of KVM: regions are (address, length, label, domain), and the
//! dirty source and writer hold are the caller's.

pub mod config;
pub mod dirty;
pub mod engine;
pub mod hash;
pub mod hold;
pub mod index;
pub mod region;
pub mod restore;
pub mod stats;
pub mod store;
pub mod synth;
pub mod sys;

pub use config::{Backend, Config, Error, Hooks, KsmdSettings, PassReport, Progress};
pub use dirty::{DirtySource, UffdDirty};
pub use engine::Engine;
pub use hash::{PageHasher, Xxh3};
pub use hold::{NoWriters, WriterGate, WriterHold};
pub use region::{DomainId, DomainPolicy, RegionId, RegionSpec, PAGE_SIZE};
pub use stats::{Agreement, KernelKsm, Stats};
