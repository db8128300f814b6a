//! shadow (placeholder)
