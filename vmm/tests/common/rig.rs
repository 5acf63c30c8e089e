#![allow(dead_code)]
//! A disk as `holdfast run` makes one, served by its worker and I/O threads
//! (`holdfast_vmm::disk::serve`), for tests that drive its virtqueue from
//! test memory; what it tells the run-state owner arrives on `events`.

use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use holdfast_block::{Backend, DiskConfig, DiskStatus, FaultHandle, FaultInjector, IoErrorReport};
use holdfast_vmm::disk::{serve, DiskEvent, DiskEvents, DiskSpec, Replayed, ResumeFailure, Slot};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub struct Rig {
    pub slot: Arc<Slot>,
    tx: DiskEvents,
    pub events: Receiver<DiskEvent>,
}

/// What serving the queue once did.
pub struct Run {
    /// The host errors the owner heard of.
    pub errors: Vec<IoErrorReport>,
}

impl Rig {
    /// A disk `data` over `backend`, with a fault point in front of it.
    pub fn new(backend: Box<dyn Backend>, config: DiskConfig) -> (Rig, FaultHandle) {
        Rig::logged(backend, config, None)
    }

    /// As [`Rig::new`], the disk logging what it completes to `log` (`write-log=`).
    pub fn logged(
        backend: Box<dyn Backend>,
        config: DiskConfig,
        log: Option<holdfast_block::WriteLog>,
    ) -> (Rig, FaultHandle) {
        let injector = FaultInjector::new(backend);
        let faults = injector.handle();
        let mut spec = DiskSpec::new("data", Box::new(injector), config, "test");
        spec.faults = Some(faults.clone());
        spec.write_log = log;
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let slot = Arc::new(Slot::new(spec, 0, eventfd(), eventfd()));
        let (tx, events) = channel();
        let tx = DiskEvents::from(tx);
        (Rig { slot, tx, events }, faults)
    }

    /// The driver sets the device up with `queue`, negotiating every feature
    /// offered but those in `without`.
    pub fn start(&self, queue: Queue, without: u64) {
        assert!(self.slot.set_up(queue, !without), "the device went live");
    }

    /// The driver resets the device (status 0).
    pub fn reset(&self) {
        use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;
        self.slot
            .write_register(u64::from(VIRTIO_MMIO_STATUS), &0u32.to_le_bytes());
    }

    /// The worker serves the queue, and its I/O threads finish what it handed them.
    pub fn serve(&self, mem: &GuestMemoryMmap<()>) -> Run {
        serve(&self.slot, mem, &self.tx);
        assert!(
            self.slot.wait_quiet(Duration::from_secs(60)),
            "the disk went quiet"
        );
        let errors = self
            .events
            .try_iter()
            .filter_map(|i| match i {
                DiskEvent::Error { report, .. } => Some(report),
                _ => None,
            })
            .collect();
        Run { errors }
    }

    /// `cont` for this disk.
    pub fn resume(&self, mem: &GuestMemoryMmap<()>) -> Result<Option<Replayed>, ResumeFailure> {
        let r = self.slot.resume(mem, &self.tx);
        assert!(
            self.slot.wait_quiet(Duration::from_secs(60)),
            "the disk went quiet"
        );
        r
    }

    pub fn status(&self) -> DiskStatus {
        self.slot.info().status
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.slot.stop_io_threads();
    }
}
