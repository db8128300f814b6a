//! Benchmarks of the engine's primitives and of a whole merge pass.
//!
//! - hashing: xxh3 + zero check over pages not in cache (a 256 MiB buffer, far larger
//!   than the caches), pages per second on one core;
//! - zero reclaim: MADV_DONTNEED of all-zero pages through the engine, pages per second;
//! - merge: a first pass of the remap backend over 2 × 32 MiB of identical content.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ksm::synth::{Layout, Mix, Spec, Workload};
use ksm::{Backend, Config, Engine, Hooks, PageHasher, Xxh3, PAGE_SIZE};

fn hashing(c: &mut Criterion) {
    let len = 256 << 20;
    let w = Workload::new(Spec {
        regions: 1,
        region_bytes: len,
        mix: Mix {
            ident: 0,
            zero: 0,
            unique: 100,
        },
        layout: Layout::Contiguous,
        seed: 9,
    })
    .unwrap();
    let n = len / PAGE_SIZE;
    let mut g = c.benchmark_group("hashing");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(10);
    g.bench_function("xxh3+zero-check 256MiB one core", |b| {
        b.iter(|| {
            let mut x = 0u64;
            for j in 0..n {
                let p = unsafe {
                    std::slice::from_raw_parts((w.addrs[0] + j * PAGE_SIZE) as *const u8, PAGE_SIZE)
                };
                if !ksm::hash::is_zero_page(p) {
                    x ^= Xxh3.hash(p);
                }
            }
            x
        })
    });
    g.finish();
}

fn zero_reclaim(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero-reclaim");
    let len = 64 << 20;
    let n = (len / PAGE_SIZE) as u64;
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.bench_function("engine pass over 64MiB of zero pages", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let w = Workload::new(Spec {
                    regions: 1,
                    region_bytes: len,
                    mix: Mix {
                        ident: 0,
                        zero: 100,
                        unique: 0,
                    },
                    layout: Layout::Contiguous,
                    seed: 1,
                })
                .unwrap();
                let mut e =
                    unsafe { Engine::new(Config::default(), w.region_specs(), Hooks::default()) }
                        .unwrap();
                e.scan().unwrap(); // hash
                let t = Instant::now();
                let r = e.scan().unwrap(); // stable: reclaim
                total += t.elapsed();
                assert_eq!(r.zero_reclaimed, n);
            }
            total
        })
    });
    g.finish();
}

fn merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge");
    let len = 32 << 20;
    let n = (2 * len / PAGE_SIZE) as u64;
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    for layout in [Layout::Contiguous, Layout::Scattered] {
        g.bench_function(
            format!("remap first pass 2x32MiB identical {layout:?}"),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let w = Workload::new(Spec {
                            regions: 2,
                            region_bytes: len,
                            mix: Mix {
                                ident: 100,
                                zero: 0,
                                unique: 0,
                            },
                            layout,
                            seed: 2,
                        })
                        .unwrap();
                        let cfg = Config {
                            backend: Backend::Remap,
                            ..Config::default()
                        };
                        let hooks = Hooks {
                            dirty: ksm::UffdDirty::new()
                                .ok()
                                .map(|d| Box::new(d) as Box<dyn ksm::DirtySource>),
                            ..Hooks::default()
                        };
                        let mut e = unsafe { Engine::new(cfg, w.region_specs(), hooks) }.unwrap();
                        let t = Instant::now();
                        e.scan().unwrap();
                        total += t.elapsed();
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, hashing, zero_reclaim, merge);
criterion_main!(benches);
