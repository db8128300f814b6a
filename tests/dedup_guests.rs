//! `memvirt dedup --guests`: the userspace KSM engine on the RAM of live guests, held
//! still through their vCPUs and fed by KVM's dirty log.

mod common;

use common::{have_kvm, memvirt};

/// Runs `memvirt dedup ARGS --json`, expects success, returns the engine's result.
fn engine_result(args: &[&str]) -> serde_json::Value {
    let all: Vec<&str> = std::iter::once("dedup")
        .chain(args.iter().copied())
        .chain(["--json"])
        .collect();
    let (code, out, err) = memvirt(&all);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

#[test]
fn live_guests_are_deduplicated_safely_and_the_kernel_agrees() {
    if !have_kvm("live_guests_are_deduplicated") {
        return;
    }
    let r = &engine_result(&["--guests", "2", "--mem", "128M", "--duration", "1"]);
    let page = 4096u64;
    // By construction: a 32 MiB image (8192 pages) with 82 stamped pages per guest is
    // shared but for the stamps, and 8192 zeroed pages per guest are all zero; the few
    // identical boot pages (program, GDT, page tables) come on top. (128 MiB guests:
    // with less, a MiB of unrelated heap churn in the process is >2% of the saving.)
    let by_construction = (8192 - 82) + 2 * 8192;
    let achievable = r["achievable_bytes"].as_u64().unwrap() / page;
    assert!(
        (by_construction..by_construction + 64).contains(&achievable),
        "achievable {achievable} pages, by construction {by_construction}"
    );
    let measured = r["saved_bytes_measured"].as_i64().unwrap() as u64 / page;
    assert!(
        measured * 100 >= achievable * 95,
        "measured {measured} of {achievable}"
    );
    assert_eq!(
        r["lost_writes"], 0,
        "no guest page changed under the engine"
    );
    assert_eq!(r["agreement"]["agree"], true, "{}", r["agreement"]);
}

#[test]
fn dedup_needs_a_subject() {
    let (code, _, err) = memvirt(&["dedup"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--synthetic") && err.contains("--guests"),
        "{err}"
    );
    let (code, _, err) = memvirt(&["dedup", "--synthetic", "--size", "5000"]);
    assert_ne!(code, 0);
    assert!(err.contains("multiple of 4 KiB"), "{err}");
}

/// The KSM tests' cross-process lock: tests that let ksmd run must not overlap.
fn ksm_sysfs_lock() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/memvirt-ksm-tests.lock")
        .unwrap();
    // SAFETY: flock on our own descriptor; blocks until the lock is free.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

fn ksm_knobs() -> Vec<(String, String)> {
    let counters = [
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "pages_skipped",
        "pages_scanned",
        "full_scans",
        "stable_node_chains",
        "stable_node_dups",
        "ksm_zero_pages",
        "general_profit",
    ];
    let mut v: Vec<(String, String)> = std::fs::read_dir("/sys/kernel/mm/ksm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !counters.contains(&n.as_str()))
                .map(|n| {
                    let v = std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{n}"))
                        .unwrap_or_default();
                    (n, v)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn demo_boots_merges_and_compares_with_ksmd_leaving_sysfs_as_it_was() {
    if !have_kvm("demo_boots_merges_and_compares_with_ksmd") {
        return;
    }
    let writable = std::fs::OpenOptions::new()
        .write(true)
        .open("/sys/kernel/mm/ksm/run")
        .is_ok();
    let _lock = ksm_sysfs_lock();
    let before = ksm_knobs();
    let args: &[&str] = if writable {
        &["demo", "--json"]
    } else {
        println!("/sys/kernel/mm/ksm is not writable: demo without ksmd");
        &["demo", "--json", "--no-ksmd"]
    };
    let (code, out, err) = memvirt(args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ksm_knobs(), before, "ksm sysfs restored");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["run"]["guests"].as_array().unwrap().len(), 4);
    let dedup = v["dedup"].as_array().unwrap();
    assert_eq!(dedup.len(), if writable { 2 } else { 1 });
    for r in dedup {
        let ach = r["achievable_bytes"].as_f64().unwrap();
        assert!(ach > 400.0 * 1048576.0, "4 guests share > 400 MiB: {ach}");
        assert!(
            r["saved_bytes_measured"].as_f64().unwrap() >= 0.95 * ach,
            "{}",
            r["system"]
        );
        assert_eq!(r["lost_writes"], 0);
    }
}

#[test]
fn guests_writing_merged_pages_lose_no_write() {
    if !have_kvm("guests_writing_merged_pages_lose_no_write") {
        return;
    }
    // Each guest rewrites 32 image pages every ~300 ms and checks its previous write
    // each time; the engine merges those pages between rounds, so writes land on merged
    // pages (copy-on-write breaks) over and over.
    let r = &engine_result(&[
        "--guests",
        "2",
        "--mem",
        "64M",
        "--guest-writes",
        "32",
        "--guest-write-period-ms",
        "300",
        "--interval-ms",
        "100",
        "--duration",
        "3",
    ]);
    let writes = r["writes"].as_u64().unwrap();
    let cow = r["engine"]["cow_breaks"].as_u64().unwrap();
    assert!(writes >= 2 * 32 * 3, "guests wrote {writes} pages");
    assert!(
        cow > 0,
        "guest writes hit merged pages ({cow} copy-on-write breaks)"
    );
    assert_eq!(
        r["lost_writes"], 0,
        "every guest found its previous write every time"
    );
}
