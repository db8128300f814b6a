//! `memvirt probe`: what this host offers a memory-centred VMM, measured.
//!
//! The translation mode comes from the KVM modules' parameters: EPT from
//! `kvm_intel`, NPT from `kvm_amd`, and shadow paging in the host kernel when the
//! `kvm_pvm` module (pagetable-based virtual machine) is loaded or EPT/NPT are off.
//! Guest execution speed is measured, not assumed: a calibration guest runs a
//! counted loop of two instructions per iteration between two control-port writes,
//! timed by the VMM from exit to exit (median of three runs), which gives nanoseconds
//! per guest instruction independent of boot cost. A second guest loops on port writes to
//! give the cost of one VM exit round trip.

use crate::devices::Phase;
use crate::guest::image::Image;
use crate::guest::profile::Profile;
use crate::guest::program::{Mode, CALIBRATE_INSNS_PER_ITER};
use crate::machine::GuestConfig;
use crate::runner::Fleet;
use anyhow::{anyhow, Context};
use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// How the host translates guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TranslationMode {
    /// Intel EPT (two-dimensional hardware walk).
    #[serde(rename = "ept")]
    Ept,
    /// AMD NPT (two-dimensional hardware walk).
    #[serde(rename = "npt")]
    Npt,
    /// Shadow page tables kept by the host kernel for PVM guests.
    #[serde(rename = "shadow-pvm")]
    ShadowPvm,
    /// Shadow page tables (EPT/NPT switched off).
    #[serde(rename = "shadow")]
    Shadow,
    /// No KVM vendor module found.
    #[serde(rename = "unknown")]
    Unknown,
}

impl TranslationMode {
    /// The name used in reports and JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            TranslationMode::Ept => "ept",
            TranslationMode::Npt => "npt",
            TranslationMode::ShadowPvm => "shadow-pvm",
            TranslationMode::Shadow => "shadow",
            TranslationMode::Unknown => "unknown",
        }
    }
}

fn module_param(module: &str, param: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/module/{module}/parameters/{param}"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn is_on(v: &str) -> bool {
    matches!(v, "Y" | "y" | "1")
}

/// Decides the translation mode from which modules are loaded and their parameters.
pub fn translation_mode_from(
    pvm_loaded: bool,
    intel_ept: Option<&str>,
    amd_npt: Option<&str>,
) -> TranslationMode {
    if pvm_loaded {
        return TranslationMode::ShadowPvm;
    }
    match (intel_ept, amd_npt) {
        (Some(e), _) if is_on(e) => TranslationMode::Ept,
        (_, Some(n)) if is_on(n) => TranslationMode::Npt,
        (Some(_), _) | (_, Some(_)) => TranslationMode::Shadow,
        _ => TranslationMode::Unknown,
    }
}

/// The host's translation mode, read from /sys/module.
pub fn translation_mode() -> TranslationMode {
    translation_mode_from(
        std::path::Path::new("/sys/module/kvm_pvm").exists(),
        module_param("kvm_intel", "ept").as_deref(),
        module_param("kvm_amd", "npt").as_deref(),
    )
}

/// Whether guest instructions run natively or through KVM's emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestExecution {
    /// At hardware speed.
    Native,
    /// Far slower than hardware: instructions are emulated.
    Emulated,
}

impl GuestExecution {
    /// The name used in reports and JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            GuestExecution::Native => "native",
            GuestExecution::Emulated => "emulated",
        }
    }
}

/// Above this many nanoseconds per simple instruction, execution counts as emulated
/// (native is well under 1 ns; emulation here is ~1300 ns).
pub const EMULATED_THRESHOLD_NS: f64 = 50.0;

/// Measured guest speed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Calibration {
    /// Nanoseconds per guest instruction (counted loop).
    pub ns_per_instruction: f64,
    /// Native or emulated, from `ns_per_instruction`.
    pub execution: GuestExecution,
    /// Nanoseconds per port-I/O VM exit round trip (the exit, the VMM's handling, the
    /// re-entry), loop overhead subtracted.
    pub exit_ns: f64,
}

