//! The virtio-blk frontend: turns the guest's descriptor chains into neutral
//! [`holdfast_block::Request`]s for the disk engine, and the engine's completions back
//! into used-ring entries.
//!
//! Descriptor chains are untrusted. A chain is bounded by the queue size (virtio-queue
//! stops a looping chain), every guest address goes through vm-memory's checked
//! accessors, data is read only after its length was checked against
//! [`MAX_REQUEST_BYTES`]; a malformed request completes `S_IOERR` (or, with no
//! writable status byte to report into, is returned used with length 0). Nothing a
//! guest writes into a descriptor can make the VMM panic.
//!
//! The ring features Linux and QEMU use are offered: indirect descriptor tables
//! (virtio-queue follows them as part of the chain, so a request of many segments
//! takes one ring slot and a second request need not wait for the first to leave
//! the ring) and event indexes (`VIRTIO_RING_F_EVENT_IDX`: when its queue runs empty
//! the device says where the driver must next notify it, [`BlockDevice::next`], and
//! the disk's worker interrupts only where the driver asked, see [`crate::disk`]).
//!
//! While the disk is stopped on a host error the disk's worker takes no more
//! requests from the queue: they stay in the available ring, in order, until `cont`
//! has replayed the disk ([`crate::disk`]).
//!
//! The device holds no engine and no lock: the disk's slot holds both, and its worker
//! takes a request off the queue ([`BlockDevice::next`]), runs it on the engine with
//! the device unlocked (so a host call that hangs never blocks a vCPU reading the
//! device's registers), and puts its completion in the used ring
//! ([`BlockDevice::finish`]). What the driver changes on the engine (the write cache
//! mode, a reset's dropping of parked requests) waits in the device as [`Pending`]
//! until the slot applies it.

use std::collections::HashMap;

use holdfast_block::disk::MAX_REQUEST_BYTES;
use holdfast_block::Bytes as WriteBytes;
use holdfast_block::{Completion, Engine, IoErrorReport, Request, RequestOp, Status};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::{VirtioDevice, FEATURE_VERSION_1};

pub const SECTOR_SIZE: u64 = 512;
/// Segments per request we accept (`seg_max`); Linux sizes its requests by it. As
/// QEMU's default: the queue size less the header and the status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
pub const QUEUE_SIZE: u16 = 256;
/// Size of the config space we expose (up to `write_zeroes_may_unmap` and padding).
pub const CONFIG_SIZE: usize = 60;
const WCE_OFFSET: usize = 32;
const HEADER_SIZE: usize = 16;
const SEGMENT_SIZE: usize = 16;
/// Longest request in sectors (`max_sectors`, and the discard and write-zeroes
/// limits of the config space).
const MAX_SECTORS: u64 = MAX_REQUEST_BYTES / SECTOR_SIZE;

/// Why a queue could not be served: the guest broke it; the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the queue's descriptor table or rings are not all in guest memory")]
    NotInMemory,
    #[error("cannot update the used ring")]
    UsedRing(#[source] virtio_queue::Error),
    #[error(
        "cannot tell the driver where to notify the device next (the used ring's avail_event)"
    )]
    AvailEvent(#[source] virtio_queue::Error),
}

/// What one pass over the queue did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QueueRun {
    /// Used-ring entries added: the guest needs an interrupt if this is not 0.
    pub used: usize,
    /// A host error happened; under `stop` the disk is now stopped and the VM must
    /// pause (BLOCK_IO_ERROR, then STOP).
    pub error: Option<IoErrorReport>,
    /// When the failing host call returned (for the error-to-stopped latency).
    pub error_at: Option<std::time::Instant>,
}

/// Where a request's answer goes in guest memory.
#[derive(Debug)]
struct Inflight {
    head: u16,
    /// What it counts as in [`BlockStats`], its bytes, and when it was taken.
    kind: Kind,
    bytes: u64,
    taken: std::time::Instant,
    /// Device-writable data regions, status byte excluded.
    data: Vec<(GuestAddress, usize)>,
    /// What the write log gets when it completes (with a log only).
    logged: Logged,
    status: GuestAddress,
    /// GET_ID answers exactly `VIRTIO_BLK_ID_BYTES`, zero-padded.
    pad_to: usize,
}

