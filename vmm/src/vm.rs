//! The machine: KVM VM, guest memory, vCPUs, devices, and the run-state owner.
//!
//! One thread owns the run state ([`Vm::run`]); vCPU threads and the device thread
//! send it [`VmEvent`]s over a channel and never change the state themselves.
//!
//! Ordering contract (written here, relied on by pause-on-error and `cont`):
//! - pause: vCPUs first (each kicked out of `KVM_RUN` and parked), then devices;
//!   the guest clock is saved so it does not jump over the pause;
//! - resume: devices first (a stopped disk is replayed before anything else), then
//!   the clock is restored, then vCPUs.
//!
//! ```text
//!   running --STOP/disk error--> paused --cont (devices, then vCPUs)--> running
//!      |                            |
//!      +--poweroff/reboot/panic-----+--> shutdown (disks settled, threads joined)
//! ```

use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use holdfast_block::{
    AttachmentError, Backend, Disk, DiskStatus, FaultHandle, HostError, IoErrorReport,
};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::legacy::PortBus;
use crate::layout::*;
use crate::vcpu::{self, Control, Want};
use crate::virtio::block::BlockDevice;
use crate::virtio::mmio::{Action, MmioTransport, MMIO_SIZE};

/// What the machine is made of.
pub struct VmConfig {
    pub kernel: std::path::PathBuf,
    pub initrd: Option<std::path::PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub mem: u64,
    pub disks: Vec<DiskSpec>,
    pub serial: Box<dyn Write + Send>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("cpus", &self.cpus)
            .field("mem", &self.mem)
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
}

/// One disk: its name, its engine and where it lives.
pub struct DiskSpec {
    pub id: String,
    pub disk: Disk<Box<dyn Backend>>,
    /// The image, for `query-block`.
    pub path: String,
    pub direct: bool,
    /// The fault-injection point in front of the image (`x-block-fault`).
    pub faults: Option<FaultHandle>,
    /// (`x-host=simulated:MODEL`) the simulated page cache between the engine and
    /// the image.
    pub simulated: Option<SimulatedHost>,
}

/// A disk's simulated host page cache (`holdfast lab`): where `x-block-fault` breaks
/// its write-back to the image, and how it drops its clean pages.
#[derive(Clone)]
pub struct SimulatedHost {
    pub model: holdfast_block::sim::HostModel,
    pub writeback: FaultHandle,
    pub evict: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for SimulatedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimulatedHost({})", self.model)
    }
}

impl std::fmt::Debug for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskSpec({})", self.id)
    }
}

/// Sent to the run-state owner.
#[derive(Debug)]
pub enum VmEvent {
    Poweroff,
    Reboot,
    GuestPanic,
    EmulationFailure {
        cpu: u8,
    },
    VcpuFailed {
        cpu: u8,
        message: String,
    },
    /// A disk's queue is broken (the guest's doing): the device set
    /// DEVICE_NEEDS_RESET and serves nothing until the driver resets it. The VM and
    /// the other disks go on.
    DeviceNeedsReset {
        disk: String,
        reason: String,
    },
    /// A disk hit a host error (under `stop` it is now stopped).
    DiskError {
        disk: String,
        report: IoErrorReport,
        /// When the failing host call returned.
        at: std::time::Instant,
    },
    /// A holdfast thread panicked (its name, the message): end as `quit` does.
    ThreadPanicked {
        thread: String,
        message: String,
    },
    /// SIGTERM, SIGINT or SIGHUP reached holdfast: end as `quit` does.
    HostSignal {
        signal: i32,
    },
    /// A QMP command for the run-state owner, with where to send its answer.
    Qmp {
        command: String,
        args: holdfast_qmp::Args,
        reply: Sender<Result<serde_json::Value, holdfast_qmp::QmpError>>,
    },
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
}

