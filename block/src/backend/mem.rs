//! An in-memory backend: the reference "disk" for tests and simulations.
//!
//! By default a write changes exactly its bytes. Given a block size
//! ([`MemBackend::with_blocks`]) it behaves as an `O_DIRECT` image does: a write that
//! does not cover whole blocks reads its edge blocks, then writes whole blocks back,
//! and a test can stop it between the two ([`MemBackend::with_pause`]) to put another
//! call there, as a second thread would. It can let go of its "image" and take it
//! back ([`Backend::detach`], [`Backend::attach`] with no path) as a file does.

use std::sync::{Arc, Mutex};

use super::{AttachError, Backend, Capabilities, SharedIo};
use crate::{lock, HostError, HostOp};

/// Called between a read-modify-write's read and its write.
pub type Pause = Arc<dyn Fn() + Send + Sync>;

/// Bytes in memory. Clones share the same bytes, so a test can keep one clone to
/// look at what is "on disk" while the engine owns another.
#[derive(Clone)]
pub struct MemBackend {
    bytes: Arc<Mutex<Vec<u8>>>,
    size: u64,
    /// Writes are read-modify-writes of whole blocks of this many bytes.
    block: u64,
    pause: Option<Pause>,
    /// This handle let go of the bytes: its calls fail with `ENOMEDIUM`.
    detached: bool,
}

impl std::fmt::Debug for MemBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemBackend")
            .field("size", &self.size)
            .field("block", &self.block)
            .finish_non_exhaustive()
    }
}

impl MemBackend {
    pub fn new(size: u64) -> Self {
        Self::from_bytes(vec![0; size as usize])
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let size = bytes.len() as u64;
        MemBackend {
            bytes: Arc::new(Mutex::new(bytes)),
            size,
            block: 1,
            pause: None,
            detached: false,
        }
    }

    /// Writes become read-modify-writes of whole `block`-byte blocks (a power of
    /// two), and the backend's [granularity](Backend::granularity) is `block`.
    pub fn with_blocks(mut self, block: u64) -> Self {
        assert!(block.is_power_of_two(), "a block of {block} bytes");
        self.block = block;
        self
    }

    /// Calls `pause` between each read-modify-write's read and its write.
    pub fn with_pause(mut self, pause: Pause) -> Self {
        self.pause = Some(pause);
        self
    }

    /// A copy of the current bytes.
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.bytes).clone()
    }

    fn range(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let start = offset.min(self.size) as usize;
        let end = (offset.saturating_add(len as u64)).min(self.size) as usize;
        start..end
    }

    fn read(&self, buf: &mut [u8], offset: u64) {
        let r = self.range(offset, buf.len());
        let n = r.len();
        buf[..n].copy_from_slice(&lock(&self.bytes)[r]);
        buf[n..].fill(0);
    }

    fn write(&self, buf: &[u8], offset: u64) {
        let b = self.block;
        let end = offset.saturating_add(buf.len() as u64);
        if (offset % b == 0 && end % b == 0) || buf.is_empty() {
            let r = self.range(offset, buf.len());
            let n = r.len();
            lock(&self.bytes)[r].copy_from_slice(&buf[..n]);
            return;
        }
        // Whole blocks: read, change, write back, with no lock held in between (as
        // two host calls would be).
        let start = offset / b * b;
        let mut blocks = vec![0; (end.div_ceil(b) * b - start) as usize];
        self.read(&mut blocks, start);
        let at = (offset - start) as usize;
        blocks[at..at + buf.len()].copy_from_slice(buf);
        if let Some(pause) = &self.pause {
            pause();
        }
        let r = self.range(start, blocks.len());
        let n = r.len();
        lock(&self.bytes)[r].copy_from_slice(&blocks[..n]);
    }
}

impl SharedIo for MemBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        self.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        self.write(buf, offset);
        Ok(())
    }

    fn flush(&self) -> Result<(), HostError> {
        Ok(())
    }
}

impl MemBackend {
    /// Fails a call of this handle's while it is detached.
    fn attached(&self, op: HostOp) -> Result<(), HostError> {
        if self.detached {
            return Err(HostError::new(op, libc::ENOMEDIUM));
        }
        Ok(())
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            discard: true,
            write_zeroes: true,
        }
    }

    fn granularity(&self) -> u64 {
        self.block
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        self.attached(HostOp::Read)?;
        self.read(buf, offset);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        self.attached(HostOp::Write)?;
        self.write(buf, offset);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), HostError> {
        self.attached(HostOp::Flush)
    }

    fn shared_io(&self) -> Option<std::sync::Arc<dyn SharedIo>> {
        (!self.detached).then(|| std::sync::Arc::new(self.clone()) as std::sync::Arc<dyn SharedIo>)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> Result<(), HostError> {
        self.attached(HostOp::WriteZeroes)?;
        let r = self.range(offset, len as usize);
        lock(&self.bytes)[r].fill(0);
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), HostError> {
        self.attached(HostOp::Discard)?;
        self.write_zeroes(offset, len, true)
    }

    fn detach(&mut self) -> Result<(), AttachError> {
        self.detached = true;
        Ok(())
    }

    /// Takes the bytes back; there is no other place to take them from.
    fn attach(&mut self, path: Option<&std::path::Path>) -> Result<(), AttachError> {
        if path.is_some() {
            return Err(AttachError::Unsupported);
        }
        self.detached = false;
        Ok(())
    }

    fn is_detached(&self) -> bool {
        self.detached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two writes to neighbouring sectors of one block, the second run between the
    /// first's read and write (as on two threads): the first writes back the
    /// second's old bytes. What the engine must never let happen.
    #[test]
    fn a_read_modify_write_undoes_a_neighbour_run_inside_it() {
        let disk = MemBackend::new(8192).with_blocks(4096);
        let other = disk.clone();
        let ran = Arc::new(Mutex::new(false));
        let once = Arc::clone(&ran);
        let paused = disk.clone().with_pause(Arc::new(move || {
            if !std::mem::replace(&mut *lock(&once), true) {
                other.write(&[2; 512], 512);
            }
        }));
        paused.write(&[1; 512], 0);
        let bytes = disk.contents();
        assert!(bytes[..512].iter().all(|&b| b == 1));
        assert!(
            bytes[512..1024].iter().all(|&b| b == 0),
            "the neighbour's write was lost"
        );
        assert!(*lock(&ran));
        // Whole blocks are written as they are.
        paused.write(&[3; 4096], 4096);
        assert!(disk.contents()[4096..].iter().all(|&b| b == 3));
    }
}