/// A chain the device refuses before it reaches the disk.
#[derive(Debug)]
struct Rejected {
    head: u16,
    status: Option<GuestAddress>,
    code: Status,
    /// What the header asked for, if it could be read (`invalid_*` in [`BlockStats`]).
    kind: Kind,
}

/// Changes the driver made that the engine has not had yet.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    writeback: Option<bool>,
    drop_parked: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        *self == Pending::default()
    }

    /// `self`, then `later`.
    fn then(self, later: Pending) -> Pending {
        Pending {
            writeback: later.writeback.or(self.writeback),
            drop_parked: self.drop_parked || later.drop_parked,
        }
    }

    /// Applies them; returns how many parked requests were dropped.
    pub fn apply(self, disk: &mut dyn Engine) -> usize {
        if let Some(writeback) = self.writeback {
            disk.set_writeback(writeback);
        }
        if self.drop_parked {
            disk.drop_parked()
        } else {
            0
        }
    }
}

/// What [`BlockDevice::next`] took off the queue.
#[derive(Debug)]
pub enum Next {
    /// Nothing available (or the device is not live).
    Empty,
    /// A chain the device refused; it is already in the used ring.
    Refused,
    /// A request for the disk, and the vCPUs' changes to apply before it.
    Request(Request, Pending),
    /// A write of at least [`BORROW_FROM`] bytes, still in guest memory, and the
    /// vCPUs' changes to apply before it: its host write can run from there while
    /// its copy for the buffer is made ([`holdfast_block::Disk::begin_borrowed_write`]).
    GuestWrite(GuestWrite, Pending),
}

/// Writes this long or longer are taken as a [`GuestWrite`]: their host write need
/// not wait for the copy that the unflushed buffer keeps (copying 1 MiB takes about
/// as long as a fifth of QEMU's 1 MiB write in the test host, docs/benchmarks.md). Shorter ones
/// are copied at once (the copy is short, a second thread would cost more).
pub const BORROW_FROM: usize = 64 << 10;

/// A guest write in guest memory: where its bytes lie, with the memory kept mapped
/// for as long as this lives.
pub struct GuestWrite {
    pub tag: u64,
    pub offset: u64,
    /// The device's resets when it was taken ([`BlockDevice::resets`]).
    pub resets: u64,
    runs: Vec<holdfast_block::bytes::Borrowed>,
    /// Keeps the guest memory the runs point into mapped.
    _mapped: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for GuestWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestWrite")
            .field("tag", &self.tag)
            .field("offset", &self.offset)
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl GuestWrite {
    /// How many bytes it writes.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.len() as u64).sum()
    }

    /// Where its bytes lie, for the host write; valid while `self` lives.
    pub fn runs(&self) -> &[holdfast_block::bytes::Borrowed] {
        &self.runs
    }

    /// Its bytes, copied once (what the buffer keeps).
    pub fn copy(&self) -> WriteBytes {
        WriteBytes::copy_of(&self.runs)
    }

    /// The request with its bytes copied, for [`Engine::begin`] or [`Engine::submit`].
    pub fn into_request(self) -> Request {
        let data = self.copy();
        Request::new(
            self.tag,
            RequestOp::Write {
                offset: self.offset,
                data,
            },
        )
    }
}

/// A virtio-blk device: its virtio state, over a disk engine it does not hold.
#[derive(Debug)]
pub struct BlockDevice {
    /// Fixed at creation.
    size: u64,
    writeback_default: bool,
    /// The mode the driver chose (applied on the engine, or pending for it).
    writeback_now: bool,
    pending: Pending,
    offered: u64,
    acked: u64,
    /// The `writeback` config byte (with CONFIG_WCE the guest may change it).
    wce: bool,
    inflight: HashMap<u64, Inflight>,
    next_tag: u64,
    /// How many times the driver reset the device.
    resets: u64,
    stats: BlockStats,
    /// (`write-log=FILE`) what the guest is told is done, logged as it is told.
    log: Option<DeviceLog>,
}

