//! Guest memory: mmap-backed regions (vm-memory) with a choice of backing.
//!
//! Each guest gets one region at guest-physical 0. The backing decides what the
//! host kernel sees: private anonymous memory (`anon`, the default, with
//! `MAP_NORESERVE` so untouched guest RAM costs nothing), a shared memfd (`memfd`,
//! accounted as Shmem), or reserved huge pages (`hugetlb`). Transparent huge pages
//! are requested or refused per region with `madvise`. Other crates (the `ksm`
//! engine, tests) see regions through [`RegionInfo`].

use crate::units::{format_bytes, PAGE_SIZE};
use std::fs::File;
use std::os::fd::FromRawFd;
use thiserror::Error;
use vm_memory::{
    mmap::MmapRegionBuilder, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

/// How guest RAM is backed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE.
    Anon,
    /// A memfd mapped MAP_SHARED.
    Memfd,
    /// MAP_HUGETLB from the pool reserved in /proc/sys/vm/nr_hugepages.
    Hugetlb,
}

/// Transparent-huge-page advice for guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Thp {
    /// madvise(MADV_HUGEPAGE).
    On,
    /// madvise(MADV_NOHUGEPAGE).
    Off,
}

/// Guest memory that could not be set up.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Size zero or not page-aligned.
    #[error("guest memory size {size} bytes is invalid: expected a non-zero multiple of 4 KiB")]
    BadSize {
        /// The size requested.
        size: u64,
    },
    /// Larger than the host could ever back.
    #[error("guest memory size {size} is larger than the host can map: expected at most {limit} per guest ({why})")]
    TooLarge {
        /// The size requested, formatted.
        size: String,
        /// The limit, formatted.
        limit: String,
        /// Where the limit comes from.
        why: String,
    },
    /// No huge pages reserved.
    #[error("--backing hugetlb needs {needed} free 2 MiB huge pages but /proc/sys/vm/nr_hugepages reserves {total} ({free} free); reserve them first, e.g. `echo {needed} > /proc/sys/vm/nr_hugepages`")]
    NoHugePages {
        /// Pages needed.
        needed: u64,
        /// Pages reserved.
        total: u64,
        /// Pages free.
        free: u64,
    },
    /// memfd_create failed.
    #[error("memfd_create for guest memory failed: {0}")]
    Memfd(std::io::Error),
    /// ftruncate of the memfd failed.
    #[error("sizing the guest memfd to {size} bytes failed")]
    Truncate {
        /// Size requested.
        size: u64,
        /// What the OS said.
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("mmap of {size} of guest memory failed")]
    Mmap {
        /// Size requested, formatted.
        size: String,
        /// What vm-memory said.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// madvise failed.
    #[error("madvise({advice}) on guest memory failed")]
    Madvise {
        /// The advice.
        advice: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// vm-memory refused the region layout.
    #[error("guest memory layout rejected: {0}")]
    Layout(String),
}

/// Where a guest memory region lives: enough for another crate to scan or remap it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RegionInfo {
    /// Guest-physical base address.
    pub guest_base: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// The largest guest RAM one guest may have on this host: the host's physical memory
/// (guests here are not backed by swap; there is none) capped by what the built-in
/// guest's page tables can map.
pub fn max_guest_mem() -> (u64, String) {
    let total = crate::host::mem_total_bytes().unwrap_or(u64::MAX);
    let layout_cap = crate::guest::layout::MAX_IDENTITY_MAP;
    if total <= layout_cap {
        (total, "MemTotal in /proc/meminfo".into())
    } else {
        (layout_cap, "the built-in guest's identity map".into())
    }
}

/// Checks a guest memory size before anything is mapped.
pub fn validate_size(size: u64) -> Result<(), MemoryError> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::BadSize { size });
    }
    let (limit, why) = max_guest_mem();
    if size > limit {
        return Err(MemoryError::TooLarge {
            size: format_bytes(size),
            limit: format_bytes(limit),
            why,
        });
    }
    Ok(())
}

const HUGE_2M: u64 = 2 << 20;

