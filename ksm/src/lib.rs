//! ksm (placeholder)
