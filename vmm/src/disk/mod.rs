//! A virtio-blk disk of the machine, whole: its slot on the MMIO bus (the virtio-mmio
//! transport over the [block device](crate::virtio::block::BlockDevice), the disk
//! engine behind its own lock, its queue notifier and interrupt), its worker and I/O
//! threads ([`worker`], [`io_threads`]), its replay on `cont` ([`replay`]), and what
//! it shows and tells the run-state owner ([`views`]).
//!
//! Who holds what: a vCPU holds a slot's transport lock for a register access and
//! never waits on a disk. A disk's worker takes requests off the queue (transport
//! lock) and begins them on the engine ([`Engine::begin`], engine lock, never both):
//! reads and write-back writes go to the disk's I/O threads ([`CALLS_PER_DISK`]),
//! which run the host call holding no lock, end it on the engine and put the
//! completion in the used ring (a write of
//! [`BORROW_FROM`](crate::virtio::block::BORROW_FROM) or more runs its host call from
//! guest memory while the worker copies it for the buffer), interrupting the guest
//! where it asked to be (event indexes; completions that meet in the used ring share
//! one interrupt); what needs the engine alone (a FLUSH, ...) the worker runs itself,
//! with the engine's lock, once the calls in flight ended, taking nothing else
//! meanwhile. A host error goes to the owner as a [`DiskEvent`]. The owner never
//! waits on a host call that [hangs](HUNG_AFTER): such a disk answers from what its
//! worker saw last and names the call ([`CallWatch`]), and whatever needs the engine
//! itself (a replay, a detach, settling at the end) is refused or reported, not
//! waited for. One disk's hang stops nothing but that disk.

pub mod io_threads;
pub mod replay;
#[cfg(test)]
mod tests;
pub mod views;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use holdfast_block::{AttachmentError, CallWatch, DiskStatus, Engine, FaultHandle, Outstanding};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::block::BlockDevice;
use crate::virtio::mmio::{Action, MmioTransport};
use io_threads::Calls;
use replay::Replay;
pub use views::{
    AttachFailure, DiskCall, DiskEvent, DiskEvents, DiskInfo, DiskSpec, Dropped, FaultPoints,
    Replayed, ResumeFailure, SimulatedHost,
};
pub use worker::{serve, spawn_worker, WORKER_PREFIX};

type BlockTransport = MmioTransport<BlockDevice>;

/// Host calls a disk runs beside each other at most (its I/O threads): reads and
/// write-back writes; the guest may have up to its queue size taken off the queue.
pub const CALLS_PER_DISK: usize = 32;

/// A host call outstanding this long hangs, as far as the owner is concerned: it
/// does not wait for it (nor for a disk its worker has held this long).
pub const HUNG_AFTER: Duration = Duration::from_secs(1);

/// A disk's slot on the MMIO bus: its transport, its engine, queue notifier and
/// interrupt, and what its worker, I/O threads and replay share.
pub struct Slot {
    pub id: String,
    path: String,
    direct: bool,
    faults: Option<FaultHandle>,
    simulated: Option<SimulatedHost>,
    /// The host call the disk is in, if any.
    watch: CallWatch,
    hang_timeout: Option<Duration>,
    /// Its I/O threads, started with its first call.
    io_threads: usize,
    /// Where its registers start on the MMIO bus.
    pub base: u64,
    transport: Mutex<BlockTransport>,
    /// The engine, apart from the transport: nobody holds both locks, and a vCPU
    /// never waits for this one.
    disk: Mutex<Box<dyn Engine>>,
    /// Signalled (with the disk's lock) when its last call in flight ended.
    idle: Condvar,
    /// The calls waiting for one of the disk's I/O threads (started with the first).
    calls: Mutex<Calls>,
    /// Signalled when a call is queued (one thread wakes) or the threads must end.
    call_ready: Condvar,
    /// Threads putting a completion in the used ring now; the last of them raises
    /// the interrupt for all (see `worker::answer`).
    answering: AtomicUsize,
    /// The used ring has entries the driver was not told about (transport lock).
    unsignalled: AtomicBool,
    /// The disk's status when its lock was last released (shown while it is busy).
    last_status: Mutex<DiskStatus>,
    /// Where the disk's replay is ([`Slot::resume`]).
    replay: Mutex<Replay>,
    /// Signalled when a replay ends.
    replay_done: Condvar,
    /// With a write log: completions reach the used ring, and the log, in the order
    /// the engine made them ([`LogOrder`]).
    log_order: Option<LogOrder>,
    /// The guest's queue notifications (an ioeventfd).
    pub notify: EventFd,
    /// The device's interrupt (an irqfd).
    pub irq: EventFd,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("id", &self.id)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A write log's order. The engine completes requests in one order (under its
/// lock); the threads that then put the completions in the used ring race each
/// other, and a completion the device logs late could land after a later write to
/// the same sectors, or after a flush it preceded. So with a log each completion
/// takes a ticket from the engine's order and waits its turn to be answered and
/// logged. (Without a log, nothing waits.)
#[derive(Debug, Default)]
pub(super) struct LogOrder {
    /// The next ticket (taken with the engine's lock held).
    next: std::sync::atomic::AtomicU64,
    /// The ticket whose turn it is.
    turn: Mutex<u64>,
    moved: Condvar,
}

impl LogOrder {
    /// A ticket for `outcome`, if it completes a request; the caller holds the
    /// engine's lock.
    pub(super) fn ticket(&self, outcome: &holdfast_block::Outcome) -> Option<u64> {
        outcome
            .completion
            .as_ref()
            .map(|_| self.next.fetch_add(1, Ordering::SeqCst))
    }

