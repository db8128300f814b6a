//! The built-in guest program, assembled at run time with iced-x86's code assembler.
//!
//! The program is the same byte for byte in every guest; what makes guests differ is
//! the parameter block the VMM writes at [`PARAMS_GPA`] (see [`Params`]). It runs in
//! 64-bit long mode from the first instruction and does O(pages touched) simple work,
//! because on hosts without EPT/NPT every guest instruction may be emulated.
//!
//! Modes:
//! * `Profile`: stamp image pages, write one per-guest value into each unique page,
//!   one zero into each zeroed page, report `Ready` then `Done`, halt.
//! * `Counter`: as `Profile`, then increment a counter in the result block forever
//!   (a guest that visibly makes progress, for pause/resume).
//! * `Calibrate`: a counted loop of two instructions per iteration between `Started`
//!   and `Done` (guest instruction speed).
//! * `ExitLoop`: a counted loop of port writes (the cost of a VM exit round trip).
//! * `Fault`: read the unmapped null page with no IDT: a triple fault.
//! * `Error`: report `Error` with the code from the parameter block.
//! * `Writer`: as `Profile`, then forever: round r = 1, 2, … writes r at byte 8 of
//!   each of the first `loop_count` image pages (through the high-half mapping), after
//!   checking the page still holds r − 1 from the previous round (rounds are spaced by
//!   a delay loop of `delay` iterations); a mismatch is a lost
//!   write, reported as `Error` with [`ERROR_LOST_WRITE`]. Each completed round is
//!   published in the result block's counter. Pages of different guests in the same
//!   round are identical, so a merger keeps merging what the guests keep breaking.

use super::layout::*;
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Control-port phase: the program started.
pub const PHASE_STARTED: u32 = 1;
/// Control-port phase: the memory profile is applied.
pub const PHASE_READY: u32 = 2;
/// Control-port phase: the program finished.
pub const PHASE_DONE: u32 = 3;
/// Control-port phase: the program reports an error; bits 8.. carry the code.
pub const PHASE_ERROR: u32 = 4;

/// What the guest program does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Mode {
    /// Apply the memory profile, then halt.
    Profile = 0,
    /// Apply the memory profile, then count forever.
    Counter = 1,
    /// Counted loop for instruction-speed calibration.
    Calibrate = 2,
    /// Counted loop of port-I/O exits.
    ExitLoop = 3,
    /// Triple-fault on purpose.
    Fault = 4,
    /// Report an error code on the control port.
    Error = 5,
    /// Apply the memory profile, then rewrite the first `loop_count` image pages round
    /// after round, checking each still holds the previous round's value.
    Writer = 6,
}

/// Error code the `Writer` guest reports when a page lost one of its writes.
pub const ERROR_LOST_WRITE: u32 = 0x105e;

/// Offset within a page where the `Writer` guest keeps its round number.
pub const WRITER_OFFSET: u64 = 8;

/// Offset of the program's entry point from [`CODE_GPA`]; offset 0 is a HLT loop
/// where secondary vCPUs park.
pub const ENTRY_OFFSET: u64 = 3;

/// Instructions per iteration of the `Calibrate` loop (`dec rcx; jnz`).
pub const CALIBRATE_INSNS_PER_ITER: u64 = 2;

// Offsets of the parameter block fields (u64 each).
const P_MODE: i32 = 0;
const P_IMAGE_BASE: i32 = 8;
const P_STAMPS: i32 = 16;
const P_STAMP_STRIDE: i32 = 24;
const P_STAMP_VALUE: i32 = 32;
const P_UNIQUE_BASE: i32 = 40;
const P_UNIQUE_PAGES: i32 = 48;
const P_UNIQUE_SEED: i32 = 56;
const P_ZEROED_BASE: i32 = 64;
const P_ZEROED_PAGES: i32 = 72;
const P_LOOP_COUNT: i32 = 80;
const P_ERROR_CODE: i32 = 88;
const P_DELAY: i32 = 96;
const R_PAGES_TOUCHED: i32 = RESULTS_OFFSET as i32;
const R_COUNTER: i32 = RESULTS_OFFSET as i32 + 8;

