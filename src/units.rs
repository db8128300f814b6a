//! Byte sizes on the command line (`64M`, `4K`, `1G`, plain bytes) and in reports.

use thiserror::Error;

/// Size of a base x86-64 page.
pub const PAGE_SIZE: u64 = 4096;
/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// A size given on the command line could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid size {input:?}: expected a number of bytes with an optional K, M or G suffix (powers of 1024), e.g. 256M")]
pub struct SizeError {
    /// The text the user gave.
    pub input: String,
}

/// Parses `N`, `NK`, `NM`, `NG` (also `KiB`/`MiB`/`GiB` and lower case) into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = || SizeError {
        input: input.to_string(),
    };
    let t = input.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let mult = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Formats bytes for a human: `256.0 MiB`, `1.50 GiB`, `12 KiB`, `100 B`.
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= GIB {
        format!("{:.2} GiB", b / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", b / MIB as f64)
    } else if bytes >= KIB {
        format!("{:.0} KiB", b / KIB as f64)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 * MIB));
        assert_eq!(parse_size("2g"), Ok(2 * GIB));
        assert_eq!(parse_size("3MiB"), Ok(3 * MIB));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "M", "12X", "-4K", "1.5G", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(256 * MIB), "256.0 MiB");
        assert_eq!(format_bytes(100), "100 B");
    }
}
