//! The disk's slot, worker, I/O threads and replay together, on queues in test
//! memory (virtio-queue's mock) over in-memory and fault-injecting backends.

use std::sync::Arc;

use super::*;
use holdfast_block::{Backend, DiskConfig, MemBackend, Outcome};
use std::sync::mpsc::channel;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::worker::{answer, answered};

/// Where the disk's events go, and where a test reads them.
fn events() -> (DiskEvents, std::sync::mpsc::Receiver<DiskEvent>) {
    let (tx, rx) = channel();
    (DiskEvents::from(tx), rx)
}

fn slot(id: &str) -> Arc<Slot> {
    let backend: Box<dyn Backend> = Box::new(MemBackend::new(1 << 20));
    let spec = DiskSpec::new(id, backend, DiskConfig::default(), "memory");
    Arc::new(Slot::new(
        spec,
        0,
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ))
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
/// available in the device's queue (its status byte 0xff), broken as `broken` says.
fn drive(slot: &Slot, mem: &GuestMemoryMmap, at: u64, broken: Broken) {
    drive_flushes(slot, mem, at, broken, 1)
}

/// Writes a request at `head` (type `kind`, `sector`, status byte 0xff at
/// `head + 16`) and appends its descriptor chain to `descs`: the 16-byte header,
/// the data `runs` (readable; writable for a read), the status byte (writable).
fn push_chain(
    mem: &GuestMemoryMmap,
    descs: &mut Vec<RawDescriptor>,
    head: u64,
    kind: u32,
    sector: u64,
    runs: &[(u64, u32)],
) {
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let data = if kind == VIRTIO_BLK_T_IN {
        next | write
    } else {
        next
    };
    mem.write_obj(kind, GuestAddress(head)).expect("type");
    mem.write_obj(sector, GuestAddress(head + 8))
        .expect("sector");
    mem.write_obj(0xffu8, GuestAddress(head + 16))
        .expect("status");
    let mut index = descs.len() as u16;
    index += 1;
    descs.push(RawDescriptor::from(Descriptor::new(head, 16, next, index)));
    for &(addr, len) in runs {
        index += 1;
        descs.push(RawDescriptor::from(Descriptor::new(addr, len, data, index)));
    }
    descs.push(RawDescriptor::from(Descriptor::new(head + 16, 1, write, 0)));
}

/// As [`drive`], with `n` FLUSH requests, the i-th's status byte at
/// `at + 32 * i + 16`.
fn drive_flushes(slot: &Slot, mem: &GuestMemoryMmap, at: u64, broken: Broken, n: u16) {
    let vq = MockSplitQueue::new(mem, 16);
    let mut descs = Vec::new();
    for i in 0..n {
        let head = at + 32 * u64::from(i);
        push_chain(mem, &mut descs, head, VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    vq.add_desc_chains(&descs, 0).expect("chains");
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
    set_up(slot, queue, 0);
}

/// A driver's set-up ([`Slot::set_up`]): VERSION_1 and the device features
/// `low` (bits 0 to 31), `queue`, then DRIVER_OK.
fn set_up(slot: &Slot, queue: Queue, low: u32) {
    assert!(slot.set_up(queue, u64::from(low) | crate::virtio::FEATURE_VERSION_1));
}

/// The `n` FLUSHes [`drive_flushes`] made at `at` completed OK.
fn assert_flushes_ok(mem: &GuestMemoryMmap, at: u64, n: u64, what: &str) {
    for i in 0..n {
        let status: u8 = mem
            .read_obj(GuestAddress(at + 32 * i + 16))
            .expect("status");
        assert_eq!(status, 0, "{what}: FLUSH {i}");
    }
}

#[test]
fn with_event_indexes_the_worker_interrupts_only_where_the_driver_asked() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, _rx) = events();
    // The driver's used_event (None: no event indexes) and the interrupts its
    // three FLUSHes get: one each; one as the first or the third completes
    // (used index 1 or 3); none for an index they do not reach.
    for (used_event, interrupts) in [(None, 3), (Some(0), 1), (Some(2), 1), (Some(100), 0)] {
        let d = slot("d");
        drive_flushes(&d, &mem, 0x20_0000, Broken::Not, 3);
        let (avail, used) = {
            let mut t = d.transport();
            let q = &mut t.queues_mut()[0];
            q.set_event_idx(used_event.is_some());
            // Apart from the available ring (the mock's used ring overlaps its
            // used_event).
            q.set_used_ring_address(Some(0x1_0000), Some(0));
            (q.avail_ring(), q.used_ring())
        };
        if let Some(e) = used_event {
            mem.write_obj(e, GuestAddress(avail + 4 + 2 * 16))
                .expect("used_event");
        }
        serve(&d, &mem, &tx);
        assert_flushes_ok(&mem, 0x20_0000, 3, &format!("used_event {used_event:?}"));
        assert_eq!(
            d.irq.read().unwrap_or(0),
            interrupts,
            "used_event {used_event:?}"
        );
        let vring = d.transport().interrupt_status().load(Ordering::SeqCst) & VIRTIO_MMIO_INT_VRING;
        assert_eq!(vring != 0, interrupts > 0, "used_event {used_event:?}");
        if used_event.is_some() {
            // Where the driver must notify the worker next: the fourth request.
            let avail_event: u16 = mem
                .read_obj(GuestAddress(used + 4 + 8 * 16))
                .expect("avail_event");
            assert_eq!(avail_event, 3);
        }
    }
}

#[test]
fn completions_that_meet_in_the_used_ring_share_one_interrupt() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, _rx) = events();
    let d = slot("d");
    drive_flushes(&d, &mem, 0x20_0000, Broken::Not, 3);
    // An I/O thread whose host call returned and that is on its way to the
    // used ring: the worker's three completions leave the interrupt to it.
    d.answering.fetch_add(1, Ordering::SeqCst);
    serve(&d, &mem, &tx);
    assert_flushes_ok(&mem, 0x20_0000, 3, "");
    assert_eq!(d.irq.read().unwrap_or(0), 0, "raised before the last left");
    // It arrives with nothing of its own to add (a parked request): still, as the
    // last one out, it raises the interrupt the others left to it, once.
    let parked = || Outcome {
        completion: None,
        error: None,
    };
    answered(&d, &mem, &tx, parked(), None);
    assert_eq!(d.irq.read().unwrap_or(0), 1);
    let vring = d.transport().interrupt_status().load(Ordering::SeqCst) & VIRTIO_MMIO_INT_VRING;
    assert_ne!(vring, 0);
    // Nothing left unsignalled: the next lone answer with nothing to add raises none.
    answer(&d, &mem, &tx, parked(), None);
    assert_eq!(d.irq.read().unwrap_or(0), 0);
}

