//! `memvirt run` and `memvirt demo`: boot a row of identical guests, wait until each
//! has applied its memory profile, and report boot times, exits and memory.

use crate::cpulist::parse_cpu_list;
use crate::devices::Phase;
use crate::guest::image::{Image, DEFAULT_IMAGE_SEED};
use crate::guest::profile::Profile;
use crate::guest::program::Mode;
use crate::host::{online_cpus, ProcessMemory};
use crate::machine::GuestConfig;
use crate::probe::{calibrate_with, translation_mode, Calibration};
use crate::report::Table;
use crate::runner::{Fleet, GuestReport};
use crate::units::{format_bytes, parse_size, SizeError, MIB, PAGE_SIZE};
use crate::vstate::memory::{validate_size, Backing, Thp};
use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn size_arg(s: &str) -> Result<u64, SizeError> {
    parse_size(s)
}

/// Arguments of `memvirt run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Number of identical guests.
    #[arg(long, default_value_t = 1)]
    pub guests: usize,
    /// Guest RAM per guest (K/M/G suffixes), a multiple of 4 KiB.
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    pub mem: u64,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// Host CPUs for every vCPU thread, taskset-style (e.g. 0,1 or 0-1).
    #[arg(long, value_name = "CPULIST")]
    pub pin: Option<String>,
    /// How guest RAM is backed on the host.
    #[arg(long, value_enum, default_value_t = Backing::Anon)]
    pub backing: Backing,
    /// Transparent huge page advice for guest RAM (default: leave the host's policy).
    #[arg(long, value_enum)]
    pub thp: Option<Thp>,
    /// Image file loaded at the same guest-physical address in every guest.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Size of the built-in pseudo-random image when --image is not given
    /// (default: a quarter of --mem).
    #[arg(long, value_parser = size_arg)]
    pub image_size: Option<u64>,
    /// Image pages that get a per-guest stamp (default: 1% of the image's pages).
    #[arg(long)]
    pub stamps: Option<u64>,
    /// RAM each guest makes its own, one store per page (default: a quarter of --mem).
    #[arg(long, value_parser = size_arg)]
    pub unique: Option<u64>,
    /// RAM each guest touches with zeros (default: a quarter of --mem).
    #[arg(long, value_parser = size_arg)]
    pub zeroed: Option<u64>,
    /// Keep the guests running this many seconds after they are ready (Ctrl-C ends early).
    #[arg(long, value_name = "SECS")]
    pub hold: Option<f64>,
    /// Give up on guests that are not ready after this many seconds.
    #[arg(long, default_value_t = 300.0, value_name = "SECS")]
    pub timeout: f64,
    /// Make a guest misbehave, to see how the run copes: `triple-fault@GUEST` or
    /// `error:CODE@GUEST` (may be repeated).
    #[arg(long, value_name = "FAULT@GUEST")]
    pub inject: Vec<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// `guests` × `mem` with every other option at its command-line default.
    pub fn new(guests: usize, mem: u64, json: bool) -> Self {
        RunArgs {
            guests,
            mem,
            vcpus: 1,
            pin: None,
            backing: Backing::Anon,
            thp: None,
            image: None,
            image_size: None,
            stamps: None,
            unique: None,
            zeroed: None,
            hold: None,
            timeout: 300.0,
            inject: Vec::new(),
            json,
        }
    }
}

/// A validated run plan.
#[derive(Debug)]
pub struct Plan {
    /// One config per guest.
    pub configs: Vec<GuestConfig>,
    /// The image.
    pub image: Image,
    /// The memory profile.
    pub profile: Profile,
}

fn parse_inject(spec: &str, guests: usize) -> anyhow::Result<(usize, Mode, u64)> {
    let bad = || {
        anyhow::anyhow!(
            "invalid --inject {spec:?}: expected triple-fault@GUEST or error:CODE@GUEST with GUEST in 0..{guests}"
        )
    };
    let (what, guest) = spec.rsplit_once('@').ok_or_else(bad)?;
    let guest: usize = guest.parse().map_err(|_| bad())?;
    if guest >= guests {
        return Err(bad());
    }
    if what == "triple-fault" {
        return Ok((guest, Mode::Fault, 0));
    }
    let code = what.strip_prefix("error:").ok_or_else(bad)?;
    let code: u64 = code.parse().map_err(|_| bad())?;
    if code > 0xff_ffff {
        return Err(bad());
    }
    Ok((guest, Mode::Error, code))
}

