//! The engine's content index: an open-addressing hash table from (domain, page hash) to
//! candidates, which are either store slots (merged content, ksm.c's "stable tree") or
//! unmerged pages that nobody matched yet (its "unstable tree", kept across passes so an
//! incremental pass only looks up the pages that were written).
//!
//! Several entries may share a key (hash collisions, or a weak injected hasher): lookups
//! walk the whole probe run, and every match is verified byte for byte before a merge.

/// An index entry's value: an unmerged page or a store slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Global page number of an unmerged page.
    Page(u32),
    /// Store slot.
    Slot(u32),
}

const EMPTY: u32 = u32::MAX;
const TOMB: u32 = u32::MAX - 1;
const SLOT_BIT: u32 = 1 << 31;

impl Entry {
    fn encode(self) -> u32 {
        match self {
            Entry::Page(p) => p,
            Entry::Slot(s) => s | SLOT_BIT,
        }
    }
    fn decode(v: u32) -> Entry {
        if v & SLOT_BIT != 0 {
            Entry::Slot(v & !SLOT_BIT)
        } else {
            Entry::Page(v)
        }
    }
}

/// Mixes a page hash with its domain key into the index key.
#[inline]
pub fn index_key(hash: u64, domain_key: u32) -> u64 {
    hash ^ (domain_key as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Open-addressing table, linear probing, tombstones on removal.
pub struct Index {
    keys: Vec<u64>,
    vals: Vec<u32>,
    mask: usize,
    len: usize,
    tombs: usize,
}

impl Index {
    /// A table for about `expected` entries; its memory is touched now, so it is part of
    /// the process's resident size from the start rather than growing during a run.
    pub fn with_capacity(expected: usize) -> Index {
        let cap = (expected.max(16) * 2).next_power_of_two();
        let mut keys = vec![0u64; cap];
        crate::engine::touch(&mut keys);
        Index {
            keys,
            vals: vec![EMPTY; cap],
            mask: cap - 1,
            len: 0,
            tombs: 0,
        }
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory the table holds.
    pub fn bytes(&self) -> usize {
        self.keys.len() * 12
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0xD6E8_FEB8_6659_FD93) >> 20) as usize & self.mask
    }

    /// Adds an entry.
    pub fn insert(&mut self, key: u64, e: Entry) {
        if (self.len + self.tombs + 1) * 4 > self.keys.len() * 3 {
            self.rebuild();
        }
        let mut i = self.home(key);
        loop {
            let v = self.vals[i];
            if v == EMPTY || v == TOMB {
                if v == TOMB {
                    self.tombs -= 1;
                }
                self.keys[i] = key;
                self.vals[i] = e.encode();
                self.len += 1;
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Removes one entry equal to `e` under `key`; false if absent.
    pub fn remove(&mut self, key: u64, e: Entry) -> bool {
        let want = e.encode();
        let mut i = self.home(key);
        loop {
            let v = self.vals[i];
            if v == EMPTY {
                return false;
            }
            if v == want && self.keys[i] == key {
                self.vals[i] = TOMB;
                self.len -= 1;
                self.tombs += 1;
                return true;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Calls `f` for every entry under `key`.
    pub fn for_each(&self, key: u64, mut f: impl FnMut(Entry)) {
        let mut i = self.home(key);
        loop {
            let v = self.vals[i];
            if v == EMPTY {
                return;
            }
            if v != TOMB && self.keys[i] == key {
                f(Entry::decode(v));
            }
            i = (i + 1) & self.mask;
        }
    }

    fn rebuild(&mut self) {
        let cap = if (self.len + 1) * 2 > self.keys.len() {
            self.keys.len() * 2
        } else {
            self.keys.len()
        };
        let keys = std::mem::replace(&mut self.keys, vec![0u64; cap]);
        let vals = std::mem::replace(&mut self.vals, vec![EMPTY; cap]);
        self.mask = cap - 1;
        self.len = 0;
        self.tombs = 0;
        for (k, v) in keys.into_iter().zip(vals) {
            if v != EMPTY && v != TOMB {
                self.insert(k, Entry::decode(v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_remove_with_collisions() {
        let mut ix = Index::with_capacity(4);
        for i in 0..1000u32 {
            ix.insert(index_key((i % 7) as u64, 0), Entry::Page(i));
        }
        ix.insert(index_key(3, 0), Entry::Slot(5));
        let mut n = 0;
        ix.for_each(index_key(3, 0), |_| n += 1);
        assert_eq!(n, 1000 / 7 + 1 + 1);
        assert!(ix.remove(index_key(3, 0), Entry::Slot(5)));
        assert!(!ix.remove(index_key(3, 0), Entry::Slot(5)));
        for i in 0..1000u32 {
            assert!(ix.remove(index_key((i % 7) as u64, 0), Entry::Page(i)));
        }
        assert!(ix.is_empty());
        let mut n = 0;
        ix.for_each(index_key(3, 1), |_| n += 1);
        assert_eq!(n, 0);
    }
}
