//! The virtio-blk disks on the MMIO bus: each one's slot (its virtio-mmio transport
//! over the block device over the disk engine, its queue notifier and interrupt),
//! the bus the vCPUs reach them through, and the device thread that serves their
//! queues and tells the run-state owner about host errors.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use holdfast_block::{AttachmentError, Backend, Disk, FaultHandle};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::owner::{
    AttachFailure, DiskInfo, Dropped, FaultPoints, Inbox, Input, Replayed, ResumeFailure,
    SimulatedHost,
};
use crate::virtio::block::BlockDevice;
use crate::virtio::mmio::{Action, MmioTransport, MMIO_SIZE};
use crate::vm::{error_chain, DiskSpec};

type BlockTransport = MmioTransport<BlockDevice<Box<dyn Backend>>>;

/// A virtio-mmio device slot: its transport, queue notifier and interrupt.
pub(crate) struct MmioSlot {
    pub(crate) id: String,
    path: String,
    direct: bool,
    faults: Option<FaultHandle>,
    simulated: Option<SimulatedHost>,
    pub(crate) base: u64,
    transport: Mutex<BlockTransport>,
    /// The guest's queue notifications (an ioeventfd).
    pub(crate) notify: EventFd,
    /// The device's interrupt (an irqfd).
    pub(crate) irq: EventFd,
}

