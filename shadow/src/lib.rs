//! # shadow — memvirt's software MMU
//!
//! A guest running on KVM sees two translations stacked on each other: guest-virtual to
//! guest-physical through the page tables the guest kernel keeps, and guest-physical to
//! host-physical through the VMM's memory map. Hardware does both at once with a
//! two-dimensional walk (Intel EPT, AMD NPT); before that existed, hypervisors kept *shadow*
//! page tables that map guest-virtual straight to host-physical and had to trap every write
//! the guest makes to its own tables to keep them true. This crate builds both in software
//! so the trade-off can be measured on any host, and gives the VMM a walker to inspect live
//! guests with. It knows nothing of KVM: physical memory is read through the small
//! [`GuestPhysMemory`] trait, which the VMM implements over its guest memory and the tests
//! implement with a plain buffer ([`BufferMemory`]).
//!
//! ## The pieces, bottom up
//!
//! * [`paging`] — the architecture's vocabulary: entry bits, page sizes, the paging mode
//!   derived from CR0/CR4/EFER ([`PagingMode`]), accesses, and the permission rules of
//!   Intel SDM vol. 3A §4.6 (U/S, R/W with CR0.WP, NX with EFER.NXE, SMEP, SMAP).
//! * [`walker`] — [`Walker::walk`] translates one address through 4- or 5-level tables with
//!   4 KiB, 2 MiB and 1 GiB pages. It returns the guest-physical address, page size,
//!   effective permissions and the address of every entry it read, or a typed
//!   [`WalkError`]: a page fault with its x86 error code and level, a non-canonical
//!   address, a table outside guest memory, or a loop in the tables. The walk's rules live
//!   in one core that takes a "read this entry" closure, so the nested model and the shadow
//!   MMU reuse it with their own readers and cannot disagree with it on semantics.
//! * [`builder`] — [`PageTableBuilder`] writes real x86 or EPT tables into any memory,
//!   taking table pages from a [`TableAllocator`]. Tests, workloads and benches build
//!   their guest tables with it; the nested model builds its EPT with it.
//! * [`cache`] — set-associative LRU structures and the [`Tlb`] model shared by both paths,
//!   with default sizes from a named public source (see [`CacheConfig`]).
//! * [`nested`] — the 2-D walk: [`NestedTables`] are EPT tables built in host memory from a
//!   guest [`MemoryMap`] with 4 KiB or 2 MiB leaves; [`NestedMmu`] walks the guest tables,
//!   translating every guest table access (and the final address) through them, and counts
//!   memory references — (n+1)(m+1)−1 with every cache off: 24 for 4-level guest and host,
//!   19 with 2 MiB host leaves, 35 for 5/5. A TLB, a guest paging-structure cache, a nested
//!   TLB and a nested paging-structure cache (Bhargava et al., ASPLOS 2008) cut that down.
//! * [`shadow_mmu`] — [`ShadowMmu`] keeps shadow pages in the manner of KVM's shadow MMU
//!   (Documentation/virt/kvm/x86/mmu.rst): one shadow page per (guest table page, level),
//!   shared between address spaces, a root per CR3, entries filled on a shadow miss by
//!   walking the guest tables and composing with the memory map. Guest table pages are
//!   write-tracked: a write reported through [`ShadowMmu::notify_write`] zaps the shadow
//!   entry it invalidates, or — for last-level tables — marks the shadow page *unsync*,
//!   letting the guest write freely until the next INVLPG (resync of that entry) or CR3
//!   write (resync of every unsync page). It counts hits, misses, fills, zaps, resyncs,
//!   tracked pages and the VM exits real shadow paging would have taken.
//! * [`testbed`] — a buffer-backed [`testbed::Machine`]: guest RAM in a sparse host memory,
//!   table allocators for guest and host tables, and constructors for both MMUs.
//! * [`workload`] — deterministic address traces over real guest page tables (sequential,
//!   random over a working set, page-table churn, address-space switches) and a runner that
//!   drives both paths with them; `memvirt translate` prints what it measures.
//!
//! ## Walking a guest's tables
//!
//! ```
//! use shadow::{Access, BufferMemory, BumpAllocator, EntryFormat, MapFlags, PageSize};
//! use shadow::{PageTableBuilder, PagingMode, WalkError, Walker};
//!
//! // Guest memory in a buffer; tables from its top 1 MiB.
//! let mut mem = BufferMemory::new(0, 16 << 20);
//! let mut alloc = BumpAllocator::new(15 << 20, 16 << 20);
//! let pt = PageTableBuilder::new(&mut mem, &mut alloc, 4, EntryFormat::X86).unwrap();
//! pt.map(&mut mem, &mut alloc, 0xffff_8000_0000_0000, 0x20_0000, PageSize::Size2M, MapFlags::KERNEL_DATA).unwrap();
//!
//! // On a live vCPU: PagingMode::from_registers(cr0, cr4, efer, maxphyaddr).
//! let walker = Walker::new(PagingMode::default());
//! let t = walker.walk(&mem, pt.root(), 0xffff_8000_0001_2345, Access::read()).unwrap();
//! assert_eq!((t.gpa, t.size, t.entry_gpas().len()), (0x21_2345, PageSize::Size2M, 3));
//! let fault = walker.walk(&mem, pt.root(), 0xffff_8000_0001_2345, Access::read().user());
//! assert!(matches!(fault, Err(WalkError::PageFault(pf)) if pf.error_code == 0b101 && pf.level == 2));
//! ```
//!
//! ## Addresses
//!
//! All addresses are plain `u64`; names say which space they live in: `gva` (guest
//! virtual), `gpa` (guest physical), `hpa` (host physical).

pub mod builder;
pub mod cache;
pub mod mem;
pub mod nested;
pub mod paging;
pub mod shadow_mmu;
pub mod testbed;
pub mod walker;
pub mod workload;

pub use builder::{
    BuildError, BumpAllocator, EntryFormat, MapFlags, PageTableBuilder, TableAllocator,
};
pub use cache::{CacheConfig, CacheStats, Tlb, TlbConfig};
pub use mem::{
    BufferMemory, GuestPhysMemory, GuestPhysMemoryMut, MemError, MemoryMap, MemoryRegion,
    RecordingMemory, VmMemory,
};
pub use nested::{
    NestedConfig, NestedError, NestedMmu, NestedStats, NestedTables, NestedTranslation,
};
pub use paging::{Access, AccessKind, PageSize, PagingMode, Permissions};
pub use shadow_mmu::{ShadowConfig, ShadowError, ShadowMmu, ShadowStats, ShadowTranslation};
pub use walker::{PageFault, Translation, WalkError, Walker};