/// Checks every argument and prepares image and profile; nothing is mapped in a guest yet.
pub fn plan(args: &RunArgs) -> anyhow::Result<Plan> {
    if args.guests == 0 {
        bail!("--guests 0: expected at least one guest");
    }
    if args.vcpus == 0 {
        bail!("--vcpus 0: expected at least one vCPU per guest");
    }
    validate_size(args.mem).with_context(|| format!("--mem {}", format_bytes(args.mem)))?;
    let pin = match &args.pin {
        Some(list) => Some(parse_cpu_list(list, online_cpus()).context("--pin")?),
        None => None,
    };
    let quarter = (args.mem / 4) / PAGE_SIZE * PAGE_SIZE;
    let image = match &args.image {
        Some(path) => Image::from_file(path).context("--image")?,
        None => {
            let size = args.image_size.unwrap_or(quarter);
            if size > args.mem {
                bail!(
                    "--image-size {} is larger than guest RAM (--mem {}): expected at most {}",
                    format_bytes(size),
                    format_bytes(args.mem),
                    format_bytes(args.mem)
                );
            }
            Image::pseudo_random(size, DEFAULT_IMAGE_SEED)
        }
    };
    let image_pages = image.len().div_ceil(PAGE_SIZE);
    let stamps = args.stamps.unwrap_or(image_pages.div_ceil(100));
    let profile = Profile::new(
        args.mem,
        image.len(),
        stamps,
        args.unique.unwrap_or(quarter),
        args.zeroed.unwrap_or(quarter),
    )
    .context("memory profile")?;
    let base = GuestConfig {
        vcpus: args.vcpus,
        backing: args.backing,
        thp: args.thp,
        pin,
        ..GuestConfig::new(args.mem, Mode::Profile)
    };
    let mut configs = vec![base; args.guests];
    for spec in &args.inject {
        let (g, mode, code) = parse_inject(spec, args.guests)?;
        configs[g].mode = mode;
        configs[g].error_code = code;
    }
    Ok(Plan {
        configs,
        image,
        profile,
    })
}

/// The host facts printed next to every timing.
#[derive(Debug, Clone, Serialize)]
pub struct HostLine {
    /// `ept`, `npt`, `shadow-pvm`, `shadow` or `unknown`.
    pub translation_mode: &'static str,
    /// `native` or `emulated`.
    pub guest_execution: &'static str,
    /// Measured ns per guest instruction.
    pub guest_ns_per_instruction: f64,
    /// Measured ns per VM exit round trip.
    pub vm_exit_ns: f64,
}

impl HostLine {
    fn new(cal: &Calibration) -> Self {
        HostLine {
            translation_mode: translation_mode().as_str(),
            guest_execution: cal.execution.as_str(),
            guest_ns_per_instruction: cal.ns_per_instruction,
            vm_exit_ns: cal.exit_ns,
        }
    }

    fn describe(&self) -> String {
        format!(
            "host: translation {}, guest execution {} ({:.0} ns/instruction, {:.1} µs per VM exit; measured)",
            self.translation_mode,
            self.guest_execution,
            self.guest_ns_per_instruction,
            self.vm_exit_ns / 1e3
        )
    }
}

/// The JSON of `memvirt run`.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// Host facts next to the timings.
    pub host: HostLine,
    /// Guests asked for.
    pub guests_requested: usize,
    /// Guest RAM per guest.
    pub mem_bytes: u64,
    /// Backing.
    pub backing: Backing,
    /// Image source and size.
    pub image: String,
    /// Image size.
    pub image_bytes: u64,
    /// Stamped pages per guest.
    pub stamps: u64,
    /// Unique pages per guest.
    pub unique_pages: u64,
    /// Zeroed pages per guest.
    pub zeroed_pages: u64,
    /// Milliseconds from the first guest's set-up to the last guest's `Ready`.
    pub all_ready_ms: f64,
    /// One object per guest.
    pub guests: Vec<GuestReport>,
    /// The process's memory with all guests mapped (smaps_rollup).
    pub host_memory: ProcessMemory,
}

fn progress_bar(total: usize, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {pos}/{len} [{elapsed}]")
            .expect("static template"),
    );
    pb.set_message("guests ready");
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn sigint_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, flag.clone())
        .context("installing the Ctrl-C handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, flag.clone())
        .context("installing the SIGTERM handler")?;
    Ok(flag)
}

