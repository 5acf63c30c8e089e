//! The run-state owner: the one loop that changes the machine's run state. vCPUs,
//! the device thread and QMP clients send it [`VmEvent`]s; it answers QMP commands
//! and sends QMP events.
//!
//! ```text
//!   running --stop--> paused --cont--> running
//!      |                 ^  (cont replays stopped disks first; if a replay
//!      |                 |   fails: BLOCK_IO_ERROR again, cont errors, still paused)
//!      +--disk error (stop)--> io-error --cont--> running
//!   any --poweroff/reboot/panic/quit/SIGTERM/a holdfast thread's panic--> shutdown
//! ```
//!
//! While paused (either way), `x-block-detach` lets a disk go of its image and
//! `x-block-attach` takes it back; the run state does not change, but `cont` is
//! refused, with nothing changed, while any disk is detached. After an attach `cont`
//! replays that disk like any stopped one.
//!
//! Events, in order: a host error sends `BLOCK_IO_ERROR` then (if the VM stops)
//! `STOP`; a successful `cont` sends `X_BLOCK_REPLAY` per replayed disk, then
//! `RESUME`; the end sends `SHUTDOWN`. A disk whose queue the guest broke sends
//! `X_DEVICE_NEEDS_RESET` and changes no run state.

use std::sync::mpsc::Sender;

use holdfast_block::{ErrorAction, FaultRule, HostError, HostOp, IoErrorReport};
use holdfast_qmp::{Args, EventSink, Machine, QmpError};
use kvm_bindings::kvm_clock_data;
use serde_json::{json, Value};

use crate::vm::{AttachFailure, Exit, ResumeFailure, Vm, VmEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    IoError,
}

impl RunState {
    fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::IoError => "io-error",
        }
    }
}

/// The arguments each command takes (QEMU refuses any other, naming it).
fn arguments(command: &str) -> &'static [&'static str] {
    match command {
        "x-block-fault" => &["device", "layer", "arm", "clear", "clear-all", "evict"],
        "x-block-detach" => &["device"],
        "x-block-attach" => &["device", "filename"],
        _ => &[],
    }
}

/// The commands the owner answers.
pub const COMMANDS: &[&str] = &[
    "query-status",
    "stop",
    "cont",
    "quit",
    "query-block",
    "x-query-unflushed",
    "x-block-fault",
    "x-query-timings",
    "x-block-detach",
    "x-block-attach",
];

/// The latest stop on a host error and the `cont` that resumed from it, for the
/// outage benchmark (`x-query-timings`).
#[derive(Debug, Default, Clone, Copy)]
struct Timings {
    /// From the failing host call's return to every vCPU parked.
    error_to_stopped: Option<std::time::Duration>,
    /// From `cont` arriving to the vCPUs released (replay included).
    cont_to_running: Option<std::time::Duration>,
    /// That `cont`'s replays: bytes rewritten and time taken, over every disk.
    replay_bytes: u64,
    replay: std::time::Duration,
}

/// QMP's side of the owner: forwards commands and waits for the answer.
#[derive(Debug)]
pub struct QmpBridge(pub std::sync::Mutex<Sender<VmEvent>>);

