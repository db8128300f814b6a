//! Lets the software MMU (crate `shadow`) read a live guest's memory, and asks KVM
//! for its own answer (`KVM_TRANSLATE`) to compare against.

use shadow::mem::MemError;
use shadow::GuestPhysMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A guest's memory as guest-physical memory for the `shadow` walker.
pub struct GuestPhys<'a>(pub &'a GuestMemoryMmap);

impl GuestPhysMemory for GuestPhys<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        if !addr.is_multiple_of(8) {
            return Err(MemError::Misaligned { addr });
        }
        self.0
            .read_obj::<u64>(GuestAddress(addr))
            .map_err(|_| MemError::OutOfRange { addr })
    }
}

/// KVM's translation of one guest-virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmTranslation {
    /// Whether the address maps.
    pub valid: bool,
    /// The guest-physical address (meaningful when valid).
    pub gpa: u64,
    /// Whether the mapping is writable.
    pub writeable: bool,
    /// Whether user mode may access it.
    pub usermode: bool,
}

impl From<kvm_bindings::kvm_translation> for KvmTranslation {
    fn from(t: kvm_bindings::kvm_translation) -> Self {
        KvmTranslation {
            valid: t.valid != 0,
            gpa: t.physical_address,
            writeable: t.writeable != 0,
            usermode: t.usermode != 0,
        }
    }
}
