//! One guest: its memory, its KVM VM, its devices and its vCPU threads, booted
//! straight into 64-bit long mode with the built-in program.

use crate::devices::{ExitCounts, GuestBus, GuestEvent};
use crate::guest::image::Image;
use crate::guest::layout::*;
use crate::guest::paging::write_page_tables;
use crate::guest::profile::Profile;
use crate::guest::program::{Mode, Results};
use crate::vstate::memory::{
    create_guest_memory, load_bytes, regions, Backing, MemoryError, RegionInfo, Thp,
};
use crate::vstate::vcpu::{VcpuHandle, VcpuSpec, VcpuState};
use crate::vstate::vm::{Vm, VmError};
use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::{Kvm, VcpuFd};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A guest that could not be built.
#[derive(Debug, Error)]
pub enum MachineError {
    /// Memory set-up failed.
    #[error("guest {guest}")]
    Memory {
        /// Guest index.
        guest: usize,
        /// Cause.
        source: MemoryError,
    },
    /// A KVM VM operation failed.
    #[error("guest {guest}")]
    Vm {
        /// Guest index.
        guest: usize,
        /// Cause.
        source: VmError,
    },
    /// A vCPU could not be created or configured.
    #[error("guest {guest} vCPU {vcpu}: {what} failed")]
    Vcpu {
        /// Guest index.
        guest: usize,
        /// vCPU index.
        vcpu: usize,
        /// The step.
        what: &'static str,
        /// What KVM said.
        source: kvm_ioctls::Error,
    },
    /// Writing boot data into guest memory failed.
    #[error("guest {guest}: loading {what} into guest memory failed")]
    Load {
        /// Guest index.
        guest: usize,
        /// What was being loaded.
        what: &'static str,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
    /// The guest program could not be assembled.
    #[error("assembling the guest program failed: {0}")]
    Assemble(String),
    /// The vCPU thread could not be started.
    #[error("guest {guest}: starting a vCPU thread failed")]
    Thread {
        /// Guest index.
        guest: usize,
        /// Cause.
        source: std::io::Error,
    },
}

/// How to build one guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Host memory backing.
    pub backing: Backing,
    /// THP advice.
    pub thp: Option<Thp>,
    /// Host CPUs for the vCPU threads.
    pub pin: Option<Vec<usize>>,
    /// What the program does.
    pub mode: Mode,
    /// Iterations for the calibration modes.
    pub loop_count: u64,
    /// Code for `Mode::Error`.
    pub error_code: u64,
    /// Delay-loop iterations between `Mode::Writer` rounds.
    pub delay: u64,
}

impl GuestConfig {
    /// One vCPU, anonymous memory, host THP policy, no pinning, running `mode`.
    pub fn new(mem_size: u64, mode: Mode) -> Self {
        GuestConfig {
            mem_size,
            vcpus: 1,
            backing: Backing::Anon,
            thp: None,
            pin: None,
            mode,
            loop_count: 0,
            error_code: 0,
            delay: 0,
        }
    }
}

/// Control registers and EFER bits used to enter long mode directly.
pub mod bits {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.MP.
    pub const CR0_MP: u64 = 1 << 1;
    /// CR0.ET.
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0.NE.
    pub const CR0_NE: u64 = 1 << 5;
    /// CR0.WP: supervisor writes honour read-only pages.
    pub const CR0_WP: u64 = 1 << 16;
    /// CR0.PG: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PAE.
    pub const CR4_PAE: u64 = 1 << 5;
    /// EFER.LME.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA.
    pub const EFER_LMA: u64 = 1 << 10;
    /// EFER.NXE.
    pub const EFER_NXE: u64 = 1 << 11;
}

