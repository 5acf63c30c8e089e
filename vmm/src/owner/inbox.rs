//! The run-state owner's inbox: everything that can change the run state arrives
//! here as an [`Input`], from the vCPUs, the disks' workers, the QMP server, the
//! signal thread and the panic hook. Nobody else changes the run state.

use std::sync::mpsc::{Receiver, Sender};

use holdfast_qmp::{Args, Machine, QmpError};
use serde_json::Value;

use super::command::Command;
use crate::disk::{DiskEvent, DiskEvents};

/// Where inputs for the owner are sent.
pub type Inbox = Sender<Input>;

/// The owner's inbox, and where its inputs come out ([`super::run`]).
pub fn inbox() -> (Inbox, Receiver<Input>) {
    std::sync::mpsc::channel()
}

/// Where a disk's events go: into the owner's inbox, as [`Input::Disk`].
pub fn disk_events(inbox: &Inbox) -> DiskEvents {
    let inbox = inbox.clone();
    DiskEvents::new(move |event| {
        let _ = inbox.send(Input::Disk(event));
    })
}

/// Sent to the run-state owner.
#[derive(Debug)]
pub enum Input {
    /// The guest powered off (ACPI).
    Poweroff,
    /// The guest rebooted (or triple-faulted).
    Reboot,
    /// The guest said it panicked (pvpanic).
    GuestPanic,
    /// The guest ended its run with a status (the debug-exit port).
    GuestStatus(u8),
    /// The guest did not reach its init within `--boot-timeout` (seconds).
    BootTimeout { seconds: u64 },
    /// KVM could not run the guest's code on this vCPU.
    EmulationFailure { cpu: u8 },
    /// A vCPU failed for another reason.
    VcpuFailed { cpu: u8, message: String },
    /// A device of holdfast's failed (its thread panicked): its name, the message.
    DeviceFailed { device: String, message: String },
    /// A disk's host error, or its queue the guest broke.
    Disk(DiskEvent),
    /// Another holdfast thread panicked (its name, the message): end as `quit` does.
    ThreadPanicked { thread: String, message: String },
    /// SIGTERM, SIGINT or SIGHUP (its name) reached holdfast: end as `quit` does.
    HostSignal { name: &'static str },
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
    /// The guest's status (the debug-exit port).
    GuestStatus(u8),
    /// No init within `--boot-timeout` (seconds); the disks were settled.
    BootTimeout {
        seconds: u64,
    },
    EmulationFailure {
        cpu: u8,
    },
    Failed(String),
}

/// QMP's side of the owner: parses each command in the server's thread, forwards it
/// and waits for the answer.
#[derive(Debug)]
pub struct QmpBridge(pub std::sync::Mutex<Inbox>);

impl Machine for QmpBridge {
    fn commands(&self) -> Vec<&'static str> {
        Command::names()
    }

    fn execute(&self, command: &str, args: &Args) -> Result<Value, QmpError> {
        let command = Command::parse(command, args)?;
        let (reply, answer) = std::sync::mpsc::channel();
        let gone = || QmpError::generic("the machine has shut down");
        let tx = self.0.lock().map_err(|_| gone())?.clone();
        tx.send(Input::Qmp { command, reply }).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}