/// A device's write log and the disk's name (for the message if it fails).
#[derive(Debug)]
struct DeviceLog {
    disk: String,
    log: holdfast_block::WriteLog,
}

/// What a request adds to the write log once the guest is told it is done.
#[derive(Debug, Clone, Default)]
enum Logged {
    #[default]
    Nothing,
    /// A write, with the copy the engine keeps (and writes again on a replay) once
    /// the device has it ([`BlockDevice::log_copy`] for a long write), and whether it
    /// was on stable storage when it completed (the disk ran writethrough).
    Write {
        offset: u64,
        data: Option<WriteBytes>,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl BlockDevice {
    /// A device for `disk`, offering what it can do.
    pub fn new(disk: &dyn Engine) -> Self {
        let caps = disk.capabilities();
        let mut offered = FEATURE_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX;
        if disk.config().read_only {
            offered |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if caps.discard {
                offered |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if caps.write_zeroes {
                offered |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        let wce = disk.config().writeback;
        BlockDevice {
            size: disk.size(),
            writeback_default: wce,
            writeback_now: wce,
            pending: Pending::default(),
            offered,
            acked: 0,
            wce,
            inflight: HashMap::new(),
            next_tag: 0,
            resets: 0,
            stats: BlockStats::default(),
            log: None,
        }
    }

    /// The copy of a long write the engine keeps, for the write log (the worker
    /// makes it, [`crate::disk::worker`]); what the log records of the write.
    pub fn log_copy(&mut self, tag: u64, data: WriteBytes) {
        if let Some(Logged::Write { data: slot, .. }) =
            self.inflight.get_mut(&tag).map(|i| &mut i.logged)
        {
            *slot = Some(data);
        }
    }

    /// Logs every write, zeroing, discard and flush the guest is told is done, in
    /// that order, to `log` (`write-log=FILE`).
    pub fn log_to(&mut self, disk: &str, log: holdfast_block::WriteLog) {
        self.log = Some(DeviceLog {
            disk: disk.to_string(),
            log,
        });
    }

    /// The driver's changes not yet applied to the engine; the caller applies them.
    pub fn take_pending(&mut self) -> Pending {
        std::mem::take(&mut self.pending)
    }

    /// Keeps changes taken with [`BlockDevice::take_pending`] that could not be
    /// applied yet, before any made since.
    pub fn keep_pending(&mut self, earlier: Pending) {
        self.pending = earlier.then(self.pending);
    }

    pub fn features(&self) -> u64 {
        self.offered
    }

    /// How many times the driver reset the device: after a reset it may reuse the
    /// memory of requests it had made.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// What the device answered so far (`query-blockstats`).
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    pub fn read_only(&self) -> bool {
        self.offered & (1 << VIRTIO_BLK_F_RO) != 0
    }

    /// The write cache mode the guest chose (the disk may not have it yet).
    pub fn writeback(&self) -> bool {
        self.writeback_now
    }

    /// The driver's features; without FLUSH the disk runs writethrough.
    pub fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered;
        self.apply_cache_mode();
    }

    fn has(&self, feature: u32) -> bool {
        self.acked & (1 << feature) != 0
    }

    fn apply_cache_mode(&mut self) {
        let writeback = self.has(VIRTIO_BLK_F_FLUSH) && self.wce;
        self.writeback_now = writeback;
        self.pending.writeback = Some(writeback);
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(self.size / SECTOR_SIZE).to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(WCE_OFFSET, &[u8::from(self.wce)]);
        put(34, &1u16.to_le_bytes());
        let max_sectors = MAX_SECTORS as u32;
        put(36, &max_sectors.to_le_bytes());
        put(40, &1u32.to_le_bytes());
        put(44, &1u32.to_le_bytes());
        put(48, &max_sectors.to_le_bytes());
        put(52, &1u32.to_le_bytes());
        put(56, &[1]);
        c
    }

    /// Reads the device config space; bytes past its end read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes the config space: only `writeback`, and only with CONFIG_WCE.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == WCE_OFFSET as u64 && data.len() == 1 && self.has(VIRTIO_BLK_F_CONFIG_WCE) {
            self.wce = data[0] != 0;
            self.apply_cache_mode();
        }
    }

    /// Takes the next available request off the queue (the caller has checked the
    /// disk is not stopped). A chain the device refuses goes to the used ring here.
    /// An empty queue first asks the driver to notify the device of the next
    /// request (with event indexes: `avail_event`, which the driver reads before it
    /// decides to notify), then looks once more: after [`Next::Empty`] the driver
    /// notifies the device of its next request.
    pub fn next<M: GuestMemory + Clone + Send + Sync + 'static>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<Next, Error> {
        if !queue.is_valid(mem) {
            return Err(Error::NotInMemory);
        }
        let chain = match queue.pop_descriptor_chain(mem) {
            Some(chain) => chain,
            None => {
                let more = queue.enable_notification(mem).map_err(Error::AvailEvent)?;
                // Once more, not in a loop: an available index no chain can be taken
                // at (a broken driver's) stays as it is, as without event indexes.
                match more.then(|| queue.pop_descriptor_chain(mem)).flatten() {
                    Some(chain) => chain,
                    None => return Ok(Next::Empty),
                }
            }
        };
        let head = chain.head_index();
        // A write completes on stable storage when the disk runs writethrough (the
        // mode the engine has when it takes this request: pending changes first).
        let logging = self.log.is_some().then_some(!self.writeback_now);
        match parse(mem, chain, head, self.acked, logging) {
            Err(rejected) => {
                self.reject(mem, queue, rejected)?;
                Ok(Next::Refused)
            }
            Ok((taken, mut inflight)) => {
                (inflight.kind, inflight.bytes) = Kind::of(&taken);
                self.next_tag += 1;
                let tag = self.next_tag;
                self.inflight.insert(tag, inflight);
                let pending = self.take_pending();
                Ok(match taken {
                    Taken::Op(op) => Next::Request(Request::new(tag, op), pending),
                    Taken::Write { offset, runs } => {
                        let write = GuestWrite {
                            tag,
                            offset,
                            resets: self.resets,
                            runs,
                            _mapped: Box::new(mem.clone()),
                        };
                        Next::GuestWrite(write, pending)
                    }
                })
            }
        }
    }

    /// Puts what the disk did with a request in the used ring; a host error goes
    /// into `run`. Returns the used-ring entries added (0 or 1).
    pub fn finish<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        run: &mut QueueRun,
        outcome: holdfast_block::Outcome,
    ) -> Result<usize, Error> {
        if outcome.error.is_some() {
            run.error = outcome.error;
            run.error_at = Some(std::time::Instant::now());
        }
        match outcome.completion {
            Some(c) => {
                self.complete(mem, queue, c)?;
                Ok(1)
            }
            None => Ok(0),
        }
    }

