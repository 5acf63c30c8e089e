//! Which host call a disk is in, and since when: a [`Backend`] wrapper that notes
//! each call as it starts and clears it when it returns, readable from any thread
//! through a [`CallWatch`] without waiting on the disk. A call that hangs (a hard NFS
//! mount, a lost iSCSI path, a suspended device-mapper table) shows here with its age,
//! so that the VMM can answer for the disk, and pause the guest once the call has
//! been outstanding longer than the disk's hang-timeout, while the call goes on.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{AttachError, Backend, Capabilities, SharedIo};
use crate::{lock, HostError, HostOp};

/// A host call in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outstanding {
    pub op: HostOp,
    pub since: Instant,
}

impl Outstanding {
    pub fn age(&self) -> Duration {
        self.since.elapsed()
    }
}

/// The calls in progress, each under the number it started with.
#[derive(Debug, Default)]
struct Calls {
    next: u64,
    now: Vec<(u64, Outstanding)>,
}

/// Reads what a [`Watched`] backend is doing; clones share it.
#[derive(Debug, Clone, Default)]
pub struct CallWatch {
    calls: Arc<Mutex<Calls>>,
}

impl CallWatch {
    /// The oldest call in progress, if any (a disk may have several in flight).
    pub fn outstanding(&self) -> Option<Outstanding> {
        lock(&self.calls)
            .now
            .iter()
            .map(|(_, c)| *c)
            .min_by_key(|c| c.since)
    }

    fn run<T>(&self, op: HostOp, call: impl FnOnce() -> T) -> T {
        let id = {
            let mut calls = lock(&self.calls);
            calls.next += 1;
            let id = calls.next;
            let since = Instant::now();
            calls.now.push((id, Outstanding { op, since }));
            id
        };
        let r = call();
        lock(&self.calls).now.retain(|(i, _)| *i != id);
        r
    }
}

/// A [`Watched`] backend's calls that run beside each other.
#[derive(Debug)]
struct WatchedIo {
    inner: Arc<dyn SharedIo>,
    watch: CallWatch,
}

impl SharedIo for WatchedIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        self.watch
            .run(HostOp::Read, || self.inner.read_at(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        self.watch
            .run(HostOp::Write, || self.inner.write_at(buf, offset))
    }

    fn write_borrowed_at(
        &self,
        src: &[crate::bytes::Borrowed],
        offset: u64,
    ) -> Result<(), HostError> {
        self.watch
            .run(HostOp::Write, || self.inner.write_borrowed_at(src, offset))
    }

    fn flush(&self) -> Result<(), HostError> {
        self.watch.run(HostOp::Flush, || self.inner.flush())
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        self.watch
            .run(HostOp::Write, || self.inner.start_writeback(offset, len))
    }
}

/// A backend whose calls a [`CallWatch`] can see.
#[derive(Debug)]
pub struct Watched<B> {
    inner: B,
    watch: CallWatch,
}

impl<B: Backend> Watched<B> {
    pub fn new(inner: B) -> Self {
        Watched {
            inner,
            watch: CallWatch::default(),
        }
    }

    pub fn watch(&self) -> CallWatch {
        self.watch.clone()
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }
}

impl<B: Backend> Backend for Watched<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        let inner = &mut self.inner;
        self.watch.run(HostOp::Read, || inner.read_at(buf, offset))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        let inner = &mut self.inner;
        self.watch
            .run(HostOp::Write, || inner.write_at(buf, offset))
    }

    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> Result<(), HostError> {
        let inner = &mut self.inner;
        self.watch
            .run(HostOp::Write, || inner.write_vectored_at(bufs, offset))
    }

    fn flush(&mut self) -> Result<(), HostError> {
        let inner = &mut self.inner;
        self.watch.run(HostOp::Flush, || inner.flush())
    }

    fn shared_io(&self) -> Option<Arc<dyn SharedIo>> {
        let inner = self.inner.shared_io()?;
        Some(Arc::new(WatchedIo {
            inner,
            watch: self.watch.clone(),
        }))
    }

    fn start_writeback(&mut self, offset: u64, len: u64) {
        let inner = &mut self.inner;
        self.watch
            .run(HostOp::Write, || inner.start_writeback(offset, len))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), HostError> {
        let inner = &mut self.inner;
        self.watch.run(HostOp::WriteZeroes, || {
            inner.write_zeroes(offset, len, unmap)
        })
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), HostError> {
        let inner = &mut self.inner;
        self.watch
            .run(HostOp::Discard, || inner.discard(offset, len))
    }

    fn detach(&mut self) -> Result<(), AttachError> {
        self.inner.detach()
    }

    fn attach(&mut self, path: Option<&Path>) -> Result<(), AttachError> {
        self.inner.attach(path)
    }

    fn is_detached(&self) -> bool {
        self.inner.is_detached()
    }

    fn image(&self) -> Option<&Path> {
        self.inner.image()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FaultInjector, FaultOp, FaultRule, MemBackend};

    #[test]
    fn a_hanging_call_shows_with_its_age_until_it_returns() {
        let injector = FaultInjector::new(MemBackend::new(1 << 16));
        let faults = injector.handle();
        let mut disk = Watched::new(injector);
        let watch = disk.watch();
        disk.write_at(&[1; 512], 0).expect("write");
        assert_eq!(watch.outstanding(), None, "cleared when it returned");
        faults.arm(FaultRule::hang(FaultOp::Flush).named("stall"));
        let flusher = std::thread::spawn(move || disk.flush());
        while faults.hanging() == 0 {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(30));
        let out = watch.outstanding().expect("a call is outstanding");
        assert_eq!(out.op, HostOp::Flush);
        assert!(out.age() >= Duration::from_millis(30), "{:?}", out.age());
        faults.clear_named("stall");
        flusher.join().expect("flusher").expect("flush");
        assert_eq!(watch.outstanding(), None);
    }

    #[test]
    fn a_failing_call_is_not_left_outstanding() {
        let injector = FaultInjector::new(MemBackend::new(4096));
        injector.handle().arm(FaultRule::new(
            FaultOp::Write,
            libc::EIO,
            crate::Trigger::Always,
        ));
        let mut disk = Watched::new(injector);
        assert!(disk.write_at(&[1], 0).is_err());
        assert_eq!(disk.watch().outstanding(), None);
    }
}
