//! The virtio-blk disk driven through real split virtqueues in test memory
//! (virtio-queue's mock): its virtio-mmio transport, the disk's worker and its I/O
//! threads ([`serve`], as `holdfast run` has them), over the holdfast disk engine.
//! No KVM.

mod common;

use common::rig::Rig;
use holdfast_block::{
    Disk, DiskConfig, ErrorPolicy, FaultHandle, FaultInjector, FaultOp, FaultRule, MemBackend,
    Trigger,
};
use holdfast_vmm::disk::{DiskEvent, ResumeFailure};
use holdfast_vmm::virtio::block::{BlockDevice, QUEUE_SIZE};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 4 << 20;
const DISK_SIZE: u64 = 1 << 20;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

type Dev = BlockDevice;

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// A device alone, to look at what it offers (nothing served).
fn device(config: DiskConfig) -> Dev {
    BlockDevice::new(&Disk::new(
        FaultInjector::new(MemBackend::new(DISK_SIZE)),
        config,
    ))
}

fn rig(config: DiskConfig) -> (Rig, MemBackend, FaultHandle) {
    let disk = MemBackend::new(DISK_SIZE);
    let (rig, faults) = Rig::new(Box::new(disk.clone()), config);
    (rig, disk, faults)
}

/// One descriptor: (guest address, length, device-writable).
type Part = (u64, u32, bool);

/// Lays out chains in the descriptor table and makes them available.
struct Driver<'a> {
    vq: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    mem: &'a GuestMemoryMmap<()>,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap<()>) -> Self {
        Driver {
            vq: MockSplitQueue::new(mem, QUEUE_SIZE),
            mem,
            next_desc: 0,
        }
    }

    fn queue(&self) -> Queue {
        self.vq.create_queue().expect("queue")
    }

    fn chain(&mut self, parts: &[Part]) -> u16 {
        let first = self.next_desc;
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < parts.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, first + i as u16 + 1))
            })
            .collect();
        self.vq.add_desc_chains(&descs, first).expect("add chain");
        self.next_desc += parts.len() as u16;
        first
    }

    /// A request whose descriptors lie in an indirect table at `table` (as Linux lays
    /// out a request of several segments when the device offers INDIRECT_DESC): the
    /// ring holds one descriptor that points at the table.
    fn indirect(&mut self, table: u64, parts: &[Part]) -> u16 {
        for (i, &(addr, len, write)) in parts.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1));
            self.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .expect("indirect descriptor");
        }
        let head = self.next_desc;
        let len = 16 * parts.len() as u32;
        let d = Descriptor::new(table, len, VRING_DESC_F_INDIRECT as u16, 0);
        self.vq
            .add_desc_chains(&[RawDescriptor::from(d)], head)
            .expect("add chain");
        self.next_desc += 1;
        head
    }

    /// `avail_event`, where the device asks to be notified next (event indexes).
    fn avail_event(&self) -> u16 {
        let at = self.vq.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(at)).expect("avail_event")
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        self.mem
            .write_obj(kind.to_le(), GuestAddress(at))
            .expect("type");
        self.mem
            .write_obj(0u32, GuestAddress(at + 4))
            .expect("reserved");
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at + 8))
            .expect("sector");
    }

    /// A request laid out the Linux way: header, data, status in separate descriptors.
    fn request(&mut self, slot: u64, kind: u32, sector: u64, data: Option<(u32, bool)>) -> u16 {
        let base = 0x10_0000 + slot * 0x1_0000;
        self.header(base, kind, sector);
        let mut parts = vec![(base, 16, false)];
        if let Some((len, write)) = data {
            parts.push((base + 0x100, len, write));
        }
        parts.push((base + 0xF000, 1, true));
        self.mem
            .write_obj(0xFFu8, GuestAddress(base + 0xF000))
            .expect("status");
        self.chain(&parts)
    }

    fn data_addr(slot: u64) -> GuestAddress {
        GuestAddress(0x10_0000 + slot * 0x1_0000 + 0x100)
    }

    fn status(&self, slot: u64) -> u8 {
        self.mem
            .read_obj(GuestAddress(0x10_0000 + slot * 0x1_0000 + 0xF000))
            .expect("status")
    }

    /// The used ring's entries: (head, length).
    fn used(&self) -> Vec<(u32, u32)> {
        let n = self.vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = self
                    .vq
                    .used()
                    .ring()
                    .ref_at(i as usize)
                    .expect("used entry")
                    .load();
                (e.id(), e.len())
            })
            .collect()
    }
}

