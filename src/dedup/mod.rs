//! `memvirt dedup`: runs the userspace KSM engine (crate `ksm`) on synthetic regions
//! or on the RAM of live guests, optionally side by side with the kernel's ksmd.

pub mod guests;
mod plot;
mod report;
mod run;
pub mod subject;

use clap::Args;

pub use run::SystemResult;

/// Command-line arguments of `memvirt dedup`.
#[derive(Debug, Args)]
pub struct DedupArgs {
    /// Run on synthetic regions instead of guests.
    #[arg(long, conflicts_with = "guests")]
    pub synthetic: bool,
    /// Run on the RAM of this many live built-in guests (default profile).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub guests: Option<u32>,
    /// With --guests: each guest keeps rewriting this many of its image pages (pages
    /// that are merged across guests), checking each time that its previous write is
    /// still there, while the engine merges (0: guests stay idle once ready).
    #[arg(long, default_value_t = 0)]
    pub guest_writes: u64,
    /// With --guest-writes: milliseconds between a guest's rounds of writes (a delay
    /// loop sized from the measured guest speed; 0: write back to back).
    #[arg(long, default_value_t = 1000)]
    pub guest_write_period_ms: u64,
    /// Guest RAM per guest with --guests (K/M/G suffixes).
    #[arg(long, default_value = "256M", value_parser = crate::units::parse_size)]
    pub mem: u64,
    /// Number of regions (think: identical guests).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub regions: u32,
    /// Size of each region (bytes, or with K/M/G suffix).
    #[arg(long, default_value = "256M", value_parser = crate::units::parse_size)]
    pub size: u64,
    /// Percentages of identical, zero and unique pages: IDENT:ZERO:UNIQUE.
    #[arg(long, default_value = "50:25:25", value_parser = parse_mix)]
    pub mix: ksm::synth::Mix,
    /// Page kinds interleaved at random (scattered) or in long runs (contiguous).
    #[arg(long, default_value = "scattered", value_parser = parse_layout)]
    pub layout: ksm::synth::Layout,
    /// Merge backend: remap, madvise or hybrid.
    #[arg(long, default_value = "remap", value_parser = ["remap", "madvise", "hybrid"])]
    pub backend: String,
    /// Hybrid backend: shortest run of pages remapped (shorter runs go to ksmd).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_run: u64,
    /// Merge domains: all, region or zero-only.
    #[arg(long, default_value = "all", value_parser = parse_domain)]
    pub domain: ksm::DomainPolicy,
    /// Background writers: pages per second written into random pages (0: none).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub writers: f64,
    /// Number of writer threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub writer_threads: u32,
    /// Length of each run in seconds (merging, then steady state).
    #[arg(long, default_value_t = 10.0, value_parser = parse_duration)]
    pub duration: f64,
    /// Milliseconds between engine passes once merged (steady state).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=60000))]
    pub interval_ms: u64,
    /// Dirty-page source for plain regions: uffd (userfaultfd + PAGEMAP_SCAN) or none
    /// (ksmd's rule: hash unchanged across two passes).
    #[arg(long, default_value = "uffd", value_parser = ["uffd", "none"])]
    pub dirty: String,
    /// VMA budget as a percentage of vm.max_map_count.
    #[arg(long, default_value_t = 80.0, value_parser = parse_pct)]
    pub vma_budget: f64,
    /// Raise vm.max_map_count to this for the run (root), restored afterwards.
    #[arg(long)]
    pub raise_max_map_count: Option<u64>,
    /// ksmd's knobs for the madvise/hybrid backends: PAGES_TO_SCAN:SLEEP_MS.
    #[arg(long, default_value = "100000:0", value_parser = parse_knobs)]
    pub ksmd_knobs: (u64, u64),
    /// Also run the same workload, fresh, under the kernel's ksmd alone:
    /// ksmd or ksmd:PAGES_TO_SCAN:SLEEP_MS (default 100000:0).
    #[arg(long, value_parser = parse_compare)]
    pub compare: Option<(u64, u64)>,
    /// Engine worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Seed of the synthetic content.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON (one object per system) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG plot of saved MiB over time.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
}

fn parse_mix(s: &str) -> Result<ksm::synth::Mix, String> {
    s.parse()
}

fn parse_layout(s: &str) -> Result<ksm::synth::Layout, String> {
    s.parse()
}

fn parse_domain(s: &str) -> Result<ksm::DomainPolicy, String> {
    s.parse()
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("bad rate {s:?}: expected pages per second, e.g. 5000"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("rate {s:?} must be a non-negative number"));
    }
    Ok(v)
}

fn parse_duration(s: &str) -> Result<f64, String> {
    let t = s.trim_end_matches('s');
    let v: f64 = t
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected seconds, e.g. 10 or 2.5s"))?;
    if !v.is_finite() || v <= 0.0 || v > 86400.0 {
        return Err(format!(
            "duration {s:?} must be between 0 and 86400 seconds"
        ));
    }
    Ok(v)
}

fn parse_pct(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("bad percentage {s:?}"))?;
    if !(1.0..=100.0).contains(&v) {
        return Err(format!("percentage {s:?} must be between 1 and 100"));
    }
    Ok(v)
}

