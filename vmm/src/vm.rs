//! The machine: KVM VM, guest memory, vCPUs and devices, and the [`Lifecycle`] the
//! run-state owner drives it through. Its run states, and the order of a pause and
//! a resume (vCPUs, then the clock; every stopped disk replayed, then the clock,
//! then the vCPUs), are the owner's diagram ([`crate::owner`]); the vCPU threads and
//! the disks send the owner `Input`s and never change the state themselves.

use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::legacy::PortBus;
use crate::devices::mmio::MmioBus;
use crate::disk::{
    spawn_worker, AttachFailure, DiskCall, DiskEvents, DiskInfo, DiskSpec, Dropped, FaultPoints,
    Replayed, ResumeFailure, Slot, HUNG_AFTER,
};
pub use crate::error_chain;
use crate::layout::*;
use crate::owner::inbox::disk_events;
use crate::owner::{Inbox, Lifecycle, SavedClock};
use crate::vcpu::{self, Control, Want};
use crate::virtio::mmio::MMIO_SIZE;

/// What the machine is made of.
pub struct VmConfig {
    pub kernel: std::path::PathBuf,
    pub initrd: Option<std::path::PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub mem: u64,
    pub disks: Vec<DiskSpec>,
    pub serial: Box<dyn Write + Send>,
    /// `--name`: what `query-name` answers.
    pub name: Option<String>,
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

/// How long holdfast's exit waits for disks whose host calls hang.
pub const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

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

/// The running machine.
pub struct Vm {
    vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<(Arc<Control>, JoinHandle<()>)>,
    slots: Vec<Arc<Slot>>,
    /// Where the disks' events go (the owner's inbox).
    events: DiskEvents,
    /// Each disk's I/O worker.
    workers: Vec<JoinHandle<()>>,
    workers_stop: Arc<EventFd>,
    /// What the owner's settling reported dropped (`X_UNFLUSHED_DROPPED`).
    reported_dropped: Vec<Dropped>,
    /// Disks a refused `cont` replayed before another disk refused: the next `cont`
    /// that resumes reports them.
    replayed_before_a_refusal: Vec<Replayed>,
    name: Option<String>,
    /// The Generic Event Device's interrupt: the power button (`system_powerdown`).
    power_button: EventFd,
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
    /// Builds the machine and starts its vCPUs; they and the disks send the run-state
    /// owner's inputs to `inbox`.
    pub fn start(config: VmConfig, inbox: Inbox) -> Result<Vm, Error> {
        let name = config.name.clone();
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

        // Memory a flush frees is kept for the next writes, up to every disk's bound.
        holdfast_block::bytes::keep_freed(
            config
                .disks
                .iter()
                .map(|d| d.engine.config().unflushed_limit as usize)
                .sum(),
        );
        let events = disk_events(&inbox);
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
            slots.push(Arc::new(Slot::new(spec, base, notify, irq)));
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

        let power_button = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Plumbing)?;
        vm.register_irqfd(&power_button, GED_IRQ)
            .map_err(|e| Error::Create("KVM_IRQFD", e))?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Plumbing)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| Error::Create("KVM_IRQFD", e))?;
        let ports = Arc::new(PortBus::new(serial_irq, config.serial));
        let mmio = Arc::new(MmioBus::new(slots.clone()));

        let workers_stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Plumbing)?);
        let mut workers = Vec::new();
        for slot in &slots {
            let worker = spawn_worker(
                mem.clone(),
                Arc::clone(slot),
                Arc::clone(&workers_stop),
                events.clone(),
            );
            workers.push(worker.map_err(Error::Plumbing)?);
        }

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
                inbox.clone(),
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
            workers,
            workers_stop,
            reported_dropped: Vec::new(),
            replayed_before_a_refusal: Vec::new(),
            name,
            power_button,
        })
    }

    /// The VM's clock (what kvmclock shows the guest), in nanoseconds.
    pub fn clock_ns(&self) -> Option<u64> {
        self.vm.get_clock().ok().map(|c| c.clock)
    }

    /// What the owner reported dropped when it settled the disks at the end
    /// (`X_UNFLUSHED_DROPPED`): holdfast exits 6 then, even if a hung call returned
    /// later and [`Vm::shutdown`] could write them after all.
    pub fn reported_dropped(&self) -> &[Dropped] {
        &self.reported_dropped
    }

    /// Guest memory (the host's view of it).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Stops everything and makes every disk's buffered bytes stable. Returns, per
    /// disk that could not be flushed, its name and how many bytes are dropped. A
    /// disk whose host call hangs is waited for [`SHUTDOWN_WAIT`] at most, then
    /// reported (a call stuck in the kernel cannot be cancelled) and left.
    pub fn shutdown(mut self) -> Vec<Dropped> {
        for (control, handle) in &self.vcpus {
            control.set(Want::Exit);
            // SAFETY: as in `pause`.
            unsafe { libc::pthread_kill(handle.as_pthread_t(), vcpu::kick_signal()) };
        }
        for (_, handle) in self.vcpus.drain(..) {
            let _ = handle.join();
        }
        let _ = self.workers_stop.write(1);
        let until = std::time::Instant::now() + SHUTDOWN_WAIT;
        for worker in self.workers.drain(..) {
            while !worker.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if worker.is_finished() {
                let _ = worker.join();
            }
            // Else it is in a host call that hangs: left to end with the process.
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        self.slots
            .iter()
            .filter_map(|s| s.settle(left.max(HUNG_AFTER), true))
            .collect()
    }
}

