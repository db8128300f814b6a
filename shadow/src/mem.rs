//! Physical memory as the MMU sees it: a small read trait ([`GuestPhysMemory`]) and a write
//! trait ([`GuestPhysMemoryMut`]) that a VMM implements over its guest memory, plus the
//! buffer-backed implementations used by tests, workloads and benches:
//!
//! - [`BufferMemory`]: one flat physical address space `[base, base + size)` backed sparsely by
//!   4 KiB pages allocated on first write (unwritten pages read as zero), so a 4 GiB guest
//!   costs only the pages that hold page tables.
//! - [`MemoryMap`]: guest-physical ranges → host-physical addresses (the VMM's memslots).
//! - [`VmMemory`]: a host [`BufferMemory`] plus a [`MemoryMap`]; read as guest-physical memory
//!   it goes through the map, and the nested model reads the very same bytes at their host
//!   addresses through [`VmMemory::host`].
//! - [`RecordingMemory`]: a wrapper that logs every address written, so the writes a
//!   page-table edit made can be fed to `ShadowMmu::notify_write`.

/// A physical access that memory cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// No memory at this address.
    #[error("physical address {addr:#x} is outside memory")]
    OutOfRange {
        /// The address asked for.
        addr: u64,
    },
    /// Page-table entries are 8-byte aligned; this address is not.
    #[error("physical address {addr:#x} is not 8-byte aligned")]
    Misaligned {
        /// The address asked for.
        addr: u64,
    },
}

/// Read access to physical memory, 8 bytes at a time (little-endian, as x86 tables are).
///
/// Implement this over the VMM's guest memory to run the walker on a live guest; every
/// address outside memory must return [`MemError::OutOfRange`].
pub trait GuestPhysMemory {
    /// Reads the 8-byte little-endian value at physical address `addr` (8-byte aligned).
    fn read_u64(&self, addr: u64) -> Result<u64, MemError>;
}

/// Write access to physical memory (page-table builders and accessed/dirty updates).
pub trait GuestPhysMemoryMut: GuestPhysMemory {
    /// Writes the 8-byte little-endian value `value` at physical address `addr`.
    fn write_u64(&mut self, addr: u64, value: u64) -> Result<(), MemError>;

    /// Zeroes the 4 KiB page containing `addr`.
    fn zero_page(&mut self, addr: u64) -> Result<(), MemError> {
        let base = addr & !0xfff;
        for i in 0..512 {
            self.write_u64(base + i * 8, 0)?;
        }
        Ok(())
    }
}

impl<T: GuestPhysMemory + ?Sized> GuestPhysMemory for &T {
    #[inline(always)]
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        (**self).read_u64(addr)
    }
}

impl<T: GuestPhysMemory + ?Sized> GuestPhysMemory for &mut T {
    #[inline(always)]
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        (**self).read_u64(addr)
    }
}

impl<T: GuestPhysMemoryMut + ?Sized> GuestPhysMemoryMut for &mut T {
    #[inline(always)]
    fn write_u64(&mut self, addr: u64, value: u64) -> Result<(), MemError> {
        (**self).write_u64(addr, value)
    }
    fn zero_page(&mut self, addr: u64) -> Result<(), MemError> {
        (**self).zero_page(addr)
    }
}

const NO_PAGE: u32 = u32::MAX;

/// A flat physical address space `[base, base + size)` backed by 4 KiB pages that are
/// allocated on first write; pages never written read as zero.
#[derive(Debug, Clone)]
pub struct BufferMemory {
    base: u64,
    size: u64,
    /// Frame number (relative to `base`) → index into `pages`, or `NO_PAGE`.
    frames: Vec<u32>,
    pages: Vec<[u64; 512]>,
}

impl BufferMemory {
    /// An all-zero memory covering `[base, base + size)`; `base` and `size` are rounded to
    /// 4 KiB. Costs 4 bytes per 4 KiB of `size` until pages are written.
    pub fn new(base: u64, size: u64) -> Self {
        let base = base & !0xfff;
        let size = (size + 0xfff) & !0xfff;
        BufferMemory {
            base,
            size,
            frames: vec![NO_PAGE; (size >> 12) as usize],
            pages: Vec::new(),
        }
    }

    /// First address of this memory.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size of this memory in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether `addr` lies inside this memory.
    pub fn contains(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.base) < self.size
    }

    /// Number of 4 KiB pages that have been written (and so hold storage).
    pub fn backed_pages(&self) -> usize {
        self.pages.len()
    }

    #[inline(always)]
    fn locate(&self, addr: u64) -> Result<(usize, usize), MemError> {
        let off = addr.wrapping_sub(self.base);
        if off >= self.size {
            return Err(MemError::OutOfRange { addr });
        }
        if addr & 7 != 0 {
            return Err(MemError::Misaligned { addr });
        }
        Ok(((off >> 12) as usize, ((off >> 3) & 0x1ff) as usize))
    }
}

impl GuestPhysMemory for BufferMemory {
    #[inline(always)]
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        let (frame, slot) = self.locate(addr)?;
        let page = self.frames[frame];
        if page == NO_PAGE {
            return Ok(0);
        }
        Ok(self.pages[page as usize][slot])
    }
}

