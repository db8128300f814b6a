//! The guest page-table walker: x86-64 4- and 5-level paging as in Intel SDM vol. 3A §4.5,
//! reading entries through [`GuestPhysMemory`].
//!
//! A walk starts at the table CR3 points to and reads one entry per level. A non-present
//! entry stops it with a page fault (P clear in the error code); a present entry with a
//! reserved bit set stops it with P|RSVD; a leaf (a level-1 entry, or PS at level 2 or 3)
//! ends it, and the access is then checked against the accumulated permissions (R/W and
//! U/S ANDed, NX ORed, with CR0.WP, SMEP and SMAP applied). The same walk core serves the
//! nested model and the shadow MMU, which read entries through their own paths, so all
//! three give the same answers.
//!
//! Two inputs are errors rather than faults: a table or entry outside guest memory
//! ([`WalkError::TableOutsideMemory`]) and, unless [`Walker::allow_recursive_tables`] is
//! set, a walk that reaches a table it already visited ([`WalkError::TableLoop`]; such
//! recursive maps are legal on x86 and some kernels use them, so the check can be
//! switched off, in which case the fixed depth of the walk bounds it).

use crate::mem::{GuestPhysMemory, GuestPhysMemoryMut};
use crate::paging::{
    pfec, table_index, Access, AccessKind, PageSize, PagingMode, Permissions, PTE_A, PTE_ADDR_MASK,
    PTE_D, PTE_G, PTE_P, PTE_PS,
};
use serde::Serialize;

/// A page fault as the CPU would raise it: the faulting address, the error code and the
/// paging level (5..1) of the entry that stopped the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PageFault {
    /// The linear address being translated (CR2).
    pub gva: u64,
    /// The page-fault error code (bits in [`crate::paging::pfec`]).
    pub error_code: u32,
    /// The level of the entry where the walk stopped (the leaf level for protection faults).
    pub level: u8,
}

impl PageFault {
    /// P bit: a protection violation rather than a non-present entry.
    pub fn is_protection(&self) -> bool {
        self.error_code & pfec::PRESENT != 0
    }
    /// RSVD bit: a reserved bit was set.
    pub fn is_reserved(&self) -> bool {
        self.error_code & pfec::RSVD != 0
    }
}

impl std::fmt::Display for PageFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ec = self.error_code;
        write!(
            f,
            "page fault at {:#x}, level {}, error code {:#x} ({}{}{}{}{})",
            self.gva,
            self.level,
            ec,
            if ec & pfec::PRESENT != 0 {
                "P"
            } else {
                "not-present"
            },
            if ec & pfec::WRITE != 0 { " W" } else { " R" },
            if ec & pfec::USER != 0 { " U" } else { " S" },
            if ec & pfec::RSVD != 0 { " RSVD" } else { "" },
            if ec & pfec::FETCH != 0 { " I" } else { "" },
        )
    }
}

/// Why a walk did not produce a translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// The address is not canonical for the paging mode (the CPU raises #GP, not #PF).
    #[error("address {gva:#x} is not canonical for {bits}-bit linear addresses")]
    NonCanonical {
        /// The address given.
        gva: u64,
        /// Linear-address width of the mode (48 or 57).
        bits: u32,
    },
    /// The walk faulted.
    #[error("{0}")]
    PageFault(PageFault),
    /// A table entry lies outside guest memory (a bad CR3 or a bad table pointer).
    #[error("translating {gva:#x}: the level-{level} table entry at guest-physical {entry_gpa:#x} is outside guest memory")]
    TableOutsideMemory {
        /// The address being translated.
        gva: u64,
        /// The level of the table.
        level: u8,
        /// Address of the entry that could not be read.
        entry_gpa: u64,
    },
    /// The walk reached a table page it had already used at a higher level.
    #[error("translating {gva:#x}: the level-{level} table at {table_gpa:#x} was already used higher in the same walk (loop in the page tables)")]
    TableLoop {
        /// The address being translated.
        gva: u64,
        /// The level at which the repeated table would have been used.
        level: u8,
        /// The repeated table's guest-physical address.
        table_gpa: u64,
    },
}

impl WalkError {
    /// The page fault, if this error is one.
    pub fn page_fault(&self) -> Option<&PageFault> {
        match self {
            WalkError::PageFault(pf) => Some(pf),
            _ => None,
        }
    }
}

