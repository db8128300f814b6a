//! A buffer-backed machine for tests, workloads and benches: guest RAM described by a
//! [`MemoryMap`] inside a sparse host memory, an allocator of guest page-table pages inside
//! guest RAM, and an allocator of host table pages (for the EPT) outside it.

use crate::builder::{BuildError, BumpAllocator, EntryFormat, MapFlags, PageTableBuilder};
use crate::cache::CacheConfig;
use crate::mem::{BufferMemory, MapError, MemoryMap, MemoryRegion, VmMemory};
use crate::nested::{NestedConfig, NestedMmu, NestedTables};
use crate::paging::{PageSize, PagingMode};
use crate::shadow_mmu::{ShadowConfig, ShadowMmu};

/// Host-physical address where [`Machine::new`] puts guest RAM (1 GiB aligned, so every
/// guest 2 MiB page can be a host 2 MiB page).
pub const HOST_RAM_BASE: u64 = 1 << 32;

/// A machine cannot be laid out as asked.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The memory map is invalid.
    #[error("memory map: {0}")]
    Map(#[from] MapError),
    /// Building tables failed.
    #[error("building page tables: {0}")]
    Build(#[from] BuildError),
    /// The guest table area is not inside guest RAM.
    #[error("guest table area {start:#x}..{end:#x} is not inside guest RAM")]
    TableArea {
        /// Start of the area.
        start: u64,
        /// End of the area.
        end: u64,
    },
}

/// Guest memory, its host backing, and table allocators.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Guest memory (guest-physical view) and host memory.
    pub vm: VmMemory,
    /// Allocator of guest page-table pages (guest-physical addresses).
    pub guest_tables: BumpAllocator,
    /// Allocator of host table pages (host-physical addresses, outside guest RAM).
    pub host_tables: BumpAllocator,
    /// The guest's paging mode.
    pub mode: PagingMode,
}

impl Machine {
    /// One RAM region `[0, ram)` at host [`HOST_RAM_BASE`]; guest tables take the top
    /// `table_bytes` of RAM.
    pub fn new(ram: u64, table_bytes: u64, mode: PagingMode) -> Result<Self, MachineError> {
        let ram = (ram + 0x1f_ffff) & !0x1f_ffff;
        let map = MemoryMap::new(vec![MemoryRegion {
            gpa: 0,
            size: ram,
            hpa: HOST_RAM_BASE,
        }])?;
        let table_bytes = (table_bytes + 0xfff) & !0xfff;
        Self::from_map(map, ram.saturating_sub(table_bytes), ram, mode)
    }

    /// Guest RAM laid out by `map`; guest tables are allocated from `[tables_start,
    /// tables_end)`, which must lie in one region. Host memory covers every region plus an
    /// area after the highest one for host tables (sized for 4 KiB leaves over all RAM).
    pub fn from_map(
        map: MemoryMap,
        tables_start: u64,
        tables_end: u64,
        mode: PagingMode,
    ) -> Result<Self, MachineError> {
        let in_ram = map.regions().iter().any(|r| {
            tables_start >= r.gpa && tables_end <= r.gpa + r.size && tables_start < tables_end
        });
        if !in_ram {
            return Err(MachineError::TableArea {
                start: tables_start,
                end: tables_end,
            });
        }
        let lo = map.regions().iter().map(|r| r.hpa).min().unwrap_or(0) & !0xfff;
        let hi = map
            .regions()
            .iter()
            .map(|r| r.hpa + r.size)
            .max()
            .unwrap_or(0);
        let host_table_bytes = (map.total_size() / 4096 * 8) * 2 + (512 << 12);
        let host_tables_start = (hi + 0x1f_ffff) & !0x1f_ffff;
        let host_end = host_tables_start + host_table_bytes;
        let host = BufferMemory::new(lo, host_end - lo);
        let vm = VmMemory::new(map, host).map_err(|_| MachineError::TableArea {
            start: lo,
            end: host_end,
        })?;
        Ok(Machine {
            vm,
            guest_tables: BumpAllocator::new(tables_start, tables_end),
            host_tables: BumpAllocator::new(host_tables_start, host_end),
            mode,
        })
    }

    /// A new, empty guest address space (its root table allocated and zeroed).
    pub fn new_address_space(&mut self) -> Result<PageTableBuilder, MachineError> {
        Ok(PageTableBuilder::new(
            &mut self.vm,
            &mut self.guest_tables,
            self.mode.levels(),
            EntryFormat::X86,
        )?)
    }

    /// Maps `va` → `gpa` in the address space `pt`.
    pub fn map(
        &mut self,
        pt: &PageTableBuilder,
        va: u64,
        gpa: u64,
        size: PageSize,
        flags: MapFlags,
    ) -> Result<(), MachineError> {
        pt.map(&mut self.vm, &mut self.guest_tables, va, gpa, size, flags)?;
        Ok(())
    }

    /// Builds EPT tables of `levels` levels with `host_page` leaves for all guest RAM.
    pub fn build_nested(
        &mut self,
        levels: u8,
        host_page: PageSize,
    ) -> Result<NestedTables, MachineError> {
        self.build_nested_as(levels, host_page, EntryFormat::Ept)
    }

    /// Builds host tables in `format` (EPT, or x86 format as AMD NPT uses).
    pub fn build_nested_as(
        &mut self,
        levels: u8,
        host_page: PageSize,
        format: EntryFormat,
    ) -> Result<NestedTables, MachineError> {
        let map = self.vm.map().clone();
        Ok(NestedTables::build(
            self.vm.host_mut(),
            &mut self.host_tables,
            &map,
            levels,
            host_page,
            format,
        )?)
    }

    /// A nested MMU over freshly built EPT tables (host depth = guest depth).
    pub fn nested_mmu(
        &mut self,
        host_page: PageSize,
        caches: CacheConfig,
        cr3: u64,
    ) -> Result<NestedMmu, MachineError> {
        let ept = self.build_nested(self.mode.levels(), host_page)?;
        Ok(NestedMmu::new(
            NestedConfig {
                guest_mode: self.mode,
                caches,
            },
            ept,
            cr3,
        ))
    }

    /// A shadow MMU for this machine's memory map.
    pub fn shadow_mmu(
        &self,
        host_page: PageSize,
        caches: CacheConfig,
        unsync: bool,
        cr3: u64,
    ) -> ShadowMmu {
        ShadowMmu::new(
            ShadowConfig {
                guest_mode: self.mode,
                host_page,
                caches,
                unsync,
            },
            self.vm.map().clone(),
            cr3,
        )
    }
}
