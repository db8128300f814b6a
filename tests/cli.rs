//! The command line: probe and run output, and every bad input the VMM core must
//! refuse with a clear error (and without leaving anything behind).

mod common;

use common::{have_kvm, memvirt};

/// Runs memvirt expecting failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let (code, out, err) = memvirt(args);
    assert_ne!(code, 0, "memvirt {args:?} should fail; stdout: {out}");
    err
}

fn assert_mentions(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
}

const SMALL: &[&str] = &[
    "run",
    "--mem",
    "16M",
    "--image-size",
    "1M",
    "--unique",
    "1M",
    "--zeroed",
    "1M",
];

fn small(extra: &[&str]) -> Vec<String> {
    SMALL.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn run_small(extra: &[&str]) -> (i32, String, String) {
    let args = small(extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    memvirt(&refs)
}

#[test]
fn zero_guests_is_refused() {
    assert_mentions(
        &fails(&["run", "--guests", "0"]),
        &["--guests 0", "at least one guest"],
    );
}

#[test]
fn zero_vcpus_is_refused() {
    assert_mentions(
        &fails(&["run", "--vcpus", "0"]),
        &["--vcpus 0", "at least one vCPU"],
    );
}

#[test]
fn memory_sizes_are_checked() {
    assert_mentions(&fails(&["run", "--mem", "5000"]), &["multiple of 4 KiB"]);
    assert_mentions(
        &fails(&["run", "--mem", "0"]),
        &["non-zero multiple of 4 KiB"],
    );
    assert_mentions(
        &fails(&["run", "--mem", "4096G"]),
        &["larger than the host can map"],
    );
    assert_mentions(&fails(&["run", "--mem", "12Q"]), &["12Q", "K, M or G"]);
}

#[test]
fn image_larger_than_ram_is_refused() {
    assert_mentions(
        &fails(&["run", "--mem", "16M", "--image-size", "32M"]),
        &["--image-size", "larger than guest RAM"],
    );
    let dir = std::env::temp_dir().join(format!("memvirt-img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("big.img");
    std::fs::write(&big, vec![7u8; 20 << 20]).unwrap();
    let err = fails(&["run", "--mem", "16M", "--image", big.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_mentions(&err, &["image of 20.0 MiB is larger than guest RAM"]);
}

#[test]
fn missing_or_unreadable_image_is_refused() {
    assert_mentions(
        &fails(&["run", "--image", "/nonexistent/kernel.img"]),
        &["--image", "/nonexistent/kernel.img", "No such file"],
    );
    // A directory cannot be read as an image, even by root.
    assert_mentions(
        &fails(&["run", "--image", "/"]),
        &["--image", "cannot read image file /"],
    );
}

#[test]
fn bad_pin_lists_are_refused() {
    assert_mentions(
        &fails(&["run", "--pin", "0,x"]),
        &["--pin", "invalid CPU list \"0,x\""],
    );
    assert_mentions(&fails(&["run", "--pin", "0-4096"]), &["--pin", "names CPU"]);
}

#[test]
fn hugetlb_without_reserved_pages_names_nr_hugepages() {
    if !have_kvm("hugetlb_without_reserved_pages_names_nr_hugepages") {
        return;
    }
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    if free >= 8 {
        println!("skipped: this host has huge pages reserved");
        return;
    }
    let (code, _, err) = run_small(&["--backing", "hugetlb"]);
    assert_ne!(code, 0);
    assert_mentions(&err, &["/proc/sys/vm/nr_hugepages"]);
}

#[test]
fn missing_kvm_device_says_how_to_check() {
    let err = fails(&["--kvm", "/nonexistent/kvm", "run", "--mem", "16M"]);
    assert_mentions(&err, &["/nonexistent/kvm", "ls -l /nonexistent/kvm"]);
    let err = fails(&["--kvm", "/nonexistent/kvm", "probe"]);
    assert_mentions(&err, &["/nonexistent/kvm"]);
}

#[test]
fn a_triple_faulting_guest_is_named_and_the_others_finish() {
    if !have_kvm("a_triple_faulting_guest_is_named") {
        return;
    }
    let (code, out, err) = run_small(&["--guests", "3", "--inject", "triple-fault@1", "--json"]);
    assert_ne!(code, 0);
    assert_mentions(&err, &["1 of 3 guests failed", "guest 1", "triple fault"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON even when a guest fails");
    let guests = v["guests"].as_array().unwrap();
    assert_eq!(guests[1]["ready"], false);
    for i in [0, 2] {
        assert_eq!(guests[i]["ready"], true, "guest {i} still finishes");
        assert!(guests[i]["failure"].is_null());
    }
}

#[test]
fn a_guest_reporting_an_error_is_named_with_its_code() {
    if !have_kvm("a_guest_reporting_an_error_is_named") {
        return;
    }
    let (code, _, err) = run_small(&["--guests", "2", "--inject", "error:42@0"]);
    assert_ne!(code, 0);
    assert_mentions(&err, &["guest 0: guest program reported error code 42"]);
    assert_mentions(
        &fails(&["run", "--inject", "meltdown@0"]),
        &["invalid --inject"],
    );
    assert_mentions(
        &fails(&["run", "--inject", "triple-fault@5"]),
        &["invalid --inject"],
    );
}

#[test]
fn run_json_has_one_object_per_guest_and_host_memory() {
    if !have_kvm("run_json_has_one_object_per_guest") {
        return;
    }
    let (code, out, err) = run_small(&["--guests", "2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let guests = v["guests"].as_array().unwrap();
    assert_eq!(guests.len(), 2);
    for (i, g) in guests.iter().enumerate() {
        assert_eq!(g["id"], i);
        assert_eq!(g["ready"], true);
        assert!(g["boot_ms"].as_f64().unwrap() > 0.0);
        assert!(g["exits"]["control"].as_u64().unwrap() >= 2);
        // 1% of 256 image pages → 3 stamps, 256 unique, 256 zeroed.
        assert_eq!(g["pages_touched"], 3 + 256 + 256);
    }
    let rss = v["host_memory"]["rss"].as_u64().unwrap();
    assert!(
        rss > 2 * (3 << 20),
        "both guests' touched memory is resident: {rss}"
    );
    assert!(v["host"]["translation_mode"].is_string());
}

#[test]
fn run_prints_a_table_and_warns_when_vcpus_outnumber_cores() {
    if !have_kvm("run_prints_a_table") {
        return;
    }
    let cores = memvirt::host::online_cpus();
    let guests = (cores + 1).to_string();
    let (code, out, err) = run_small(&["--guests", &guests]);
    assert_eq!(code, 0, "{err}");
    assert_mentions(&err, &["will contend"]);
    assert_mentions(
        &out,
        &["guest", "boot ms", "pages touched", "Rss", "translation"],
    );
    assert_eq!(
        out.lines().filter(|l| l.contains(" yes ")).count(),
        cores + 1
    );
}

#[test]
fn probe_reports_translation_mode_and_a_calibrated_speed() {
    if !have_kvm("probe_reports_translation_mode") {
        return;
    }
    let (code, out, err) = memvirt(&["probe", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mode = v["translation_mode"].as_str().unwrap();
    assert!(["ept", "npt", "shadow-pvm", "shadow", "unknown"].contains(&mode));
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(mode, "shadow-pvm");
    }
    let ns = v["guest_ns_per_instruction"].as_f64().unwrap();
    assert!(ns > 0.0);
    let exec = v["guest_execution"].as_str().unwrap();
    assert_eq!(exec, if ns > 50.0 { "emulated" } else { "native" });
    assert!(v["max_map_count"].as_u64().unwrap() > 0);
    let (code, text, _) = memvirt(&["probe"]);
    assert_eq!(code, 0);
    assert_mentions(
        &text,
        &["translation mode", mode, "ns per guest instruction"],
    );
}

#[test]
fn ctrl_c_during_hold_shuts_down_cleanly_with_a_report() {
    if !have_kvm("ctrl_c_during_hold_shuts_down_cleanly") {
        return;
    }
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_memvirt"))
        .args(small(&["--guests", "2", "--hold", "600"]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("holding") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "memvirt ended before holding"
        );
    }
    let started = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "clean exit after Ctrl-C: {:?}",
        out.status
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_mentions(&stdout, &["boot ms", "Rss"]);
}

#[test]
fn memfd_backing_is_accounted_as_shmem_and_thp_advice_is_accepted() {
    if !have_kvm("memfd_backing_is_accounted_as_shmem") {
        return;
    }
    let (code, out, err) = run_small(&["--guests", "2", "--backing", "memfd", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let shmem = v["host_memory"]["shmem"].as_u64().unwrap();
    assert!(
        shmem >= 2 * (3 << 20),
        "memfd guest RAM shows as Shmem: {shmem}"
    );
    for thp in ["on", "off"] {
        let (code, _, err) = run_small(&["--thp", thp]);
        assert_eq!(code, 0, "--thp {thp}: {err}");
    }
}