#[test]
fn a_broken_queue_asks_for_a_reset_and_stops_nothing_else() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, rx) = events();
    for broken in [Broken::UsedRing, Broken::AvailRing, Broken::Head] {
        let (bad, good) = (slot("bad"), slot("good"));
        drive(&bad, &mem, 0x20_0000, broken);
        serve(&bad, &mem, &tx);
        let t = bad.transport();
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "{broken:?}");
        assert_ne!(
            t.interrupt_status().load(Ordering::SeqCst) & VIRTIO_MMIO_INT_CONFIG,
            0
        );
        assert!(!t.live());
        drop(t);
        assert_eq!(bad.irq.read().ok(), Some(1), "the guest is not told");
        match rx.try_recv() {
            Ok(DiskEvent::NeedsReset { disk, reason }) => {
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
    let (tx, _rx) = events();
    let bad = slot("bad");
    drive(&bad, &mem, 0x20_0000, Broken::UsedRing);
    serve(&bad, &mem, &tx);
    let mut t = bad.transport();
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

/// A driver's set-up with FLUSH negotiated (write-back) and `n` reads of 4 KiB
/// made available, the i-th of sector `8 * i` into `at + 0x2000 * i + 0x1000`,
/// its status byte at `at + 0x2000 * i + 16`.
fn drive_reads(slot: &Slot, mem: &GuestMemoryMmap, at: u64, n: u16) {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_IN};
    let vq = MockSplitQueue::new(mem, 16);
    let mut descs = Vec::new();
    for i in 0..n {
        let head = at + 0x2000 * u64::from(i);
        let runs = [(head + 0x1000, 4096)];
        push_chain(
            mem,
            &mut descs,
            head,
            VIRTIO_BLK_T_IN,
            8 * u64::from(i),
            &runs,
        );
    }
    vq.add_desc_chains(&descs, 0).expect("chains");
    let queue = vq.create_queue::<Queue>().expect("queue");
    set_up(slot, queue, 1 << VIRTIO_BLK_F_FLUSH);
}

#[test]
fn a_disk_serves_requests_beside_one_that_hangs() {
    use holdfast_block::{FaultOp, FaultRule};
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, _rx) = events();
    let (slot, faults) = faulty_slot("data");
    faults.arm(
        FaultRule::hang(FaultOp::Read)
            .in_range(0, 4096)
            .named("stall"),
    );
    drive_reads(&slot, &mem, 0x20_0000, 4);
    let status = |i: u64| -> u8 {
        mem.read_obj(GuestAddress(0x20_0000 + 0x2000 * i + 16))
            .expect("status")
    };
    serve(&slot, &mem, &tx);
    let until = Instant::now() + Duration::from_secs(5);
    while (1..4).any(|i| status(i) != 0) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    for i in 1..4 {
        assert_eq!(status(i), 0, "read {i} completed beside the hung one");
    }
    assert_eq!(status(0), 0xff, "the hung read has not completed");
    assert_eq!(faults.hanging(), 1);
    let call = slot.call().expect("the hung read shows");
    assert_eq!(call.call.op, holdfast_block::HostOp::Read);
    faults.clear_named("stall");
    let until = Instant::now() + Duration::from_secs(5);
    while status(0) != 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(status(0), 0, "it completes when the storage comes back");
    assert_eq!(slot.engine().in_flight(), 0);
}

/// Two writes made available: 128 KiB at sector 0 in two 64 KiB descriptors of
/// bytes 7 (taken as a [`GuestWrite`]), then 4 KiB of bytes 8 at 512 KiB
/// (copied at once). Their status bytes are at `at + 16` and `at + 0x40 + 16`.
fn drive_writes(slot: &Slot, mem: &GuestMemoryMmap, at: u64) {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_OUT};
    let vq = MockSplitQueue::new(mem, 16);
    let data = at + 0x1_0000;
    let mut descs = Vec::new();
    let chain = |head: u64, sector: u64, runs: &[(u64, u32)], descs: &mut Vec<RawDescriptor>| {
        push_chain(mem, descs, head, VIRTIO_BLK_T_OUT, sector, runs)
    };
    mem.write_slice(&[7u8; 128 << 10], GuestAddress(data))
        .expect("long write's bytes");
    mem.write_slice(&[8u8; 4096], GuestAddress(data + (128 << 10)))
        .expect("short write's bytes");
    chain(
        at,
        0,
        &[(data, 64 << 10), (data + (64 << 10), 64 << 10)],
        &mut descs,
    );
    chain(at + 0x40, 1024, &[(data + (128 << 10), 4096)], &mut descs);
    vq.add_desc_chains(&descs, 0).expect("chains");
    let queue = vq.create_queue::<Queue>().expect("queue");
    set_up(slot, queue, 1 << VIRTIO_BLK_F_FLUSH);
}

