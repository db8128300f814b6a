//! Host settings changed for a run (ksmd's knobs in /sys/kernel/mm/ksm,
//! vm.max_map_count) and put back afterwards: from a guard's `Drop` (normal end, error,
//! panic unwinding) and from a signal thread on SIGINT/SIGTERM/SIGHUP (Ctrl-C), which
//! restores everything still registered and then lets the signal take its default course.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

struct Entry {
    id: u64,
    path: String,
    original: String,
}

static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static SIGNALS: Once = Once::new();

fn registry() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn install_signal_thread() {
    SIGNALS.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("ksm-restore".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    restore_all();
                    let _ = signal_hook::low_level::emulate_default_handler(sig);
                    std::process::exit(128 + sig);
                }
            });
    });
}

/// Restores every setting still registered (newest first). Called by the signal thread;
/// callable by a program that wants to exit abruptly.
pub fn restore_all() {
    let mut reg = registry();
    while let Some(e) = reg.pop() {
        let _ = std::fs::write(&e.path, &e.original);
    }
}

/// One file (a sysfs or sysctl setting) set to a value and restored when dropped.
pub struct FileRestore {
    id: u64,
    path: String,
}

impl FileRestore {
    /// Writes `value` into `path`, remembering the current content.
    pub fn set(path: &str, value: &str) -> io::Result<FileRestore> {
        install_signal_thread();
        let original = read_setting(path)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        registry().push(Entry {
            id,
            path: path.to_string(),
            original,
        });
        let guard = FileRestore {
            id,
            path: path.to_string(),
        };
        std::fs::write(path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {value:?} to {path}: {e}")))?;
        Ok(guard)
    }

    /// The path this guard restores.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Drop for FileRestore {
    fn drop(&mut self) {
        let mut reg = registry();
        if let Some(i) = reg.iter().position(|e| e.id == self.id) {
            let e = reg.remove(i);
            let _ = std::fs::write(&e.path, &e.original);
        }
    }
}

/// Reads a setting as it would be written back. Selector files such as
/// `advisor_mode` (`"[none] scan-time"`) are reduced to the selected word.
pub fn read_setting(path: &str) -> io::Result<String> {
    let s = std::fs::read_to_string(path)?;
    let s = s.trim();
    if let (Some(a), Some(b)) = (s.find('['), s.find(']')) {
        if a < b {
            return Ok(s[a + 1..b].to_string());
        }
    }
    Ok(s.to_string())
}

/// Directory of ksmd's knobs.
pub const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";

/// Every writable file of /sys/kernel/mm/ksm with its value: what the tests compare
/// before and after a run.
pub fn ksm_knobs_snapshot() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(KSM_SYSFS) else {
        return m;
    };
    for e in rd.flatten() {
        use std::os::unix::fs::PermissionsExt;
        let Ok(md) = e.metadata() else { continue };
        if md.permissions().mode() & 0o200 == 0 {
            continue;
        }
        let p = e.path();
        if let Ok(v) = read_setting(&p.to_string_lossy()) {
            m.insert(e.file_name().to_string_lossy().into_owned(), v);
        }
    }
    m
}

/// ksmd's knobs set for a run; everything is put back when dropped (newest first).
pub struct KsmdKnobs {
    guards: Vec<FileRestore>,
}

impl KsmdKnobs {
    /// Sets `pages_to_scan` and `sleep_millisecs`, optionally `use_zero_pages`, then
    /// `run=1`. Fails (restoring what it already changed) if sysfs is not writable.
    pub fn start(
        pages_to_scan: u64,
        sleep_ms: u64,
        use_zero_pages: Option<bool>,
    ) -> io::Result<KsmdKnobs> {
        let mut k = KsmdKnobs { guards: Vec::new() };
        k.set("pages_to_scan", &pages_to_scan.to_string())?;
        k.set("sleep_millisecs", &sleep_ms.to_string())?;
        if let Some(z) = use_zero_pages {
            k.set("use_zero_pages", if z { "1" } else { "0" })?;
        }
        k.set("run", "1")?;
        Ok(k)
    }

    /// Sets one more knob (restored with the others).
    pub fn set(&mut self, knob: &str, value: &str) -> io::Result<()> {
        let g = FileRestore::set(&format!("{KSM_SYSFS}/{knob}"), value)?;
        self.guards.push(g);
        Ok(())
    }
}

impl Drop for KsmdKnobs {
    fn drop(&mut self) {
        while let Some(g) = self.guards.pop() {
            drop(g);
        }
    }
}

/// Reads one of ksmd's counters (pages_sharing, full_scans, ...); 0 if absent.
pub fn ksm_counter(name: &str) -> u64 {
    crate::sys::read_u64(&format!("{KSM_SYSFS}/{name}")).unwrap_or(0)
}

/// ksmd lowers its counters for memory unmapped since it last looked (an earlier run's,
/// or an exited process's) only when it scans again. Runs ksmd for two full scans (its
/// knobs restored afterwards) so that a measurement can start from settled counters.
/// Returns false if sysfs is not writable or ksmd did not finish within `timeout`.
pub fn settle_ksmd(timeout: std::time::Duration) -> bool {
    let Ok(_k) = KsmdKnobs::start(100_000, 0, None) else {
        return false;
    };
    let f0 = ksm_counter("full_scans");
    let t = std::time::Instant::now();
    let idle = || {
        [
            "pages_shared",
            "pages_sharing",
            "pages_unshared",
            "pages_volatile",
        ]
        .iter()
        .all(|c| ksm_counter(c) == 0)
    };
    // With nothing registered ksmd sleeps and full_scans stands still.
    while ksm_counter("full_scans") < f0 + 2 && !idle() {
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}
