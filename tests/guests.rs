//! Live guests on real KVM: memory contents as seen from the host, phases and serial
//! output, pause/resume, CPU pinning and KVM's dirty log.

mod common;

use common::{kvm_or_skip, small_config};
use memvirt::devices::Phase;
use memvirt::guest::image::Image;
use memvirt::guest::layout::{IMAGE_GPA, PARAMS_GPA, RESULTS_OFFSET, STACK_TOP_GPA};
use memvirt::guest::paging::page_table_pages;
use memvirt::guest::profile::Profile;
use memvirt::guest::program::{Mode, MSG_READY, MSG_STARTED};
use memvirt::machine::Guest;
use memvirt::runner::Fleet;
use memvirt::units::{MIB, PAGE_SIZE};
use memvirt::vstate::memory::resident_pages;
use memvirt::vstate::vcpu::VcpuState;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(120);

fn read_u64(g: &Guest, gpa: u64) -> u64 {
    g.memory().read_obj(GuestAddress(gpa)).unwrap()
}

#[test]
fn four_guests_hold_image_stamps_unique_and_zeroed_pages() {
    let Some(kvm) = kvm_or_skip("four_guests_hold_image_stamps_unique_and_zeroed_pages") else {
        return;
    };
    let mem = 64 * MIB;
    let image = Image::pseudo_random(8 * MIB, 99);
    let profile = Profile::new(mem, image.len(), 20, 4 * MIB, 4 * MIB).unwrap();
    let configs = vec![small_config(mem, Mode::Profile); 4];
    let mut fleet = Fleet::boot(&kvm, &configs, &image, &profile).unwrap();
    fleet.wait_for(Phase::Done, WAIT, &AtomicBool::new(false), |_| {});

    let stamps: Vec<u64> = profile.stamp_gpas().collect();
    assert_eq!(stamps.len(), 20);
    for (id, g) in fleet.guests.iter().enumerate() {
        assert_eq!(fleet.failure(id), None);
        // Image: every page that is not stamped holds the image byte for byte.
        let mut buf = vec![0u8; image.len() as usize];
        g.memory()
            .read_slice(&mut buf, GuestAddress(IMAGE_GPA))
            .unwrap();
        for (p, (got, want)) in buf
            .chunks(PAGE_SIZE as usize)
            .zip(image.bytes().chunks(PAGE_SIZE as usize))
            .enumerate()
        {
            let gpa = IMAGE_GPA + p as u64 * PAGE_SIZE;
            if stamps.contains(&gpa) {
                assert_eq!(&got[..8], &Profile::stamp_value(id).to_le_bytes());
                assert_eq!(&got[8..], &want[8..], "stamp touches only its 8 bytes");
            } else {
                assert_eq!(got, want, "guest {id} image page {p}");
            }
        }
        // Unique pages: one per-guest value each, rest of the page zero.
        for p in 0..profile.unique_pages {
            let gpa = profile.unique_gpa + p * PAGE_SIZE;
            assert_eq!(read_u64(g, gpa), Profile::unique_value(id, p));
            assert_eq!(read_u64(g, gpa + 8), 0);
        }
        // Zeroed pages are resident and zero; untouched RAM is not resident.
        let region = g.regions()[0];
        let resident = resident_pages(&region).unwrap();
        let page = |gpa: u64| (gpa / PAGE_SIZE) as usize;
        for p in 0..profile.zeroed_pages {
            let gpa = profile.zeroed_gpa + p * PAGE_SIZE;
            assert!(
                resident[page(gpa)],
                "zeroed page {p} of guest {id} resident"
            );
            let mut b = vec![1u8; PAGE_SIZE as usize];
            g.memory().read_slice(&mut b, GuestAddress(gpa)).unwrap();
            assert!(b.iter().all(|x| *x == 0));
        }
        let untouched_start = page(profile.zeroed_gpa + profile.zeroed_pages * PAGE_SIZE);
        let stray = resident[untouched_start..].iter().filter(|r| **r).count();
        assert_eq!(stray, 0, "guest {id}: untouched RAM is not resident");
        assert_eq!(g.results().pages_touched, profile.pages_written());
    }
    // Stamps differ between guests.
    let first = stamps[0];
    let values: std::collections::HashSet<u64> =
        fleet.guests.iter().map(|g| read_u64(g, first)).collect();
    assert_eq!(values.len(), 4);
}

#[test]
fn serial_output_and_phases_arrive_in_order_and_exits_are_counted() {
    let Some(kvm) = kvm_or_skip("serial_output_and_phases_arrive_in_order") else {
        return;
    };
    let mem = 16 * MIB;
    let image = Image::pseudo_random(MIB, 1);
    let profile = Profile::new(mem, image.len(), 2, MIB, MIB).unwrap();
    let mut fleet =
        Fleet::boot(&kvm, &[small_config(mem, Mode::Profile)], &image, &profile).unwrap();
    fleet.wait_for(Phase::Done, WAIT, &AtomicBool::new(false), |_| {});
    let phases: Vec<Phase> = fleet.phases(0).iter().map(|(p, _)| *p).collect();
    assert_eq!(phases, vec![Phase::Started, Phase::Ready, Phase::Done]);
    let times: Vec<Instant> = fleet.phases(0).iter().map(|(_, t)| *t).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    let g = &fleet.guests[0];
    // Done comes just before the final HLT; wait for the vCPU to reach it.
    let t = Instant::now();
    while g.vcpu_states()[0] != VcpuState::Halted && t.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        g.serial_lines(),
        vec![MSG_STARTED.trim_end(), MSG_READY.trim_end()]
    );
    let exits = g.exits();
    let serial_bytes = (MSG_STARTED.len() + MSG_READY.len()) as u64;
    assert_eq!(exits.serial, serial_bytes, "one exit per serial byte");
    assert_eq!(exits.control, 3, "started, ready, done");
    assert_eq!(exits.hlt, 1);
}