    /// Waits until every ticket before `ticket` has been answered.
    pub(super) fn wait(&self, ticket: u64) {
        let mut turn = self
            .turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *turn < ticket {
            turn = self
                .moved
                .wait(turn)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// `ticket` was answered: the next one's turn.
    pub(super) fn done(&self, ticket: u64) {
        let mut turn = self
            .turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *turn = (*turn).max(ticket + 1);
        self.moved.notify_all();
    }

    /// Waits until every ticket taken so far has been answered (a replay's
    /// completions come after them).
    pub(super) fn wait_all(&self) {
        self.wait(self.next.load(Ordering::SeqCst));
    }
}

/// The disk is in a host call that has not returned (see [`HUNG_AFTER`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy(pub String);

/// "a host flush has been outstanding for 12.3 s", or what is known.
fn describe(call: Option<Outstanding>) -> String {
    match call {
        Some(c) => format!(
            "a host {} has been outstanding for {:.1} s",
            c.op,
            c.age().as_secs_f64()
        ),
        None => "its I/O worker is busy with it".to_owned(),
    }
}

impl Slot {
    /// A slot at `base` for the disk `spec` describes.
    pub fn new(spec: DiskSpec, base: u64, notify: EventFd, irq: EventFd) -> Slot {
        let status = spec.engine.status();
        let mut device = BlockDevice::new(&*spec.engine);
        let log_order = spec.write_log.map(|log| {
            device.log_to(&spec.id, log);
            LogOrder::default()
        });
        Slot {
            id: spec.id,
            path: spec.path,
            direct: spec.direct,
            faults: spec.faults,
            simulated: spec.simulated,
            watch: spec.watch,
            hang_timeout: spec.hang_timeout,
            io_threads: spec.io_threads.max(1),
            base,
            disk: Mutex::new(spec.engine),
            idle: Condvar::new(),
            calls: Mutex::new(Calls::default()),
            call_ready: Condvar::new(),
            answering: AtomicUsize::new(0),
            unsignalled: AtomicBool::new(false),
            transport: Mutex::new(MmioTransport::new(device)),
            last_status: Mutex::new(status),
            replay: Mutex::new(Replay::Idle),
            replay_done: Condvar::new(),
            log_order,
            notify,
            irq,
        }
    }

    pub fn transport(&self) -> MutexGuard<'_, BlockTransport> {
        self.transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The engine, locked (waits while a host call runs on it; a panic elsewhere
    /// leaves the engine consistent).
    fn engine(&self) -> MutexGuard<'_, Box<dyn Engine>> {
        self.disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A vCPU reads the device's registers.
    pub fn read_register(&self, offset: u64, data: &mut [u8]) {
        self.transport().read(offset, data)
    }

    /// A vCPU writes the device's registers: the queue is served on a notification
    /// (and what the driver queued before DRIVER_OK, once live); what the write
    /// changes on the engine (the write cache mode, a reset's dropping of parked
    /// requests) is applied at once if the engine is free, else by the worker
    /// before it next runs a request. Never waits on the engine.
    pub fn write_register(&self, offset: u64, data: &[u8]) {
        let mut t = self.transport();
        let action = t.write(offset, data);
        if action == Action::Reset {
            t.device_mut().reset();
        }
        let pending = t.device_mut().take_pending();
        if !pending.is_empty() {
            match self.disk.try_lock() {
                Ok(mut disk) => {
                    pending.apply(&mut **disk);
                }
                Err(_) => t.device_mut().keep_pending(pending),
            }
        }
        drop(t);
        if matches!(action, Action::Activate | Action::Notify(_)) {
            let _ = self.notify.write(1);
        }
    }

    /// The disk, for the owner: waits at most `wait` (`Duration::MAX`: as long as
    /// it takes) while its worker has it (and, if `alone`, while calls are in flight
    /// on it), and not at all for a call that hangs (unless `patient`); else says
    /// what the disk is busy with.
    fn disk_within(
        &self,
        wait: Duration,
        patient: bool,
        alone: bool,
    ) -> Result<MutexGuard<'_, Box<dyn Engine>>, Busy> {
        let until = Instant::now().checked_add(wait);
        loop {
            let got = match self.disk.try_lock() {
                Ok(disk) => Some(disk),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            match got {
                Some(disk) if !alone || disk.in_flight() == 0 => return Ok(disk),
                busy => {
                    drop(busy);
                    let call = self.watch.outstanding();
                    let hangs = call.is_some_and(|c| c.age() >= HUNG_AFTER);
                    if until.is_some_and(|u| Instant::now() >= u) || hangs && !patient {
                        return Err(Busy(describe(call)));
                    }
                    std::thread::sleep(Duration::from_millis(1))
                }
            }
        }
    }

    /// The disk once no call is in flight on it (for a request that needs it alone,
    /// and a replay); waits as long as they take.
    fn disk_alone(&self) -> MutexGuard<'_, Box<dyn Engine>> {
        let mut disk = self.engine();
        while disk.in_flight() > 0 {
            disk = self
                .idle
                .wait(disk)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        disk
    }

    fn remember(&self, disk: &dyn Engine) {
        *self
            .last_status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = disk.status();
    }

    fn last_status(&self) -> DiskStatus {
        *self
            .last_status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the owner shows of the disk; while a host call hangs, the status its
    /// worker saw last and the call.
    pub fn info(&self) -> DiskInfo {
        let stats = self.transport().device().stats();
        let (status, path, read_only, writeback) =
            match self.disk_within(Duration::ZERO, false, false) {
                Ok(disk) => (
                    disk.status(),
                    // Where the disk is attached now (x-block-attach may move it).
                    disk.image()
                        .map_or_else(|| self.path.clone(), |p| p.display().to_string()),
                    disk.config().read_only,
                    disk.config().writeback,
                ),
                Err(_) => {
                    let t = self.transport();
                    let device = t.device();
                    (
                        self.last_status(),
                        self.path.clone(),
                        device.read_only(),
                        device.writeback(),
                    )
                }
            };
        DiskInfo {
            id: self.id.clone(),
            path,
            direct: self.direct,
            read_only,
            writeback,
            status,
            outstanding: self.watch.outstanding(),
            hang_timeout: self.hang_timeout,
            stats,
        }
    }

    /// The host call the disk is in, if any (never waits).
    pub fn call(&self) -> Option<DiskCall> {
        self.watch.outstanding().map(|c| DiskCall {
            disk: self.id.clone(),
            call: c,
            hang_timeout: self.hang_timeout,
        })
    }

    /// Sets the device up as a driver does, register by register (ACKNOWLEDGE,
    /// DRIVER, the features `features` of those offered, FEATURES_OK), gives it
    /// `queue` and makes it live (DRIVER_OK): for tests and fuzzing, which then
    /// [`serve`] it as its worker does. False if the device did not go live.
    pub fn set_up(&self, queue: virtio_queue::Queue, features: u64) -> bool {
        use virtio_bindings::virtio_config::*;
        use virtio_bindings::virtio_mmio::*;
        let offered = self.transport().device().features();
        let w = |reg: u32, v: u32| self.write_register(u64::from(reg), &v.to_le_bytes());
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w(VIRTIO_MMIO_STATUS, s);
        for sel in 0..2u32 {
            w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            let half = (features & offered) >> (32 * sel);
            w(VIRTIO_MMIO_DRIVER_FEATURES, half as u32);
        }
        // The queue first: FEATURES_OK tells it whether the driver keeps event
        // indexes.
        self.transport().queues_mut()[0] = queue;
        w(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        let ok = s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        w(VIRTIO_MMIO_STATUS, ok);
        // DRIVER_OK asked the worker to serve the queue; the caller serves it.
        let _ = self.notify.read();
        self.transport().live()
    }

    /// Waits up to `within` until no host call is in flight on the disk, nothing
    /// waits for its I/O threads and no completion is on its way to the used ring
    /// (after [`serve`] handed calls to the I/O threads, for tests and fuzzing).
    /// True once quiet.
    pub fn wait_quiet(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        loop {
            let quiet = self.lock_calls().waiting.is_empty()
                && self.answering.load(Ordering::SeqCst) == 0
                && self.disk.try_lock().is_ok_and(|d| d.in_flight() == 0)
                && !matches!(*self.lock_replay(), Replay::Running);
            if quiet {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Never takes a lock of the disk's.
    pub(crate) fn fault_points(&self) -> FaultPoints {
        FaultPoints {
            calls: self.faults.clone(),
            simulated: self.simulated.clone(),
        }
    }

    /// Runs `change` on the disk (`x-block-detach`, `x-block-attach`) once no call
    /// is in flight on it, naming the disk in its error. A replay's outcome that no
    /// `cont` took is stale after a change: the next `cont` replays again.
    pub fn change(
        &self,
        change: impl FnOnce(&mut Box<dyn Engine>) -> Result<(), AttachmentError>,
    ) -> Result<(), AttachFailure> {
        let mut disk = self
            .disk_within(HUNG_AFTER, false, true)
            .map_err(|Busy(call)| AttachFailure::Busy {
                disk: self.id.clone(),
                call,
            })?;
        let r = change(&mut disk);
        self.remember(&**disk);
        if r.is_ok() {
            let mut replay = self.lock_replay();
            if matches!(*replay, Replay::Ended { .. }) {
                *replay = Replay::Idle;
            }
        }
        r.map_err(|error| AttachFailure::Disk {
            disk: self.id.clone(),
            error,
        })
    }

    /// Makes the disk's buffered bytes stable at the end (`quit`, a signal), waiting
    /// for the disk as long as its host calls return (a long replay too); a call that
    /// hangs is reported, not waited for. What it could not, if anything.
    pub fn settle_at_the_end(&self) -> Option<Dropped> {
        self.settle(Duration::MAX, false)
    }

    /// Makes the disk's buffered bytes stable now, waiting at most `wait`
    /// (`Duration::MAX`: as long as its host calls return) for the disk (for a call
    /// that hangs too, if `patient`); what it could not, if anything.
    pub fn settle(&self, wait: Duration, patient: bool) -> Option<Dropped> {
        let mut disk = match self.disk_within(wait, patient, true) {
            Ok(disk) => disk,
            Err(Busy(call)) if self.last_status().buffer.bytes == 0 => {
                log::warn!(
                    "disk {}: {call}; nothing was buffered: no acknowledged bytes are at risk",
                    self.id
                );
                return None;
            }
            Err(Busy(call)) => {
                return Some(Dropped {
                    disk: self.id.clone(),
                    bytes: self.last_status().buffer.bytes,
                    why: format!(
                        "{call}, and a call stuck in the kernel cannot be cancelled: \
                         the bytes it kept are not known to be on stable storage"
                    ),
                })
            }
        };
        let e = disk.settle().err()?;
        if e.unflushed_bytes == 0 {
            // Every acknowledged write is covered by a flush that succeeded.
            log::warn!(
                "disk {}: the last host flush failed ({}), with nothing buffered: no \
                 acknowledged bytes are at risk",
                self.id,
                e.error
            );
            return None;
        }
        let why = if disk.is_detached() {
            "the disk is detached from its image".to_owned()
        } else {
            e.error.to_string()
        };
        Some(Dropped {
            disk: self.id.clone(),
            bytes: e.unflushed_bytes,
            why,
        })
    }
}
