//! One run of a synthetic workload under the engine, or under ksmd alone, sampled over
//! time from the kernel's accounting.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use ksm::stats::{Agreement, KernelKsm};
use ksm::{sys, Backend, Config, DomainPolicy, Engine, Hooks, KsmdSettings, PAGE_SIZE};
use serde::Serialize;

use super::subject::Subject;
use super::DedupArgs;

/// One sample of a run's timeline.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// Seconds since merging started.
    pub t: f64,
    /// Bytes saved as the kernel accounts the process (Pss drop).
    pub measured: i64,
    /// Bytes saved by the counters (engine + kernel KSM).
    pub claimed: u64,
    /// CPU seconds of the system so far.
    pub cpu: f64,
}

/// Result of one system's run: the fields the issue lists, then details.
#[derive(Debug, Serialize)]
pub struct SystemResult {
    pub system: String,
    pub t50_s: Option<f64>,
    pub t90_s: Option<f64>,
    pub t99_s: Option<f64>,
    pub cpu_s: f64,
    pub saved_bytes: u64,
    pub saved_bytes_measured: i64,
    pub achievable_bytes: u64,
    pub steady_cpu_pct: Option<f64>,
    pub lost_writes: u64,
    // details
    pub backend: String,
    /// The synthetic layout (None for guests).
    pub layout: Option<ksm::synth::Layout>,
    /// What was merged.
    pub subject: String,
    pub domain: DomainPolicy,
    pub total_bytes: u64,
    pub duration_s: f64,
    pub writes: u64,
    pub achievable_bytes_end: u64,
    pub saved_fraction_end: f64,
    pub steady_window_s: Option<(f64, f64)>,
    pub agreement: Agreement,
    pub rollup_before: sys::Rollup,
    pub rollup_after: sys::Rollup,
    pub kernel_ksm: KernelKsm,
    pub engine: Option<ksm::Stats>,
    pub passes: u64,
    pub first_pass_s: Option<f64>,
    pub timeline: Vec<Sample>,
}

struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    fn start(
        t0: Instant,
        measured: Arc<dyn Fn() -> i64 + Send + Sync>,
        claimed: Arc<dyn Fn() -> u64 + Send + Sync>,
        cpu: Arc<dyn Fn() -> f64 + Send + Sync>,
    ) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("dedup-sampler".into())
            .spawn(move || {
                let mut v = Vec::new();
                while !s2.load(Ordering::Relaxed) {
                    let t = t0.elapsed().as_secs_f64();
                    v.push(Sample {
                        t,
                        measured: measured(),
                        claimed: claimed(),
                        cpu: cpu(),
                    });
                    // Fine-grained while merging, coarser in steady state.
                    let dt = if t < 2.0 {
                        5
                    } else if t < 10.0 {
                        20
                    } else {
                        100
                    };
                    std::thread::sleep(Duration::from_millis(dt));
                }
                v
            })
            .expect("spawn sampler");
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

fn progress_bar(args: &DedupArgs, what: &str) -> Option<ProgressBar> {
    if args.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix:.bold} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_prefix(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(100));
    Some(pb)
}

/// Saving as the kernel's counters show it, cheap enough to sample every few ms: the drop
/// of the process's resident anonymous + shmem pages (/proc/self/status) plus the pages
/// KSM says it saves (/sys/kernel/mm/ksm). The final figure is checked against the Pss
/// drop from /proc/self/smaps_rollup, which costs ~25 ms per read on 2 GiB.
fn measured_fn(k0: KernelKsm) -> Arc<dyn Fn() -> i64 + Send + Sync> {
    let (a0, _, s0) = sys::status_rss().unwrap_or((0, 0, 0));
    Arc::new(move || {
        let (a, _, s) = sys::status_rss().unwrap_or((a0, 0, s0));
        let ksm = KernelKsm::read()
            .saved_pages()
            .saturating_sub(k0.saved_pages())
            * PAGE_SIZE as u64;
        (a0 + s0) as i64 - (a + s) as i64 + ksm as i64
    })
}

