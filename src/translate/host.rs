//! What `memvirt translate` states about the host: its real translation mode, whether
//! guest execution is emulated, and the measured cost of one VM exit, which prices the
//! exits shadow paging would take.

use crate::probe::{calibrate_guest, translation_mode, GuestExecution};
use serde::Serialize;

/// The host facts printed above the results.
#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    /// "ept", "npt", "shadow-pvm", "shadow" or "unknown" (from /sys/module).
    pub translation_mode: &'static str,
    /// "native", "emulated", or "unknown" when no guest could be calibrated.
    pub guest_execution: &'static str,
    /// Nanoseconds per guest instruction, measured (None without calibration).
    pub ns_per_instruction: Option<f64>,
    /// Nanoseconds per VM exit round trip used for the shadow sync cost.
    pub exit_ns: Option<f64>,
    /// "measured" (live port-I/O guest), "given" (--exit-ns) or "unavailable".
    pub exit_ns_source: &'static str,
    /// Why calibration did not run or failed, if it did not.
    pub calibration_note: Option<String>,
    /// Whether the host could time the working set inside a real guest (EPT/NPT and
    /// native execution), and why it was not done.
    pub in_guest_timing: String,
}

/// Probes the host and calibrates a live guest; `exit_ns`, when given, replaces the
/// measured exit cost.
pub fn host_facts(exit_ns: Option<f64>) -> HostFacts {
    let mode = translation_mode();
    let (execution, ns_per_instruction, measured_exit, note) = match calibrate_guest() {
        // The probe clamps a loop too short to time (two runs that took the same time on a
        // loaded host) to its floor of 0.01 ns: say so rather than trust the class.
        Ok(c) if c.ns_per_instruction <= 0.011 => (
            Some(c.execution),
            Some(c.ns_per_instruction),
            Some(c.exit_ns),
            Some("calibration loop could not be timed (ns per instruction at the probe's floor; host busy?): execution class and exit cost are unreliable; rerun or pass --exit-ns".to_string()),
        ),
        Ok(c) => (
            Some(c.execution),
            Some(c.ns_per_instruction),
            Some(c.exit_ns),
            None,
        ),
        Err(e) => (
            None,
            None,
            None,
            Some(format!("live calibration failed: {e:#}")),
        ),
    };
    let (exit, source) = match (exit_ns, measured_exit) {
        (Some(x), _) => (Some(x), "given"),
        (None, Some(x)) => (Some(x), "measured"),
        (None, None) => (None, "unavailable"),
    };
    let hardware_2d = matches!(mode.as_str(), "ept" | "npt");
    let in_guest_timing = match (hardware_2d, execution) {
        (true, Some(GuestExecution::Native)) => {
            "skipped: in-guest timing of the working set is not part of this build; the host could support it (EPT/NPT, native guests)".to_string()
        }
        (_, Some(GuestExecution::Emulated)) => format!(
            "skipped: host translation is {} and guest instructions are emulated, so a guest would time KVM's instruction emulator, not address translation",
            mode.as_str()
        ),
        _ => format!(
            "skipped: host translation is {} (in-guest timing needs EPT/NPT with natively running guests)",
            mode.as_str()
        ),
    };
    HostFacts {
        translation_mode: mode.as_str(),
        guest_execution: execution.map_or("unknown", |e| e.as_str()),
        ns_per_instruction,
        exit_ns: exit,
        exit_ns_source: source,
        calibration_note: note,
        in_guest_timing,
    }
}
