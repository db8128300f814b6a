//! The side-by-side table.

use super::run::SystemResult;
use super::DedupArgs;

fn secs(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}"))
        .unwrap_or_else(|| "not reached".into())
}

fn mib(b: i64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

/// Prints the results side by side.
pub fn print_table(args: &DedupArgs, rs: &[SystemResult], host: &str) {
    if let (Some(_), Some(r)) = (args.guests, rs.first()) {
        println!(
            "memvirt dedup --guests: {}, domain {}, {} s per run",
            r.subject, args.domain, args.duration
        );
    } else {
        println!(
        "memvirt dedup --synthetic: {} regions × {} MiB, mix {}:{}:{}, layout {:?}, domain {}, writers {} pages/s, {} s per run",
        args.regions,
        args.size >> 20,
        args.mix.ident,
        args.mix.zero,
        args.mix.unique,
        args.layout,
        args.domain,
        args.writers,
        args.duration
        );
    }
    println!("{host}");
    let w = 26;
    let line = |name: &str, f: &dyn Fn(&SystemResult) -> String| {
        print!("{name:<34}");
        for r in rs {
            print!("{:>w$}", f(r));
        }
        println!();
    };
    line("system", &|r| r.system.clone());
    line("achievable saving (MiB)", &|r| {
        mib(r.achievable_bytes as i64)
    });
    line("time to 50% (s)", &|r| secs(r.t50_s));
    line("time to 90% (s)", &|r| secs(r.t90_s));
    line("time to 99% (s)", &|r| secs(r.t99_s));
    line("CPU seconds", &|r| format!("{:.2}", r.cpu_s));
    line("saved, claimed (MiB)", &|r| mib(r.saved_bytes as i64));
    line(
        "saved, measured Pss (MiB)",
        &|r| mib(r.saved_bytes_measured),
    );
    line("claimed vs measured", &|r| {
        format!(
            "{:+.2}% {}",
            r.agreement.diff_pct,
            if r.agreement.agree {
                "agree"
            } else {
                "DISAGREE"
            }
        )
    });
    line("saved / achievable at end", &|r| {
        format!("{:.1}%", r.saved_fraction_end * 100.0)
    });
    line("steady-state CPU (% of a core)", &|r| {
        r.steady_cpu_pct
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "-".into())
    });
    line("writes / lost writes", &|r| {
        format!("{} / {}", r.writes, r.lost_writes)
    });
    line("passes", &|r| {
        if r.engine.is_some() {
            r.passes.to_string()
        } else {
            "-".into()
        }
    });
    line("first pass (s)", &|r| secs(r.first_pass_s));
    line("hold max / mean (ms)", &|r| {
        r.engine
            .as_ref()
            .map(|e| format!("{:.2} / {:.3}", e.holds.max_ms, e.holds.mean_ms))
            .unwrap_or_else(|| "-".into())
    });
    line("hashing (M pages/s, all workers)", &|r| {
        r.engine
            .as_ref()
            .map(|e| format!("{:.2}", e.hash_pages_per_sec / 1e6))
            .unwrap_or_else(|| "-".into())
    });
    line("merged+sharing / zero pages", &|r| match &r.engine {
        Some(e) => format!("{} / {}", e.pages_sharing, e.ksm_zero_pages),
        None => format!(
            "{} / {}",
            r.kernel_ksm.pages_sharing, r.kernel_ksm.ksm_zero_pages
        ),
    });
    line("store pages / VMAs", &|r| {
        r.engine
            .as_ref()
            .map(|e| format!("{} / {}", e.store_pages, e.vma_count))
            .unwrap_or_else(|| "-".into())
    });
    line("VMA budget reached / hinted", &|r| {
        r.engine
            .as_ref()
            .map(|e| format!("{} / {}", e.vma_budget_reached, e.pages_hinted))
            .unwrap_or_else(|| "-".into())
    });
    line("cow breaks", &|r| {
        r.engine
            .as_ref()
            .map(|e| e.cow_breaks.to_string())
            .unwrap_or_else(|| "-".into())
    });
    if rs.len() == 2 {
        let (a, b) = (&rs[0], &rs[1]);
        if let (Some(x), Some(y)) = (a.t99_s, b.t99_s) {
            println!(
                "{} reaches 99% {:.1}× faster than {}",
                a.system,
                y / x.max(1e-9),
                b.system
            );
        }
        if a.cpu_s > 0.0 {
            println!(
                "{} uses {:.1}× fewer CPU-seconds than {}",
                a.system,
                b.cpu_s / a.cpu_s,
                b.system
            );
        }
    }
    for r in rs {
        if !r.agreement.agree {
            println!(
                "warning: {}: claimed saving {} MiB and measured {} MiB differ by {:+.2}% (tolerance {}%)",
                r.system,
                mib(r.saved_bytes as i64),
                mib(r.saved_bytes_measured),
                r.agreement.diff_pct,
                r.agreement.tolerance_pct
            );
        }
    }
}
