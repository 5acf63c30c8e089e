//! The run-state owner: the one loop that changes the machine's run state. vCPUs,
//! the disks' workers, the QMP server, the signal thread and the panic hook send it
//! [`Input`]s ([`inbox`]); [`Owner::step`] is its one transition function, a table
//! over (run state, input), acting on the machine through [`Lifecycle`] (so every
//! transition is unit-tested without KVM). QMP commands arrive parsed
//! ([`command::Command`]); the events it sends are typed ([`events`]).
//!
//! The machine's run states (QMP `query-status`), and what moves it:
//!
//! ```text
//!   running --stop---------------------------------------------> paused
//!   running --a disk error under stop, or a host call past its
//!             disk's hang-timeout: BLOCK_IO_ERROR, STOP---------> io-error
//!   paused  --the same: BLOCK_IO_ERROR--------------------------> io-error
//!   paused, io-error --cont: every stopped disk replayed, then
//!             the guest clock, then the vCPUs: RESUME-----------> running
//!   paused, io-error --cont refused (a disk detached, or a call
//!             of its hangs): nothing changes---------------------> (the same)
//!   paused, io-error --cont, a replay failed: BLOCK_IO_ERROR----> io-error
//!   any     --poweroff, reboot, panic, quit, SIGTERM, a failure
//!             of holdfast's: SHUTDOWN---------------------------> the end
//! ```
//!
//! Pausing stops the vCPUs first (each kicked out of `KVM_RUN` and parked), then
//! saves the guest clock, so that the guest does not see the pause as time that
//! passed; the disks keep their state (a stopped disk stays stopped). While paused
//! (either way), `x-block-detach` lets a disk go of its image and `x-block-attach`
//! takes it back; the run state does not change, but `cont` is refused, with nothing
//! changed, while any disk is detached. After an attach `cont` replays that disk like
//! any stopped one.
//!
//! Events, in order: a host error sends `BLOCK_IO_ERROR` then (if the VM stops)
//! `STOP`; a successful `cont` sends `X_BLOCK_REPLAY` per replayed disk, then
//! `RESUME`; the end sends `SHUTDOWN` (after `X_UNFLUSHED_DROPPED` per disk whose
//! bytes could not be made stable, when the host ends it). A disk whose queue the
//! guest broke sends `X_DEVICE_NEEDS_RESET` and changes no run state.

pub mod command;
pub mod events;
pub mod inbox;
pub mod lifecycle;

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use holdfast_block::{ErrorAction, HostError, IoErrorReport};
use holdfast_qmp::{EventSink, QmpError};
use serde_json::{json, Value};

pub use command::{Command, Fault, Layer};
pub use inbox::{Exit, Inbox, Input, QmpBridge};
pub use lifecycle::{Lifecycle, SavedClock};

use crate::disk::{AttachFailure, DiskEvent, DiskInfo, ResumeFailure};
use events::{emit, BlockIoError, BlockReplay};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    IoError,
}

impl RunState {
    pub const ALL: [RunState; 3] = [RunState::Running, RunState::Paused, RunState::IoError];

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::IoError => "io-error",
        }
    }
}

/// The latest stop on a host error and the `cont` that resumed from it, for the
/// outage benchmark (`x-query-timings`).
#[derive(Debug, Default, Clone, Copy)]
struct Timings {
    /// From the failing host call's return to every vCPU parked.
    error_to_stopped: Option<Duration>,
    /// From `cont` arriving to the vCPUs released (replay included).
    cont_to_running: Option<Duration>,
    /// That `cont`'s replays: bytes rewritten and time taken, over every disk.
    replay_bytes: u64,
    replay: Duration,
}

impl Timings {
    fn to_json(self) -> Value {
        json!({
            "error-to-stopped-ns": self.error_to_stopped.map(|d| d.as_nanos() as u64),
            "cont-to-running-ns": self.cont_to_running.map(|d| d.as_nanos() as u64),
            "replay-bytes": self.replay_bytes,
            "replay-ns": self.replay.as_nanos() as u64,
        })
    }
}

/// How often the owner looks for host calls past their hang-timeout.
pub const TICK: Duration = Duration::from_millis(250);

/// What the loop does after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Go,
    End(Exit),
}

/// The run state and what goes with it: the guest clock saved at the pause, the
/// timings, where events go.
#[derive(Debug)]
pub struct Owner {
    state: RunState,
    clock: SavedClock,
    timings: Timings,
    events: EventSink,
    /// The host calls already reported as hung (disk, when the call started).
    hung: Vec<(String, Instant)>,
    /// How long the guest ran before its last pause, and since when it runs now:
    /// `--boot-timeout` counts only the time it runs.
    ran: Duration,
    running_since: Option<Instant>,
}

