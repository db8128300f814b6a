//! `memvirt probe [--json]`.

use crate::probe::probe;
use crate::units::format_bytes;
use clap::Args;
use std::path::Path;

/// Arguments of `memvirt probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `memvirt probe`.
pub fn run(args: &ProbeArgs, kvm_path: &Path) -> anyhow::Result<()> {
    let r = probe(kvm_path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("KVM API version        {}", r.kvm_api_version);
    println!("KVM modules            {}", r.kvm_modules.join(", "));
    println!("translation mode       {}", r.translation_mode.as_str());
    println!(
        "guest execution        {} ({:.1} ns per guest instruction, measured)",
        r.guest_execution.as_str(),
        r.guest_ns_per_instruction
    );
    println!(
        "VM exit round trip     {:.0} ns (port I/O, measured)",
        r.vm_exit_ns
    );
    println!("KVM memslots           {}", r.kvm_max_memslots);
    for (cap, on) in &r.kvm_capabilities {
        println!("  {cap:<36} {}", if *on { "yes" } else { "no" });
    }
    println!(
        "THP                    {}",
        r.thp_mode.as_deref().unwrap_or("unavailable")
    );
    println!(
        "vm.max_map_count       {} (this process maps {} now)",
        r.max_map_count.map_or("?".into(), |v| v.to_string()),
        r.map_count.map_or("?".into(), |v| v.to_string())
    );
    println!(
        "memory cgroup          v1: {}, v2 memory controller: {}",
        r.memory_cgroup.v1_memory.as_deref().unwrap_or("no"),
        if r.memory_cgroup.v2_memory {
            "yes"
        } else {
            "no"
        }
    );
    println!(
        "CPUs, memory           {} CPUs, {} total, {} available",
        r.cpus,
        r.mem_total_bytes.map_or("?".into(), format_bytes),
        r.mem_available_bytes.map_or("?".into(), format_bytes)
    );
    let ksm: Vec<String> = [
        "run",
        "pages_to_scan",
        "sleep_millisecs",
        "use_zero_pages",
        "pages_sharing",
    ]
    .iter()
    .filter_map(|k| r.ksm.get(*k).map(|v| format!("{k}={v}")))
    .collect();
    println!(
        "KSM (/sys/kernel/mm/ksm) {}",
        if ksm.is_empty() {
            "unavailable".to_string()
        } else {
            ksm.join(" ")
        }
    );
    Ok(())
}