impl GuestPhysMemoryMut for BufferMemory {
    #[inline(always)]
    fn write_u64(&mut self, addr: u64, value: u64) -> Result<(), MemError> {
        let (frame, slot) = self.locate(addr)?;
        let mut page = self.frames[frame];
        if page == NO_PAGE {
            if value == 0 {
                return Ok(());
            }
            page = self.pages.len() as u32;
            self.pages.push([0; 512]);
            self.frames[frame] = page;
        }
        self.pages[page as usize][slot] = value;
        Ok(())
    }

    fn zero_page(&mut self, addr: u64) -> Result<(), MemError> {
        let (frame, _) = self.locate(addr & !7)?;
        let page = self.frames[frame];
        if page != NO_PAGE {
            self.pages[page as usize] = [0; 512];
        }
        Ok(())
    }
}

/// One guest-physical range backed by host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Host-physical address backing `gpa`.
    pub hpa: u64,
}

/// A region given to [`MemoryMap::new`] is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Start, size or host address not 4 KiB aligned, or size zero.
    #[error(
        "memory region gpa={gpa:#x} size={size:#x} hpa={hpa:#x} is empty or not 4 KiB aligned"
    )]
    Unaligned {
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Host-physical start.
        hpa: u64,
    },
    /// Two regions overlap in guest-physical space.
    #[error("memory regions at gpa {first:#x} and {second:#x} overlap")]
    Overlap {
        /// Lower region start.
        first: u64,
        /// Upper region start.
        second: u64,
    },
}

/// The guest memory map: guest-physical ranges and the host-physical addresses behind them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMap {
    regions: Vec<MemoryRegion>,
}

impl MemoryMap {
    /// A map of non-overlapping, 4 KiB-aligned regions (sorted here by guest address).
    pub fn new(mut regions: Vec<MemoryRegion>) -> Result<Self, MapError> {
        for r in &regions {
            if r.size == 0
                || (r.gpa | r.size | r.hpa) & 0xfff != 0
                || r.gpa.checked_add(r.size).is_none()
            {
                return Err(MapError::Unaligned {
                    gpa: r.gpa,
                    size: r.size,
                    hpa: r.hpa,
                });
            }
        }
        regions.sort_by_key(|r| r.gpa);
        for w in regions.windows(2) {
            if w[0].gpa + w[0].size > w[1].gpa {
                return Err(MapError::Overlap {
                    first: w[0].gpa,
                    second: w[1].gpa,
                });
            }
        }
        Ok(MemoryMap { regions })
    }

    /// The regions, sorted by guest-physical address.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// Host-physical address of `gpa`, or `None` outside every region.
    #[inline(always)]
    pub fn gpa_to_hpa(&self, gpa: u64) -> Option<u64> {
        for r in &self.regions {
            let off = gpa.wrapping_sub(r.gpa);
            if off < r.size {
                return Some(r.hpa + off);
            }
        }
        None
    }

    /// Whether the `len` bytes from `gpa` lie in one region and map to host memory that is
    /// contiguous and aligned to `align` (a power of two; used to choose large host pages).
    pub fn maps_contiguously(&self, gpa: u64, len: u64, align: u64) -> bool {
        self.regions.iter().any(|r| {
            gpa >= r.gpa
                && gpa + len <= r.gpa + r.size
                && (r.hpa + (gpa - r.gpa)) & (align - 1) == 0
        })
    }

    /// Total bytes of guest memory.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

/// Guest memory the way a VMM holds it: host memory plus the map from guest-physical to
/// host-physical addresses. As a [`GuestPhysMemory`] it serves guest-physical addresses
/// (outside the map: [`MemError::OutOfRange`]); [`VmMemory::host`] serves host-physical ones.
#[derive(Debug, Clone)]
pub struct VmMemory {
    map: MemoryMap,
    host: BufferMemory,
}

impl VmMemory {
    /// Guest memory laid out by `map` inside `host`. Every region must lie inside `host`.
    pub fn new(map: MemoryMap, host: BufferMemory) -> Result<Self, MemError> {
        for r in map.regions() {
            if !host.contains(r.hpa) || !host.contains(r.hpa + r.size - 1) {
                return Err(MemError::OutOfRange { addr: r.hpa });
            }
        }
        Ok(VmMemory { map, host })
    }

    /// The guest memory map.
    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// Host physical memory (guest RAM at its host addresses, plus anything else the host
    /// keeps there, such as EPT tables).
    pub fn host(&self) -> &BufferMemory {
        &self.host
    }

    /// Mutable host physical memory.
    pub fn host_mut(&mut self) -> &mut BufferMemory {
        &mut self.host
    }
}

impl GuestPhysMemory for VmMemory {
    #[inline(always)]
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        let hpa = self
            .map
            .gpa_to_hpa(addr)
            .ok_or(MemError::OutOfRange { addr })?;
        self.host.read_u64(hpa)
    }
}

