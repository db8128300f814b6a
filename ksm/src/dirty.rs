//! Sources of "which pages were written since you last asked".
//!
//! The VMM answers from KVM's dirty log. For plain regions of this process the engine
//! brings [`UffdDirty`]: userfaultfd asynchronous write-protection (UFFD_FEATURE_WP_ASYNC,
//! Linux ≥ 6.7) read and re-armed atomically with the PAGEMAP_SCAN ioctl on
//! /proc/self/pagemap. Without a source the engine falls back to ksmd's rule: a page is
//! stable once its hash is unchanged across two passes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::region::{RegionId, RegionSpec};
use crate::sys::Pagemap;
use crate::PAGE_SIZE;

/// A dirty-page source supplied by the caller.
pub trait DirtySource: Send {
    /// Short name for reports.
    fn name(&self) -> &str;
    /// Starts tracking writes to `regions` (called once, before the first pass).
    fn arm(&mut self, regions: &[RegionSpec]) -> io::Result<()>;
    /// Appends to `out` the pages (numbered within the region) of `region` written since
    /// the last `collect` of that region (or since `arm`), and starts a new interval.
    /// Reporting a page that was not written is allowed (it is only rehashed); missing a
    /// written page is not.
    fn collect(&mut self, region: RegionId, out: &mut Vec<u32>) -> io::Result<()>;
    /// The engine replaced the mappings of pages `first..first+n` of `region` (remapped
    /// them to the store, or discarded them). Sources that track per mapping re-arm here.
    fn replaced(&mut self, _region: RegionId, _first: usize, _n: usize) -> io::Result<()> {
        Ok(())
    }
}

// ---- userfaultfd + PAGEMAP_SCAN --------------------------------------------------------

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;

const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// Dirty tracking of plain regions through userfaultfd async write-protect and
/// PAGEMAP_SCAN. Written pages that still read as the shared zero page, and file pages
/// of the store merely read into a mapping, are not reported.
pub struct UffdDirty {
    uffd: OwnedFd,
    pagemap: Pagemap,
    regions: Vec<(usize, usize)>,
    buf: Vec<PageRegion>,
}

fn ioctl<T>(fd: libc::c_int, req: libc::c_ulong, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: arg points to a live structure of the layout the request expects.
    let r = unsafe { libc::ioctl(fd, req, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl UffdDirty {
    /// Opens a userfaultfd with WP_ASYNC and WP_UNPOPULATED. Fails on kernels before 6.7,
    /// or where userfaultfd is not permitted to this process.
    pub fn new() -> io::Result<UffdDirty> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: plain system call.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) }
            as libc::c_int;
        if fd < 0 {
            // /dev/userfaultfd grants the same to processes with access to the device.
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")?;
            // SAFETY: ioctl with an integer argument.
            fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: fd is a new descriptor owned by nobody else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
        let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: want,
            ioctls: 0,
        };
        ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("UFFDIO_API with WP_ASYNC (needs Linux >= 6.7): {e}"),
            )
        })?;
        if api.features & want != want {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "userfaultfd lacks WP_ASYNC/WP_UNPOPULATED",
            ));
        }
        Ok(UffdDirty {
            uffd,
            pagemap: Pagemap::open()?,
            regions: Vec::new(),
            buf: vec![PageRegion::default(); 4096],
        })
    }

    fn register(&self, start: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("UFFDIO_REGISTER {start:#x}+{len:#x}: {e}"),
            )
        })?;
        Ok(())
    }

    fn write_protect(&self, start: usize, len: usize) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp)
            .map_err(|e| io::Error::new(e.kind(), format!("UFFDIO_WRITEPROTECT: {e}")))?;
        Ok(())
    }
}

impl DirtySource for UffdDirty {
    fn name(&self) -> &str {
        "uffd-wp+pagemap-scan"
    }

    fn arm(&mut self, regions: &[RegionSpec]) -> io::Result<()> {
        self.regions = regions.iter().map(|r| (r.addr, r.len)).collect();
        for r in regions {
            self.register(r.addr, r.len)?;
            self.write_protect(r.addr, r.len)?;
        }
        Ok(())
    }

    fn collect(&mut self, region: RegionId, out: &mut Vec<u32>) -> io::Result<()> {
        let (base, len) = self.regions[region];
        let end = (base + len) as u64;
        let mut start = base as u64;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                vec: self.buf.as_mut_ptr() as u64,
                vec_len: self.buf.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN | PAGE_IS_FILE | PAGE_IS_PFNZERO,
                ..Default::default()
            };
            let n = ioctl(self.pagemap.raw_fd(), PAGEMAP_SCAN, &mut arg)
                .map_err(|e| io::Error::new(e.kind(), format!("PAGEMAP_SCAN: {e}")))?
                as usize;
            for pr in &self.buf[..n] {
                if pr.categories & (PAGE_IS_FILE | PAGE_IS_PFNZERO) != 0 {
                    continue;
                }
                let a = ((pr.start - base as u64) / PAGE_SIZE as u64) as u32;
                let b = ((pr.end - base as u64) / PAGE_SIZE as u64) as u32;
                out.extend(a..b);
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(())
    }

    fn replaced(&mut self, region: RegionId, first: usize, n: usize) -> io::Result<()> {
        // New mappings are not registered yet; register them (the range may span
        // registered ones too). Their pages start unpopulated, which reads as not written.
        let (base, _) = self.regions[region];
        self.register(base + first * PAGE_SIZE, n * PAGE_SIZE)
    }
}
