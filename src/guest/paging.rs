//! Builds the x86-64 4-level page tables the built-in guest runs on.
//!
//! The tables are ordinary data in guest memory, written from the host before the
//! first vCPU enters the guest; a software walker (crate `shadow`) and KVM's
//! `KVM_TRANSLATE` both walk them.

use super::layout::*;
use crate::units::{GIB, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Entry bit: present.
pub const PTE_P: u64 = 1 << 0;
/// Entry bit: writable.
pub const PTE_RW: u64 = 1 << 1;
/// Entry bit: page size (a 2 MiB leaf in a PD, 1 GiB in a PDPT).
pub const PTE_PS: u64 = 1 << 7;
/// Entry bit: execute disable (needs EFER.NXE).
pub const PTE_NX: u64 = 1 << 63;

const MIB2: u64 = 2 << 20;

/// Writes the page tables for a guest of `mem_size` bytes into `mem`.
///
/// * identity map of all of RAM: the first 2 MiB through a 4 KiB page table
///   (page 0 left not present), the rest with 2 MiB pages;
/// * the first [`HIGH_HALF_SIZE`] of RAM again at [`HIGH_HALF_BASE`], sharing the
///   identity map's page directories.
///
/// 4 KiB pages outside the program are mapped no-execute.
pub fn write_page_tables<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    let identity = mem_size.div_ceil(MIB2) * MIB2;
    let n_pd = identity.div_ceil(GIB);
    let w = |gpa: u64, val: u64| mem.write_obj(val, GuestAddress(gpa));

    // PML4: slot 0 → identity PDPT, slot 511 → high-half PDPT.
    w(PML4_GPA, PDPT_LOW_GPA | PTE_P | PTE_RW)?;
    w(PML4_GPA + 511 * 8, PDPT_HIGH_GPA | PTE_P | PTE_RW)?;

    for gib in 0..n_pd {
        let pd = PD_BASE_GPA + gib * PAGE_SIZE;
        w(PDPT_LOW_GPA + gib * 8, pd | PTE_P | PTE_RW)?;
        // 0xffff_ffff_8000_0000 is PDPT index 510 of PML4 slot 511.
        if gib < HIGH_HALF_SIZE / GIB {
            w(PDPT_HIGH_GPA + (510 + gib) * 8, pd | PTE_P | PTE_RW)?;
        }
        for i in 0..512u64 {
            let gpa = gib * GIB + i * MIB2;
            if gpa >= identity {
                break;
            }
            let entry = if gpa == 0 {
                PT_LOW_GPA | PTE_P | PTE_RW
            } else {
                gpa | PTE_P | PTE_RW | PTE_PS
            };
            w(pd + i * 8, entry)?;
        }
    }

    // The first 2 MiB with 4 KiB pages; page 0 stays not present.
    for i in 1..512u64 {
        let gpa = i * PAGE_SIZE;
        let in_code = (CODE_GPA..CODE_GPA + CODE_MAX_LEN).contains(&gpa);
        let nx = if in_code { 0 } else { PTE_NX };
        w(PT_LOW_GPA + i * 8, gpa | PTE_P | PTE_RW | nx)?;
    }
    Ok(())
}

/// Guest-physical pages that hold page tables for a guest of `mem_size` bytes.
pub fn page_table_pages(mem_size: u64) -> Vec<u64> {
    let n_pd = (mem_size.div_ceil(MIB2) * MIB2).div_ceil(GIB);
    let mut v = vec![PML4_GPA, PDPT_LOW_GPA, PDPT_HIGH_GPA, PT_LOW_GPA];
    v.extend((0..n_pd).map(|i| PD_BASE_GPA + i * PAGE_SIZE));
    v
}