/// The parameter block: everything that differs between guests or runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    /// What the program does.
    pub mode: u64,
    /// Guest-virtual address of the image's first byte.
    pub image_base: u64,
    /// Number of image pages to stamp.
    pub stamps: u64,
    /// Distance between stamped pages, in bytes.
    pub stamp_stride: u64,
    /// The value written at offset 0 of each stamped page.
    pub stamp_value: u64,
    /// Guest-virtual address of the unique area.
    pub unique_base: u64,
    /// Pages in the unique area.
    pub unique_pages: u64,
    /// Value written into the first unique page; incremented per page.
    pub unique_seed: u64,
    /// Guest-virtual address of the zeroed area.
    pub zeroed_base: u64,
    /// Pages in the zeroed area.
    pub zeroed_pages: u64,
    /// Iterations of the calibration or exit loop.
    pub loop_count: u64,
    /// Code reported in `Error` mode.
    pub error_code: u64,
    /// `Writer` mode: iterations of a two-instruction delay loop between rounds.
    pub delay: u64,
}

impl Params {
    /// Writes the block at [`PARAMS_GPA`].
    pub fn write_to<M: GuestMemory>(&self, mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
        let fields = [
            (P_MODE, self.mode),
            (P_IMAGE_BASE, self.image_base),
            (P_STAMPS, self.stamps),
            (P_STAMP_STRIDE, self.stamp_stride),
            (P_STAMP_VALUE, self.stamp_value),
            (P_UNIQUE_BASE, self.unique_base),
            (P_UNIQUE_PAGES, self.unique_pages),
            (P_UNIQUE_SEED, self.unique_seed),
            (P_ZEROED_BASE, self.zeroed_base),
            (P_ZEROED_PAGES, self.zeroed_pages),
            (P_LOOP_COUNT, self.loop_count),
            (P_ERROR_CODE, self.error_code),
            (P_DELAY, self.delay),
        ];
        for (off, val) in fields {
            mem.write_obj(val, GuestAddress(PARAMS_GPA + off as u64))?;
        }
        Ok(())
    }
}

/// Results the guest program leaves in its parameter page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Results {
    /// Pages the program wrote while applying the profile.
    pub pages_touched: u64,
    /// The `Counter` mode's counter.
    pub counter: u64,
}

impl Results {
    /// Reads the results from guest memory.
    pub fn read_from<M: GuestMemory>(mem: &M) -> Result<Self, vm_memory::GuestMemoryError> {
        Ok(Results {
            pages_touched: mem.read_obj(GuestAddress(PARAMS_GPA + R_PAGES_TOUCHED as u64))?,
            counter: mem.read_obj(GuestAddress(PARAMS_GPA + R_COUNTER as u64))?,
        })
    }
}

/// Message printed on the serial port when the program starts.
pub const MSG_STARTED: &str = "memvirt guest: started\n";
/// Message printed on the serial port when the profile is applied.
pub const MSG_READY: &str = "memvirt guest: profile applied, ready\n";