#[test]
fn a_long_write_goes_to_the_host_from_guest_memory_and_its_copy_is_replayed() {
    use holdfast_block::{FaultOp, FaultRule, Request, RequestOp};
    let stable = MemBackend::new(1 << 20);
    let injector = holdfast_block::FaultInjector::new(stable.clone());
    let faults = injector.handle();
    let spec = DiskSpec::new("data", Box::new(injector), DiskConfig::default(), "memory");
    let slot = Arc::new(Slot::new(
        spec,
        0,
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, _rx) = events();
    faults.arm(
        FaultRule::hang(FaultOp::Write)
            .in_range(0, 4096)
            .named("stall"),
    );
    let at = 0x20_0000;
    drive_writes(&slot, &mem, at);
    let status = |head: u64| -> u8 { mem.read_obj(GuestAddress(head + 16)).expect("status") };
    serve(&slot, &mem, &tx);
    let until = Instant::now() + Duration::from_secs(5);
    while status(at + 0x40) != 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        status(at + 0x40),
        0,
        "the short write completed beside the long one"
    );
    assert_eq!(status(at), 0xff, "the long write's host call hangs");
    assert_eq!(
        slot.call().expect("it shows").call.op,
        holdfast_block::HostOp::Write
    );
    faults.clear_named("stall");
    let until = Instant::now() + Duration::from_secs(5);
    while status(at) != 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(status(at), 0, "it completes when the storage comes back");
    assert!(stable.contents()[..128 << 10].iter().all(|&b| b == 7));
    let mut disk = slot.engine();
    assert_eq!(disk.status().buffer.bytes, (128 << 10) + 4096);
    // The guest reuses its memory; the host loses the write (a failed flush);
    // the replay writes the copy the buffer kept.
    mem.write_slice(&[0u8; 128 << 10], GuestAddress(at + 0x1_0000))
        .expect("reuse");
    faults.arm(
        FaultRule::new(FaultOp::Flush, libc::EIO, holdfast_block::Trigger::Always).named("outage"),
    );
    assert!(disk.submit(Request::new(100, RequestOp::Flush)).is_parked());
    holdfast_block::SharedIo::write_at(&stable, &[0u8; 128 << 10], 0).expect("lost");
    faults.clear_named("outage");
    disk.replay().expect("replay");
    assert!(stable.contents()[..128 << 10].iter().all(|&b| b == 7));
}

/// A request of [`a_full_queue_of_writes_with_flushes_ahead_completes_every_request_ok`]:
/// its header's address, sector, data runs (none: a FLUSH) and the byte it writes.
struct Written {
    head: u64,
    sector: u64,
    runs: Vec<(u64, u32)>,
    byte: u8,
}

/// A queue full of writes beside each other, short ones (copied) and long ones
/// (from guest memory), with guest FLUSHes among them, under a bound so small
/// that the disk flushes ahead and makes room all the time: every request
/// completes OK and every write's bytes reach the host. Many rounds, to meet
/// the threads' interleavings (a two-CPU test host once saw a guest's fio lose
/// two jobs' results; this is the device's side of that).
#[test]
fn a_full_queue_of_writes_with_flushes_ahead_completes_every_request_ok() {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_OUT};
    const SHORT: u64 = 70;
    const LONG: u64 = 5;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("memory");
    let (tx, _rx) = events();
    let at = 0x20_0000;
    for round in 0..40u64 {
        let stable = MemBackend::new(4 << 20);
        let config = DiskConfig {
            unflushed_limit: 256 << 10,
            ..DiskConfig::default()
        };
        let spec = DiskSpec::new("d", Box::new(stable.clone()), config, "memory");
        let d = Arc::new(Slot::new(
            spec,
            0,
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ));
        let mut requests: Vec<Written> = Vec::new();
        let mut head = at;
        for i in 0..SHORT + LONG + 2 {
            let (sector, runs, byte) = if i == SHORT / 2 || i == SHORT + LONG + 1 {
                (0, Vec::new(), 0)
            } else if i < SHORT + 1 {
                let byte = (i + round) as u8 | 1;
                let data = at + 0x1_0000 + i * 4096;
                mem.write_slice(&[byte; 4096], GuestAddress(data))
                    .expect("bytes");
                (i * 16, vec![(data, 4096)], byte)
            } else {
                let j = i - SHORT - 1;
                let byte = (j + round) as u8 | 0x80;
                let data = at + 0x10_0000 + j * (128 << 10);
                mem.write_slice(&[byte; 128 << 10], GuestAddress(data))
                    .expect("bytes");
                let runs = vec![(data, 64 << 10), (data + (64 << 10), 64 << 10)];
                (2048 + j * 512, runs, byte)
            };
            requests.push(Written {
                head,
                sector,
                runs,
                byte,
            });
            head += 0x40;
        }
        let mut descs = Vec::new();
        for Written {
            head, sector, runs, ..
        } in &requests
        {
            let kind = if runs.is_empty() {
                VIRTIO_BLK_T_FLUSH
            } else {
                VIRTIO_BLK_T_OUT
            };
            push_chain(&mem, &mut descs, *head, kind, *sector, runs);
        }
        let vq = MockSplitQueue::new(&mem, 256);
        vq.add_desc_chains(&descs, 0).expect("chains");
        set_up(
            &d,
            vq.create_queue::<Queue>().expect("queue"),
            1 << VIRTIO_BLK_F_FLUSH,
        );
        serve(&d, &mem, &tx);
        let status = |head: u64| -> u8 { mem.read_obj(GuestAddress(head + 16)).expect("status") };
        let until = Instant::now() + Duration::from_secs(10);
        while requests.iter().any(|r| status(r.head) == 0xff) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        let contents = stable.contents();
        for (
            i,
            Written {
                head,
                sector,
                runs,
                byte,
            },
        ) in requests.iter().enumerate()
        {
            assert_eq!(status(*head), 0, "round {round}: request {i}'s status");
            let len: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
            let start = (sector * 512) as usize;
            assert!(
                contents[start..start + len as usize]
                    .iter()
                    .all(|b| b == byte),
                "round {round}: request {i}'s bytes on the host"
            );
        }
        let flushes = d.engine().status().internal_flushes;
        assert!(
            flushes > 0,
            "round {round}: the disk never flushed on its own"
        );
        d.stop_io_threads();
    }
}