    /// Puts a successful replay's completions in the used ring.
    pub fn complete_replay<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        report: holdfast_block::ReplayReport,
    ) -> Resumed {
        self.stats.replays += 1;
        self.stats.replayed_bytes += report.bytes_rewritten;
        let mut resumed = Resumed {
            used: 0,
            bytes_rewritten: report.bytes_rewritten,
            broken_queue: None,
        };
        for c in report.completions {
            if let Err(e) = self.complete(mem, queue, c) {
                resumed.broken_queue = Some(e);
                break;
            }
            resumed.used += 1;
        }
        resumed
    }

    /// The driver reset the device: in-flight requests will never be answered. The
    /// engine keeps its buffer (writes the guest saw complete) and its error state;
    /// its parked requests are to be dropped ([`Pending`]).
    pub fn reset(&mut self) {
        self.inflight.clear();
        self.resets += 1;
        self.acked = 0;
        self.wce = self.writeback_default;
        self.pending.drop_parked = true;
    }

    fn complete<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        c: Completion,
    ) -> Result<(), Error> {
        let Some(inflight) = self.inflight.remove(&c.tag) else {
            // The tag was dropped by a reset: nobody waits for it.
            return Ok(());
        };
        let mut data = c.data;
        if data.len() < inflight.pad_to {
            data.resize(inflight.pad_to, 0);
        }
        let mut status = c.status;
        let mut written = 0usize;
        if status == Status::Ok {
            match scatter(mem, &inflight.data, &data) {
                Ok(n) => written = n,
                Err(()) => status = Status::IoErr,
            }
        }
        if status == Status::Ok {
            self.log_done(&inflight.logged);
        }
        self.stats.count(
            inflight.kind,
            inflight.bytes,
            status == Status::Ok,
            inflight.taken.elapsed(),
        );
        let used = match mem.write_obj(status.virtio_code(), inflight.status) {
            Ok(()) => written + 1,
            Err(_) => 0,
        };
        queue
            .add_used(mem, inflight.head, used as u32)
            .map_err(Error::UsedRing)
    }

    /// Appends what the guest is about to be told is done to the write log. A log
    /// that cannot be written stops logging, says so once, and leaves the guest's
    /// I/O alone: a shorter log must not pass for a whole one, so the message names
    /// how many entries it kept.
    fn log_done(&mut self, logged: &Logged) {
        let Some(dev) = &mut self.log else {
            return;
        };
        let written = match logged {
            Logged::Nothing => return,
            Logged::Write {
                offset,
                data: Some(data),
                fua,
            } => match fua {
                true => dev.log.write_fua(*offset, data),
                false => dev.log.write(*offset, data),
            },
            Logged::Write { data: None, .. } => Err(std::io::Error::other(
                "a write completed before the device had its copy",
            )),
            Logged::Zeroes { offset, len, fua } => dev.log.zeroes(*offset, *len, *fua),
            Logged::Discard { offset, len } => dev.log.discard(*offset, *len),
            Logged::Flush => dev.log.flush(),
        };
        if let Err(e) = written {
            log::error!(
                "disk {}: write log: cannot append: {e}; the log stops after its {} entries",
                dev.disk,
                dev.log.entries()
            );
            self.log = None;
        }
    }

    fn reject<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        r: Rejected,
    ) -> Result<(), Error> {
        self.stats.invalid(r.kind);
        let used = match r.status.map(|at| mem.write_obj(r.code.virtio_code(), at)) {
            Some(Ok(())) => 1,
            _ => 0,
        };
        queue.add_used(mem, r.head, used).map_err(Error::UsedRing)
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        BlockDevice::features(self)
    }

    fn ack_features(&mut self, features: u64) {
        BlockDevice::ack_features(self, features)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        BlockDevice::read_config(self, offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        BlockDevice::write_config(self, offset, data)
    }
}

