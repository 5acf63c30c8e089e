//! What a device drives for one virtual disk: the [`Engine`] interface. holdfast's
//! engine is [`Disk`]; with the cargo feature `sim`, `sim::strategy` puts
//! other devices' error handling behind the same interface, so that `holdfast lab`
//! and the outage matrix compare them on one implementation of everything else.

use std::path::Path;

use crate::backend::{Backend, Capabilities};
use crate::disk::{
    AttachmentError, Begun, Call, Disk, DiskConfig, DiskStatus, Outcome, ReplayError, ReplayReport,
    SettleError,
};
use crate::request::Request;

/// A disk engine: runs a disk's guest requests against its host storage, parks them
/// when the host fails under `stop`, replays on `cont`. [`Disk`] documents each
/// method; an engine that runs nothing beside anything else keeps the defaults of
/// [`Engine::begin`], [`Engine::begin_borrowed_write`] and [`Engine::flush_ahead`].
pub trait Engine: Send {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    fn config(&self) -> &DiskConfig;
    /// What the host storage can do (discard, write zeroes).
    fn capabilities(&self) -> Capabilities;
    /// Where the image lives on the host, if it has a path.
    fn image(&self) -> Option<&Path>;
    fn status(&self) -> DiskStatus;
    /// Whether requests park.
    fn is_stopped(&self) -> bool;
    fn is_detached(&self) -> bool;
    /// Host calls begun and not yet ended.
    fn in_flight(&self) -> usize;
    /// The guest switched the write cache.
    fn set_writeback(&mut self, writeback: bool);
    /// Runs a request whole (the engine alone).
    fn submit(&mut self, req: Request) -> Outcome;
    /// Starts a request so that it may run beside others.
    fn begin(&mut self, req: Request) -> Begun {
        Begun::Alone(req)
    }
    /// A long write's call that runs from the guest's memory, if the engine runs it
    /// beside others.
    fn begin_borrowed_write(&mut self, _tag: u64, _offset: u64, _len: u64) -> Option<Call> {
        None
    }
    /// The engine's own flush, to run beside the guest's writes.
    fn flush_ahead(&mut self) -> Option<Call> {
        None
    }
    /// Ends a call [`Engine::begin`], [`Engine::begin_borrowed_write`] or
    /// [`Engine::flush_ahead`] handed out.
    fn end(&mut self, call: Call) -> Outcome;
    /// Resumes a stopped disk (QMP `cont`).
    fn replay(&mut self) -> Result<ReplayReport, ReplayError>;
    /// Makes what the guest was told is written stable before the disk goes away.
    fn settle(&mut self) -> Result<(), SettleError>;
    /// Lets go of the image (QMP `x-block-detach`).
    fn detach(&mut self) -> Result<(), AttachmentError>;
    /// Takes the image back (QMP `x-block-attach`).
    fn attach(&mut self, path: Option<&Path>) -> Result<(), AttachmentError>;
    /// The guest reset the device: parked requests will never be completed.
    fn drop_parked(&mut self) -> usize;
}

impl<B: Backend> Engine for Disk<B> {
    fn size(&self) -> u64 {
        Disk::size(self)
    }
    fn config(&self) -> &DiskConfig {
        Disk::config(self)
    }
    fn capabilities(&self) -> Capabilities {
        self.backend().capabilities()
    }
    fn image(&self) -> Option<&Path> {
        self.backend().image()
    }
    fn status(&self) -> DiskStatus {
        Disk::status(self)
    }
    fn is_stopped(&self) -> bool {
        Disk::is_stopped(self)
    }
    fn is_detached(&self) -> bool {
        Disk::is_detached(self)
    }
    fn in_flight(&self) -> usize {
        Disk::in_flight(self)
    }
    fn set_writeback(&mut self, writeback: bool) {
        Disk::set_writeback(self, writeback)
    }
    fn submit(&mut self, req: Request) -> Outcome {
        Disk::submit(self, req)
    }
    fn begin(&mut self, req: Request) -> Begun {
        Disk::begin(self, req)
    }
    fn begin_borrowed_write(&mut self, tag: u64, offset: u64, len: u64) -> Option<Call> {
        Disk::begin_borrowed_write(self, tag, offset, len)
    }
    fn flush_ahead(&mut self) -> Option<Call> {
        Disk::flush_ahead(self)
    }
    fn end(&mut self, call: Call) -> Outcome {
        Disk::end(self, call)
    }
    fn replay(&mut self) -> Result<ReplayReport, ReplayError> {
        Disk::replay(self)
    }
    fn settle(&mut self) -> Result<(), SettleError> {
        Disk::settle(self)
    }
    fn detach(&mut self) -> Result<(), AttachmentError> {
        Disk::detach(self)
    }
    fn attach(&mut self, path: Option<&Path>) -> Result<(), AttachmentError> {
        Disk::attach(self, path)
    }
    fn drop_parked(&mut self) -> usize {
        Disk::drop_parked(self)
    }
}
