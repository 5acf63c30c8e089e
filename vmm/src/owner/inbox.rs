//! The run-state owner's inbox: everything that can change the run state arrives
//! here as an [`Input`], from the vCPUs, the disks' device thread, the QMP server,
//! the signal thread and the panic hook. Nobody else changes the run state.

use std::sync::mpsc::Sender;

use holdfast_block::IoErrorReport;
use holdfast_qmp::QmpError;
use serde_json::Value;

use super::command::Command;

/// Where inputs for the owner are sent.
pub type Inbox = Sender<Input>;

/// Sent to the run-state owner.
#[derive(Debug)]
pub enum Input {
    /// The guest powered off (ACPI).
    Poweroff,
    /// The guest rebooted (or triple-faulted).
    Reboot,
    /// The guest said it panicked (pvpanic).
    GuestPanic,
    /// KVM could not run the guest's code on this vCPU.
    EmulationFailure { cpu: u8 },
    /// A vCPU failed for another reason.
    VcpuFailed { cpu: u8, message: String },
    /// A device of holdfast's failed (its thread panicked): its name, the message.
    DeviceFailed { device: String, message: String },
    /// A disk's queue is broken (the guest's doing): the device set
    /// DEVICE_NEEDS_RESET and serves nothing until the driver resets it. The VM and
    /// the other disks go on.
    DeviceNeedsReset { disk: String, reason: String },
    /// A disk hit a host error (under `stop` it is now stopped).
    DiskError {
        disk: String,
        report: IoErrorReport,
        /// When the failing host call returned.
        at: std::time::Instant,
    },
    /// Another holdfast thread panicked (its name, the message): end as `quit` does.
    ThreadPanicked { thread: String, message: String },
    /// SIGTERM, SIGINT or SIGHUP reached holdfast: end as `quit` does.
    HostSignal { signal: i32 },
    /// Time passed with nothing else to do (every [`super::TICK`]): the owner looks
    /// for host calls outstanding past their disk's hang-timeout.
    Tick,
    /// A QMP command, parsed, with where to send its answer.
    Qmp {
        command: Command,
        reply: Sender<Result<Value, QmpError>>,
    },
}

/// How the machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Poweroff,
    /// QMP `quit`.
    Quit,
    /// Ended by SIGTERM, SIGINT or SIGHUP (its name), disks settled as for `quit`.
    Signal(&'static str),
    Reboot,
    GuestPanic,
    EmulationFailure {
        cpu: u8,
    },
    Failed(String),
}
