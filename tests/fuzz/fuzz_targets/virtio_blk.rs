//! The virtio-blk request path over hostile guest memory: memory contents,
//! descriptor table, rings, queue size and negotiated features all come from the
//! input, through virtio-queue's real `Queue` on a `GuestMemoryMmap`, over the real
//! file backend (an in-memory file: the kernel's own answers, such as fallocate's
//! EINVAL for a zero length). Nothing may panic, and a guest's mistakes never pass
//! for host errors (the host here cannot fail unless the input armed a fault).
#![no_main]

use holdfast_block::{
    Disk, DiskConfig, FaultInjector, FaultOp, FaultRule, FileBackend, FileOptions, Trigger,
};
use holdfast_vmm::virtio::block::BlockDevice;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;

thread_local! {
    /// A 1 MiB in-memory file, reopened by path for every input.
    static IMAGE: std::path::PathBuf = {
        // SAFETY: memfd_create reads a NUL-terminated name; the fd stays open for
        // the process's life, so its /proc path stays valid.
        let fd = unsafe { libc::memfd_create(c"holdfast-fuzz".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: ftruncate on the fd just created.
        assert_eq!(unsafe { libc::ftruncate(fd, 1 << 20) }, 0);
        std::path::PathBuf::from(format!("/proc/self/fd/{fd}"))
    };
}

/// An address mostly inside guest memory, sometimes just past it or anywhere.
fn address(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 => u.arbitrary()?,
        1 => MEM as u64 - u.int_in_range(0..=64u64)?,
        _ => u.int_in_range(0..=MEM as u64 - 1)?,
    })
}

fn run(u: &mut Unstructured) -> Result<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let size = 1u16 << u.int_in_range(0..=8u8)?;
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    let (desc, avail, used) = (address(u)?, address(u)?, address(u)?);
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_ready(true);
    let features: u64 = u.arbitrary()?;
    let broken_host: bool = u.arbitrary()?;
    let fill = u.bytes(u.len().min(MEM))?;
    mem.write_slice(fill, GuestAddress(0)).expect("fill");

    let file = IMAGE
        .with(|path| FileBackend::open(path, FileOptions::default()))
        .expect("the in-memory image");
    let injector = FaultInjector::new(file);
    if broken_host {
        injector
            .handle()
            .arm(FaultRule::new(FaultOp::Any, libc::EIO, Trigger::Always));
    }
    let mut dev = BlockDevice::new(Disk::new(injector, DiskConfig::default()));
    dev.ack_features(features & dev.features());
    for _ in 0..4 {
        match dev.process_queue(&mem, &mut queue) {
            Ok(run) => {
                assert!(
                    broken_host || run.error.is_none(),
                    "a guest's request passed for a host error"
                );
                if run.error.is_some() {
                    let _ = dev.resume(&mem, &mut queue);
                }
            }
            Err(_) => break, // the device needs a reset: what the VMM does then
        }
    }
    dev.reset();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
