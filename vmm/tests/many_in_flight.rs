//! Many requests in flight on a real image file, through the path that ships: the
//! device's virtqueue, the disk's worker and its 32 I/O threads
//! (docs/durability.md, "Requests in flight"). Each round the guest fills the queue
//! with up to 80 requests at once (writes, reads, flushes; 512 bytes to 1 MiB at
//! 512-byte alignment; neighbours in one 4 KiB block, overlapping, apart), the
//! worker serves them, and every answer is checked against a model of what the
//! guest was told (the oracle: a read shows the latest write queued before it). After
//! the rounds, a FLUSH; then the host's page cache for the image is dropped
//! (`posix_fadvise(DONTNEED)`) and every acked write must be in the file.
//!
//! The image is opened buffered, `O_DIRECT` with the alignment its file system
//! reports, and `O_DIRECT` at 4 KiB (as on 4K-native storage: then 512-byte writes
//! are read-modify-writes of host blocks). `HOLDFAST_STRESS_SEED` repeats a run
//! (each prints its seed); `HOLDFAST_STRESS_ROUNDS` makes it longer (default 100).
//!
//! With a write log (`write-log=`, 20 rounds): every acked write and every flush is
//! in the log, the log ends with the last flush, and the log replayed onto the empty
//! image in its order gives the image exactly (overlapping writes complete in the
//! order they reach the host).

mod common;

use std::os::unix::fs::FileExt;

use common::rig::Rig;
use holdfast_block::sim::oracle::{FlushTicket, Oracle, ReadTicket, WriteId, SECTOR};
use holdfast_block::{DiskConfig, FileBackend, FileOptions};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const IMAGE: u64 = 32 << 20;
const MEM: usize = 64 << 20;
/// Request headers (and status bytes) from here, 32 bytes apart.
const HEADERS: u64 = 0x10_0000;
/// Data from here to the end of memory.
const DATA: u64 = 0x20_0000;
const PER_ROUND: usize = 80;
/// Data a round's requests take at most.
const ROUND_BYTES: u64 = 40 << 20;

/// xorshift64*: enough randomness for offsets and sizes, repeatable from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A range in sectors: mostly in a few hot 4 KiB blocks (neighbours, overlaps),
/// sometimes anywhere; mostly short, sometimes up to 1 MiB.
fn range(rng: &mut Rng) -> (u64, u64) {
    let sectors_in = IMAGE / SECTOR;
    let sector = if rng.below(5) < 4 {
        rng.below(64) * 8 + rng.below(8)
    } else {
        rng.below(sectors_in)
    };
    let len = match rng.below(10) {
        0..=5 => 1 + rng.below(8),
        6..=8 => 9 + rng.below(120),
        _ => 129 + rng.below(1920),
    };
    (sector, len.min(sectors_in - sector))
}

enum Waiting {
    Write(WriteId),
    Flush(FlushTicket),
    Read(ReadTicket, GuestAddress, usize),
}

/// One request the guest made: where its status byte is, and what it waits for.
struct Made {
    status: GuestAddress,
    waiting: Waiting,
}