/// Runs the machine until it ends, taking its inputs from `inputs` (a [`TICK`]
/// when none came); returns how it ended.
pub fn run(machine: &mut impl Lifecycle, inputs: &Receiver<Input>, events: &EventSink) -> Exit {
    let mut owner = Owner::new(events.clone());
    loop {
        let input = match inputs.recv_timeout(TICK) {
            Ok(input) => input,
            Err(RecvTimeoutError::Timeout) => Input::Tick,
            Err(RecvTimeoutError::Disconnected) => {
                return Exit::Failed("every sender of inputs is gone".into())
            }
        };
        if let Step::End(exit) = owner.step(machine, input) {
            return exit;
        }
    }
}

impl Owner {
    /// A running machine's owner.
    pub fn new(events: EventSink) -> Owner {
        Owner::in_state(RunState::Running, events)
    }

    /// An owner in `state` (tests start from every state).
    pub fn in_state(state: RunState, events: EventSink) -> Owner {
        Owner {
            state,
            clock: None,
            timings: Timings::default(),
            events,
            hung: Vec::new(),
            ran: Duration::ZERO,
            running_since: (state == RunState::Running).then(Instant::now),
        }
    }

    /// How long the guest has run (its vCPUs, not counting pauses).
    pub fn running_time(&self) -> Duration {
        self.ran + self.running_since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    /// One input, in the current state ([`Owner::transition`]), keeping count of the
    /// time the guest runs.
    pub fn step(&mut self, m: &mut impl Lifecycle, input: Input) -> Step {
        let before = self.state;
        let step = self.transition(m, input);
        match (before == RunState::Running, self.state == RunState::Running) {
            (true, false) => {
                self.ran += self
                    .running_since
                    .take()
                    .map_or(Duration::ZERO, |s| s.elapsed())
            }
            (false, true) => self.running_since = Some(Instant::now()),
            _ => {}
        }
        step
    }

    /// The transition function: one input, in the current state. Commands have
    /// their own table (`Owner::command`).
    fn transition(&mut self, m: &mut impl Lifecycle, input: Input) -> Step {
        use RunState::{IoError, Paused, Running};
        match (self.state, input) {
            // The guest ends the machine.
            (_, Input::Poweroff) => self.guest_ended(Exit::Poweroff, "guest-shutdown"),
            (_, Input::Reboot) => self.guest_ended(Exit::Reboot, "guest-reset"),
            (_, Input::GuestPanic) => {
                emit(&self.events, events::GuestPanicked { action: "poweroff" });
                self.guest_ended(Exit::GuestPanic, "guest-panic")
            }
            (_, Input::GuestStatus(status)) => {
                self.guest_ended(Exit::GuestStatus(status), "guest-shutdown")
            }
            (_, Input::EmulationFailure { cpu }) => Step::End(Exit::EmulationFailure { cpu }),
            (_, Input::VcpuFailed { cpu, message }) => {
                Step::End(Exit::Failed(format!("vCPU {cpu}: {message}")))
            }
            // The host ends it: the disks settle first.
            (_, Input::DeviceFailed { device, message }) => {
                log::error!("ending: pausing the guest and settling its disks");
                self.settle_and_end(m, "host-error");
                Step::End(Exit::Failed(format!("device {device} failed: {message}")))
            }
            (_, Input::ThreadPanicked { thread, message }) => {
                log::error!("ending: pausing the guest and settling its disks");
                self.settle_and_end(m, "host-error");
                Step::End(Exit::Failed(format!("thread {thread} panicked: {message}")))
            }
            // Only running time counts: a pause (the operator's, or on an I/O error
            // with bytes to replay) holds the boot timeout too.
            (Paused | IoError, Input::BootTimeout { .. }) => Step::Go,
            (Running, Input::BootTimeout { seconds })
                if self.running_time() < Duration::from_secs(seconds) =>
            {
                Step::Go
            }
            (Running, Input::BootTimeout { seconds }) => {
                log::error!(
                    "the guest did not reach its init within {seconds} s (--boot-timeout): \
                     pausing it and settling its disks"
                );
                self.settle_and_end(m, "host-error");
                Step::End(Exit::BootTimeout { seconds })
            }
            (_, Input::HostSignal { name }) => {
                log::info!("{name}: pausing the guest and settling its disks");
                self.settle_and_end(m, "host-signal");
                Step::End(Exit::Signal(name))
            }
            // A disk's events.
            (_, Input::Disk(DiskEvent::NeedsReset { disk, reason })) => {
                log::error!(
                    "disk {disk}: the guest's queue is broken ({reason}); the device \
                     needs a reset by the guest's driver, the VM and the other disks go on"
                );
                let event = events::DeviceNeedsReset {
                    device: disk,
                    reason,
                };
                emit(&self.events, event);
                Step::Go
            }
            (state, Input::Disk(DiskEvent::Error { disk, report, at })) => {
                log::warn!(
                    "disk {disk}: {} (action: {})",
                    report.error,
                    report.action.as_str()
                );
                emit(&self.events, BlockIoError::failed(&disk, &report));
                // A `cont` that came while the error was on its way here may have
                // replayed the disk already: then nothing holds the VM.
                let stops = report.action == ErrorAction::Stop && disk_stopped(m, &disk);
                if report.action == ErrorAction::Stop && !stops {
                    log::info!(
                        "disk {disk}: a cont replayed it before its error reached here; \
                         the VM is not paused again"
                    );
                }
                match (state, stops) {
                    (Running, true) => {
                        self.pause_on_error(m);
                        self.timings.error_to_stopped = Some(at.elapsed());
                    }
                    // Already paused: the disk's error is now what holds it.
                    (Paused | IoError, true) => self.state = IoError,
                    (Running | Paused | IoError, false) => {}
                }
                Step::Go
            }
            // Time passed: a host call past its hang-timeout pauses the VM.
            (Running, Input::Tick) => {
                if self.report_hangs(m) {
                    self.pause_on_error(m);
                }
                Step::Go
            }
            (Paused | IoError, Input::Tick) => {
                if self.report_hangs(m) {
                    self.state = IoError;
                }
                Step::Go
            }
            (state, Input::Qmp { command, reply }) => {
                let (answer, step) = self.command(m, state, command);
                let _ = reply.send(answer);
                step
            }
        }
    }

    /// Pauses the running VM on a host error: io-error, `STOP`.
    fn pause_on_error(&mut self, m: &mut impl Lifecycle) {
        self.clock = m.pause();
        self.state = RunState::IoError;
        emit(&self.events, events::Stop);
    }

    /// A host call outstanding longer than its disk's hang-timeout is an outage:
    /// `BLOCK_IO_ERROR` saying which call for how long, once per call. The call goes
    /// on; `cont` is refused until it returns. True if there was a new one (the VM
    /// must stop).
    fn report_hangs(&mut self, m: &impl Lifecycle) -> bool {
        let calls = m.calls();
        self.hung.retain(|(disk, since)| {
            calls
                .iter()
                .any(|c| &c.disk == disk && c.call.since == *since)
        });
        let mut any = false;
        for c in calls {
            let Some(limit) = c.hang_timeout else {
                continue;
            };
            let age = c.call.age();
            if age < limit || self.hung.contains(&(c.disk.clone(), c.call.since)) {
                continue;
            }
            self.hung.push((c.disk.clone(), c.call.since));
            let reason = format!(
                "host {} outstanding for {:.1} s (hang-timeout {} s)",
                c.call.op,
                age.as_secs_f64(),
                limit.as_secs_f64()
            );
            log::warn!("disk {}: {reason}: pausing the guest", c.disk);
            emit(&self.events, BlockIoError::hangs(&c, reason));
            any = true;
        }
        any
    }

    fn guest_ended(&self, exit: Exit, reason: &'static str) -> Step {
        emit(
            &self.events,
            events::Shutdown {
                guest: true,
                reason,
            },
        );
        Step::End(exit)
    }

    /// The end the host asked for (`quit`, a signal, a failure of holdfast's): stop
    /// the vCPUs, make every disk's buffered bytes stable, say per disk how many
    /// bytes could not be and are dropped (`X_UNFLUSHED_DROPPED`), send `SHUTDOWN`.
    fn settle_and_end(&mut self, m: &mut impl Lifecycle, reason: &'static str) {
        if self.state == RunState::Running {
            m.pause();
        }
        // holdfast's exit (Vm::shutdown) settles once more and prints what it drops.
        for d in m.settle() {
            emit(&self.events, events::UnflushedDropped::from(&d));
        }
        emit(
            &self.events,
            events::Shutdown {
                guest: false,
                reason,
            },
        );
    }

    /// A QMP command, in the run state `state`: its answer, and whether the machine
    /// goes on.
    fn command(
        &mut self,
        m: &mut impl Lifecycle,
        state: RunState,
        command: Command,
    ) -> (Result<Value, QmpError>, Step) {
        use RunState::{IoError, Paused, Running};
        let answer = match (state, command) {
            (_, Command::QueryStatus) => Ok(json!({
                "status": state.as_str(),
                "running": state == Running,
                "singlestep": false,
            })),
            (Running, Command::Stop) => {
                self.clock = m.pause();
                self.state = Paused;
                emit(&self.events, events::Stop);
                Ok(json!({}))
            }
            (Paused | IoError, Command::Stop) => Ok(json!({})),
            (Running, Command::Cont) => Ok(json!({})),
            (Paused | IoError, Command::Cont) => self.cont(m).map(|()| json!({})),
            (_, Command::Quit) => {
                self.settle_and_end(m, "host-qmp-quit");
                return (Ok(json!({})), Step::End(Exit::Quit));
            }
            (_, Command::QueryBlock) => Ok(query_block(&m.disks())),
            (_, Command::QueryBlockstats) => Ok(query_blockstats(&m.disks())),
            (_, Command::QueryName) => Ok(match m.name() {
                Some(name) => json!({ "name": name }),
                None => json!({}),
            }),
            (_, Command::QueryCpusFast) => Ok(query_cpus_fast(&m.cpu_threads())),
            (_, Command::SystemPowerdown) => m
                .press_power_button()
                .map(|()| {
                    emit(&self.events, events::Powerdown);
                    json!({})
                })
                .map_err(QmpError::generic),
            // holdfast does not reset a guest; as QEMU -no-reboot, it ends instead.
            (_, Command::SystemReset) => {
                self.settle_and_end(m, "host-qmp-system-reset");
                return (Ok(json!({})), Step::End(Exit::Reboot));
            }
            (_, Command::XQueryUnflushed) => Ok(query_unflushed(&m.disks())),
            (_, Command::XQueryTimings) => Ok(self.timings.to_json()),
            (_, Command::XBlockFault { device, fault }) => block_fault(m, &device, fault),
            (Running, Command::XBlockDetach { device }) => Err(match find(m, &device) {
                None => QmpError::device_not_found(&device),
                Some(_) => QmpError::generic(format!(
                    "disk {device}: the VM is running; a disk can let go of its image only \
                     while the VM is paused (stop, or a pause on an I/O error)"
                )),
            }),
            (Paused | IoError, Command::XBlockDetach { device }) => detach(m, &device),
            (_, Command::XBlockAttach { device, filename }) => {
                attach(m, &device, filename.as_deref())
            }
        };
        (answer, Step::Go)
    }

    /// `cont` while paused: resumes if every disk could be replayed.
    fn cont(&mut self, m: &mut impl Lifecycle) -> Result<(), QmpError> {
        let started = Instant::now();
        match m.resume(self.clock) {
            Ok(replayed) => {
                for r in &replayed {
                    emit(&self.events, BlockReplay::ok(r));
                }
                self.state = RunState::Running;
                emit(&self.events, events::Resume);
                if self.timings.error_to_stopped.is_some() {
                    self.timings.cont_to_running = Some(started.elapsed());
                }
                if !replayed.is_empty() {
                    self.timings.replay_bytes = replayed.iter().map(|r| r.bytes_rewritten).sum();
                    self.timings.replay = replayed.iter().map(|r| r.duration).sum();
                }
                Ok(())
            }
            // Refused before anything ran: the run state stays as it was.
            Err(f @ ResumeFailure::Detached { .. }) => Err(QmpError::generic(format!(
                "{f}; the VM stays paused (see docs/durability.md)"
            ))),
            Err(f @ ResumeFailure::Busy { .. }) => Err(QmpError::generic(format!(
                "{f}; the VM stays paused: cont again when it returns (query-block shows \
                 it; a call stuck in the kernel cannot be cancelled)"
            ))),
            Err(ResumeFailure::Replay { disk, error }) => {
                self.state = RunState::IoError;
                let report = IoErrorReport {
                    error,
                    action: ErrorAction::Stop,
                };
                emit(&self.events, BlockReplay::failed(&disk, &error));
                emit(&self.events, BlockIoError::failed(&disk, &report));
                Err(QmpError::generic(format!(
                    "disk {disk}: replay failed: {} ({}); the VM stays paused{}",
                    error.errno_name(),
                    errno_desc(&error),
                    next_step(error.errno),
                )))
            }
        }
    }
}

/// The disk named `device`, if the machine has it.
fn find(m: &impl Lifecycle, device: &str) -> Option<DiskInfo> {
    m.disks().into_iter().find(|d| d.id == device)
}

/// `x-block-detach` while paused.
fn detach(m: &mut impl Lifecycle, device: &str) -> Result<Value, QmpError> {
    let Some(disk) = find(m, device) else {
        return Err(QmpError::device_not_found(device));
    };
    m.detach(device).map_err(attach_error)?;
    log::info!(
        "disk {device}: detached from {}; {} buffered bytes and {} parked requests \
         kept in memory",
        disk.path,
        disk.status.buffer.bytes,
        disk.status.parked
    );
    Ok(json!({}))
}
/// Whether the disk is stopped now (a disk the machine does not know is taken to be).
fn disk_stopped(m: &impl Lifecycle, disk: &str) -> bool {
    m.disks()
        .iter()
        .find(|d| d.id == disk)
        .is_none_or(|d| d.status.stopped)
}

fn errno_desc(e: &HostError) -> String {
    holdfast_block::strerror(e.errno)
}

/// `query-blockstats`: QEMU's `BlockStats` per disk, with the counters holdfast
/// keeps, and its own: the unflushed bytes now and the replays. Holdfast never
/// merges requests (`*_merged` are 0) and keeps no timed intervals (`timed_stats`
/// empty, as QEMU's without `stats-intervals`); `idle_time_ns`, the time since the
/// last request, is missing until there was one, as in QEMU.
fn query_blockstats(disks: &[DiskInfo]) -> Value {
    let now = std::time::Instant::now();
    Value::Array(
        disks
            .iter()
            .map(|d| {
                let s = &d.stats;
                let mut v = json!({
                    "device": d.id, "qdev": d.id, "node-name": d.id,
                    "stats": {
                        "rd_bytes": s.rd.bytes, "wr_bytes": s.wr.bytes, "unmap_bytes": s.unmap.bytes,
                        "rd_operations": s.rd.operations, "wr_operations": s.wr.operations,
                        "flush_operations": s.flush.operations, "unmap_operations": s.unmap.operations,
                        "rd_total_time_ns": s.rd.total_time_ns, "wr_total_time_ns": s.wr.total_time_ns,
                        "flush_total_time_ns": s.flush.total_time_ns,
                        "unmap_total_time_ns": s.unmap.total_time_ns,
                        "failed_rd_operations": s.rd.failed, "failed_wr_operations": s.wr.failed,
                        "failed_flush_operations": s.flush.failed,
                        "failed_unmap_operations": s.unmap.failed,
                        "invalid_rd_operations": s.rd.invalid, "invalid_wr_operations": s.wr.invalid,
                        "invalid_flush_operations": s.flush.invalid,
                        "invalid_unmap_operations": s.unmap.invalid,
                        "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
                        "account_invalid": true, "account_failed": true,
                        "timed_stats": [],
                        "x-unflushed-bytes": d.status.buffer.bytes,
                        "x-replays": s.replays, "x-replayed-bytes": s.replayed_bytes,
                    },
                });
                if let Some(last) = s.last_io {
                    let idle = u64::try_from(now.saturating_duration_since(last).as_nanos());
                    v["stats"]["idle_time_ns"] = idle.unwrap_or(u64::MAX).into();
                }
                v
            })
            .collect(),
    )
}

/// `query-cpus-fast`: each vCPU's index and thread, as QEMU answers for x86_64.
fn query_cpus_fast(threads: &[i32]) -> Value {
    Value::Array(
        threads
            .iter()
            .enumerate()
            .map(|(i, tid)| {
                json!({
                    "cpu-index": i, "thread-id": tid, "target": "x86_64",
                    "qom-path": format!("/machine/unattached/device[{i}]"),
                    "props": {"socket-id": i, "core-id": 0, "thread-id": 0},
                })
            })
            .collect(),
    )
}

fn query_block(disks: &[DiskInfo]) -> Value {
    Value::Array(
        disks
            .iter()
            .map(|d| {
                let mut info = json!({
                    "device": d.id, "qdev": d.id, "locked": false, "removable": false, "type": "unknown",
                    "io-status": d.status.io_status.as_str(),
                    "x-detached": d.status.detached,
                });
                if let Some(c) = d.outstanding {
                    info["x-outstanding"] = json!({
                        "operation": c.op.to_string(), "seconds": c.age().as_secs_f64(),
                    });
                }
                if let Some(t) = d.hang_timeout {
                    info["x-hang-timeout"] = json!(t.as_secs_f64());
                }
                // As QEMU shows a drive with no medium: no "inserted".
                if d.status.detached {
                    info["x-detached-from"] = json!(d.path);
                } else {
                    info["inserted"] = json!({
                        "file": d.path, "node-name": d.id, "drv": "raw", "ro": d.read_only,
                        "cache": {"writeback": d.writeback, "direct": d.direct, "no-flush": false},
                    });
                }
                info
            })
            .collect(),
    )
}

fn query_unflushed(disks: &[DiskInfo]) -> Value {
    Value::Array(
        disks
            .iter()
            .map(|d| {
                let s = d.status;
                json!({
                    "device": d.id,
                    "bytes": s.buffer.bytes, "weight": s.buffer.weight, "extents": s.buffer.extents,
                    "peak-bytes": s.buffer.peak_bytes,
                    "parked": s.parked, "io-status": s.io_status.as_str(), "internal-flushes": s.internal_flushes,
                    "in-flight": s.in_flight, "peak-in-flight": s.peak_in_flight,
                    "held-back": s.held_back, "detached": s.detached,
                    "last-error": s.last_error.map(|e| json!({
                        "operation": e.op.to_string(), "errno": e.errno_name(), "desc": errno_desc(&e),
                    })),
                })
            })
            .collect(),
    )
}

/// What the operator can do when a replay fails with `errno`, for `cont`'s error.
fn next_step(errno: i32) -> &'static str {
    match errno {
        libc::EROFS => {
            ". The host file system holding the image has turned read-only (ext4 does when \
             a journal commit fails, Btrfs when a transaction commit fails) and stays so \
             until it is mounted again: x-block-detach the disk, unmount the file system, \
             repair it (fsck), mount it, x-block-attach the disk, then cont. Nothing \
             buffered is lost meanwhile (docs/durability.md)"
        }
        libc::EIO => {
            ". If the storage is back and cont still fails with EIO, the host file system \
             may have shut down (XFS does when a log write fails): x-block-detach the disk, \
             unmount, repair and mount the file system, x-block-attach the disk, then cont \
             (docs/durability.md)"
        }
        libc::ENOSPC | libc::EDQUOT => ". Free space on the host file system, then cont",
        _ => "",
    }
}

