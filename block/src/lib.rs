//! holdfast's durability engine.
//!
//! A guest write enters a disk's [`UnflushedBuffer`] and stays there until a
//! successful host flush covers it; when a host write or flush fails, the disk's
//! [error policy](ErrorPolicy) decides, and under `stop` the request is parked and the
//! disk stops until [`Disk::replay`] rewrites the buffer, flushes and runs what was
//! parked. `docs/durability.md` is the contract this crate implements.
//!
//! Following a failed `fdatasync` by name: [`Request`] -> [`Disk::begin`] (a FLUSH is
//! [`Begun::Alone`]) -> [`Disk::submit`] ->
//! [`Backend::flush`] returns a [`HostError`] -> [`ErrorPolicy::action`] -> parked,
//! [`IoStatus`] set, [`Outcome::error`] tells the owner (who pauses the VM and sends
//! `BLOCK_IO_ERROR`) -> on `cont`, [`Disk::replay`] -> [`ReplayReport`].
//!
//! Nothing here knows about KVM or virtio transports. For tests there are an in-memory
//! backend and a fault-injecting wrapper ([`fault`], also behind QMP's
//! `x-block-fault`). With the cargo feature `sim`, [`sim`] adds what tests and
//! `holdfast lab` need and the engine does not: simulated host page caches with the
//! failure behaviour of real file systems, an oracle for the durability invariant and
//! the outage matrix that compares holdfast with QEMU-like strategies.

pub mod backend;
pub mod buffer;
pub mod bytes;
pub mod disk;
pub mod engine;
pub mod fault;
mod host_error;
pub mod policy;
pub mod request;
#[cfg(feature = "sim")]
pub mod sim;
pub mod watch;
pub mod writelog;

pub use backend::{
    AttachError, Backend, Capabilities, FileBackend, FileOptions, MemBackend, SharedIo,
};
pub use buffer::{BufferStats, UnflushedBuffer};
pub use bytes::Bytes;
pub use disk::{
    AttachmentError, Begun, Call, Disk, DiskConfig, DiskStatus, IoErrorReport, Outcome,
    ReplayError, ReplayReport, SettleError,
};
pub use engine::Engine;
pub use fault::{FaultHandle, FaultInjector, FaultOp, FaultPlan, FaultRule, Trigger};
pub use host_error::{errno_from_name, errno_name, strerror, HostError, HostOp};
pub use policy::{ErrorAction, ErrorPolicy, IoStatus};
pub use request::{Completion, Request, RequestOp, Status};
pub use watch::{CallWatch, Outstanding, Watched};
pub use writelog::{read_log, LogEntry, LogError, WriteLog};

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data
/// consistent even if a panic unwinds through it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
