//! x86-64 paging vocabulary shared by the walker, the builder, the nested model and the
//! shadow tables: entry bits, page sizes, the paging mode taken from CR0/CR4/EFER, the kind
//! of access being translated, and the permission check of Intel SDM vol. 3A §4.6.

use serde::Serialize;

/// Entry bit: present.
pub const PTE_P: u64 = 1 << 0;
/// Entry bit: read/write (writes allowed when set).
pub const PTE_RW: u64 = 1 << 1;
/// Entry bit: user/supervisor (user accesses allowed when set).
pub const PTE_US: u64 = 1 << 2;
/// Entry bit: accessed.
pub const PTE_A: u64 = 1 << 5;
/// Entry bit: dirty (leaf entries only).
pub const PTE_D: u64 = 1 << 6;
/// Entry bit: page size (a leaf at level 2 or 3).
pub const PTE_PS: u64 = 1 << 7;
/// Entry bit: global (leaf entries only; honoured when CR4.PGE is set).
pub const PTE_G: u64 = 1 << 8;
/// Entry bit: execute-disable (only meaningful when EFER.NXE is set; reserved otherwise).
pub const PTE_NX: u64 = 1 << 63;
/// Bits 51:12 of an entry: the physical address of the next table or of a 4 KiB page.
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG: paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.PGE: global pages survive CR3 writes.
pub const CR4_PGE: u64 = 1 << 7;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.SMEP: supervisor fetches from user pages fault.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP: supervisor data accesses to user pages fault unless EFLAGS.AC is set.
pub const CR4_SMAP: u64 = 1 << 21;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE: the execute-disable bit is honoured.
pub const EFER_NXE: u64 = 1 << 11;

/// Size of a page mapped by a leaf entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PageSize {
    /// 4 KiB, mapped by a level-1 entry (PTE).
    #[serde(rename = "4k")]
    Size4K,
    /// 2 MiB, mapped by a level-2 entry (PDE) with PS set.
    #[serde(rename = "2m")]
    Size2M,
    /// 1 GiB, mapped by a level-3 entry (PDPTE) with PS set.
    #[serde(rename = "1g")]
    Size1G,
}

impl PageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }
    /// log2 of the page size.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }
    /// The paging level whose entries map pages of this size (1, 2 or 3).
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
    /// The page size mapped by a leaf at `level`, if that level may hold leaves.
    pub const fn from_level(level: u8) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
    /// Mask selecting the offset within a page of this size.
    pub const fn offset_mask(self) -> u64 {
        self.bytes() - 1
    }
    /// Short name: "4k", "2m" or "1g".
    pub const fn as_str(self) -> &'static str {
        match self {
            PageSize::Size4K => "4k",
            PageSize::Size2M => "2m",
            PageSize::Size1G => "1g",
        }
    }
}

impl std::fmt::Display for PageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Number of address bits translated by one table level.
pub const LEVEL_BITS: u32 = 9;

/// Shift of the address bits indexing a table at `level` (1 = PT, 2 = PD, ... 5 = PML5).
#[inline(always)]
pub const fn level_shift(level: u8) -> u32 {
    12 + LEVEL_BITS * (level as u32 - 1)
}

/// Index into the table at `level` for address `addr`.
#[inline(always)]
pub const fn table_index(addr: u64, level: u8) -> u64 {
    (addr >> level_shift(level)) & 0x1ff
}

/// The paging mode of a vCPU: everything from CR0, CR4 and EFER that changes the outcome of
/// a 64-bit page walk. Build it with [`PagingMode::from_registers`] (from a live vCPU) or by
/// starting from [`PagingMode::default`] (4-level, NXE, WP) and setting fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PagingMode {
    /// 5-level paging (CR4.LA57).
    pub la57: bool,
    /// EFER.NXE: bit 63 of entries is execute-disable; reserved when clear.
    pub nxe: bool,
    /// CR0.WP: supervisor writes to read-only pages fault.
    pub wp: bool,
    /// CR4.SMEP.
    pub smep: bool,
    /// CR4.SMAP.
    pub smap: bool,
    /// CR4.PGE: global translations survive CR3 writes (TLB models only).
    pub pge: bool,
    /// Whether 1 GiB pages are supported (CPUID.80000001H:EDX.Page1GB).
    pub gb_pages: bool,
    /// MAXPHYADDR: entry address bits at or above it are reserved (`CPUID.80000008H:EAX[7:0]`).
    pub max_phys_bits: u8,
}

