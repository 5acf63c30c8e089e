//! holdfast's machine: the KVM VM, guest memory, vCPUs, boot, ACPI, serial console,
//! the virtio-mmio transport and the virtio-blk frontend over `holdfast-block`, and
//! the run-state owner that pauses vCPUs on a disk error and resumes them after a
//! replay.
//!
//! Following a failed fdatasync: the guest's request arrives on a virtqueue
//! ([`virtio::block::BlockDevice::process_queue`], device thread) -> the disk engine
//! parks it and reports the error -> [`owner::Input::DiskError`] to the run-state
//! owner ([`owner::Owner::step`]) -> `BLOCK_IO_ERROR`, [`owner::Lifecycle::pause`],
//! `STOP`; on `cont` ([`owner::Command::Cont`]), [`owner::Lifecycle::resume`]
//! replays the disk ([`devices::disks`]) before any vCPU runs.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod devices;
pub mod host_signals;
pub mod lab;
pub mod layout;
pub mod logging;
pub mod owner;
pub mod panics;
pub mod vcpu;
pub mod virtio;
pub mod vm;

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
