//! Device strategies for host errors, each an [`Engine`], so that `holdfast lab` and
//! the outage matrix compare them on one implementation of everything else (the
//! virtio frontend, the run-state owner, the workloads):
//! - `holdfast`: holdfast's own [`Disk`]: replay from the unflushed buffer;
//! - `retry-flush`: QEMU's `werror=stop` ([`RetryFlush`]): no buffer; on `cont`,
//!   re-issue only the parked requests;
//! - `sticky`: QEMU's default file backend ([`RetryFlush`] with `sticky`): after a
//!   failed flush every later flush fails (`page_cache_inconsistent`), so the VM
//!   cannot resume;
//! - `x-lying-flush`: deliberately broken ([`LyingFlush`]): holdfast's engine behind
//!   a device that completes every FLUSH at once without a host flush. It claims
//!   holdfast's promise; tests use it to show that whoever judges the results
//!   notices a loss.

use std::collections::VecDeque;
use std::fmt;
use std::path::Path;

use crate::backend::{Backend, Capabilities};
use crate::buffer::BufferStats;
use crate::disk::{
    get_id, guest_mistake, AttachmentError, Begun, Call, Disk, DiskConfig, DiskStatus,
    IoErrorReport, Outcome, ReplayError, ReplayReport, SettleError,
};
use crate::engine::Engine;
use crate::policy::{ErrorAction, IoStatus};
use crate::request::{Completion, Request, RequestOp, Status};
use crate::{HostError, HostOp};

/// How a device handles host errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    Holdfast,
    RetryFlush,
    Sticky,
    /// Deliberately broken, for tests of whoever judges the results (the module's
    /// list). It loses data in any outage that meets a flush.
    XLyingFlush,
}

