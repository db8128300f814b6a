//! `memvirt dedup --guests`: the userspace KSM engine on the RAM of live guests, held
//! still through their vCPUs and fed by KVM's dirty log.

mod common;

use common::{have_kvm, memvirt};

#[test]
fn live_guests_are_deduplicated_safely_and_the_kernel_agrees() {
    if !have_kvm("live_guests_are_deduplicated") {
        return;
    }
    let (code, out, err) = memvirt(&[
        "dedup",
        "--guests",
        "2",
        "--mem",
        "128M",
        "--duration",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v.as_array().unwrap()[0];
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
