//! Page hashing and the all-zero check.

use crate::PAGE_SIZE;

/// Hashes one page. The engine never merges on a hash match alone (every merge is
/// preceded by a byte-for-byte comparison), so a weak hasher only costs comparisons;
/// tests inject one to force collisions.
pub trait PageHasher: Send + Sync {
    /// Hash of a 4 KiB page.
    fn hash(&self, page: &[u8]) -> u64;
}

/// xxh3-64, ~200 ns per page from RAM.
#[derive(Clone, Copy, Debug, Default)]
pub struct Xxh3;

impl PageHasher for Xxh3 {
    #[inline]
    fn hash(&self, page: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(page)
    }
}

/// Hash the engine records for all-zero pages (they are never hashed).
pub const ZERO_HASH: u64 = 0;

/// True if the page is all zeros. Stops at the first non-zero 64-byte line, so on
/// non-zero pages it usually reads one cache line.
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    // SAFETY: pages are page aligned, so reading as u64 is aligned and in bounds.
    let words = unsafe { std::slice::from_raw_parts(page.as_ptr() as *const u64, PAGE_SIZE / 8) };
    if words[0] != 0 {
        return false;
    }
    for line in words.chunks_exact(8) {
        let acc = line.iter().fold(0u64, |a, &w| a | w);
        if acc != 0 {
            return false;
        }
    }
    true
}

/// Byte-for-byte equality of two pages.
#[inline]
pub fn pages_equal(a: &[u8], b: &[u8]) -> bool {
    a == b
}