/// What [`BlockDevice::complete_replay`] did with a successful replay.
#[derive(Debug)]
pub struct Resumed {
    /// Used-ring entries added: the guest needs an interrupt if this is not 0.
    pub used: usize,
    pub bytes_rewritten: u64,
    /// The guest's queue could not take the completions: the device needs a reset.
    pub broken_queue: Option<Error>,
}

/// What [`parse`] made of a chain.
enum Taken {
    Op(RequestOp),
    /// A write of at least [`BORROW_FROM`] bytes, not copied yet.
    Write {
        offset: u64,
        runs: Vec<holdfast_block::bytes::Borrowed>,
    },
}

/// Splits a chain into the request and where its answer goes; `acked` are the
/// features the driver negotiated. A write's bytes stay where they are
/// ([`Taken::Write`]) if long, else are copied; the runs are valid while `mem`'s
/// mappings are.
fn parse<M: GuestMemory, C>(
    mem: &M,
    chain: C,
    head: u16,
    acked: u64,
    logging: Option<bool>,
) -> Result<(Taken, Inflight), Rejected>
where
    C: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut readable: Vec<(GuestAddress, usize)> = Vec::new();
    let mut writable: Vec<(GuestAddress, usize)> = Vec::new();
    let mut misordered = false;
    for desc in chain {
        let region = (desc.addr(), desc.len() as usize);
        if desc.is_write_only() {
            writable.push(region);
        } else {
            misordered |= !writable.is_empty();
            readable.push(region);
        }
    }
    // The status byte is the chain's last writable byte.
    let status = last_byte(&mut writable);
    let reject = |code| Rejected {
        head,
        status,
        code,
        kind: Kind::Other,
    };
    let Some(status) = status else {
        return Err(reject(Status::IoErr));
    };
    let readable_len: usize = readable.iter().map(|r| r.1).sum();
    let writable_len: usize = writable.iter().map(|r| r.1).sum();
    if misordered || readable_len < HEADER_SIZE {
        return Err(reject(Status::IoErr));
    }
    let header = gather(mem, &readable, 0, HEADER_SIZE).map_err(|()| reject(Status::IoErr))?;
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    // From here on a refusal says what kind of request it refused.
    let reject = |code| Rejected {
        head,
        status: Some(status),
        code,
        kind: Kind::of_type(kind),
    };
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let payload = readable_len - HEADER_SIZE;
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(reject(Status::IoErr))?;
    let sized = |len: usize| len as u64 % SECTOR_SIZE == 0 && len as u64 <= MAX_REQUEST_BYTES;
    let mut pad_to = 0;
    let mut logged = Logged::Nothing;
    let op = match kind {
        VIRTIO_BLK_T_IN if sized(writable_len) && payload == 0 => RequestOp::Read {
            offset,
            len: writable_len as u64,
        },
        VIRTIO_BLK_T_OUT if sized(payload) && writable_len == 0 => {
            let runs = borrow_write(mem, &readable, HEADER_SIZE, payload)
                .map_err(|()| reject(Status::IoErr))?;
            if payload >= BORROW_FROM {
                let mut taken = inflight(head, writable, status, 0);
                if let Some(fua) = logging {
                    // The copy comes with `log_copy`.
                    taken.logged = Logged::Write {
                        offset,
                        data: None,
                        fua,
                    };
                }
                return Ok((Taken::Write { offset, runs }, taken));
            }
            let data = WriteBytes::copy_of(&runs);
            if let Some(fua) = logging {
                logged = Logged::Write {
                    offset,
                    data: Some(data.clone()),
                    fua,
                };
            }
            RequestOp::Write { offset, data }
        }
        VIRTIO_BLK_T_FLUSH => {
            if logging.is_some() {
                logged = Logged::Flush;
            }
            RequestOp::Flush
        }
        VIRTIO_BLK_T_GET_ID if writable_len >= VIRTIO_BLK_ID_BYTES as usize => {
            pad_to = VIRTIO_BLK_ID_BYTES as usize;
            RequestOp::GetId
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            // Only what the driver negotiated; the config space says one segment of
            // at most `MAX_SECTORS` each (max_*_seg, max_*_sectors).
            let feature = if kind == VIRTIO_BLK_T_DISCARD {
                VIRTIO_BLK_F_DISCARD
            } else {
                VIRTIO_BLK_F_WRITE_ZEROES
            };
            if acked & (1 << feature) == 0 {
                return Err(reject(Status::Unsupp));
            }
            if payload != SEGMENT_SIZE || writable_len != 0 {
                return Err(reject(Status::IoErr));
            }
            let seg = gather(mem, &readable, HEADER_SIZE, SEGMENT_SIZE)
                .map_err(|()| reject(Status::IoErr))?;
            let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            let unmap = flags & 1 != 0;
            // Reserved flag bits, or unmap on a discard, are not ours to guess.
            if flags & !1 != 0 || (kind == VIRTIO_BLK_T_DISCARD && unmap) {
                return Err(reject(Status::Unsupp));
            }
            if sectors == 0 || u64::from(sectors) > MAX_SECTORS {
                return Err(reject(Status::IoErr));
            }
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or(reject(Status::IoErr))?;
            let len = u64::from(sectors) * SECTOR_SIZE;
            if kind == VIRTIO_BLK_T_DISCARD {
                if logging.is_some() {
                    logged = Logged::Discard { offset, len };
                }
                RequestOp::Discard { offset, len }
            } else {
                if let Some(fua) = logging {
                    logged = Logged::Zeroes { offset, len, fua };
                }
                RequestOp::WriteZeroes { offset, len, unmap }
            }
        }
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_GET_ID => {
            return Err(reject(Status::IoErr))
        }
        _ => return Err(reject(Status::Unsupp)),
    };
    let mut taken = inflight(head, writable, status, pad_to);
    taken.logged = logged;
    Ok((Taken::Op(op), taken))
}