#[test]
fn write_then_read_back() {
    let mem = memory();
    let (rig, disk, _) = rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    mem.write_slice(&[0xAB; 1024], Driver::data_addr(0))
        .expect("data");
    let w = d.request(0, VIRTIO_BLK_T_OUT, 3, Some((1024, false)));
    let f = d.request(1, VIRTIO_BLK_T_FLUSH, 0, None);
    let r = d.request(2, VIRTIO_BLK_T_IN, 3, Some((1024, true)));
    rig.start(d.queue(), 0);
    let run = rig.serve(&mem);
    assert_eq!(d.used().len(), 3);
    assert!(run.errors.is_empty());
    assert_eq!((d.status(0), d.status(1), d.status(2)), (S_OK, S_OK, S_OK));
    // Answers reach the used ring in the order their calls end, not always the
    // order they were made in.
    let mut used = d.used();
    used.sort_unstable();
    let mut want = vec![(w as u32, 1), (f as u32, 1), (r as u32, 1025)];
    want.sort_unstable();
    assert_eq!(used, want);
    let mut back = [0u8; 1024];
    mem.read_slice(&mut back, Driver::data_addr(2))
        .expect("read back");
    assert_eq!(back, [0xAB; 1024]);
    assert_eq!(&disk.contents()[1536..2560], &[0xAB; 1024][..]);
    // query-blockstats' counters: one of each, their bytes.
    let s = rig.slot.info().stats;
    assert_eq!(
        (s.wr.operations, s.wr.bytes, s.rd.operations, s.rd.bytes),
        (1, 1024, 1, 1024)
    );
    assert_eq!((s.flush.operations, s.flush.failed), (1, 0));
    assert!(s.wr.total_time_ns > 0 && s.flush.total_time_ns > 0);
    assert_eq!(s.replays, 0);
}

#[test]
fn a_write_gathers_its_bytes_across_descriptors_and_memory_regions() {
    // Two guest memory regions, back to back: one descriptor crosses from the first
    // into the second. The header shares its descriptor with the first data bytes.
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_SIZE / 2),
        (GuestAddress(MEM_SIZE as u64 / 2), MEM_SIZE / 2),
    ])
    .expect("guest memory");
    let (rig, disk, _) = rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    let payload: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 253) as u8).collect();
    let boundary = MEM_SIZE as u64 / 2;
    d.header(0x18_0000, VIRTIO_BLK_T_OUT, 2);
    mem.write_slice(&payload[..512], GuestAddress(0x18_0010))
        .expect("first part");
    mem.write_slice(&payload[512..1536], GuestAddress(boundary - 0x100))
        .expect("crossing part");
    mem.write_slice(&payload[1536..], GuestAddress(0x30_0000))
        .expect("last part");
    mem.write_obj(0xFFu8, GuestAddress(0x31_0000))
        .expect("status");
    let head = d.chain(&[
        (0x18_0000, 16 + 512, false),
        (boundary - 0x100, 1024, false),
        (0x30_0000, 512, false),
        (0x31_0000, 1, true),
    ]);
    rig.start(d.queue(), 0);
    rig.serve(&mem);
    assert_eq!(d.used(), vec![(head as u32, 1)]);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x31_0000)).expect("status"),
        S_OK
    );
    assert_eq!(&disk.contents()[1024..1024 + 2048], &payload[..]);
    // A chain whose data ends past the guest's memory is an error, and writes nothing.
    let past = MEM_SIZE as u64 - 0x100;
    d.header(0x19_0000, VIRTIO_BLK_T_OUT, 100);
    mem.write_obj(0xFFu8, GuestAddress(0x32_0000))
        .expect("status");
    d.chain(&[
        (0x19_0000, 16, false),
        (past, 512, false),
        (0x32_0000, 1, true),
    ]);
    let _ = rig.slot.notify.write(1);
    rig.serve(&mem);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x32_0000)).expect("status"),
        S_IOERR
    );
    assert!(disk.contents()[100 * 512..101 * 512]
        .iter()
        .all(|&x| x == 0));
}