fn parse_knobs(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once(':').ok_or_else(|| {
        format!("bad ksmd knobs {s:?}: expected PAGES_TO_SCAN:SLEEP_MS, e.g. 100000:0")
    })?;
    let p: u64 = a
        .parse()
        .map_err(|_| format!("bad pages_to_scan {a:?} in {s:?}"))?;
    let m: u64 = b
        .parse()
        .map_err(|_| format!("bad sleep_millisecs {b:?} in {s:?}"))?;
    if p == 0 {
        return Err(format!("pages_to_scan must be at least 1 in {s:?}"));
    }
    Ok((p, m))
}

fn parse_compare(s: &str) -> Result<(u64, u64), String> {
    match s.strip_prefix("ksmd") {
        Some("") => Ok((100_000, 0)),
        Some(rest) if rest.starts_with(':') => parse_knobs(&rest[1..]),
        _ => Err(format!(
            "bad --compare {s:?}: expected ksmd or ksmd:PAGES_TO_SCAN:SLEEP_MS"
        )),
    }
}

/// The host facts printed next to the timings: the translation mode always, and the
/// measured guest speed when guests ran.
fn host_line(guests: bool) -> String {
    let mode = crate::probe::translation_mode().as_str();
    if !guests {
        return format!("host: translation {mode} (no guest code runs in --synthetic)");
    }
    match crate::probe::calibrate_guest() {
        Ok(c) => format!(
            "host: translation {mode}, guest execution {} ({:.0} ns/instruction, {:.1} µs per VM exit; measured)",
            c.execution.as_str(),
            c.ns_per_instruction,
            c.exit_ns / 1e3
        ),
        Err(e) => format!("host: translation {mode}, guest speed not measured ({e})"),
    }
}

/// Runs `memvirt dedup` with the given arguments.
pub fn run(args: &DedupArgs) -> anyhow::Result<()> {
    let results = measure(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print_table(args, &results);
    }
    if let Some(p) = &args.plot {
        plot::plot(p, &results)?;
        if !args.json {
            println!("plot written to {}", p.display());
        }
    }
    Ok(())
}

/// Prints results side by side, with the host line next to the timings.
pub fn print_table(args: &DedupArgs, results: &[SystemResult]) {
    report::print_table(args, results, &host_line(args.guests.is_some()));
}

/// Parses `memvirt dedup` arguments from words (for `memvirt demo`).
pub fn args_from(words: &[&str]) -> anyhow::Result<DedupArgs> {
    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: DedupArgs,
    }
    use clap::Parser;
    let all = std::iter::once("dedup").chain(words.iter().copied());
    Ok(Wrapper::try_parse_from(all)?.args)
}

/// Runs the engine, and ksmd with `--compare`, and returns one result per system.
pub fn measure(args: &DedupArgs) -> anyhow::Result<Vec<SystemResult>> {
    let guests = match (args.synthetic, args.guests) {
        (true, _) => None,
        (false, Some(n)) => Some(n as usize),
        (false, None) => anyhow::bail!(
            "memvirt dedup needs --synthetic (synthetic regions) or --guests N (live guests)"
        ),
    };
    if guests.is_none() && (args.size == 0 || !args.size.is_multiple_of(ksm::PAGE_SIZE as u64)) {
        anyhow::bail!(
            "--size {}: expected a non-zero multiple of 4 KiB",
            crate::units::format_bytes(args.size)
        );
    }
    if guests.is_none() && args.guest_writes > 0 {
        anyhow::bail!("--guest-writes applies to --guests only");
    }
    if guests.is_some() && args.writers > 0.0 {
        anyhow::bail!(
            "--writers applies to --synthetic regions only; guests write their own memory"
        );
    }
    if guests.is_none() && args.size * args.regions as u64 > 64 << 30 {
        anyhow::bail!(
            "--regions × --size = {} GiB: more than 64 GiB of synthetic memory",
            (args.size * args.regions as u64) >> 30
        );
    }
    if let Some(p) = &args.plot {
        if p.extension().and_then(|e| e.to_str()) != Some("svg") {
            anyhow::bail!("--plot {}: the file name must end in .svg", p.display());
        }
    }
    // Each system gets a fresh subject; the previous one is gone before the next is made.
    let make = || -> anyhow::Result<Box<dyn subject::Subject>> {
        Ok(match guests {
            Some(n) => Box::new(guests::Guests::boot(args, n)?),
            None => Box::new(subject::Synthetic::new(args)?),
        })
    };
    let mut results = Vec::new();
    results.push(run::run_engine(args, &*make()?)?);
    if let Some((pages, sleep)) = args.compare {
        results.push(run::run_ksmd(args, &*make()?, pages, sleep)?);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inputs() {
        assert_eq!(parse_compare("ksmd").unwrap(), (100_000, 0));
        assert_eq!(parse_compare("ksmd:100:20").unwrap(), (100, 20));
        assert!(parse_compare("ksm").is_err());
        assert!(parse_compare("ksmd:0:1").is_err());
        assert!(parse_mix("50:25:20").is_err());
        assert!(parse_duration("-1").is_err());
        assert_eq!(parse_duration("2.5s").unwrap(), 2.5);
    }
}
