//! The virtio-blk disks on the MMIO bus: each one's slot (its virtio-mmio transport
//! over the block device, the disk engine behind its own lock, its queue notifier
//! and interrupt), the bus the vCPUs reach them through, and each disk's I/O worker
//! thread, which serves its queue and tells the run-state owner about host errors.
//!
//! Who holds what: a vCPU holds a slot's transport lock for a register access and
//! never waits on a disk. A disk's worker takes requests off the queue (transport
//! lock) and begins them on the disk ([`Disk::begin`], disk lock, never both): reads
//! and write-back writes go to the disk's I/O threads ([`CALLS_PER_DISK`]), which run
//! the host call holding no lock, end it on the disk and put the completion in the
//! used ring (a write of [`BORROW_FROM`](crate::virtio::block::BORROW_FROM) or more
//! runs its host call from guest memory while the worker copies it for the buffer,
//! `begin_guest_write`), interrupting the guest where it asked to be (`used_interrupt`:
//! event indexes; completions that meet in the used ring share one interrupt,
//! `answer`); what needs the disk alone (a FLUSH, ...) the worker runs itself,
//! with the disk's lock, once the calls in flight ended, taking nothing else
//! meanwhile. The owner never waits on a host call that [hangs](HUNG_AFTER): such a
//! disk answers from what its worker saw last and names the call ([`CallWatch`]), and
//! whatever needs the disk itself (a replay, a detach, settling at the end) is
//! refused or reported, not waited for.
//! One disk's hang stops nothing but that disk.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast_block::{
    AttachmentError, Backend, Begun, Call, CallWatch, Disk, DiskStatus, FaultHandle, Outcome,
    Outstanding, Request,
};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::owner::{
    AttachFailure, DiskCall, DiskInfo, Dropped, FaultPoints, Inbox, Input, Replayed, ResumeFailure,
    SimulatedHost,
};
use crate::virtio::block::{
    lock_disk, BlockDevice, GuestWrite, Next, Pending, QueueRun, SharedDisk,
};
use crate::virtio::mmio::{Action, MmioTransport, MMIO_SIZE};
use crate::vm::{error_chain, DiskSpec};

type BlockTransport = MmioTransport<BlockDevice<Box<dyn Backend>>>;

/// Where a disk's replay is. Only the owner starts one (`cont`), and only from
/// `Idle` or `Ended`: never two at once, and exactly one since the disk stopped
/// before the VM runs (docs/durability.md, "Requests in flight").
#[derive(Debug)]
enum Replay {
    /// None under way, and no outcome the owner has not taken.
    Idle,
    /// A replay thread has the disk (a `cont` that was refused while it hung left it
    /// running).
    Running,
    /// It finished: a success has answered the parked requests already; the next
    /// `cont` takes the outcome, unless the disk was detached since (then it is
    /// stale, and dropped).
    Ended {
        outcome: Result<u64, holdfast_block::ReplayError>,
        took: Duration,
    },
}

/// Host calls a disk runs beside each other at most (its I/O threads): reads and
/// write-back writes; the guest may have up to its queue size taken off the queue.
pub const CALLS_PER_DISK: usize = 32;

/// A host call outstanding this long hangs, as far as the owner is concerned: it
/// does not wait for it (nor for a disk its worker has held this long).
pub const HUNG_AFTER: Duration = Duration::from_secs(1);

/// A virtio-mmio device slot: its transport, its disk, queue notifier and interrupt.
pub struct MmioSlot {
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
    pub(crate) base: u64,
    transport: Mutex<BlockTransport>,
    disk: SharedDisk<Box<dyn Backend>>,
    /// Signalled (with the disk's lock) when its last call in flight ended.
    idle: Condvar,
    /// The calls waiting for one of the disk's I/O threads (started with the first).
    calls: Mutex<Calls>,
    /// Signalled when a call is queued (one thread wakes) or the threads must end.
    call_ready: Condvar,
    /// Threads putting a completion in the used ring now; the last of them raises
    /// the interrupt for all (see [`answer`]).
    answering: AtomicUsize,
    /// The used ring has entries the driver was not told about (transport lock).
    unsignalled: AtomicBool,
    /// The disk's status when its lock was last released (shown while it is busy).
    last_status: Mutex<DiskStatus>,
    /// Where the disk's replay is ([`MmioSlot::resume`]).
    replay: Mutex<Replay>,
    /// Signalled when a replay ends.
    replay_done: Condvar,
    /// The guest's queue notifications (an ioeventfd).
    pub notify: EventFd,
    /// The device's interrupt (an irqfd).
    pub irq: EventFd,
}

impl std::fmt::Debug for MmioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioSlot")
            .field("id", &self.id)
            .field("base", &self.base)
            .finish_non_exhaustive()
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

impl MmioSlot {
    /// A slot at `base` for the disk `spec` describes.
    pub fn new(spec: DiskSpec, base: u64, notify: EventFd, irq: EventFd) -> MmioSlot {
        let status = spec.disk.status();
        let device = BlockDevice::new(spec.disk);
        MmioSlot {
            id: spec.id,
            path: spec.path,
            direct: spec.direct,
            faults: spec.faults,
            simulated: spec.simulated,
            watch: spec.watch,
            hang_timeout: spec.hang_timeout,
            io_threads: spec.io_threads.max(1),
            base,
            disk: device.shared_disk(),
            idle: Condvar::new(),
            calls: Mutex::new(Calls::default()),
            call_ready: Condvar::new(),
            answering: AtomicUsize::new(0),
            unsignalled: AtomicBool::new(false),
            transport: Mutex::new(MmioTransport::new(device)),
            last_status: Mutex::new(status),
            replay: Mutex::new(Replay::Idle),
            replay_done: Condvar::new(),
            notify,
            irq,
        }
    }

