//! Guest-physical layout of the built-in guest.
//!
//! ```text
//! 0x0000_0000  null page (not present: a guest that dereferences 0 faults)
//! 0x0000_1000  GDT
//! 0x0000_2000  parameter block written by the VMM, results written by the guest
//! 0x0000_3000  PML4
//! 0x0000_4000  PDPT of the identity map (PML4[0])
//! 0x0000_5000  PDPT of the high-half map (PML4[511])
//! 0x0000_6000  page table mapping the first 2 MiB with 4 KiB pages
//! 0x0000_7000  page directories, one per GiB of identity map (2 MiB pages)
//! 0x0008_0000  guest program (code, then its strings)
//! 0x0010_0000  top of the boot stack (grows down)
//! 0x0020_0000  image, loaded by the VMM as a boot loader loads a kernel
//! after image  RAM: the unique area, then the zeroed area, then untouched RAM
//! ```
//!
//! The same guest-physical memory is visible at two virtual addresses: identity
//! (`gva == gpa`) and the kernel-style high half (`gva == HIGH_HALF_BASE + gpa`) for
//! the first 2 GiB. The first 2 MiB are mapped with 4 KiB pages, the rest with 2 MiB
//! pages, so a software walker meets both page sizes on a real guest.

use crate::units::{GIB, MIB};

/// Guest-physical address of the GDT.
pub const GDT_GPA: u64 = 0x1000;
/// Guest-physical address of the parameter block.
pub const PARAMS_GPA: u64 = 0x2000;
/// Offset of the results inside the parameter page.
pub const RESULTS_OFFSET: u64 = 0x800;
/// Guest-physical address of the PML4 (the guest's CR3).
pub const PML4_GPA: u64 = 0x3000;
/// Guest-physical address of the identity-map PDPT.
pub const PDPT_LOW_GPA: u64 = 0x4000;
/// Guest-physical address of the high-half PDPT.
pub const PDPT_HIGH_GPA: u64 = 0x5000;
/// Guest-physical address of the page table that maps the first 2 MiB with 4 KiB pages.
pub const PT_LOW_GPA: u64 = 0x6000;
/// Guest-physical address of the first page directory.
pub const PD_BASE_GPA: u64 = 0x7000;
/// Largest identity map the layout has room for (page directories up to 0x47000).
pub const MAX_IDENTITY_MAP: u64 = 64 * GIB;
/// Guest-physical address of the guest program.
pub const CODE_GPA: u64 = 0x8_0000;
/// Room for the guest program.
pub const CODE_MAX_LEN: u64 = 0x1_0000;
/// Initial stack pointer.
pub const STACK_TOP_GPA: u64 = 0x10_0000;
/// Guest-physical address where the image is loaded, the same in every guest.
pub const IMAGE_GPA: u64 = 2 * MIB;
/// Virtual base of the kernel-style high-half mapping of guest-physical 0.
pub const HIGH_HALF_BASE: u64 = 0xffff_ffff_8000_0000;
/// How much guest-physical memory the high-half mapping covers.
pub const HIGH_HALF_SIZE: u64 = 2 * GIB;
/// I/O port of the 16550 serial console (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// I/O port through which the guest reports its phases to the VMM.
pub const CONTROL_PORT: u16 = 0x510;
/// I/O port the exit-cost calibration guest writes to (a no-op device, like port 0x80).
pub const NOP_PORT: u16 = 0x80;