impl Strategy {
    /// The strategies the matrix compares (not the deliberately broken one).
    pub const ALL: [Strategy; 3] = [Strategy::Holdfast, Strategy::RetryFlush, Strategy::Sticky];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Holdfast => "holdfast",
            Strategy::RetryFlush => "retry-flush",
            Strategy::Sticky => "sticky",
            Strategy::XLyingFlush => "x-lying-flush",
        }
    }

    /// The compared strategies' names, `, `-separated (for help texts and errors).
    pub fn names() -> String {
        Strategy::ALL.map(Strategy::as_str).join(", ")
    }

    /// Whether the strategy claims holdfast's guarantee (no acknowledged unit lost),
    /// so that a loss is a failure rather than a finding.
    pub fn promises_no_loss(self) -> bool {
        matches!(self, Strategy::Holdfast | Strategy::XLyingFlush)
    }

    /// Whether this is holdfast's own engine.
    pub fn is_holdfast(self) -> bool {
        self == Strategy::Holdfast
    }

    /// An engine over `backend` that handles host errors this way.
    pub fn engine<B: Backend + 'static>(self, backend: B, config: DiskConfig) -> Box<dyn Engine> {
        match self {
            Strategy::Holdfast => Box::new(Disk::new(backend, config)),
            Strategy::RetryFlush => Box::new(RetryFlush::new(backend, config, false)),
            Strategy::Sticky => Box::new(RetryFlush::new(backend, config, true)),
            Strategy::XLyingFlush => Box::new(LyingFlush(Disk::new(backend, config))),
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Strategy::ALL
            .into_iter()
            .chain([Strategy::XLyingFlush])
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown strategy `{s}` (expected {})", Strategy::names()))
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU's `werror=stop`: no buffer of its own; requests go to the host as they come,
/// one at a time; a failed request is parked as it is, and `cont` re-issues only the
/// parked requests, in order (no rewrite, no flush first). With `sticky`, after a
/// failed flush every later flush fails, as with QEMU's default file backend.
#[derive(Debug)]
pub struct RetryFlush<B> {
    backend: B,
    config: DiskConfig,
    sticky: bool,
    /// A flush failed (what `sticky` remembers).
    flush_failed: bool,
    /// Stopped on a host error under `stop`, or detached: what it parked, in order.
    stopped: Option<Stopped>,
    detached: bool,
    last_error: Option<HostError>,
}

#[derive(Debug)]
struct Stopped {
    parked: VecDeque<Parked>,
    io_status: IoStatus,
}

/// A parked request; `Done` ones ran during a replay that failed later.
#[derive(Debug)]
enum Parked {
    Done(Completion),
    Pending(Request),
}

impl<B: Backend> RetryFlush<B> {
    pub fn new(backend: B, config: DiskConfig, sticky: bool) -> Self {
        RetryFlush {
            backend,
            config,
            sticky,
            flush_failed: false,
            stopped: None,
            detached: false,
            last_error: None,
        }
    }

    /// Runs a request on the host.
    fn execute(&mut self, req: &Request) -> Result<Completion, HostError> {
        let tag = req.tag;
        match &req.op {
            RequestOp::Read { offset, len } => {
                let mut data = vec![0; *len as usize];
                self.backend.read_at(&mut data, *offset)?;
                Ok(Completion {
                    tag,
                    status: Status::Ok,
                    data,
                })
            }
            RequestOp::Write { offset, data } => {
                self.backend.write_at(data, *offset)?;
                Ok(Completion::ok(tag))
            }
            RequestOp::WriteZeroes { offset, len, unmap } => {
                self.backend.write_zeroes(*offset, *len, *unmap)?;
                Ok(Completion::ok(tag))
            }
            RequestOp::Discard { offset, len } => match self.backend.discard(*offset, *len) {
                Ok(()) => Ok(Completion::ok(tag)),
                Err(e) if e.errno == libc::EOPNOTSUPP => {
                    Ok(Completion::with_status(tag, Status::Unsupp))
                }
                Err(e) => Err(e),
            },
            RequestOp::Flush if self.flush_failed => Err(HostError::new(HostOp::Flush, libc::EIO)),
            RequestOp::Flush => {
                let flushed = self.backend.flush();
                self.flush_failed |= self.sticky && flushed.is_err();
                flushed.map(|()| Completion::ok(tag))
            }
            RequestOp::GetId => Ok(get_id(tag, &self.config.serial)),
        }
    }

    /// Applies the error policy to a request that failed.
    fn host_error(&mut self, req: Request, error: HostError) -> Outcome {
        let policy = if req.op.is_read() {
            self.config.rerror
        } else {
            self.config.werror
        };
        let action = policy.action(&error);
        self.last_error = Some(error);
        let report = Some(IoErrorReport { error, action });
        let status = match action {
            ErrorAction::Stop => {
                let stopped = self.stopped.get_or_insert_with(|| Stopped {
                    parked: VecDeque::new(),
                    io_status: IoStatus::Ok,
                });
                stopped.io_status = IoStatus::of(&error);
                stopped.parked.push_back(Parked::Pending(req));
                return Outcome {
                    completion: None,
                    error: report,
                };
            }
            ErrorAction::Report => Status::IoErr,
            ErrorAction::Ignore => Status::Ok,
        };
        let data = match req.op {
            RequestOp::Read { len, .. } if action == ErrorAction::Ignore => vec![0; len as usize],
            _ => Vec::new(),
        };
        Outcome {
            completion: Some(Completion {
                tag: req.tag,
                status,
                data,
            }),
            error: report,
        }
    }
}

impl<B: Backend> Engine for RetryFlush<B> {
    fn size(&self) -> u64 {
        self.backend.size()
    }
    fn config(&self) -> &DiskConfig {
        &self.config
    }
    fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
    }
    fn image(&self) -> Option<&Path> {
        self.backend.image()
    }
    fn status(&self) -> DiskStatus {
        DiskStatus {
            io_status: self.stopped.as_ref().map_or(IoStatus::Ok, |s| s.io_status),
            stopped: self.stopped.is_some(),
            detached: self.detached,
            parked: self.stopped.as_ref().map_or(0, |s| s.parked.len()),
            buffer: BufferStats::default(),
            last_error: self.last_error,
            internal_flushes: 0,
            in_flight: 0,
            peak_in_flight: 0,
            held_back: 0,
        }
    }
    fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }
    fn is_detached(&self) -> bool {
        self.detached
    }
    fn in_flight(&self) -> usize {
        0
    }
    fn set_writeback(&mut self, writeback: bool) {
        self.config.writeback = writeback;
    }
    fn submit(&mut self, req: Request) -> Outcome {
        let mistake = guest_mistake(
            &req.op,
            self.size(),
            self.config.read_only,
            self.capabilities(),
        );
        if let Some(status) = mistake {
            return Outcome::done(Completion::with_status(req.tag, status));
        }
        if req.op == RequestOp::GetId {
            return Outcome::done(get_id(req.tag, &self.config.serial));
        }
        if let Some(stopped) = &mut self.stopped {
            stopped.parked.push_back(Parked::Pending(req));
            return Outcome::parked();
        }
        match self.execute(&req) {
            Ok(c) => Outcome::done(c),
            Err(e) => self.host_error(req, e),
        }
    }
    fn begin(&mut self, req: Request) -> Begun {
        Begun::Alone(req)
    }
    fn end(&mut self, _call: Call) -> Outcome {
        unreachable!("the retry-flush engine hands out no calls")
    }
    fn replay(&mut self) -> Result<ReplayReport, ReplayError> {
        if self.detached {
            return Err(ReplayError {
                error: HostError::new(HostOp::Write, libc::ENOMEDIUM),
            });
        }
        let Some(mut stopped) = self.stopped.take() else {
            return Ok(ReplayReport::default());
        };
        let mut completions = Vec::new();
        while let Some(parked) = stopped.parked.pop_front() {
            let req = match parked {
                Parked::Done(c) => {
                    completions.push(c);
                    continue;
                }
                Parked::Pending(req) => req,
            };
            match self.execute(&req) {
                Ok(c) => completions.push(c),
                Err(error) => {
                    stopped.parked.push_front(Parked::Pending(req));
                    for c in completions.into_iter().rev() {
                        stopped.parked.push_front(Parked::Done(c));
                    }
                    stopped.io_status = IoStatus::of(&error);
                    self.last_error = Some(error);
                    self.stopped = Some(stopped);
                    return Err(ReplayError { error });
                }
            }
        }
        Ok(ReplayReport {
            completions,
            bytes_rewritten: 0,
            extents_rewritten: 0,
        })
    }
    fn settle(&mut self) -> Result<(), SettleError> {
        if self.detached {
            return Ok(());
        }
        let flushes = if self.config.keep_extra_flush { 2 } else { 1 };
        for _ in 0..flushes {
            self.backend.flush().map_err(|error| SettleError {
                unflushed_bytes: 0,
                error,
            })?;
        }
        Ok(())
    }
    fn detach(&mut self) -> Result<(), AttachmentError> {
        if self.detached {
            return Err(AttachmentError::AlreadyDetached);
        }
        self.backend.detach()?;
        self.detached = true;
        self.stopped.get_or_insert_with(|| Stopped {
            parked: VecDeque::new(),
            io_status: IoStatus::Ok,
        });
        Ok(())
    }
    fn attach(&mut self, path: Option<&Path>) -> Result<(), AttachmentError> {
        if !self.detached {
            return Err(AttachmentError::NotDetached);
        }
        self.backend.attach(path)?;
        self.detached = false;
        Ok(())
    }
    fn drop_parked(&mut self) -> usize {
        self.stopped.as_mut().map_or(0, |s| {
            let n = s.parked.len();
            s.parked.clear();
            n
        })
    }
}

