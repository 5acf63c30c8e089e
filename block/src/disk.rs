//! The disk engine: runs guest [`Request`]s against a [`Backend`] as docs/durability.md says.
//!
//! ```text
//!   Running  --a host write or flush fails under `stop`: it parks-->  Stopped
//!   Stopped  --replay(): Replaying (rewrite the buffer, flush, run
//!              the parked requests), all of it succeeded----------->  Running
//!                                          one step failed--------->  Stopped, all kept
//!   Running, Stopped  --detach()-->  Detached  --attach()-->  Stopped
//!   Detached  --replay()-->  refused (ENOMEDIUM), nothing changes
//! ```
//!
//! While the disk is not Running, every request submitted is parked behind the one
//! that failed, except guest errors (bad range, write to a read-only disk,
//! unsupported op) and GET_ID, which touch no storage and complete at once. Beside
//! its state the disk knows what the host may have lost of its buffer (`Host`):
//! after a failed host write or flush, the next flush rewrites the buffer first.
//!
//! A disk can let go of its image and take it back ([`Disk::detach`],
//! [`Disk::attach`]) when the host file system under it must be unmounted and
//! repaired: a detached disk keeps its buffer and parked requests, and cannot replay
//! until it is attached again. Its replay then rewrites the whole buffer,
//! since the repaired file may have lost anything that no host flush had covered.
//!
//! The engine is synchronous and sits behind its owner's lock. [`Disk::submit`] runs a
//! request whole; [`Disk::begin`] lets reads and write-back writes run beside each
//! other: it hands out a [`Call`] that runs its host call with no lock held, and
//! [`Disk::end`] takes the result back (a write enters the buffer then, so a flush
//! covers exactly the writes completed before it). What cannot run beside others
//! (a FLUSH, zeroes, a discard, a writethrough write, a write that needs room, a
//! request that meets a call in flight where one of the two writes) comes back as
//! [`Begun::Alone`], to be submitted once [`Disk::in_flight`] is 0; flushes,
//! replays, detaching and settling need the disk alone. Ranges meet at the host's
//! [granularity](Backend::granularity), not the guest's: with `O_DIRECT` a 512-byte
//! write is a read-modify-write of a whole host block, and two of them in one block
//! at once would each write back the other's old bytes. The engine tells its
//! owner about host errors through [`Outcome::error`]; pausing the VM and sending
//! events is the owner's job. The owner must not run vCPUs between a failed
//! [`Disk::replay`] and a successful one: the parked requests have not completed.

use std::collections::VecDeque;

use crate::backend::{AttachError, Backend, SharedIo};
use crate::buffer::{BufferStats, ExtentData, FlushTicket, UnflushedBuffer};
use crate::bytes::{Borrowed, Bytes};
use crate::policy::{ErrorAction, ErrorPolicy, IoStatus};
use crate::request::{Completion, Request, RequestOp, Status};
use crate::HostError;

/// Default bound of the unflushed buffer, per disk.
pub const DEFAULT_UNFLUSHED_LIMIT: u64 = 128 << 20;

/// Past 1/FLUSH_AHEAD_AT of its bound, a disk flushes ahead of it, beside the guest's
/// writes, and starts each write's write-back at once ([`Disk::flush_ahead`]). Half:
/// what measured best in tests/bench-fio's sequential write (docs/fio-history.md).
pub const FLUSH_AHEAD_AT: u64 = 2;

/// Largest range one request may cover; larger ones complete `S_IOERR` rather than
/// make the VMM allocate, or the host zero, what a guest asks.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// Longest serial GET_ID returns (virtio's `VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// How a disk behaves; see docs/durability.md for each knob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Write-back (the guest flushes) or writethrough (every write is flushed).
    pub writeback: bool,
    pub werror: ErrorPolicy,
    pub rerror: ErrorPolicy,
    /// When a write would take the buffer past this, the disk flushes first. The
    /// bound holds for requests no longer than it: one longer goes in alone, after
    /// everything else was flushed (`holdfast run` refuses a bound below
    /// [`MAX_REQUEST_BYTES`]).
    pub unflushed_limit: u64,
    /// Keep extents one extra successful flush (hosts that report errors late).
    pub keep_extra_flush: bool,
    pub read_only: bool,
    /// What GET_ID returns (at most 20 bytes are used).
    pub serial: String,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            writeback: true,
            werror: ErrorPolicy::Stop,
            rerror: ErrorPolicy::Stop,
            unflushed_limit: DEFAULT_UNFLUSHED_LIMIT,
            keep_extra_flush: false,
            read_only: false,
            serial: String::new(),
        }
    }
}

/// A host error the owner must hear about (QMP's `BLOCK_IO_ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoErrorReport {
    pub error: HostError,
    pub action: ErrorAction,
}

/// What [`Disk::submit`] did with a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The completion to give the guest now; `None` when the request was parked.
    pub completion: Option<Completion>,
    /// Set when a host call failed while running this request.
    pub error: Option<IoErrorReport>,
}

impl Outcome {
    /// Completed, with no host error.
    pub fn done(completion: Completion) -> Self {
        Outcome {
            completion: Some(completion),
            error: None,
        }
    }

    pub fn is_parked(&self) -> bool {
        self.completion.is_none()
    }

    /// Parked, with no host error (the disk was stopped already).
    pub fn parked() -> Self {
        Outcome::default()
    }
}

/// What [`Disk::begin`] made of a request.
#[derive(Debug)]
pub enum Begun {
    /// Done (or parked) at once, as [`Disk::submit`] says.
    Done(Outcome),
    /// A host call to run with no lock held, then hand to [`Disk::end`].
    Call(Call),
    /// Needs the disk alone: [`Disk::submit`] it once [`Disk::in_flight`] is 0.
    Alone(Request),
}

