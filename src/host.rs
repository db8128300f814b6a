//! Facts about the host read from /proc and /sys: memory, cores, the process's own
//! memory accounting, THP, KSM and map-count limits.

use serde::Serialize;
use std::collections::BTreeMap;

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Parses `Key:   1234 kB` lines into bytes.
fn parse_kb_lines(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let mut it = v.split_whitespace();
            let n: u64 = it.next()?.parse().ok()?;
            let mult = if it.next() == Some("kB") { 1024 } else { 1 };
            Some((k.trim().to_string(), n * mult))
        })
        .collect()
}

/// MemTotal from /proc/meminfo in bytes.
pub fn mem_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_kb_lines(&text).get("MemTotal").copied()
}

/// MemAvailable from /proc/meminfo in bytes.
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_kb_lines(&text).get("MemAvailable").copied()
}

/// Number of CPUs this process may run on.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The process's memory as the kernel accounts it (/proc/self/smaps_rollup), bytes.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Resident set size.
    pub rss: u64,
    /// Proportional set size.
    pub pss: u64,
    /// Private anonymous memory.
    pub anonymous: u64,
    /// Resident shared memory (memfd, tmpfs).
    pub shmem: u64,
}

impl ProcessMemory {
    /// Reads /proc/self/smaps_rollup (through the `ksm` crate's reader, which the
    /// engine's own accounting uses too).
    pub fn read() -> std::io::Result<Self> {
        let r = ksm::sys::smaps_rollup()?;
        Ok(ProcessMemory {
            rss: r.rss,
            pss: r.pss,
            anonymous: r.anonymous,
            shmem: r.pss_shmem,
        })
    }
}

/// The THP mode, the bracketed word of /sys/kernel/mm/transparent_hugepage/enabled.
pub fn thp_mode() -> Option<String> {
    let s = read_trim("/sys/kernel/mm/transparent_hugepage/enabled")?;
    let start = s.find('[')?;
    let end = s[start..].find(']')?;
    Some(s[start + 1..start + end].to_string())
}

/// vm.max_map_count.
pub fn max_map_count() -> Option<u64> {
    read_trim("/proc/sys/vm/max_map_count")?.parse().ok()
}

/// Number of mappings (VMAs) this process has now.
pub fn map_count() -> Option<u64> {
    ksm::sys::map_count().ok().map(|n| n as u64)
}

/// Every readable knob and counter in /sys/kernel/mm/ksm.
pub fn ksm_sysfs() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/sys/kernel/mm/ksm") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(v) = read_trim(&e.path().to_string_lossy()) {
                out.insert(name, v);
            }
        }
    }
    out
}

/// Which memory cgroup controller is usable.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemoryCgroup {
    /// cgroup v1 memory controller mount, if any.
    pub v1_memory: Option<String>,
    /// Whether a cgroup2 hierarchy offers the memory controller.
    pub v2_memory: bool,
}

/// Looks for the memory cgroup controller in /proc/self/mountinfo.
pub fn memory_cgroup() -> MemoryCgroup {
    let mut v1 = None;
    let mut v2 = false;
    if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in text.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = pre.split_whitespace().nth(4).unwrap_or("");
            let mut post = post.split_whitespace();
            let fstype = post.next().unwrap_or("");
            let opts = post.nth(1).unwrap_or("");
            if fstype == "cgroup" && opts.split(',').any(|o| o == "memory") {
                v1 = Some(mount_point.to_string());
            }
            if fstype == "cgroup2" {
                let ctl = std::fs::read_to_string(format!("{mount_point}/cgroup.controllers"))
                    .unwrap_or_default();
                v2 |= ctl.split_whitespace().any(|c| c == "memory");
            }
        }
    }
    MemoryCgroup {
        v1_memory: v1,
        v2_memory: v2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kb_lines() {
        let m = parse_kb_lines("Rss:     100 kB\nPss: 50 kB\nbogus\nCount: 3\n");
        assert_eq!(m["Rss"], 102400);
        assert_eq!(m["Pss"], 51200);
        assert_eq!(m["Count"], 3);
        assert!(!m.contains_key("bogus"));
    }

    #[test]
    fn process_memory_grows_when_touching_memory() {
        let before = ProcessMemory::read().unwrap();
        let v = vec![1u8; 64 << 20];
        let after = ProcessMemory::read().unwrap();
        assert!(after.rss >= before.rss + (60 << 20), "{before:?} {after:?}");
        drop(v);
    }
}