#[test]
fn header_data_and_status_in_one_writable_descriptor_pair() {
    // Any layout is legal: header in one descriptor, data and status sharing the
    // last writable one.
    let mem = memory();
    let (rig, disk, _) = rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    d.header(0x20_0000, VIRTIO_BLK_T_IN, 0);
    disk_write(&disk, 0, &[7; 512]);
    mem.write_slice(&[0xEE; 513], GuestAddress(0x20_1000))
        .expect("fill");
    let head = d.chain(&[(0x20_0000, 16, false), (0x20_1000, 513, true)]);
    rig.start(d.queue(), 0);
    rig.serve(&mem);
    assert_eq!(d.used(), vec![(head as u32, 513)]);
    let mut got = [0u8; 513];
    mem.read_slice(&mut got, GuestAddress(0x20_1000))
        .expect("read");
    assert_eq!(&got[..512], &[7; 512][..]);
    assert_eq!(got[512], S_OK);
}

fn disk_write(disk: &MemBackend, offset: u64, data: &[u8]) {
    use holdfast_block::Backend;
    disk.clone().write_at(data, offset).expect("seed disk");
}

#[test]
fn get_id_is_padded_to_twenty_bytes() {
    let mem = memory();
    let config = DiskConfig {
        serial: "disk-7".into(),
        ..Default::default()
    };
    let (rig, _, _) = rig(config);
    let mut d = Driver::new(&mem);
    mem.write_slice(&[0xEE; 20], Driver::data_addr(0))
        .expect("fill");
    d.request(0, VIRTIO_BLK_T_GET_ID, 0, Some((20, true)));
    rig.start(d.queue(), 0);
    rig.serve(&mem);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, Driver::data_addr(0)).expect("id");
    assert_eq!(&id[..6], b"disk-7");
    assert_eq!(&id[6..], &[0u8; 14]);
    assert_eq!(d.status(0), S_OK);
}

#[test]
fn write_zeroes_and_discard_segments() {
    let mem = memory();
    let (rig, disk, _) = rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    mem.write_slice(&[9; 4096], Driver::data_addr(0))
        .expect("data");
    d.request(0, VIRTIO_BLK_T_OUT, 0, Some((4096, false)));
    let segment = |sector: u64, sectors: u32, flags: u32| {
        let mut s = Vec::new();
        s.extend_from_slice(&sector.to_le_bytes());
        s.extend_from_slice(&sectors.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
        s
    };
    mem.write_slice(&segment(1, 2, 0), Driver::data_addr(1))
        .expect("seg");
    d.request(1, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, false)));
    mem.write_slice(&segment(6, 1, 1), Driver::data_addr(2))
        .expect("seg");
    d.request(2, VIRTIO_BLK_T_DISCARD, 0, Some((16, false)));
    mem.write_slice(&segment(6, 1, 4), Driver::data_addr(3))
        .expect("seg");
    d.request(3, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, false)));
    rig.start(d.queue(), 0);
    rig.serve(&mem);
    assert_eq!(d.status(1), S_OK);
    assert_eq!(d.status(2), S_UNSUPP, "unmap on a discard");
    assert_eq!(d.status(3), S_UNSUPP, "reserved flag");
    let bytes = disk.contents();
    assert_eq!(bytes[511], 9);
    assert!(bytes[512..1536].iter().all(|&b| b == 0));
    assert_eq!(bytes[1536], 9);
}