impl MmioSlot {
    /// A slot at `base` for the disk `spec` describes.
    pub(crate) fn new(spec: DiskSpec, base: u64, notify: EventFd, irq: EventFd) -> MmioSlot {
        MmioSlot {
            id: spec.id,
            path: spec.path,
            direct: spec.direct,
            faults: spec.faults,
            simulated: spec.simulated,
            base,
            transport: Mutex::new(MmioTransport::new(BlockDevice::new(spec.disk))),
            notify,
            irq,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BlockTransport> {
        self.transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn is_detached(&self) -> bool {
        self.lock().device().disk().is_detached()
    }

    /// Resumes the disk (replays it if it was stopped) and lets it serve what the
    /// guest queued meanwhile. `Some` if it was replayed.
    pub(crate) fn resume(
        &self,
        mem: &GuestMemoryMmap,
        events: &Inbox,
    ) -> Result<Option<Replayed>, ResumeFailure> {
        let mut t = self.lock();
        let was_stopped = t.device().disk().is_stopped();
        let (device, queues) = t.device_and_queues();
        let started = std::time::Instant::now();
        let resumed = device
            .resume(mem, &mut queues[0])
            .map_err(|r| ResumeFailure::Replay {
                disk: self.id.clone(),
                error: r.error,
            })?;
        if resumed.used > 0 {
            t.interrupt_status()
                .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
            let _ = self.irq.write(1);
        }
        // The bytes are on the host; only the guest's queue cannot take the
        // completions. That is the device's problem, not the VM's.
        if let Some(e) = &resumed.broken_queue {
            queue_broken(self, &mut t, e, events);
        }
        // Requests the guest queued while the disk was stopped.
        let _ = self.notify.write(1);
        Ok(was_stopped.then(|| Replayed {
            disk: self.id.clone(),
            bytes_rewritten: resumed.bytes_rewritten,
            duration: started.elapsed(),
        }))
    }

    pub(crate) fn info(&self) -> DiskInfo {
        let t = self.lock();
        let disk = t.device().disk();
        DiskInfo {
            id: self.id.clone(),
            // Where the disk is attached now (x-block-attach may move it).
            path: disk
                .backend()
                .image()
                .map_or_else(|| self.path.clone(), |p| p.display().to_string()),
            direct: self.direct,
            read_only: disk.config().read_only,
            writeback: disk.config().writeback,
            status: disk.status(),
        }
    }

    /// Never takes the transport's lock.
    pub(crate) fn fault_points(&self) -> FaultPoints {
        FaultPoints {
            calls: self.faults.clone(),
            simulated: self.simulated.clone(),
        }
    }

    /// Runs `change` on the disk, naming the disk in its error.
    pub(crate) fn change(
        &self,
        change: impl FnOnce(&mut Disk<Box<dyn Backend>>) -> Result<(), AttachmentError>,
    ) -> Result<(), AttachFailure> {
        change(self.lock().device_mut().disk_mut()).map_err(|error| AttachFailure::Disk {
            disk: self.id.clone(),
            error,
        })
    }

    /// Makes the disk's buffered bytes stable now; what it could not, if anything.
    pub(crate) fn settle(&self) -> Option<Dropped> {
        let mut t = self.lock();
        let disk = t.device_mut().disk_mut();
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
    fn slot(&self, addr: u64) -> Option<(&Arc<MmioSlot>, u64)> {
        self.slots
            .iter()
            .find(|s| (s.base..s.base + MMIO_SIZE).contains(&addr))
            .map(|s| (s, addr - s.base))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.slot(addr) {
            Some((slot, offset)) => slot.lock().read(offset, data),
            None => data.fill(0),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        let Some((slot, offset)) = self.slot(addr) else {
            return;
        };
        let action = slot.lock().write(offset, data);
        match action {
            // Serve what the driver queued before DRIVER_OK; later kicks come by ioeventfd.
            Action::Activate | Action::Notify(_) => {
                let _ = slot.notify.write(1);
            }
            Action::Reset => {
                slot.lock().device_mut().reset();
            }
            Action::None => {}
        }
    }
}

/// The device thread's name (a panic there is the device's failure).
pub const DEVICE_THREAD: &str = "devices";

/// The device thread: waits on every queue's ioeventfd and serves the queues, off
/// the vCPU threads.
pub(crate) fn spawn_device_thread(
    mem: GuestMemoryMmap,
    slots: Vec<Arc<MmioSlot>>,
    stop: Arc<EventFd>,
    events: Inbox,
) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    for (i, slot) in slots.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            slot.notify.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, u64::MAX),
    )?;
    std::thread::Builder::new()
        .name(DEVICE_THREAD.into())
        .spawn(move || {
            let mut ready = vec![EpollEvent::default(); slots.len() + 1];
            loop {
                let n = match epoll.wait(-1, &mut ready) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                for ev in &ready[..n] {
                    let i = ev.data();
                    if i == u64::MAX {
                        return;
                    }
                    let Some(slot) = slots.get(i as usize) else {
                        continue;
                    };
                    let _ = slot.notify.read();
                    serve(slot, &mem, &events);
                }
            }
        })
}

/// Serves one disk's queue (device thread): completions raise a used-buffer
/// interrupt, a host error goes to the run-state owner, a broken queue makes the
/// device ask for a reset.
fn serve(slot: &MmioSlot, mem: &GuestMemoryMmap, events: &Inbox) {
    let _serving = crate::logging::ServingDisk::new(&slot.id);
    let mut t = slot.lock();
    if !t.live() {
        return;
    }
    let interrupts = t.interrupt_status();
    let (device, queues) = t.device_and_queues();
    match device.process_queue(mem, &mut queues[0]) {
        Ok(run) => {
            if run.used > 0 {
                interrupts.fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
                let _ = slot.irq.write(1);
            }
            if let Some(report) = run.error {
                let _ = events.send(Input::DiskError {
                    disk: slot.id.clone(),
                    report,
                    at: run.error_at.unwrap_or_else(std::time::Instant::now),
                });
            }
        }
        Err(e) => queue_broken(slot, &mut t, &e, events),
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

    fn slot(id: &str) -> MmioSlot {
        let backend: Box<dyn Backend> = Box::new(MemBackend::new(1 << 20));
        let device = BlockDevice::new(Disk::new(backend, DiskConfig::default()));
        MmioSlot {
            id: id.into(),
            path: "memory".into(),
            direct: false,
            faults: None,
            simulated: None,
            base: 0,
            transport: Mutex::new(MmioTransport::new(device)),
            notify: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            irq: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }
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
    /// available in the device's queue, broken as `broken` says.
    fn drive(slot: &MmioSlot, mem: &GuestMemoryMmap, at: u64, broken: Broken) {
        let vq = MockSplitQueue::new(mem, 16);
        mem.write_obj(VIRTIO_BLK_T_FLUSH, GuestAddress(at))
            .expect("header");
        let descs = [
            RawDescriptor::from(Descriptor::new(at, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(Descriptor::new(at + 16, 1, VRING_DESC_F_WRITE as u16, 0)),
        ];
        vq.add_desc_chains(&descs, 0).expect("chain");
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
        let mut t = slot.lock();
        let w = |t: &mut BlockTransport, reg: u32, v: u32| {
            t.write(u64::from(reg), &v.to_le_bytes());
        };
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w(&mut t, VIRTIO_MMIO_STATUS, s);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
        w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        t.queues_mut()[0] = queue;
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert!(t.live());
    }

    #[test]
    fn a_broken_queue_asks_for_a_reset_and_stops_nothing_else() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (tx, rx) = channel();
        for broken in [Broken::UsedRing, Broken::AvailRing, Broken::Head] {
            let (bad, good) = (slot("bad"), slot("good"));
            drive(&bad, &mem, 0x20_0000, broken);
            serve(&bad, &mem, &tx);
            let t = bad.lock();
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
        let mut t = bad.lock();
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
}
