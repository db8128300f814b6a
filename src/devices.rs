//! The devices of a guest: a 16550 serial console (vm-superio) and the control port
//! through which the guest program reports its phases. Port I/O from every vCPU of a
//! guest lands on one [`GuestBus`].

use crate::guest::layout::{CONTROL_PORT, NOP_PORT, SERIAL_PORT};
use crate::guest::program::{PHASE_DONE, PHASE_ERROR, PHASE_READY, PHASE_STARTED};
use serde::Serialize;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// A phase the guest program reported on the control port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The program started.
    Started,
    /// The memory profile is applied.
    Ready,
    /// The program finished.
    Done,
    /// The program reported an error code.
    Error(u32),
    /// A value the protocol does not know.
    Unknown(u32),
}

impl Phase {
    /// Decodes a 32-bit control-port write.
    pub fn decode(value: u32) -> Phase {
        match value & 0xff {
            PHASE_STARTED => Phase::Started,
            PHASE_READY => Phase::Ready,
            PHASE_DONE => Phase::Done,
            PHASE_ERROR => Phase::Error(value >> 8),
            _ => Phase::Unknown(value),
        }
    }
}

/// Something that happened to a guest, sent to whoever runs the guests.
#[derive(Debug, Clone)]
pub struct GuestEvent {
    /// Which guest.
    pub guest: usize,
    /// When the VMM saw it.
    pub at: Instant,
    /// What happened.
    pub kind: EventKind,
}

/// Kinds of [`GuestEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A control-port phase.
    Phase(Phase),
    /// A vCPU stopped running because of a fault or a KVM error.
    VcpuFailed {
        /// vCPU index.
        vcpu: usize,
        /// Why.
        reason: String,
    },
}

/// VM exits of one guest, by kind.
#[derive(Debug, Default)]
pub struct ExitCounters {
    serial: AtomicU64,
    control: AtomicU64,
    nop_port: AtomicU64,
    other_io: AtomicU64,
    hlt: AtomicU64,
    mmio: AtomicU64,
    interrupted: AtomicU64,
    other: AtomicU64,
}

/// A snapshot of [`ExitCounters`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port I/O to the serial console.
    pub serial: u64,
    /// Port I/O to the control port.
    pub control: u64,
    /// Port I/O to the no-op port (exit-cost calibration).
    pub nop_port: u64,
    /// Port I/O elsewhere.
    pub other_io: u64,
    /// HLT.
    pub hlt: u64,
    /// MMIO.
    pub mmio: u64,
    /// KVM_RUN interrupted by a signal (pause/stop kicks).
    pub interrupted: u64,
    /// Anything else.
    pub other: u64,
}

impl ExitCounts {
    /// All exits.
    pub fn total(&self) -> u64 {
        self.serial
            + self.control
            + self.nop_port
            + self.other_io
            + self.hlt
            + self.mmio
            + self.interrupted
            + self.other
    }
}

/// The kind of an exit, for counting.
#[derive(Debug, Clone, Copy)]
pub enum ExitKind {
    /// HLT.
    Hlt,
    /// MMIO access.
    Mmio,
    /// KVM_RUN returned EINTR.
    Interrupted,
    /// Anything else.
    Other,
}