fn inflight(
    head: u16,
    data: Vec<(GuestAddress, usize)>,
    status: GuestAddress,
    pad_to: usize,
) -> Inflight {
    Inflight {
        head,
        kind: Kind::Other,
        bytes: 0,
        taken: std::time::Instant::now(),
        data,
        status,
        pad_to,
        logged: Logged::Nothing,
    }
}

/// A request's kind as [`BlockStats`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    Other,
}

impl Kind {
    /// A request type's kind (write-zeroes counts as a write, as in QEMU).
    fn of_type(t: u32) -> Kind {
        match t {
            VIRTIO_BLK_T_IN => Kind::Read,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_WRITE_ZEROES => Kind::Write,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            _ => Kind::Other,
        }
    }

    fn of(taken: &Taken) -> (Kind, u64) {
        match taken {
            Taken::Op(RequestOp::Read { len, .. }) => (Kind::Read, *len),
            Taken::Op(RequestOp::Write { data, .. }) => (Kind::Write, data.len() as u64),
            // QEMU counts write-zeroes as writes.
            Taken::Op(RequestOp::WriteZeroes { len, .. }) => (Kind::Write, *len),
            Taken::Op(RequestOp::Flush) => (Kind::Flush, 0),
            Taken::Op(RequestOp::Discard { len, .. }) => (Kind::Discard, *len),
            Taken::Op(RequestOp::GetId) => (Kind::Other, 0),
            Taken::Write { runs, .. } => (Kind::Write, runs.iter().map(|r| r.len() as u64).sum()),
        }
    }
}