/// A disk that `resume` replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub disk: String,
    pub bytes_rewritten: u64,
    /// How long the replay (rewrite, flush, parked requests) took.
    pub duration: std::time::Duration,
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("cannot create the VM: {0}")]
    Create(&'static str, #[source] kvm_ioctls::Error),
    #[error("--mem: cannot allocate {0} bytes of guest memory on this host")]
    Memory(u64),
    #[error(transparent)]
    Boot(#[from] crate::boot::Error),
    #[error(transparent)]
    Acpi(#[from] crate::acpi::Error),
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::Error),
    #[error("cannot set up device plumbing (eventfd, irqfd, ioeventfd, threads)")]
    Plumbing(#[source] std::io::Error),
}

type BlockTransport = MmioTransport<BlockDevice<Box<dyn Backend>>>;

/// A virtio-mmio device slot: its transport, queue notifier and interrupt.
struct MmioSlot {
    id: String,
    path: String,
    direct: bool,
    faults: Option<FaultHandle>,
    simulated: Option<SimulatedHost>,
    base: u64,
    transport: Mutex<BlockTransport>,
    notify: EventFd,
    irq: EventFd,
}

impl MmioSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, BlockTransport> {
        self.transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// MMIO accesses from vCPUs, by address.
pub struct MmioBus {
    slots: Vec<Arc<MmioSlot>>,
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

/// The running machine.
pub struct Vm {
    vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<(Arc<Control>, JoinHandle<()>)>,
    slots: Vec<Arc<MmioSlot>>,
    events: Receiver<VmEvent>,
    events_tx: Sender<VmEvent>,
    device_thread: Option<JoinHandle<()>>,
    device_stop: Arc<EventFd>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Vm({} vCPUs, {} disks)",
            self.vcpus.len(),
            self.slots.len()
        )
    }
}

impl Vm {
    /// Builds the machine and starts its vCPUs.
    pub fn start(config: VmConfig) -> Result<Vm, Error> {
        let kvm = Kvm::new().map_err(Error::Kvm)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::Create("KVM_CREATE_VM", e))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(|e| Error::Create("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| Error::Create("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| Error::Create("KVM_CREATE_PIT2", e))?;

        let mut ranges = vec![(GuestAddress(0), config.mem.min(LOWMEM_END) as usize)];
        if config.mem > LOWMEM_END {
            ranges.push((
                GuestAddress(HIGHMEM_START),
                (config.mem - LOWMEM_END) as usize,
            ));
        }
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|_| Error::Memory(config.mem))?;
        for (slot, (start, len)) in ranges.iter().enumerate() {
            let host = vm_memory::GuestMemoryBackend::get_host_address(&mem, *start)
                .map_err(|_| Error::Memory(config.mem))?;
            let r = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: start.0,
                memory_size: *len as u64,
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM's
            // use of it (the vCPUs are joined before `mem` is dropped).
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|e| Error::Create("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        let (events_tx, events) = channel();
        let mut slots = Vec::new();
        let mut acpi_devices = Vec::new();
        for (i, spec) in config.disks.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_SIZE;
            let gsi = VIRTIO_IRQ_BASE + i as u32;
            let plumbing = Error::Plumbing;
            let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(plumbing)?;
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Plumbing)?;
            vm.register_irqfd(&irq, gsi)
                .map_err(|e| Error::Create("KVM_IRQFD", e))?;
            vm.register_ioevent(&notify, &IoEventAddress::Mmio(base + 0x50), NoDatamatch)
                .map_err(|e| Error::Create("KVM_IOEVENTFD", e))?;
            let transport = MmioTransport::new(BlockDevice::new(spec.disk));
            slots.push(Arc::new(MmioSlot {
                id: spec.id,
                path: spec.path,
                direct: spec.direct,
                faults: spec.faults,
                simulated: spec.simulated,
                base,
                transport: Mutex::new(transport),
                notify,
                irq,
            }));
            acpi_devices.push(crate::acpi::MmioDevice {
                base,
                size: MMIO_SIZE,
                irq: gsi,
            });
        }

        let entry = crate::boot::load(
            &mem,
            config.mem,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
        )?;
        crate::acpi::write(&mem, config.cpus, &acpi_devices)?;

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Plumbing)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| Error::Create("KVM_IRQFD", e))?;
        let ports = Arc::new(PortBus::new(serial_irq, config.serial));
        let mmio = Arc::new(MmioBus {
            slots: slots.clone(),
        });

        let device_stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Plumbing)?);
        let device_thread = spawn_device_thread(
            mem.clone(),
            slots.clone(),
            Arc::clone(&device_stop),
            events_tx.clone(),
        )
        .map_err(Error::Plumbing)?;

        vcpu::install_kick_handler().map_err(Error::Plumbing)?;
        let mut vcpus = Vec::new();
        for cpu in 0..config.cpus {
            let fd = vm
                .create_vcpu(u64::from(cpu))
                .map_err(|e| Error::Create("KVM_CREATE_VCPU", e))?;
            vcpu::configure(&kvm, &fd, cpu, config.cpus)?;
            if cpu == 0 {
                let mut sregs = fd
                    .get_sregs()
                    .map_err(|e| Error::Create("KVM_GET_SREGS", e))?;
                crate::boot::boot_sregs(&mem, &mut sregs)?;
                fd.set_sregs(&sregs)
                    .map_err(|e| Error::Create("KVM_SET_SREGS", e))?;
                fd.set_regs(&crate::boot::boot_regs(entry))
                    .map_err(|e| Error::Create("KVM_SET_REGS", e))?;
            }
            let control = Control::new();
            let (c, p, m, e) = (
                Arc::clone(&control),
                Arc::clone(&ports),
                Arc::clone(&mmio),
                events_tx.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{cpu}"))
                .spawn(move || vcpu::run(cpu, fd, c, p, m, e))
                .map_err(Error::Plumbing)?;
            vcpus.push((control, handle));
        }
        Ok(Vm {
            vm,
            mem,
            vcpus,
            slots,
            events,
            events_tx,
            device_thread: Some(device_thread),
            device_stop,
        })
    }

    /// Pauses every vCPU (kicked out of KVM_RUN, parked), then saves the guest
    /// clock. Devices keep their state; a stopped disk stays stopped.
    pub fn pause(&mut self) -> Option<kvm_bindings::kvm_clock_data> {
        for (control, handle) in &self.vcpus {
            control.set(Want::Pause);
            // SAFETY: the thread is alive (joined only in `shutdown`); a signal with
            // a registered handler interrupts its KVM_RUN.
            unsafe { libc::pthread_kill(handle.as_pthread_t(), vcpu::kick_signal()) };
        }
        for (control, _) in &self.vcpus {
            control.wait_parked();
        }
        self.vm.get_clock().ok()
    }

    /// Resumes: devices first (every stopped disk replayed; on failure nothing
    /// runs and the error names the disk), then the clock, then the vCPUs. Returns
    /// the disks that were replayed.
    pub fn resume(
        &mut self,
        clock: Option<kvm_bindings::kvm_clock_data>,
    ) -> Result<Vec<Replayed>, ResumeFailure> {
        // A detached disk refuses before anything is replayed, so nothing changes.
        if let Some(slot) = self
            .slots
            .iter()
            .find(|s| s.lock().device().disk().is_detached())
        {
            return Err(ResumeFailure::Detached {
                disk: slot.id.clone(),
            });
        }
        let mut replayed = Vec::new();
        for slot in &self.slots {
            let mut t = slot.lock();
            let was_stopped = t.device().disk().is_stopped();
            let (device, queues) = t.device_and_queues();
            let started = std::time::Instant::now();
            let resumed =
                device
                    .resume(&self.mem, &mut queues[0])
                    .map_err(|r| ResumeFailure::Replay {
                        disk: slot.id.clone(),
                        error: r.error,
                    })?;
            if resumed.used > 0 {
                t.interrupt_status()
                    .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
                let _ = slot.irq.write(1);
            }
            // The bytes are on the host; only the guest's queue cannot take the
            // completions. That is the device's problem, not the VM's.
            if let Some(e) = &resumed.broken_queue {
                queue_broken(slot, &mut t, e, &self.events_tx);
            }
            if was_stopped {
                replayed.push(Replayed {
                    disk: slot.id.clone(),
                    bytes_rewritten: resumed.bytes_rewritten,
                    duration: started.elapsed(),
                });
            }
            // Requests the guest queued while the disk was stopped.
            let _ = slot.notify.write(1);
        }
        if let Some(mut clock) = clock {
            clock.flags = 0;
            let _ = self.vm.set_clock(&clock);
        }
        for (control, _) in &self.vcpus {
            control.set(Want::Run);
        }
        Ok(replayed)
    }

    /// A sender for events to the run-state owner (the QMP bridge uses it).
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    /// Every disk, for `query-block` and `x-query-unflushed`.
    pub fn disks(&self) -> Vec<DiskInfo> {
        self.slots
            .iter()
            .map(|slot| {
                let t = slot.lock();
                let disk = t.device().disk();
                DiskInfo {
                    id: slot.id.clone(),
                    // Where the disk is attached now (x-block-attach may move it).
                    path: disk
                        .backend()
                        .image()
                        .map_or_else(|| slot.path.clone(), |p| p.display().to_string()),
                    direct: slot.direct,
                    read_only: disk.config().read_only,
                    writeback: disk.config().writeback,
                    status: disk.status(),
                }
            })
            .collect()
    }

    /// Runs `change` on the disk named `id`, naming the disk in its error.
    fn change_disk(
        &self,
        id: &str,
        change: impl FnOnce(&mut Disk<Box<dyn Backend>>) -> Result<(), AttachmentError>,
    ) -> Result<(), AttachFailure> {
        let slot = self
            .slots
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| AttachFailure::NoSuchDisk(id.to_owned()))?;
        change(slot.lock().device_mut().disk_mut()).map_err(|error| AttachFailure::Disk {
            disk: id.to_owned(),
            error,
        })
    }

    /// Lets a disk go of its image (every descriptor closed), keeping its buffer and
    /// parked requests; the disk is stopped until attached and replayed. The owner
    /// calls this only while the vCPUs are paused.
    pub fn detach_disk(&self, id: &str) -> Result<(), AttachFailure> {
        self.change_disk(id, |disk| disk.detach())
    }

    /// Opens a detached disk's image again (`path`, or the one it had) with its
    /// original options. On refusal nothing changed. The next `cont` replays it.
    pub fn attach_disk(
        &self,
        id: &str,
        path: Option<&std::path::Path>,
    ) -> Result<(), AttachFailure> {
        self.change_disk(id, |disk| disk.attach(path))
    }

    /// The simulated host of a disk: `None` if there is no such disk, `Some(None)`
    /// if it has none.
    pub fn disk_simulated(&self, id: &str) -> Option<Option<SimulatedHost>> {
        self.slots
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.simulated.clone())
    }

    /// The fault-injection handle of a disk, if it has one.
    pub fn disk_faults(&self, id: &str) -> Option<Option<FaultHandle>> {
        self.slots
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.faults.clone())
    }

    /// Makes every disk's buffered bytes stable now (vCPUs must be paused).
    /// Returns, per disk that could not be flushed, its name, the bytes dropped
    /// and why.
    pub fn settle_disks(&self) -> Vec<(String, u64, String)> {
        let mut dropped = Vec::new();
        for slot in &self.slots {
            let mut t = slot.lock();
            let disk = t.device_mut().disk_mut();
            if let Err(e) = disk.settle() {
                let why = if disk.is_detached() {
                    "the disk is detached from its image".to_owned()
                } else {
                    e.error.to_string()
                };
                dropped.push((slot.id.clone(), e.unflushed_bytes, why));
            }
        }
        dropped
    }

    /// The VM's clock (what kvmclock shows the guest), in nanoseconds.
    pub fn clock_ns(&self) -> Option<u64> {
        self.vm.get_clock().ok().map(|c| c.clock)
    }

    /// Guest memory (the host's view of it).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Waits for the next event from the vCPUs or the devices.
    pub fn next_event(&self) -> Option<VmEvent> {
        self.events.recv().ok()
    }

    /// Stops everything and makes every disk's buffered bytes stable. Returns, per
    /// disk that could not be flushed, its name and how many bytes are dropped.
    pub fn shutdown(mut self) -> Vec<(String, u64, String)> {
        for (control, handle) in &self.vcpus {
            control.set(Want::Exit);
            // SAFETY: as in `pause`.
            unsafe { libc::pthread_kill(handle.as_pthread_t(), vcpu::kick_signal()) };
        }
        for (_, handle) in self.vcpus.drain(..) {
            let _ = handle.join();
        }
        let _ = self.device_stop.write(1);
        if let Some(t) = self.device_thread.take() {
            let _ = t.join();
        }
        self.settle_disks()
    }
}