    pub fn transport(&self) -> MutexGuard<'_, BlockTransport> {
        self.transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    ) -> Result<MutexGuard<'_, Disk<Box<dyn Backend>>>, Busy> {
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
    fn disk_alone(&self) -> MutexGuard<'_, Disk<Box<dyn Backend>>> {
        let mut disk = lock_disk(&self.disk);
        while disk.in_flight() > 0 {
            disk = self
                .idle
                .wait(disk)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        disk
    }

    fn remember(&self, disk: &Disk<Box<dyn Backend>>) {
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

    /// Whether the disk can be resumed: no replay or host call of its hangs (a
    /// young one is waited for, up to [`HUNG_AFTER`]), and attached. Asked of every
    /// disk before any is replayed, so that a refused `cont` changes nothing.
    pub fn ready(&self) -> Result<(), ResumeFailure> {
        let busy = |Busy(call)| ResumeFailure::Busy {
            disk: self.id.clone(),
            call,
        };
        self.wait_for_replay().map_err(busy)?;
        let disk = self.disk_within(HUNG_AFTER, false, true).map_err(busy)?;
        if disk.is_detached() {
            return Err(ResumeFailure::Detached {
                disk: self.id.clone(),
            });
        }
        Ok(())
    }

    /// Resumes the disk (`cont`): replays it if it stopped, then lets it serve what
    /// the guest queued meanwhile. `Some` if a replay ran since the last `cont`.
    /// Refused while a host call of the disk is outstanding (one that is young is
    /// waited for, up to [`HUNG_AFTER`]): the guest must not run beside a call that
    /// may still change what it reads. The replay runs on a thread of its own: if
    /// one of its calls hangs, the owner is told (Busy) rather than held; the replay
    /// goes on, and the next `cont` waits for it (as long as its calls return) and
    /// takes its outcome, rather than start a second one.
    pub fn resume(
        self: &Arc<Self>,
        mem: &GuestMemoryMmap,
        events: &Inbox,
    ) -> Result<Option<Replayed>, ResumeFailure> {
        let busy = |Busy(call)| ResumeFailure::Busy {
            disk: self.id.clone(),
            call,
        };
        self.wait_for_replay().map_err(busy)?;
        let mut disk = self.disk_within(HUNG_AFTER, false, true).map_err(busy)?;
        // Disk, then transport: a worker never holds both, a vCPU never waits on the
        // disk.
        self.transport()
            .device_mut()
            .take_pending()
            .apply(&mut disk);
        let ended = std::mem::replace(&mut *self.lock_replay(), Replay::Idle);
        if !disk.is_stopped() {
            drop(disk);
            // Requests the guest queued while the VM was paused.
            let _ = self.notify.write(1);
            return Ok(match ended {
                Replay::Ended {
                    outcome: Ok(bytes),
                    took,
                } => Some(self.replayed(bytes, took)),
                _ => None,
            });
        }
        if let Replay::Ended {
            outcome: Err(error),
            ..
        } = ended
        {
            // A replay a refused `cont` left running failed: this `cont` says so; the
            // next one replays again.
            return Err(ResumeFailure::Replay {
                disk: self.id.clone(),
                error: error.error,
            });
        }
        // The state changes with the disk held: no replay can start beside this one.
        *self.lock_replay() = Replay::Running;
        drop(disk);
        if let Err(e) = self.spawn_replay(mem.clone(), events.clone()) {
            *self.lock_replay() = Replay::Idle;
            return Err(busy(Busy(format!("cannot start its replay: {e}"))));
        }
        self.wait_for_replay().map_err(busy)?;
        match std::mem::replace(&mut *self.lock_replay(), Replay::Idle) {
            Replay::Ended {
                outcome: Ok(bytes),
                took,
            } => {
                let _ = self.notify.write(1);
                Ok(Some(self.replayed(bytes, took)))
            }
            Replay::Ended {
                outcome: Err(error),
                ..
            } => Err(ResumeFailure::Replay {
                disk: self.id.clone(),
                error: error.error,
            }),
            Replay::Idle | Replay::Running => unreachable!("wait_for_replay returned"),
        }
    }

    fn replayed(&self, bytes_rewritten: u64, duration: Duration) -> Replayed {
        Replayed {
            disk: self.id.clone(),
            bytes_rewritten,
            duration,
        }
    }

    /// Replays the disk on a thread of its own, once no call is in flight on it. A
    /// success answers the parked requests at once (the guest sees them when its
    /// vCPUs run); the outcome is kept for the owner ([`Replay::Ended`]).
    fn spawn_replay(
        self: &Arc<Self>,
        mem: GuestMemoryMmap,
        events: Inbox,
    ) -> std::io::Result<JoinHandle<()>> {
        let slot = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("{WORKER_PREFIX}{}", self.id))
            .spawn(move || {
                let started = Instant::now();
                let mut disk = slot.disk_alone();
                let outcome = disk.replay().map(|report| {
                    let bytes = report.bytes_rewritten;
                    slot.answer_replay(&mem, &events, report);
                    bytes
                });
                slot.remember(&disk);
                // Ended with the disk still held, so that whoever takes the disk next
                // also finds the outcome.
                *slot.lock_replay() = Replay::Ended {
                    outcome,
                    took: started.elapsed(),
                };
                drop(disk);
                slot.replay_done.notify_all();
            })
    }

    /// Puts a successful replay's completions in the used ring, with an interrupt.
    fn answer_replay(
        &self,
        mem: &GuestMemoryMmap,
        events: &Inbox,
        report: holdfast_block::ReplayReport,
    ) {
        let mut t = self.transport();
        let (device, queues) = t.device_and_queues();
        let resumed = device.complete_replay(mem, &mut queues[0], report);
        if resumed.used > 0 {
            used_interrupt(self, &mut t, mem);
        }
        // The bytes are on the host; only the guest's queue cannot take the
        // completions. That is the device's problem, not the VM's.
        if let Some(e) = &resumed.broken_queue {
            queue_broken(self, &mut t, e, events);
        }
    }

    /// Waits while a replay runs, as long as its host calls return; Busy once one
    /// hangs (the replay goes on).
    fn wait_for_replay(&self) -> Result<(), Busy> {
        let mut replay = self.lock_replay();
        while matches!(*replay, Replay::Running) {
            let call = self.watch.outstanding();
            if call.is_some_and(|c| c.age() >= HUNG_AFTER) {
                return Err(Busy(format!("its replay is under way: {}", describe(call))));
            }
            replay = self
                .replay_done
                .wait_timeout(replay, Duration::from_millis(10))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    fn lock_replay(&self) -> MutexGuard<'_, Replay> {
        self.replay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the owner shows of the disk; while a host call hangs, the status its
    /// worker saw last and the call.
    pub fn info(&self) -> DiskInfo {
        let (status, path, read_only, writeback) =
            match self.disk_within(Duration::ZERO, false, false) {
                Ok(disk) => (
                    disk.status(),
                    // Where the disk is attached now (x-block-attach may move it).
                    disk.backend()
                        .image()
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
        let mut t = self.transport();
        let offered = t.device().features();
        let w = |t: &mut BlockTransport, reg: u32, v: u32| {
            t.write(u64::from(reg), &v.to_le_bytes());
        };
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w(&mut t, VIRTIO_MMIO_STATUS, s);
        for sel in 0..2u32 {
            w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            let half = (features & offered) >> (32 * sel);
            w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, half as u32);
        }
        // The queue first: FEATURES_OK tells it whether the driver keeps event
        // indexes.
        t.queues_mut()[0] = queue;
        w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        let ok = s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        w(&mut t, VIRTIO_MMIO_STATUS, ok);
        t.live()
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
        change: impl FnOnce(&mut Disk<Box<dyn Backend>>) -> Result<(), AttachmentError>,
    ) -> Result<(), AttachFailure> {
        let mut disk = self
            .disk_within(HUNG_AFTER, false, true)
            .map_err(|Busy(call)| AttachFailure::Busy {
                disk: self.id.clone(),
                call,
            })?;
        let r = change(&mut disk);
        self.remember(&disk);
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

/// MMIO accesses from vCPUs, by address.
pub struct MmioBus {
    pub(crate) slots: Vec<Arc<MmioSlot>>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmioBus({} devices)", self.slots.len())
    }
}

impl MmioBus {
    pub fn new(slots: Vec<Arc<MmioSlot>>) -> MmioBus {
        MmioBus { slots }
    }

    fn slot(&self, addr: u64) -> Option<(&Arc<MmioSlot>, u64)> {
        self.slots
            .iter()
            .find(|s| (s.base..s.base + MMIO_SIZE).contains(&addr))
            .map(|s| (s, addr - s.base))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.slot(addr) {
            Some((slot, offset)) => slot.transport().read(offset, data),
            None => data.fill(0),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        let Some((slot, offset)) = self.slot(addr) else {
            return;
        };
        let action = slot.transport().write(offset, data);
        match action {
            // Serve what the driver queued before DRIVER_OK; later kicks come by ioeventfd.
            Action::Activate | Action::Notify(_) => {
                let _ = slot.notify.write(1);
            }
            Action::Reset => {
                slot.transport().device_mut().reset();
            }
            Action::None => {}
        }
    }
}

/// The prefix of a disk's I/O worker thread's name (`disk-ID`; a panic there is the
/// device's failure).
pub const WORKER_PREFIX: &str = "disk-";

/// A disk's I/O worker: waits on its queue's ioeventfd and serves the queue, off the
/// vCPU threads and apart from every other disk. Ends when `stop` is signalled.
pub(crate) fn spawn_worker(
    mem: GuestMemoryMmap,
    slot: Arc<MmioSlot>,
    stop: Arc<EventFd>,
    events: Inbox,
) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        slot.notify.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 1),
    )?;
    std::thread::Builder::new()
        .name(format!("{WORKER_PREFIX}{}", slot.id))
        .spawn(move || {
            let mut ready = [EpollEvent::default(); 2];
            loop {
                let n = match epoll.wait(-1, &mut ready) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                // `stop` stays readable: every worker sees it.
                if ready[..n].iter().any(|ev| ev.data() == 1) {
                    slot.stop_io_threads();
                    return;
                }
                let _ = slot.notify.read();
                serve(&slot, &mem, &events);
            }
        })
}

/// Serves one disk's queue (its worker) until it is empty or the disk stops:
/// reads and write-back writes go to the disk's I/O threads and run beside each
/// other; what needs the disk alone (a FLUSH, zeroes, a discard, ...) waits for them
/// and runs here, and the worker takes nothing more off the queue meanwhile.
/// Completions raise a used-buffer interrupt, a host error goes to the run-state
/// owner, a broken queue makes the device ask for a reset.
pub fn serve(slot: &Arc<MmioSlot>, mem: &GuestMemoryMmap, events: &Inbox) {
    let _serving = crate::logging::ServingDisk::new(&slot.id);
    loop {
        {
            let disk = lock_disk(&slot.disk);
            slot.remember(&disk);
            if disk.is_stopped() {
                return;
            }
        }
        let next = {
            let mut t = slot.transport();
            if !t.live() {
                return;
            }
            let (device, queues) = t.device_and_queues();
            match device.next(mem, &mut queues[0]) {
                Ok(next) => next,
                Err(e) => return queue_broken(slot, &mut t, &e, events),
            }
        };
        let (req, pending) = match next {
            Next::Empty => return,
            Next::Refused => {
                used_interrupt(slot, &mut slot.transport(), mem);
                continue;
            }
            Next::Request(req, pending) => (req, pending),
            Next::GuestWrite(write, pending) => {
                match begin_guest_write(slot, mem, events, write, pending) {
                    None => continue,
                    Some(req) => (req, Pending::default()),
                }
            }
        };
        let (begun, ahead) = {
            let mut disk = lock_disk(&slot.disk);
            pending.apply(&mut disk);
            let begun = disk.begin(req);
            let ahead = disk.flush_ahead();
            slot.remember(&disk);
            (begun, ahead)
        };
        if let Some(flush) = ahead {
            slot.run_apart(Job::Call(flush), mem, events);
        }
        let outcome = match begun {
            Begun::Done(outcome) => outcome,
            Begun::Call(call) => {
                slot.run_apart(Job::Call(call), mem, events);
                continue;
            }
            // The host call, with only the disk locked.
            Begun::Alone(req) => {
                let mut disk = slot.disk_alone();
                let outcome = disk.submit(req);
                slot.remember(&disk);
                outcome
            }
        };
        answer(slot, mem, events, outcome);
    }
}

/// A long write: where the disk would run it beside others, its host write goes to
/// an I/O thread, from guest memory, while this thread copies it for the buffer
/// (so the copy does not delay the host write); else it comes back copied, as a
/// request to begin as usual.
fn begin_guest_write(
    slot: &Arc<MmioSlot>,
    mem: &GuestMemoryMmap,
    events: &Inbox,
    write: GuestWrite,
    pending: Pending,
) -> Option<Request> {
    let (call, ahead) = {
        let mut disk = lock_disk(&slot.disk);
        pending.apply(&mut disk);
        let call = disk.begin_borrowed_write(write.tag, write.offset, write.bytes());
        let ahead = disk.flush_ahead();
        slot.remember(&disk);
        (call, ahead)
    };
    if let Some(flush) = ahead {
        slot.run_apart(Job::Call(flush), mem, events);
    }
    let Some(call) = call else {
        return Some(write.into_request());
    };
    let write = Arc::new(write);
    let (copied, copy) = std::sync::mpsc::sync_channel(1);
    let job = Job::Borrowed(Box::new(BorrowedWrite {
        call,
        write: Arc::clone(&write),
        copy,
    }));
    match slot.hand_over(job, mem, events) {
        Ok(()) => {
            let _ = copied.send(write.copy());
        }
        Err(job) => {
            let _ = copied.send(write.copy());
            run_job(slot, mem, events, job);
        }
    }
    None
}

/// What a disk's I/O threads run.
enum Job {
    Call(Call),
    /// A long write's host call, from guest memory; the worker sends the copy that
    /// the buffer keeps on `copy` meanwhile ([`begin_guest_write`]).
    Borrowed(Box<BorrowedWrite>),
}

struct BorrowedWrite {
    call: Call,
    write: Arc<GuestWrite>,
    copy: std::sync::mpsc::Receiver<holdfast_block::Bytes>,
}

/// Runs a job's host call (with no lock held), ends it on the disk and answers it.
fn run_job(slot: &MmioSlot, mem: &GuestMemoryMmap, events: &Inbox, job: Job) {
    let call = match job {
        Job::Call(call) => call,
        Job::Borrowed(job) => {
            let BorrowedWrite {
                mut call,
                write,
                copy,
            } = *job;
            call.run_borrowed(write.runs());
            // The worker copies meanwhile; were it gone, the copy is made here.
            call.supply(copy.recv().unwrap_or_else(|_| write.copy()));
            // A driver that reset the device meanwhile may have reused the memory
            // while the host write read it: the host gets the buffer's copy again.
            if slot.transport().device().resets() != write.resets {
                call.rerun_from_copy();
            }
            call
        }
    };
    end_call(slot, mem, events, call);
}

/// Runs a call in flight (with no lock held), ends it on the disk and answers it.
fn end_call(slot: &MmioSlot, mem: &GuestMemoryMmap, events: &Inbox, mut call: Call) {
    call.run();
    // From here this completion counts for the shared interrupt (see `answer`).
    slot.answering.fetch_add(1, Ordering::SeqCst);
    let outcome = {
        let mut disk = lock_disk(&slot.disk);
        let outcome = disk.end(call);
        slot.remember(&disk);
        if disk.in_flight() == 0 {
            slot.idle.notify_all();
        }
        outcome
    };
    answered(slot, mem, events, outcome);
}

/// Puts what the disk did with a request in the used ring (with an interrupt) and
/// tells the owner about a host error. Completions that reach the used ring at the
/// same time share one interrupt: the last thread to leave raises it for all.
fn answer(slot: &MmioSlot, mem: &GuestMemoryMmap, events: &Inbox, outcome: Outcome) {
    slot.answering.fetch_add(1, Ordering::SeqCst);
    answered(slot, mem, events, outcome);
}

/// [`answer`], for a completion already counted in `answering` (an I/O thread
/// counts its own from the moment its host call returned).
fn answered(slot: &MmioSlot, mem: &GuestMemoryMmap, events: &Inbox, outcome: Outcome) {
    let mut run = QueueRun::default();
    {
        let mut t = slot.transport();
        let (device, queues) = t.device_and_queues();
        match device.finish(mem, &mut queues[0], &mut run, outcome) {
            Ok(0) => {}
            Ok(_) => slot.unsignalled.store(true, Ordering::SeqCst),
            Err(e) => queue_broken(slot, &mut t, &e, events),
        }
        let last = slot.answering.fetch_sub(1, Ordering::SeqCst) == 1;
        // `used_interrupt` clears `unsignalled`.
        if last && slot.unsignalled.load(Ordering::SeqCst) {
            used_interrupt(slot, &mut t, mem);
        }
    }
    if let Some(report) = run.error {
        let _ = events.send(Input::DiskError {
            disk: slot.id.clone(),
            report,
            at: run.error_at.unwrap_or_else(Instant::now),
        });
    }
}

/// The calls handed to a disk's I/O threads, in order.
#[derive(Default)]
struct Calls {
    waiting: VecDeque<Job>,
    /// The threads were started.
    started: bool,
    /// The worker ended: the threads run what is queued and end.
    ending: bool,
}

impl MmioSlot {
    /// Gives a call to the disk's I/O threads (one wakes for it), starting them with
    /// the first; the call back if none could start or they are ending.
    fn hand_over(
        self: &Arc<Self>,
        call: Job,
        mem: &GuestMemoryMmap,
        events: &Inbox,
    ) -> Result<(), Job> {
        let mut calls = self.lock_calls();
        if calls.ending {
            return Err(call);
        }
        if !calls.started {
            let mut started = 0;
            for _ in 0..self.io_threads {
                let (slot, mem, events) = (Arc::clone(self), mem.clone(), events.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("{WORKER_PREFIX}{}", self.id))
                    .spawn(move || io_thread(&slot, &mem, &events));
                started += usize::from(spawned.is_ok());
            }
            if started == 0 {
                return Err(call);
            }
            calls.started = true;
        }
        calls.waiting.push_back(call);
        drop(calls);
        self.call_ready.notify_one();
        Ok(())
    }

    fn lock_calls(&self) -> MutexGuard<'_, Calls> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs a job on the disk's I/O threads, or here if none could start.
    fn run_apart(self: &Arc<Self>, job: Job, mem: &GuestMemoryMmap, events: &Inbox) {
        if let Err(job) = self.hand_over(job, mem, events) {
            run_job(self, mem, events, job);
        }
    }

    /// Lets the disk's I/O threads end once the calls they have are done.
    pub fn stop_io_threads(&self) {
        self.lock_calls().ending = true;
        self.call_ready.notify_all();
    }
}

/// One of a disk's I/O threads: runs the calls the worker hands over, one at a
/// time, until the worker ends.
fn io_thread(slot: &MmioSlot, mem: &GuestMemoryMmap, events: &Inbox) {
    let _serving = crate::logging::ServingDisk::new(&slot.id);
    let mut calls = slot.lock_calls();
    loop {
        if let Some(job) = calls.waiting.pop_front() {
            drop(calls);
            run_job(slot, mem, events, job);
            calls = slot.lock_calls();
        } else if calls.ending {
            return;
        } else {
            calls = slot
                .call_ready
                .wait(calls)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// After the device put entries in the used ring: a used-buffer interrupt, unless
/// the driver asked for none yet (with event indexes, its `used_event`; one the
/// device cannot read gets the interrupt: a missing one would leave the guest
/// waiting).
fn used_interrupt(slot: &MmioSlot, t: &mut BlockTransport, mem: &GuestMemoryMmap) {
    let (_, queues) = t.device_and_queues();
    slot.unsignalled.store(false, Ordering::SeqCst);
    if queues[0].needs_notification(mem).unwrap_or(true) {
        t.interrupt_status()
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        let _ = slot.irq.write(1);
    }
}

/// The guest broke a disk's queue: DEVICE_NEEDS_RESET, a config interrupt, and the
/// owner is told (stderr and QMP). Nothing else stops.
fn queue_broken(
    slot: &MmioSlot,
    t: &mut BlockTransport,
    error: &dyn std::error::Error,
    events: &Inbox,
) {
    t.needs_reset();
    let _ = slot.irq.write(1);
    let _ = events.send(Input::DeviceNeedsReset {
        disk: slot.id.clone(),
        reason: error_chain(error),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_block::{DiskConfig, MemBackend};
    use std::sync::mpsc::channel;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
    use virtio_bindings::virtio_config::*;
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::Bytes;
    use vm_memory::GuestAddress;

    fn slot(id: &str) -> Arc<MmioSlot> {
        let backend: Box<dyn Backend> = Box::new(MemBackend::new(1 << 20));
        let spec = DiskSpec::new(id, backend, DiskConfig::default(), "memory");
        Arc::new(MmioSlot::new(
            spec,
            0,
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ))
    }

    /// How the guest broke its queue.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Broken {
        Not,
        /// The used ring outside guest memory.
        UsedRing,
        /// The available ring outside guest memory.
        AvailRing,
        /// An available head index past the queue's size.
        Head,
    }

    /// A driver's set-up, register by register, with one FLUSH request made
    /// available in the device's queue (its status byte 0xff), broken as `broken` says.
    fn drive(slot: &MmioSlot, mem: &GuestMemoryMmap, at: u64, broken: Broken) {
        drive_flushes(slot, mem, at, broken, 1)
    }

    /// Writes a request at `head` (type `kind`, `sector`, status byte 0xff at
    /// `head + 16`) and appends its descriptor chain to `descs`: the 16-byte header,
    /// the data `runs` (readable; writable for a read), the status byte (writable).
    fn push_chain(
        mem: &GuestMemoryMmap,
        descs: &mut Vec<RawDescriptor>,
        head: u64,
        kind: u32,
        sector: u64,
        runs: &[(u64, u32)],
    ) {
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let data = if kind == VIRTIO_BLK_T_IN {
            next | write
        } else {
            next
        };
        mem.write_obj(kind, GuestAddress(head)).expect("type");
        mem.write_obj(sector, GuestAddress(head + 8))
            .expect("sector");
        mem.write_obj(0xffu8, GuestAddress(head + 16))
            .expect("status");
        let mut index = descs.len() as u16;
        index += 1;
        descs.push(RawDescriptor::from(Descriptor::new(head, 16, next, index)));
        for &(addr, len) in runs {
            index += 1;
            descs.push(RawDescriptor::from(Descriptor::new(addr, len, data, index)));
        }
        descs.push(RawDescriptor::from(Descriptor::new(head + 16, 1, write, 0)));
    }

    /// As [`drive`], with `n` FLUSH requests, the i-th's status byte at
    /// `at + 32 * i + 16`.
    fn drive_flushes(slot: &MmioSlot, mem: &GuestMemoryMmap, at: u64, broken: Broken, n: u16) {
        let vq = MockSplitQueue::new(mem, 16);
        let mut descs = Vec::new();
        for i in 0..n {
            let head = at + 32 * u64::from(i);
            push_chain(mem, &mut descs, head, VIRTIO_BLK_T_FLUSH, 0, &[]);
        }
        vq.add_desc_chains(&descs, 0).expect("chains");
        if broken == Broken::Head {
            vq.avail()
                .ring()
                .ref_at(0)
                .expect("ring")
                .store(200u16.to_le());
        }
        let mut queue = vq.create_queue::<Queue>().expect("queue");
        match broken {
            Broken::UsedRing => queue.set_used_ring_address(Some(0xFFFF_0000), Some(0x10)),
            Broken::AvailRing => queue.set_avail_ring_address(Some(0xFFFF_0000), Some(0x10)),
            Broken::Not | Broken::Head => {}
        }
        set_up(slot, queue, 0);
    }

    /// A driver's set-up ([`MmioSlot::set_up`]): VERSION_1 and the device features
    /// `low` (bits 0 to 31), `queue`, then DRIVER_OK.
    fn set_up(slot: &MmioSlot, queue: Queue, low: u32) {
        assert!(slot.set_up(queue, u64::from(low) | crate::virtio::FEATURE_VERSION_1));
    }

    /// The `n` FLUSHes [`drive_flushes`] made at `at` completed OK.
    fn assert_flushes_ok(mem: &GuestMemoryMmap, at: u64, n: u64, what: &str) {
        for i in 0..n {
            let status: u8 = mem
                .read_obj(GuestAddress(at + 32 * i + 16))
                .expect("status");
            assert_eq!(status, 0, "{what}: FLUSH {i}");
        }
    }

    #[test]
    fn with_event_indexes_the_worker_interrupts_only_where_the_driver_asked() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, _rx) = channel();
        // The driver's used_event (None: no event indexes) and the interrupts its
        // three FLUSHes get: one each; one as the first or the third completes
        // (used index 1 or 3); none for an index they do not reach.
        for (used_event, interrupts) in [(None, 3), (Some(0), 1), (Some(2), 1), (Some(100), 0)] {
            let d = slot("d");
            drive_flushes(&d, &mem, 0x20_0000, Broken::Not, 3);
            let (avail, used) = {
                let mut t = d.transport();
                let q = &mut t.queues_mut()[0];
                q.set_event_idx(used_event.is_some());
                // Apart from the available ring (the mock's used ring overlaps its
                // used_event).
                q.set_used_ring_address(Some(0x1_0000), Some(0));
                (q.avail_ring(), q.used_ring())
            };
            if let Some(e) = used_event {
                mem.write_obj(e, GuestAddress(avail + 4 + 2 * 16))
                    .expect("used_event");
            }
            serve(&d, &mem, &tx);
            assert_flushes_ok(&mem, 0x20_0000, 3, &format!("used_event {used_event:?}"));
            assert_eq!(
                d.irq.read().unwrap_or(0),
                interrupts,
                "used_event {used_event:?}"
            );
            let vring =
                d.transport().interrupt_status().load(Ordering::SeqCst) & VIRTIO_MMIO_INT_VRING;
            assert_eq!(vring != 0, interrupts > 0, "used_event {used_event:?}");
            if used_event.is_some() {
                // Where the driver must notify the worker next: the fourth request.
                let avail_event: u16 = mem
                    .read_obj(GuestAddress(used + 4 + 8 * 16))
                    .expect("avail_event");
                assert_eq!(avail_event, 3);
            }
        }
    }

    #[test]
    fn completions_that_meet_in_the_used_ring_share_one_interrupt() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, _rx) = channel();
        let d = slot("d");
        drive_flushes(&d, &mem, 0x20_0000, Broken::Not, 3);
        // An I/O thread whose host call returned and that is on its way to the
        // used ring: the worker's three completions leave the interrupt to it.
        d.answering.fetch_add(1, Ordering::SeqCst);
        serve(&d, &mem, &tx);
        assert_flushes_ok(&mem, 0x20_0000, 3, "");
        assert_eq!(d.irq.read().unwrap_or(0), 0, "raised before the last left");
        // It arrives with nothing of its own to add (a parked request): still, as the
        // last one out, it raises the interrupt the others left to it, once.
        let parked = || Outcome {
            completion: None,
            error: None,
        };
        answered(&d, &mem, &tx, parked());
        assert_eq!(d.irq.read().unwrap_or(0), 1);
        let vring = d.transport().interrupt_status().load(Ordering::SeqCst) & VIRTIO_MMIO_INT_VRING;
        assert_ne!(vring, 0);
        // Nothing left unsignalled: the next lone answer with nothing to add raises none.
        answer(&d, &mem, &tx, parked());
        assert_eq!(d.irq.read().unwrap_or(0), 0);
    }

    #[test]
    fn a_broken_queue_asks_for_a_reset_and_stops_nothing_else() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, rx) = channel();
        for broken in [Broken::UsedRing, Broken::AvailRing, Broken::Head] {
            let (bad, good) = (slot("bad"), slot("good"));
            drive(&bad, &mem, 0x20_0000, broken);
            serve(&bad, &mem, &tx);
            let t = bad.transport();
            assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "{broken:?}");
            assert_ne!(
                t.interrupt_status().load(Ordering::SeqCst) & VIRTIO_MMIO_INT_CONFIG,
                0
            );
            assert!(!t.live());
            drop(t);
            assert_eq!(bad.irq.read().ok(), Some(1), "the guest is not told");
            match rx.try_recv() {
                Ok(Input::DeviceNeedsReset { disk, reason }) => {
                    assert_eq!(disk, "bad");
                    assert!(!reason.is_empty());
                }
                other => panic!("not a DeviceNeedsReset: {other:?}"),
            }
            // Served again, a device that needs a reset does nothing more.
            serve(&bad, &mem, &tx);
            assert!(rx.try_recv().is_err());
            // Another disk in the same machine completes its I/O.
            drive(&good, &mem, 0x30_0000, Broken::Not);
            serve(&good, &mem, &tx);
            assert!(
                rx.try_recv().is_err(),
                "the healthy disk reported something"
            );
            let status: u8 = mem.read_obj(GuestAddress(0x30_0000 + 16)).expect("status");
            assert_eq!(status, 0, "the healthy disk's FLUSH did not complete S_OK");
            assert_eq!(good.irq.read().ok(), Some(1));
        }
    }

    #[test]
    fn the_driver_resets_a_device_that_needed_it() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, _rx) = channel();
        let bad = slot("bad");
        drive(&bad, &mem, 0x20_0000, Broken::UsedRing);
        serve(&bad, &mem, &tx);
        let mut t = bad.transport();
        // The driver may write the status back without the device's bit.
        let s = t.status() & !VIRTIO_CONFIG_S_NEEDS_RESET;
        t.write(u64::from(VIRTIO_MMIO_STATUS), &s.to_le_bytes());
        assert_ne!(
            t.status() & VIRTIO_CONFIG_S_NEEDS_RESET,
            0,
            "only a reset clears it"
        );
        t.write(u64::from(VIRTIO_MMIO_STATUS), &0u32.to_le_bytes());
        assert_eq!(t.status(), 0);
    }

    /// A driver's set-up with FLUSH negotiated (write-back) and `n` reads of 4 KiB
    /// made available, the i-th of sector `8 * i` into `at + 0x2000 * i + 0x1000`,
    /// its status byte at `at + 0x2000 * i + 16`.
    fn drive_reads(slot: &MmioSlot, mem: &GuestMemoryMmap, at: u64, n: u16) {
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_IN};
        let vq = MockSplitQueue::new(mem, 16);
        let mut descs = Vec::new();
        for i in 0..n {
            let head = at + 0x2000 * u64::from(i);
            let runs = [(head + 0x1000, 4096)];
            push_chain(
                mem,
                &mut descs,
                head,
                VIRTIO_BLK_T_IN,
                8 * u64::from(i),
                &runs,
            );
        }
        vq.add_desc_chains(&descs, 0).expect("chains");
        let queue = vq.create_queue::<Queue>().expect("queue");
        set_up(slot, queue, 1 << VIRTIO_BLK_F_FLUSH);
    }

    #[test]
    fn a_disk_serves_requests_beside_one_that_hangs() {
        use holdfast_block::{FaultOp, FaultRule};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, _rx) = channel();
        let (slot, faults) = faulty_slot("data");
        faults.arm(
            FaultRule::hang(FaultOp::Read)
                .in_range(0, 4096)
                .named("stall"),
        );
        drive_reads(&slot, &mem, 0x20_0000, 4);
        let status = |i: u64| -> u8 {
            mem.read_obj(GuestAddress(0x20_0000 + 0x2000 * i + 16))
                .expect("status")
        };
        serve(&slot, &mem, &tx);
        let until = Instant::now() + Duration::from_secs(5);
        while (1..4).any(|i| status(i) != 0) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        for i in 1..4 {
            assert_eq!(status(i), 0, "read {i} completed beside the hung one");
        }
        assert_eq!(status(0), 0xff, "the hung read has not completed");
        assert_eq!(faults.hanging(), 1);
        let call = slot.call().expect("the hung read shows");
        assert_eq!(call.call.op, holdfast_block::HostOp::Read);
        faults.clear_named("stall");
        let until = Instant::now() + Duration::from_secs(5);
        while status(0) != 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(status(0), 0, "it completes when the storage comes back");
        assert_eq!(lock_disk(&slot.disk).in_flight(), 0);
    }

    /// Two writes made available: 128 KiB at sector 0 in two 64 KiB descriptors of
    /// bytes 7 (taken as a [`GuestWrite`]), then 4 KiB of bytes 8 at 512 KiB
    /// (copied at once). Their status bytes are at `at + 16` and `at + 0x40 + 16`.
    fn drive_writes(slot: &MmioSlot, mem: &GuestMemoryMmap, at: u64) {
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_OUT};
        let vq = MockSplitQueue::new(mem, 16);
        let data = at + 0x1_0000;
        let mut descs = Vec::new();
        let chain =
            |head: u64, sector: u64, runs: &[(u64, u32)], descs: &mut Vec<RawDescriptor>| {
                push_chain(mem, descs, head, VIRTIO_BLK_T_OUT, sector, runs)
            };
        mem.write_slice(&[7u8; 128 << 10], GuestAddress(data))
            .expect("long write's bytes");
        mem.write_slice(&[8u8; 4096], GuestAddress(data + (128 << 10)))
            .expect("short write's bytes");
        chain(
            at,
            0,
            &[(data, 64 << 10), (data + (64 << 10), 64 << 10)],
            &mut descs,
        );
        chain(at + 0x40, 1024, &[(data + (128 << 10), 4096)], &mut descs);
        vq.add_desc_chains(&descs, 0).expect("chains");
        let queue = vq.create_queue::<Queue>().expect("queue");
        set_up(slot, queue, 1 << VIRTIO_BLK_F_FLUSH);
    }

    #[test]
    fn a_long_write_goes_to_the_host_from_guest_memory_and_its_copy_is_replayed() {
        use holdfast_block::{FaultOp, FaultRule, Request, RequestOp};
        let stable = MemBackend::new(1 << 20);
        let injector = holdfast_block::FaultInjector::new(stable.clone());
        let faults = injector.handle();
        let spec = DiskSpec::new("data", Box::new(injector), DiskConfig::default(), "memory");
        let slot = Arc::new(MmioSlot::new(
            spec,
            0,
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, _rx) = channel();
        faults.arm(
            FaultRule::hang(FaultOp::Write)
                .in_range(0, 4096)
                .named("stall"),
        );
        let at = 0x20_0000;
        drive_writes(&slot, &mem, at);
        let status = |head: u64| -> u8 { mem.read_obj(GuestAddress(head + 16)).expect("status") };
        serve(&slot, &mem, &tx);
        let until = Instant::now() + Duration::from_secs(5);
        while status(at + 0x40) != 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            status(at + 0x40),
            0,
            "the short write completed beside the long one"
        );
        assert_eq!(status(at), 0xff, "the long write's host call hangs");
        assert_eq!(
            slot.call().expect("it shows").call.op,
            holdfast_block::HostOp::Write
        );
        faults.clear_named("stall");
        let until = Instant::now() + Duration::from_secs(5);
        while status(at) != 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(status(at), 0, "it completes when the storage comes back");
        assert!(stable.contents()[..128 << 10].iter().all(|&b| b == 7));
        let mut disk = lock_disk(&slot.disk);
        assert_eq!(disk.status().buffer.bytes, (128 << 10) + 4096);
        // The guest reuses its memory; the host loses the write (a failed flush);
        // the replay writes the copy the buffer kept.
        mem.write_slice(&[0u8; 128 << 10], GuestAddress(at + 0x1_0000))
            .expect("reuse");
        faults.arm(
            FaultRule::new(FaultOp::Flush, libc::EIO, holdfast_block::Trigger::Always)
                .named("outage"),
        );
        assert!(disk.submit(Request::new(100, RequestOp::Flush)).is_parked());
        holdfast_block::SharedIo::write_at(&stable, &[0u8; 128 << 10], 0).expect("lost");
        faults.clear_named("outage");
        disk.replay().expect("replay");
        assert!(stable.contents()[..128 << 10].iter().all(|&b| b == 7));
    }

    /// A request of [`a_full_queue_of_writes_with_flushes_ahead_completes_every_request_ok`]:
    /// its header's address, sector, data runs (none: a FLUSH) and the byte it writes.
    struct Written {
        head: u64,
        sector: u64,
        runs: Vec<(u64, u32)>,
        byte: u8,
    }

    /// A queue full of writes beside each other, short ones (copied) and long ones
    /// (from guest memory), with guest FLUSHes among them, under a bound so small
    /// that the disk flushes ahead and makes room all the time: every request
    /// completes OK and every write's bytes reach the host. Many rounds, to meet
    /// the threads' interleavings (a two-CPU test host once saw a guest's fio lose
    /// two jobs' results; this is the device's side of that).
    #[test]
    fn a_full_queue_of_writes_with_flushes_ahead_completes_every_request_ok() {
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_OUT};
        const SHORT: u64 = 70;
        const LONG: u64 = 5;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("memory");
        let (tx, _rx) = channel();
        let at = 0x20_0000;
        for round in 0..40u64 {
            let stable = MemBackend::new(4 << 20);
            let config = DiskConfig {
                unflushed_limit: 256 << 10,
                ..DiskConfig::default()
            };
            let spec = DiskSpec::new("d", Box::new(stable.clone()), config, "memory");
            let d = Arc::new(MmioSlot::new(
                spec,
                0,
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            ));
            let mut requests: Vec<Written> = Vec::new();
            let mut head = at;
            for i in 0..SHORT + LONG + 2 {
                let (sector, runs, byte) = if i == SHORT / 2 || i == SHORT + LONG + 1 {
                    (0, Vec::new(), 0)
                } else if i < SHORT + 1 {
                    let byte = (i + round) as u8 | 1;
                    let data = at + 0x1_0000 + i * 4096;
                    mem.write_slice(&[byte; 4096], GuestAddress(data))
                        .expect("bytes");
                    (i * 16, vec![(data, 4096)], byte)
                } else {
                    let j = i - SHORT - 1;
                    let byte = (j + round) as u8 | 0x80;
                    let data = at + 0x10_0000 + j * (128 << 10);
                    mem.write_slice(&[byte; 128 << 10], GuestAddress(data))
                        .expect("bytes");
                    let runs = vec![(data, 64 << 10), (data + (64 << 10), 64 << 10)];
                    (2048 + j * 512, runs, byte)
                };
                requests.push(Written {
                    head,
                    sector,
                    runs,
                    byte,
                });
                head += 0x40;
            }
            let mut descs = Vec::new();
            for Written {
                head, sector, runs, ..
            } in &requests
            {
                let kind = if runs.is_empty() {
                    VIRTIO_BLK_T_FLUSH
                } else {
                    VIRTIO_BLK_T_OUT
                };
                push_chain(&mem, &mut descs, *head, kind, *sector, runs);
            }
            let vq = MockSplitQueue::new(&mem, 256);
            vq.add_desc_chains(&descs, 0).expect("chains");
            set_up(
                &d,
                vq.create_queue::<Queue>().expect("queue"),
                1 << VIRTIO_BLK_F_FLUSH,
            );
            serve(&d, &mem, &tx);
            let status =
                |head: u64| -> u8 { mem.read_obj(GuestAddress(head + 16)).expect("status") };
            let until = Instant::now() + Duration::from_secs(10);
            while requests.iter().any(|r| status(r.head) == 0xff) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            let contents = stable.contents();
            for (
                i,
                Written {
                    head,
                    sector,
                    runs,
                    byte,
                },
            ) in requests.iter().enumerate()
            {
                assert_eq!(status(*head), 0, "round {round}: request {i}'s status");
                let len: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
                let start = (sector * 512) as usize;
                assert!(
                    contents[start..start + len as usize]
                        .iter()
                        .all(|b| b == byte),
                    "round {round}: request {i}'s bytes on the host"
                );
            }
            let flushes = lock_disk(&d.disk).status().internal_flushes;
            assert!(
                flushes > 0,
                "round {round}: the disk never flushed on its own"
            );
            d.stop_io_threads();
        }
    }

    /// A slot whose disk has a fault point, as `holdfast run` makes them.
    fn faulty_slot(id: &str) -> (Arc<MmioSlot>, FaultHandle) {
        let injector = holdfast_block::FaultInjector::new(MemBackend::new(1 << 20));
        let faults = injector.handle();
        let mut spec = DiskSpec::new(id, Box::new(injector), DiskConfig::default(), "memory");
        spec.faults = Some(faults.clone());
        let slot = MmioSlot::new(
            spec,
            0,
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        );
        (Arc::new(slot), faults)
    }

    /// Runs `f` in a thread and says whether it returned within `within`.
    fn returns_within(within: Duration, f: impl FnOnce() + Send + 'static) -> bool {
        let (done, finished) = channel();
        std::thread::spawn(move || {
            f();
            let _ = done.send(());
        });
        finished.recv_timeout(within).is_ok()
    }

    #[test]
    fn a_hung_flush_holds_its_disk_only() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, rx) = channel();
        let (hung, faults) = faulty_slot("hung");
        let (other, _) = faulty_slot("other");
        faults.arm(holdfast_block::FaultRule::hang(holdfast_block::FaultOp::Flush).named("stall"));
        drive(&hung, &mem, 0x20_0000, Broken::Not);
        let worker = {
            let (slot, mem, tx) = (Arc::clone(&hung), mem.clone(), tx.clone());
            std::thread::spawn(move || serve(&slot, &mem, &tx))
        };
        while faults.hanging() == 0 {
            std::thread::yield_now();
        }
        // A vCPU reads the hung disk's registers.
        let bus = Arc::new(MmioBus {
            slots: vec![Arc::clone(&hung)],
        });
        let reader = Arc::clone(&bus);
        assert!(
            returns_within(Duration::from_secs(2), move || {
                let mut magic = [0u8; 4];
                reader.read(0, &mut magic);
                assert_eq!(&magic, b"virt");
            }),
            "a register read waited on the hung disk"
        );
        // Another disk serves its queue.
        drive(&other, &mem, 0x30_0000, Broken::Not);
        let (slot, m, t) = (Arc::clone(&other), mem.clone(), tx.clone());
        assert!(
            returns_within(Duration::from_secs(2), move || serve(&slot, &m, &t)),
            "the other disk waited on the hung one"
        );
        let status: u8 = mem.read_obj(GuestAddress(0x30_0000 + 16)).expect("status");
        assert_eq!(status, 0, "the other disk's FLUSH completed S_OK");
        // The owner's view: at once, naming the call; what needs the disk refuses.
        let started = Instant::now();
        let info = hung.info();
        assert!(started.elapsed() < Duration::from_millis(500));
        let call = info.outstanding.expect("the flush is outstanding");
        assert_eq!(call.op, holdfast_block::HostOp::Flush);
        assert_eq!(hung.call().expect("a call").disk, "hung");
        match hung.resume(&mem, &tx) {
            Err(ResumeFailure::Busy { disk, call }) => {
                assert_eq!(disk, "hung");
                assert!(call.contains("host flush has been outstanding"), "{call}");
            }
            other => panic!("not refused as busy: {other:?}"),
        }
        assert!(matches!(
            hung.change(|d| d.detach()),
            Err(AttachFailure::Busy { .. })
        ));
        let dropped = hung.settle(HUNG_AFTER, false).expect("cannot settle");
        assert!(
            dropped.why.contains("cannot be cancelled"),
            "{}",
            dropped.why
        );
        // The storage answers again: the flush completes, the disk is free.
        faults.clear_named("stall");
        worker.join().expect("worker");
        let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
        assert_eq!(status, 0, "the hung FLUSH completed S_OK after all");
        assert!(hung.call().is_none());
        assert!(hung.settle(HUNG_AFTER, false).is_none());
        assert!(rx.try_recv().is_err(), "nothing failed");
    }

    #[test]
    fn a_reset_during_a_hang_drops_the_parked_requests_later() {
        let (hung, faults) = faulty_slot("hung");
        let disk = Arc::clone(&hung.disk);
        faults.arm(holdfast_block::FaultRule::hang(holdfast_block::FaultOp::Flush).named("stall"));
        // The disk is busy (its worker holds it in a host call).
        let holder = std::thread::spawn(move || {
            let mut d = lock_disk(&disk);
            let _ = d.backend_mut().flush();
        });
        while faults.hanging() == 0 {
            std::thread::yield_now();
        }
        let slot = Arc::clone(&hung);
        assert!(
            returns_within(Duration::from_secs(2), move || {
                slot.transport().device_mut().reset();
            }),
            "a vCPU's reset waited on the hung disk"
        );
        assert_ne!(
            hung.transport().device_mut().take_pending(),
            Default::default(),
            "the reset waits for the disk"
        );
        faults.clear_named("stall");
        holder.join().expect("holder");
    }

    /// The guest's FLUSH at 0x20_0000 fails on the host (its status byte preset to
    /// 0xff by [`drive`], not one the device writes): the disk stops, the FLUSH is parked, the owner is
    /// told; then the storage comes back.
    fn stopped_on_a_failed_flush(
        slot: &Arc<MmioSlot>,
        faults: &holdfast_block::FaultHandle,
        mem: &GuestMemoryMmap,
        tx: &Inbox,
        rx: &std::sync::mpsc::Receiver<Input>,
    ) {
        use holdfast_block::{FaultOp, FaultRule, Trigger};
        faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always).named("outage"));
        drive(slot, mem, 0x20_0000, Broken::Not);
        serve(slot, mem, tx);
        assert!(matches!(rx.try_recv(), Ok(Input::DiskError { .. })));
        faults.clear_named("outage");
    }

    /// As [`stopped_on_a_failed_flush`] with 4 KiB in the buffer (the replay writes
    /// before it flushes); then a `cont` whose replay's write hangs is refused: the
    /// replay goes on, held in that write ("stall-write") until the caller clears it.
    fn replay_left_running_on_a_hung_write(
        slot: &Arc<MmioSlot>,
        faults: &holdfast_block::FaultHandle,
        mem: &GuestMemoryMmap,
        tx: &Inbox,
        rx: &std::sync::mpsc::Receiver<Input>,
    ) {
        use holdfast_block::{FaultOp, FaultRule, Request, RequestOp};
        let write = RequestOp::Write {
            offset: 0,
            data: vec![7u8; 4096].as_slice().into(),
        };
        lock_disk(&slot.disk).submit(Request::new(1 << 40, write));
        stopped_on_a_failed_flush(slot, faults, mem, tx, rx);
        faults.arm(FaultRule::hang(FaultOp::Write).named("stall-write"));
        assert!(matches!(
            slot.resume(mem, tx),
            Err(ResumeFailure::Busy { .. })
        ));
    }

    #[test]
    fn a_replay_that_hangs_does_not_hold_the_owner() {
        use holdfast_block::{FaultOp, FaultRule};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, rx) = channel();
        let (slot, faults) = faulty_slot("data");
        stopped_on_a_failed_flush(&slot, &faults, &mem, &tx, &rx);
        // The storage comes back, then hangs during the replay's flush.
        faults.arm(FaultRule::hang(FaultOp::Flush).named("stall"));
        let started = Instant::now();
        match slot.resume(&mem, &tx) {
            Err(ResumeFailure::Busy { disk, call }) => {
                assert_eq!(disk, "data");
                assert!(
                    call.contains("replay is under way") && call.contains("flush"),
                    "{call}"
                );
            }
            other => panic!("not busy: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
        assert_eq!(status, 0xff, "the parked FLUSH is not completed yet");
        // Still hanging: the next cont is refused at once.
        assert!(matches!(
            slot.resume(&mem, &tx),
            Err(ResumeFailure::Busy { .. })
        ));
        faults.clear_named("stall");
        while slot.call().is_some() || matches!(*slot.lock_replay(), Replay::Running) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let replayed = slot.resume(&mem, &tx).expect("resumed").expect("replayed");
        assert_eq!(replayed.disk, "data");
        let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
        assert_eq!(status, 0, "the parked FLUSH completed S_OK");
    }

    /// A `cont` refused while the replay hung leaves the replay running; the next
    /// `cont` comes while the replay's last call is still young, waits for the
    /// disk, and the replay finishes meanwhile: its outcome is that `cont`'s, and
    /// the parked FLUSH completes. (It once stayed unanswered: the disk ran again,
    /// the outcome lay unread, and the guest waited on its fdatasync for ever.)
    #[test]
    fn a_cont_that_waits_while_a_replay_finishes_completes_the_parked_flush() {
        use holdfast_block::{FaultOp, FaultRule, HostOp};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, rx) = channel();
        let (slot, faults) = faulty_slot("data");
        replay_left_running_on_a_hung_write(&slot, &faults, &mem, &tx, &rx);
        // The write returns; the replay's flush is slow (it hangs until released).
        faults.arm(FaultRule::hang(FaultOp::Flush).named("stall-flush"));
        faults.clear_named("stall-write");
        while slot.call().is_none_or(|c| c.call.op != HostOp::Flush) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The next cont, while that flush is young: it waits for the disk.
        let cont = {
            let (slot, mem, tx) = (Arc::clone(&slot), mem.clone(), tx.clone());
            std::thread::spawn(move || slot.resume(&mem, &tx))
        };
        std::thread::sleep(Duration::from_millis(100));
        faults.clear_named("stall-flush");
        let replayed = cont.join().expect("cont").expect("resumed");
        assert!(
            replayed.is_some(),
            "the cont did not take the replay's outcome"
        );
        let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
        assert_eq!(status, 0, "the parked FLUSH completed S_OK");
        assert!(!lock_disk(&slot.disk).is_stopped());
    }

    /// A replay left running by a refused `cont` that then fails: the next `cont`
    /// is refused with its error (the FLUSH stays parked), the one after replays
    /// again and resumes (docs/durability.md, "A replay that meets a new hang").
    #[test]
    fn a_left_running_replay_that_fails_refuses_the_next_cont_and_the_one_after_replays() {
        use holdfast_block::{FaultOp, FaultRule, Trigger};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, rx) = channel();
        let (slot, faults) = faulty_slot("data");
        replay_left_running_on_a_hung_write(&slot, &faults, &mem, &tx, &rx);
        // The write returns; the replay's flush fails.
        faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always).named("again"));
        faults.clear_named("stall-write");
        while slot.call().is_some() || matches!(*slot.lock_replay(), Replay::Running) {
            std::thread::sleep(Duration::from_millis(5));
        }
        match slot.resume(&mem, &tx) {
            Err(ResumeFailure::Replay { disk, error }) => {
                assert_eq!((disk.as_str(), error.errno), ("data", libc::EIO));
            }
            other => panic!("not the replay's failure: {other:?}"),
        }
        let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
        assert_eq!(status, 0xff, "the parked FLUSH waits");
        faults.clear_named("again");
        let replayed = slot.resume(&mem, &tx).expect("resumed").expect("replayed");
        assert_eq!(replayed.bytes_rewritten, 4096);
        let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
        assert_eq!(status, 0, "the parked FLUSH completed S_OK");
    }

    #[test]
    fn a_stopped_disk_takes_no_more_requests_from_its_queue() {
        use holdfast_block::{FaultOp, FaultRule, Trigger};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, rx) = channel();
        let (slot, faults) = faulty_slot("data");
        faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always).named("outage"));
        drive_flushes(&slot, &mem, 0x20_0000, Broken::Not, 3);
        serve(&slot, &mem, &tx);
        assert!(matches!(rx.try_recv(), Ok(Input::DiskError { .. })));
        // The first is parked; the others stay in the available ring, untaken.
        assert_eq!(lock_disk(&slot.disk).status().parked, 1);
        serve(&slot, &mem, &tx);
        assert_eq!(
            lock_disk(&slot.disk).status().parked,
            1,
            "taken while stopped"
        );
        for i in 0..3 {
            let status: u8 = mem
                .read_obj(GuestAddress(0x20_0000 + 32 * i + 16))
                .expect("status");
            assert_eq!(status, 0xff, "request {i} completed while stopped");
        }
        faults.clear_named("outage");
        assert!(slot.resume(&mem, &tx).expect("resumed").is_some());
        serve(&slot, &mem, &tx);
        for i in 0..3 {
            let status: u8 = mem
                .read_obj(GuestAddress(0x20_0000 + 32 * i + 16))
                .expect("status");
            assert_eq!(status, 0, "request {i} completed S_OK after cont");
        }
    }

    /// A driver's set-up (write-back) with one request per `(kind, sector, bytes)`,
    /// the i-th's header at `at + 0x1_0000 * i`, its data at `+ 0x1000` (bytes
    /// `i + 1`), its status byte at `+ 16` (preset to 0xff).
    fn drive_requests(
        slot: &MmioSlot,
        mem: &GuestMemoryMmap,
        at: u64,
        requests: &[(u32, u64, u32)],
    ) {
        use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
        let vq = MockSplitQueue::new(mem, 16);
        let mut descs = Vec::new();
        for (i, &(kind, sector, bytes)) in requests.iter().enumerate() {
            let head = at + 0x1_0000 * i as u64;
            let runs: &[(u64, u32)] = if bytes == 0 {
                &[]
            } else {
                &[(head + 0x1000, bytes)]
            };
            mem.write_slice(
                &vec![i as u8 + 1; bytes as usize],
                GuestAddress(head + 0x1000),
            )
            .expect("data");
            push_chain(mem, &mut descs, head, kind, sector, runs);
        }
        vq.add_desc_chains(&descs, 0).expect("chains");
        set_up(
            slot,
            vq.create_queue::<Queue>().expect("queue"),
            1 << VIRTIO_BLK_F_FLUSH,
        );
    }

    /// The status byte of [`drive_requests`]'s `i`-th request.
    fn request_status(mem: &GuestMemoryMmap, at: u64, i: u64) -> u8 {
        mem.read_obj(GuestAddress(at + 0x1_0000 * i + 16))
            .expect("status")
    }

    /// `cont`s until one is not refused as busy (at most 5 s).
    fn cont_until_not_busy(
        slot: &Arc<MmioSlot>,
        mem: &GuestMemoryMmap,
        tx: &Inbox,
    ) -> Result<Option<Replayed>, ResumeFailure> {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            match slot.resume(mem, tx) {
                Err(ResumeFailure::Busy { .. }) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => return other,
            }
        }
    }

    /// Waits until a host call of the disk's has been outstanding for [`HUNG_AFTER`].
    fn until_a_call_hangs(slot: &MmioSlot) {
        let until = Instant::now() + Duration::from_secs(10);
        while slot.call().is_none_or(|c| c.call.age() < HUNG_AFTER) {
            assert!(Instant::now() < until, "no call hangs");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the disk's host calls all returned.
    fn until_no_call(slot: &MmioSlot) {
        let until = Instant::now() + Duration::from_secs(5);
        while slot.call().is_some() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(slot.call().is_none(), "a host call still outstanding");
    }

    /// A read hangs; a write beside it fails (the disk stops, the write is parked).
    /// Two `cont`s are refused while the read hangs; once it returned, one replay
    /// runs and the `cont` after it answers the parked write. (On 2026-12-06's
    /// main the first `cont` started a replay that waited for the read, the second
    /// a second replay that, once the first had answered the write, replayed the
    /// running disk and kept its empty outcome over the first's: the third `cont`
    /// took that, and the write was never answered.)
    #[test]
    fn a_cont_while_a_call_hangs_starts_no_second_replay() {
        use holdfast_block::{FaultOp, FaultRule, Trigger};
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, rx) = channel();
        let (slot, faults) = faulty_slot("data");
        faults.arm(FaultRule::hang(FaultOp::Read).named("stall-read"));
        faults.arm(
            FaultRule::new(FaultOp::Write, libc::EIO, Trigger::Once)
                .in_range(64 << 10, 4096)
                .named("outage"),
        );
        let at = 0x10_0000;
        drive_requests(
            &slot,
            &mem,
            at,
            &[(VIRTIO_BLK_T_IN, 0, 4096), (VIRTIO_BLK_T_OUT, 128, 4096)],
        );
        serve(&slot, &mem, &tx);
        let until = Instant::now() + Duration::from_secs(5);
        while !lock_disk(&slot.disk).is_stopped() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(matches!(rx.try_recv(), Ok(Input::DiskError { .. })));
        until_a_call_hangs(&slot);
        for cont in 1..=2 {
            match slot.resume(&mem, &tx) {
                Err(ResumeFailure::Busy { call, .. }) => {
                    assert!(call.contains("read"), "cont {cont}: {call}")
                }
                other => panic!("cont {cont} while the read hangs: {other:?}"),
            }
        }
        faults.clear_named("stall-read");
        until_no_call(&slot);
        let replayed = cont_until_not_busy(&slot, &mem, &tx)
            .expect("resumed")
            .expect("replayed");
        assert_eq!(
            replayed.bytes_rewritten, 4096,
            "the failed write, rewritten"
        );
        assert_eq!(request_status(&mem, at, 0), 0, "the read");
        assert_eq!(request_status(&mem, at, 1), 0, "the parked write, answered");
        assert!(!lock_disk(&slot.disk).is_stopped());
    }

    /// A disk over an image file (it can let go of it), with a fault point.
    fn file_slot(id: &str) -> (Arc<MmioSlot>, FaultHandle, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("image");
        let file = holdfast_block::FileBackend::open(&path, Default::default()).expect("open");
        let injector = holdfast_block::FaultInjector::new(file);
        let faults = injector.handle();
        let mut spec = DiskSpec::new(id, Box::new(injector), DiskConfig::default(), "disk.img");
        spec.faults = Some(faults.clone());
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        (
            Arc::new(MmioSlot::new(spec, 0, eventfd(), eventfd())),
            faults,
            dir,
        )
    }

    /// A replay left running by a refused `cont` succeeds; then the disk is detached
    /// and attached: the next `cont` replays again (the image may have lost what no
    /// flush covered), and the disk runs. (On 2026-12-06's main that `cont` took
    /// the earlier outcome, resumed without a replay, and the disk stayed stopped.)
    #[test]
    fn a_detach_after_a_replay_ended_makes_the_next_cont_replay_again() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, rx) = channel();
        let (slot, faults, _dir) = file_slot("data");
        replay_left_running_on_a_hung_write(&slot, &faults, &mem, &tx, &rx);
        faults.clear_named("stall-write");
        until_no_call(&slot);
        std::thread::sleep(Duration::from_millis(50));
        slot.change(|d| d.detach()).expect("detach");
        slot.change(|d| d.attach(None)).expect("attach");
        assert!(
            lock_disk(&slot.disk).is_stopped(),
            "detached, the disk stopped"
        );
        let replayed = cont_until_not_busy(&slot, &mem, &tx)
            .expect("resumed")
            .expect("replayed again");
        assert_eq!(
            replayed.bytes_rewritten, 0,
            "a second replay (the first's flush had released the buffer), not the first's outcome"
        );
        assert!(!lock_disk(&slot.disk).is_stopped(), "the disk runs");
        let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
        assert_eq!(status, 0, "the parked FLUSH answered, once");
    }

    /// `cont` is refused while a read, a write or the disk's own flush ahead of its
    /// bound is outstanding and hangs, though none of them holds the disk's lock:
    /// the guest must not run beside a call that may still change what it reads.
    /// (On 2026-12-06's main it resumed.)
    #[test]
    fn cont_is_refused_while_a_call_beside_others_hangs() {
        use holdfast_block::{FaultOp, FaultRule};
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, _rx) = channel();
        for (op, kind) in [
            (FaultOp::Read, VIRTIO_BLK_T_IN),
            (FaultOp::Write, VIRTIO_BLK_T_OUT),
        ] {
            let (slot, faults) = faulty_slot("data");
            faults.arm(FaultRule::hang(op).named("stall"));
            let at = 0x10_0000;
            drive_requests(&slot, &mem, at, &[(kind, 0, 4096)]);
            serve(&slot, &mem, &tx);
            until_a_call_hangs(&slot);
            match slot.resume(&mem, &tx) {
                Err(ResumeFailure::Busy { disk, call }) => {
                    assert_eq!(disk, "data");
                    assert!(call.contains("outstanding"), "{op:?}: {call}");
                }
                other => panic!("cont while a {op:?} hangs: {other:?}"),
            }
            faults.clear_named("stall");
            until_no_call(&slot);
            assert!(cont_until_not_busy(&slot, &mem, &tx).is_ok());
            assert_eq!(request_status(&mem, at, 0), 0, "{op:?} answered");
            slot.stop_io_threads();
        }
        // The disk's own flush ahead of its bound: a bound of 6 KiB; 4 KiB written,
        // read back (alone, once the write ended), then a write elsewhere, taken with
        // the buffer past half its bound.
        let injector = holdfast_block::FaultInjector::new(MemBackend::new(1 << 20));
        let faults = injector.handle();
        let config = DiskConfig {
            unflushed_limit: 6144,
            ..DiskConfig::default()
        };
        let spec = DiskSpec::new("data", Box::new(injector), config, "memory");
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let slot = Arc::new(MmioSlot::new(spec, 0, eventfd(), eventfd()));
        faults.arm(FaultRule::hang(FaultOp::Flush).named("stall"));
        let at = 0x10_0000;
        let requests = [
            (VIRTIO_BLK_T_OUT, 0, 4096),
            (VIRTIO_BLK_T_IN, 0, 512),
            (VIRTIO_BLK_T_OUT, 128, 512),
        ];
        drive_requests(&slot, &mem, at, &requests);
        serve(&slot, &mem, &tx);
        until_a_call_hangs(&slot);
        assert_eq!(
            slot.call().expect("a call").call.op,
            holdfast_block::HostOp::Flush
        );
        assert!(matches!(
            slot.resume(&mem, &tx),
            Err(ResumeFailure::Busy { .. })
        ));
        faults.clear_named("stall");
        until_no_call(&slot);
        assert!(cont_until_not_busy(&slot, &mem, &tx).is_ok());
        slot.stop_io_threads();
    }

    /// Settling at the end (`quit`, SIGTERM) waits for a disk that is busy but not
    /// hung (a long replay): it reports nothing dropped, and then nothing is.
    /// (On 2026-12-06's main it gave up after a second and reported the buffer
    /// dropped, "a host write outstanding for 0.0 s", then exited 0 after all.)
    #[test]
    fn settling_at_the_end_waits_for_a_disk_that_is_busy_not_hung() {
        let (slot, _) = faulty_slot("data");
        let write = holdfast_block::RequestOp::Write {
            offset: 0,
            data: vec![7u8; 4096].as_slice().into(),
        };
        lock_disk(&slot.disk).submit(holdfast_block::Request::new(1, write));
        // Something holds the disk for 1.5 s, with no call outstanding long.
        let disk = Arc::clone(&slot.disk);
        let (held, holding) = channel();
        let holder = std::thread::spawn(move || {
            let _d = lock_disk(&disk);
            let _ = held.send(());
            std::thread::sleep(Duration::from_millis(1500));
        });
        holding.recv().expect("held");
        let dropped = slot.settle_at_the_end();
        assert!(dropped.is_none(), "{dropped:?}");
        assert_eq!(lock_disk(&slot.disk).status().buffer.bytes, 0, "flushed");
        holder.join().expect("holder");
    }

    /// A long write runs its host call from guest memory. The driver resets the
    /// device while that call is held up, and reuses the memory: the host must end
    /// up with what the buffer keeps (the bytes as they were when the write was
    /// taken), not the new ones, or reads would change once a flush releases the
    /// buffer. (On 2026-12-06's main the host kept the new bytes.)
    #[test]
    fn a_reset_during_a_long_write_leaves_the_host_as_the_buffer() {
        use holdfast_block::{FaultOp, FaultRule, Request, RequestOp};
        let stable = MemBackend::new(1 << 20);
        let injector = holdfast_block::FaultInjector::new(stable.clone());
        let faults = injector.handle();
        let spec = DiskSpec::new("data", Box::new(injector), DiskConfig::default(), "memory");
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let slot = Arc::new(MmioSlot::new(spec, 0, eventfd(), eventfd()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, _rx) = channel();
        faults.arm(
            FaultRule::hang(FaultOp::Write)
                .in_range(0, 4096)
                .named("stall"),
        );
        let at = 0x20_0000;
        drive_writes(&slot, &mem, at);
        serve(&slot, &mem, &tx);
        while faults.hanging() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The copy for the buffer is made as the write is taken.
        std::thread::sleep(Duration::from_millis(50));
        slot.transport().device_mut().reset();
        mem.write_slice(&[9u8; 128 << 10], GuestAddress(at + 0x1_0000))
            .expect("the driver reuses the memory");
        faults.clear_named("stall");
        assert!(slot.wait_quiet(Duration::from_secs(5)));
        let read = lock_disk(&slot.disk).submit(Request::new(
            1 << 40,
            RequestOp::Read {
                offset: 0,
                len: 128 << 10,
            },
        ));
        let buffered = read.completion.expect("read").data;
        assert!(
            buffered.iter().all(|&b| b == 7),
            "the buffer keeps the bytes as taken"
        );
        assert!(
            stable.contents()[..128 << 10].iter().all(|&b| b == 7),
            "the host holds what the buffer holds"
        );
        slot.stop_io_threads();
    }
}