fn time_to(samples: &[Sample], target: f64) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.measured as f64 >= target)
        .map(|s| s.t)
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    system: String,
    backend: &str,
    args: &DedupArgs,
    w: &dyn Subject,
    achievable: u64,
    timeline: Vec<Sample>,
    cpu_s: f64,
    claimed: u64,
    before: sys::Rollup,
    after: sys::Rollup,
    writes: u64,
    engine: Option<ksm::Stats>,
    passes: u64,
    first_pass_s: Option<f64>,
) -> SystemResult {
    let measured = before.pss as i64 - after.pss as i64;
    let ach_b = achievable * PAGE_SIZE as u64;
    let t50 = time_to(&timeline, ach_b as f64 * 0.50);
    let t90 = time_to(&timeline, ach_b as f64 * 0.90);
    let t99 = time_to(&timeline, ach_b as f64 * 0.99);
    let end = timeline.last().map(|s| s.t).unwrap_or(args.duration);
    // Steady state: from convergence (t99, or half the run if never reached) to the end.
    let start = t99.unwrap_or(end / 2.0).max(end / 2.0);
    let steady = {
        let a = timeline.iter().find(|s| s.t >= start);
        let b = timeline.last();
        match (a, b) {
            (Some(a), Some(b)) if b.t - a.t > 0.5 => {
                Some(((b.cpu - a.cpu) / (b.t - a.t) * 100.0, (a.t, b.t)))
            }
            _ => None,
        }
    };
    let ach_end = w.achievable_pages(args.domain) * PAGE_SIZE as u64;
    let lost = w.lost_writes();
    SystemResult {
        system,
        t50_s: t50,
        t90_s: t90,
        t99_s: t99,
        cpu_s,
        saved_bytes: claimed,
        saved_bytes_measured: measured,
        achievable_bytes: ach_b,
        steady_cpu_pct: steady.map(|s| s.0),
        lost_writes: lost,
        backend: backend.to_string(),
        layout: args.synthetic.then_some(args.layout),
        subject: w.describe(),
        domain: args.domain,
        total_bytes: w.total_bytes(),
        duration_s: end,
        writes,
        achievable_bytes_end: ach_end,
        saved_fraction_end: if ach_end > 0 {
            measured as f64 / ach_end as f64
        } else {
            0.0
        },
        steady_window_s: steady.map(|s| s.1),
        agreement: Agreement::check(claimed, measured, 2.0),
        rollup_before: before,
        rollup_after: after,
        kernel_ksm: KernelKsm::read(),
        engine,
        passes,
        first_pass_s,
        timeline,
    }
}

/// The engine's run.
pub fn run_engine(args: &DedupArgs, w: &dyn Subject) -> anyhow::Result<SystemResult> {
    let backend = match args.backend.as_str() {
        "remap" => Backend::Remap,
        "madvise" => Backend::Madvise,
        _ => Backend::Hybrid {
            min_run: args.min_run as usize,
        },
    };
    let system = format!("memvirt-{}", backend.name());
    let pb = progress_bar(args, &system);
    let dirty = w.dirty(args);
    let cfg = Config {
        backend,
        policy: args.domain,
        vma_budget_fraction: args.vma_budget / 100.0,
        raise_max_map_count: args.raise_max_map_count,
        ksmd: KsmdSettings {
            pages_to_scan: args.ksmd_knobs.0,
            sleep_ms: args.ksmd_knobs.1,
        },
        threads: args.threads,
        ..Config::default()
    };
    let hooks = Hooks {
        dirty,
        hold: w.hold(),
        ..Hooks::default()
    };
    // SAFETY: the subject's regions are private mappings owned by `w`, which outlives
    // the engine (the engine is dropped at the end of this function; `w` is borrowed).
    let engine =
        unsafe { Engine::new(cfg, w.region_specs(), hooks) }.context("starting the engine")?;
    let engine = Arc::new(Mutex::new(engine));
    let achievable = w.achievable_pages(args.domain);
    let hints = backend != Backend::Remap;
    if hints {
        ksm::restore::settle_ksmd(Duration::from_secs(30));
    }
    let before = sys::smaps_rollup().context("reading /proc/self/smaps_rollup")?;
    let ksmd0 = sys::ksmd_cpu_seconds();
    let k0 = KernelKsm::read();
    let (progress, tids) = {
        let e = engine.lock().unwrap();
        (e.progress(), e.thread_ids())
    };
    let tids = Arc::new(Mutex::new(tids));
    let cpu0: f64 = tids
        .lock()
        .unwrap()
        .iter()
        .map(|&t| sys::thread_cpu_seconds(t))
        .sum();
    let claimed_fn: Arc<dyn Fn() -> u64 + Send + Sync> = {
        let p = progress.clone();
        Arc::new(move || {
            let mut c = p.saved_pages.load(Ordering::Relaxed);
            if hints {
                c += KernelKsm::read()
                    .saved_pages()
                    .saturating_sub(k0.saved_pages());
            }
            c * PAGE_SIZE as u64
        })
    };
    let cpu_fn: Arc<dyn Fn() -> f64 + Send + Sync> = {
        let tids = tids.clone();
        Arc::new(move || {
            let e: f64 = tids
                .lock()
                .unwrap()
                .iter()
                .map(|&t| sys::thread_cpu_seconds(t))
                .sum::<f64>()
                - cpu0;
            e + if hints {
                sys::ksmd_cpu_seconds() - ksmd0
            } else {
                0.0
            }
        })
    };
    let t0 = Instant::now();
    let sampler = Sampler::start(t0, measured_fn(k0), claimed_fn.clone(), cpu_fn.clone());
    let writers = w.start_writers(args);
    let mut passes = 0u64;
    let mut first_pass_s = None;
    let mut converged = false;
    let res: anyhow::Result<()> = (|| {
        while t0.elapsed().as_secs_f64() < args.duration {
            let rep = {
                let mut e = engine.lock().unwrap();
                let r = e.scan().context("engine pass")?;
                *tids.lock().unwrap() = e.thread_ids();
                r
            };
            passes += 1;
            if std::env::var_os("MEMVIRT_DEDUP_DEBUG").is_some() {
                eprintln!("{:.3}s {rep:?}", t0.elapsed().as_secs_f64());
            }
            if first_pass_s.is_none() {
                first_pass_s = Some(t0.elapsed().as_secs_f64());
            }
            // Back-to-back passes until one finds nothing new (two for the hash rule),
            // then one pass per interval.
            // With a dirty source, an incremental pass that looked at under 5% of the pages
            // is steady state too (writers keep some pages changing for ever).
            let total_pages = w.total_bytes() / PAGE_SIZE as u64;
            if !converged
                && passes >= 2
                && ((rep.merged == 0 && rep.zero_reclaimed == 0 && rep.hinted == 0)
                    || rep.pages_examined * 20 < total_pages)
            {
                converged = true;
            }
            if let Some(pb) = &pb {
                pb.set_message(format!(
                    "pass {passes}: saved {} MiB of {} MiB achievable, {:.1} s",
                    claimed_fn() >> 20,
                    (achievable * PAGE_SIZE as u64) >> 20,
                    t0.elapsed().as_secs_f64()
                ));
            }
            if converged {
                let left = args.duration - t0.elapsed().as_secs_f64();
                if left > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(
                        left.min(args.interval_ms as f64 / 1e3),
                    ));
                }
            }
        }
        Ok(())
    })();
    let writes = writers.map(|w| w.stop()).unwrap_or_else(|| w.own_writes());
    let timeline = sampler.finish();
    res?;
    let after = sys::smaps_rollup()?;
    let claimed = claimed_fn();
    let cpu = cpu_fn();
    let stats = {
        let mut e = engine.lock().unwrap();
        e.stop_ksmd();
        e.stats()
    };
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let r = summarize(
        system,
        backend.name(),
        args,
        w,
        achievable,
        timeline,
        cpu,
        claimed,
        before,
        after,
        writes,
        Some(stats),
        passes,
        first_pass_s,
    );
    drop(engine);
    Ok(r)
}