/// What a disk did for its guest since it started, as QEMU's `query-blockstats`
/// counts it: requests answered, by kind, their bytes and the time from taking them
/// to answering, those answered with an error (`failed_*`) and those refused as
/// malformed (`invalid_*`); when the last of them was (QEMU's `idle_time_ns`); and
/// the replays that rewrote the buffer after outages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub rd: KindStats,
    pub wr: KindStats,
    pub flush: KindStats,
    pub unmap: KindStats,
    /// When the last request counted here was answered or refused (none yet: never).
    pub last_io: Option<std::time::Instant>,
    /// Replays done (a `cont` after a host error), and the bytes they rewrote.
    pub replays: u64,
    pub replayed_bytes: u64,
}

/// One kind of request's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    pub operations: u64,
    pub bytes: u64,
    pub failed: u64,
    pub invalid: u64,
    pub total_time_ns: u64,
}

impl BlockStats {
    fn of_kind(&mut self, kind: Kind) -> Option<&mut KindStats> {
        match kind {
            Kind::Read => Some(&mut self.rd),
            Kind::Write => Some(&mut self.wr),
            Kind::Flush => Some(&mut self.flush),
            Kind::Discard => Some(&mut self.unmap),
            Kind::Other => None,
        }
    }

    fn count(&mut self, kind: Kind, bytes: u64, ok: bool, took: std::time::Duration) {
        let Some(k) = self.of_kind(kind) else { return };
        if ok {
            k.operations += 1;
            k.bytes += bytes;
        } else {
            k.failed += 1;
        }
        k.total_time_ns = k
            .total_time_ns
            .saturating_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
        self.last_io = Some(std::time::Instant::now());
    }