#[derive(Debug)]
enum CallKind {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        data: Bytes,
    },
    /// A write whose host call runs from where the guest's bytes lie, while its
    /// caller copies them for the buffer ([`Disk::begin_borrowed_write`]).
    WriteBorrowed {
        offset: u64,
        len: u64,
        /// The copy for the buffer, once [`Call::supply`] gave it.
        data: Option<Bytes>,
    },
    /// The disk's own flush ahead of its bound ([`Disk::flush_ahead`]).
    Flush {
        ticket: FlushTicket,
    },
}

/// A guest read or write running beside others on the disk ([`Disk::begin`]), or the
/// disk's own flush ahead of its bound ([`Disk::flush_ahead`]).
#[derive(Debug)]
pub struct Call {
    /// Tells this call from the others in flight.
    id: u64,
    tag: u64,
    kind: CallKind,
    io: std::sync::Arc<dyn SharedIo>,
    /// A write into a buffer past half its bound: start its write-back at once, so
    /// that the flush that makes room finds little left to write.
    early_writeback: bool,
    /// The host call's result (a read's bytes) once [`Call::run`] ran it.
    result: Option<Result<Vec<u8>, HostError>>,
}

impl Call {
    /// The host call; holds no lock of the disk's. Runs once.
    pub fn run(&mut self) {
        if self.result.is_some() {
            return;
        }
        self.result = Some(match &self.kind {
            CallKind::Read { offset, len } => {
                let mut buf = vec![0; *len as usize];
                self.io.read_at(&mut buf, *offset).map(|()| buf)
            }
            CallKind::Write { offset, data }
            | CallKind::WriteBorrowed {
                offset,
                data: Some(data),
                ..
            } => {
                let written = self.io.write_at(data, *offset);
                self.written(written)
            }
            CallKind::WriteBorrowed { data: None, .. } => {
                panic!("a borrowed write runs from its bytes (run_borrowed) or their copy (supply)")
            }
            CallKind::Flush { .. } => self.io.flush().map(|()| Vec::new()),
        });
    }

    /// Runs a [`Disk::begin_borrowed_write`] call's host write from `src`, where the
    /// guest's bytes lie (the caller copies them meanwhile, for [`Call::supply`]).
    /// Any other call runs as [`Call::run`] does. Runs once.
    pub fn run_borrowed(&mut self, src: &[Borrowed]) {
        if self.result.is_some() {
            return;
        }
        let CallKind::WriteBorrowed { offset, len, .. } = self.kind else {
            return self.run();
        };
        let given: u64 = src.iter().map(|b| b.len() as u64).sum();
        assert_eq!(given, len, "a borrowed write runs from all its bytes");
        let written = self.io.write_borrowed_at(src, offset);
        self.result = Some(self.written(written));
    }

    /// Gives a [`Disk::begin_borrowed_write`] call the copy of its bytes that the
    /// buffer keeps: before [`Disk::end`], which panics without it.
    pub fn supply(&mut self, copy: Bytes) {
        if let CallKind::WriteBorrowed { len, data, .. } = &mut self.kind {
            assert_eq!(
                copy.len() as u64,
                *len,
                "a borrowed write's copy is all of it"
            );
            *data = Some(copy);
        }
    }

    /// Writes a [`Disk::begin_borrowed_write`] call's bytes again, from the copy the
    /// buffer keeps ([`Call::supply`]), once its host write ran: for when the guest
    /// may have changed them while that write read them (it reset the device, and
    /// so may reuse the memory), so that the host holds what the buffer holds.
    pub fn rerun_from_copy(&mut self) {
        if let CallKind::WriteBorrowed {
            offset,
            data: Some(data),
            ..
        } = &self.kind
        {
            let written = self.io.write_at(data, *offset);
            self.result = Some(self.written(written));
        }
    }

    /// A write's result; starts its write-back when the disk asked for that.
    fn written(&self, written: Result<(), HostError>) -> Result<Vec<u8>, HostError> {
        if written.is_ok() && self.early_writeback {
            if let Some((offset, len)) = self.write_range() {
                self.io.start_writeback(offset, len);
            }
        }
        written.map(|()| Vec::new())
    }

    fn write_range(&self) -> Option<(u64, u64)> {
        match &self.kind {
            CallKind::Write { offset, data } => Some((*offset, data.len() as u64)),
            CallKind::WriteBorrowed { offset, len, .. } => Some((*offset, *len)),
            _ => None,
        }
    }
}

/// A successful replay: the parked requests' completions, in the order they were
/// submitted, and what was rewritten.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub completions: Vec<Completion>,
    pub bytes_rewritten: u64,
    pub extents_rewritten: usize,
}

/// A replay that failed; the disk stays stopped with its buffer and parked requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("replay failed")]
pub struct ReplayError {
    #[source]
    pub error: HostError,
}

/// Buffered bytes that could not be made stable before the disk goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{unflushed_bytes} unflushed bytes could not be written")]
pub struct SettleError {
    pub unflushed_bytes: u64,
    #[source]
    pub error: HostError,
}

/// Why [`Disk::detach`] or [`Disk::attach`] refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("the disk is already detached from its image")]
    AlreadyDetached,
    #[error("the disk is attached to its image (x-block-detach it first)")]
    NotDetached,
    #[error(transparent)]
    Image(#[from] AttachError),
}

/// What `x-query-unflushed` shows of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStatus {
    pub io_status: IoStatus,
    pub stopped: bool,
    /// The disk let go of its image ([`Disk::detach`]).
    pub detached: bool,
    pub parked: usize,
    pub buffer: BufferStats,
    pub last_error: Option<HostError>,
    /// Flushes the disk issued on its own to stay under its buffer bound (ahead of
    /// it, or when a write needed room).
    pub internal_flushes: u64,
    /// Host calls running beside each other now ([`Disk::begin`]).
    pub in_flight: usize,
    /// The most host calls that ever ran beside each other.
    pub peak_in_flight: usize,
    /// Requests that met a call in flight at the host's granularity, one of the two
    /// a write, and so waited to run alone.
    pub held_back: u64,
}

