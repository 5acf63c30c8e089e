//! What the disk shows of itself to the run-state owner (the views it reads:
//! [`DiskInfo`] .. [`AttachFailure`]), what it tells it ([`DiskEvent`]), and what a
//! disk is made of ([`DiskSpec`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_block::{
    AttachmentError, Backend, Disk, DiskStatus, Engine, FaultHandle, HostError, IoErrorReport,
    Outstanding,
};

use crate::error_chain;

/// What a disk tells the run-state owner (whose `Input::Disk` carries it).
#[derive(Debug)]
pub enum DiskEvent {
    /// A host error (under `stop` the disk is now stopped).
    Error {
        disk: String,
        report: IoErrorReport,
        /// When the failing host call returned.
        at: Instant,
    },
    /// The guest broke the disk's queue: the device set DEVICE_NEEDS_RESET and
    /// serves nothing until the driver resets it. The VM and the other disks go on.
    NeedsReset { disk: String, reason: String },
}

/// Where a disk's events go: the run-state owner's inbox, or a test's channel.
#[derive(Clone)]
pub struct DiskEvents(Arc<dyn Fn(DiskEvent) + Send + Sync>);

impl DiskEvents {
    /// Events handed to `deliver` (which must not wait on a disk).
    pub fn new(deliver: impl Fn(DiskEvent) + Send + Sync + 'static) -> DiskEvents {
        DiskEvents(Arc::new(deliver))
    }

    pub fn send(&self, event: DiskEvent) {
        (self.0)(event)
    }
}

impl From<std::sync::mpsc::Sender<DiskEvent>> for DiskEvents {
    fn from(to: std::sync::mpsc::Sender<DiskEvent>) -> DiskEvents {
        DiskEvents::new(move |e| {
            let _ = to.send(e);
        })
    }
}

impl std::fmt::Debug for DiskEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskEvents")
    }
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
    /// What the guest's requests did (`query-blockstats`).
    pub stats: crate::virtio::block::BlockStats,
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

/// A disk that a `cont` replayed.
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

/// One disk: its name, its engine and where it lives.
pub struct DiskSpec {
    pub id: String,
    pub engine: Box<dyn Engine>,
    /// The image, for `query-block`.
    pub path: String,
    pub direct: bool,
    /// The fault-injection point in front of the image (`x-block-fault`).
    pub faults: Option<FaultHandle>,
    /// (`x-host=simulated:MODEL`) the simulated page cache between the engine and
    /// the image.
    pub simulated: Option<SimulatedHost>,
    /// Sees the host call the disk is in: the disk's backend is a
    /// [`holdfast_block::Watched`] whose watch this is.
    pub watch: holdfast_block::CallWatch,
    /// A host call outstanding longer than this pauses the VM (`hang-timeout=N`).
    pub hang_timeout: Option<std::time::Duration>,
    /// Host calls the disk runs beside each other at most: its I/O threads
    /// ([`super::CALLS_PER_DISK`]; fuzzing uses fewer).
    pub io_threads: usize,
    /// (`write-log=FILE`) every write and flush the guest was told is done, in the
    /// dm-log-writes format.
    pub write_log: Option<holdfast_block::WriteLog>,
}

impl DiskSpec {
    /// A disk named `id` with holdfast's engine over `backend` at `path` (for
    /// `query-block`), its host calls watched; no fault point, no simulated host, no
    /// hang-timeout.
    pub fn new(
        id: &str,
        backend: Box<dyn Backend>,
        config: holdfast_block::DiskConfig,
        path: &str,
    ) -> DiskSpec {
        DiskSpec::with_engine(id, backend, path, |watched| {
            Box::new(Disk::new(watched, config))
        })
    }

    /// As [`DiskSpec::new`], with the engine `engine` makes over the watched backend
    /// (`holdfast lab` compares other devices' strategies on it).
    pub fn with_engine(
        id: &str,
        backend: Box<dyn Backend>,
        path: &str,
        engine: impl FnOnce(Box<dyn Backend>) -> Box<dyn Engine>,
    ) -> DiskSpec {
        let watched = holdfast_block::Watched::new(backend);
        let watch = watched.watch();
        DiskSpec {
            id: id.to_owned(),
            engine: engine(Box::new(watched)),
            path: path.to_owned(),
            direct: false,
            faults: None,
            simulated: None,
            watch,
            hang_timeout: None,
            io_threads: super::CALLS_PER_DISK,
            write_log: None,
        }
    }
}

impl std::fmt::Debug for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskSpec({})", self.id)
    }
}