/// A slot whose disk has a fault point, as `holdfast run` makes them.
fn faulty_slot(id: &str) -> (Arc<Slot>, FaultHandle) {
    let injector = holdfast_block::FaultInjector::new(MemBackend::new(1 << 20));
    let faults = injector.handle();
    let mut spec = DiskSpec::new(id, Box::new(injector), DiskConfig::default(), "memory");
    spec.faults = Some(faults.clone());
    let slot = Slot::new(
        spec,
        0,
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    );
    (Arc::new(slot), faults)
}

/// Runs `f` in a thread and says whether it returned within `within`.
fn returns_within(within: Duration, f: impl FnOnce() + Send + 'static) -> bool {
    let (done, finished) = channel();
    std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    finished.recv_timeout(within).is_ok()
}

#[test]
fn a_hung_flush_holds_its_disk_only() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, rx) = events();
    let (hung, faults) = faulty_slot("hung");
    let (other, _) = faulty_slot("other");
    faults.arm(holdfast_block::FaultRule::hang(holdfast_block::FaultOp::Flush).named("stall"));
    drive(&hung, &mem, 0x20_0000, Broken::Not);
    let worker = {
        let (slot, mem, tx) = (Arc::clone(&hung), mem.clone(), tx.clone());
        std::thread::spawn(move || serve(&slot, &mem, &tx))
    };
    while faults.hanging() == 0 {
        std::thread::yield_now();
    }
    // A vCPU reads the hung disk's registers.
    let reader = Arc::clone(&hung);
    assert!(
        returns_within(Duration::from_secs(2), move || {
            let mut magic = [0u8; 4];
            reader.read_register(0, &mut magic);
            assert_eq!(&magic, b"virt");
        }),
        "a register read waited on the hung disk"
    );
    // Another disk serves its queue.
    drive(&other, &mem, 0x30_0000, Broken::Not);
    let (slot, m, t) = (Arc::clone(&other), mem.clone(), tx.clone());
    assert!(
        returns_within(Duration::from_secs(2), move || serve(&slot, &m, &t)),
        "the other disk waited on the hung one"
    );
    let status: u8 = mem.read_obj(GuestAddress(0x30_0000 + 16)).expect("status");
    assert_eq!(status, 0, "the other disk's FLUSH completed S_OK");
    // The owner's view: at once, naming the call; what needs the disk refuses.
    let started = Instant::now();
    let info = hung.info();
    assert!(started.elapsed() < Duration::from_millis(500));
    let call = info.outstanding.expect("the flush is outstanding");
    assert_eq!(call.op, holdfast_block::HostOp::Flush);
    assert_eq!(hung.call().expect("a call").disk, "hung");
    match hung.resume(&mem, &tx) {
        Err(ResumeFailure::Busy { disk, call }) => {
            assert_eq!(disk, "hung");
            assert!(call.contains("host flush has been outstanding"), "{call}");
        }
        other => panic!("not refused as busy: {other:?}"),
    }
    assert!(matches!(
        hung.change(|d| d.detach()),
        Err(AttachFailure::Busy { .. })
    ));
    // It cannot settle while the flush hangs; with nothing buffered (no write
    // before the flush) no acknowledged bytes are at risk, and none are dropped.
    assert_eq!(hung.settle(HUNG_AFTER, false), None);
    // The storage answers again: the flush completes, the disk is free.
    faults.clear_named("stall");
    worker.join().expect("worker");
    let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
    assert_eq!(status, 0, "the hung FLUSH completed S_OK after all");
    assert!(hung.call().is_none());
    assert!(hung.settle(HUNG_AFTER, false).is_none());
    assert!(rx.try_recv().is_err(), "nothing failed");
}

#[test]
fn a_reset_during_a_hang_drops_the_parked_requests_later() {
    let (hung, faults) = faulty_slot("hung");
    let holding = Arc::clone(&hung);
    faults.arm(holdfast_block::FaultRule::hang(holdfast_block::FaultOp::Flush).named("stall"));
    // The disk is busy (its worker holds it in a host call).
    let holder = std::thread::spawn(move || {
        let flush = holdfast_block::Request::new(1, holdfast_block::RequestOp::Flush);
        let _ = holding.engine().submit(flush);
    });
    while faults.hanging() == 0 {
        std::thread::yield_now();
    }
    let slot = Arc::clone(&hung);
    assert!(
        returns_within(Duration::from_secs(2), move || {
            slot.write_register(u64::from(VIRTIO_MMIO_STATUS), &0u32.to_le_bytes());
        }),
        "a vCPU's reset waited on the hung disk"
    );
    assert_ne!(
        hung.transport().device_mut().take_pending(),
        Default::default(),
        "the reset waits for the disk"
    );
    faults.clear_named("stall");
    holder.join().expect("holder");
}

/// The guest's FLUSH at 0x20_0000 fails on the host (its status byte preset to
/// 0xff by [`drive`], not one the device writes): the disk stops, the FLUSH is parked, the owner is
/// told; then the storage comes back.
fn stopped_on_a_failed_flush(
    slot: &Arc<Slot>,
    faults: &holdfast_block::FaultHandle,
    mem: &GuestMemoryMmap,
    tx: &DiskEvents,
    rx: &std::sync::mpsc::Receiver<DiskEvent>,
) {
    use holdfast_block::{FaultOp, FaultRule, Trigger};
    faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always).named("outage"));
    drive(slot, mem, 0x20_0000, Broken::Not);
    serve(slot, mem, tx);
    assert!(matches!(rx.try_recv(), Ok(DiskEvent::Error { .. })));
    faults.clear_named("outage");
}