fn phase_interval(fleet: &Fleet, from: Phase, to: Phase) -> Option<Duration> {
    let p = fleet.phases(0);
    let a = p.iter().find(|(x, _)| *x == from)?.1;
    let b = p.iter().find(|(x, _)| *x == to)?.1;
    Some(b.saturating_duration_since(a))
}

fn timed_loop(kvm: &Kvm, mode: Mode, count: u64) -> anyhow::Result<Duration> {
    let mem = 4 << 20;
    let cfg = GuestConfig {
        loop_count: count,
        ..GuestConfig::new(mem, mode)
    };
    let profile = Profile::new(mem, 0, 0, 0, 0)?;
    let image = Image::pseudo_random(0, 0);
    let mut fleet = Fleet::boot(kvm, &[cfg], &image, &profile)?;
    fleet.wait_for(
        Phase::Done,
        Duration::from_secs(60),
        &std::sync::atomic::AtomicBool::new(false),
        |_| {},
    );
    if let Some(f) = fleet.failure(0) {
        return Err(anyhow!("calibration guest failed: {f}"));
    }
    let d = phase_interval(&fleet, Phase::Started, Phase::Done)
        .ok_or_else(|| anyhow!("calibration guest did not report Started and Done"))?;
    fleet.shutdown();
    Ok(d)
}

/// Median of three timings of a loop guest (the host is shared and noisy).
fn median_loop(kvm: &Kvm, mode: Mode, count: u64) -> anyhow::Result<Duration> {
    let mut v = [
        timed_loop(kvm, mode, count)?,
        timed_loop(kvm, mode, count)?,
        timed_loop(kvm, mode, count)?,
    ];
    v.sort();
    Ok(v[1])
}

/// Runs the calibration guests: ns per instruction and per VM exit.
///
/// The timed interval runs from the guest's `Started` write to its `Done` write, both
/// VM exits the VMM timestamps, so boot and set-up are outside it; the loop is made
/// long enough (≥ 20 ms) that the one exit inside it does not matter.
pub fn calibrate_with(kvm: &Kvm) -> anyhow::Result<Calibration> {
    let mut n = 20_000u64;
    let looped = loop {
        let d = median_loop(kvm, Mode::Calibrate, n)?;
        if d > Duration::from_millis(20) || n >= 1 << 32 {
            break d;
        }
        n *= 16;
    };
    let ns_per_instruction =
        (looped.as_nanos() as f64 / (n * CALIBRATE_INSNS_PER_ITER) as f64).max(0.01);
    let exits = 2_000u64;
    let e = median_loop(kvm, Mode::ExitLoop, exits)?;
    // Each iteration is one `out` (the exit) plus `dec; jnz`.
    let per_iter = e.as_nanos() as f64 / exits as f64;
    let exit_ns = (per_iter - 2.0 * ns_per_instruction).max(0.0);
    let execution = if ns_per_instruction > EMULATED_THRESHOLD_NS {
        GuestExecution::Emulated
    } else {
        GuestExecution::Native
    };
    Ok(Calibration {
        ns_per_instruction,
        execution,
        exit_ns,
    })
}

/// Opens /dev/kvm and calibrates.
pub fn calibrate_guest() -> anyhow::Result<Calibration> {
    let kvm = crate::vstate::vm::open_kvm(std::path::Path::new("/dev/kvm"))?;
    calibrate_with(&kvm)
}

