//! The QMP events the run-state owner sends, each a typed struct ([`Event`]): its
//! name and its `data`, spelled as QEMU spells them.

use holdfast_block::{ErrorAction, HostError, HostOp, IoErrorReport};
use holdfast_qmp::EventSink;
use serde::Serialize;

use crate::disk::{DiskCall, Dropped, Replayed};

/// A QMP event: its name, and its `data` (none if it serializes to `null`).
pub trait Event: Serialize {
    const NAME: &'static str;
}

/// Sends `event` to every QMP client.
pub fn emit<E: Event>(sink: &EventSink, event: E) {
    let data = serde_json::to_value(&event).unwrap_or(serde_json::Value::Null);
    sink.emit(E::NAME, data);
}

/// `BLOCK_IO_ERROR`: a disk's host call failed, or hangs past its hang-timeout.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockIoError {
    pub device: String,
    pub node_name: String,
    /// `read` or `write` (a flush is a write).
    pub operation: &'static str,
    pub action: &'static str,
    pub nospace: bool,
    pub reason: String,
}

impl Event for BlockIoError {
    const NAME: &'static str = "BLOCK_IO_ERROR";
}

impl BlockIoError {
    /// A host call of `disk` failed, and its error policy chose `report.action`.
    pub fn failed(disk: &str, report: &IoErrorReport) -> BlockIoError {
        BlockIoError {
            device: disk.to_owned(),
            node_name: disk.to_owned(),
            operation: operation(report.error.op),
            action: report.action.as_str(),
            nospace: report.error.is_nospace(),
            reason: holdfast_block::strerror(report.error.errno),
        }
    }

    /// A host call has been outstanding past its disk's hang-timeout: the VM stops.
    pub fn hangs(call: &DiskCall, reason: String) -> BlockIoError {
        BlockIoError {
            device: call.disk.clone(),
            node_name: call.disk.clone(),
            operation: operation(call.call.op),
            action: ErrorAction::Stop.as_str(),
            nospace: false,
            reason,
        }
    }
}

/// QEMU's `operation`: a flush is a write.
fn operation(op: HostOp) -> &'static str {
    if op == HostOp::Read {
        "read"
    } else {
        "write"
    }
}

/// `STOP`: the vCPUs are paused.
#[derive(Debug, Serialize)]
pub struct Stop;

impl Event for Stop {
    const NAME: &'static str = "STOP";
}

/// `POWERDOWN`: the guest's power button was pressed (`system_powerdown`).
#[derive(Debug, Serialize)]
pub struct Powerdown;

impl Event for Powerdown {
    const NAME: &'static str = "POWERDOWN";
}

/// `RESUME`: the vCPUs run again.
#[derive(Debug, Serialize)]
pub struct Resume;

impl Event for Resume {
    const NAME: &'static str = "RESUME";
}

/// `SHUTDOWN`: the machine ends; `guest` if the guest asked for it.
#[derive(Debug, Serialize)]
pub struct Shutdown {
    pub guest: bool,
    pub reason: &'static str,
}

impl Event for Shutdown {
    const NAME: &'static str = "SHUTDOWN";
}

/// `GUEST_PANICKED`: the guest said so (pvpanic); the machine powers off.
#[derive(Debug, Serialize)]
pub struct GuestPanicked {
    pub action: &'static str,
}

impl Event for GuestPanicked {
    const NAME: &'static str = "GUEST_PANICKED";
}

/// `X_BLOCK_REPLAY`: a disk's replay on `cont`, and how it went.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockReplay {
    pub device: String,
    /// `ok` or `failed`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_rewritten: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<&'static str>,
}

impl Event for BlockReplay {
    const NAME: &'static str = "X_BLOCK_REPLAY";
}

impl BlockReplay {
    pub fn ok(r: &Replayed) -> BlockReplay {
        BlockReplay {
            device: r.disk.clone(),
            outcome: "ok",
            bytes_rewritten: Some(r.bytes_rewritten),
            duration_ns: Some(r.duration.as_nanos() as u64),
            errno: None,
        }
    }

    pub fn failed(disk: &str, error: &HostError) -> BlockReplay {
        BlockReplay {
            device: disk.to_owned(),
            outcome: "failed",
            bytes_rewritten: None,
            duration_ns: None,
            errno: Some(error.errno_name()),
        }
    }
}

/// `X_UNFLUSHED_DROPPED`: bytes a disk could not make stable before the end.
#[derive(Debug, Serialize)]
pub struct UnflushedDropped {
    pub device: String,
    pub bytes: u64,
    pub reason: String,
}

impl Event for UnflushedDropped {
    const NAME: &'static str = "X_UNFLUSHED_DROPPED";
}

impl From<&Dropped> for UnflushedDropped {
    fn from(d: &Dropped) -> UnflushedDropped {
        UnflushedDropped {
            device: d.disk.clone(),
            bytes: d.bytes,
            reason: d.why.clone(),
        }
    }
}

/// `X_DEVICE_NEEDS_RESET`: the guest broke a disk's queue.
#[derive(Debug, Serialize)]
pub struct DeviceNeedsReset {
    pub device: String,
    pub reason: String,
}

impl Event for DeviceNeedsReset {
    const NAME: &'static str = "X_DEVICE_NEEDS_RESET";
}
