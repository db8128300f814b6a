//! memvirt: a virtual machine monitor on Linux KVM whose subject is memory.
//!
//! The VMM boots rows of identical small guests in one process and exposes their
//! memory to the experiments that study it. The pieces, in the order data flows:
//!
//! * [`vstate::memory`] maps guest RAM with vm-memory, backed by private anonymous
//!   memory, a memfd or huge pages, and describes each region with a small public
//!   type ([`vstate::memory::RegionInfo`]) that other crates consume.
//! * [`vstate::vm`] registers those regions as KVM memslots (the hardware path:
//!   EPT/NPT on ordinary hosts, shadow paging in the host kernel under PVM) and reads
//!   KVM's dirty log per memslot.
//! * [`vstate::vcpu`] runs each vCPU on its own host thread with an explicit state
//!   machine, so another thread can hold a guest still (pause) within milliseconds
//!   and let it go again: the dedup engine merges pages only while writers are held.
//! * [`guest`] is the built-in guest: page tables, a program assembled at run time,
//!   an image loaded from the host side as a boot loader would, and a memory profile
//!   (stamped image pages, unique pages, zeroed pages) that makes guests alike in the
//!   ways real guests are alike.
//! * [`machine`] ties one guest together; [`runner`] boots many in parallel and
//!   collects what they report; [`probe`] measures the host; [`report`] prints.
//! * The crates `ksm` (userspace same-page merging) and `shadow` (software MMU) know
//!   nothing of KVM; [`dedup`] and [`translate`] connect them to the command line.

pub mod commands;
pub mod cpulist;
pub mod dedup;
pub mod devices;
pub mod guest;
pub mod guest_phys;
pub mod host;
pub mod machine;
pub mod probe;
pub mod report;
pub mod runner;
pub mod translate;
pub mod units;
pub mod vstate;
