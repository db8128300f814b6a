//! One result row per translation path, built from the path's counters and the run's
//! timing, plus the text table.

use crate::report::Table;
use serde::Serialize;
use shadow::workload::PathRun;
use shadow::{NestedStats, ShadowStats};

/// What one path did with the trace (one element of the JSON `results` array).
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    /// "nested" or "shadow".
    pub path: &'static str,
    /// Translations made.
    pub translations: u64,
    /// Nanoseconds per translation spent in this process by the model (translations,
    /// write notifications, INVLPG, CR3 writes; guest table edits excluded). Measured.
    pub ns_per_translation: f64,
    /// Mean memory references per translation (page-table entries read: hardware walks,
    /// plus for shadow paging the guest entries read in software on exits and resyncs).
    pub mean_refs: f64,
    /// Most references of any one translation.
    pub max_refs: u32,
    /// TLB hit rate.
    pub tlb_hit_rate: f64,
    /// Hit rate of the paging-structure (walk) cache in front of the first-dimension walk.
    pub walk_cache_hit_rate: f64,
    /// Nested TLB hit rate (nested path only).
    pub nested_tlb_hit_rate: Option<f64>,
    /// Nested paging-structure cache hit rate (nested path only).
    pub nested_walk_cache_hit_rate: Option<f64>,
    /// VM exits the path takes (shadow: misses, tracked writes, INVLPG, CR3 writes;
    /// nested: none of these exit).
    pub exits: u64,
    /// Exits per translation.
    pub exits_per_translation: f64,
    /// Cost of those exits per translation at the host's measured exit cost (None when
    /// no exit cost is known).
    pub sync_ns_per_translation: Option<f64>,
    /// `ns_per_translation` plus `sync_ns_per_translation`.
    pub total_ns_per_translation: Option<f64>,
    /// Order-dependent hash of every host address returned (equal across paths when they
    /// agree on every translation).
    pub checksum: String,
    /// The path's own counters.
    pub counters: serde_json::Value,
}

fn per(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

/// The nested path's row.
pub fn nested_result(run: &PathRun<NestedStats>, exit_ns: Option<f64>) -> PathResult {
    let o = &run.outcome;
    let s = &run.stats;
    let ns = per(o.path_ns, o.translations);
    PathResult {
        path: "nested",
        translations: o.translations,
        ns_per_translation: ns,
        mean_refs: s.mean_refs(),
        max_refs: s.max_refs,
        tlb_hit_rate: s.tlb.hit_rate(),
        walk_cache_hit_rate: s.walk_cache.hit_rate(),
        nested_tlb_hit_rate: Some(s.nested_tlb.hit_rate()),
        nested_walk_cache_hit_rate: Some(s.nested_walk_cache.hit_rate()),
        exits: 0,
        exits_per_translation: 0.0,
        sync_ns_per_translation: exit_ns.map(|_| 0.0),
        total_ns_per_translation: exit_ns.map(|_| ns),
        checksum: format!("{:016x}", o.checksum),
        counters: serde_json::to_value(s).unwrap_or_default(),
    }
}

/// The shadow path's row.
pub fn shadow_result(run: &PathRun<ShadowStats>, exit_ns: Option<f64>) -> PathResult {
    let o = &run.outcome;
    let s = &run.stats;
    let ns = per(o.path_ns, o.translations);
    let sync = exit_ns.map(|x| s.exits as f64 * x / o.translations.max(1) as f64);
    PathResult {
        path: "shadow",
        translations: o.translations,
        ns_per_translation: ns,
        mean_refs: s.mean_refs(),
        max_refs: s.max_refs,
        tlb_hit_rate: s.tlb.hit_rate(),
        walk_cache_hit_rate: s.walk_cache.hit_rate(),
        nested_tlb_hit_rate: None,
        nested_walk_cache_hit_rate: None,
        exits: s.exits,
        exits_per_translation: per(s.exits, o.translations),
        sync_ns_per_translation: sync,
        total_ns_per_translation: sync.map(|x| x + ns),
        checksum: format!("{:016x}", o.checksum),
        counters: serde_json::to_value(s).unwrap_or_default(),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or("-".to_string(), f)
}

/// The side-by-side table: one column per path.
pub fn table(results: &[PathResult]) -> String {
    let mut t = Table::new(
        std::iter::once("".to_string()).chain(results.iter().map(|r| r.path.to_string())),
    );
    let mut row = |name: &str, f: &dyn Fn(&PathResult) -> String| {
        t.row(std::iter::once(name.to_string()).chain(results.iter().map(f)));
    };
    row("ns/translation (model, measured here)", &|r| {
        format!("{:.1}", r.ns_per_translation)
    });
    row("memory refs/translation (mean)", &|r| {
        format!("{:.2}", r.mean_refs)
    });
    row("memory refs (max)", &|r| r.max_refs.to_string());
    row("TLB hit rate", &|r| pct(r.tlb_hit_rate));
    row("walk-cache hit rate", &|r| pct(r.walk_cache_hit_rate));
    row("nested TLB hit rate", &|r| opt(r.nested_tlb_hit_rate, pct));
    row("nested walk-cache hit rate", &|r| {
        opt(r.nested_walk_cache_hit_rate, pct)
    });
    row("VM exits/translation", &|r| {
        format!("{:.4}", r.exits_per_translation)
    });
    row("sync cost ns/translation (exits x exit cost)", &|r| {
        opt(r.sync_ns_per_translation, |x| format!("{x:.1}"))
    });
    row("total ns/translation", &|r| {
        opt(r.total_ns_per_translation, |x| format!("{x:.1}"))
    });
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadow::workload::RunOutcome;

    #[test]
    fn shadow_sync_cost_is_exits_times_exit_cost() {
        let outcome = RunOutcome {
            translations: 1000,
            path_ns: 50_000,
            checksum: 7,
            ..RunOutcome::default()
        };
        let stats = ShadowStats {
            exits: 20,
            translations: 1000,
            hardware_refs: 3000,
            software_refs: 1000,
            ..ShadowStats::default()
        };
        let r = shadow_result(&PathRun { outcome, stats }, Some(10_000.0));
        assert_eq!(r.ns_per_translation, 50.0);
        assert_eq!(r.exits_per_translation, 0.02);
        assert_eq!(r.sync_ns_per_translation, Some(200.0));
        assert_eq!(r.total_ns_per_translation, Some(250.0));
        assert_eq!(r.mean_refs, 4.0);
        let unpriced = shadow_result(&PathRun { outcome, stats }, None);
        assert_eq!(unpriced.sync_ns_per_translation, None);
        let n = nested_result(
            &PathRun {
                outcome,
                stats: NestedStats {
                    translations: 1000,
                    guest_refs: 500,
                    host_refs: 1500,
                    ..NestedStats::default()
                },
            },
            Some(1.0),
        );
        assert_eq!(
            (n.exits, n.mean_refs, n.sync_ns_per_translation),
            (0, 2.0, Some(0.0))
        );
        let text = table(&[n, r]);
        assert!(text.contains("nested") && text.contains("shadow") && text.contains("200.0"));
    }
}
