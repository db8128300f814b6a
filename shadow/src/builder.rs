//! A page-table builder: maps virtual (or guest-physical) pages to physical pages with
//! 4 KiB, 2 MiB or 1 GiB leaves, writing real entries into any [`GuestPhysMemoryMut`].
//!
//! It writes either x86 format (guest tables, and AMD NPT tables, which share the format)
//! or Intel EPT format (the nested model's host tables). Table pages come from a
//! [`TableAllocator`]; [`BumpAllocator`] hands out pages from a range and recycles freed
//! ones, so address-space teardown and re-creation reuse table pages the way a kernel does.

use crate::mem::{GuestPhysMemoryMut, MemError};
use crate::paging::{
    table_index, PageSize, PTE_ADDR_MASK, PTE_G, PTE_NX, PTE_P, PTE_PS, PTE_RW, PTE_US,
};

/// EPT entry bit: read access.
pub const EPT_R: u64 = 1 << 0;
/// EPT entry bit: write access.
pub const EPT_W: u64 = 1 << 1;
/// EPT entry bit: execute access.
pub const EPT_X: u64 = 1 << 2;
/// EPT leaf memory type write-back (bits 5:3 = 6).
pub const EPT_MT_WB: u64 = 6 << 3;
/// EPT entry bit: this entry maps a page (level 2 or 3).
pub const EPT_LARGE: u64 = 1 << 7;

/// The layout of table entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum EntryFormat {
    /// x86-64 paging format (guest tables; AMD NPT uses it too).
    X86,
    /// Intel EPT format (present = any of R/W/X; bit 7 marks large pages).
    Ept,
}

impl EntryFormat {
    /// Whether `entry` is present in this format.
    #[inline(always)]
    pub const fn is_present(self, entry: u64) -> bool {
        match self {
            EntryFormat::X86 => entry & PTE_P != 0,
            EntryFormat::Ept => entry & (EPT_R | EPT_W | EPT_X) != 0,
        }
    }
    /// Whether `entry` at `level` maps a page rather than pointing to a table.
    #[inline(always)]
    pub const fn is_leaf(self, entry: u64, level: u8) -> bool {
        level == 1 || entry & PTE_PS != 0 // PS and EPT's bit 7 are the same bit
    }
    fn table_entry(self, table: u64) -> u64 {
        match self {
            EntryFormat::X86 => table | PTE_P | PTE_RW | PTE_US,
            EntryFormat::Ept => table | EPT_R | EPT_W | EPT_X,
        }
    }
    fn leaf_entry(self, pa: u64, size: PageSize, flags: MapFlags) -> u64 {
        let large = size != PageSize::Size4K;
        match self {
            EntryFormat::X86 => {
                let mut e = pa | PTE_P;
                if flags.writable {
                    e |= PTE_RW;
                }
                if flags.user {
                    e |= PTE_US;
                }
                if !flags.executable {
                    e |= PTE_NX;
                }
                if flags.global {
                    e |= PTE_G;
                }
                if large {
                    e |= PTE_PS;
                }
                e
            }
            EntryFormat::Ept => {
                let mut e = pa | EPT_R | EPT_MT_WB;
                if flags.writable {
                    e |= EPT_W;
                }
                if flags.executable {
                    e |= EPT_X;
                }
                if large {
                    e |= EPT_LARGE;
                }
                e
            }
        }
    }
}

/// Permissions and attributes of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct MapFlags {
    /// Writes allowed.
    pub writable: bool,
    /// User-mode accesses allowed (x86 only).
    pub user: bool,
    /// Instruction fetches allowed (x86: NX clear).
    pub executable: bool,
    /// Global page (x86 only).
    pub global: bool,
}

impl MapFlags {
    /// Read, write, execute, user, not global.
    pub const ALL: MapFlags = MapFlags {
        writable: true,
        user: true,
        executable: true,
        global: false,
    };
    /// Supervisor read-write data, not executable.
    pub const KERNEL_DATA: MapFlags = MapFlags {
        writable: true,
        user: false,
        executable: false,
        global: false,
    };
    /// User read-write data, not executable.
    pub const USER_DATA: MapFlags = MapFlags {
        writable: true,
        user: true,
        executable: false,
        global: false,
    };
}

