//! What the run-state owner needs of the machine, and nothing else: pause, resume,
//! settle, and the disks (what they are, and letting one go of its image and take it
//! back). The machine (`vm::Vm`) is the real one; the owner's unit tests use a fake,
//! so every transition is tested without `/dev/kvm`.

use std::path::Path;

use crate::disk::{
    AttachFailure, DiskCall, DiskInfo, Dropped, FaultPoints, Replayed, ResumeFailure,
};

/// The guest clock as saved at a pause (KVM's kvmclock), restored at the resume so
/// the guest does not see the pause as time that passed.
pub type SavedClock = Option<kvm_bindings::kvm_clock_data>;

/// The machine under the owner.
pub trait Lifecycle {
    /// Stops every vCPU (kicked out of KVM_RUN, parked) and saves the guest clock.
    /// Devices keep their state; a stopped disk stays stopped.
    fn pause(&mut self) -> SavedClock;
    /// Devices first (every stopped disk replayed; on failure nothing runs and the
    /// error names the disk), then the clock, then the vCPUs. Returns the disks it
    /// replayed.
    fn resume(&mut self, clock: SavedClock) -> Result<Vec<Replayed>, ResumeFailure>;
    /// Makes every disk's buffered bytes stable now (vCPUs paused). Returns each disk
    /// that could not be, with the bytes dropped and why.
    fn settle(&mut self) -> Vec<Dropped>;
    /// Every disk, for `query-block` and `x-query-unflushed`. Never waits on a disk
    /// whose host call hangs (it shows what it last knew, and the call).
    fn disks(&self) -> Vec<DiskInfo>;
    /// The host calls in progress, one per disk that is in one. Never waits.
    fn calls(&self) -> Vec<DiskCall>;
    /// A disk's fault-injection points (`x-block-fault`); `None` if there is no such
    /// disk. Never waits on the disk, so a hang can be ended while a call hangs.
    fn fault_points(&self, disk: &str) -> Option<FaultPoints>;
    /// Lets a disk go of its image, keeping its buffer and parked requests (vCPUs
    /// paused).
    fn detach(&mut self, disk: &str) -> Result<(), AttachFailure>;
    /// Opens a detached disk's image again (`path`, or the one it had).
    fn attach(&mut self, disk: &str, path: Option<&Path>) -> Result<(), AttachFailure>;
    /// The machine's name (`--name`), if it has one.
    fn name(&self) -> Option<String>;
    /// Each vCPU's Linux thread id, by index.
    fn cpu_threads(&self) -> Vec<i32>;
    /// Presses the ACPI power button (the guest decides what to do; a paused guest
    /// sees it when it runs again).
    fn press_power_button(&mut self) -> Result<(), String>;
}
