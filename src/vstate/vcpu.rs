//! vCPUs as host threads with an explicit run loop and state.
//!
//! Each vCPU thread loops on `KVM_RUN`. Another thread steers it through a request
//! word: `pause` asks the vCPU to park, `resume` lets it go on, `stop` ends the
//! thread. A vCPU inside `KVM_RUN` is kicked out with a real-time signal whose
//! handler does nothing: the ioctl returns `EINTR` and the loop looks at the request.
//! The kick is repeated every millisecond until the vCPU acknowledges, which closes
//! the race of a signal that lands just before `KVM_RUN` is entered.
//!
//! States: `Created → Running ⇄ Paused`, `Running → Halted` (the guest executed HLT
//! and, with no interrupt controller, waits for nothing), and finally `Stopped` or
//! `Failed`. A halted or stopped vCPU writes nothing, so it counts as held still.

use crate::devices::{EventKind, ExitKind, GuestBus};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where a vCPU thread is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuState {
    /// Thread not started yet.
    Created,
    /// In or around KVM_RUN.
    Running,
    /// Parked on request.
    Paused,
    /// The guest halted; the thread waits for stop.
    Halted,
    /// Stopped on request.
    Stopped,
    /// Stopped by a fault or KVM error.
    Failed(String),
}

impl VcpuState {
    /// Whether the vCPU cannot write guest memory in this state.
    pub fn is_still(&self) -> bool {
        !matches!(self, VcpuState::Running | VcpuState::Created)
    }
}

const REQ_RUN: u8 = 0;
const REQ_PAUSE: u8 = 1;
const REQ_STOP: u8 = 2;

struct Shared {
    state: Mutex<VcpuState>,
    changed: Condvar,
    request: AtomicU8,
    tid: AtomicI32,
    pthread: Mutex<Option<libc::pthread_t>>,
}

/// A cloneable handle that pauses and resumes one vCPU from any thread (the dedup
/// engine's "hold the writers still" hook uses it).
#[derive(Clone)]
pub struct VcpuControl {
    shared: Arc<Shared>,
}

impl VcpuControl {
    /// The current state.
    pub fn state(&self) -> VcpuState {
        self.shared.state.lock().expect("vcpu state").clone()
    }

    fn wait_for(&self, pred: impl Fn(&VcpuState) -> bool, timeout: Duration) -> bool {
        let guard = self.shared.state.lock().expect("vcpu state");
        let (_g, res) = self
            .shared
            .changed
            .wait_timeout_while(guard, timeout, |s| !pred(s))
            .expect("vcpu state");
        !res.timed_out()
    }

    fn kick(&self) {
        if let Some(t) = *self.shared.pthread.lock().expect("pthread") {
            // SAFETY: t is the pthread of our own vCPU thread, alive until joined;
            // the signal's handler is installed and does nothing.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Asks the vCPU to park and returns once it is still (paused, halted, stopped or
    /// failed). Returns how long that took.
    pub fn pause(&self) -> Duration {
        let start = Instant::now();
        {
            let _g = self.shared.state.lock().expect("vcpu state");
            self.shared.request.store(REQ_PAUSE, Ordering::Release);
        }
        while !self.wait_for(VcpuState::is_still, Duration::from_millis(1)) {
            self.kick();
        }
        start.elapsed()
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let _g = self.shared.state.lock().expect("vcpu state");
        self.shared.request.store(REQ_RUN, Ordering::Release);
        self.shared.changed.notify_all();
    }
}

/// A handle to a running vCPU thread.
pub struct VcpuHandle {
    index: usize,
    shared: Arc<Shared>,
    fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The handler does nothing; its only job is to make KVM_RUN return EINTR.
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .expect("installing the vCPU kick signal handler");
    });
}

/// How a vCPU thread is set up.
pub struct VcpuSpec {
    /// vCPU index within its guest.
    pub index: usize,
    /// Host CPUs the thread may run on (`None`: any).
    pub pin: Option<Vec<usize>>,
    /// Thread name.
    pub name: String,
}

impl VcpuHandle {
    /// Starts a thread that runs `vcpu` until stopped or failed.
    pub fn spawn(vcpu: VcpuFd, spec: VcpuSpec, bus: Arc<GuestBus>) -> std::io::Result<Self> {
        let fd = Arc::new(Mutex::new(vcpu));
        let thread_fd = fd.clone();
        install_kick_handler();
        let shared = Arc::new(Shared {
            state: Mutex::new(VcpuState::Created),
            changed: Condvar::new(),
            request: AtomicU8::new(REQ_RUN),
            tid: AtomicI32::new(0),
            pthread: Mutex::new(None),
        });
        let s = shared.clone();
        let index = spec.index;
        let thread = std::thread::Builder::new()
            .name(spec.name)
            .spawn(move || vcpu_thread(thread_fd, index, spec.pin, s, bus))?;
        let handle = VcpuHandle {
            index,
            shared,
            fd,
            thread: Some(thread),
        };
        handle
            .control()
            .wait_for(|s| *s != VcpuState::Created, Duration::from_secs(10));
        Ok(handle)
    }

    /// The vCPU's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The kernel thread id of the vCPU thread.
    pub fn tid(&self) -> i32 {
        self.shared.tid.load(Ordering::Acquire)
    }

    /// A cloneable pause/resume handle.
    pub fn control(&self) -> VcpuControl {
        VcpuControl {
            shared: self.shared.clone(),
        }
    }

    /// The current state.
    pub fn state(&self) -> VcpuState {
        self.control().state()
    }

    /// Asks the vCPU to park; see [`VcpuControl::pause`].
    pub fn pause(&self) -> Duration {
        self.control().pause()
    }

