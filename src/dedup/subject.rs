//! What a dedup run merges: synthetic regions, or the RAM of live guests. The run
//! loop (`run.rs`) only needs the regions, the hooks the engine borrows, and the
//! ground truth to judge the result against (achievable saving, lost writes).

use std::sync::Arc;

use anyhow::Context;
use ksm::synth::{Spec, Workload, Writers};
use ksm::{DirtySource, DomainPolicy, RegionSpec, WriterGate, WriterHold};

use super::DedupArgs;

/// Memory a dedup run works on.
pub trait Subject {
    /// One line for reports.
    fn describe(&self) -> String;
    /// The regions, in the engine's order.
    fn region_specs(&self) -> Vec<RegionSpec>;
    /// Bytes in all regions.
    fn total_bytes(&self) -> u64;
    /// Pages a perfect merger would save under `policy`, as things stand now.
    fn achievable_pages(&self, policy: DomainPolicy) -> u64;
    /// Pages whose content is not what its writers last wrote (must be 0).
    fn lost_writes(&self) -> u64;
    /// The hook that holds a region's writers still.
    fn hold(&self) -> Arc<dyn WriterHold>;
    /// A source of written pages, if the subject has one of its own.
    fn dirty(&self, args: &DedupArgs) -> Option<Box<dyn DirtySource>>;
    /// Starts background writers, if the subject has any and `args` asks for them.
    fn start_writers(&self, args: &DedupArgs) -> Option<Writers>;
    /// Writes the subject made by itself (guests writing their own memory).
    fn own_writes(&self) -> u64 {
        0
    }
}

/// Synthetic regions with an exactly known mix of identical, zero and unique pages.
pub struct Synthetic {
    w: Workload,
    gate: Arc<WriterGate>,
}

impl Synthetic {
    /// Maps and fills the regions `args` describes.
    pub fn new(args: &DedupArgs) -> anyhow::Result<Self> {
        let spec = Spec {
            regions: args.regions as usize,
            region_bytes: args.size as usize,
            mix: args.mix,
            layout: args.layout,
            seed: args.seed,
        };
        let w = Workload::new(spec).context("mapping and filling the synthetic regions")?;
        let gate = Arc::new(WriterGate::new(args.regions as usize));
        Ok(Synthetic { w, gate })
    }
}

impl Subject for Synthetic {
    fn describe(&self) -> String {
        format!(
            "{} regions × {} MiB ({:?})",
            self.w.spec.regions,
            self.w.spec.region_bytes >> 20,
            self.w.spec.layout
        )
    }
    fn region_specs(&self) -> Vec<RegionSpec> {
        self.w.region_specs()
    }
    fn total_bytes(&self) -> u64 {
        self.w.total_bytes()
    }
    fn achievable_pages(&self, policy: DomainPolicy) -> u64 {
        self.w.achievable_pages(policy)
    }
    fn lost_writes(&self) -> u64 {
        self.w.lost_writes()
    }
    fn hold(&self) -> Arc<dyn WriterHold> {
        self.gate.clone()
    }
    fn dirty(&self, args: &DedupArgs) -> Option<Box<dyn DirtySource>> {
        if args.dirty != "uffd" {
            return None;
        }
        match ksm::UffdDirty::new() {
            Ok(d) => Some(Box::new(d)),
            Err(e) => {
                if !args.json {
                    eprintln!(
                        "note: no userfaultfd dirty tracking ({e}); using the two-pass hash rule"
                    );
                }
                None
            }
        }
    }
    fn start_writers(&self, args: &DedupArgs) -> Option<Writers> {
        (args.writers > 0.0).then(|| {
            Writers::start(
                &self.w,
                self.gate.clone(),
                args.writer_threads as usize,
                args.writers,
                None,
            )
        })
    }
}