/// A round: the guest makes its requests, all at once; the worker serves them;
/// every answer is checked.
fn round(rig: &Rig, mem: &GuestMemoryMmap<()>, oracle: &mut Oracle, requests: &[(u32, u64, u64)]) {
    rig.reset();
    let vq = MockSplitQueue::new(mem, 256);
    let mut descs = Vec::new();
    let mut made = Vec::new();
    let mut data = DATA;
    for (i, &(kind, sector, sectors)) in requests.iter().enumerate() {
        let head = HEADERS + 32 * i as u64;
        mem.write_obj(kind, GuestAddress(head)).expect("type");
        mem.write_obj(0u32, GuestAddress(head + 4))
            .expect("reserved");
        mem.write_obj(sector, GuestAddress(head + 8))
            .expect("sector");
        let status = GuestAddress(head + 16);
        mem.write_obj(0xffu8, status).expect("status");
        let (offset, len) = (sector * SECTOR, sectors * SECTOR);
        let next = descs.len() as u16 + 1;
        descs.push(RawDescriptor::from(Descriptor::new(
            head,
            16,
            VRING_DESC_F_NEXT as u16,
            next,
        )));
        let waiting = match kind {
            VIRTIO_BLK_T_OUT => {
                let (id, bytes) = oracle.write(offset, len);
                mem.write_slice(&bytes, GuestAddress(data)).expect("data");
                Waiting::Write(id)
            }
            VIRTIO_BLK_T_IN => Waiting::Read(
                oracle.read_submitted(offset, len),
                GuestAddress(data),
                len as usize,
            ),
            _ => Waiting::Flush(oracle.flush_submitted()),
        };
        if kind != VIRTIO_BLK_T_FLUSH {
            let flags = VRING_DESC_F_NEXT as u16
                | if kind == VIRTIO_BLK_T_IN {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
            let next = descs.len() as u16 + 1;
            descs.push(RawDescriptor::from(Descriptor::new(
                data, len as u32, flags, next,
            )));
            // Guests' buffers are page-aligned mostly, sometimes only sector-aligned.
            data += len.next_multiple_of(4096) + if i % 3 == 0 { 512 } else { 0 };
        }
        descs.push(RawDescriptor::from(Descriptor::new(
            status.0,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )));
        made.push(Made { status, waiting });
    }
    assert!(data <= MEM as u64, "a round's data fits guest memory");
    vq.add_desc_chains(&descs, 0).expect("chains");
    rig.start(vq.create_queue::<Queue>().expect("queue"), 0);
    let run = rig.serve(mem);
    assert!(run.errors.is_empty(), "host errors: {:?}", run.errors);
    // The answers: writes first, then flushes, then reads (what each read may show
    // depends on how the writes before it completed).
    let status = |m: &Made| mem.read_obj::<u8>(m.status).expect("status");
    for m in &made {
        assert_eq!(status(m), 0, "every request answered S_OK");
    }
    for m in &made {
        if let Waiting::Write(id) = m.waiting {
            oracle.completed(id, true);
        }
    }
    for m in &made {
        if let Waiting::Flush(t) = m.waiting {
            oracle.flush_completed(t, true);
        }
    }
    for m in &made {
        if let Waiting::Read(t, at, len) = &m.waiting {
            let mut got = vec![0u8; *len];
            mem.read_slice(&mut got, *at).expect("read data");
            let bad = oracle.check_read(t, &got);
            assert!(bad.is_empty(), "a read showed stale sectors: {bad:?}");
        }
    }
}

fn stress(label: &str, options: FileOptions) {
    stress_with(label, options, 100, false)
}

fn stress_with(label: &str, options: FileOptions, default_rounds: usize, logged: bool) {
    let seed: u64 = std::env::var("HOLDFAST_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let rounds: usize = std::env::var("HOLDFAST_STRESS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_rounds);
    eprintln!("{label}: seed {seed} (HOLDFAST_STRESS_SEED), {rounds} rounds");
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; IMAGE as usize]).expect("image");
    let backend = FileBackend::open(&path, options).expect("open");
    eprintln!(
        "{label}: granularity {}",
        holdfast_block::Backend::granularity(&backend)
    );
    let log_path = dir.path().join("disk.wlog");
    let log = logged.then(|| holdfast_block::WriteLog::create(&log_path).expect("log"));
    let (rig, _) = Rig::logged(Box::new(backend), DiskConfig::default(), log);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let mut oracle = Oracle::new(IMAGE);
    let mut rng = Rng(seed);
    let mut requests_made = 0;
    let mut flushes_made = 1;
    for _ in 0..rounds {
        let mut requests = Vec::new();
        let mut bytes = 0;
        while requests.len() < PER_ROUND {
            let kind = match rng.below(20) {
                0 => VIRTIO_BLK_T_FLUSH,
                1..=11 => VIRTIO_BLK_T_OUT,
                _ => VIRTIO_BLK_T_IN,
            };
            let (sector, sectors) = range(&mut rng);
            if bytes + sectors * SECTOR + 8192 > ROUND_BYTES {
                break;
            }
            bytes += sectors * SECTOR + 8192;
            requests.push((kind, sector, sectors));
        }
        requests_made += requests.len();
        flushes_made += requests
            .iter()
            .filter(|r| r.0 == VIRTIO_BLK_T_FLUSH)
            .count();
        round(&rig, &mem, &mut oracle, &requests);
    }
    round(&rig, &mem, &mut oracle, &[(VIRTIO_BLK_T_FLUSH, 0, 0)]);
    // The host's page cache for the image goes; what is left is on the device.
    let f = std::fs::File::open(&path).expect("image");
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain integers and a descriptor we own.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0, "posix_fadvise");
    }
    let mut stable = vec![0u8; IMAGE as usize];
    f.read_exact_at(&mut stable, 0).expect("read the image");
    let bad = oracle.check_stable(&stable);
    assert!(
        bad.is_empty(),
        "{label} (seed {seed}): {} acked sectors not on the image, first {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    eprintln!(
        "{label}: {requests_made} requests, {} acked writes, all on the image",
        oracle.acked_writes()
    );
    if logged {
        use holdfast_block::LogEntry;
        let entries =
            holdfast_block::read_log(&std::fs::read(&log_path).expect("log")).expect("a whole log");
        let mut replayed = vec![0u8; IMAGE as usize];
        let (mut writes, mut flushes) = (0, 0);
        for e in &entries {
            match e {
                LogEntry::Write { offset, data } => {
                    replayed[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                    writes += 1;
                }
                LogEntry::Flush => flushes += 1,
                other => panic!("no discards or marks were made: {other:?}"),
            }
        }
        assert_eq!(writes, oracle.acked_writes(), "every acked write, once");
        assert_eq!(flushes, flushes_made, "every flush, once");
        assert_eq!(
            entries.last(),
            Some(&LogEntry::Flush),
            "the last flush ends it"
        );
        let first_bad = replayed.iter().zip(&stable).position(|(a, b)| a != b);
        assert_eq!(
            first_bad, None,
            "{label} (seed {seed}): the log replayed differs from the image at byte {first_bad:?}"
        );
        eprintln!(
            "{label}: the write log's {writes} writes and {flushes} flushes replay to the image"
        );
    }
}

#[test]
fn a_write_log_replays_to_the_image() {
    stress_with(
        "write log, O_DIRECT at 4 KiB",
        FileOptions {
            direct: true,
            direct_align: Some(4096),
            ..FileOptions::default()
        },
        20,
        true,
    );
}

#[test]
fn on_a_buffered_image() {
    stress("buffered", FileOptions::default());
}

#[test]
fn on_a_direct_image() {
    stress(
        "O_DIRECT",
        FileOptions {
            direct: true,
            ..FileOptions::default()
        },
    );
}

#[test]
fn on_a_direct_image_with_4k_blocks() {
    stress(
        "O_DIRECT at 4 KiB",
        FileOptions {
            direct: true,
            direct_align: Some(4096),
            ..FileOptions::default()
        },
    );
}
