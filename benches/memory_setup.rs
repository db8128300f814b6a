//! Guest memory set-up and image load, in bytes per second.
//!
//! `setup_and_load` maps a fresh 256 MiB guest (anonymous, MAP_NORESERVE) and copies
//! a 64 MiB image into it, as `memvirt run` does for each guest; the first touch of
//! fresh host memory dominates. `load_only` copies into memory already touched.
//! `setup_and_plain_copy` is the same with a plain single-threaded copy, for the
//! ratio. `generate` builds the built-in pseudo-random image.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use memvirt::guest::image::Image;
use memvirt::guest::layout::IMAGE_GPA;
use memvirt::units::MIB;
use memvirt::vstate::memory::{create_guest_memory, load_bytes, Backing};
use vm_memory::{Bytes, GuestAddress};

fn bench(c: &mut Criterion) {
    let image = Image::pseudo_random(64 * MIB, 1);
    let mut g = c.benchmark_group("guest_memory");
    g.throughput(Throughput::Bytes(image.len()));
    g.sample_size(20);
    g.bench_function("setup_and_load_64MiB_image", |b| {
        // Unmapping the guest afterwards is not part of set-up.
        b.iter_with_large_drop(|| {
            let mem = create_guest_memory(256 * MIB, Backing::Anon, None).unwrap();
            load_bytes(&mem, IMAGE_GPA, image.bytes()).unwrap();
            mem
        })
    });
    g.bench_function("setup_and_plain_copy_64MiB_image", |b| {
        // The same without populate and threads: one page fault per 4 KiB.
        b.iter_with_large_drop(|| {
            let mem = create_guest_memory(256 * MIB, Backing::Anon, None).unwrap();
            mem.write_slice(image.bytes(), GuestAddress(IMAGE_GPA))
                .unwrap();
            mem
        })
    });
    let mem = create_guest_memory(256 * MIB, Backing::Anon, None).unwrap();
    g.bench_function("load_only_64MiB_image", |b| {
        b.iter(|| load_bytes(&mem, IMAGE_GPA, image.bytes()).unwrap())
    });
    g.bench_function("generate_64MiB_image", |b| {
        b.iter(|| Image::pseudo_random(64 * MIB, 2))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