/// The GDT: null, 64-bit code (0x08), data (0x10), a TSS (0x18).
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_0067,
];

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts a vCPU in 64-bit long mode at `rip` with the built-in page tables.
pub fn setup_long_mode(vcpu: &VcpuFd, rip: u64, rdi: u64) -> Result<(), kvm_ioctls::Error> {
    use bits::*;
    let mut sregs = vcpu.get_sregs()?;
    let code = segment(0x08, true);
    let data = segment(0x10, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_regs {
        rip,
        rdi,
        rsp: STACK_TOP_GPA,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
}

/// Assembled program shared by all guests of a process.
pub fn program_bytes() -> Result<&'static [u8], MachineError> {
    static PROGRAM: std::sync::OnceLock<Result<Vec<u8>, String>> = std::sync::OnceLock::new();
    PROGRAM
        .get_or_init(|| crate::guest::program::assemble().map_err(|e| e.to_string()))
        .as_ref()
        .map(|v| v.as_slice())
        .map_err(|e| MachineError::Assemble(e.clone()))
}

/// A built guest. Dropping it stops its vCPUs, then frees the VM and memory.
pub struct Guest {
    /// Guest index within the run.
    pub id: usize,
    vcpus: Vec<VcpuHandle>,
    bus: Arc<GuestBus>,
    vm: Arc<Vm>,
    mem: GuestMemoryMmap,
    /// The profile the guest applies.
    pub profile: Profile,
    pending: Vec<VcpuFd>,
    config: GuestConfig,
}

impl Guest {
    /// Maps memory, loads the image, page tables and program, and creates the VM and
    /// its vCPUs. Nothing runs until [`Guest::start`].
    pub fn create(
        kvm: &Kvm,
        id: usize,
        config: &GuestConfig,
        image: &Image,
        profile: &Profile,
        events: Sender<GuestEvent>,
    ) -> Result<Self, MachineError> {
        let mem = create_guest_memory(config.mem_size, config.backing, config.thp)
            .map_err(|source| MachineError::Memory { guest: id, source })?;
        let load = |what, r: Result<(), vm_memory::GuestMemoryError>| {
            r.map_err(|source| MachineError::Load {
                guest: id,
                what,
                source,
            })
        };
        for (i, entry) in GDT.iter().enumerate() {
            load(
                "GDT",
                mem.write_obj(*entry, GuestAddress(GDT_GPA + i as u64 * 8)),
            )?;
        }
        load("page tables", write_page_tables(&mem, config.mem_size))?;
        load(
            "program",
            mem.write_slice(program_bytes()?, GuestAddress(CODE_GPA)),
        )?;
        load_bytes(&mem, IMAGE_GPA, image.bytes())
            .map_err(|source| MachineError::Memory { guest: id, source })?;
        let mut params = profile.params(id, config.mode);
        params.loop_count = config.loop_count;
        params.error_code = config.error_code;
        params.delay = config.delay;
        load("parameters", params.write_to(&mem))?;

        let vm = Vm::new(kvm).map_err(|source| MachineError::Vm { guest: id, source })?;
        vm.register_regions(&regions(&mem))
            .map_err(|source| MachineError::Vm { guest: id, source })?;
        let mut pending = Vec::new();
        for v in 0..config.vcpus {
            let vcpu_err = |what| {
                move |source| MachineError::Vcpu {
                    guest: id,
                    vcpu: v,
                    what,
                    source,
                }
            };
            let fd = vm
                .fd()
                .create_vcpu(v as u64)
                .map_err(vcpu_err("KVM_CREATE_VCPU"))?;
            // vCPU 0 runs the program; the others park in the HLT loop at its start.
            let rip = if v == 0 {
                CODE_GPA + crate::guest::program::ENTRY_OFFSET
            } else {
                CODE_GPA
            };
            setup_long_mode(&fd, rip, PARAMS_GPA)
                .map_err(vcpu_err("setting long-mode registers"))?;
            pending.push(fd);
        }
        let bus = Arc::new(GuestBus::new(id, events));
        Ok(Guest {
            id,
            vcpus: Vec::new(),
            bus,
            vm: Arc::new(vm),
            mem,
            profile: profile.clone(),
            pending,
            config: config.clone(),
        })
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), MachineError> {
        for (i, fd) in self.pending.drain(..).enumerate() {
            let spec = VcpuSpec {
                index: i,
                pin: self.config.pin.clone(),
                name: format!("g{}-vcpu{}", self.id, i),
            };
            let h = VcpuHandle::spawn(fd, spec, self.bus.clone()).map_err(|source| {
                MachineError::Thread {
                    guest: self.id,
                    source,
                }
            })?;
            self.vcpus.push(h);
        }
        Ok(())
    }

    /// Parks every vCPU; returns the longest time one took to stop.
    pub fn pause(&self) -> Duration {
        self.vcpus
            .iter()
            .map(|v| v.pause())
            .max()
            .unwrap_or_default()
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) {
        self.vcpus.iter().for_each(|v| v.resume());
    }

    /// Stops every vCPU thread.
    pub fn stop(&mut self) {
        self.vcpus.iter_mut().for_each(|v| v.stop());
    }

    /// States of the vCPUs.
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        self.vcpus.iter().map(|v| v.state()).collect()
    }

    /// Kernel thread ids of the vCPU threads.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.vcpus.iter().map(|v| v.tid()).collect()
    }

    /// KVM's own translation of `gva` on vCPU `vcpu` (`KVM_TRANSLATE`); the vCPU is
    /// held still for the ioctl. `None` if the vCPU does not exist.
    pub fn kvm_translate(
        &self,
        vcpu: usize,
        gva: u64,
    ) -> Option<Result<crate::guest_phys::KvmTranslation, kvm_ioctls::Error>> {
        let v = self.vcpus.get(vcpu)?;
        Some(v.with_fd(|fd| fd.translate_gva(gva).map(Into::into)))
    }

    /// The paging mode and CR3 of vCPU `vcpu`, from its registers, for the software
    /// walker.
    pub fn paging_state(&self, vcpu: usize) -> Option<Result<(shadow::PagingMode, u64), String>> {
        let v = self.vcpus.get(vcpu)?;
        Some(v.with_fd(|fd| {
            let s = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
            let mode = shadow::PagingMode::from_registers(s.cr0, s.cr4, s.efer, 52)
                .map_err(|e| e.to_string())?;
            Ok((mode, s.cr3))
        }))
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The guest's memory regions (host address, size, guest-physical base).
    pub fn regions(&self) -> Vec<RegionInfo> {
        regions(&self.mem)
    }

    /// The KVM VM (memslots, dirty log).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// A shared handle to the KVM VM, for threads that read its dirty log.
    pub fn vm_handle(&self) -> Arc<Vm> {
        self.vm.clone()
    }

    /// Handles that pause and resume the guest's vCPUs from any thread.
    pub fn vcpu_controls(&self) -> Vec<crate::vstate::vcpu::VcpuControl> {
        self.vcpus.iter().map(|v| v.control()).collect()
    }

    /// VM exits so far, by kind.
    pub fn exits(&self) -> ExitCounts {
        self.bus.exits.snapshot()
    }

    /// Serial lines printed so far.
    pub fn serial_lines(&self) -> Vec<String> {
        self.bus
            .serial_lines()
            .into_iter()
            .map(|(_, l)| l)
            .collect()
    }

    /// What the program wrote into its result block.
    pub fn results(&self) -> Results {
        Results::read_from(&self.mem).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // vCPU threads must end before the VM and the memory they use go away.
        self.stop();
    }
}