impl Default for PagingMode {
    /// 4-level paging with NXE and WP, no SMEP/SMAP, 1 GiB pages, MAXPHYADDR 52.
    fn default() -> Self {
        PagingMode {
            la57: false,
            nxe: true,
            wp: true,
            smep: false,
            smap: false,
            pge: true,
            gb_pages: true,
            max_phys_bits: 52,
        }
    }
}

/// The control registers describe a mode this crate does not walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    /// CR0.PG, CR4.PAE or EFER.LMA is clear: not IA-32e (64-bit) paging.
    #[error("not 64-bit paging: CR0={cr0:#x} CR4={cr4:#x} EFER={efer:#x}; expected CR0.PG, CR4.PAE and EFER.LMA set")]
    NotLongMode {
        /// CR0 as given.
        cr0: u64,
        /// CR4 as given.
        cr4: u64,
        /// EFER as given.
        efer: u64,
    },
    /// MAXPHYADDR outside 32..=52.
    #[error("MAXPHYADDR {0} is out of range; expected 32..=52")]
    BadMaxPhysBits(u8),
}

impl PagingMode {
    /// The mode of a vCPU in 64-bit mode, from its control registers. `max_phys_bits` is the
    /// CPU's MAXPHYADDR (use 52 when unknown: fewer reserved-bit faults).
    pub fn from_registers(
        cr0: u64,
        cr4: u64,
        efer: u64,
        max_phys_bits: u8,
    ) -> Result<Self, ModeError> {
        if cr0 & CR0_PG == 0 || cr4 & CR4_PAE == 0 || efer & EFER_LMA == 0 {
            return Err(ModeError::NotLongMode { cr0, cr4, efer });
        }
        if !(32..=52).contains(&max_phys_bits) {
            return Err(ModeError::BadMaxPhysBits(max_phys_bits));
        }
        Ok(PagingMode {
            la57: cr4 & CR4_LA57 != 0,
            nxe: efer & EFER_NXE != 0,
            wp: cr0 & CR0_WP != 0,
            smep: cr4 & CR4_SMEP != 0,
            smap: cr4 & CR4_SMAP != 0,
            pge: cr4 & CR4_PGE != 0,
            gb_pages: true,
            max_phys_bits,
        })
    }

    /// 5-level variant of this mode.
    pub fn with_la57(mut self, la57: bool) -> Self {
        self.la57 = la57;
        self
    }

    /// Number of table levels: 4, or 5 with LA57.
    #[inline(always)]
    pub const fn levels(&self) -> u8 {
        if self.la57 {
            5
        } else {
            4
        }
    }

    /// Number of linear-address bits: 48, or 57 with LA57.
    pub const fn va_bits(&self) -> u32 {
        if self.la57 {
            57
        } else {
            48
        }
    }

    /// Whether `gva` is canonical (bits above the top translated bit copy it).
    #[inline(always)]
    pub const fn is_canonical(&self, gva: u64) -> bool {
        let shift = 64 - self.va_bits();
        (((gva << shift) as i64) >> shift) as u64 == gva
    }

    /// Entry bits that must be zero in every present entry (address bits at or above
    /// MAXPHYADDR, and bit 63 when NXE is clear).
    #[inline(always)]
    pub const fn reserved_mask(&self) -> u64 {
        let addr_rsvd = PTE_ADDR_MASK & !((1u64 << self.max_phys_bits) - 1);
        if self.nxe {
            addr_rsvd
        } else {
            addr_rsvd | PTE_NX
        }
    }

    /// The error code's I/D bit is defined only when NXE or SMEP is on.
    pub const fn reports_fetch(&self) -> bool {
        self.nxe || self.smep
    }
}

/// What the translated access does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessKind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Execute,
}

/// One access to translate: its kind, its privilege, and EFLAGS.AC (SMAP override).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// CPL 3 (user) rather than supervisor.
    pub user: bool,
    /// EFLAGS.AC: explicit supervisor data accesses to user pages are allowed under SMAP.
    pub ac: bool,
}

