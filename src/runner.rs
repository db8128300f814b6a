//! Boots a row of identical guests in parallel and collects what each reports.

use crate::devices::{EventKind, ExitCounts, GuestEvent, Phase};
use crate::guest::image::Image;
use crate::guest::profile::Profile;
use crate::machine::{Guest, GuestConfig, MachineError};
use crate::units::PAGE_SIZE;
use crate::vstate::memory::resident_pages;
use kvm_ioctls::Kvm;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// What one guest did, for tables and JSON.
#[derive(Debug, Clone, Serialize)]
pub struct GuestReport {
    /// Guest index.
    pub id: usize,
    /// Whether the guest reported `Ready`.
    pub ready: bool,
    /// Milliseconds from vCPU start to `Ready`.
    pub boot_ms: Option<f64>,
    /// Milliseconds to set up memory, load the image and create the VM.
    pub setup_ms: f64,
    /// Phases in the order they arrived, with milliseconds since vCPU start.
    pub phases: Vec<(Phase, f64)>,
    /// VM exits by kind.
    pub exits: ExitCounts,
    /// Total VM exits.
    pub exits_total: u64,
    /// Pages the guest program says it wrote.
    pub pages_touched: u64,
    /// Guest RAM resident in host memory (mincore), bytes.
    pub resident_bytes: u64,
    /// Lines the guest printed on its serial console.
    pub serial_lines: Vec<String>,
    /// Why the guest failed, if it did.
    pub failure: Option<String>,
}

/// Guests booted together.
pub struct Fleet {
    /// The guests, by index.
    pub guests: Vec<Guest>,
    events: Receiver<GuestEvent>,
    started: Vec<Instant>,
    setup_ms: Vec<f64>,
    phases: Vec<Vec<(Phase, Instant)>>,
    failures: Vec<Option<String>>,
}

impl Fleet {
    /// Creates one guest per config in parallel (memory, image, VM), then starts them
    /// all. Guest `i` gets `configs[i]`.
    pub fn boot(
        kvm: &Kvm,
        configs: &[GuestConfig],
        image: &Image,
        profile: &Profile,
    ) -> Result<Fleet, MachineError> {
        let count = configs.len();
        let (tx, rx) = channel();
        let built: Vec<Result<(Guest, f64), MachineError>> = std::thread::scope(|s| {
            let handles: Vec<_> = configs
                .iter()
                .enumerate()
                .map(|(id, config)| {
                    let tx = tx.clone();
                    s.spawn(move || {
                        let t = Instant::now();
                        let g = Guest::create(kvm, id, config, image, profile, tx)?;
                        Ok((g, t.elapsed().as_secs_f64() * 1e3))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("guest set-up thread panicked"))
                .collect()
        });
        let mut guests = Vec::with_capacity(count);
        let mut setup_ms = Vec::with_capacity(count);
        for b in built {
            let (g, ms) = b?;
            guests.push(g);
            setup_ms.push(ms);
        }
        let mut started = Vec::with_capacity(count);
        for g in guests.iter_mut() {
            started.push(Instant::now());
            g.start()?;
        }
        Ok(Fleet {
            guests,
            events: rx,
            started,
            setup_ms,
            phases: vec![Vec::new(); count],
            failures: vec![None; count],
        })
    }

    fn absorb(&mut self, ev: GuestEvent) {
        match ev.kind {
            EventKind::Phase(p) => {
                if let Phase::Error(code) = p {
                    self.failures[ev.guest]
                        .get_or_insert(format!("guest program reported error code {code}"));
                }
                self.phases[ev.guest].push((p, ev.at));
            }
            EventKind::VcpuFailed { vcpu, reason } => {
                self.failures[ev.guest].get_or_insert(format!("vCPU {vcpu}: {reason}"));
            }
        }
    }

    /// Whether guest `id` has reported `phase` or failed.
    fn settled(&self, id: usize, phase: Phase) -> bool {
        self.failures[id].is_some() || self.phases[id].iter().any(|(p, _)| *p == phase)
    }

    /// Waits until every guest has reported `phase` or failed, or `timeout` passes;
    /// `progress` is called with the number of settled guests as they settle.
    /// Setting `cancel` (e.g. from a Ctrl-C handler) ends the wait early; guests not
    /// settled by then are marked as interrupted.
    pub fn wait_for(
        &mut self,
        phase: Phase,
        timeout: Duration,
        cancel: &AtomicBool,
        mut progress: impl FnMut(usize),
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let settled = (0..self.guests.len())
                .filter(|&i| self.settled(i, phase))
                .count();
            progress(settled);
            if settled == self.guests.len() {
                break;
            }
            let now = Instant::now();
            let cancelled = cancel.load(Ordering::Relaxed);
            if now >= deadline || cancelled {
                for i in 0..self.guests.len() {
                    if !self.settled(i, phase) {
                        self.failures[i] = Some(if cancelled {
                            format!("interrupted before it reported {phase:?}")
                        } else {
                            format!(
                                "did not report {phase:?} within {:.1} s",
                                timeout.as_secs_f64()
                            )
                        });
                    }
                }
                break;
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            if let Ok(ev) = self.events.recv_timeout(slice) {
                self.absorb(ev);
            }
        }
        self.poll_events();
    }

    /// Takes in the events that arrived since the last wait (phases, failures).
    pub fn poll_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            self.absorb(ev);
        }
    }

    /// Phases of guest `id` with the time each arrived.
    pub fn phases(&self, id: usize) -> &[(Phase, Instant)] {
        &self.phases[id]
    }

    /// Why guest `id` failed, if it did.
    pub fn failure(&self, id: usize) -> Option<&str> {
        self.failures[id].as_deref()
    }

    /// A report for every guest.
    pub fn reports(&self) -> Vec<GuestReport> {
        self.guests
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let t0 = self.started[i];
                let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
                let ready_at = self.phases[i].iter().find(|(p, _)| *p == Phase::Ready);
                let exits = g.exits();
                let resident_pages: usize = g
                    .regions()
                    .iter()
                    .filter_map(|r| resident_pages(r).ok())
                    .map(|v| v.iter().filter(|r| **r).count())
                    .sum();
                GuestReport {
                    id: i,
                    ready: ready_at.is_some(),
                    boot_ms: ready_at.map(|(_, t)| ms(*t)),
                    setup_ms: self.setup_ms[i],
                    phases: self.phases[i].iter().map(|(p, t)| (*p, ms(*t))).collect(),
                    exits,
                    exits_total: exits.total(),
                    pages_touched: g.results().pages_touched,
                    resident_bytes: resident_pages as u64 * PAGE_SIZE,
                    serial_lines: g.serial_lines(),
                    failure: self.failures[i].clone(),
                }
            })
            .collect()
    }

    /// Stops every guest's vCPUs.
    pub fn shutdown(&mut self) {
        self.guests.iter_mut().for_each(|g| g.stop());
    }
}