    fn invalid(&mut self, kind: Kind) {
        if let Some(k) = self.of_kind(kind) {
            k.invalid += 1;
            self.last_io = Some(std::time::Instant::now());
        }
    }
}

/// Takes the last byte off the writable regions; that is where the status goes.
fn last_byte(regions: &mut Vec<(GuestAddress, usize)>) -> Option<GuestAddress> {
    while let Some(&(addr, len)) = regions.last() {
        if len == 0 {
            regions.pop();
            continue;
        }
        let at = addr.checked_add(len as u64 - 1)?;
        if len == 1 {
            regions.pop();
        } else if let Some(last) = regions.last_mut() {
            last.1 -= 1;
        }
        return Some(at);
    }
    None
}

/// Reads `len` bytes starting `skip` bytes into the regions.
fn gather<M: GuestMemory>(
    mem: &M,
    regions: &[(GuestAddress, usize)],
    skip: usize,
    len: usize,
) -> Result<Vec<u8>, ()> {
    let mut out = vec![0u8; len];
    walk(regions, skip, len, |at, done, n| {
        mem.read_slice(&mut out[done..done + n], at).map_err(|_| ())
    })?;
    Ok(out)
}

/// Where a write's payload lies: `len` bytes of `regions` after the first `skip`, as
/// runs of mapped guest memory (checked here, read later: copied once into the
/// allocation the host write, the unflushed buffer and a replay share, or handed to
/// the host as they are, [`GuestWrite`]). The runs are valid while `mem`'s mappings
/// are.
fn borrow_write<M: GuestMemory>(
    mem: &M,
    regions: &[(GuestAddress, usize)],
    skip: usize,
    len: usize,
) -> Result<Vec<holdfast_block::bytes::Borrowed>, ()> {
    let mut runs = Vec::new();
    walk(regions, skip, len, |at, _, n| {
        let mut got = 0;
        let slices = mem.get_slices(at, n, Permissions::Read).map_err(|_| ())?;
        for slice in slices {
            let slice = slice.map_err(|_| ())?;
            let guard = slice.ptr_guard();
            got += guard.len();
            if got > n {
                return Err(());
            }
            // SAFETY: the guard's `len` bytes are mapped guest memory, and stay
            // mapped while `mem`'s regions do (plain mmap regions: the guard pins
            // nothing more); the callers keep them (`GuestWrite::_mapped`) or copy
            // them while `mem` is borrowed.
            runs.push(unsafe { holdfast_block::bytes::Borrowed::new(guard.as_ptr(), guard.len()) });
        }
        if got == n {
            Ok(())
        } else {
            Err(())
        }
    })?;
    Ok(runs)
}

/// Calls `copy(address, at, n)` for each piece of `len` bytes of `regions` after the
/// first `skip`: `n` bytes at `address` belong at `at` of the result, in order.
/// Fails if the regions hold fewer bytes or a call fails.
fn walk(
    regions: &[(GuestAddress, usize)],
    skip: usize,
    len: usize,
    mut copy: impl FnMut(GuestAddress, usize, usize) -> Result<(), ()>,
) -> Result<(), ()> {
    let mut done = 0;
    let mut skip = skip;
    for &(addr, rlen) in regions {
        if done == len {
            break;
        }
        if skip >= rlen {
            skip -= rlen;
            continue;
        }
        let n = (rlen - skip).min(len - done);
        let at = addr.checked_add(skip as u64).ok_or(())?;
        copy(at, done, n)?;
        done += n;
        skip = 0;
    }
    if done == len {
        Ok(())
    } else {
        Err(())
    }
}

fn scatter<M: GuestMemory>(
    mem: &M,
    regions: &[(GuestAddress, usize)],
    data: &[u8],
) -> Result<usize, ()> {
    let mut done = 0;
    for &(addr, rlen) in regions {
        if done == data.len() {
            break;
        }
        let n = rlen.min(data.len() - done);
        mem.write_slice(&data[done..done + n], addr)
            .map_err(|_| ())?;
        done += n;
    }
    Ok(done)
}