#[test]
fn malformed_chains_end_as_errors_not_crashes() {
    let mem = memory();
    let (rig, disk, _) = rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    // Header too short.
    let short = d.chain(&[(0x30_0000, 8, false), (0x30_1000, 1, true)]);
    // No status byte at all.
    d.header(0x31_0000, VIRTIO_BLK_T_FLUSH, 0);
    let no_status = d.chain(&[(0x31_0000, 16, false)]);
    // Data outside guest memory.
    d.header(0x32_0000, VIRTIO_BLK_T_OUT, 0);
    let wild = d.chain(&[
        (0x32_0000, 16, false),
        (MEM_SIZE as u64 + 0x1000, 512, false),
        (0x32_1000, 1, true),
    ]);
    // Not a multiple of the sector size.
    d.header(0x33_0000, VIRTIO_BLK_T_IN, 0);
    let odd = d.chain(&[
        (0x33_0000, 16, false),
        (0x33_0100, 100, true),
        (0x33_1000, 1, true),
    ]);
    // A readable descriptor after a writable one.
    d.header(0x34_0000, VIRTIO_BLK_T_OUT, 0);
    let order = d.chain(&[
        (0x34_0000, 16, false),
        (0x34_1000, 1, true),
        (0x34_0100, 512, false),
    ]);
    // Past the end of the disk.
    d.header(0x35_0000, VIRTIO_BLK_T_IN, DISK_SIZE / 512);
    let beyond = d.chain(&[
        (0x35_0000, 16, false),
        (0x35_0100, 512, true),
        (0x35_1000, 1, true),
    ]);
    // A type nobody knows; an oversized read that must not be allocated.
    d.header(0x36_0000, 0x7777, 0);
    let unknown = d.chain(&[(0x36_0000, 16, false), (0x36_1000, 1, true)]);
    d.header(0x37_0000, VIRTIO_BLK_T_IN, 0);
    let huge = d.chain(&[
        (0x37_0000, 16, false),
        (0x0, u32::MAX - 4096, true),
        (0x37_1000, 1, true),
    ]);
    assert!(rig.slot.info().stats.last_io.is_none(), "no request yet");
    rig.start(d.queue(), 0);
    let run = rig.serve(&mem);
    assert_eq!(d.used().len(), 8);
    assert!(run.errors.is_empty(), "guest mistakes are not host errors");
    let used: std::collections::HashMap<u32, u32> = d.used().into_iter().collect();
    assert_eq!(used[&(no_status as u32)], 0);
    for (head, at) in [
        (short, 0x30_1000),
        (wild, 0x32_1000),
        (odd, 0x33_1000),
        (order, 0x34_1000),
        (beyond, 0x35_1000),
        (huge, 0x37_1000),
    ] {
        assert_eq!(used[&(head as u32)], 1, "head {head}");
        let status: u8 = mem.read_obj(GuestAddress(at)).expect("status");
        assert_eq!(status, S_IOERR, "head {head}");
    }
    let status: u8 = mem.read_obj(GuestAddress(0x36_1000)).expect("status");
    assert_eq!(status, S_UNSUPP);
    assert_eq!(used[&(unknown as u32)], 1);
    assert!(!rig.status().stopped);
    // query-blockstats: refused as malformed once the header says what they are
    // (the wild write; the odd and the huge read), answered with an error (the read
    // past the end).
    let stats = rig.slot.info().stats;
    assert_eq!((stats.wr.invalid, stats.rd.invalid), (1, 2));
    assert_eq!((stats.rd.failed, stats.rd.operations), (1, 0));
    assert!(stats.last_io.is_some(), "idle_time_ns counts from these");
    assert!(
        disk.contents().iter().all(|&b| b == 0),
        "nothing reached the disk"
    );
}

