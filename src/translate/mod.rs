//! `memvirt translate`: runs address traces through the nested (EPT/NPT) model and the
//! shadow page tables of crate `shadow`, side by side.
//!
//! The same deterministic trace (see `shadow::workload`) is run twice over freshly built
//! guest tables: once through `shadow::NestedMmu` (a 2-D walk over EPT-format tables built
//! from the guest memory map) and once through `shadow::ShadowMmu`. Both paths must return
//! the same host address for every access; the command checks this with a checksum. The
//! time each model spends is measured here; the cost of keeping shadow tables in sync is
//! the number of exits real shadow paging would take times the cost of one VM exit
//! measured live on this host with a port-I/O guest.

mod host;
mod results;

use crate::units::{format_bytes, parse_size};
use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use shadow::workload::{run_nested, run_shadow, WorkloadKind, WorkloadSpec};
use shadow::{CacheConfig, PageSize, TlbConfig};
use std::io::IsTerminal;

/// Command-line arguments of `memvirt translate`.
#[derive(Debug, Args)]
pub struct TranslateArgs {
    /// Trace: sequential, random, churn (mmap/munmap-like table edits) or switch
    /// (address-space switches and execs).
    #[arg(long, default_value = "random")]
    pub workload: String,
    /// Bytes of guest memory the trace touches, 1M ..= 4G typical (K, M, G suffixes).
    #[arg(long, default_value = "64M")]
    pub working_set: String,
    /// Guest page size: 4k or 2m.
    #[arg(long, default_value = "4k")]
    pub guest_pages: String,
    /// Host page size backing guest memory (EPT leaves, largest shadow entry): 4k or 2m.
    #[arg(long, default_value = "4k")]
    pub host_pages: String,
    /// Number of accesses (translations) per path.
    #[arg(long, default_value_t = 2_000_000)]
    pub accesses: u64,
    /// Seed of the trace.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Accesses to run first, unmeasured, so the results describe a warm steady state
    /// (0: measure from the first touch, cold shadow tables and caches included).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Use 5-level guest and host tables (LA57 and 5-level EPT).
    #[arg(long)]
    pub five_level: bool,
    /// Disable unsync of last-level shadow pages (every tracked write exits and zaps).
    #[arg(long)]
    pub no_unsync: bool,
    /// L1 TLB entries (fully associative, all page sizes). Default: AMD Barcelona's 48.
    #[arg(long, default_value_t = 48)]
    pub tlb_l1: usize,
    /// L2 TLB entries for 4 KiB pages (4-way). Default: Barcelona's 512.
    #[arg(long, default_value_t = 512)]
    pub tlb_l2_4k: usize,
    /// L2 TLB entries for 2 MiB pages (4-way). Default: Barcelona's 128.
    #[arg(long, default_value_t = 128)]
    pub tlb_l2_2m: usize,
    /// Page walk (paging-structure) cache entries. Default: 24 (Bhargava et al. 2008).
    #[arg(long, default_value_t = 24)]
    pub walk_cache: usize,
    /// Nested TLB entries (nested path). Default: 16 (Bhargava et al. 2008).
    #[arg(long, default_value_t = 16)]
    pub nested_tlb: usize,
    /// Nested paging-structure cache entries (nested path). Default: 24.
    #[arg(long, default_value_t = 24)]
    pub nested_walk_cache: usize,
    /// Cost of one VM exit in ns instead of measuring it with a live guest.
    #[arg(long)]
    pub exit_ns: Option<f64>,
    /// Emit JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn page_size(s: &str, what: &str) -> anyhow::Result<PageSize> {
    match s.to_ascii_lowercase().as_str() {
        "4k" => Ok(PageSize::Size4K),
        "2m" => Ok(PageSize::Size2M),
        _ => bail!("invalid --{what} {s:?}: expected 4k or 2m"),
    }
}

/// Everything the command prints in JSON mode.
#[derive(Debug, Serialize)]
struct Report {
    workload: WorkloadSpec,
    host_pages: PageSize,
    caches: CacheConfig,
    unsync: bool,
    host: host::HostFacts,
    results: Vec<results::PathResult>,
    paths_agree: bool,
}