/// Boots the planned guests and returns the report; guests are stopped before it returns.
pub fn execute(args: &RunArgs, kvm_path: &Path) -> anyhow::Result<RunReport> {
    let plan = plan(args)?;
    let kvm = crate::vstate::vm::open_kvm(kvm_path)?;
    let cancel = sigint_flag()?;
    let cal = calibrate_with(&kvm).context("calibrating guest execution speed")?;
    let host = HostLine::new(&cal);
    let total_vcpus = args.guests * args.vcpus;
    let cores = online_cpus();
    if total_vcpus > cores {
        eprintln!(
            "warning: {total_vcpus} vCPUs on {cores} host CPUs: vCPU threads are ordinary host threads and will contend for the CPUs"
        );
    }
    let t0 = Instant::now();
    let mut fleet = Fleet::boot(&kvm, &plan.configs, &plan.image, &plan.profile)?;
    let pb = progress_bar(args.guests, args.json);
    fleet.wait_for(
        Phase::Ready,
        Duration::from_secs_f64(args.timeout),
        &cancel,
        |n| pb.set_position(n as u64),
    );
    pb.finish_and_clear();
    let all_ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(secs) = args.hold {
        if !args.json {
            eprintln!(
                "holding {} guests for {secs} s (Ctrl-C to stop)",
                args.guests
            );
        }
        let until = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < until && !cancel.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let host_memory = ProcessMemory::read().context("reading /proc/self/smaps_rollup")?;
    let guests = fleet.reports();
    fleet.shutdown();
    Ok(RunReport {
        host,
        guests_requested: args.guests,
        mem_bytes: args.mem,
        backing: args.backing,
        image: plan.image.source.clone(),
        image_bytes: plan.image.len(),
        stamps: plan.profile.stamps,
        unique_pages: plan.profile.unique_pages,
        zeroed_pages: plan.profile.zeroed_pages,
        all_ready_ms,
        guests,
        host_memory,
    })
}

/// Prints a report as tables.
pub fn print_tables(r: &RunReport) {
    println!("{}", r.host.describe());
    println!(
        "{} guests × {} ({:?} backing); image {} ({}); per guest: {} stamps, {} unique pages, {} zeroed pages",
        r.guests_requested,
        format_bytes(r.mem_bytes),
        r.backing,
        format_bytes(r.image_bytes),
        r.image,
        r.stamps,
        r.unique_pages,
        r.zeroed_pages
    );
    println!();
    let mut t = Table::new([
        "guest",
        "ready",
        "setup ms",
        "boot ms",
        "exits",
        "serial",
        "control",
        "hlt",
        "other",
        "pages touched",
        "resident",
        "serial lines",
        "status",
    ]);
    for g in &r.guests {
        let e = &g.exits;
        t.row([
            g.id.to_string(),
            if g.ready { "yes" } else { "no" }.to_string(),
            format!("{:.1}", g.setup_ms),
            g.boot_ms.map_or("-".into(), |m| format!("{m:.1}")),
            g.exits_total.to_string(),
            e.serial.to_string(),
            e.control.to_string(),
            e.hlt.to_string(),
            (e.other + e.other_io + e.mmio + e.interrupted + e.nop_port).to_string(),
            g.pages_touched.to_string(),
            format_bytes(g.resident_bytes),
            g.serial_lines.len().to_string(),
            g.failure.clone().unwrap_or_else(|| "ok".into()),
        ]);
    }
    print!("{}", t.render());
    println!();
    println!(
        "all guests ready after {:.1} ms; process memory (smaps_rollup): Rss {}, Pss {}, Anonymous {}, Shmem {}",
        r.all_ready_ms,
        format_bytes(r.host_memory.rss),
        format_bytes(r.host_memory.pss),
        format_bytes(r.host_memory.anonymous),
        format_bytes(r.host_memory.shmem)
    );
}

/// Fails the command when any guest failed, naming each.
pub fn check_guests(r: &RunReport) -> anyhow::Result<()> {
    let failed: Vec<String> = r
        .guests
        .iter()
        .filter_map(|g| g.failure.as_ref().map(|f| format!("guest {}: {f}", g.id)))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of {} guests failed ({}); the others ran to the end and were shut down",
            failed.len(),
            r.guests.len(),
            failed.join("; ")
        )
    }
}