/// As [`stopped_on_a_failed_flush`] with 4 KiB in the buffer (the replay writes
/// before it flushes); then a `cont` whose replay's write hangs is refused: the
/// replay goes on, held in that write ("stall-write") until the caller clears it.
fn replay_left_running_on_a_hung_write(
    slot: &Arc<Slot>,
    faults: &holdfast_block::FaultHandle,
    mem: &GuestMemoryMmap,
    tx: &DiskEvents,
    rx: &std::sync::mpsc::Receiver<DiskEvent>,
) {
    use holdfast_block::{FaultOp, FaultRule, Request, RequestOp};
    let write = RequestOp::Write {
        offset: 0,
        data: vec![7u8; 4096].as_slice().into(),
    };
    slot.engine().submit(Request::new(1 << 40, write));
    stopped_on_a_failed_flush(slot, faults, mem, tx, rx);
    faults.arm(FaultRule::hang(FaultOp::Write).named("stall-write"));
    assert!(matches!(
        slot.resume(mem, tx),
        Err(ResumeFailure::Busy { .. })
    ));
}

#[test]
fn a_replay_that_hangs_does_not_hold_the_owner() {
    use holdfast_block::{FaultOp, FaultRule};
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, rx) = events();
    let (slot, faults) = faulty_slot("data");
    stopped_on_a_failed_flush(&slot, &faults, &mem, &tx, &rx);
    // The storage comes back, then hangs during the replay's flush.
    faults.arm(FaultRule::hang(FaultOp::Flush).named("stall"));
    let started = Instant::now();
    match slot.resume(&mem, &tx) {
        Err(ResumeFailure::Busy { disk, call }) => {
            assert_eq!(disk, "data");
            assert!(
                call.contains("replay is under way") && call.contains("flush"),
                "{call}"
            );
        }
        other => panic!("not busy: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
    assert_eq!(status, 0xff, "the parked FLUSH is not completed yet");
    // Still hanging: the next cont is refused at once.
    assert!(matches!(
        slot.resume(&mem, &tx),
        Err(ResumeFailure::Busy { .. })
    ));
    faults.clear_named("stall");
    while slot.call().is_some() || matches!(*slot.lock_replay(), Replay::Running) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let replayed = slot.resume(&mem, &tx).expect("resumed").expect("replayed");
    assert_eq!(replayed.disk, "data");
    let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
    assert_eq!(status, 0, "the parked FLUSH completed S_OK");
}

/// A `cont` refused while the replay hung leaves the replay running; the next
/// `cont` comes while the replay's last call is still young, waits for the
/// disk, and the replay finishes meanwhile: its outcome is that `cont`'s, and
/// the parked FLUSH completes. (It once stayed unanswered: the disk ran again,
/// the outcome lay unread, and the guest waited on its fdatasync for ever.)
#[test]
fn a_cont_that_waits_while_a_replay_finishes_completes_the_parked_flush() {
    use holdfast_block::{FaultOp, FaultRule, HostOp};
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, rx) = events();
    let (slot, faults) = faulty_slot("data");
    replay_left_running_on_a_hung_write(&slot, &faults, &mem, &tx, &rx);
    // The write returns; the replay's flush is slow (it hangs until released).
    faults.arm(FaultRule::hang(FaultOp::Flush).named("stall-flush"));
    faults.clear_named("stall-write");
    while slot.call().is_none_or(|c| c.call.op != HostOp::Flush) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The next cont, while that flush is young: it waits for the disk.
    let cont = {
        let (slot, mem, tx) = (Arc::clone(&slot), mem.clone(), tx.clone());
        std::thread::spawn(move || slot.resume(&mem, &tx))
    };
    std::thread::sleep(Duration::from_millis(100));
    faults.clear_named("stall-flush");
    let replayed = cont.join().expect("cont").expect("resumed");
    assert!(
        replayed.is_some(),
        "the cont did not take the replay's outcome"
    );
    let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
    assert_eq!(status, 0, "the parked FLUSH completed S_OK");
    assert!(!slot.engine().is_stopped());
}

/// A replay left running by a refused `cont` that then fails: the next `cont`
/// is refused with its error (the FLUSH stays parked), the one after replays
/// again and resumes (docs/durability.md, "A replay that meets a new hang").
#[test]
fn a_left_running_replay_that_fails_refuses_the_next_cont_and_the_one_after_replays() {
    use holdfast_block::{FaultOp, FaultRule, Trigger};
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, rx) = events();
    let (slot, faults) = faulty_slot("data");
    replay_left_running_on_a_hung_write(&slot, &faults, &mem, &tx, &rx);
    // The write returns; the replay's flush fails.
    faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always).named("again"));
    faults.clear_named("stall-write");
    while slot.call().is_some() || matches!(*slot.lock_replay(), Replay::Running) {
        std::thread::sleep(Duration::from_millis(5));
    }
    match slot.resume(&mem, &tx) {
        Err(ResumeFailure::Replay { disk, error }) => {
            assert_eq!((disk.as_str(), error.errno), ("data", libc::EIO));
        }
        other => panic!("not the replay's failure: {other:?}"),
    }
    let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
    assert_eq!(status, 0xff, "the parked FLUSH waits");
    faults.clear_named("again");
    let replayed = slot.resume(&mem, &tx).expect("resumed").expect("replayed");
    assert_eq!(replayed.bytes_rewritten, 4096);
    let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
    assert_eq!(status, 0, "the parked FLUSH completed S_OK");
}

#[test]
fn a_stopped_disk_takes_no_more_requests_from_its_queue() {
    use holdfast_block::{FaultOp, FaultRule, Trigger};
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, rx) = events();
    let (slot, faults) = faulty_slot("data");
    faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always).named("outage"));
    drive_flushes(&slot, &mem, 0x20_0000, Broken::Not, 3);
    serve(&slot, &mem, &tx);
    assert!(matches!(rx.try_recv(), Ok(DiskEvent::Error { .. })));
    // The first is parked; the others stay in the available ring, untaken.
    assert_eq!(slot.engine().status().parked, 1);
    serve(&slot, &mem, &tx);
    assert_eq!(slot.engine().status().parked, 1, "taken while stopped");
    for i in 0..3 {
        let status: u8 = mem
            .read_obj(GuestAddress(0x20_0000 + 32 * i + 16))
            .expect("status");
        assert_eq!(status, 0xff, "request {i} completed while stopped");
    }
    faults.clear_named("outage");
    assert!(slot.resume(&mem, &tx).expect("resumed").is_some());
    serve(&slot, &mem, &tx);
    for i in 0..3 {
        let status: u8 = mem
            .read_obj(GuestAddress(0x20_0000 + 32 * i + 16))
            .expect("status");
        assert_eq!(status, 0, "request {i} completed S_OK after cont");
    }
}