/// Runs `memvirt translate` with the given arguments.
pub fn run(args: &TranslateArgs) -> anyhow::Result<()> {
    let kind: WorkloadKind = args
        .workload
        .parse()
        .map_err(anyhow::Error::msg)
        .context("--workload")?;
    let working_set = parse_size(&args.working_set).context("--working-set")?;
    if !(4096..=64 << 30).contains(&working_set) {
        bail!(
            "invalid --working-set {}: expected 4K ..= 64G",
            args.working_set
        );
    }
    let guest_page = page_size(&args.guest_pages, "guest-pages")?;
    let host_page = page_size(&args.host_pages, "host-pages")?;
    if args.accesses == 0 {
        bail!("invalid --accesses 0: expected at least 1");
    }
    if let Some(x) = args.exit_ns {
        if !(x.is_finite() && x >= 0.0) {
            bail!("invalid --exit-ns {x}: expected a non-negative number of nanoseconds");
        }
    }
    let mut spec = WorkloadSpec::new(kind, working_set, guest_page, args.accesses);
    spec.seed = args.seed;
    spec.la57 = args.five_level;
    spec.warmup = args.warmup;
    let caches = CacheConfig {
        tlb: TlbConfig {
            l1_entries: args.tlb_l1,
            l1_ways: args.tlb_l1,
            l2_4k_entries: args.tlb_l2_4k,
            l2_2m_entries: args.tlb_l2_2m,
            l2_ways: 4,
        },
        walk_cache_entries: args.walk_cache,
        nested_tlb_entries: args.nested_tlb,
        nested_walk_cache_entries: args.nested_walk_cache,
    };
    let unsync = !args.no_unsync;
    let talk = !args.json && std::io::stderr().is_terminal();

    if talk {
        eprintln!("measuring the host (translation mode, live guest exit cost)...");
    }
    let host = host::host_facts(args.exit_ns);
    if talk {
        eprintln!(
            "running {} accesses through the nested model...",
            args.accesses
        );
    }
    let nested = run_nested(&spec, host_page, caches).context("nested path")?;
    if talk {
        eprintln!(
            "running {} accesses through the shadow tables...",
            args.accesses
        );
    }
    let shadow = run_shadow(&spec, host_page, caches, unsync).context("shadow path")?;
    let paths_agree = nested.outcome.checksum == shadow.outcome.checksum;
    let results = vec![
        results::nested_result(&nested, host.exit_ns),
        results::shadow_result(&shadow, host.exit_ns),
    ];
    let report = Report {
        workload: spec,
        host_pages: host_page,
        caches,
        unsync,
        host,
        results,
        paths_agree,
    };

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report, &nested.outcome, &shadow.stats);
    }
    if !paths_agree {
        bail!("the nested and shadow paths translated the trace differently (checksums differ): this is a bug in crate shadow");
    }
    Ok(())
}

fn print_text(r: &Report, n: &shadow::workload::RunOutcome, s: &shadow::ShadowStats) {
    let h = &r.host;
    println!(
        "host: translation {}, guest execution {}{}",
        h.translation_mode,
        h.guest_execution,
        h.ns_per_instruction.map_or(String::new(), |x| format!(
            " ({x:.1} ns per guest instruction, measured)"
        ))
    );
    match h.exit_ns {
        Some(x) => println!("VM exit round trip: {:.0} ns ({})", x, h.exit_ns_source),
        None => println!("VM exit round trip: unknown, sync cost not priced"),
    }
    if let Some(note) = &h.calibration_note {
        println!("  ({note})");
    }
    println!("in-guest timing: {}", h.in_guest_timing);
    let w = &r.workload;
    println!(
        "workload {}: working set {}, guest pages {}, host pages {}, {}-level tables, {} accesses after {} warm-up, seed {}",
        w.kind.as_str(),
        format_bytes(w.working_set),
        w.guest_page,
        r.host_pages,
        if w.la57 { 5 } else { 4 },
        w.accesses,
        w.warmup,
        w.seed
    );
    println!(
        "caches: TLB {} L1 + {}/{} L2, walk cache {}, nested TLB {}, nested walk cache {} (defaults: AMD Barcelona sizes, as in Bhargava et al., ASPLOS 2008)",
        r.caches.tlb.l1_entries,
        r.caches.tlb.l2_4k_entries,
        r.caches.tlb.l2_2m_entries,
        r.caches.walk_cache_entries,
        r.caches.nested_tlb_entries,
        r.caches.nested_walk_cache_entries
    );
    println!(
        "guest table edits: {} entries written, {} INVLPG, {} CR3 writes",
        n.table_writes, n.invlpgs, n.cr3_writes
    );
    println!();
    print!("{}", results::table(&r.results));
    println!();
    println!(
        "shadow upkeep: {} misses, {} fills, {} tracked writes, {} unsyncs, {} resyncs ({} entries), {} sptes zapped, {} pages zapped; {} guest table pages tracked, {} shadow pages",
        s.misses, s.fills, s.tracked_writes, s.unsyncs, s.resyncs, s.resynced_sptes, s.zapped_sptes, s.zapped_pages, s.tracked_pages, s.shadow_pages
    );
    println!(
        "paths agree on every translation: {}",
        if r.paths_agree { "yes" } else { "NO" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_parse_or_name_the_flag() {
        assert_eq!(page_size("4k", "guest-pages").unwrap(), PageSize::Size4K);
        assert_eq!(page_size("2M", "host-pages").unwrap(), PageSize::Size2M);
        let e = page_size("1g", "host-pages").unwrap_err().to_string();
        assert!(e.contains("--host-pages") && e.contains("4k or 2m"), "{e}");
    }
}