impl GuestPhysMemoryMut for VmMemory {
    fn write_u64(&mut self, addr: u64, value: u64) -> Result<(), MemError> {
        let hpa = self
            .map
            .gpa_to_hpa(addr)
            .ok_or(MemError::OutOfRange { addr })?;
        self.host.write_u64(hpa, value)
    }
    fn zero_page(&mut self, addr: u64) -> Result<(), MemError> {
        let hpa = self
            .map
            .gpa_to_hpa(addr)
            .ok_or(MemError::OutOfRange { addr })?;
        self.host.zero_page(hpa)
    }
}

/// Wraps a memory and records every address written through it (one entry per
/// `write_u64`, 512 per zeroed page: every entry of it changed), in order.
#[derive(Debug)]
pub struct RecordingMemory<'a, M: ?Sized> {
    inner: &'a mut M,
    writes: Vec<u64>,
}

impl<'a, M: GuestPhysMemoryMut + ?Sized> RecordingMemory<'a, M> {
    /// Starts recording writes to `inner`.
    pub fn new(inner: &'a mut M) -> Self {
        RecordingMemory {
            inner,
            writes: Vec::new(),
        }
    }

    /// The addresses written so far.
    pub fn writes(&self) -> &[u64] {
        &self.writes
    }

    /// Stops recording and returns the addresses written.
    pub fn into_writes(self) -> Vec<u64> {
        self.writes
    }
}

impl<M: GuestPhysMemoryMut + ?Sized> GuestPhysMemory for RecordingMemory<'_, M> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.inner.read_u64(addr)
    }
}

impl<M: GuestPhysMemoryMut + ?Sized> GuestPhysMemoryMut for RecordingMemory<'_, M> {
    fn write_u64(&mut self, addr: u64, value: u64) -> Result<(), MemError> {
        self.inner.write_u64(addr, value)?;
        self.writes.push(addr);
        Ok(())
    }
    fn zero_page(&mut self, addr: u64) -> Result<(), MemError> {
        self.inner.zero_page(addr)?;
        let base = addr & !0xfff;
        self.writes.extend((0..512).map(|i| base + i * 8));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_memory_is_sparse_zero_and_bounded() {
        let mut m = BufferMemory::new(0x10_0000, 0x1000_0000);
        assert_eq!(m.read_u64(0x10_0000).unwrap(), 0);
        assert_eq!(m.backed_pages(), 0);
        m.write_u64(0x20_0008, 0xdead).unwrap();
        assert_eq!(m.read_u64(0x20_0008).unwrap(), 0xdead);
        assert_eq!(m.backed_pages(), 1);
        assert_eq!(
            m.read_u64(0xf_fff8),
            Err(MemError::OutOfRange { addr: 0xf_fff8 })
        );
        assert_eq!(
            m.read_u64(0x1010_0000),
            Err(MemError::OutOfRange { addr: 0x1010_0000 })
        );
        assert_eq!(
            m.read_u64(0x20_0004),
            Err(MemError::Misaligned { addr: 0x20_0004 })
        );
        m.zero_page(0x20_0ff8).unwrap();
        assert_eq!(m.read_u64(0x20_0008).unwrap(), 0);
    }

    #[test]
    fn memory_map_rejects_bad_regions_and_translates() {
        let r = |gpa, size, hpa| MemoryRegion { gpa, size, hpa };
        assert!(matches!(
            MemoryMap::new(vec![r(0, 0x1234, 0)]),
            Err(MapError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryMap::new(vec![r(0, 0x2000, 0), r(0x1000, 0x1000, 0x10000)]),
            Err(MapError::Overlap { .. })
        ));
        let map = MemoryMap::new(vec![
            r(0x10_0000, 0x10_0000, 0x4000_0000),
            r(0, 0x1000, 0x8000),
        ])
        .unwrap();
        assert_eq!(map.gpa_to_hpa(0x10_0010), Some(0x4000_0010));
        assert_eq!(map.gpa_to_hpa(0x0ff8), Some(0x8ff8));
        assert_eq!(map.gpa_to_hpa(0x2000), None);
        assert!(map.maps_contiguously(0x10_0000, 0x10_0000, 0x10_0000));
        assert!(!map.maps_contiguously(0x10_0000, 0x20_0000, 0x1000));
    }

    #[test]
    fn vm_memory_reads_guest_bytes_at_host_addresses() {
        let map = MemoryMap::new(vec![MemoryRegion {
            gpa: 0,
            size: 0x10_0000,
            hpa: 0x40_0000,
        }])
        .unwrap();
        let mut vm = VmMemory::new(map, BufferMemory::new(0, 0x100_0000)).unwrap();
        vm.write_u64(0x1008, 7).unwrap();
        assert_eq!(vm.host().read_u64(0x40_1008).unwrap(), 7);
        assert_eq!(
            vm.read_u64(0x10_0000),
            Err(MemError::OutOfRange { addr: 0x10_0000 })
        );
        let mut rec = RecordingMemory::new(&mut vm);
        rec.write_u64(0x2000, 1).unwrap();
        rec.zero_page(0x3008).unwrap();
        let w = rec.into_writes();
        assert_eq!(w.len(), 513);
        assert_eq!((w[0], w[1], w[512]), (0x2000, 0x3000, 0x3ff8));
    }
}