/// A successful walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Translation {
    /// The linear address translated.
    pub gva: u64,
    /// The guest-physical address it maps to (page base plus offset).
    pub gpa: u64,
    /// Size of the page that maps it.
    pub size: PageSize,
    /// Effective permissions over the whole walk.
    pub perms: Permissions,
    /// The leaf entry's G bit.
    pub global: bool,
    /// The leaf entry as read.
    pub leaf_entry: u64,
    entry_gpas: [u64; 5],
    entry_values: [u64; 5],
    count: u8,
    first_level: u8,
}

impl Translation {
    /// Guest-physical addresses of every entry the walk read, top level first.
    pub fn entry_gpas(&self) -> &[u64] {
        &self.entry_gpas[..self.count as usize]
    }
    /// Values of every entry the walk read, top level first.
    pub fn entry_values(&self) -> &[u64] {
        &self.entry_values[..self.count as usize]
    }
    /// The level of the first entry read (the paging depth for a full walk).
    pub fn first_level(&self) -> u8 {
        self.first_level
    }
    /// The level of the leaf entry.
    pub fn leaf_level(&self) -> u8 {
        self.size.level()
    }
    /// Guest-physical address of the start of the mapped page.
    pub fn page_gpa(&self) -> u64 {
        self.gpa & !self.size.offset_mask()
    }
}

/// Where a walk starts: the top table (from CR3), or a lower table found in a
/// paging-structure cache together with the permissions accumulated above it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalkStart {
    pub level: u8,
    pub table: u64,
    pub perms: Permissions,
    /// Tables used above `level` (for loop detection), top first.
    pub visited: [u64; 5],
    pub nvisited: u8,
}

/// A walk-core failure: an architectural outcome, or the reader's own error.
#[derive(Debug)]
pub(crate) enum CoreError<E> {
    Walk(WalkError),
    Read(E),
}

/// The x86-64 page-table walker for one paging mode.
#[derive(Debug, Clone, Copy)]
pub struct Walker {
    mode: PagingMode,
    allow_recursive: bool,
}

impl Walker {
    /// A walker for `mode` that reports loops in the tables as [`WalkError::TableLoop`].
    pub fn new(mode: PagingMode) -> Self {
        Walker {
            mode,
            allow_recursive: false,
        }
    }

    /// Allow a walk to reuse a table it already visited (recursive/self-map page tables,
    /// legal on x86); the walk then does exactly what the CPU does.
    pub fn allow_recursive_tables(mut self, allow: bool) -> Self {
        self.allow_recursive = allow;
        self
    }

    /// The paging mode.
    pub fn mode(&self) -> &PagingMode {
        &self.mode
    }

    /// Physical address of the top-level table named by `cr3`.
    #[inline(always)]
    pub fn root_table(&self, cr3: u64) -> u64 {
        cr3 & PTE_ADDR_MASK & ((1u64 << self.mode.max_phys_bits) - 1)
    }

    /// Translates `gva` for `access` through the tables rooted at `cr3`, reading guest
    /// memory only.
    #[inline]
    pub fn walk<M: GuestPhysMemory + ?Sized>(
        &self,
        mem: &M,
        cr3: u64,
        gva: u64,
        access: Access,
    ) -> Result<Translation, WalkError> {
        let start = self.start(cr3, gva)?;
        self.walk_core(gva, access, start, |level, _table, entry| {
            mem.read_u64(entry)
                .map_err(|_| WalkError::TableOutsideMemory {
                    gva,
                    level,
                    entry_gpa: entry,
                })
        })
        .map_err(CoreError::flatten)
    }

    /// Like [`Walker::walk`], then sets the accessed bit of every entry used and, for a
    /// write, the dirty bit of the leaf, as the CPU does for a successful translation.
    pub fn walk_and_set_ad<M: GuestPhysMemoryMut + ?Sized>(
        &self,
        mem: &mut M,
        cr3: u64,
        gva: u64,
        access: Access,
    ) -> Result<Translation, WalkError> {
        let t = self.walk(&*mem, cr3, gva, access)?;
        let n = t.count as usize;
        for i in 0..n {
            let mut bits = PTE_A;
            if i + 1 == n && access.is_write() {
                bits |= PTE_D;
            }
            let value = t.entry_values[i];
            if value & bits != bits {
                let addr = t.entry_gpas[i];
                let level = t.first_level - i as u8;
                mem.write_u64(addr, value | bits)
                    .map_err(|_| WalkError::TableOutsideMemory {
                        gva,
                        level,
                        entry_gpa: addr,
                    })?;
            }
        }
        Ok(t)
    }