/// An error and its causes, `: `-separated, for one-line messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// The device thread: waits on every queue's ioeventfd and serves the queues, off
/// the vCPU threads.
fn spawn_device_thread(
    mem: GuestMemoryMmap,
    slots: Vec<Arc<MmioSlot>>,
    stop: Arc<EventFd>,
    events: Sender<VmEvent>,
) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    for (i, slot) in slots.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            slot.notify.as_raw_fd_(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd_(),
        EpollEvent::new(EventSet::IN, u64::MAX),
    )?;
    std::thread::Builder::new()
        .name("devices".into())
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
fn serve(slot: &MmioSlot, mem: &GuestMemoryMmap, events: &Sender<VmEvent>) {
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
                let _ = events.send(VmEvent::DiskError {
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
    events: &Sender<VmEvent>,
) {
    t.needs_reset();
    let _ = slot.irq.write(1);
    let _ = events.send(VmEvent::DeviceNeedsReset {
        disk: slot.id.clone(),
        reason: error_chain(error),
    });
}

trait RawFdExt {
    fn as_raw_fd_(&self) -> i32;
}

impl RawFdExt for EventFd {
    fn as_raw_fd_(&self) -> i32 {
        std::os::unix::io::AsRawFd::as_raw_fd(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_block::{DiskConfig, MemBackend};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
    use virtio_bindings::virtio_config::*;
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::Bytes;

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
                Ok(VmEvent::DeviceNeedsReset { disk, reason }) => {
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
