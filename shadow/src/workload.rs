//! Workloads (placeholder while the MMU is built).
