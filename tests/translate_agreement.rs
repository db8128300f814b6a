//! The software walker (crate `shadow`) against KVM's own `KVM_TRANSLATE` on a live
//! built-in guest: identity map (4 KiB and 2 MiB pages), the high-half mapping, the
//! non-present null page, addresses past RAM and non-canonical addresses.

mod common;

use common::{kvm_or_skip, small_config};
use memvirt::devices::Phase;
use memvirt::guest::image::Image;
use memvirt::guest::layout::{HIGH_HALF_BASE, IMAGE_GPA};
use memvirt::guest::profile::Profile;
use memvirt::guest::program::Mode;
use memvirt::guest_phys::GuestPhys;
use memvirt::runner::Fleet;
use memvirt::units::MIB;
use shadow::{Access, PageSize, Walker};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn walker_agrees_with_kvm_translate_on_a_live_guest() {
    let Some(kvm) = kvm_or_skip("walker_agrees_with_kvm_translate") else {
        return;
    };
    let mem = 64 * MIB;
    let image = Image::pseudo_random(4 * MIB, 3);
    let profile = Profile::new(mem, image.len(), 4, MIB, MIB).unwrap();
    // A counting guest keeps running while we translate: KVM answers for a live vCPU.
    let mut fleet =
        Fleet::boot(&kvm, &[small_config(mem, Mode::Counter)], &image, &profile).unwrap();
    fleet.wait_for(
        Phase::Ready,
        Duration::from_secs(120),
        &AtomicBool::new(false),
        |_| {},
    );
    let g = &fleet.guests[0];
    let (mode, cr3) = g.paging_state(0).unwrap().unwrap();
    let walker = Walker::new(mode);
    let phys = GuestPhys(g.memory());

    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut addrs: Vec<u64> = Vec::new();
    for _ in 0..1500 {
        addrs.push(rng.below(2 * MIB)); // 4 KiB pages, null page among them
        addrs.push(2 * MIB + rng.below(mem - 2 * MIB)); // 2 MiB pages
        addrs.push(HIGH_HALF_BASE + rng.below(mem)); // high half
        addrs.push(mem + rng.below(1 << 30)); // past RAM: not present
    }
    for _ in 0..200 {
        addrs.push(rng.below(4096)); // the null page
        addrs.push(0x0000_8000_0000_0000 + rng.below(1 << 40)); // non-canonical
        addrs.push(rng.next() | 0xffff_8000_0000_0000); // other kernel-half addresses
    }
    addrs.extend([
        0,
        0xfff,
        0x1000,
        2 * MIB - 1,
        2 * MIB,
        IMAGE_GPA,
        mem - 1,
        mem,
    ]);

    let (mut valid, mut small, mut large) = (0, 0, 0);
    for &gva in &addrs {
        let kvm_t = g.kvm_translate(0, gva).unwrap().expect("KVM_TRANSLATE");
        let ours = walker.walk(&phys, cr3, gva, Access::read());
        match ours {
            Ok(t) => {
                assert!(
                    kvm_t.valid,
                    "{gva:#x}: walker maps it to {:#x}, KVM says not valid",
                    t.gpa
                );
                assert_eq!(t.gpa, kvm_t.gpa, "{gva:#x}: guest-physical address");
                assert_eq!(t.perms.writable, kvm_t.writeable, "{gva:#x}: writable");
                assert_eq!(t.perms.user, kvm_t.usermode, "{gva:#x}: user");
                valid += 1;
                match t.size {
                    PageSize::Size4K => small += 1,
                    PageSize::Size2M => large += 1,
                    _ => {}
                }
            }
            Err(e) => assert!(
                !kvm_t.valid,
                "{gva:#x}: walker says {e}, KVM maps it to {:#x}",
                kvm_t.gpa
            ),
        }
    }
    assert!(addrs.len() > 6000);
    assert!(
        valid > 3000 && small > 1000 && large > 1000,
        "coverage: {valid} valid, {small} 4K, {large} 2M"
    );
    // Every translation held the vCPU still only for the ioctl: the guest counts on.
    let counter = || {
        use vm_memory::Bytes;
        let at = memvirt::guest::layout::PARAMS_GPA + memvirt::guest::layout::RESULTS_OFFSET + 8;
        g.memory()
            .read_obj::<u64>(vm_memory::GuestAddress(at))
            .unwrap()
    };
    let before = counter();
    let t = std::time::Instant::now();
    while counter() == before && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        counter() > before,
        "the guest runs again after the translations"
    );
}