/// A driver's set-up (write-back) with one request per `(kind, sector, bytes)`,
/// the i-th's header at `at + 0x1_0000 * i`, its data at `+ 0x1000` (bytes
/// `i + 1`), its status byte at `+ 16` (preset to 0xff).
fn drive_requests(slot: &Slot, mem: &GuestMemoryMmap, at: u64, requests: &[(u32, u64, u32)]) {
    use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
    let vq = MockSplitQueue::new(mem, 16);
    let mut descs = Vec::new();
    for (i, &(kind, sector, bytes)) in requests.iter().enumerate() {
        let head = at + 0x1_0000 * i as u64;
        let runs: &[(u64, u32)] = if bytes == 0 {
            &[]
        } else {
            &[(head + 0x1000, bytes)]
        };
        mem.write_slice(
            &vec![i as u8 + 1; bytes as usize],
            GuestAddress(head + 0x1000),
        )
        .expect("data");
        push_chain(mem, &mut descs, head, kind, sector, runs);
    }
    vq.add_desc_chains(&descs, 0).expect("chains");
    set_up(
        slot,
        vq.create_queue::<Queue>().expect("queue"),
        1 << VIRTIO_BLK_F_FLUSH,
    );
}

/// The status byte of [`drive_requests`]'s `i`-th request.
fn request_status(mem: &GuestMemoryMmap, at: u64, i: u64) -> u8 {
    mem.read_obj(GuestAddress(at + 0x1_0000 * i + 16))
        .expect("status")
}

/// `cont`s until one is not refused as busy (at most 5 s).
fn cont_until_not_busy(
    slot: &Arc<Slot>,
    mem: &GuestMemoryMmap,
    tx: &DiskEvents,
) -> Result<Option<Replayed>, ResumeFailure> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match slot.resume(mem, tx) {
            Err(ResumeFailure::Busy { .. }) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5))
            }
            other => return other,
        }
    }
}

/// Waits until a host call of the disk's has been outstanding for [`HUNG_AFTER`].
fn until_a_call_hangs(slot: &Slot) {
    let until = Instant::now() + Duration::from_secs(10);
    while slot.call().is_none_or(|c| c.call.age() < HUNG_AFTER) {
        assert!(Instant::now() < until, "no call hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the disk's host calls all returned.
fn until_no_call(slot: &Slot) {
    let until = Instant::now() + Duration::from_secs(5);
    while slot.call().is_some() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(slot.call().is_none(), "a host call still outstanding");
}

/// A read hangs; a write beside it fails (the disk stops, the write is parked).
/// Two `cont`s are refused while the read hangs; once it returned, one replay
/// runs and the `cont` after it answers the parked write (a second replay
/// started beside the first would replay the running disk and keep its empty
/// outcome over the first's, and the write would never be answered).
#[test]
fn a_cont_while_a_call_hangs_starts_no_second_replay() {
    use holdfast_block::{FaultOp, FaultRule, Trigger};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, rx) = events();
    let (slot, faults) = faulty_slot("data");
    faults.arm(FaultRule::hang(FaultOp::Read).named("stall-read"));
    faults.arm(
        FaultRule::new(FaultOp::Write, libc::EIO, Trigger::Once)
            .in_range(64 << 10, 4096)
            .named("outage"),
    );
    let at = 0x10_0000;
    drive_requests(
        &slot,
        &mem,
        at,
        &[(VIRTIO_BLK_T_IN, 0, 4096), (VIRTIO_BLK_T_OUT, 128, 4096)],
    );
    serve(&slot, &mem, &tx);
    let until = Instant::now() + Duration::from_secs(5);
    while !slot.engine().is_stopped() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(matches!(rx.try_recv(), Ok(DiskEvent::Error { .. })));
    until_a_call_hangs(&slot);
    for cont in 1..=2 {
        match slot.resume(&mem, &tx) {
            Err(ResumeFailure::Busy { call, .. }) => {
                assert!(call.contains("read"), "cont {cont}: {call}")
            }
            other => panic!("cont {cont} while the read hangs: {other:?}"),
        }
    }
    faults.clear_named("stall-read");
    until_no_call(&slot);
    let replayed = cont_until_not_busy(&slot, &mem, &tx)
        .expect("resumed")
        .expect("replayed");
    assert_eq!(
        replayed.bytes_rewritten, 4096,
        "the failed write, rewritten"
    );
    assert_eq!(request_status(&mem, at, 0), 0, "the read");
    assert_eq!(request_status(&mem, at, 1), 0, "the parked write, answered");
    assert!(!slot.engine().is_stopped());
}

/// A disk over an image file (it can let go of it), with a fault point.
fn file_slot(id: &str) -> (Arc<Slot>, FaultHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).expect("image");
    let file = holdfast_block::FileBackend::open(&path, Default::default()).expect("open");
    let injector = holdfast_block::FaultInjector::new(file);
    let faults = injector.handle();
    let mut spec = DiskSpec::new(id, Box::new(injector), DiskConfig::default(), "disk.img");
    spec.faults = Some(faults.clone());
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    (
        Arc::new(Slot::new(spec, 0, eventfd(), eventfd())),
        faults,
        dir,
    )
}

/// A replay left running by a refused `cont` succeeds; then the disk is detached
/// and attached: the next `cont` replays again (the image may have lost what no
/// flush covered), and the disk runs: the earlier outcome is stale.
#[test]
fn a_detach_after_a_replay_ended_makes_the_next_cont_replay_again() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, rx) = events();
    let (slot, faults, _dir) = file_slot("data");
    replay_left_running_on_a_hung_write(&slot, &faults, &mem, &tx, &rx);
    faults.clear_named("stall-write");
    until_no_call(&slot);
    std::thread::sleep(Duration::from_millis(50));
    slot.change(|d| d.detach()).expect("detach");
    slot.change(|d| d.attach(None)).expect("attach");
    assert!(slot.engine().is_stopped(), "detached, the disk stopped");
    let replayed = cont_until_not_busy(&slot, &mem, &tx)
        .expect("resumed")
        .expect("replayed again");
    assert_eq!(
        replayed.bytes_rewritten, 0,
        "a second replay (the first's flush had released the buffer), not the first's outcome"
    );
    assert!(!slot.engine().is_stopped(), "the disk runs");
    let status: u8 = mem.read_obj(GuestAddress(0x20_0000 + 16)).expect("status");
    assert_eq!(status, 0, "the parked FLUSH answered, once");
}

