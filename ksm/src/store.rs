//! The canonical store of the remap backend: one memfd holding one copy of each merged
//! content. Region pages map store pages `MAP_FIXED|MAP_PRIVATE`, so a write gives the
//! writer a private copy (copy-on-write) and leaves the store and every other mapping as
//! they were. Each slot has a reference count (the region pages mapping it, unwritten);
//! a slot nobody maps any more is freed with `fallocate(PUNCH_HOLE)`, so the store never
//! leaks. Slots are handed out in increasing order, so pages merged in address order map
//! consecutive store pages and consecutive mappings become one VMA.

use std::io;
use std::os::fd::OwnedFd;

use crate::sys;
use crate::PAGE_SIZE;

/// Slot number meaning "none".
pub const NO_SLOT: u32 = u32::MAX;

/// The memfd store.
pub struct Store {
    fd: OwnedFd,
    view: *mut u8,
    cap: usize,
    next: u32,
    free: Vec<u32>,
    to_punch: Vec<u32>,
    /// Reference count of each slot.
    pub refs: Vec<u32>,
    /// Page hash of each slot's content.
    pub hash: Vec<u64>,
    /// Domain key of each slot.
    pub key: Vec<u32>,
    live: usize,
    punched: u64,
}

// SAFETY: the view pointer is only dereferenced through &self/&mut self methods, and the
// memory it points to is a shared mapping owned by the store.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// A store for up to `cap` distinct pages (sparse: it costs nothing until used).
    pub fn new(cap: usize) -> io::Result<Store> {
        let cap = cap.max(1);
        let fd = sys::memfd_create("memvirt-ksm-store", cap * PAGE_SIZE)?;
        let view = sys::map_shared(&fd, cap * PAGE_SIZE)?;
        Ok(Store {
            fd,
            view,
            cap,
            next: 0,
            free: Vec::new(),
            to_punch: Vec::new(),
            refs: Vec::with_capacity(cap.min(1 << 20)),
            hash: Vec::with_capacity(cap.min(1 << 20)),
            key: Vec::with_capacity(cap.min(1 << 20)),
            live: 0,
            punched: 0,
        })
    }

    /// The memfd.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Allocates a slot for content with `hash` in domain `key`; None if full.
    pub fn alloc(&mut self, hash: u64, key: u32) -> Option<u32> {
        let s = if (self.next as usize) < self.cap {
            self.next += 1;
            self.refs.push(0);
            self.hash.push(0);
            self.key.push(0);
            self.next - 1
        } else {
            self.free.pop()?
        };
        self.hash[s as usize] = hash;
        self.key[s as usize] = key;
        self.refs[s as usize] = 0;
        self.live += 1;
        Some(s)
    }

    /// The content of a slot.
    pub fn page(&self, s: u32) -> &[u8] {
        // SAFETY: s < cap; the view maps cap pages.
        unsafe { std::slice::from_raw_parts(self.view.add(s as usize * PAGE_SIZE), PAGE_SIZE) }
    }

    /// Copies `src` into slot `s`.
    ///
    /// # Safety
    /// No other thread may access slot `s` meanwhile.
    pub unsafe fn fill(&self, s: u32, src: *const u8) {
        std::ptr::copy_nonoverlapping(src, self.view.add(s as usize * PAGE_SIZE), PAGE_SIZE);
    }

    /// One more region page maps slot `s`.
    pub fn get(&mut self, s: u32) {
        self.refs[s as usize] += 1;
    }

    /// One region page no longer maps slot `s` (written, or remapped elsewhere). A slot
    /// reaching zero is queued for a hole punch.
    pub fn put(&mut self, s: u32) {
        let r = &mut self.refs[s as usize];
        debug_assert!(*r > 0);
        *r -= 1;
        if *r == 0 {
            self.to_punch.push(s);
        }
    }

    /// Queues a slot nobody ever mapped (all its merges failed verification).
    pub fn discard_if_unused(&mut self, s: u32) {
        if self.refs[s as usize] == 0 {
            self.to_punch.push(s);
        }
    }

    /// Punches holes for every slot queued by `put`/`discard_if_unused`, coalescing
    /// consecutive slots into one call; returns the slots freed (the caller drops them
    /// from its index before they are handed out again).
    pub fn flush_punches(&mut self) -> io::Result<Vec<u32>> {
        if self.to_punch.is_empty() {
            return Ok(Vec::new());
        }
        let mut v = std::mem::take(&mut self.to_punch);
        v.sort_unstable();
        v.dedup();
        v.retain(|&s| self.refs[s as usize] == 0);
        let mut i = 0;
        while i < v.len() {
            let mut j = i + 1;
            while j < v.len() && v[j] == v[j - 1] + 1 {
                j += 1;
            }
            sys::punch_hole(
                &self.fd,
                v[i] as u64 * PAGE_SIZE as u64,
                (j - i) as u64 * PAGE_SIZE as u64,
            )?;
            i = j;
        }
        let n = v.len();
        self.live -= n;
        self.punched += n as u64;
        self.free.extend(v.iter().rev());
        Ok(v)
    }

    /// Slots holding content that some page maps (or that were just filled).
    pub fn live_slots(&self) -> usize {
        self.live
    }

    /// Slots freed by hole punching so far.
    pub fn punched(&self) -> u64 {
        self.punched
    }

    /// Resident bytes of the store as the kernel accounts them (memfd st_blocks).
    pub fn resident_bytes(&self) -> u64 {
        sys::file_allocated_bytes(&self.fd).unwrap_or(0)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Region mappings keep their own reference on the memfd; only our view goes.
        // SAFETY: the view was mapped by new() with this length.
        let _ = unsafe { sys::munmap(self.view as usize, self.cap * PAGE_SIZE) };
    }
}