#[test]
fn a_looping_chain_terminates() {
    let mem = memory();
    let (rig, _, _) = rig(DiskConfig::default());
    let d = Driver::new(&mem);
    d.header(0x20_0000, VIRTIO_BLK_T_FLUSH, 0);
    // Two descriptors pointing at each other forever.
    let flags = VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(Descriptor::new(0x20_0000, 16, flags, 1)),
        RawDescriptor::from(Descriptor::new(
            0x20_1000,
            1,
            flags | VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    d.vq.add_desc_chains(&descs[..1], 0).expect("head");
    d.vq.desc_table().store(1, descs[1]).expect("loop");
    rig.start(d.queue(), 0);
    rig.serve(&mem);
    assert_eq!(d.used().len(), 1);
}

#[test]
fn host_error_stops_taking_requests_until_resume() {
    let mem = memory();
    let (rig, disk, faults) = rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    mem.write_slice(&[5; 512], Driver::data_addr(0))
        .expect("data");
    mem.write_slice(&[6; 512], Driver::data_addr(2))
        .expect("data");
    d.request(0, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
    let outage = faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always));
    d.request(1, VIRTIO_BLK_T_FLUSH, 0, None);
    d.request(2, VIRTIO_BLK_T_OUT, 1, Some((512, false)));
    rig.start(d.queue(), 0);
    let run = rig.serve(&mem);
    assert_eq!(
        d.used().len(),
        1,
        "only the write before the failed flush completed"
    );
    let report = run.errors.first().expect("host error reported");
    assert_eq!(report.action, holdfast_block::ErrorAction::Stop);
    assert!(rig.status().stopped);
    assert_eq!(d.status(1), 0xFF, "the failed flush is not completed");
    assert_eq!(rig.status().parked, 1, "only the failed flush is parked");
    assert_eq!(
        d.status(2),
        0xFF,
        "the write after it was not taken from the ring"
    );
    // cont while still broken: nothing completes.
    assert!(matches!(
        rig.resume(&mem),
        Err(ResumeFailure::Replay { .. })
    ));
    assert_eq!(d.used().len(), 1);
    faults.clear(outage);
    assert!(rig.resume(&mem).expect("resume").is_some(), "replayed");
    assert_eq!(d.status(1), S_OK);
    assert_eq!(d.used().len(), 2);
    rig.serve(&mem);
    assert_eq!(d.used().len(), 3);
    assert_eq!(d.status(2), S_OK);
    assert_eq!(
        &disk.contents()[..1024],
        &[[5u8; 512], [6; 512]].concat()[..]
    );
    // The flush that failed on the host was answered ok after the replay: the guest
    // saw no failure, and the counters say what the guest saw.
    let s = rig.slot.info().stats;
    assert_eq!((s.wr.operations, s.flush.operations), (2, 1));
    assert_eq!((s.wr.failed, s.flush.failed), (0, 0));
    assert_eq!((s.replays, s.replayed_bytes), (1, 512));
}

#[test]
fn reset_while_parked_keeps_completed_writes() {
    let mem = memory();
    let (rig, _, faults) = rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    let outage = faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always));
    mem.write_slice(&[5; 512], Driver::data_addr(0))
        .expect("data");
    d.request(0, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
    d.request(1, VIRTIO_BLK_T_FLUSH, 0, None);
    rig.start(d.queue(), 0);
    rig.serve(&mem);
    assert_eq!(d.used().len(), 1);
    assert_eq!(rig.status().parked, 1);
    rig.reset();
    assert_eq!(rig.status().parked, 0, "the reset dropped the parked FLUSH");
    assert_eq!(rig.status().buffer.bytes, 512);
    faults.clear(outage);
    let replayed = rig.resume(&mem).expect("resume").expect("replayed");
    assert_eq!(replayed.bytes_rewritten, 512);
    assert_eq!(d.used().len(), 1, "nobody waits for the dropped flush");
}

