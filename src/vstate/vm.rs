//! One KVM virtual machine: its file descriptor, its memslots and their dirty logs.

use super::memory::RegionInfo;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use std::path::Path;
use thiserror::Error;

/// A KVM VM operation that failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open {path}; memvirt needs KVM: check that the device exists and is accessible (`ls -l {path}`; load the module with `modprobe kvm_intel` or `kvm_amd`; run as root or add your user to group kvm)")]
    OpenKvm {
        /// Device path.
        path: String,
        /// What the OS said.
        source: kvm_ioctls::Error,
    },
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("registering memslot {slot} ({size:#x} bytes at guest-physical {gpa:#x}) failed")]
    Memslot {
        /// Slot number.
        slot: u32,
        /// Guest-physical base.
        gpa: u64,
        /// Size.
        size: u64,
        /// What KVM said.
        source: kvm_ioctls::Error,
    },
    /// The slot does not exist.
    #[error("memslot {0} does not exist")]
    NoSuchSlot(u32),
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG on memslot {slot} failed (is dirty logging on for it?)")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// What KVM said.
        source: kvm_ioctls::Error,
    },
}

/// Opens the KVM device at `path` (normally /dev/kvm).
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::OpenKvm {
            path: path.display().to_string(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        }
    })?;
    Kvm::new_with_path(&cpath).map_err(|source| VmError::OpenKvm {
        path: path.display().to_string(),
        source,
    })
}

/// A registered memslot.
#[derive(Debug, Clone, Copy)]
pub struct Memslot {
    /// KVM slot number.
    pub slot: u32,
    /// The region behind it.
    pub region: RegionInfo,
    /// Whether KVM logs writes to it.
    pub dirty_log: bool,
}

/// A KVM VM and its memslots. Shared between threads (`Arc<Vm>`): the dedup engine
/// reads the dirty log from its own threads.
pub struct Vm {
    fd: VmFd,
    slots: std::sync::Mutex<Vec<Memslot>>,
}

impl Vm {
    /// Creates a VM on an open KVM handle.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Ok(Vm {
            fd,
            slots: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The VM's file descriptor, for creating vCPUs.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers each region as a memslot (dirty logging off).
    pub fn register_regions(&self, regions: &[RegionInfo]) -> Result<(), VmError> {
        let mut slots = self.slots.lock().expect("memslots");
        for region in regions {
            let slot = slots.len() as u32;
            let m = Memslot {
                slot,
                region: *region,
                dirty_log: false,
            };
            self.apply(&m)?;
            slots.push(m);
        }
        Ok(())
    }

    fn apply(&self, m: &Memslot) -> Result<(), VmError> {
        let kr = kvm_userspace_memory_region {
            slot: m.slot,
            flags: if m.dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: m.region.guest_base,
            memory_size: m.region.size,
            userspace_addr: m.region.host_addr,
        };
        // SAFETY: the region is a live mapping owned by the guest's memory, which
        // outlives the VM (the guest drops its VM before its memory).
        unsafe { self.fd.set_user_memory_region(kr) }.map_err(|source| VmError::Memslot {
            slot: m.slot,
            gpa: m.region.guest_base,
            size: m.region.size,
            source,
        })
    }

    /// The registered memslots.
    pub fn memslots(&self) -> Vec<Memslot> {
        self.slots.lock().expect("memslots").clone()
    }

    /// Switches KVM's dirty logging for `slot` on or off.
    pub fn set_dirty_logging(&self, slot: u32, on: bool) -> Result<(), VmError> {
        let mut slots = self.slots.lock().expect("memslots");
        let idx = slots
            .iter()
            .position(|m| m.slot == slot)
            .ok_or(VmError::NoSuchSlot(slot))?;
        let mut m = slots[idx];
        m.dirty_log = on;
        self.apply(&m)?;
        slots[idx] = m;
        Ok(())
    }

    /// Pages of `slot` written since the last call (or since logging was switched
    /// on), as page indices within the slot. Reading clears the log.
    pub fn take_dirty_pages(&self, slot: u32) -> Result<Vec<u64>, VmError> {
        let m = self
            .memslots()
            .into_iter()
            .find(|m| m.slot == slot)
            .ok_or(VmError::NoSuchSlot(slot))?;
        let bitmap = self
            .fd
            .get_dirty_log(slot, m.region.size as usize)
            .map_err(|source| VmError::DirtyLog { slot, source })?;
        Ok(bitmap_to_pages(&bitmap))
    }
}

/// Expands a KVM dirty bitmap (bit i of word w = page 64w+i) into page indices.
pub fn bitmap_to_pages(bitmap: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            pages.push(w as u64 * 64 + b);
            bits &= bits - 1;
        }
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_expands_to_page_indices() {
        assert_eq!(bitmap_to_pages(&[0b1010, 0, 1 << 63]), vec![1, 3, 191]);
        assert!(bitmap_to_pages(&[0, 0]).is_empty());
    }
}