impl ExitCounters {
    /// Counts an exit that is not port I/O (port I/O is counted by the bus).
    pub fn count(&self, kind: ExitKind) {
        let c = match kind {
            ExitKind::Hlt => &self.hlt,
            ExitKind::Mmio => &self.mmio,
            ExitKind::Interrupted => &self.interrupted,
            ExitKind::Other => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> ExitCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExitCounts {
            serial: l(&self.serial),
            control: l(&self.control),
            nop_port: l(&self.nop_port),
            other_io: l(&self.other_io),
            hlt: l(&self.hlt),
            mmio: l(&self.mmio),
            interrupted: l(&self.interrupted),
            other: l(&self.other),
        }
    }
}

/// The serial port raises no interrupt: the guest polls nothing and only writes.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Collects serial output as lines, each with the time it was completed.
#[derive(Debug, Default, Clone)]
pub struct SerialLines {
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    partial: Vec<u8>,
}

impl SerialLines {
    /// The complete lines so far.
    pub fn lines(&self) -> Vec<(Instant, String)> {
        self.lines.lock().expect("serial lines lock").clone()
    }
}

impl Write for SerialLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).to_string();
                self.partial.clear();
                self.lines
                    .lock()
                    .expect("serial lines lock")
                    .push((Instant::now(), line));
            } else {
                self.partial.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Port I/O of one guest.
pub struct GuestBus {
    guest: usize,
    serial: Mutex<Serial<NoInterrupt, NoEvents, SerialLines>>,
    lines: SerialLines,
    events: Mutex<Sender<GuestEvent>>,
    /// Exit counters of all the guest's vCPUs.
    pub exits: ExitCounters,
}

const SERIAL_SPAN: u16 = 8;

impl GuestBus {
    /// A bus for guest `guest` that reports events on `events`.
    pub fn new(guest: usize, events: Sender<GuestEvent>) -> Self {
        let lines = SerialLines::default();
        GuestBus {
            guest,
            serial: Mutex::new(Serial::new(NoInterrupt, lines.clone())),
            lines,
            events: Mutex::new(events),
            exits: ExitCounters::default(),
        }
    }

    /// Sends an event about this guest (ignored when nobody listens any more).
    pub fn send(&self, kind: EventKind) {
        let ev = GuestEvent {
            guest: self.guest,
            at: Instant::now(),
            kind,
        };
        let _ = self.events.lock().expect("event lock").send(ev);
    }

    /// Serial lines the guest printed.
    pub fn serial_lines(&self) -> Vec<(Instant, String)> {
        self.lines.lines()
    }

    /// Handles a port write.
    pub fn io_out(&self, port: u16, data: &[u8]) {
        if (SERIAL_PORT..SERIAL_PORT + SERIAL_SPAN).contains(&port) {
            self.exits.serial.fetch_add(1, Ordering::Relaxed);
            let mut serial = self.serial.lock().expect("serial lock");
            for &b in data.iter().take(1) {
                // The sink never fails and NoInterrupt cannot fail.
                let _ = serial.write((port - SERIAL_PORT) as u8, b);
            }
        } else if port == CONTROL_PORT {
            self.exits.control.fetch_add(1, Ordering::Relaxed);
            let mut word = [0u8; 4];
            let n = data.len().min(4);
            word[..n].copy_from_slice(&data[..n]);
            self.send(EventKind::Phase(Phase::decode(u32::from_le_bytes(word))));
        } else if port == NOP_PORT {
            self.exits.nop_port.fetch_add(1, Ordering::Relaxed);
        } else {
            self.exits.other_io.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handles a port read.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        if (SERIAL_PORT..SERIAL_PORT + SERIAL_SPAN).contains(&port) {
            self.exits.serial.fetch_add(1, Ordering::Relaxed);
            let v = self
                .serial
                .lock()
                .expect("serial lock")
                .read((port - SERIAL_PORT) as u8);
            data.fill(0);
            if let Some(first) = data.first_mut() {
                *first = v;
            }
        } else {
            self.exits.other_io.fetch_add(1, Ordering::Relaxed);
            data.fill(0xff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_decode() {
        assert_eq!(Phase::decode(PHASE_READY), Phase::Ready);
        assert_eq!(Phase::decode(PHASE_ERROR | (42 << 8)), Phase::Error(42));
        assert_eq!(Phase::decode(0x77), Phase::Unknown(0x77));
    }

    #[test]
    fn serial_writes_become_lines_and_control_writes_become_events() {
        let (tx, rx) = std::sync::mpsc::channel();
        let bus = GuestBus::new(3, tx);
        for b in b"hi\nthere\n" {
            bus.io_out(SERIAL_PORT, &[*b]);
        }
        let lines: Vec<String> = bus.serial_lines().into_iter().map(|(_, l)| l).collect();
        assert_eq!(lines, vec!["hi", "there"]);
        bus.io_out(CONTROL_PORT, &PHASE_DONE.to_le_bytes());
        let ev = rx.try_recv().unwrap();
        assert_eq!(ev.guest, 3);
        assert_eq!(ev.kind, EventKind::Phase(Phase::Done));
        assert_eq!(bus.exits.snapshot().serial, 9);
        assert_eq!(bus.exits.snapshot().control, 1);
    }
}
