//! vCPUs: set-up for a stock Linux kernel, and the run loop.
//!
//! ```text
//!            pause()                       resume()
//!   Running --------> (kicked out of KVM_RUN) Paused --------> Running
//!      |                                        |
//!      +---------------- exit() ----------------+--> Exited
//! ```
//!
//! A vCPU is kicked out of `KVM_RUN` with a signal whose handler sets the thread's
//! `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost.

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_run, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use crate::devices::legacy::{PortBus, Request};
use crate::devices::mmio::MmioBus;
use crate::owner::Input;

/// The signal that kicks vCPUs out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set before the
            // thread first enters KVM_RUN and valid for the thread's life; one byte
            // written from the same thread that reads it.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(std::io::Error::other)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot set up vCPU {cpu}: {what}")]
    Setup {
        cpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// CPUID, MSRs, FPU and LAPIC as a stock kernel expects them at reset.
pub fn configure(kvm: &Kvm, vcpu: &VcpuFd, cpu: u8, cpus: u8) -> Result<(), Error> {
    let err = |what| move |source| Error::Setup { cpu, what, source };
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            // Initial APIC ID and logical processor count.
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(cpus) << 16) | (u32::from(cpu) << 24);
                e.edx |= 1 << 28; // HTT: the count in EBX is valid
                                  // "Running under a hypervisor": without it the guest ignores the KVM
                                  // leaves (no kvmclock) and calibrates its TSC against the PIT.
                e.ecx |= 1 << 31;
            }
            // x2APIC ID.
            0xb | 0x1f => e.edx = u32::from(cpu),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(err("CPUID"))?;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1), // fast strings
        // MTRRs on, default type write-back: otherwise memory is uncached and slow.
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Setup {
        cpu,
        what: "MSRs",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    vcpu.set_msrs(&msrs).map_err(err("MSRs"))?;
    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })
    .map_err(err("FPU"))?;
    // LINT0 delivers ExtINT (the PIC), LINT1 NMI, as a BIOS leaves them.
    let mut lapic = vcpu.get_lapic().map_err(err("LAPIC"))?;
    let set = |regs: &mut [i8], offset: usize, mode: u32| {
        let old = u32::from_le_bytes([
            regs[offset] as u8,
            regs[offset + 1] as u8,
            regs[offset + 2] as u8,
            regs[offset + 3] as u8,
        ]);
        let new = (old & !0x700) | (mode << 8);
        for (i, b) in new.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as i8;
        }
    };
    set(&mut lapic.regs, 0x350, 7);
    set(&mut lapic.regs, 0x360, 4);
    vcpu.set_lapic(&lapic).map_err(err("LAPIC"))?;
    Ok(())
}

/// What the owner wants a vCPU to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Run,
    Pause,
    Exit,
}

/// Shared between a vCPU thread and the run-state owner.
#[derive(Debug)]
pub struct Control {
    state: Mutex<(Want, bool /* parked */)>,
    changed: Condvar,
    /// The vCPU thread's Linux thread id, once it runs (`query-cpus-fast`).
    thread_id: std::sync::atomic::AtomicI32,
}

impl Control {
    pub fn new() -> Arc<Self> {
        Arc::new(Control {
            state: Mutex::new((Want::Run, false)),
            changed: Condvar::new(),
            thread_id: std::sync::atomic::AtomicI32::new(0),
        })
    }

    /// The vCPU thread's Linux thread id (0 before it started).
    pub fn thread_id(&self) -> i32 {
        self.thread_id.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Want, bool)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set(&self, want: Want) {
        self.lock().0 = want;
        self.changed.notify_all();
    }

    /// Waits until the vCPU has parked (or exited).
    pub fn wait_parked(&self) {
        let mut s = self.lock();
        while !s.1 && s.0 != Want::Run {
            s = self
                .changed
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Called by the vCPU thread: parks while paused; returns false on exit.
    fn park(&self, vcpu: &VcpuFd) -> bool {
        let mut s = self.lock();
        if s.0 == Want::Pause {
            // Tell the guest's kvmclock it was stopped, so a long pause is not taken
            // for a soft lockup. Not every host supports it; that only costs a warning.
            let _ = vcpu.kvmclock_ctrl();
            s.1 = true;
            self.changed.notify_all();
            while s.0 == Want::Pause {
                s = self
                    .changed
                    .wait(s)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            s.1 = false;
        }
        s.0 != Want::Exit
    }
}

/// Held by a vCPU thread for its whole life: when the thread ends, however it
/// ends (a panic too), the vCPU counts as parked for good, so that a pause (or
/// holdfast's end, which pauses first) never waits for a thread that is gone.
struct ParkedWhenGone<'a>(&'a Control);

impl Drop for ParkedWhenGone<'_> {
    fn drop(&mut self) {
        self.0.lock().1 = true;
        self.0.changed.notify_all();
    }
}

/// A vCPU thread's body.
pub fn run(
    cpu: u8,
    mut vcpu: VcpuFd,
    control: Arc<Control>,
    ports: Arc<PortBus>,
    mmio: Arc<MmioBus>,
    events: Sender<Input>,
) {
    let _gone = ParkedWhenGone(&control);
    // SAFETY: gettid(2) takes nothing and cannot fail.
    let tid = unsafe { libc::gettid() };
    control
        .thread_id
        .store(tid, std::sync::atomic::Ordering::SeqCst);
    KVM_RUN.with(|r| r.set(vcpu.get_kvm_run() as *mut kvm_run));
    loop {
        if !control.park(&vcpu) {
            break;
        }
        let event = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => ports.write(port, data).map(|r| match r {
                Request::Poweroff => Input::Poweroff,
                Request::Reboot => Input::Reboot,
                Request::Panic => Input::GuestPanic,
                Request::Exit(status) => Input::GuestStatus(status),
            }),
            Ok(VcpuExit::IoIn(port, data)) => {
                ports.read(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Shutdown) => Some(Input::Reboot), // triple fault
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::InternalError) => Some(Input::EmulationFailure { cpu }),
            Ok(VcpuExit::FailEntry(reason, _)) => Some(Input::VcpuFailed {
                cpu,
                message: format!("KVM could not enter the guest (hardware reason {reason:#x})"),
            }),
            Ok(other) => Some(Input::VcpuFailed {
                cpu,
                message: format!("unexpected exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(Input::VcpuFailed {
                cpu,
                message: format!("KVM_RUN failed: {e}"),
            }),
        };
        if let Some(event) = event {
            // Park first, then tell the owner: its answer (exit, resume) must not be
            // overwritten by ours.
            control.set(Want::Pause);
            let _ = events.send(event);
        }
    }
    KVM_RUN.with(|r| r.set(null_mut()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_thread_that_died_counts_as_parked() {
        let control = Control::new();
        let c = Arc::clone(&control);
        let died = std::thread::spawn(move || {
            let _gone = ParkedWhenGone(&c);
            panic!("a vCPU thread's bug");
        })
        .join();
        assert!(died.is_err());
        control.set(Want::Pause);
        // Returns at once instead of waiting forever for a park that cannot come.
        control.wait_parked();
    }
}