#[test]
fn a_paused_guest_makes_no_progress_and_continues_after_resume() {
    let Some(kvm) = kvm_or_skip("a_paused_guest_makes_no_progress") else {
        return;
    };
    let mem = 8 * MIB;
    let image = Image::pseudo_random(0, 0);
    let profile = Profile::new(mem, 0, 0, 0, 0).unwrap();
    let mut fleet =
        Fleet::boot(&kvm, &[small_config(mem, Mode::Counter)], &image, &profile).unwrap();
    fleet.wait_for(Phase::Ready, WAIT, &AtomicBool::new(false), |_| {});
    let g = &fleet.guests[0];
    let counter = || read_u64(g, PARAMS_GPA + RESULTS_OFFSET + 8);
    let wait_progress = |from: u64| {
        let t = Instant::now();
        while counter() == from && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        counter()
    };
    let c0 = counter();
    assert!(wait_progress(c0) > c0, "the counter guest counts");
    let took = g.pause();
    assert!(took < Duration::from_secs(1), "pause took {took:?}");
    let held = counter();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(), held, "no progress while paused");
    assert!(g.vcpu_states().iter().all(|s| s.is_still()));
    g.resume();
    assert!(wait_progress(held) > held, "progress after resume");
}

#[test]
fn pinned_vcpu_threads_have_the_requested_affinity() {
    let Some(kvm) = kvm_or_skip("pinned_vcpu_threads_have_the_requested_affinity") else {
        return;
    };
    let cpus = memvirt::host::online_cpus();
    let want = vec![cpus - 1];
    let mem = 8 * MIB;
    let mut cfg = small_config(mem, Mode::Counter);
    cfg.vcpus = 2;
    cfg.pin = Some(want.clone());
    let image = Image::pseudo_random(0, 0);
    let profile = Profile::new(mem, 0, 0, 0, 0).unwrap();
    let mut fleet = Fleet::boot(&kvm, &[cfg], &image, &profile).unwrap();
    fleet.wait_for(Phase::Ready, WAIT, &AtomicBool::new(false), |_| {});
    for tid in fleet.guests[0].vcpu_tids() {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(tid)).unwrap();
        let got: Vec<usize> = (0..cpus).filter(|c| set.is_set(*c).unwrap()).collect();
        assert_eq!(got, want, "affinity of vCPU thread {tid}");
    }
}

#[test]
fn dirty_log_holds_the_pages_the_guest_wrote_and_no_others() {
    let Some(kvm) = kvm_or_skip("dirty_log_holds_the_pages_the_guest_wrote") else {
        return;
    };
    let mem = 16 * MIB;
    let image = Image::pseudo_random(2 * MIB, 5);
    let profile = Profile::new(mem, image.len(), 8, MIB, MIB).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut g = Guest::create(
        &kvm,
        0,
        &small_config(mem, Mode::Profile),
        &image,
        &profile,
        tx,
    )
    .unwrap();
    g.vm().set_dirty_logging(0, true).unwrap();
    g.start().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let ev = rx
            .recv_timeout(deadline - Instant::now())
            .expect("guest finishes");
        if ev.kind == memvirt::devices::EventKind::Phase(Phase::Done) {
            break;
        }
    }
    let dirty: std::collections::BTreeSet<u64> =
        g.vm().take_dirty_pages(0).unwrap().into_iter().collect();
    let page = |gpa: u64| gpa / PAGE_SIZE;
    let mut expected: std::collections::BTreeSet<u64> = profile.stamp_gpas().map(page).collect();
    expected.extend((0..profile.unique_pages).map(|p| page(profile.unique_gpa) + p));
    expected.extend((0..profile.zeroed_pages).map(|p| page(profile.zeroed_gpa) + p));
    for p in &expected {
        assert!(dirty.contains(p), "written page {p:#x} is in the dirty log");
    }
    // Beyond the profile, only the guest's own stack and result block may be dirty.
    let image_pages: Vec<u64> = (0..profile.image_pages())
        .map(|p| page(IMAGE_GPA) + p)
        .filter(|p| !expected.contains(p))
        .collect();
    assert!(
        image_pages.iter().all(|p| !dirty.contains(p)),
        "unstamped image pages are clean"
    );
    let after = page(profile.zeroed_gpa) + profile.zeroed_pages;
    assert!(dirty.iter().all(|p| *p < after), "untouched RAM is clean");
    // Other than that, only the result block, the stack and the page tables (where
    // the MMU sets accessed/dirty bits) may be dirty.
    let mut allowed: std::collections::BTreeSet<u64> =
        page_table_pages(mem).into_iter().map(page).collect();
    allowed.insert(page(PARAMS_GPA));
    allowed.insert(page(STACK_TOP_GPA) - 1);
    let extra: Vec<u64> = dirty.difference(&expected).copied().collect();
    assert!(
        extra.iter().all(|p| allowed.contains(p)),
        "unexpected dirty pages {extra:x?}"
    );
    // Reading cleared the log: a halted guest writes nothing more.
    assert!(g.vm().take_dirty_pages(0).unwrap().is_empty());
}