impl Lifecycle for Vm {
    fn pause(&mut self) -> SavedClock {
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

    fn resume(&mut self, clock: SavedClock) -> Result<Vec<Replayed>, ResumeFailure> {
        // A detached disk, or one with a host call or a replay that hangs, refuses
        // before anything is replayed, so nothing changes.
        for slot in &self.slots {
            slot.ready()?;
        }
        let mut replayed = std::mem::take(&mut self.replayed_before_a_refusal);
        for slot in &self.slots {
            match slot.resume(&self.mem, &self.events) {
                Ok(r) => replayed.extend(r),
                Err(e) => {
                    self.replayed_before_a_refusal = replayed;
                    return Err(e);
                }
            }
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

    fn settle(&mut self) -> Vec<Dropped> {
        // As long as the disks' host calls return (a long replay too); a call that
        // hangs is reported, not waited for.
        let dropped: Vec<Dropped> = self
            .slots
            .iter()
            .filter_map(|s| s.settle_at_the_end())
            .collect();
        self.reported_dropped.extend(dropped.iter().cloned());
        dropped
    }

    fn disks(&self) -> Vec<DiskInfo> {
        self.slots.iter().map(|s| s.info()).collect()
    }

    fn name(&self) -> Option<String> {
        self.name.clone()
    }

    fn cpu_threads(&self) -> Vec<i32> {
        self.vcpus.iter().map(|(c, _)| c.thread_id()).collect()
    }

    fn press_power_button(&mut self) -> Result<(), String> {
        self.power_button
            .write(1)
            .map_err(|e| format!("cannot raise the power button's interrupt: {e}"))
    }

    fn calls(&self) -> Vec<DiskCall> {
        self.slots.iter().filter_map(|s| s.call()).collect()
    }

    fn fault_points(&self, disk: &str) -> Option<FaultPoints> {
        self.slot(disk).ok().map(|s| s.fault_points())
    }

    fn detach(&mut self, disk: &str) -> Result<(), AttachFailure> {
        self.slot(disk)?.change(|d| d.detach())
    }

    fn attach(&mut self, disk: &str, path: Option<&std::path::Path>) -> Result<(), AttachFailure> {
        self.slot(disk)?.change(|d| d.attach(path))
    }
}

impl Vm {
    fn slot(&self, id: &str) -> Result<&Arc<Slot>, AttachFailure> {
        self.slots
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| AttachFailure::NoSuchDisk(id.to_owned()))
    }
}