#[test]
fn a_request_in_an_indirect_table_is_served() {
    let mem = memory();
    let (rig, disk, _) = rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    // A write of two segments and a read of two, each in a table of its own.
    let (w, r) = (0x10_0000u64, 0x20_0000u64);
    d.header(w, VIRTIO_BLK_T_OUT, 8);
    mem.write_slice(&[0x5A; 512], GuestAddress(w + 0x1000))
        .expect("data");
    mem.write_slice(&[0xA5; 1024], GuestAddress(w + 0x3000))
        .expect("data");
    let wh = d.indirect(
        0x30_0000,
        &[
            (w, 16, false),
            (w + 0x1000, 512, false),
            (w + 0x3000, 1024, false),
            (w + 0xF000, 1, true),
        ],
    );
    d.header(r, VIRTIO_BLK_T_IN, 8);
    let rh = d.indirect(
        0x30_1000,
        &[
            (r, 16, false),
            (r + 0x1000, 1024, true),
            (r + 0x3000, 512, true),
            (r + 0xF000, 1, true),
        ],
    );
    rig.start(d.queue(), 0);
    rig.serve(&mem);
    // The write and the read overlap: the read ran after the write ended (their
    // answers may reach the used ring in either order).
    let mut used = d.used();
    used.sort_unstable();
    let mut want = vec![(u32::from(wh), 1), (u32::from(rh), 1536 + 1)];
    want.sort_unstable();
    assert_eq!(used, want);
    for at in [w + 0xF000, r + 0xF000] {
        assert_eq!(mem.read_obj::<u8>(GuestAddress(at)).expect("status"), S_OK);
    }
    let on_disk = disk.contents()[8 * 512..8 * 512 + 1536].to_vec();
    assert_eq!(&on_disk[..512], &[0x5A; 512][..]);
    assert_eq!(&on_disk[512..], &[0xA5; 1024][..]);
    let mut back = vec![0u8; 1536];
    mem.read_slice(&mut back[..1024], GuestAddress(r + 0x1000))
        .expect("read");
    mem.read_slice(&mut back[1024..], GuestAddress(r + 0x3000))
        .expect("read");
    assert_eq!(back, on_disk);
}

#[test]
fn an_empty_queue_tells_the_driver_where_to_notify_next() {
    for event_idx in [true, false] {
        let mem = memory();
        let (rig, _, _) = rig(DiskConfig::default());
        let mut d = Driver::new(&mem);
        for slot in 0..3 {
            d.request(slot, VIRTIO_BLK_T_FLUSH, 0, None);
        }
        let without = if event_idx {
            0
        } else {
            1 << VIRTIO_RING_F_EVENT_IDX
        };
        rig.start(d.queue(), without);
        rig.serve(&mem);
        assert_eq!(d.used().len(), 3);
        // With event indexes: notify when the fourth request (index 3) is made
        // available; without, avail_event is not the device's to write.
        let expected = if event_idx { 3 } else { 0 };
        assert_eq!(d.avail_event(), expected, "event_idx {event_idx}");
        let flags: u16 = mem.read_obj(d.vq.used_addr()).expect("used flags");
        assert_eq!(flags, 0, "event_idx {event_idx}");
    }
}