impl Access {
    /// Supervisor data read.
    pub const fn read() -> Self {
        Access {
            kind: AccessKind::Read,
            user: false,
            ac: false,
        }
    }
    /// Supervisor data write.
    pub const fn write() -> Self {
        Access {
            kind: AccessKind::Write,
            user: false,
            ac: false,
        }
    }
    /// Supervisor instruction fetch.
    pub const fn execute() -> Self {
        Access {
            kind: AccessKind::Execute,
            user: false,
            ac: false,
        }
    }
    /// The same access made from user mode (CPL 3).
    pub const fn user(mut self) -> Self {
        self.user = true;
        self
    }
    /// The same access made with EFLAGS.AC set.
    pub const fn with_ac(mut self) -> Self {
        self.ac = true;
        self
    }
    /// Whether this is a write.
    pub const fn is_write(&self) -> bool {
        matches!(self.kind, AccessKind::Write)
    }
}

/// Effective permissions of a translation: the AND of R/W and U/S and the OR of NX over
/// every entry of the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Permissions {
    /// Every entry had R/W set.
    pub writable: bool,
    /// Every entry had U/S set.
    pub user: bool,
    /// No entry had NX set (or NXE is off).
    pub executable: bool,
}

impl Permissions {
    /// Everything allowed: the identity of the accumulation.
    pub const ALL: Permissions = Permissions {
        writable: true,
        user: true,
        executable: true,
    };

    /// Accumulates one entry's bits into these permissions.
    #[inline(always)]
    pub fn accumulate(self, entry: u64, nxe: bool) -> Permissions {
        Permissions {
            writable: self.writable && entry & PTE_RW != 0,
            user: self.user && entry & PTE_US != 0,
            executable: self.executable && !(nxe && entry & PTE_NX != 0),
        }
    }

    /// Whether `access` is allowed under `mode` (Intel SDM vol. 3A §4.6).
    #[inline(always)]
    pub fn allows(&self, access: Access, mode: &PagingMode) -> bool {
        if access.user {
            return self.user
                && match access.kind {
                    AccessKind::Read => true,
                    AccessKind::Write => self.writable,
                    AccessKind::Execute => self.executable,
                };
        }
        match access.kind {
            AccessKind::Read => !(self.user && mode.smap && !access.ac),
            AccessKind::Write => {
                !(self.user && mode.smap && !access.ac) && (self.writable || !mode.wp)
            }
            AccessKind::Execute => self.executable && !(self.user && mode.smep),
        }
    }
}

/// Page-fault error code bits (Intel SDM vol. 3A §4.7).
pub mod pfec {
    /// P: the fault was a protection violation (clear: a non-present entry).
    pub const PRESENT: u32 = 1 << 0;
    /// W/R: the access was a write.
    pub const WRITE: u32 = 1 << 1;
    /// U/S: the access was a user-mode access.
    pub const USER: u32 = 1 << 2;
    /// RSVD: a reserved bit was set in some entry.
    pub const RSVD: u32 = 1 << 3;
    /// I/D: the access was an instruction fetch (only with NXE or SMEP).
    pub const FETCH: u32 = 1 << 4;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses_follow_the_mode() {
        let m4 = PagingMode::default();
        let m5 = m4.with_la57(true);
        assert!(m4.is_canonical(0x0000_7fff_ffff_f000));
        assert!(m4.is_canonical(0xffff_8000_0000_0000));
        assert!(!m4.is_canonical(0x0000_8000_0000_0000));
        assert!(m5.is_canonical(0x0000_8000_0000_0000));
        assert!(m5.is_canonical(0xff00_0000_0000_0000));
        assert!(!m5.is_canonical(0x0100_0000_0000_0000));
    }

    #[test]
    fn mode_from_registers_requires_long_mode() {
        let cr0 = CR0_PG | CR0_WP;
        let cr4 = CR4_PAE | CR4_LA57 | CR4_SMEP;
        let m = PagingMode::from_registers(cr0, cr4, EFER_LMA | EFER_NXE, 46).unwrap();
        assert!(m.la57 && m.wp && m.smep && !m.smap && m.nxe);
        assert_eq!(m.levels(), 5);
        assert!(PagingMode::from_registers(CR0_WP, cr4, EFER_LMA, 46).is_err());
        assert!(PagingMode::from_registers(cr0, cr4, EFER_LMA, 60).is_err());
    }

    #[test]
    fn reserved_mask_covers_bits_above_maxphyaddr_and_nx_without_nxe() {
        let mut m = PagingMode {
            max_phys_bits: 40,
            ..PagingMode::default()
        };
        assert_eq!(m.reserved_mask(), 0x000f_ff00_0000_0000);
        m.nxe = false;
        assert_eq!(m.reserved_mask(), 0x000f_ff00_0000_0000 | PTE_NX);
    }
}
