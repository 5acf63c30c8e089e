//! Backends: where a disk's bytes live on the host.
//!
//! One trait for all of them, so the engine, the fault injector and the simulated
//! host page cache stack freely: `Disk<FaultInjector<HostCache<FaultInjector<MemBackend>>>>`
//! is an engine over a page cache whose "disk" can fail.

mod file;
mod mem;

pub use file::{AttachError, FileBackend, FileOptions, OpenError};
pub use mem::MemBackend;

use std::path::Path;
use std::sync::Arc;

use crate::bytes::{Borrowed, Bytes};
use crate::{HostError, HostOp};

/// Host reads and writes that may run beside other calls on the same image, with
/// no lock of the disk's held: how a disk serves more than one request at a time
/// ([`crate::Disk::begin`]). A handle keeps what it needs alive (an image's
/// descriptor) until it is dropped; the disk waits for every call in flight before
/// it detaches, flushes or replays.
pub trait SharedIo: Send + Sync + std::fmt::Debug {
    /// As [`Backend::read_at`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), HostError>;

    /// As [`Backend::write_at`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), HostError>;

    /// Writes the borrowed runs back to back from `offset`, reading them where they
    /// lie. The default copies them first; a backend that can hand them to the host
    /// as they are (an image file) overrides it.
    fn write_borrowed_at(&self, src: &[Borrowed], offset: u64) -> Result<(), HostError> {
        self.write_at(&Bytes::copy_of(src), offset)
    }

    /// As [`Backend::flush`]. The disk never runs two flushes at once (two
    /// `fdatasync`s at once could split one error between them).
    fn flush(&self) -> Result<(), HostError>;

    /// As [`Backend::start_writeback`].
    fn start_writeback(&self, _offset: u64, _len: u64) {}
}

/// What a backend can do beyond read, write and flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Discard (punch a hole) is supported; the frontend may offer it to the guest.
    pub discard: bool,
    /// Zeroing without writing zeroes is supported (the fallback always works).
    pub write_zeroes: bool,
}

/// Positional block storage. Implementations are used by one owner at a time (the
/// disk, behind its lock); reads and writes that run beside each other go through
/// the [`SharedIo`] handle an implementation may hand out. Out-of-band control
/// (arming faults, evicting a simulated cache) goes through handles too.
pub trait Backend: Send {
    /// Size in bytes; fixed for the backend's life.
    fn size(&self) -> u64;

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// The granularity at which this backend's calls meet, in bytes (a power of two):
    /// two calls whose ranges, widened to it, do not meet never disturb each other;
    /// two that do may, if one writes. 1 for storage that merges neighbouring writes
    /// itself (a buffered file: the host page cache); a direct file's `O_DIRECT`
    /// alignment, where a write of less is a read-modify-write of whole blocks. The
    /// disk widens ranges by it before it lets calls run beside each other
    /// ([`crate::Disk::begin`]).
    fn granularity(&self) -> u64 {
        1
    }

    /// Fills `buf` from `offset`; bytes past the end of the host image read as zero.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), HostError>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), HostError>;

    /// Writes the buffers back to back from `offset`. The default writes them one by
    /// one; backends with a real vectored call override it (replay uses it).
    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> Result<(), HostError> {
        let mut at = offset;
        for buf in bufs {
            self.write_at(buf, at)?;
            at += buf.len() as u64;
        }
        Ok(())
    }

    /// Makes every write handed over before this call stable (`fdatasync`).
    fn flush(&mut self) -> Result<(), HostError>;

    /// A handle for reads and writes that run beside each other, or `None` when
    /// this backend serves one call at a time (the default; a simulated page cache).
    fn shared_io(&self) -> Option<Arc<dyn SharedIo>> {
        None
    }

    /// A hint that `[offset, offset + len)` will be flushed soon: the host may start
    /// writing it back now. Replay uses it to overlap copying with write-back. Errors
    /// are left for the flush to report.
    fn start_writeback(&mut self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// Makes `[offset, offset + len)` read as zeroes. `unmap` allows deallocating.
    /// The default writes zero buffers.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), HostError> {
        let _ = unmap;
        write_zero_chunks(self, offset, len).map_err(|e| HostError {
            op: HostOp::WriteZeroes,
            ..e
        })
    }

    /// Tells the host the range is unused; its content becomes unspecified.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), HostError> {
        let _ = (offset, len);
        Err(HostError::new(HostOp::Discard, libc::EOPNOTSUPP))
    }

    /// Lets go of the host image: closes every descriptor on it, so that its file
    /// system can be unmounted and repaired. Until [`Backend::attach`] every call
    /// fails with `ENOMEDIUM`. Backends with no image refuse.
    fn detach(&mut self) -> Result<(), AttachError> {
        Err(AttachError::Unsupported)
    }

    /// Takes the image back, at `path` or (`None`) where it was, with the options it
    /// was first opened with. Refuses, changing nothing, an image of another size, a
    /// directory, a missing path, a read-only file for a writable disk.
    fn attach(&mut self, path: Option<&Path>) -> Result<(), AttachError> {
        let _ = path;
        Err(AttachError::Unsupported)
    }

    fn is_detached(&self) -> bool {
        false
    }

    /// Where the image lives on the host, for backends that have one.
    fn image(&self) -> Option<&Path> {
        None
    }
}

/// Writes `len` zero bytes from `offset` in bounded chunks.
pub(crate) fn write_zero_chunks<B: Backend + ?Sized>(
    backend: &mut B,
    offset: u64,
    len: u64,
) -> Result<(), HostError> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        backend.write_at(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn granularity(&self) -> u64 {
        (**self).granularity()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        (**self).write_at(buf, offset)
    }
    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> Result<(), HostError> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn flush(&mut self) -> Result<(), HostError> {
        (**self).flush()
    }
    fn shared_io(&self) -> Option<Arc<dyn SharedIo>> {
        (**self).shared_io()
    }
    fn start_writeback(&mut self, offset: u64, len: u64) {
        (**self).start_writeback(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), HostError> {
        (**self).write_zeroes(offset, len, unmap)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), HostError> {
        (**self).discard(offset, len)
    }
    fn detach(&mut self) -> Result<(), AttachError> {
        (**self).detach()
    }
    fn attach(&mut self, path: Option<&Path>) -> Result<(), AttachError> {
        (**self).attach(path)
    }
    fn is_detached(&self) -> bool {
        (**self).is_detached()
    }
    fn image(&self) -> Option<&Path> {
        (**self).image()
    }
}