#[test]
fn features_and_config_space() {
    let dev = device(DiskConfig::default());
    let f = dev.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_ne!(f & (1 << 32), 0, "VERSION_1");
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    let mut capacity = [0u8; 8];
    dev.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_SIZE / 512);
    let mut past_end = [0xFFu8; 4];
    dev.read_config(200, &mut past_end);
    assert_eq!(past_end, [0; 4]);
    let ro = device(DiskConfig {
        read_only: true,
        ..Default::default()
    });
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn cache_mode_follows_flush_feature_and_wce() {
    let mem = memory();
    let config = DiskConfig {
        werror: ErrorPolicy::Report,
        ..Default::default()
    };
    let (rig, _, faults) = rig(config);
    // A driver without FLUSH gets writethrough: its write is flushed before it completes.
    faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always));
    let mut d = Driver::new(&mem);
    d.request(0, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
    rig.start(d.queue(), 1 << VIRTIO_BLK_F_FLUSH);
    rig.serve(&mem);
    assert_eq!(d.status(0), S_IOERR, "the covering flush failed");
    assert!(!rig.slot.info().writeback);
    // With FLUSH and CONFIG_WCE (after a reset), the guest turns the write cache off
    // and on through the config space.
    rig.slot.write_register(0x70, &0u32.to_le_bytes());
    rig.start(Driver::new(&mem).queue(), 0);
    assert!(rig.slot.info().writeback);
    let wce_at = 0x100 + 32;
    rig.slot.write_register(wce_at, &[0]);
    let mut wce = [9u8];
    rig.slot.read_register(wce_at, &mut wce);
    assert_eq!(wce, [0]);
    assert!(!rig.slot.info().writeback);
    rig.slot.write_register(wce_at, &[1]);
    assert!(rig.slot.info().writeback);
}

fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sector.to_le_bytes());
    s.extend_from_slice(&sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

/// Malformed DISCARD and WRITE_ZEROES requests are the guest's errors: they never
/// reach the host (here a host that fails every call, as fallocate(len = 0) fails
/// with EINVAL), so they never stop the disk.
#[test]
fn discard_and_write_zeroes_obey_negotiation_and_the_config_space_limits() {
    let mem = memory();
    let (rig, disk, faults) = rig(DiskConfig::default());
    faults.arm(FaultRule::new(FaultOp::Any, libc::EINVAL, Trigger::Always));
    let mut d = Driver::new(&mem);
    let max = (32u32 << 20) / 512;
    let cases: [(u32, Vec<u8>, u8, &str); 7] = [
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            segment(8, 0, 0),
            S_IOERR,
            "zero sectors",
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            segment(8, 0, 0),
            S_IOERR,
            "zero sectors",
        ),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            segment(0, max + 1, 0),
            S_IOERR,
            "past max_write_zeroes_sectors",
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            segment(0, max + 1, 0),
            S_IOERR,
            "past max_discard_sectors",
        ),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            [segment(0, 1, 0), segment(4, 1, 0)].concat(),
            S_IOERR,
            "two segments",
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            segment(u64::MAX / 256, 8, 0),
            S_IOERR,
            "sector overflow",
        ),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            segment(DISK_SIZE / 512, 1, 0),
            S_IOERR,
            "past the disk's end",
        ),
    ];
    for (slot, (kind, seg, _, _)) in cases.iter().enumerate() {
        mem.write_slice(seg, Driver::data_addr(slot as u64))
            .expect("segment");
        d.request(slot as u64, *kind, 0, Some((seg.len() as u32, false)));
    }
    rig.start(d.queue(), 0);
    let run = rig.serve(&mem);
    for (slot, (_, _, want, what)) in cases.iter().enumerate() {
        assert_eq!(d.status(slot as u64), *want, "{what}");
    }
    assert_eq!(d.used().len(), cases.len());
    assert!(
        run.errors.is_empty(),
        "a guest's mistake passed for a host error"
    );
    assert!(!rig.status().stopped);
    assert!(disk.contents().iter().all(|&b| b == 0));

    // A driver that did not negotiate them gets S_UNSUPP, even for good requests.
    let (rig, _, _) = self::rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    for (slot, kind) in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES]
        .into_iter()
        .enumerate()
    {
        mem.write_slice(&segment(0, 1, 0), Driver::data_addr(slot as u64))
            .expect("segment");
        d.request(slot as u64, kind, 0, Some((16, false)));
    }
    rig.start(
        d.queue(),
        1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES,
    );
    rig.serve(&mem);
    assert_eq!((d.status(0), d.status(1)), (S_UNSUPP, S_UNSUPP));
}

