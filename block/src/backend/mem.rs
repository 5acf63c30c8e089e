//! An in-memory backend: the reference "disk" for tests and simulations.

use std::sync::{Arc, Mutex};

use super::{Backend, Capabilities, SharedIo};
use crate::{lock, HostError};

/// Bytes in memory. Clones share the same bytes, so a test can keep one clone to
/// look at what is "on disk" while the engine owns another.
#[derive(Debug, Clone)]
pub struct MemBackend {
    bytes: Arc<Mutex<Vec<u8>>>,
    size: u64,
}

impl MemBackend {
    pub fn new(size: u64) -> Self {
        MemBackend {
            bytes: Arc::new(Mutex::new(vec![0; size as usize])),
            size,
        }
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let size = bytes.len() as u64;
        MemBackend {
            bytes: Arc::new(Mutex::new(bytes)),
            size,
        }
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
        let r = self.range(offset, buf.len());
        let n = r.len();
        lock(&self.bytes)[r].copy_from_slice(&buf[..n]);
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

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        self.read(buf, offset);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        self.write(buf, offset);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), HostError> {
        Ok(())
    }

    fn shared_io(&self) -> Option<std::sync::Arc<dyn SharedIo>> {
        Some(std::sync::Arc::new(self.clone()))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> Result<(), HostError> {
        let r = self.range(offset, len as usize);
        lock(&self.bytes)[r].fill(0);
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), HostError> {
        self.write_zeroes(offset, len, true)
    }
}
