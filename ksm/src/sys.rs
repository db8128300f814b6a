//! Thin wrappers over the Linux primitives the engine uses: mmap/madvise/fallocate on
//! memfds, /proc/self/pagemap, /proc/self/smaps_rollup, /proc/self/maps, per-thread CPU
//! time. Everything here is a direct system call or a /proc read; nothing is cached.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::PAGE_SIZE;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Creates an anonymous memory file (memfd) of `len` bytes (sparse).
pub fn memfd_create(name: &str, len: usize) -> io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain system call with a valid C string.
    let fd = cvt(unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
    Ok(fd)
}

/// Maps `len` bytes of `fd` at `offset` copy-on-write over `addr` (MAP_FIXED|MAP_PRIVATE).
///
/// # Safety
/// `addr..addr+len` must be memory the caller owns and may replace.
pub unsafe fn map_private_fixed(
    addr: usize,
    len: usize,
    fd: &OwnedFd,
    offset: u64,
) -> io::Result<()> {
    let p = libc::mmap(
        addr as *mut libc::c_void,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_FIXED,
        fd.as_raw_fd(),
        offset as libc::off_t,
    );
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Replaces `addr..addr+len` with fresh anonymous private memory (reads as zero).
///
/// # Safety
/// `addr..addr+len` must be memory the caller owns and may replace.
pub unsafe fn map_anon_fixed(addr: usize, len: usize) -> io::Result<()> {
    let p = libc::mmap(
        addr as *mut libc::c_void,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
        -1,
        0,
    );
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps the whole of `fd` shared, read-write (the engine's view of its store).
pub fn map_shared(fd: &OwnedFd, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a new mapping at an address of the kernel's choice.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as *mut u8)
}

/// Allocates `len` bytes of private anonymous memory (for workloads and tests).
pub fn map_anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: a new mapping at an address of the kernel's choice.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as *mut u8)
}

/// Unmaps `addr..addr+len`.
///
/// # Safety
/// Nobody may use the range afterwards.
pub unsafe fn munmap(addr: usize, len: usize) -> io::Result<()> {
    cvt(libc::munmap(addr as *mut libc::c_void, len)).map(|_| ())
}

/// `madvise(addr, len, advice)`.
///
/// # Safety
/// The advice must be one the caller may apply to the range (e.g. MADV_DONTNEED discards
/// its content).
pub unsafe fn madvise(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    cvt(libc::madvise(addr as *mut libc::c_void, len, advice)).map(|_| ())
}

/// Frees store pages: `fallocate(PUNCH_HOLE|KEEP_SIZE)`.
pub fn punch_hole(fd: &OwnedFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain system call on an fd we own.
    cvt(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(|_| ())
}

/// Bytes of memory a file holds (st_blocks × 512): the store's resident size.
pub fn file_allocated_bytes(fd: &OwnedFd) -> io::Result<u64> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_blocks as u64 * 512)
}

/// Reader of /proc/self/pagemap.
pub struct Pagemap {
    file: File,
}

/// Bit 63 of a pagemap entry: page present.
pub const PM_PRESENT: u64 = 1 << 63;
/// Bit 62 of a pagemap entry: page swapped out.
pub const PM_SWAP: u64 = 1 << 62;
/// Bit 61: page is a file page or shared anonymous.
pub const PM_FILE: u64 = 1 << 61;

impl Pagemap {
    /// Opens /proc/self/pagemap.
    pub fn open() -> io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// Raw fd (for the PAGEMAP_SCAN ioctl).
    pub fn raw_fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }

    /// Reads the entries of `n` pages starting at `addr` into `out`.
    pub fn read(&self, addr: usize, n: usize, out: &mut Vec<u64>) -> io::Result<()> {
        out.clear();
        out.resize(n, 0);
        // SAFETY: u64 slice reinterpreted as bytes of the same length.
        let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, n * 8) };
        self.file
            .read_exact_at(bytes, (addr / PAGE_SIZE) as u64 * 8)
    }
}

/// Memory of this process as the kernel accounts it (/proc/self/smaps_rollup), in bytes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Rollup {
    pub rss: u64,
    pub pss: u64,
    pub pss_anon: u64,
    pub pss_file: u64,
    pub pss_shmem: u64,
    pub anonymous: u64,
    pub ksm: u64,
}

/// Reads /proc/self/smaps_rollup.
pub fn smaps_rollup() -> io::Result<Rollup> {
    let mut s = String::with_capacity(2048);
    File::open("/proc/self/smaps_rollup")?.read_to_string(&mut s)?;
    let mut r = Rollup::default();
    for line in s.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0) * 1024;
        match k {
            "Rss:" => r.rss = v,
            "Pss:" => r.pss = v,
            "Pss_Anon:" => r.pss_anon = v,
            "Pss_File:" => r.pss_file = v,
            "Pss_Shmem:" => r.pss_shmem = v,
            "Anonymous:" => r.anonymous = v,
            "KSM:" => r.ksm = v,
            _ => {}
        }
    }
    Ok(r)
}

/// Number of mappings (VMAs) of this process: lines of /proc/self/maps.
pub fn map_count() -> io::Result<usize> {
    let mut f = File::open("/proc/self/maps")?;
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|&&b| b == b'\n').count();
    }
    Ok(n)
}

/// Reads an integer from a /proc or /sys file.
pub fn read_u64(path: &str) -> io::Result<u64> {
    let s = std::fs::read_to_string(path)?;
    s.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: not an integer: {s:?}"),
        )
    })
}

/// Clock ticks per second for /proc/*/stat times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a /proc/.../stat file, in seconds.
pub fn stat_cpu_seconds(path: &str) -> io::Result<f64> {
    let s = std::fs::read_to_string(path)?;
    // The command name (field 2) may contain spaces; fields after the last ')'.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ut: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0);
    let st: u64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    Ok((ut + st) as f64 / clock_ticks())
}

/// CPU seconds of one thread of this process (/proc/self/task/TID/stat).
pub fn thread_cpu_seconds(tid: i32) -> f64 {
    stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat")).unwrap_or(0.0)
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() }
}

/// Pid of the kernel's ksmd thread, if any.
pub fn ksmd_pid() -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            if comm.trim() == "ksmd" {
                return Some(pid);
            }
        }
    }
    None
}

/// CPU seconds used so far by ksmd (0 if absent).
pub fn ksmd_cpu_seconds() -> f64 {
    ksmd_pid()
        .and_then(|p| stat_cpu_seconds(&format!("/proc/{p}/stat")).ok())
        .unwrap_or(0.0)
}

/// /proc/self/ksm_stat as (key, value) pairs.
pub fn ksm_stat() -> Vec<(String, i64)> {
    let Ok(s) = std::fs::read_to_string("/proc/self/ksm_stat") else {
        return Vec::new();
    };
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// Resident memory counters of this process from /proc/self/status (O(1) to read,
/// unlike smaps_rollup which walks every page table): (RssAnon, RssFile, RssShmem) bytes.
pub fn status_rss() -> io::Result<(u64, u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let mut v = (0, 0, 0);
    for line in s.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(n)) = (it.next(), it.next()) else {
            continue;
        };
        let n: u64 = n.parse().unwrap_or(0) * 1024;
        match k {
            "RssAnon:" => v.0 = n,
            "RssFile:" => v.1 = n,
            "RssShmem:" => v.2 = n,
            _ => {}
        }
    }
    Ok(v)
}