/// The same workload, fresh, under the kernel's ksmd alone.
pub fn run_ksmd(
    args: &DedupArgs,
    w: &dyn Subject,
    pages: u64,
    sleep: u64,
) -> anyhow::Result<SystemResult> {
    let system = format!("ksmd {pages}:{sleep}");
    let pb = progress_bar(args, &system);
    // ksmd merges across everything it is given: the domain policy cannot apply.
    let achievable = w.achievable_pages(DomainPolicy::All);
    let knobs = ksm::restore::KsmdKnobs::start(pages, sleep, None)
        .context("setting ksmd's knobs in /sys/kernel/mm/ksm (needs root)")?;
    ksm::restore::settle_ksmd(Duration::from_secs(30));
    let before = sys::smaps_rollup()?;
    let k0 = KernelKsm::read();
    let ksmd0 = sys::ksmd_cpu_seconds();
    let claimed_fn: Arc<dyn Fn() -> u64 + Send + Sync> = Arc::new(move || {
        KernelKsm::read()
            .saved_pages()
            .saturating_sub(k0.saved_pages())
            * PAGE_SIZE as u64
    });
    let cpu_fn: Arc<dyn Fn() -> f64 + Send + Sync> =
        Arc::new(move || sys::ksmd_cpu_seconds() - ksmd0);
    let t0 = Instant::now();
    for spec in w.region_specs() {
        // SAFETY: MADV_MERGEABLE changes no content.
        unsafe { sys::madvise(spec.addr, spec.len, libc::MADV_MERGEABLE) }
            .context("MADV_MERGEABLE")?;
    }
    let sampler = Sampler::start(t0, measured_fn(k0), claimed_fn.clone(), cpu_fn.clone());
    let writers = w.start_writers(args);
    while t0.elapsed().as_secs_f64() < args.duration {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(pb) = &pb {
            pb.set_message(format!(
                "saved {} MiB of {} MiB achievable, {:.1} s",
                claimed_fn() >> 20,
                (achievable * PAGE_SIZE as u64) >> 20,
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    let writes = writers.map(|w| w.stop()).unwrap_or_else(|| w.own_writes());
    let timeline = sampler.finish();
    let after = sys::smaps_rollup()?;
    let claimed = claimed_fn();
    let cpu = cpu_fn();
    drop(knobs);
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut r = summarize(
        system, "ksmd", args, w, achievable, timeline, cpu, claimed, before, after, writes, None,
        0, None,
    );
    r.domain = DomainPolicy::All;
    Ok(r)
}