impl Machine for QmpBridge {
    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    fn execute(&self, command: &str, args: &Args) -> Result<Value, QmpError> {
        let (reply, answer) = std::sync::mpsc::channel();
        let gone = || QmpError::generic("the machine has shut down");
        let tx = self.0.lock().map_err(|_| gone())?.clone();
        tx.send(VmEvent::Qmp {
            command: command.to_owned(),
            args: args.clone(),
            reply,
        })
        .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

fn errno_desc(e: &HostError) -> String {
    holdfast_block::strerror(e.errno)
}

fn block_io_error(events: &EventSink, disk: &str, report: &IoErrorReport) {
    let operation = if report.error.op == HostOp::Read {
        "read"
    } else {
        "write"
    };
    events.emit(
        "BLOCK_IO_ERROR",
        json!({
            "device": disk,
            "node-name": disk,
            "operation": operation,
            "action": report.action.as_str(),
            "nospace": report.error.is_nospace(),
            "reason": errno_desc(&report.error),
        }),
    );
}

/// Runs the machine until it ends; returns how.
pub fn run(vm: &mut Vm, events: &EventSink) -> Exit {
    let mut state = RunState::Running;
    let mut clock: Option<kvm_clock_data> = None;
    let mut timings = Timings::default();
    let end = |events: &EventSink, guest: bool, reason: &str| {
        events.emit("SHUTDOWN", json!({"guest": guest, "reason": reason}));
    };
    loop {
        let Some(event) = vm.next_event() else {
            return Exit::Failed("every vCPU is gone".into());
        };
        match event {
            VmEvent::Poweroff => {
                end(events, true, "guest-shutdown");
                return Exit::Poweroff;
            }
            VmEvent::Reboot => {
                end(events, true, "guest-reset");
                return Exit::Reboot;
            }
            VmEvent::GuestPanic => {
                events.emit("GUEST_PANICKED", json!({"action": "poweroff"}));
                end(events, true, "guest-panic");
                return Exit::GuestPanic;
            }
            VmEvent::EmulationFailure { cpu } => return Exit::EmulationFailure { cpu },
            VmEvent::VcpuFailed { cpu, message } => {
                return Exit::Failed(format!("vCPU {cpu}: {message}"))
            }
            VmEvent::DeviceNeedsReset { disk, reason } => {
                log::error!(
                    "disk {disk}: the guest's queue is broken ({reason}); the device \
                     needs a reset by the guest's driver, the VM and the other disks go on"
                );
                events.emit(
                    "X_DEVICE_NEEDS_RESET",
                    json!({"device": disk, "reason": reason}),
                );
            }
            VmEvent::DiskError { disk, report, at } => {
                log::warn!(
                    "disk {disk}: {} (action: {})",
                    report.error,
                    report.action.as_str()
                );
                block_io_error(events, &disk, &report);
                if report.action == ErrorAction::Stop {
                    if state == RunState::Running {
                        clock = vm.pause();
                        timings.error_to_stopped = Some(at.elapsed());
                        events.emit("STOP", Value::Null);
                    }
                    state = RunState::IoError;
                }
            }
            VmEvent::ThreadPanicked { thread, message } => {
                log::error!("ending: pausing the guest and settling its disks");
                settle_and_end(vm, events, state, "host-error");
                return Exit::Failed(format!("thread {thread} panicked: {message}"));
            }
            VmEvent::HostSignal { signal } => {
                let name = crate::host_signals::signal_name(signal);
                log::info!("{name}: pausing the guest and settling its disks");
                settle_and_end(vm, events, state, "host-signal");
                return Exit::Signal(name);
            }
            VmEvent::Qmp {
                command,
                args,
                reply,
            } => {
                let (answer, quit) = execute(
                    vm,
                    events,
                    &mut state,
                    &mut clock,
                    &mut timings,
                    &command,
                    &args,
                );
                let _ = reply.send(answer);
                if quit {
                    return Exit::Quit;
                }
            }
        }
    }
}

/// The end the host asked for (`quit`, a signal): stop the vCPUs, make every disk's
/// buffered bytes stable, say per disk how many bytes could not be and are dropped
/// (`X_UNFLUSHED_DROPPED`), send `SHUTDOWN`.
fn settle_and_end(vm: &mut Vm, events: &EventSink, state: RunState, reason: &str) {
    if state == RunState::Running {
        vm.pause();
    }
    let dropped = vm.settle_disks();
    // holdfast's exit (Vm::shutdown) settles once more and prints what it drops.
    for (disk, bytes, why) in &dropped {
        events.emit(
            "X_UNFLUSHED_DROPPED",
            json!({"device": disk, "bytes": bytes, "reason": why}),
        );
    }
    events.emit("SHUTDOWN", json!({"guest": false, "reason": reason}));
}

fn execute(
    vm: &mut Vm,
    events: &EventSink,
    state: &mut RunState,
    clock: &mut Option<kvm_clock_data>,
    timings: &mut Timings,
    command: &str,
    args: &Args,
) -> (Result<Value, QmpError>, bool) {
    if let Err(e) = args.only(arguments(command)) {
        return (Err(e), false);
    }
    let r = match command {
        "query-status" => Ok(json!({"status": state.as_str(), "running": *state == RunState::Running, "singlestep": false})),
        "stop" => {
            if *state == RunState::Running {
                *clock = vm.pause();
                *state = RunState::Paused;
                events.emit("STOP", Value::Null);
            }
            Ok(json!({}))
        }
        "cont" => {
            let started = std::time::Instant::now();
            let r = cont(vm, events, state, clock);
            if let Ok(replayed) = &r {
                if timings.error_to_stopped.is_some() {
                    timings.cont_to_running = Some(started.elapsed());
                }
                if !replayed.is_empty() {
                    timings.replay_bytes = replayed.iter().map(|r| r.bytes_rewritten).sum();
                    timings.replay = replayed.iter().map(|r| r.duration).sum();
                }
            }
            r.map(|_| json!({}))
        }
        "x-query-timings" => Ok(json!({
            "error-to-stopped-ns": timings.error_to_stopped.map(|d| d.as_nanos() as u64),
            "cont-to-running-ns": timings.cont_to_running.map(|d| d.as_nanos() as u64),
            "replay-bytes": timings.replay_bytes,
            "replay-ns": timings.replay.as_nanos() as u64,
        })),
        "quit" => {
            settle_and_end(vm, events, *state, "host-qmp-quit");
            return (Ok(json!({})), true);
        }
        "query-block" => Ok(Value::Array(
            vm.disks()
                .iter()
                .map(|d| {
                    let mut info = json!({
                        "device": d.id, "qdev": d.id, "locked": false, "removable": false, "type": "unknown",
                        "io-status": d.status.io_status.as_str(),
                        "x-detached": d.status.detached,
                    });
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
        )),
        "x-query-unflushed" => Ok(Value::Array(
            vm.disks()
                .iter()
                .map(|d| {
                    let s = d.status;
                    json!({
                        "device": d.id,
                        "bytes": s.buffer.bytes, "extents": s.buffer.extents, "peak-bytes": s.buffer.peak_bytes,
                        "parked": s.parked, "io-status": s.io_status.as_str(), "internal-flushes": s.internal_flushes,
                        "detached": s.detached,
                        "last-error": s.last_error.map(|e| json!({
                            "operation": e.op.to_string(), "errno": e.errno_name(), "desc": errno_desc(&e),
                        })),
                    })
                })
                .collect(),
        )),
        "x-block-fault" => block_fault(vm, args),
        "x-block-detach" => block_detach(vm, *state, args),
        "x-block-attach" => block_attach(vm, args),
        other => Err(QmpError::generic(format!("{other} is not handled"))),
    };
    (r, false)
}

/// Returns the disks it replayed.
fn cont(
    vm: &mut Vm,
    events: &EventSink,
    state: &mut RunState,
    clock: &mut Option<kvm_clock_data>,
) -> Result<Vec<crate::vm::Replayed>, QmpError> {
    if *state == RunState::Running {
        return Ok(Vec::new());
    }
    match vm.resume(*clock) {
        Ok(replayed) => {
            for r in &replayed {
                events.emit(
                    "X_BLOCK_REPLAY",
                    json!({
                        "device": r.disk, "bytes-rewritten": r.bytes_rewritten, "outcome": "ok",
                        "duration-ns": r.duration.as_nanos() as u64,
                    }),
                );
            }
            *state = RunState::Running;
            events.emit("RESUME", Value::Null);
            Ok(replayed)
        }
        // Refused before anything ran: the run state stays as it was.
        Err(f @ ResumeFailure::Detached { .. }) => Err(QmpError::generic(format!(
            "{f}; the VM stays paused (see docs/durability.md)"
        ))),
        Err(ResumeFailure::Replay { disk, error }) => {
            *state = RunState::IoError;
            let report = IoErrorReport {
                error,
                action: ErrorAction::Stop,
            };
            events.emit(
                "X_BLOCK_REPLAY",
                json!({"device": disk, "outcome": "failed", "errno": error.errno_name()}),
            );
            block_io_error(events, &disk, &report);
            Err(QmpError::generic(format!(
                "disk {disk}: replay failed: {} ({}); the VM stays paused{}",
                error.errno_name(),
                errno_desc(&error),
                next_step(error.errno),
            )))
        }
    }
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

fn block_detach(vm: &Vm, state: RunState, args: &Args) -> Result<Value, QmpError> {
    let device = args.str("device")?;
    let Some(disk) = vm.disks().into_iter().find(|d| d.id == device) else {
        return Err(QmpError::device_not_found(device));
    };
    if state == RunState::Running {
        return Err(QmpError::generic(format!(
            "disk {device}: the VM is running; a disk can let go of its image only while \
             the VM is paused (stop, or a pause on an I/O error)"
        )));
    }
    vm.detach_disk(device).map_err(attach_error)?;
    log::info!(
        "disk {device}: detached from {}; {} buffered bytes and {} parked requests \
         kept in memory",
        disk.path,
        disk.status.buffer.bytes,
        disk.status.parked
    );
    Ok(json!({}))
}

fn block_attach(vm: &Vm, args: &Args) -> Result<Value, QmpError> {
    let device = args.str("device")?;
    let filename = args.opt_str("filename")?;
    vm.attach_disk(device, filename.map(std::path::Path::new))
        .map_err(attach_error)?;
    if let Some(d) = vm.disks().into_iter().find(|d| d.id == device) {
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
        e @ AttachFailure::Disk { .. } => QmpError::generic(format!("{e}; nothing changed")),
    }
}

fn block_fault(vm: &Vm, args: &Args) -> Result<Value, QmpError> {
    let device = args.str("device")?;
    let simulated = || match vm.disk_simulated(device) {
        None => Err(QmpError::device_not_found(device)),
        Some(None) => Err(QmpError::generic(format!(
            "disk {device} has no simulated host (x-host=simulated:MODEL)"
        ))),
        Some(Some(s)) => Ok(s),
    };
    if args.opt_bool("evict")? == Some(true) {
        (simulated()?.evict)();
        return Ok(json!({}));
    }
    let faults = match args.opt_str("layer")? {
        None | Some("calls") => vm.disk_faults(device),
        Some("writeback") => Some(Some(simulated()?.writeback)),
        Some(other) => {
            return Err(QmpError::generic(format!(
                "layer: `{other}` is not calls or writeback"
            )))
        }
    };
    let faults = match faults {
        None => return Err(QmpError::device_not_found(device)),
        Some(None) => {
            return Err(QmpError::generic(format!(
                "disk {device} has no fault injection point"
            )))
        }
        Some(Some(f)) => f,
    };
    if let Some(rule) = args.get("arm") {
        let rule = FaultRule::from_json_value(rule.clone())
            .map_err(|e| QmpError::generic(format!("arm: {e}")))?;
        return Ok(json!({"id": faults.arm(rule)}));
    }
    if let Some(name) = args.opt_str("clear")? {
        return Ok(json!({"cleared": faults.clear_named(name)}));
    }
    if args.opt_bool("clear-all")? == Some(true) {
        let n = faults.rules().len();
        faults.clear_all();
        return Ok(json!({"cleared": n}));
    }
    Err(QmpError::generic(
        "x-block-fault needs one of 'arm', 'clear', 'clear-all': true or 'evict': true",
    ))
}