/// Runs `memvirt run`.
pub fn run(args: &RunArgs, kvm_path: &Path) -> anyhow::Result<()> {
    let r = execute(args, kvm_path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_tables(&r);
    }
    check_guests(&r)
}

/// Arguments of `memvirt demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Skip the side-by-side run of the kernel's ksmd (which needs root to set
    /// /sys/kernel/mm/ksm, restored afterwards).
    #[arg(long)]
    pub no_ksmd: bool,
}

/// The JSON of `memvirt demo`.
#[derive(Serialize)]
struct DemoReport<'a> {
    /// The boot run.
    run: &'a RunReport,
    /// The engine and ksmd on fresh guests of the same kind.
    dedup: &'a [crate::dedup::SystemResult],
}

/// Runs `memvirt demo`: 4 guests × 256 MiB with the built-in image, then the same
/// guests deduplicated by memvirt's engine and, fresh, by the kernel's ksmd.
pub fn demo(args: &DemoArgs, kvm_path: &Path) -> anyhow::Result<()> {
    let run_args = RunArgs::new(4, 256 * MIB, args.json);
    let r = execute(&run_args, kvm_path)?;
    check_guests(&r)?;
    let mut words = vec!["--guests", "4", "--mem", "256M", "--duration", "4"];
    if args.no_ksmd {
        if !args.json {
            eprintln!("note: --no-ksmd: the kernel's ksmd is not run for comparison");
        }
    } else {
        words.extend(["--compare", "ksmd"]);
    }
    if args.json {
        words.push("--json");
    }
    let dedup_args = crate::dedup::args_from(&words)?;
    if !args.json {
        print_tables(&r);
        println!();
        eprintln!("deduplicating: memvirt's engine on the guests, then ksmd on fresh ones…");
    }
    let results = crate::dedup::measure(&dedup_args)?;
    if args.json {
        let out = DemoReport {
            run: &r,
            dedup: &results,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    crate::dedup::print_table(&dedup_args, &results);
    let n = r.guests.len() as u64;
    let image_pages = r.image_bytes.div_ceil(PAGE_SIZE);
    let identical = (image_pages - r.stamps) * (n - 1) * PAGE_SIZE;
    let zero = r.zeroed_pages * n * PAGE_SIZE;
    let engine = &results[0];
    let ksmd = results.get(1);
    println!();
    println!(
        "What you just saw: {n} KVM guests booted in this one process, each straight into 64-bit \
long mode on page tables memvirt wrote into its memory. memvirt loaded the same {image} image \
into every guest from the host side, as a boot loader would; then each guest's own program \
stamped {stamps} of its image pages with a per-guest value (as relocations make loaded kernels \
differ), wrote a per-guest value into {unique} pages of RAM (memory that is truly its own) and \
touched {zeroed} pages with zeros (freed memory), leaving the rest of RAM untouched and not \
resident. The first table shows each guest's boot time to ready and its VM exits (on this host \
every guest instruction is {exec}, see the host line). By construction {ident} of that memory is \
image content identical across guests and {zero} is all-zero pages. The second table merges it: \
memvirt's engine hashed every resident page in parallel, compared candidates byte for byte while \
each guest's vCPUs were parked, and remapped duplicates copy-on-write onto one shared copy, \
saving {saved} (the kernel's own Pss agrees: {measured}) in {t99} to 99%, with {cpu:.2} CPU-seconds \
and {lost} pages of guest memory changed.{ksmd}",
        image = format_bytes(r.image_bytes),
        stamps = r.stamps,
        unique = r.unique_pages,
        zeroed = r.zeroed_pages,
        exec = r.host.guest_execution,
        ident = format_bytes(identical),
        zero = format_bytes(zero),
        saved = format_bytes(engine.saved_bytes),
        measured = format_bytes(engine.saved_bytes_measured.max(0) as u64),
        t99 = engine.t99_s.map_or("never".into(), |t| format!("{t:.2} s")),
        cpu = engine.cpu_s,
        lost = engine.lost_writes,
        ksmd = ksmd.map_or(String::new(), |k| format!(
            " The kernel's ksmd, given fresh guests of the same kind and its fastest knobs, \
reached 99% in {} with {:.2} CPU-seconds and then kept a core busy rescanning.",
            k.t99_s.map_or("never (within the run)".into(), |t| format!("{t:.2} s")),
            k.cpu_s
        )),
    );
    Ok(())
}