/// Hands out zeroed-on-use 4 KiB table pages.
pub trait TableAllocator {
    /// A free page-aligned physical address for a new table, or `None` when exhausted.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Returns a table page for reuse.
    fn free_table(&mut self, addr: u64);
}

/// Allocates table pages from `[start, end)` in order, reusing freed pages first (LIFO).
#[derive(Debug, Clone)]
pub struct BumpAllocator {
    start: u64,
    next: u64,
    end: u64,
    free: Vec<u64>,
}

impl BumpAllocator {
    /// An allocator over `[start, end)` (rounded inward to 4 KiB).
    pub fn new(start: u64, end: u64) -> Self {
        let start = (start + 0xfff) & !0xfff;
        BumpAllocator {
            start,
            next: start,
            end: end & !0xfff,
            free: Vec::new(),
        }
    }
    /// The range handed out so far, `[start, high-water mark)` (freed pages included).
    pub fn used(&self) -> std::ops::Range<u64> {
        self.start..self.next
    }
    /// Pages still available.
    pub fn remaining(&self) -> u64 {
        (self.end.saturating_sub(self.next) >> 12) + self.free.len() as u64
    }
}

impl TableAllocator for BumpAllocator {
    fn alloc_table(&mut self) -> Option<u64> {
        if let Some(p) = self.free.pop() {
            return Some(p);
        }
        if self.next + 0x1000 > self.end {
            return None;
        }
        let p = self.next;
        self.next += 0x1000;
        Some(p)
    }
    fn free_table(&mut self, addr: u64) {
        self.free.push(addr & !0xfff);
    }
}

/// A mapping request the builder cannot carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// Address or physical address not aligned to the page size.
    #[error("cannot map {va:#x} -> {pa:#x} with a {size} page: both must be {size}-aligned")]
    Unaligned {
        /// Virtual address.
        va: u64,
        /// Physical address.
        pa: u64,
        /// Requested page size.
        size: PageSize,
    },
    /// The virtual address does not fit the table depth (or is not canonical).
    #[error("address {va:#x} is not canonical for {levels}-level tables")]
    NonCanonical {
        /// Virtual address.
        va: u64,
        /// Table depth.
        levels: u8,
    },
    /// A leaf is in the way of a table, or a table in the way of a leaf.
    #[error("cannot map {va:#x}: a level-{level} entry is already in use by a mapping of a different size")]
    Conflict {
        /// Virtual address.
        va: u64,
        /// Level of the conflicting entry.
        level: u8,
    },
    /// The allocator has no table page left.
    #[error("out of page-table pages while mapping {va:#x}")]
    OutOfTables {
        /// Virtual address.
        va: u64,
    },
    /// Memory refused a table access.
    #[error("page-table memory: {0}")]
    Memory(#[from] MemError),
    /// Table depth other than 4 or 5.
    #[error("unsupported table depth {0}; expected 4 or 5")]
    BadLevels(u8),
}

/// Builds and edits one tree of page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTableBuilder {
    root: u64,
    levels: u8,
    format: EntryFormat,
}

impl PageTableBuilder {
    /// Allocates and zeroes a new root table.
    pub fn new<M: GuestPhysMemoryMut + ?Sized, A: TableAllocator + ?Sized>(
        mem: &mut M,
        alloc: &mut A,
        levels: u8,
        format: EntryFormat,
    ) -> Result<Self, BuildError> {
        if levels != 4 && levels != 5 {
            return Err(BuildError::BadLevels(levels));
        }
        let root = alloc
            .alloc_table()
            .ok_or(BuildError::OutOfTables { va: 0 })?;
        mem.zero_page(root)?;
        Ok(PageTableBuilder {
            root,
            levels,
            format,
        })
    }

    /// Edits existing tables rooted at `root`.
    pub fn with_root(root: u64, levels: u8, format: EntryFormat) -> Result<Self, BuildError> {
        if levels != 4 && levels != 5 {
            return Err(BuildError::BadLevels(levels));
        }
        Ok(PageTableBuilder {
            root: root & PTE_ADDR_MASK,
            levels,
            format,
        })
    }