/// `cont` is refused while a read, a write or the disk's own flush ahead of its
/// bound is outstanding and hangs, though none of them holds the disk's lock:
/// the guest must not run beside a call that may still change what it reads.
#[test]
fn cont_is_refused_while_a_call_beside_others_hangs() {
    use holdfast_block::{FaultOp, FaultRule};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, _rx) = events();
    for (op, kind) in [
        (FaultOp::Read, VIRTIO_BLK_T_IN),
        (FaultOp::Write, VIRTIO_BLK_T_OUT),
    ] {
        let (slot, faults) = faulty_slot("data");
        faults.arm(FaultRule::hang(op).named("stall"));
        let at = 0x10_0000;
        drive_requests(&slot, &mem, at, &[(kind, 0, 4096)]);
        serve(&slot, &mem, &tx);
        until_a_call_hangs(&slot);
        match slot.resume(&mem, &tx) {
            Err(ResumeFailure::Busy { disk, call }) => {
                assert_eq!(disk, "data");
                assert!(call.contains("outstanding"), "{op:?}: {call}");
            }
            other => panic!("cont while a {op:?} hangs: {other:?}"),
        }
        faults.clear_named("stall");
        until_no_call(&slot);
        assert!(cont_until_not_busy(&slot, &mem, &tx).is_ok());
        assert_eq!(request_status(&mem, at, 0), 0, "{op:?} answered");
        slot.stop_io_threads();
    }
    // The disk's own flush ahead of its bound: a bound of 6 KiB; 4 KiB written,
    // read back (alone, once the write ended), then a write elsewhere, taken with
    // the buffer past half its bound.
    let injector = holdfast_block::FaultInjector::new(MemBackend::new(1 << 20));
    let faults = injector.handle();
    let config = DiskConfig {
        unflushed_limit: 6144,
        ..DiskConfig::default()
    };
    let spec = DiskSpec::new("data", Box::new(injector), config, "memory");
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let slot = Arc::new(Slot::new(spec, 0, eventfd(), eventfd()));
    faults.arm(FaultRule::hang(FaultOp::Flush).named("stall"));
    let at = 0x10_0000;
    let requests = [
        (VIRTIO_BLK_T_OUT, 0, 4096),
        (VIRTIO_BLK_T_IN, 0, 512),
        (VIRTIO_BLK_T_OUT, 128, 512),
    ];
    drive_requests(&slot, &mem, at, &requests);
    serve(&slot, &mem, &tx);
    until_a_call_hangs(&slot);
    assert_eq!(
        slot.call().expect("a call").call.op,
        holdfast_block::HostOp::Flush
    );
    assert!(matches!(
        slot.resume(&mem, &tx),
        Err(ResumeFailure::Busy { .. })
    ));
    faults.clear_named("stall");
    until_no_call(&slot);
    assert!(cont_until_not_busy(&slot, &mem, &tx).is_ok());
    slot.stop_io_threads();
}

/// Settling at the end (`quit`, SIGTERM) waits for a disk that is busy but not
/// hung (a long replay): it reports nothing dropped, and then nothing is (not
/// "a host write outstanding for 0.0 s" after a second).
#[test]
fn settling_at_the_end_waits_for_a_disk_that_is_busy_not_hung() {
    let (slot, _) = faulty_slot("data");
    let write = holdfast_block::RequestOp::Write {
        offset: 0,
        data: vec![7u8; 4096].as_slice().into(),
    };
    slot.engine().submit(holdfast_block::Request::new(1, write));
    // Something holds the disk for 1.5 s, with no call outstanding long.
    let holding_slot = Arc::clone(&slot);
    let (held, holding) = channel();
    let holder = std::thread::spawn(move || {
        let _d = holding_slot.engine();
        let _ = held.send(());
        std::thread::sleep(Duration::from_millis(1500));
    });
    holding.recv().expect("held");
    let dropped = slot.settle_at_the_end();
    assert!(dropped.is_none(), "{dropped:?}");
    assert_eq!(slot.engine().status().buffer.bytes, 0, "flushed");
    holder.join().expect("holder");
}

/// A long write runs its host call from guest memory. The driver resets the
/// device while that call is held up, and reuses the memory: the host must end
/// up with what the buffer keeps (the bytes as they were when the write was
/// taken), not the new ones, or reads would change once a flush releases the
/// buffer.
#[test]
fn a_reset_during_a_long_write_leaves_the_host_as_the_buffer() {
    use holdfast_block::{FaultOp, FaultRule, Request, RequestOp};
    let stable = MemBackend::new(1 << 20);
    let injector = holdfast_block::FaultInjector::new(stable.clone());
    let faults = injector.handle();
    let spec = DiskSpec::new("data", Box::new(injector), DiskConfig::default(), "memory");
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let slot = Arc::new(Slot::new(spec, 0, eventfd(), eventfd()));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let (tx, _rx) = events();
    faults.arm(
        FaultRule::hang(FaultOp::Write)
            .in_range(0, 4096)
            .named("stall"),
    );
    let at = 0x20_0000;
    drive_writes(&slot, &mem, at);
    serve(&slot, &mem, &tx);
    while faults.hanging() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The copy for the buffer is made as the write is taken.
    std::thread::sleep(Duration::from_millis(50));
    slot.transport().device_mut().reset();
    mem.write_slice(&[9u8; 128 << 10], GuestAddress(at + 0x1_0000))
        .expect("the driver reuses the memory");
    faults.clear_named("stall");
    assert!(slot.wait_quiet(Duration::from_secs(5)));
    let read = slot.engine().submit(Request::new(
        1 << 40,
        RequestOp::Read {
            offset: 0,
            len: 128 << 10,
        },
    ));
    let buffered = read.completion.expect("read").data;
    assert!(
        buffered.iter().all(|&b| b == 7),
        "the buffer keeps the bytes as taken"
    );
    assert!(
        stable.contents()[..128 << 10].iter().all(|&b| b == 7),
        "the host holds what the buffer holds"
    );
    slot.stop_io_threads();
}

