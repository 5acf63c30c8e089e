//! What the run-state owner needs of the machine, and nothing else: pause, resume,
//! settle, and the disks (what they are, and letting one go of its image and take it
//! back). [`crate::vm::Vm`] is the real one; the owner's unit tests use a fake, so
//! every transition is tested without `/dev/kvm`.

use std::path::Path;
use std::sync::Arc;

use std::time::Duration;

use holdfast_block::{AttachmentError, DiskStatus, FaultHandle, HostError, Outstanding};

use crate::error_chain;

/// The guest clock as saved at a pause (KVM's kvmclock), restored at the resume so
/// the guest does not see the pause as time that passed.
pub type SavedClock = Option<kvm_bindings::kvm_clock_data>;

/// The machine under the owner.
pub trait Lifecycle {
    /// Stops every vCPU (kicked out of KVM_RUN, parked) and saves the guest clock.
    /// Devices keep their state; a stopped disk stays stopped.
    fn pause(&mut self) -> SavedClock;
    /// Devices first (every stopped disk replayed; on failure nothing runs and the
    /// error names the disk), then the clock, then the vCPUs. Returns the disks it
    /// replayed.
    fn resume(&mut self, clock: SavedClock) -> Result<Vec<Replayed>, ResumeFailure>;
    /// Makes every disk's buffered bytes stable now (vCPUs paused). Returns each disk
    /// that could not be, with the bytes dropped and why.
    fn settle(&mut self) -> Vec<Dropped>;
    /// Every disk, for `query-block` and `x-query-unflushed`. Never waits on a disk
    /// whose host call hangs (it shows what it last knew, and the call).
    fn disks(&self) -> Vec<DiskInfo>;
    /// The host calls in progress, one per disk that is in one. Never waits.
    fn calls(&self) -> Vec<DiskCall>;
    /// A disk's fault-injection points (`x-block-fault`); `None` if there is no such
    /// disk. Never waits on the disk, so a hang can be ended while a call hangs.
    fn fault_points(&self, disk: &str) -> Option<FaultPoints>;
    /// Lets a disk go of its image, keeping its buffer and parked requests (vCPUs
    /// paused).
    fn detach(&mut self, disk: &str) -> Result<(), AttachFailure>;
    /// Opens a detached disk's image again (`path`, or the one it had).
    fn attach(&mut self, disk: &str, path: Option<&Path>) -> Result<(), AttachFailure>;
}

/// A disk as the run-state owner reports it.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    pub id: String,
    pub path: String,
    pub direct: bool,
    pub read_only: bool,
    pub writeback: bool,
    pub status: DiskStatus,
    /// The host call it is in, if any.
    pub outstanding: Option<Outstanding>,
    /// Past this, an outstanding call pauses the VM (`--disk hang-timeout=N`).
    pub hang_timeout: Option<Duration>,
}

/// A host call a disk is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCall {
    pub disk: String,
    pub call: Outstanding,
    pub hang_timeout: Option<Duration>,
}

/// Where `x-block-fault` acts on a disk.
#[derive(Debug, Clone, Default)]
pub struct FaultPoints {
    /// In front of the image: the host calls the disk makes.
    pub calls: Option<FaultHandle>,
    /// The simulated host page cache under the disk, if it has one.
    pub simulated: Option<SimulatedHost>,
}

/// A disk's simulated host page cache (`holdfast lab`): where `x-block-fault` breaks
/// its write-back, and how the host drops its clean pages.
#[derive(Clone)]
pub struct SimulatedHost {
    pub model: holdfast_block::sim::HostModel,
    /// Faults on the cache's write-back to the image (`layer: writeback`).
    pub writeback: FaultHandle,
    /// Drops the cache's clean pages (`evict`).
    pub evict: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for SimulatedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimulatedHost({})", self.model)
    }
}

/// A disk that `resume` replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub disk: String,
    pub bytes_rewritten: u64,
    /// How long the replay (rewrite, flush, parked requests) took.
    pub duration: std::time::Duration,
}

/// Buffered bytes a disk could not make stable before the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub disk: String,
    pub bytes: u64,
    pub why: String,
}

/// Why `resume` did not resume, naming the disk. Nothing ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeFailure {
    /// The disk let go of its image; checked before any disk is replayed.
    #[error("disk {disk} is detached from its image (x-block-attach it first)")]
    Detached { disk: String },
    /// The disk's replay failed: it stays stopped with everything it kept.
    #[error("disk {disk}: replay failed: {error}")]
    Replay { disk: String, error: HostError },
    /// The disk is in a host call that has not returned (`call` says which, for
    /// how long); checked before any disk is replayed.
    #[error("disk {disk}: {call}")]
    Busy { disk: String, call: String },
}

/// Why `x-block-detach` or `x-block-attach` refused, naming the disk.
#[derive(Debug, thiserror::Error)]
pub enum AttachFailure {
    #[error("no disk {0}")]
    NoSuchDisk(String),
    #[error("disk {disk}: {}", error_chain(.error))]
    Disk {
        disk: String,
        error: AttachmentError,
    },
    /// The disk is in a host call that has not returned.
    #[error("disk {disk}: {call}; try again when it returns")]
    Busy { disk: String, call: String },
}
