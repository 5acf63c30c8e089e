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
//! While the disk is stopped on a host error the device takes no more requests from
//! the queue: they stay in the available ring, in order, until [`BlockDevice::resume`]
//! has replayed the disk.

use std::collections::HashMap;

use holdfast_block::disk::MAX_REQUEST_BYTES;
use holdfast_block::{
    Backend, Completion, Disk, IoErrorReport, ReplayError, Request, RequestOp, Status,
};
use virtio_bindings::virtio_blk::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::{VirtioDevice, FEATURE_VERSION_1};

pub const SECTOR_SIZE: u64 = 512;
/// Segments per request we accept (`seg_max`); Linux sizes its requests by it.
pub const SEG_MAX: u32 = 126;
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
    /// Device-writable data regions, status byte excluded.
    data: Vec<(GuestAddress, usize)>,
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
}

/// A virtio-blk device over one holdfast disk.
#[derive(Debug)]
pub struct BlockDevice<B> {
    disk: Disk<B>,
    offered: u64,
    acked: u64,
    /// The `writeback` config byte (with CONFIG_WCE the guest may change it).
    wce: bool,
    inflight: HashMap<u64, Inflight>,
    next_tag: u64,
}

impl<B: Backend> BlockDevice<B> {
    pub fn new(disk: Disk<B>) -> Self {
        let caps = disk.backend().capabilities();
        let mut offered = FEATURE_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_SEG_MAX;
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
            disk,
            offered,
            acked: 0,
            wce,
            inflight: HashMap::new(),
            next_tag: 0,
        }
    }

    pub fn disk(&self) -> &Disk<B> {
        &self.disk
    }

    pub fn disk_mut(&mut self) -> &mut Disk<B> {
        &mut self.disk
    }

    pub fn features(&self) -> u64 {
        self.offered
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
        self.disk.set_writeback(writeback);
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(self.disk.size() / SECTOR_SIZE).to_le_bytes());
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

    /// Serves available requests until the queue is empty or the disk stops.
    pub fn process_queue<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<QueueRun, Error> {
        let mut run = QueueRun::default();
        if !queue.is_valid(mem) {
            return Err(Error::NotInMemory);
        }
        while !self.disk.is_stopped() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match parse(mem, chain, head, self.acked) {
                Err(rejected) => {
                    self.reject(mem, queue, rejected)?;
                    run.used += 1;
                }
                Ok((op, inflight)) => {
                    self.next_tag += 1;
                    let tag = self.next_tag;
                    self.inflight.insert(tag, inflight);
                    let outcome = self.disk.submit(Request::new(tag, op));
                    if outcome.error.is_some() {
                        run.error = outcome.error;
                        run.error_at = Some(std::time::Instant::now());
                    }
                    if let Some(c) = outcome.completion {
                        self.complete(mem, queue, c)?;
                        run.used += 1;
                    }
                }
            }
        }
        Ok(run)
    }

    /// `cont`: replays the stopped disk and completes what was parked. On failure
    /// nothing is completed and the device stays stopped. A successful replay whose
    /// completions the guest's queue cannot take is still a successful replay: the
    /// broken queue is reported in [`Resumed::broken_queue`].
    pub fn resume<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<Resumed, ReplayError> {
        let report = self.disk.replay()?;
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
        Ok(resumed)
    }

    /// The driver reset the device: in-flight requests will never be answered. The
    /// disk keeps its buffer (writes the guest saw complete) and its error state.
    pub fn reset(&mut self) -> usize {
        self.inflight.clear();
        self.acked = 0;
        self.wce = self.disk.config().writeback;
        self.disk.drop_parked()
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
        let used = match mem.write_obj(status.virtio_code(), inflight.status) {
            Ok(()) => written + 1,
            Err(_) => 0,
        };
        queue
            .add_used(mem, inflight.head, used as u32)
            .map_err(Error::UsedRing)
    }

    fn reject<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        r: Rejected,
    ) -> Result<(), Error> {
        let used = match r.status.map(|at| mem.write_obj(r.code.virtio_code(), at)) {
            Some(Ok(())) => 1,
            _ => 0,
        };
        queue.add_used(mem, r.head, used).map_err(Error::UsedRing)
    }
}

impl<B: Backend> VirtioDevice for BlockDevice<B> {
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

/// What [`BlockDevice::resume`] did after a successful replay.
#[derive(Debug)]
pub struct Resumed {
    /// Used-ring entries added: the guest needs an interrupt if this is not 0.
    pub used: usize,
    pub bytes_rewritten: u64,
    /// The guest's queue could not take the completions: the device needs a reset.
    pub broken_queue: Option<Error>,
}

/// Splits a chain into the request and where its answer goes; `acked` are the
/// features the driver negotiated.
fn parse<M: GuestMemory, C>(
    mem: &M,
    chain: C,
    head: u16,
    acked: u64,
) -> Result<(RequestOp, Inflight), Rejected>
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
    let reject = |code| Rejected { head, status, code };
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
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let payload = readable_len - HEADER_SIZE;
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(reject(Status::IoErr))?;
    let sized = |len: usize| len as u64 % SECTOR_SIZE == 0 && len as u64 <= MAX_REQUEST_BYTES;
    let mut pad_to = 0;
    let op = match kind {
        VIRTIO_BLK_T_IN if sized(writable_len) && payload == 0 => RequestOp::Read {
            offset,
            len: writable_len as u64,
        },
        VIRTIO_BLK_T_OUT if sized(payload) && writable_len == 0 => {
            let data =
                gather(mem, &readable, HEADER_SIZE, payload).map_err(|()| reject(Status::IoErr))?;
            RequestOp::Write { offset, data }
        }
        VIRTIO_BLK_T_FLUSH => RequestOp::Flush,
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
                RequestOp::Discard { offset, len }
            } else {
                RequestOp::WriteZeroes { offset, len, unmap }
            }
        }
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_GET_ID => {
            return Err(reject(Status::IoErr))
        }
        _ => return Err(reject(Status::Unsupp)),
    };
    Ok((
        op,
        Inflight {
            head,
            data: writable,
            status,
            pad_to,
        },
    ))
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
        mem.read_slice(&mut out[done..done + n], at)
            .map_err(|_| ())?;
        done += n;
        skip = 0;
    }
    if done == len {
        Ok(out)
    } else {
        Err(())
    }
}

/// Writes `data` across the regions; returns bytes written.
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
