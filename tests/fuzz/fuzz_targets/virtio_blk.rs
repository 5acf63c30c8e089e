//! The virtio-blk request path over hostile guest memory: memory contents,
//! descriptor table, rings, queue size and negotiated features all come from the
//! input (mostly shaped as a driver lays a request out, so that the fuzzer reaches
//! the request types and segments; sometimes anywhere), through virtio-queue's real
//! `Queue` on a `GuestMemoryMmap`, served by the disk's own worker and I/O threads
//! (`holdfast_vmm::disk::serve`, as `holdfast run` has them, with fewer
//! threads), over the real file backend (an in-memory file: the kernel's own answers,
//! such as fallocate's EINVAL for a zero length), and `cont` when the input broke
//! the host. Nothing may panic, and a guest's mistakes never pass for host errors
//! (the host here cannot fail unless the input armed a fault).
#![no_main]

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use holdfast_block::{DiskConfig, FaultInjector, FaultOp, FaultRule, FileBackend, FileOptions, Trigger};
use holdfast_vmm::disk::{serve, DiskEvent, DiskEvents, DiskSpec, Slot};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

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

/// A length as drivers use them, or anything.
fn length(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 512,
        4 => 4096,
        5 => u.int_in_range(0..=8192u32)?,
        _ => u.arbitrary()?,
    })
}

// Where the queue's parts live when the input lays them out as a driver would.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFERS: u64 = 0x4000;

fn run(u: &mut Unstructured) -> Result<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    // Whatever is in memory first, then (mostly) a queue laid out on top of it.
    let fill_len = u.int_in_range(0..=4096usize)?.min(u.len());
    let fill = u.bytes(fill_len)?;
    mem.write_slice(fill, GuestAddress(BUFFERS)).expect("fill");
    let size = 1u16 << u.int_in_range(0..=8u8)?;
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    let wild: bool = u.ratio(1, 8)?;
    let (desc, avail, used) = if wild {
        (address(u)?, address(u)?, address(u)?)
    } else {
        (DESC, AVAIL, USED)
    };
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_ready(true);
    // Descriptors: mostly into the buffer area, a request header at the first
    // one's address and a DISCARD/WRITE_ZEROES segment at the second's. Most
    // chains have a driver's shape (header, data, status); the rest are anything.
    let n = u.int_in_range(1..=8u16)?;
    let shaped: bool = u.ratio(3, 4)?;
    let mut addrs = Vec::new();
    for i in 0..n {
        let addr = if u.ratio(7, 8)? {
            BUFFERS + u64::from(i) * 0x800 + u.int_in_range(0..=64u64)?
        } else {
            address(u)?
        };
        addrs.push(addr);
        let last = i + 1 == n;
        let (len, flags) = if shaped {
            match (i, last) {
                (_, true) => (1, 2u16), // the status byte: WRITE
                (0, false) => (16, 1),  // the header: NEXT
                (_, false) => {
                    let write = if u.arbitrary()? { 2 } else { 0 };
                    (if u.ratio(1, 2)? { 16 } else { length(u)? }, 1 | write)
                }
            }
        } else {
            (length(u)?, u.int_in_range(0..=7u16)?) // NEXT, WRITE, INDIRECT
        };
        let at = DESC + u64::from(i) * 16;
        let _ = mem.write_obj(addr, GuestAddress(at));
        let _ = mem.write_obj(len, GuestAddress(at + 8));
        let _ = mem.write_obj(flags, GuestAddress(at + 12));
        let next: u16 = if u.ratio(7, 8)? {
            (i + 1) % n
        } else {
            u.arbitrary()?
        };
        let _ = mem.write_obj(next, GuestAddress(at + 14));
    }
    let kind: u32 = match u.int_in_range(0..=7u8)? {
        0 => 0,  // IN
        1 => 1,  // OUT
        2 => 4,  // FLUSH
        3 => 8,  // GET_ID
        4 => 11, // DISCARD
        5 => 13, // WRITE_ZEROES
        _ => u.arbitrary()?,
    };
    let sector: u64 = if u.ratio(3, 4)? {
        u.int_in_range(0..=4096u64)?
    } else {
        u.arbitrary()?
    };
    let _ = mem.write_obj(kind, GuestAddress(addrs[0]));
    let _ = mem.write_obj(sector, GuestAddress(addrs[0].wrapping_add(8)));
    if let Some(&seg) = addrs.get(1) {
        let sectors: u32 = match u.int_in_range(0..=4u8)? {
            0 => 0,
            1 => 1,
            2 => 65536,
            3 => 65537,
            _ => u.arbitrary()?,
        };
        let _ = mem.write_obj(u.int_in_range(0..=4096u64)?, GuestAddress(seg));
        let _ = mem.write_obj(sectors, GuestAddress(seg.wrapping_add(8)));
        let _ = mem.write_obj(
            u.int_in_range(0..=3u32)?,
            GuestAddress(seg.wrapping_add(12)),
        );
    }
    let heads = u.int_in_range(1..=4u16)?;
    for k in 0..heads {
        let head: u16 = if u.ratio(7, 8)? { 0 } else { u.arbitrary()? };
        let _ = mem.write_obj(head, GuestAddress(AVAIL + 4 + u64::from(k) * 2));
    }
    let _ = mem.write_obj(heads, GuestAddress(AVAIL + 2));
    let features: u64 = u.arbitrary()?;
    let broken_host: bool = u.ratio(1, 8)?;

    let file = IMAGE
        .with(|path| FileBackend::open(path, FileOptions::default()))
        .expect("the in-memory image");
    let injector = FaultInjector::new(file);
    if broken_host {
        injector
            .handle()
            .arm(FaultRule::new(FaultOp::Any, libc::EIO, Trigger::Always));
    }
    let mut spec = DiskSpec::new("fuzz", Box::new(injector), DiskConfig::default(), "memfd");
    spec.io_threads = 4;
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let slot = Arc::new(Slot::new(spec, 0, eventfd(), eventfd()));
    // A modern driver: VERSION_1, and whichever of the offered features the input says.
    let version_1 = 1u64 << 32;
    if slot.set_up(queue, features | version_1) {
        let (tx, rx) = channel();
        let tx = DiskEvents::from(tx);
        for _ in 0..4 {
            serve(&slot, &mem, &tx);
            assert!(slot.wait_quiet(Duration::from_secs(5)), "the disk never went quiet");
            let mut error = false;
            for input in rx.try_iter() {
                if let DiskEvent::Error { report, .. } = input {
                    assert!(broken_host, "a guest's request passed for a host error: {report:?}");
                    error = true;
                }
            }
            if error {
                let _ = slot.resume(&mem, &tx);
            }
        }
    }
    let status = u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS);
    slot.write_register(status, &0u32.to_le_bytes());
    slot.join_io_threads();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