/// A parked request. `Done` ones have already had their effect, in order: a failed
/// write whose bytes are in the buffer, a flush that replay's own flush covers, or any
/// request that ran during a replay that failed later. Replay hands their completion
/// over without running them again (running a read again could show it a later
/// write). `Pending` ones run on the next replay.
#[derive(Debug)]
enum Parked {
    Done(Completion),
    Pending(Request),
}

impl Parked {
    fn tag(&self) -> u64 {
        match self {
            Parked::Done(c) => c.tag,
            Parked::Pending(r) => r.tag,
        }
    }
}

/// A host call failed while executing a request: the request comes back to the
/// caller, who completes, parks or retries it.
#[derive(Debug)]
struct Failed {
    parked: Parked,
    error: HostError,
    /// A write that found the buffer at its bound and could not make room: unless
    /// it is parked (`stop`), it completes `S_IOERR` whatever the policy, since its
    /// bytes are not kept.
    at_bound: bool,
}

impl Failed {
    fn covered(tag: u64, error: HostError) -> Self {
        Failed {
            parked: Parked::Done(Completion::ok(tag)),
            error,
            at_bound: false,
        }
    }

    fn pending(req: Request, error: HostError) -> Self {
        Failed {
            parked: Parked::Pending(req),
            error,
            at_bound: false,
        }
    }
}

/// One virtual disk: backend, unflushed buffer, policy and error state.
#[derive(Debug)]
pub struct Disk<B> {
    backend: B,
    config: DiskConfig,
    buffer: UnflushedBuffer,
    /// Where the disk is: running, stopped, detached or replaying (the module's
    /// diagram), with what that state owns.
    state: State,
    /// What the host may have lost of the buffer.
    host: Host,
    /// Host calls running beside each other ([`Disk::begin`]), not yet ended.
    in_flight: Vec<InFlight>,
    next_call: u64,
    /// What `x-query-unflushed` counts: the last host error, flushes the disk made on
    /// its own, the most calls in flight at once, requests held back to run alone.
    last_error: Option<HostError>,
    internal_flushes: u64,
    peak_in_flight: usize,
    held_back: u64,
}

/// The disk's states (the module's diagram).
#[derive(Debug)]
enum State {
    /// Serving requests.
    Running,
    /// A host error under `stop` stopped it (or a detach, now attached again):
    /// requests park behind the one that failed until a replay succeeds.
    Stopped(Stop),
    /// It let go of its image ([`Disk::detach`]): stopped, and no replay until it is
    /// attached again.
    Detached(Stop),
    /// In [`Disk::replay`]: the flushes that succeed release their extents only once
    /// the whole replay has (`release`).
    Replaying {
        stop: Stop,
        release: Vec<FlushTicket>,
    },
}

/// What a stopped disk keeps.
#[derive(Debug, Default)]
struct Stop {
    /// In the order the device took them (tags grow in that order).
    parked: VecDeque<Parked>,
    io_status: IoStatus,
    /// The request whose failure stopped the disk: a call in flight beside it that
    /// was taken after it and ends later is parked, not completed.
    by: Option<u64>,
}

/// What the host may have lost of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    /// Nothing failed since the buffer was last rewritten: a flush vouches for it.
    Trusted,
    /// A host write or flush failed since the buffer was last rewritten: the host
    /// may have dropped buffered bytes, so the next flush rewrites the buffer first.
    Suspect,
    /// As `Suspect`, and a flush to make room failed and none succeeded since: until
    /// one does (the guest's FLUSH, a replay), writes at the bound fail at once
    /// instead of each rewriting the whole buffer into a host that is still broken.
    Failing(HostError),
}

impl Host {
    /// A host write or flush failed.
    fn failed(self) -> Host {
        match self {
            Host::Failing(e) => Host::Failing(e),
            Host::Trusted | Host::Suspect => Host::Suspect,
        }
    }
}

/// A call in flight: its range on the host, widened to the backend's
/// [granularity](Backend::granularity), and for a write the memory its bytes will
/// take in the buffer (counted against the bound before they are there).
#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: u64,
    start: u64,
    end: u64,
    write: bool,
    weight: u64,
    /// The disk's own flush ahead of its bound.
    flush: bool,
}

impl InFlight {
    /// Whether two calls may not run at once: their host ranges meet, and one writes.
    fn conflicts(&self, start: u64, end: u64, write: bool) -> bool {
        (self.write || write) && self.start < end && start < self.end
    }
}

/// `[start, start + len)` widened to whole blocks of `granularity` bytes.
fn widen(start: u64, len: u64, granularity: u64) -> (u64, u64) {
    let g = granularity.max(1);
    let end = start.saturating_add(len);
    (start / g * g, end.div_ceil(g).saturating_mul(g))
}