/// holdfast's engine behind a device that completes every FLUSH at once, without a
/// host flush, while the disk runs; everything else as holdfast, one request at a
/// time.
#[derive(Debug)]
pub struct LyingFlush<B>(pub Disk<B>);

impl<B: Backend> Engine for LyingFlush<B> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn config(&self) -> &DiskConfig {
        self.0.config()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.backend().capabilities()
    }
    fn image(&self) -> Option<&Path> {
        self.0.backend().image()
    }
    fn status(&self) -> DiskStatus {
        self.0.status()
    }
    fn is_stopped(&self) -> bool {
        self.0.is_stopped()
    }
    fn is_detached(&self) -> bool {
        self.0.is_detached()
    }
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
    fn set_writeback(&mut self, writeback: bool) {
        self.0.set_writeback(writeback)
    }
    fn submit(&mut self, req: Request) -> Outcome {
        if req.op == RequestOp::Flush && !self.0.is_stopped() {
            return Outcome::done(Completion::ok(req.tag));
        }
        self.0.submit(req)
    }
    fn end(&mut self, call: Call) -> Outcome {
        self.0.end(call)
    }
    fn replay(&mut self) -> Result<ReplayReport, ReplayError> {
        self.0.replay()
    }
    fn settle(&mut self) -> Result<(), SettleError> {
        self.0.settle()
    }
    fn detach(&mut self) -> Result<(), AttachmentError> {
        self.0.detach()
    }
    fn attach(&mut self, path: Option<&Path>) -> Result<(), AttachmentError> {
        self.0.attach(path)
    }
    fn drop_parked(&mut self) -> usize {
        self.0.drop_parked()
    }
}