/// A replay that succeeded is a successful resume even when the guest broke its
/// queue meanwhile: the bytes are on the host, the rewrite is reported, and the
/// broken queue is the device's to report (it needs a reset).
#[test]
fn a_broken_used_ring_does_not_undo_a_successful_replay() {
    let mem = memory();
    let (rig, disk, faults) = rig(DiskConfig::default());
    let mut d = Driver::new(&mem);
    mem.write_slice(&[7; 512], Driver::data_addr(0))
        .expect("data");
    d.request(0, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
    let outage = faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always));
    d.request(1, VIRTIO_BLK_T_FLUSH, 0, None);
    rig.start(d.queue(), 0);
    rig.serve(&mem);
    assert!(rig.status().stopped);
    faults.clear(outage);
    rig.slot.transport().queues_mut()[0].set_used_ring_address(Some(0xFFFF_0000), Some(0x10));
    let resumed = rig
        .resume(&mem)
        .expect("the replay succeeded")
        .expect("replayed");
    assert_eq!(resumed.bytes_rewritten, 512);
    assert!(
        rig.events
            .try_iter()
            .any(|i| matches!(i, DiskEvent::NeedsReset { .. })),
        "the broken queue is the device's to report"
    );
    assert!(!rig.status().stopped);
    assert_eq!(&disk.contents()[..512], &[7u8; 512][..]);
}

#[test]
fn a_long_write_is_taken_where_it_lies_in_guest_memory() {
    use holdfast_vmm::virtio::block::{Next, BORROW_FROM};
    use vm_memory::GuestMemory;
    // Two guest memory regions, back to back; the second data descriptor crosses
    // from the first into the second.
    let half = MEM_SIZE as u64 / 2;
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_SIZE / 2),
        (GuestAddress(half), MEM_SIZE / 2),
    ])
    .expect("guest memory");
    let mut dev = device(DiskConfig::default());
    dev.ack_features(dev.features());
    let mut d = Driver::new(&mem);
    let len = BORROW_FROM as u32 * 2;
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
    let first = 0x10_0000;
    let crossing = half - 0x1000;
    let split = len as usize / 2;
    mem.write_slice(&payload[..split], GuestAddress(first))
        .expect("first part");
    mem.write_slice(&payload[split..], GuestAddress(crossing))
        .expect("crossing part");
    d.header(0x0F_0000, VIRTIO_BLK_T_OUT, 8);
    d.chain(&[
        (0x0F_0000, 16, false),
        (first, split as u32, false),
        (crossing, len - split as u32, false),
        (0x0F_1000, 1, true),
    ]);
    // And a short write after it, copied at once.
    d.request(1, VIRTIO_BLK_T_OUT, 0, Some((4096, false)));
    let mut q = d.queue();
    let Next::GuestWrite(write, _) = dev.next(&mem, &mut q).expect("queue") else {
        panic!("a write of {len} bytes is taken where it lies");
    };
    assert_eq!((write.offset, write.bytes()), (8 * 512, u64::from(len)));
    let host = |at: u64| {
        let slice = mem
            .get_slices(GuestAddress(at), 1, vm_memory::Permissions::Read)
            .expect("in memory")
            .next()
            .expect("a slice")
            .expect("mapped");
        slice.ptr_guard().as_ptr()
    };
    let runs: Vec<(*const u8, usize)> =
        write.runs().iter().map(|r| (r.as_ptr(), r.len())).collect();
    assert_eq!(
        runs,
        vec![
            (host(first), split),
            (host(crossing), 0x1000),
            (host(half), len as usize - split - 0x1000),
        ],
        "the runs are the guest's memory, split where its regions are"
    );
    assert_eq!(&write.copy()[..], &payload[..]);
    assert!(
        matches!(dev.next(&mem, &mut q).expect("queue"), Next::Request(..)),
        "a short write is copied at once"
    );
}