fn read_hugepages(field: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{field}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Maps `size` bytes of guest RAM at guest-physical 0 with the given backing.
pub fn create_guest_memory(
    size: u64,
    backing: Backing,
    thp: Option<Thp>,
) -> Result<GuestMemoryMmap, MemoryError> {
    validate_size(size)?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let builder = MmapRegionBuilder::new(size as usize).with_mmap_prot(prot);
    let builder = match backing {
        Backing::Anon => {
            builder.with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        }
        Backing::Memfd => {
            let file = memfd(size)?;
            builder
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::new(file, 0))
        }
        Backing::Hugetlb => {
            let needed = size.div_ceil(HUGE_2M);
            let (total, free) = (
                read_hugepages("nr_hugepages"),
                read_hugepages("free_hugepages"),
            );
            if free < needed || !size.is_multiple_of(HUGE_2M) {
                return Err(MemoryError::NoHugePages {
                    needed,
                    total,
                    free,
                });
            }
            builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB)
                .with_hugetlbfs(true)
        }
    };
    let region = builder.build().map_err(|source| MemoryError::Mmap {
        size: format_bytes(size),
        source,
    })?;
    if let (Some(thp), false) = (thp, backing == Backing::Hugetlb) {
        let (advice, name) = match thp {
            Thp::On => (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
            Thp::Off => (libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE"),
        };
        // SAFETY: the range is exactly the mapping vm-memory just created and owns.
        let rc = unsafe { libc::madvise(region.as_ptr().cast(), size as usize, advice) };
        if rc != 0 {
            return Err(MemoryError::Madvise {
                advice: name,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| MemoryError::Layout("region wraps the address space".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::Layout(e.to_string()))
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"memvirt-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    Ok(file)
}

/// Copies `bytes` into guest memory at `gpa` the way a boot loader would, but fast:
/// several threads each populate their chunk of the destination with one
/// `MADV_POPULATE_WRITE` call (one kernel entry instead of a page fault per 4 KiB;
/// first touch of fresh host memory is the bound here) and then copy into it.
pub fn load_bytes(mem: &GuestMemoryMmap, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
    use rayon::prelude::*;
    use vm_memory::Bytes;
    const CHUNK: usize = 4 << 20;
    let len = bytes.len();
    if len == 0 {
        return Ok(());
    }
    if !mem.check_range(GuestAddress(gpa), len) {
        return Err(MemoryError::Layout(format!(
            "{len} bytes at guest-physical {gpa:#x} lie outside guest memory"
        )));
    }
    bytes
        .par_chunks(CHUNK)
        .enumerate()
        .try_for_each(|(i, chunk)| {
            let at = GuestAddress(gpa + (i * CHUNK) as u64);
            if let Ok(host) = mem.get_host_address(at) {
                let start = (host as usize) & !(PAGE_SIZE as usize - 1);
                let end = (host as usize + chunk.len()).next_multiple_of(PAGE_SIZE as usize);
                // SAFETY: [start, end) lies within the guest's mapping (range checked
                // above; a region is one mapping); populating changes no contents.
                // Failure (kernels before 5.14) only loses the speed-up.
                unsafe {
                    libc::madvise(
                        start as *mut libc::c_void,
                        end - start,
                        libc::MADV_POPULATE_WRITE,
                    )
                };
            }
            mem.write_slice(chunk, at)
        })
        .map_err(|e| MemoryError::Layout(e.to_string()))
}

/// The regions of a guest memory, for other crates.
pub fn regions(mem: &GuestMemoryMmap) -> Vec<RegionInfo> {
    mem.iter()
        .map(|r| RegionInfo {
            guest_base: r.start_addr().0,
            host_addr: r.as_ptr() as u64,
            size: r.len(),
        })
        .collect()
}

/// Which pages of a region are resident in host memory (mincore), one bool per 4 KiB.
pub fn resident_pages(region: &RegionInfo) -> std::io::Result<Vec<bool>> {
    let pages = (region.size / PAGE_SIZE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: host_addr/size describe a live mapping owned by the guest memory, and
    // vec has one byte per page as mincore requires.
    let rc = unsafe {
        libc::mincore(
            region.host_addr as *mut libc::c_void,
            region.size as usize,
            vec.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(validate_size(0), Err(MemoryError::BadSize { .. })));
        assert!(matches!(
            validate_size(4097),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            validate_size(1 << 50),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn anon_and_memfd_backings_work_and_start_unpopulated() {
        for backing in [Backing::Anon, Backing::Memfd] {
            let mem = create_guest_memory(8 << 20, backing, Some(Thp::Off)).unwrap();
            let info = regions(&mem)[0];
            assert_eq!(info.size, 8 << 20);
            assert_eq!(
                resident_pages(&info)
                    .unwrap()
                    .iter()
                    .filter(|r| **r)
                    .count(),
                0
            );
            mem.write_obj(0xabcd_u64, GuestAddress(0x5000)).unwrap();
            assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0xabcd);
            let resident = resident_pages(&info).unwrap();
            assert!(resident[5]);
            assert_eq!(resident.iter().filter(|r| **r).count(), 1, "{backing:?}");
        }
    }

    #[test]
    fn hugetlb_without_reserved_pages_names_nr_hugepages() {
        if read_hugepages("free_hugepages") >= 4 {
            println!("skipped: this host has huge pages reserved");
            return;
        }
        let err = create_guest_memory(8 << 20, Backing::Hugetlb, None).unwrap_err();
        assert!(
            err.to_string().contains("/proc/sys/vm/nr_hugepages"),
            "{err}"
        );
    }
}