fn attach(m: &mut impl Lifecycle, device: &str, filename: Option<&str>) -> Result<Value, QmpError> {
    m.attach(device, filename.map(std::path::Path::new))
        .map_err(attach_error)?;
    if let Some(d) = m.disks().into_iter().find(|d| d.id == device) {
        log::info!(
            "disk {device}: attached to {}; cont replays its {} buffered bytes",
            d.path,
            d.status.buffer.bytes
        );
    }
    Ok(json!({}))
}

fn attach_error(e: AttachFailure) -> QmpError {
    match e {
        AttachFailure::NoSuchDisk(d) => QmpError::device_not_found(&d),
        e @ (AttachFailure::Disk { .. } | AttachFailure::Busy { .. }) => {
            QmpError::generic(format!("{e}; nothing changed"))
        }
    }
}

fn block_fault(m: &impl Lifecycle, device: &str, fault: Fault) -> Result<Value, QmpError> {
    let points = m
        .fault_points(device)
        .ok_or_else(|| QmpError::device_not_found(device))?;
    let simulated = || {
        points.simulated.clone().ok_or_else(|| {
            QmpError::generic(format!(
                "disk {device} has no simulated host (x-host=simulated:MODEL)"
            ))
        })
    };
    let layer = |layer: Layer| match layer {
        Layer::Calls => points.calls.clone().ok_or_else(|| {
            QmpError::generic(format!("disk {device} has no fault injection point"))
        }),
        Layer::Writeback => Ok(simulated()?.writeback),
    };
    Ok(match fault {
        Fault::Evict => {
            (simulated()?.evict)();
            json!({})
        }
        Fault::Arm(l, rule) => json!({"id": layer(l)?.arm(*rule)}),
        Fault::Clear(l, name) => json!({"cleared": layer(l)?.clear_named(&name)}),
        Fault::ClearAll(l) => {
            let faults = layer(l)?;
            let n = faults.rules().len();
            faults.clear_all();
            json!({"cleared": n})
        }
    })
}

#[cfg(test)]
mod tests;
