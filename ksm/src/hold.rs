//! Holding a region's writers still while the engine verifies and remaps.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::RegionId;

/// Hook supplied by the caller: stop every writer of a region, and let them go again.
///
/// The engine compares a page with its merge target and replaces its mapping only between
/// `hold(r)` and `release(r)`, so no write can fall between the comparison and the remap.
/// The VMM implements it by parking the guest's vCPUs; [`WriterGate`] implements it for
/// threads of this process. Holds are kept short (batches of ≤ ~10 ms).
pub trait WriterHold: Send + Sync {
    /// Returns once no writer of `region` is running and none will start until `release`.
    fn hold(&self, region: RegionId);
    /// Lets the writers of `region` run again.
    fn release(&self, region: RegionId);
}

/// For memory nobody writes concurrently: holding is free.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoWriters;

impl WriterHold for NoWriters {
    fn hold(&self, _: RegionId) {}
    fn release(&self, _: RegionId) {}
}

/// A per-region gate for writer threads of this process: writers call [`WriterGate::enter`]
/// / [`WriterGate::exit`] around each write (or batch of writes); the engine's hold closes
/// the gate and waits until writers inside have left.
pub struct WriterGate {
    gates: Vec<Gate>,
}

struct Gate {
    held: AtomicBool,
    inside: AtomicU32,
}

impl WriterGate {
    /// A gate for `regions` regions.
    pub fn new(regions: usize) -> WriterGate {
        WriterGate {
            gates: (0..regions)
                .map(|_| Gate {
                    held: AtomicBool::new(false),
                    inside: AtomicU32::new(0),
                })
                .collect(),
        }
    }

    /// Called by a writer before writing into `region`; waits while the region is held.
    #[inline]
    pub fn enter(&self, region: RegionId) {
        let g = &self.gates[region];
        loop {
            while g.held.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            g.inside.fetch_add(1, Ordering::SeqCst);
            if !g.held.load(Ordering::SeqCst) {
                return;
            }
            g.inside.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Called by a writer after its write.
    #[inline]
    pub fn exit(&self, region: RegionId) {
        self.gates[region].inside.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WriterHold for WriterGate {
    fn hold(&self, region: RegionId) {
        let g = &self.gates[region];
        // Holds of one region are not nested: the engine drives holds from one thread.
        g.held.store(true, Ordering::SeqCst);
        let mut spins = 0u32;
        while g.inside.load(Ordering::SeqCst) != 0 {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn release(&self, region: RegionId) {
        self.gates[region].held.store(false, Ordering::SeqCst);
    }
}