/// Everything `memvirt probe` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// KVM_GET_API_VERSION.
    pub kvm_api_version: i32,
    /// The KVM capabilities memvirt uses, and whether each is present.
    pub kvm_capabilities: BTreeMap<String, bool>,
    /// KVM_CAP_NR_MEMSLOTS.
    pub kvm_max_memslots: usize,
    /// How the host translates guest memory.
    pub translation_mode: TranslationMode,
    /// Loaded KVM modules among kvm_intel, kvm_amd, kvm_pvm.
    pub kvm_modules: Vec<String>,
    /// Measured nanoseconds per guest instruction.
    pub guest_ns_per_instruction: f64,
    /// `native` or `emulated`.
    pub guest_execution: GuestExecution,
    /// Measured nanoseconds per port-I/O VM exit round trip.
    pub vm_exit_ns: f64,
    /// /sys/kernel/mm/ksm knobs and counters.
    pub ksm: BTreeMap<String, String>,
    /// THP mode.
    pub thp_mode: Option<String>,
    /// vm.max_map_count.
    pub max_map_count: Option<u64>,
    /// This process's mappings now.
    pub map_count: Option<u64>,
    /// Memory cgroup availability.
    pub memory_cgroup: crate::host::MemoryCgroup,
    /// CPUs available.
    pub cpus: usize,
    /// MemTotal.
    pub mem_total_bytes: Option<u64>,
    /// MemAvailable.
    pub mem_available_bytes: Option<u64>,
}

/// Probes the host through the KVM device at `kvm_path`.
pub fn probe(kvm_path: &std::path::Path) -> anyhow::Result<ProbeReport> {
    let kvm = crate::vstate::vm::open_kvm(kvm_path)?;
    let caps = [
        ("KVM_CAP_USER_MEMORY", Cap::UserMemory),
        ("KVM_CAP_IMMEDIATE_EXIT", Cap::ImmediateExit),
        ("KVM_CAP_SYNC_MMU", Cap::SyncMmu),
        ("KVM_CAP_NR_MEMSLOTS", Cap::NrMemslots),
        ("KVM_CAP_DIRTY_LOG_RING", Cap::DirtyLogRing),
    ];
    let mut kvm_capabilities: BTreeMap<String, bool> = caps
        .iter()
        .map(|(n, c)| (n.to_string(), kvm.check_extension(*c)))
        .collect();
    kvm_capabilities.insert(
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2".into(),
        kvm.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) > 0,
    );
    let cal = calibrate_with(&kvm).context("calibrating guest execution speed")?;
    let kvm_modules = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .iter()
        .filter(|m| std::path::Path::new(&format!("/sys/module/{m}")).exists())
        .map(|m| m.to_string())
        .collect();
    Ok(ProbeReport {
        kvm_api_version: kvm.get_api_version(),
        kvm_capabilities,
        kvm_max_memslots: kvm.get_nr_memslots(),
        translation_mode: translation_mode(),
        kvm_modules,
        guest_ns_per_instruction: cal.ns_per_instruction,
        guest_execution: cal.execution,
        vm_exit_ns: cal.exit_ns,
        ksm: crate::host::ksm_sysfs(),
        thp_mode: crate::host::thp_mode(),
        max_map_count: crate::host::max_map_count(),
        map_count: crate::host::map_count(),
        memory_cgroup: crate::host::memory_cgroup(),
        cpus: crate::host::online_cpus(),
        mem_total_bytes: crate::host::mem_total_bytes(),
        mem_available_bytes: crate::host::mem_available_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translation_mode_rules() {
        assert_eq!(
            translation_mode_from(true, Some("Y"), None),
            TranslationMode::ShadowPvm
        );
        assert_eq!(
            translation_mode_from(false, Some("Y"), None),
            TranslationMode::Ept
        );
        assert_eq!(
            translation_mode_from(false, Some("N"), None),
            TranslationMode::Shadow
        );
        assert_eq!(
            translation_mode_from(false, None, Some("1")),
            TranslationMode::Npt
        );
        assert_eq!(
            translation_mode_from(false, None, Some("0")),
            TranslationMode::Shadow
        );
        assert_eq!(
            translation_mode_from(false, None, None),
            TranslationMode::Unknown
        );
    }
}
