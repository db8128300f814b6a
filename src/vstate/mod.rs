//! KVM objects, one module each: guest memory, the VM, its vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