#[test]
fn with_a_write_log_completions_are_answered_in_the_engines_order() {
    use holdfast_block::{Completion, Outcome};
    let order = std::sync::Arc::new(super::LogOrder::default());
    let tickets: Vec<u64> = (0..4)
        .map(|i| {
            order
                .ticket(&Outcome::done(Completion::ok(i)))
                .expect("a ticket")
        })
        .collect();
    assert_eq!(tickets, [0, 1, 2, 3]);
    assert_eq!(
        order.ticket(&Outcome::parked()),
        None,
        "nothing to answer, no ticket"
    );
    // The threads arrive last ticket first; they pass in ticket order.
    let passed = std::sync::Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = tickets
        .iter()
        .rev()
        .map(|&t| {
            let (order, passed) = (order.clone(), passed.clone());
            let handle = std::thread::spawn(move || {
                order.wait(t);
                passed.lock().expect("lock").push(t);
                order.done(t);
            });
            std::thread::sleep(Duration::from_millis(20));
            handle
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(*passed.lock().expect("lock"), [0, 1, 2, 3]);
    order.wait_all();
}

/// A disk "data" on `backend` with a write log at `log_path`, and 4 MiB of guest
/// memory.
fn logged_slot(
    backend: Box<dyn Backend>,
    config: DiskConfig,
    log_path: &std::path::Path,
) -> (Arc<Slot>, GuestMemoryMmap) {
    let mut spec = DiskSpec::new("data", backend, config, "memory");
    spec.write_log = Some(holdfast_block::WriteLog::create(log_path).expect("log"));
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let slot = Arc::new(Slot::new(spec, 0, eventfd(), eventfd()));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    (slot, mem)
}

/// (From an adversarial review.) A guest that changes a page while its write is in
/// flight: the log holds the bytes the engine took (and the host got), not the page
/// as it was at completion.
#[test]
fn the_write_log_holds_the_bytes_the_host_got() {
    use holdfast_block::writelog::{read_log, LogEntry};
    use holdfast_block::{FaultOp, FaultRule};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
    let dir = tempfile::tempdir().expect("dir");
    let log_path = dir.path().join("d.wlog");
    let stable = MemBackend::new(1 << 20);
    let injector = holdfast_block::FaultInjector::new(stable.clone());
    let faults = injector.handle();
    let (slot, mem) = logged_slot(Box::new(injector), DiskConfig::default(), &log_path);
    let (tx, _rx) = events();
    faults.arm(
        FaultRule::hang(FaultOp::Write)
            .in_range(0, 4096)
            .named("stall"),
    );
    let at = 0x20_0000;
    drive_requests(&slot, &mem, at, &[(VIRTIO_BLK_T_OUT, 0, 4096)]); // bytes all 1
    serve(&slot, &mem, &tx);
    while faults.hanging() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    mem.write_slice(&[0x55u8; 4096], GuestAddress(at + 0x1000))
        .expect("the guest changes its page");
    faults.clear_named("stall");
    assert!(slot.wait_quiet(Duration::from_secs(5)));
    assert_eq!(request_status(&mem, at, 0), 0, "completed S_OK");
    let host = stable.contents()[..4096].to_vec();
    let entries = read_log(&std::fs::read(&log_path).expect("read log")).expect("log");
    let logged = match &entries[..] {
        [LogEntry::Write { offset: 0, data }] => data.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(host[0], 1, "the host got the bytes as taken");
    assert_eq!(
        logged[0], host[0],
        "the log says the write put {:#x} where the host got {:#x}",
        logged[0], host[0]
    );
    slot.stop_io_threads();
}

/// (From an adversarial review.) A writethrough disk's write is on stable storage
/// when it completes, with no FLUSH from the guest: its entry is FUA, stable in
/// every crash state.
#[test]
fn a_writethrough_write_is_stable_in_every_crash_state() {
    use holdfast_block::sim::powercut::{CrashState, CutMode};
    use holdfast_block::writelog::read_log;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
    let dir = tempfile::tempdir().expect("dir");
    let log_path = dir.path().join("d.wlog");
    let backend: Box<dyn Backend> = Box::new(MemBackend::new(1 << 20));
    let config = DiskConfig {
        writeback: false,
        ..DiskConfig::default()
    };
    let (slot, mem) = logged_slot(backend, config, &log_path);
    let (tx, _rx) = events();
    let at = 0x20_0000;
    drive_requests(&slot, &mem, at, &[(VIRTIO_BLK_T_OUT, 0, 4096)]);
    serve(&slot, &mem, &tx);
    assert!(slot.wait_quiet(Duration::from_secs(5)));
    assert_eq!(request_status(&mem, at, 0), 0, "completed S_OK");
    assert!(!slot.transport().device().writeback(), "writethrough");
    let entries = read_log(&std::fs::read(&log_path).expect("read log")).expect("log");
    for mode in CutMode::ALL {
        let state = CrashState::choose(&entries, mode, 0);
        assert!(
            state.tail.is_empty() && state.stable == entries.len(),
            "{mode}: a write flushed before it completed is not stable: {state:?}"
        );
    }
    slot.stop_io_threads();
}