/// Assembles the program for address [`CODE_GPA`]. The code expects the parameter
/// block's address in `rdi`.
pub fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut calibrate = a.create_label();
    let mut exit_loop = a.create_label();
    let mut fault = a.create_label();
    let mut error = a.create_label();
    let mut unique = a.create_label();
    let mut zeroed = a.create_label();
    let mut profiled = a.create_label();
    let mut done = a.create_label();
    let mut halt = a.create_label();
    let mut counter = a.create_label();
    let mut writer = a.create_label();
    let mut print = a.create_label();
    let mut msg_started = a.create_label();
    let mut msg_ready = a.create_label();

    // Offset 0: the parking loop for vCPUs other than the first (`hlt; jmp -3`).
    a.db(&[0xf4, 0xeb, 0xfd])?;
    // Entry: r14 = parameter block. Announce the start.
    a.mov(r14, rdi)?;
    a.lea(rsi, ptr(msg_started))?;
    a.call(print)?;
    a.mov(eax, PHASE_STARTED)?;
    a.mov(dx, CONTROL_PORT as u32)?;
    a.out(dx, eax)?;

    a.mov(rax, qword_ptr(r14 + P_MODE))?;
    a.cmp(rax, Mode::Calibrate as i32)?;
    a.je(calibrate)?;
    a.cmp(rax, Mode::ExitLoop as i32)?;
    a.je(exit_loop)?;
    a.cmp(rax, Mode::Fault as i32)?;
    a.je(fault)?;
    a.cmp(rax, Mode::Error as i32)?;
    a.je(error)?;

    // Profile: stamps on image pages.
    a.xor(r15, r15)?;
    a.mov(rbx, qword_ptr(r14 + P_IMAGE_BASE))?;
    a.mov(rcx, qword_ptr(r14 + P_STAMPS))?;
    a.mov(rdx, qword_ptr(r14 + P_STAMP_STRIDE))?;
    a.mov(rax, qword_ptr(r14 + P_STAMP_VALUE))?;
    a.test(rcx, rcx)?;
    a.jz(unique)?;
    let mut stamp_loop = a.create_label();
    a.set_label(&mut stamp_loop)?;
    a.mov(qword_ptr(rbx), rax)?;
    a.add(rbx, rdx)?;
    a.inc(r15)?;
    a.dec(rcx)?;
    a.jnz(stamp_loop)?;

    // Unique pages: one per-guest, per-page value each.
    a.set_label(&mut unique)?;
    a.mov(rbx, qword_ptr(r14 + P_UNIQUE_BASE))?;
    a.mov(rcx, qword_ptr(r14 + P_UNIQUE_PAGES))?;
    a.mov(rax, qword_ptr(r14 + P_UNIQUE_SEED))?;
    a.test(rcx, rcx)?;
    a.jz(zeroed)?;
    let mut unique_loop = a.create_label();
    a.set_label(&mut unique_loop)?;
    a.mov(qword_ptr(rbx), rax)?;
    a.add(rbx, 4096)?;
    a.inc(rax)?;
    a.inc(r15)?;
    a.dec(rcx)?;
    a.jnz(unique_loop)?;

    // Zeroed pages: allocated by a write of zero.
    a.set_label(&mut zeroed)?;
    a.mov(rbx, qword_ptr(r14 + P_ZEROED_BASE))?;
    a.mov(rcx, qword_ptr(r14 + P_ZEROED_PAGES))?;
    a.xor(eax, eax)?;
    a.test(rcx, rcx)?;
    a.jz(profiled)?;
    let mut zero_loop = a.create_label();
    a.set_label(&mut zero_loop)?;
    a.mov(qword_ptr(rbx), rax)?;
    a.add(rbx, 4096)?;
    a.inc(r15)?;
    a.dec(rcx)?;
    a.jnz(zero_loop)?;

    a.set_label(&mut profiled)?;
    a.mov(qword_ptr(r14 + R_PAGES_TOUCHED), r15)?;
    a.lea(rsi, ptr(msg_ready))?;
    a.call(print)?;
    a.mov(eax, PHASE_READY)?;
    a.mov(dx, CONTROL_PORT as u32)?;
    a.out(dx, eax)?;
    a.cmp(qword_ptr(r14 + P_MODE), Mode::Counter as i32)?;
    a.je(counter)?;
    a.cmp(qword_ptr(r14 + P_MODE), Mode::Writer as i32)?;
    a.je(writer)?;

    a.set_label(&mut done)?;
    a.mov(eax, PHASE_DONE)?;
    a.mov(dx, CONTROL_PORT as u32)?;
    a.out(dx, eax)?;
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;

    a.set_label(&mut counter)?;
    a.inc(qword_ptr(r14 + R_COUNTER))?;
    a.jmp(counter)?;

    // Writer: r13 = round; rsi walks the pages; rcx counts them.
    a.set_label(&mut writer)?;
    a.xor(r13, r13)?;
    let mut round = a.create_label();
    let mut page = a.create_label();
    let mut write = a.create_label();
    let mut lost = a.create_label();
    a.set_label(&mut round)?;
    a.inc(r13)?;
    a.mov(rsi, qword_ptr(r14 + P_IMAGE_BASE))?;
    a.mov(rcx, qword_ptr(r14 + P_LOOP_COUNT))?;
    a.set_label(&mut page)?;
    a.cmp(r13, 1)?;
    a.je(write)?;
    a.lea(rdx, qword_ptr(r13 - 1))?;
    a.cmp(qword_ptr(rsi + WRITER_OFFSET as i32), rdx)?;
    a.jne(lost)?;
    a.set_label(&mut write)?;
    a.mov(qword_ptr(rsi + WRITER_OFFSET as i32), r13)?;
    a.add(rsi, 4096)?;
    a.dec(rcx)?;
    a.jnz(page)?;
    a.mov(qword_ptr(r14 + R_COUNTER), r13)?;
    a.mov(rcx, qword_ptr(r14 + P_DELAY))?;
    a.test(rcx, rcx)?;
    a.jz(round)?;
    let mut delay = a.create_label();
    a.set_label(&mut delay)?;
    a.dec(rcx)?;
    a.jnz(delay)?;
    a.jmp(round)?;
    a.set_label(&mut lost)?;
    a.mov(eax, (ERROR_LOST_WRITE << 8) | PHASE_ERROR)?;
    a.mov(dx, CONTROL_PORT as u32)?;
    a.out(dx, eax)?;
    a.jmp(halt)?;

    a.set_label(&mut calibrate)?;
    a.mov(rcx, qword_ptr(r14 + P_LOOP_COUNT))?;
    let mut cal_loop = a.create_label();
    a.set_label(&mut cal_loop)?;
    a.dec(rcx)?;
    a.jnz(cal_loop)?;
    a.jmp(done)?;

    a.set_label(&mut exit_loop)?;
    a.mov(rcx, qword_ptr(r14 + P_LOOP_COUNT))?;
    a.mov(dx, NOP_PORT as u32)?;
    let mut out_loop = a.create_label();
    a.set_label(&mut out_loop)?;
    a.out(dx, al)?;
    a.dec(rcx)?;
    a.jnz(out_loop)?;
    a.jmp(done)?;

    // Read the null page: #PF with no IDT escalates to a triple fault.
    a.set_label(&mut fault)?;
    a.xor(eax, eax)?;
    a.mov(rax, qword_ptr(rax))?;
    a.jmp(halt)?;

    a.set_label(&mut error)?;
    a.mov(eax, dword_ptr(r14 + P_ERROR_CODE))?;
    a.shl(eax, 8)?;
    a.or(eax, PHASE_ERROR)?;
    a.mov(dx, CONTROL_PORT as u32)?;
    a.out(dx, eax)?;
    a.jmp(halt)?;

    // print: rsi = NUL-terminated string, one serial write per byte.
    a.set_label(&mut print)?;
    a.mov(dx, SERIAL_PORT as u32)?;
    let mut print_loop = a.create_label();
    let mut print_end = a.create_label();
    a.set_label(&mut print_loop)?;
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(print_end)?;
    a.out(dx, al)?;
    a.inc(rsi)?;
    a.jmp(print_loop)?;
    a.set_label(&mut print_end)?;
    a.ret()?;

    a.set_label(&mut msg_started)?;
    a.db(MSG_STARTED.as_bytes())?;
    a.db(&[0])?;
    a.set_label(&mut msg_ready)?;
    a.db(MSG_READY.as_bytes())?;
    a.db(&[0])?;

    a.assemble(CODE_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_into_the_code_area() {
        let code = assemble().expect("assembles");
        assert!(!code.is_empty());
        assert!((code.len() as u64) < CODE_MAX_LEN);
        // The strings are embedded after the code.
        let text = String::from_utf8_lossy(&code);
        assert!(text.contains("profile applied"));
    }
}