    /// Runs `f` on the vCPU's file descriptor (e.g. `KVM_TRANSLATE`, register reads)
    /// while the vCPU is held still: pauses it if it is running and resumes it after.
    pub fn with_fd<R>(&self, f: impl FnOnce(&VcpuFd) -> R) -> R {
        // Decide from the request word, not the state: a vCPU just resumed may still
        // show `Paused` while it is about to re-enter KVM_RUN with the descriptor.
        let previous = self.shared.request.load(Ordering::Acquire);
        if previous == REQ_RUN {
            self.pause();
        }
        let r = f(&self.fd.lock().expect("vcpu fd"));
        if previous == REQ_RUN {
            self.resume();
        }
        r
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.control().resume()
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        {
            let _g = self.shared.state.lock().expect("vcpu state");
            self.shared.request.store(REQ_STOP, Ordering::Release);
            self.shared.changed.notify_all();
        }
        let c = self.control();
        while !c.wait_for(
            |s| matches!(s, VcpuState::Stopped | VcpuState::Failed(_)),
            Duration::from_millis(1),
        ) {
            c.kick();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

fn set_state(shared: &Shared, state: VcpuState) {
    *shared.state.lock().expect("vcpu state") = state;
    shared.changed.notify_all();
}

/// Parks until the request is no longer `pause` (or is `stop`). Returns false on stop.
fn park(shared: &Shared, parked_state: VcpuState) -> bool {
    let mut g = shared.state.lock().expect("vcpu state");
    *g = parked_state.clone();
    shared.changed.notify_all();
    loop {
        match shared.request.load(Ordering::Acquire) {
            REQ_STOP => return false,
            // A halted vCPU stays halted through resume; only stop ends it.
            REQ_RUN if parked_state != VcpuState::Halted => {
                *g = VcpuState::Running;
                shared.changed.notify_all();
                return true;
            }
            _ => g = shared.changed.wait(g).expect("vcpu state"),
        }
    }
}

fn pin_current_thread(cpus: &[usize]) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

fn vcpu_thread(
    vcpu: Arc<Mutex<VcpuFd>>,
    index: usize,
    pin: Option<Vec<usize>>,
    shared: Arc<Shared>,
    bus: Arc<GuestBus>,
) {
    // SAFETY: gettid and pthread_self have no preconditions.
    shared
        .tid
        .store(unsafe { libc::gettid() }, Ordering::Release);
    // SAFETY: as above.
    *shared.pthread.lock().expect("pthread") = Some(unsafe { libc::pthread_self() });
    if let Some(cpus) = &pin {
        if let Err(e) = pin_current_thread(cpus) {
            let reason = format!("pinning to CPUs {cpus:?} failed: {e}");
            bus.send(EventKind::VcpuFailed {
                vcpu: index,
                reason: reason.clone(),
            });
            set_state(&shared, VcpuState::Failed(reason));
            return;
        }
    }
    set_state(&shared, VcpuState::Running);
    let fail = |reason: String| {
        bus.send(EventKind::VcpuFailed {
            vcpu: index,
            reason: reason.clone(),
        });
        set_state(&shared, VcpuState::Failed(reason));
    };
    loop {
        match shared.request.load(Ordering::Acquire) {
            REQ_STOP => break,
            REQ_PAUSE => {
                if !park(&shared, VcpuState::Paused) {
                    break;
                }
                continue;
            }
            _ => {}
        }
        // The descriptor's lock is held only inside KVM_RUN and the exit's handling;
        // a parked vCPU leaves it to `with_fd`.
        let step = {
            let mut fd = vcpu.lock().expect("vcpu fd");
            run_once(&mut fd, &bus)
        };
        match step {
            Step::Continue => {}
            Step::Halt => {
                if !park(&shared, VcpuState::Halted) {
                    break;
                }
            }
            Step::Fail(reason) => return fail(reason),
        }
    }
    set_state(&shared, VcpuState::Stopped);
}

/// What the run loop does after one `KVM_RUN`.
enum Step {
    Continue,
    Halt,
    Fail(String),
}

/// Enters the guest once and handles the exit.
fn run_once(fd: &mut VcpuFd, bus: &GuestBus) -> Step {
    match fd.run() {
        Ok(VcpuExit::IoOut(port, data)) => bus.io_out(port, data),
        Ok(VcpuExit::IoIn(port, data)) => bus.io_in(port, data),
        Ok(VcpuExit::Hlt) => {
            bus.exits.count(ExitKind::Hlt);
            return Step::Halt;
        }
        Ok(VcpuExit::MmioRead(_, data)) => {
            bus.exits.count(ExitKind::Mmio);
            data.fill(0xff);
        }
        Ok(VcpuExit::MmioWrite(..)) => bus.exits.count(ExitKind::Mmio),
        Ok(VcpuExit::Shutdown) => {
            bus.exits.count(ExitKind::Other);
            return Step::Fail(
                "triple fault (KVM_EXIT_SHUTDOWN): the guest hit an exception it could not deliver"
                    .into(),
            );
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => {
            bus.exits.count(ExitKind::Other);
            return Step::Fail(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on CPU {cpu}"
            ));
        }
        Ok(VcpuExit::InternalError) => {
            bus.exits.count(ExitKind::Other);
            return Step::Fail("KVM_EXIT_INTERNAL_ERROR: KVM could not emulate the guest".into());
        }
        Ok(VcpuExit::Intr) => bus.exits.count(ExitKind::Interrupted),
        Ok(other) => {
            bus.exits.count(ExitKind::Other);
            return Step::Fail(format!("unexpected VM exit {other:?}"));
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            bus.exits.count(ExitKind::Interrupted);
        }
        Err(e) => return Step::Fail(format!("KVM_RUN failed: {e}")),
    }
    Step::Continue
}
