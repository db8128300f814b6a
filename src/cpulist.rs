//! taskset-style CPU lists (`0,1`, `0-3`, `0-1,3`) for `--pin`.

use thiserror::Error;

/// A CPU list that could not be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuListError {
    /// The text is not a CPU list.
    #[error("invalid CPU list {input:?}: expected comma-separated CPU numbers or ranges, e.g. 0,1 or 0-1")]
    Malformed {
        /// The text the user gave.
        input: String,
    },
    /// The list names a CPU this host does not have.
    #[error("CPU list {input:?} names CPU {cpu}, but this host has CPUs 0-{last} only")]
    NoSuchCpu {
        /// The text the user gave.
        input: String,
        /// The first missing CPU.
        cpu: usize,
        /// The highest CPU number the host has.
        last: usize,
    },
}

/// Parses a CPU list and checks every CPU exists among `host_cpus` (0..host_cpus).
/// The result is sorted and free of duplicates.
pub fn parse_cpu_list(input: &str, host_cpus: usize) -> Result<Vec<usize>, CpuListError> {
    let malformed = || CpuListError::Malformed {
        input: input.to_string(),
    };
    let mut cpus = Vec::new();
    if input.trim().is_empty() {
        return Err(malformed());
    }
    for part in input.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo.parse().map_err(|_| malformed())?;
        let hi: usize = hi.parse().map_err(|_| malformed())?;
        if lo > hi {
            return Err(malformed());
        }
        for cpu in lo..=hi {
            if cpu >= host_cpus {
                return Err(CpuListError::NoSuchCpu {
                    input: input.to_string(),
                    cpu,
                    last: host_cpus.saturating_sub(1),
                });
            }
            cpus.push(cpu);
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_ranges() {
        assert_eq!(parse_cpu_list("0,1", 2), Ok(vec![0, 1]));
        assert_eq!(parse_cpu_list("0-1", 2), Ok(vec![0, 1]));
        assert_eq!(parse_cpu_list("3,0-1,1", 4), Ok(vec![0, 1, 3]));
    }

    #[test]
    fn rejects_malformed_and_missing() {
        for bad in ["", "a", "1-", "2-1", "0,,1", "-1"] {
            assert!(
                matches!(parse_cpu_list(bad, 4), Err(CpuListError::Malformed { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_cpu_list("0-2", 2),
            Err(CpuListError::NoSuchCpu { cpu: 2, .. })
        ));
    }
}