    /// Physical address of the root table (the CR3 or EPTP address).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Table depth.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    fn check_va(&self, va: u64) -> Result<(), BuildError> {
        let bits = 12 + 9 * self.levels as u32;
        let shift = 64 - bits;
        // Guest virtual addresses must be canonical; guest-physical ones (EPT) must fit.
        let ok = match self.format {
            EntryFormat::X86 => (((va << shift) as i64) >> shift) as u64 == va,
            EntryFormat::Ept => va >> bits == 0,
        };
        if ok {
            Ok(())
        } else {
            Err(BuildError::NonCanonical {
                va,
                levels: self.levels,
            })
        }
    }

    /// Maps the page of `size` at `va` to `pa` with `flags`, creating tables as needed.
    /// Replaces an existing leaf of the same size.
    pub fn map<M: GuestPhysMemoryMut + ?Sized, A: TableAllocator + ?Sized>(
        &self,
        mem: &mut M,
        alloc: &mut A,
        va: u64,
        pa: u64,
        size: PageSize,
        flags: MapFlags,
    ) -> Result<(), BuildError> {
        if (va | pa) & size.offset_mask() != 0 || pa & !PTE_ADDR_MASK != 0 {
            return Err(BuildError::Unaligned { va, pa, size });
        }
        self.check_va(va)?;
        let mut table = self.root;
        let leaf_level = size.level();
        for level in (leaf_level + 1..=self.levels).rev() {
            let addr = table + table_index(va, level) * 8;
            let e = mem.read_u64(addr)?;
            if self.format.is_present(e) {
                if self.format.is_leaf(e, level) {
                    return Err(BuildError::Conflict { va, level });
                }
                table = e & PTE_ADDR_MASK;
            } else {
                let t = alloc.alloc_table().ok_or(BuildError::OutOfTables { va })?;
                mem.zero_page(t)?;
                mem.write_u64(addr, self.format.table_entry(t))?;
                table = t;
            }
        }
        let addr = table + table_index(va, leaf_level) * 8;
        let old = mem.read_u64(addr)?;
        if self.format.is_present(old) && !self.format.is_leaf(old, leaf_level) {
            return Err(BuildError::Conflict {
                va,
                level: leaf_level,
            });
        }
        mem.write_u64(addr, self.format.leaf_entry(pa, size, flags))?;
        Ok(())
    }

    /// Physical address of the entry at `level` that translates `va`, if the tables above
    /// it are present (for tests and tools that edit entries by hand).
    pub fn entry_addr<M: GuestPhysMemoryMut + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        level: u8,
    ) -> Result<Option<u64>, BuildError> {
        let mut table = self.root;
        for l in (1..=self.levels).rev() {
            let addr = table + table_index(va, l) * 8;
            if l == level {
                return Ok(Some(addr));
            }
            let e = mem.read_u64(addr)?;
            if !self.format.is_present(e) || self.format.is_leaf(e, l) {
                return Ok(None);
            }
            table = e & PTE_ADDR_MASK;
        }
        Ok(None)
    }

    /// Removes the leaf of `size` mapping `va`; returns whether there was one. Tables left
    /// empty are kept (as most kernels do until teardown).
    pub fn unmap<M: GuestPhysMemoryMut + ?Sized>(
        &self,
        mem: &mut M,
        va: u64,
        size: PageSize,
    ) -> Result<bool, BuildError> {
        self.check_va(va)?;
        match self.entry_addr(mem, va, size.level())? {
            Some(addr) => {
                let e = mem.read_u64(addr)?;
                if self.format.is_present(e) && self.format.is_leaf(e, size.level()) {
                    mem.write_u64(addr, 0)?;
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
            None => Ok(false),
        }
    }

    /// Frees every table page of this tree, root included, back to `alloc` (the tables'
    /// contents are left as they were, like freed kernel pages).
    pub fn free_all<M: GuestPhysMemoryMut + ?Sized, A: TableAllocator + ?Sized>(
        &self,
        mem: &M,
        alloc: &mut A,
    ) -> Result<(), BuildError> {
        self.free_table(mem, alloc, self.root, self.levels)
    }

    fn free_table<M: GuestPhysMemoryMut + ?Sized, A: TableAllocator + ?Sized>(
        &self,
        mem: &M,
        alloc: &mut A,
        table: u64,
        level: u8,
    ) -> Result<(), BuildError> {
        if level > 1 {
            for i in 0..512 {
                let e = mem.read_u64(table + i * 8)?;
                if self.format.is_present(e) && !self.format.is_leaf(e, level) {
                    self.free_table(mem, alloc, e & PTE_ADDR_MASK, level - 1)?;
                }
            }
        }
        alloc.free_table(table);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{BufferMemory, GuestPhysMemory};

    #[test]
    fn maps_every_size_and_reports_conflicts() {
        let mut mem = BufferMemory::new(0, 0x100_0000);
        let mut alloc = BumpAllocator::new(0x80_0000, 0x100_0000);
        let b = PageTableBuilder::new(&mut mem, &mut alloc, 4, EntryFormat::X86).unwrap();
        b.map(
            &mut mem,
            &mut alloc,
            0x4000_0000,
            0x1000,
            PageSize::Size4K,
            MapFlags::ALL,
        )
        .unwrap();
        b.map(
            &mut mem,
            &mut alloc,
            0x4020_0000,
            0x20_0000,
            PageSize::Size2M,
            MapFlags::ALL,
        )
        .unwrap();
        b.map(
            &mut mem,
            &mut alloc,
            0x8000_0000,
            0x4000_0000,
            PageSize::Size1G,
            MapFlags::ALL,
        )
        .unwrap();
        let pte = b.entry_addr(&mem, 0x4000_0000, 1).unwrap().unwrap();
        assert_eq!(mem.read_u64(pte).unwrap() & PTE_ADDR_MASK, 0x1000);
        assert_eq!(
            b.map(
                &mut mem,
                &mut alloc,
                0x4000_0000,
                0,
                PageSize::Size2M,
                MapFlags::ALL
            ),
            Err(BuildError::Conflict {
                va: 0x4000_0000,
                level: 2
            })
        );
        assert_eq!(
            b.map(
                &mut mem,
                &mut alloc,
                0x8000_1000,
                0,
                PageSize::Size4K,
                MapFlags::ALL
            ),
            Err(BuildError::Conflict {
                va: 0x8000_1000,
                level: 3
            })
        );
        assert!(matches!(
            b.map(
                &mut mem,
                &mut alloc,
                0x1000,
                0x800,
                PageSize::Size4K,
                MapFlags::ALL
            ),
            Err(BuildError::Unaligned { .. })
        ));
        assert!(matches!(
            b.map(
                &mut mem,
                &mut alloc,
                0x0000_8000_0000_0000,
                0,
                PageSize::Size4K,
                MapFlags::ALL
            ),
            Err(BuildError::NonCanonical { .. })
        ));
        assert!(b.unmap(&mut mem, 0x4000_0000, PageSize::Size4K).unwrap());
        assert!(!b.unmap(&mut mem, 0x4000_0000, PageSize::Size4K).unwrap());
        let before = alloc.remaining();
        b.free_all(&mem, &mut alloc).unwrap();
        // root + PDPT(0) + PD(1G) + PT = 4 pages come back.
        assert_eq!(alloc.remaining(), before + 4);
    }

    #[test]
    fn allocator_runs_out_with_a_typed_error() {
        let mut mem = BufferMemory::new(0, 0x10_0000);
        let mut alloc = BumpAllocator::new(0x1000, 0x3000);
        let b = PageTableBuilder::new(&mut mem, &mut alloc, 4, EntryFormat::Ept).unwrap();
        assert_eq!(
            b.map(
                &mut mem,
                &mut alloc,
                0x1000,
                0x1000,
                PageSize::Size4K,
                MapFlags::ALL
            ),
            Err(BuildError::OutOfTables { va: 0x1000 })
        );
    }
}
