//! The run-state ordering contract (vm.rs), on real KVM with a ten-byte guest that
//! counts in memory: pause stops every vCPU; resume replays stopped disks first and
//! runs no vCPU if a replay fails.
//!
//! The guest runs at CPL0, which this project's machines' KVM emulates slowly: enough
//! for a counter. It needs /dev/kvm; set HOLDFAST_SKIP_KVM_TESTS=1 on a host without.

use std::time::Duration;

use holdfast_block::{
    Backend, Disk, DiskConfig, FaultHandle, FaultInjector, FaultOp, FaultRule, MemBackend, Request,
    RequestOp, Trigger,
};
use holdfast_vmm::disk::ResumeFailure;
use holdfast_vmm::owner::Lifecycle;
use holdfast_vmm::vm::Vm;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{counting_vm_config, kvm_available, COUNTER};

fn counter(vm: &Vm) -> u64 {
    vm.guest_memory()
        .read_obj(GuestAddress(COUNTER))
        .expect("counter")
}

/// Waits (bounded) for the counter to move past `than`.
fn advances(vm: &Vm, than: u64) -> bool {
    (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        counter(vm) > than
    })
}

/// A disk stopped on a host flush error, with one request parked.
fn stopped_disk() -> (Disk<Box<dyn Backend>>, FaultHandle) {
    let injector = FaultInjector::new(MemBackend::new(1 << 20));
    let faults = injector.handle();
    let backend: Box<dyn Backend> = Box::new(injector);
    let mut disk = Disk::new(backend, DiskConfig::default());
    faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always));
    assert!(disk.submit(Request::new(1, RequestOp::Flush)).is_parked());
    (disk, faults)
}

#[test]
fn pause_stops_vcpus_and_resume_replays_disks_before_they_run() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let (disk, faults) = stopped_disk();
    let config = counting_vm_config(dir.path(), disk, faults.clone());
    let (inbox, _inputs) = holdfast_vmm::owner::inbox::inbox();
    let mut vm = Vm::start(config, inbox).expect("start");
    assert!(advances(&vm, 0), "the guest runs");

    let clock = vm.pause();
    let paused_at = counter(&vm);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&vm), paused_at, "no vCPU runs while paused");

    // The disk is still broken: resume must fail, name the disk, and run nothing.
    let err = vm.resume(clock).expect_err("replay fails");
    match &err {
        ResumeFailure::Replay { disk, error } => {
            assert_eq!((disk.as_str(), error.errno), ("data", libc::EIO), "{err}")
        }
        other => panic!("not a replay failure: {other}"),
    }
    assert!(
        err.to_string().contains("disk data") && err.to_string().contains("EIO"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counter(&vm),
        paused_at,
        "a failed replay keeps every vCPU parked"
    );

    faults.clear_all();
    vm.resume(clock).expect("replay succeeds");
    assert!(
        advances(&vm, paused_at),
        "vCPUs run once the disks are replayed"
    );

    // A long pause does not show in the guest's clock.
    let clock = vm.pause();
    let before = vm.clock_ns().expect("clock");
    std::thread::sleep(Duration::from_millis(1000));
    vm.resume(clock).expect("nothing to replay");
    let jump = vm.clock_ns().expect("clock").saturating_sub(before);
    assert!(
        jump < 500_000_000,
        "the guest clock moved {jump} ns over a 1 s pause"
    );

    // And a second pause/resume cycle works the same.
    let clock = vm.pause();
    let again = counter(&vm);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&vm), again);
    vm.resume(clock).expect("nothing to replay");
    assert!(advances(&vm, again));
    assert!(vm.shutdown().is_empty(), "no disk dropped bytes");
}

/// Two stopped disks; the first replays, the second's replay fails: `cont` is refused,
/// and the next `cont` that resumes reports both disks' replays (the first's was not
/// lost with the refused `cont`).
#[test]
fn a_refused_resume_keeps_the_replays_it_made_for_the_next() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let spec = |id: &str| {
        let (disk, faults) = stopped_disk();
        let spec = holdfast_vmm::disk::DiskSpec {
            id: id.into(),
            engine: Box::new(disk),
            path: "memory".into(),
            direct: false,
            faults: Some(faults.clone()),
            simulated: None,
            watch: Default::default(),
            hang_timeout: None,
            io_threads: holdfast_vmm::disk::CALLS_PER_DISK,
            write_log: None,
        };
        (spec, faults)
    };
    let (a, a_faults) = spec("a");
    let (b, b_faults) = spec("b");
    let config = common::counting_vm_with_disks(dir.path(), vec![a, b]);
    let (inbox, _inputs) = holdfast_vmm::owner::inbox::inbox();
    let mut vm = Vm::start(config, inbox).expect("start");
    let clock = vm.pause();
    a_faults.clear_all();
    assert!(matches!(
        vm.resume(clock),
        Err(ResumeFailure::Replay { ref disk, .. }) if disk == "b"
    ));
    b_faults.clear_all();
    let replayed = vm.resume(clock).expect("resumed");
    let disks: Vec<&str> = replayed.iter().map(|r| r.disk.as_str()).collect();
    assert_eq!(disks, ["a", "b"], "{replayed:?}");
    assert!(vm.shutdown().is_empty());
}
