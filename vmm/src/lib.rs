//! holdfast's machine: the KVM VM, guest memory, vCPUs, boot, ACPI, serial console,
//! the virtio-mmio transport and the virtio-blk frontend ([`virtio`]), each disk
//! whole ([`disk`]: its slot, worker, I/O threads and replay over `holdfast-block`'s
//! engine), and the run-state owner ([`owner`]) that pauses vCPUs on a disk error
//! and resumes them after a replay.
//!
//! Following a failed fdatasync (README.md has it file by file): the guest's request
//! is taken off its virtqueue ([`virtio::block::BlockDevice::next`]) by the disk's
//! worker ([`disk::serve`]) -> the engine parks it and reports the error ->
//! [`disk::DiskEvent::Error`] in an [`owner::Input::Disk`] -> [`owner::Owner::step`]
//! -> `BLOCK_IO_ERROR`, [`owner::Lifecycle::pause`], `STOP`; on `cont`
//! ([`owner::Command::Cont`]), [`owner::Lifecycle::resume`] replays the disk
//! ([`disk::Slot::resume`]) before any vCPU runs.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod console;
pub mod devices;
pub mod disk;
pub mod host_signals;
pub mod lab;
pub mod layout;
pub mod logging;
pub mod owner;
pub mod panics;
pub mod qmp_command;
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