impl<B: Backend> Disk<B> {
    pub fn new(backend: B, config: DiskConfig) -> Self {
        Disk {
            backend,
            buffer: UnflushedBuffer::new(config.keep_extra_flush),
            config,
            state: State::Running,
            host: Host::Trusted,
            in_flight: Vec::new(),
            next_call: 0,
            last_error: None,
            internal_flushes: 0,
            peak_in_flight: 0,
            held_back: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    pub fn config(&self) -> &DiskConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The guest switched the write cache (virtio's `writeback` config field).
    pub fn set_writeback(&mut self, writeback: bool) {
        self.config.writeback = writeback;
    }

    pub fn set_policies(&mut self, werror: ErrorPolicy, rerror: ErrorPolicy) {
        self.config.werror = werror;
        self.config.rerror = rerror;
    }

    /// Whether requests park (stopped, detached or replaying).
    pub fn is_stopped(&self) -> bool {
        !matches!(self.state, State::Running)
    }

    /// What a stopped disk keeps; `None` while it runs.
    fn stop(&self) -> Option<&Stop> {
        match &self.state {
            State::Running => None,
            State::Stopped(stop) | State::Detached(stop) | State::Replaying { stop, .. } => {
                Some(stop)
            }
        }
    }

    fn stop_mut(&mut self) -> Option<&mut Stop> {
        match &mut self.state {
            State::Running => None,
            State::Stopped(stop) | State::Detached(stop) | State::Replaying { stop, .. } => {
                Some(stop)
            }
        }
    }

    pub fn status(&self) -> DiskStatus {
        let stop = self.stop();
        DiskStatus {
            io_status: stop.map_or(IoStatus::Ok, |s| s.io_status),
            stopped: stop.is_some(),
            detached: self.is_detached(),
            parked: stop.map_or(0, |s| s.parked.len()),
            buffer: self.buffer.stats(),
            last_error: self.last_error,
            internal_flushes: self.internal_flushes,
            in_flight: self.in_flight.len(),
            peak_in_flight: self.peak_in_flight,
            held_back: self.held_back,
        }
    }

    /// Runs a guest request, or parks it if the disk is stopped or a host call fails
    /// under `stop`.
    pub fn submit(&mut self, req: Request) -> Outcome {
        if let Some(status) = self.guest_error(&req.op) {
            return Outcome::done(Completion::with_status(req.tag, status));
        }
        if req.op == RequestOp::GetId {
            return Outcome::done(get_id(req.tag, &self.config.serial));
        }
        if self.is_stopped() {
            self.park(Parked::Pending(req));
            return Outcome::parked();
        }
        let is_read = req.op.is_read();
        let tag = req.tag;
        match self.execute(req) {
            Ok(completion) => Outcome::done(completion),
            Err(failed) => self.host_error(failed, is_read, tag),
        }
    }

    /// Starts a guest request so that it may run beside others. A read the buffer
    /// does not cover, and a write-back write that fits under the buffer's bound,
    /// become a [`Call`] to run with no lock of the disk's held and hand back to
    /// [`Disk::end`]; requests that touch no storage, or find the disk stopped, are
    /// done at once as [`Disk::submit`] does them. The rest (FLUSH, which must cover
    /// exactly the writes completed before it; zeroes, discards, writethrough
    /// writes, a write that needs room; a read or write that meets a call in flight
    /// at the host's granularity, one of them a write, so that the buffer and the
    /// host see such writes in one order and no read-modify-write of a host block
    /// undoes another) need the disk alone: [`Begun::Alone`], for [`Disk::submit`]
    /// once nothing is in flight.
    pub fn begin(&mut self, req: Request) -> Begun {
        let quick =
            self.is_stopped() || req.op == RequestOp::GetId || self.guest_error(&req.op).is_some();
        if quick {
            return Begun::Done(self.submit(req));
        }
        let Some((start, len)) = req.op.range() else {
            return Begun::Alone(req);
        };
        if self.meets_a_call(start, len, !req.op.is_read()) {
            self.held_back += 1;
            return Begun::Alone(req);
        }
        if let RequestOp::Read { offset, len } = req.op {
            if self.buffer.covers(offset, len) {
                return Begun::Done(self.submit(req));
            }
        }
        let Some(io) = self.backend.shared_io() else {
            return Begun::Alone(req);
        };
        let kind = match req.op {
            RequestOp::Read { offset, len } => CallKind::Read { offset, len },
            RequestOp::Write { offset, data }
                if self.config.writeback && self.has_room_for(data.allocation_len() as u64) =>
            {
                CallKind::Write { offset, data }
            }
            op => return Begun::Alone(Request::new(req.tag, op)),
        };
        Begun::Call(self.start_call(req.tag, kind, start, len, io))
    }

    /// As [`Disk::begin`] for a write of `len` bytes at `offset` whose bytes are still
    /// where the guest put them: the [`Call`] `begin` would make, whose host write
    /// runs from there ([`Call::run_borrowed`]) while the caller copies them for the
    /// buffer ([`Call::supply`], before [`Disk::end`]); so the copy the buffer needs
    /// does not delay the host write. `None` where `begin` would make no call (the
    /// disk is stopped, the write is the guest's error, needs the disk alone, ...):
    /// then copy the bytes and `begin` the request.
    pub fn begin_borrowed_write(&mut self, tag: u64, offset: u64, len: u64) -> Option<Call> {
        let callable = !self.is_stopped()
            && self.config.writeback
            && !self.config.read_only
            && !self.bad_range(offset, len)
            && !self.meets_a_call(offset, len, true)
            && self.has_room_for(crate::bytes::weight_of(len));
        if !callable {
            return None;
        }
        let io = self.backend.shared_io()?;
        let kind = CallKind::WriteBorrowed {
            offset,
            len,
            data: None,
        };
        Some(self.start_call(tag, kind, offset, len, io))
    }

    /// A call in flight may not run beside one on `[start, start + len)` (a write if
    /// `write`): their ranges, widened to the backend's granularity, meet, and one of
    /// them writes (docs/durability.md, "Requests in flight"). Reads meet reads.
    fn meets_a_call(&self, start: u64, len: u64, write: bool) -> bool {
        let (start, end) = widen(start, len, self.backend.granularity());
        self.in_flight
            .iter()
            .any(|c| c.conflicts(start, end, write))
    }

    /// A write that will take `weight` bytes of memory in the buffer fits under the
    /// bound with the writes in flight, each counted so too.
    fn has_room_for(&self, weight: u64) -> bool {
        let room = self
            .config
            .unflushed_limit
            .saturating_sub(self.buffer.weight());
        let coming: u64 = self.in_flight.iter().map(|c| c.weight).sum();
        coming.saturating_add(weight) <= room
    }

    /// Checks the rule [`Disk::meets_a_call`] keeps, over every pair of calls in
    /// flight (debug builds).
    fn debug_check_in_flight(&self) {
        if cfg!(debug_assertions) {
            for (i, a) in self.in_flight.iter().enumerate() {
                for b in &self.in_flight[i + 1..] {
                    debug_assert!(
                        !a.conflicts(b.start, b.end, b.write),
                        "calls in flight meet at the host's granularity and one writes: \
                         {a:?} and {b:?}"
                    );
                }
            }
        }
    }

    /// Counts a call in flight over `[start, start + len)` and hands it out.
    fn start_call(
        &mut self,
        tag: u64,
        kind: CallKind,
        start: u64,
        len: u64,
        io: std::sync::Arc<dyn SharedIo>,
    ) -> Call {
        let weight = match &kind {
            CallKind::Write { data, .. } => data.allocation_len() as u64,
            CallKind::WriteBorrowed { len, .. } => crate::bytes::weight_of(*len),
            CallKind::Read { .. } | CallKind::Flush { .. } => 0,
        };
        let write = matches!(
            kind,
            CallKind::Write { .. } | CallKind::WriteBorrowed { .. }
        );
        let (start, end) = widen(start, len, self.backend.granularity());
        self.next_call += 1;
        self.in_flight.push(InFlight {
            id: self.next_call,
            start,
            end,
            write,
            weight,
            flush: false,
        });
        self.peak_in_flight = self.peak_in_flight.max(self.in_flight.len());
        self.debug_check_in_flight();
        let early_writeback =
            write && self.buffer.weight() > self.config.unflushed_limit / FLUSH_AHEAD_AT;
        Call {
            id: self.next_call,
            tag,
            kind,
            io,
            early_writeback,
            result: None,
        }
    }

    /// Ends a call [`Disk::begin`] started (run or not: one never run is run now):
    /// a write's bytes enter the buffer, a read gets the buffer laid over it, a
    /// failure takes the error policy's path. A call taken after the one whose
    /// failure stopped the disk is parked, even if it succeeded.
    pub fn end(&mut self, mut call: Call) -> Outcome {
        if call.result.is_none() {
            call.run();
        }
        let tag = call.tag;
        let id = call.id;
        self.in_flight.retain(|c| c.id != id);
        let result = call.result.take().unwrap_or(Ok(Vec::new()));
        // Taken after the request whose failure stopped the disk: parked, whatever
        // its own call did (one request at a time, it would run after the replay).
        let after_stop = self.stop().is_some_and(|s| s.by.is_some_and(|by| tag > by));
        let done = match call.kind {
            CallKind::Flush { ticket } => {
                self.flushed_ahead(ticket, result.map(|_| ()));
                return Outcome::parked();
            }
            CallKind::Read { offset, len } => match result {
                Ok(mut buf) => {
                    self.buffer.overlay(offset, &mut buf);
                    Ok(Completion {
                        tag,
                        status: Status::Ok,
                        data: buf,
                    })
                }
                Err(e) => {
                    let req = Request::new(tag, RequestOp::Read { offset, len });
                    Err((Failed::pending(req, e), true))
                }
            },
            CallKind::Write { offset, data }
            | CallKind::WriteBorrowed {
                offset,
                data: Some(data),
                ..
            } => {
                self.buffer.insert(offset, ExtentData::Bytes(data));
                match result {
                    Ok(_) => Ok(Completion::ok(tag)),
                    Err(e) => Err((Failed::covered(tag, e), false)),
                }
            }
            CallKind::WriteBorrowed { data: None, .. } => {
                panic!("a borrowed write ends with the copy the buffer keeps (Call::supply)")
            }
        };
        match (done, after_stop) {
            (Ok(c), false) => Outcome::done(c),
            (Ok(c), true) => {
                self.park(Parked::Done(c));
                Outcome::parked()
            }
            (Err((failed, is_read)), false) => self.host_error(failed, is_read, tag),
            (Err((failed, is_read)), true) => {
                // Parked as if under `stop`: a read runs again on the replay, a write's
                // bytes are in the buffer, which the replay writes again.
                let error = failed.error;
                self.last_error = Some(error);
                if !is_read {
                    self.host = self.host.failed();
                }
                self.park(failed.parked);
                Outcome {
                    completion: None,
                    error: Some(IoErrorReport {
                        error,
                        action: ErrorAction::Stop,
                    }),
                }
            }
        }
    }

    /// A flush of the disk's own to run beside the guest's writes, when the buffer is
    /// past half its bound and none is in flight: it covers the writes completed
    /// before it, and releases them when it ends, so that a stream of writes with no
    /// guest flush rarely waits for the bound. Never two flushes at once; none while
    /// a failed host call left the buffer to be rewritten first (the flush that
    /// makes room, alone, does that).
    pub fn flush_ahead(&mut self) -> Option<Call> {
        let wanted = matches!(self.state, State::Running)
            && self.host == Host::Trusted
            && !self.in_flight.iter().any(|c| c.flush)
            && self.buffer.weight() > self.config.unflushed_limit / FLUSH_AHEAD_AT;
        if !wanted {
            return None;
        }
        let io = self.backend.shared_io()?;
        self.next_call += 1;
        self.internal_flushes += 1;
        self.in_flight.push(InFlight {
            id: self.next_call,
            start: 0,
            end: 0,
            write: false,
            weight: 0,
            flush: true,
        });
        Some(Call {
            id: self.next_call,
            tag: 0,
            kind: CallKind::Flush {
                ticket: self.buffer.begin_flush(),
            },
            io,
            early_writeback: false,
            result: None,
        })
    }

    /// A flush ahead of the bound ended. On success its extents leave the buffer,
    /// unless a host call failed meanwhile (the host may have dropped bytes; the next
    /// flush rewrites them first); on failure the next flush rewrites the buffer, and
    /// a write that needs room fails as after any failed flush for room.
    fn flushed_ahead(&mut self, ticket: FlushTicket, result: Result<(), HostError>) {
        match result {
            Ok(()) if self.host == Host::Trusted => {
                self.buffer.flushed(ticket);
            }
            Ok(()) => {}
            Err(e) => {
                self.host = Host::Failing(e);
                self.last_error = Some(e);
            }
        }
    }

    /// Calls begun and not yet ended: while there are any, the disk must not be
    /// flushed, replayed, detached or settled.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Parks a request in the order the device took it (tags grow in that order): a
    /// call that was in flight beside others may fail after later requests parked.
    fn park(&mut self, parked: Parked) {
        let stop = self.stop_mut().expect("only a stopped disk parks");
        let tag = parked.tag();
        let at = stop
            .parked
            .iter()
            .rposition(|p| p.tag() <= tag)
            .map_or(0, |i| i + 1);
        stop.parked.insert(at, parked);
    }

    /// Applies the error policy to a failed request.
    fn host_error(&mut self, failed: Failed, is_read: bool, tag: u64) -> Outcome {
        let error = failed.error;
        let policy = if is_read {
            self.config.rerror
        } else {
            self.config.werror
        };
        let action = policy.action(&error);
        self.last_error = Some(error);
        if !is_read {
            // The host may not have the buffered bytes: whatever the policy, the next
            // flush must write them again before it can vouch for them.
            self.host = self.host.failed();
        }
        let report = Some(IoErrorReport { error, action });
        let status = match action {
            ErrorAction::Report | ErrorAction::Ignore if failed.at_bound => Status::IoErr,
            ErrorAction::Stop => {
                let io_status = IoStatus::of(&error);
                match self.stop_mut() {
                    Some(stop) => stop.io_status = io_status,
                    None => {
                        self.state = State::Stopped(Stop {
                            parked: VecDeque::new(),
                            io_status,
                            by: Some(tag),
                        })
                    }
                }
                self.park(failed.parked);
                return Outcome {
                    completion: None,
                    error: report,
                };
            }
            ErrorAction::Report => Status::IoErr,
            ErrorAction::Ignore => Status::Ok,
        };
        let data = match (action, failed.parked) {
            // An ignored read error still returns the buffered bytes it can.
            (
                ErrorAction::Ignore,
                Parked::Pending(Request {
                    op: RequestOp::Read { offset, len },
                    ..
                }),
            ) => {
                let mut buf = vec![0; len as usize];
                self.buffer.overlay(offset, &mut buf);
                buf
            }
            _ => Vec::new(),
        };
        Outcome {
            completion: Some(Completion { tag, status, data }),
            error: report,
        }
    }

    /// Mistakes of the guest: they never reach the host and never stop the disk.
    fn guest_error(&self, op: &RequestOp) -> Option<Status> {
        guest_mistake(
            op,
            self.size(),
            self.config.read_only,
            self.backend.capabilities(),
        )
    }

    /// `[offset, offset + len)` runs past the disk's end or is longer than a request
    /// may be ([`MAX_REQUEST_BYTES`]).
    fn bad_range(&self, offset: u64, len: u64) -> bool {
        bad_range(offset, len, self.size())
    }

    /// Runs one request on the host. A failure hands the request back with its error.
    fn execute(&mut self, req: Request) -> Result<Completion, Failed> {
        let tag = req.tag;
        match req.op {
            RequestOp::Read { offset, len } => {
                let mut buf = vec![0; len as usize];
                // Fully buffered ranges need no host read (and cannot fail on one).
                if !self.buffer.covers(offset, len) {
                    if let Err(e) = self.backend.read_at(&mut buf, offset) {
                        return Err(Failed::pending(req, e));
                    }
                }
                self.buffer.overlay(offset, &mut buf);
                Ok(Completion {
                    tag,
                    status: Status::Ok,
                    data: buf,
                })
            }
            RequestOp::Write { offset, data } => {
                let weight = data.allocation_len() as u64;
                if let Err(e) = self.make_room(weight) {
                    return Err(
                        self.no_room(Request::new(tag, RequestOp::Write { offset, data }), e)
                    );
                }
                // Failed or not, the bytes are the guest's: keep them for replay.
                let written = self.backend.write_at(&data, offset);
                self.buffer.insert(offset, ExtentData::Bytes(data));
                written.map_err(|e| Failed::covered(tag, e))?;
                self.finish_write(tag)
            }
            RequestOp::WriteZeroes { offset, len, unmap } => {
                // Zero extents count their length against the bound.
                if let Err(e) = self.make_room(len) {
                    return Err(self.no_room(
                        Request::new(tag, RequestOp::WriteZeroes { offset, len, unmap }),
                        e,
                    ));
                }
                let written = self.backend.write_zeroes(offset, len, unmap);
                self.buffer.insert(offset, ExtentData::Zeroes(len));
                written.map_err(|e| Failed::covered(tag, e))?;
                self.finish_write(tag)
            }
            RequestOp::Discard { offset, len } => {
                // The range's content is unspecified from now on: nothing to keep.
                self.buffer.remove_range(offset, len);
                match self.backend.discard(offset, len) {
                    Ok(()) => Ok(Completion::ok(tag)),
                    Err(e) if e.errno == libc::EOPNOTSUPP => {
                        Ok(Completion::with_status(tag, Status::Unsupp))
                    }
                    Err(e) => Err(Failed::pending(req, e)),
                }
            }
            RequestOp::Flush => {
                self.host_flush().map_err(|e| Failed::covered(tag, e))?;
                Ok(Completion::ok(tag))
            }
            RequestOp::GetId => Ok(Completion::ok(tag)),
        }
    }

    /// In writethrough mode a write completes only once a flush covering it succeeded.
    fn finish_write(&mut self, tag: u64) -> Result<Completion, Failed> {
        if !self.config.writeback {
            self.host_flush().map_err(|e| Failed::covered(tag, e))?;
        }
        Ok(Completion::ok(tag))
    }

    /// Keeps the buffer under its bound with flushes the guest does not see;
    /// `incoming` is the memory the write will take in it.
    fn make_room(&mut self, incoming: u64) -> Result<(), HostError> {
        let mut tries = if self.config.keep_extra_flush { 2 } else { 1 };
        while tries > 0
            && !self.buffer.is_empty()
            && self.buffer.weight().saturating_add(incoming) > self.config.unflushed_limit
        {
            if let Host::Failing(e) = self.host {
                return Err(e);
            }
            self.internal_flushes += 1;
            if let Err(e) = self.host_flush() {
                self.host = Host::Failing(e);
                return Err(e);
            }
            tries -= 1;
        }
        Ok(())
    }

    /// A write that needed room the host could not make. Under `stop` it is parked
    /// with its bytes (the VM pauses, so the buffer cannot grow on); under any other
    /// policy it fails without entering the buffer, which so never passes its bound.
    fn no_room(&mut self, req: Request, error: HostError) -> Failed {
        if self.config.werror.action(&error) == ErrorAction::Stop {
            let tag = req.tag;
            match req.op {
                RequestOp::Write { offset, data } => {
                    self.buffer.insert(offset, ExtentData::Bytes(data))
                }
                RequestOp::WriteZeroes { offset, len, .. } => {
                    self.buffer.insert(offset, ExtentData::Zeroes(len))
                }
                _ => {}
            }
            // The replay's rewrite puts its bytes on the host.
            return Failed::covered(tag, error);
        }
        Failed {
            at_bound: true,
            ..Failed::pending(req, error)
        }
    }

    /// One host flush; rewrites the buffer first when an earlier failure may have
    /// cost the host buffered bytes.
    fn host_flush(&mut self) -> Result<(), HostError> {
        debug_assert!(self.in_flight.is_empty(), "the disk is not alone");
        if self.host != Host::Trusted {
            self.rewrite_buffer()?;
        }
        let ticket = self.buffer.begin_flush();
        let flushed = self.backend.flush();
        if let Err(e) = flushed {
            self.host = self.host.failed();
            return Err(e);
        }
        self.host = Host::Trusted;
        match &mut self.state {
            State::Replaying { release, .. } => release.push(ticket),
            _ => {
                self.buffer.flushed(ticket);
            }
        }
        Ok(())
    }

    /// Writes every buffered extent to the host again, adjacent extents in one
    /// vectored call. Returns (bytes, extents) written.
    fn rewrite_buffer(&mut self) -> Result<(u64, usize), HostError> {
        // Until it is done, a failure leaves the host as suspect as before.
        if self.host == Host::Trusted {
            self.host = Host::Suspect;
        }
        let mut bytes = 0;
        let mut extents = 0;
        let mut run: Vec<&[u8]> = Vec::new();
        let mut run_start = 0;
        let mut run_end = 0;
        for (offset, data) in self.buffer.extents() {
            extents += 1;
            bytes += data.len();
            match data {
                ExtentData::Bytes(b) => {
                    if run.is_empty() || offset != run_end || run.len() == REWRITE_RUN {
                        write_run(&mut self.backend, &run, run_start)?;
                        run.clear();
                        run_start = offset;
                    }
                    run.push(b);
                    run_end = offset + b.len() as u64;
                }
                ExtentData::Zeroes(len) => {
                    self.backend.write_zeroes(offset, *len, false)?;
                }
            }
        }
        write_run(&mut self.backend, &run, run_start)?;
        self.buffer.mark_all_rewritten();
        self.host = Host::Trusted;
        Ok((bytes, extents))
    }

    pub fn is_detached(&self) -> bool {
        matches!(self.state, State::Detached(_))
    }

    /// Lets go of the image (QMP `x-block-detach`): the backend closes every
    /// descriptor on it. The disk stops: requests park until it is attached and
    /// replayed; the buffer and the parked requests stay. The owner calls this only
    /// while no vCPU runs.
    pub fn detach(&mut self) -> Result<(), AttachmentError> {
        debug_assert!(self.in_flight.is_empty(), "the disk is not alone");
        if self.is_detached() {
            return Err(AttachmentError::AlreadyDetached);
        }
        self.backend.detach()?;
        let stop = match std::mem::replace(&mut self.state, State::Running) {
            State::Stopped(stop) | State::Detached(stop) | State::Replaying { stop, .. } => stop,
            State::Running => Stop::default(),
        };
        self.state = State::Detached(stop);
        // The image that comes back may lack whatever no host flush had covered.
        self.host = self.host.failed();
        Ok(())
    }

    /// Takes the image back (QMP `x-block-attach`), at `path` or where it was. The
    /// disk stays stopped until [`Disk::replay`]. On refusal nothing changed.
    pub fn attach(&mut self, path: Option<&std::path::Path>) -> Result<(), AttachmentError> {
        if !self.is_detached() {
            return Err(AttachmentError::NotDetached);
        }
        self.backend.attach(path)?;
        if let State::Detached(stop) = std::mem::replace(&mut self.state, State::Running) {
            self.state = State::Stopped(stop);
        }
        Ok(())
    }

    /// Resumes a stopped disk (QMP `cont`): rewrites every buffered extent, flushes
    /// (twice with `keep_extra_flush`), then runs the parked requests in order. Only if all of that succeeded are the
    /// parked requests completed, covered extents released and the disk running
    /// again. On failure everything stays as it was and `replay` may be called again.
    ///
    /// On a running disk this does nothing and returns an empty report. A detached
    /// disk cannot replay: it fails with `ENOMEDIUM` and nothing changes.
    pub fn replay(&mut self) -> Result<ReplayReport, ReplayError> {
        debug_assert!(self.in_flight.is_empty(), "the disk is not alone");
        let stop = match std::mem::replace(&mut self.state, State::Running) {
            State::Running => return Ok(ReplayReport::default()),
            detached @ State::Detached(_) => {
                self.state = detached;
                return Err(ReplayError {
                    error: HostError::new(crate::HostOp::Write, libc::ENOMEDIUM),
                });
            }
            State::Stopped(stop) | State::Replaying { stop, .. } => stop,
        };
        let mut stop = stop;
        let parked = std::mem::take(&mut stop.parked);
        self.state = State::Replaying {
            stop,
            release: Vec::new(),
        };
        let result = self.replay_steps(parked);
        let State::Replaying { mut stop, release } =
            std::mem::replace(&mut self.state, State::Running)
        else {
            unreachable!("only a replay leaves the Replaying state");
        };
        match result {
            Ok(report) => {
                for t in release {
                    self.buffer.flushed(t);
                }
                Ok(report)
            }
            Err((error, parked)) => {
                stop.parked = parked;
                stop.io_status = IoStatus::of(&error);
                self.last_error = Some(error);
                self.state = State::Stopped(stop);
                Err(ReplayError { error })
            }
        }
    }

    /// The replay's steps over the parked requests; on failure, the error and the
    /// parked requests as they now stand (what ran keeps its completion).
    fn replay_steps(
        &mut self,
        mut parked: VecDeque<Parked>,
    ) -> Result<ReplayReport, (HostError, VecDeque<Parked>)> {
        let (bytes_rewritten, extents_rewritten) = match self.rewrite_buffer() {
            Ok(rewritten) => rewritten,
            Err(e) => return Err((e, parked)),
        };
        let flushes = if self.config.keep_extra_flush {
            // A host that reports errors one flush late would let the first flush
            // succeed while storage is still broken; the second tells the truth
            // before the guest runs again.
            2
        } else {
            1
        };
        for _ in 0..flushes {
            if let Err(e) = self.host_flush() {
                return Err((e, parked));
            }
        }
        let mut completions = Vec::with_capacity(parked.len());
        while let Some(next) = parked.pop_front() {
            let failed = match next {
                Parked::Done(c) => {
                    completions.push(c);
                    continue;
                }
                Parked::Pending(req) => match self.execute(req) {
                    Ok(c) => {
                        completions.push(c);
                        continue;
                    }
                    Err(failed) => failed,
                },
            };
            parked.push_front(failed.parked);
            for c in completions.into_iter().rev() {
                parked.push_front(Parked::Done(c));
            }
            return Err((failed.error, parked));
        }
        Ok(ReplayReport {
            completions,
            bytes_rewritten,
            extents_rewritten,
        })
    }

    /// Makes every buffered byte stable before the disk goes away (QMP `quit`, guest
    /// poweroff). Parked requests are not run: the guest never saw them complete.
    /// On failure the error says how many bytes are still unflushed.
    pub fn settle(&mut self) -> Result<(), SettleError> {
        debug_assert!(self.in_flight.is_empty(), "the disk is not alone");
        let fail = |disk: &Self, error| SettleError {
            unflushed_bytes: disk.buffer.bytes(),
            error,
        };
        if self.is_detached() {
            // Nothing buffered is nothing lost; the parked requests never completed.
            if self.buffer.is_empty() {
                return Ok(());
            }
            return Err(fail(
                self,
                HostError::new(crate::HostOp::Flush, libc::ENOMEDIUM),
            ));
        }
        if self.is_stopped() {
            self.host = self.host.failed();
        }
        let flushes = if self.config.keep_extra_flush { 2 } else { 1 };
        for _ in 0..flushes {
            if let Err(e) = self.host_flush() {
                return Err(fail(self, e));
            }
        }
        Ok(())
    }

    /// The guest reset the device: parked requests will never be completed. The
    /// buffer stays (it holds writes the guest saw complete) and so does the error
    /// state. Returns how many requests were dropped.
    pub fn drop_parked(&mut self) -> usize {
        self.stop_mut().map_or(0, |stop| {
            let n = stop.parked.len();
            stop.parked.clear();
            n
        })
    }
}

/// What a disk of `size` bytes answers at once to a request that is the guest's
/// mistake (a write to a read-only disk, a range past the end, an op the backend
/// cannot do): it never reaches the host and never stops the disk. `None` if the
/// request is not one.
pub fn guest_mistake(
    op: &RequestOp,
    size: u64,
    read_only: bool,
    caps: crate::Capabilities,
) -> Option<Status> {
    let writes = matches!(
        op,
        RequestOp::Write { .. } | RequestOp::WriteZeroes { .. } | RequestOp::Discard { .. }
    );
    if writes && read_only {
        return Some(Status::IoErr);
    }
    if let RequestOp::Discard { .. } = op {
        if !caps.discard {
            return Some(Status::Unsupp);
        }
    }
    if let Some((offset, len)) = op.range() {
        // Zeroing or discarding nothing is malformed (the host would answer
        // EINVAL, which must not pass for a host error and stop the disk).
        let empty = len == 0
            && matches!(
                op,
                RequestOp::WriteZeroes { .. } | RequestOp::Discard { .. }
            );
        if bad_range(offset, len, size) || empty {
            return Some(Status::IoErr);
        }
    }
    None
}

/// `[offset, offset + len)` runs past the end of a disk of `size` bytes or is longer
/// than a request may be ([`MAX_REQUEST_BYTES`]).
fn bad_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_none_or(|end| end > size) || len > MAX_REQUEST_BYTES
}

/// What GET_ID answers: the serial, cut to [`ID_BYTES`].
pub fn get_id(tag: u64, serial: &str) -> Completion {
    let mut id = serial.as_bytes().to_vec();
    id.truncate(ID_BYTES);
    Completion {
        tag,
        status: Status::Ok,
        data: id,
    }
}

/// Longest run of extents written in one vectored call during a rewrite.
const REWRITE_RUN: usize = 1024;

/// Writes one run of adjacent extents and lets the host start writing it back, so
/// the flush that ends replay overlaps with the copying of later runs.
fn write_run<B: Backend>(backend: &mut B, run: &[&[u8]], offset: u64) -> Result<(), HostError> {
    match run {
        [] => return Ok(()),
        [one] => backend.write_at(one, offset)?,
        many => backend.write_vectored_at(many, offset)?,
    }
    let len = run.iter().map(|b| b.len() as u64).sum();
    backend.start_writeback(offset, len);
    Ok(())
}