    /// Canonical check and the start of a full walk.
    #[inline(always)]
    pub(crate) fn start(&self, cr3: u64, gva: u64) -> Result<WalkStart, WalkError> {
        if !self.mode.is_canonical(gva) {
            return Err(WalkError::NonCanonical {
                gva,
                bits: self.mode.va_bits(),
            });
        }
        Ok(WalkStart {
            level: self.mode.levels(),
            table: self.root_table(cr3),
            perms: Permissions::ALL,
            visited: [0; 5],
            nvisited: 0,
        })
    }

    /// Base error code for `access` (W, U and I bits).
    #[inline(always)]
    pub(crate) fn base_error_code(&self, access: Access) -> u32 {
        let mut ec = 0;
        if access.is_write() {
            ec |= pfec::WRITE;
        }
        if access.user {
            ec |= pfec::USER;
        }
        if matches!(access.kind, AccessKind::Execute) && self.mode.reports_fetch() {
            ec |= pfec::FETCH;
        }
        ec
    }

    /// The walk itself. `read(level, table, entry_addr)` returns the entry's value; every
    /// other rule of the walk is here, so all readers share it.
    #[inline(always)]
    pub(crate) fn walk_core<E>(
        &self,
        gva: u64,
        access: Access,
        start: WalkStart,
        mut read: impl FnMut(u8, u64, u64) -> Result<u64, E>,
    ) -> Result<Translation, CoreError<E>> {
        let mode = &self.mode;
        let rsvd = mode.reserved_mask();
        let addr_mask = PTE_ADDR_MASK & ((1u64 << mode.max_phys_bits) - 1);
        let mut level = start.level;
        let mut table = start.table;
        let mut perms = start.perms;
        let mut visited = start.visited;
        let mut nvisited = start.nvisited as usize;
        let mut t = Translation {
            gva,
            gpa: 0,
            size: PageSize::Size4K,
            perms,
            global: false,
            leaf_entry: 0,
            entry_gpas: [0; 5],
            entry_values: [0; 5],
            count: 0,
            first_level: level,
        };
        loop {
            if !self.allow_recursive {
                if visited[..nvisited].contains(&table) {
                    return Err(CoreError::Walk(WalkError::TableLoop {
                        gva,
                        level,
                        table_gpa: table,
                    }));
                }
                visited[nvisited] = table;
                nvisited += 1;
            }
            let entry_addr = table + table_index(gva, level) * 8;
            let entry = match read(level, table, entry_addr) {
                Ok(v) => v,
                Err(e) => return Err(CoreError::Read(e)),
            };
            let i = t.count as usize;
            t.entry_gpas[i] = entry_addr;
            t.entry_values[i] = entry;
            t.count += 1;
            if entry & PTE_P == 0 {
                return Err(self.fault(gva, access, level, 0));
            }
            let is_leaf = level == 1 || entry & PTE_PS != 0;
            let mut bad = entry & rsvd != 0;
            if entry & PTE_PS != 0 {
                bad |= match level {
                    2 => entry & 0x1f_e000 != 0,
                    3 => !mode.gb_pages || entry & 0x3fff_e000 != 0,
                    // Level 1: bit 7 is PAT, not PS. Levels 4 and 5: PS is reserved.
                    1 => false,
                    _ => true,
                };
            }
            if bad {
                return Err(self.fault(gva, access, level, pfec::PRESENT | pfec::RSVD));
            }
            perms = perms.accumulate(entry, mode.nxe);
            if is_leaf {
                let size = match level {
                    1 => PageSize::Size4K,
                    2 => PageSize::Size2M,
                    _ => PageSize::Size1G,
                };
                if !perms.allows(access, mode) {
                    return Err(self.fault(gva, access, level, pfec::PRESENT));
                }
                let base = entry & addr_mask & !size.offset_mask();
                t.gpa = base | (gva & size.offset_mask());
                t.size = size;
                t.perms = perms;
                t.global = entry & PTE_G != 0;
                t.leaf_entry = entry;
                return Ok(t);
            }
            table = entry & addr_mask;
            level -= 1;
        }
    }

    #[inline(always)]
    fn fault<E>(&self, gva: u64, access: Access, level: u8, bits: u32) -> CoreError<E> {
        CoreError::Walk(WalkError::PageFault(PageFault {
            gva,
            error_code: self.base_error_code(access) | bits,
            level,
        }))
    }
}

impl CoreError<WalkError> {
    /// Both arms carry a [`WalkError`].
    pub(crate) fn flatten(self) -> WalkError {
        match self {
            CoreError::Walk(w) | CoreError::Read(w) => w,
        }
    }
}
