//! A simulated host page cache over a "disk", with the post-failure behaviour of real
//! file systems (what CuttleFS does in Rebello et al., USENIX ATC 2020).
//!
//! Writes land in 4 KiB cache pages and are marked dirty; [`Backend::flush`] is
//! `fsync`: it writes dirty pages back to the disk below (any [`Backend`], typically a
//! [`crate::FaultInjector`] over a [`crate::MemBackend`], so write-back can fail) and
//! flushes it. When write-back of a page fails, the page is treated as the model says:
//!
//! | model          | failed page                      | error reported by        |
//! |----------------|----------------------------------|--------------------------|
//! | `ext4-ordered` | marked clean, new content kept   | this fsync               |
//! | `xfs`          | marked clean, new content kept   | this fsync               |
//! | `ext4-data`    | marked clean, new content kept   | the *next* fsync         |
//! | `btrfs`        | reverted to the disk's content   | this fsync               |
//! | `freebsd`      | stays dirty (a retry writes it)  | this fsync               |
//!
//! A clean page keeps serving reads until [`HostCache::evict`] drops it (memory
//! pressure, `echo 3 > drop_caches`); after that the disk's content shows. Only pages
//! whose content differs from the disk's are kept (dirty ones, and clean ones whose
//! write-back failed): the others would read the same from the disk. Write-back
//! outside an fsync ([`HostCache::background_writeback`]) records its error for the
//! next fsync, as Linux's errseq does.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::backend::Backend;
use crate::{lock, FaultHandle, FaultInjector, HostError, HostOp, MemBackend};

pub const PAGE: u64 = 4096;

/// Which file system's failure behaviour to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostModel {
    Ext4Ordered,
    Xfs,
    Ext4Data,
    Btrfs,
    FreeBsd,
}

impl HostModel {
    pub const ALL: [HostModel; 5] = [
        HostModel::Ext4Ordered,
        HostModel::Xfs,
        HostModel::Ext4Data,
        HostModel::Btrfs,
        HostModel::FreeBsd,
    ];

    /// Every model's name, `, `-separated (for help texts and errors).
    pub fn names() -> String {
        HostModel::ALL.map(HostModel::as_str).join(", ")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HostModel::Ext4Ordered => "ext4-ordered",
            HostModel::Xfs => "xfs",
            HostModel::Ext4Data => "ext4-data",
            HostModel::Btrfs => "btrfs",
            HostModel::FreeBsd => "freebsd",
        }
    }

    /// Whether a flush's success can be a lie that the next flush reveals.
    pub fn reports_late(self) -> bool {
        self == HostModel::Ext4Data
    }
}

impl fmt::Display for HostModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HostModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        HostModel::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown host model `{s}` (expected {})", HostModel::names()))
    }
}

#[derive(Debug)]
struct Page {
    data: Box<[u8]>,
    dirty: bool,
}

#[derive(Debug)]
struct CacheState<D> {
    model: HostModel,
    disk: D,
    pages: BTreeMap<u64, Page>,
    /// ext4-data: the error of the last fsync's write-back, for the next fsync.
    late_error: Option<HostError>,
    /// An error from write-back outside fsync, for the next fsync.
    errseq: Option<HostError>,
}

impl<D: Backend> CacheState<D> {
    /// The cached page `index`, read from the disk if absent (unless `whole`: the
    /// caller overwrites all of it).
    fn page(&mut self, index: u64, whole: bool) -> Result<&mut Page, HostError> {
        if !self.pages.contains_key(&index) {
            let mut data = vec![0u8; PAGE as usize].into_boxed_slice();
            if !whole {
                self.disk.read_at(&mut data, index * PAGE)?;
            }
            self.pages.insert(index, Page { data, dirty: false });
        }
        Ok(self.pages.get_mut(&index).expect("inserted above"))
    }

    /// Writes every dirty page to the disk and flushes it. Failed pages are handled
    /// as the model says; returns the first error.
    fn writeback(&mut self) -> Result<(), HostError> {
        let dirty: Vec<u64> = self
            .pages
            .iter()
            .filter(|(_, p)| p.dirty)
            .map(|(&i, _)| i)
            .collect();
        let mut first_error = None;
        for index in dirty {
            let page = self.pages.get_mut(&index).expect("listed above");
            match self.disk.write_at(&page.data, index * PAGE) {
                // The disk holds what the page holds: reads may as well go there, and
                // the cache keeps only what differs (dirty pages, failed clean ones),
                // so that it stays small over a large image.
                Ok(()) => {
                    self.pages.remove(&index);
                }
                Err(e) => {
                    first_error.get_or_insert(HostError::new(HostOp::Flush, e.errno));
                    match self.model {
                        HostModel::Ext4Ordered | HostModel::Xfs | HostModel::Ext4Data => {
                            page.dirty = false
                        }
                        // Dropping the page reverts it: the next read fetches the disk's bytes.
                        HostModel::Btrfs => {
                            self.pages.remove(&index);
                        }
                        HostModel::FreeBsd => {}
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        self.disk
            .flush()
            .map_err(|e| HostError::new(HostOp::Flush, e.errno))
    }
}

/// The pages `[offset, end)` spans: (page index, offset within the page, offset
/// within the caller's buffer, length).
fn pages(offset: u64, end: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let n = (PAGE - at % PAGE).min(end - at);
        let item = (
            at / PAGE,
            (at % PAGE) as usize,
            (at - offset) as usize,
            n as usize,
        );
        at += n;
        Some(item)
    })
}

/// The simulated cache. Clones share state: keep one to evict or inspect while an
/// engine owns another.
#[derive(Debug)]
pub struct HostCache<D> {
    state: Arc<Mutex<CacheState<D>>>,
    size: u64,
}

impl<D> Clone for HostCache<D> {
    fn clone(&self) -> Self {
        HostCache {
            state: Arc::clone(&self.state),
            size: self.size,
        }
    }
}

impl<D: Backend> HostCache<D> {
    pub fn new(model: HostModel, disk: D) -> Self {
        let size = disk.size();
        let state = CacheState {
            model,
            disk,
            pages: BTreeMap::new(),
            late_error: None,
            errseq: None,
        };
        HostCache {
            state: Arc::new(Mutex::new(state)),
            size,
        }
    }

    pub fn model(&self) -> HostModel {
        lock(&self.state).model
    }

    /// Drops every clean page, as memory pressure or `drop_caches` would.
    pub fn evict(&self) {
        lock(&self.state).pages.retain(|_, p| p.dirty);
    }

    pub fn dirty_pages(&self) -> usize {
        lock(&self.state).pages.values().filter(|p| p.dirty).count()
    }

    /// Pages held in memory (dirty, or clean with content the disk lacks).
    pub fn cached_pages(&self) -> usize {
        lock(&self.state).pages.len()
    }

    /// The kernel's flusher thread: write-back with nobody waiting. An error is kept
    /// for the next fsync (FreeBSD keeps the pages dirty instead and reports nothing).
    pub fn background_writeback(&self) {
        let mut s = lock(&self.state);
        if let Err(e) = s.writeback() {
            if s.model != HostModel::FreeBsd {
                s.errseq = Some(e);
            }
        }
    }

    /// Runs `f` on the disk below the cache (to read what is truly stable).
    pub fn with_disk<T>(&self, f: impl FnOnce(&mut D) -> T) -> T {
        f(&mut lock(&self.state).disk)
    }
}

impl<D: Backend> Backend for HostCache<D> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        let mut s = lock(&self.state);
        let end = (offset + buf.len() as u64).min(self.size);
        for (index, within, at, n) in pages(offset, end) {
            let part = &mut buf[at..at + n];
            match s.pages.get(&index) {
                Some(page) => part.copy_from_slice(&page.data[within..within + n]),
                // Not cached: the disk's bytes are the page's.
                None => s
                    .disk
                    .read_at(part, index * PAGE + within as u64)
                    .map_err(|e| HostError::new(HostOp::Read, e.errno))?,
            }
        }
        buf[(end.max(offset) - offset) as usize..].fill(0);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        let mut s = lock(&self.state);
        let end = (offset + buf.len() as u64).min(self.size);
        for (index, within, at, n) in pages(offset, end) {
            let whole = n as u64 == PAGE;
            let page = s
                .page(index, whole)
                .map_err(|e| HostError::new(HostOp::Write, e.errno))?;
            page.data[within..within + n].copy_from_slice(&buf[at..at + n]);
            page.dirty = true;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), HostError> {
        let mut s = lock(&self.state);
        let pending = s.errseq.take();
        let result = s.writeback();
        if s.model.reports_late() {
            let late = s.late_error.take();
            s.late_error = result.err();
            return match pending.or(late) {
                Some(e) => Err(e),
                None => Ok(()),
            };
        }
        match pending {
            Some(e) => Err(e),
            None => result,
        }
    }
}

/// A complete simulated host for tests and outage studies: an in-memory "disk"
/// (`stable`), a fault point on the cache's write-back to it (`writeback`), the page
/// cache (`cache`), and a fault point on the calls the engine makes (`calls`:
/// `pwrite`, `fsync`, `pread`). `host` is what an engine runs on.
#[derive(Debug)]
pub struct SimulatedHost {
    pub host: FaultInjector<HostCache<FaultInjector<MemBackend>>>,
    pub calls: FaultHandle,
    pub writeback: FaultHandle,
    pub cache: HostCache<FaultInjector<MemBackend>>,
    pub stable: MemBackend,
}

impl SimulatedHost {
    pub fn new(model: HostModel, size: u64) -> Self {
        let stable = MemBackend::new(size);
        let below = FaultInjector::new(stable.clone());
        let writeback = below.handle();
        let cache = HostCache::new(model, below);
        let host = FaultInjector::new(cache.clone());
        let calls = host.handle();
        SimulatedHost {
            host,
            calls,
            writeback,
            cache,
            stable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FaultOp, FaultRule, Trigger};

    fn cache(
        model: HostModel,
    ) -> (
        HostCache<FaultInjector<MemBackend>>,
        MemBackend,
        FaultHandle,
    ) {
        let disk = MemBackend::new(4 * PAGE);
        let injector = FaultInjector::new(disk.clone());
        let faults = injector.handle();
        (HostCache::new(model, injector), disk, faults)
    }

    fn outage(faults: &FaultHandle) -> u64 {
        faults.arm(FaultRule::new(FaultOp::Write, libc::EIO, Trigger::Always))
    }

    #[test]
    fn a_hung_device_holds_fsync_and_uncached_reads_not_cached_writes() {
        let (mut c, disk, faults) = cache(HostModel::Xfs);
        faults.arm(FaultRule::hang(FaultOp::Any).named("hang"));
        // Whole pages go into the cache without the device.
        c.write_at(&[5; PAGE as usize], 0).expect("cached write");
        let mut reader = c.clone();
        let flusher = std::thread::spawn(move || c.flush());
        let uncached = std::thread::spawn(move || {
            let mut b = [0; 1];
            reader.read_at(&mut b, 2 * PAGE).map(|()| b[0])
        });
        while faults.hanging() == 0 {
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!flusher.is_finished() && !uncached.is_finished());
        assert_eq!(disk.contents()[0], 0, "nothing reached the device");
        faults.clear_named("hang");
        flusher
            .join()
            .expect("flusher")
            .expect("fsync after the hang");
        assert_eq!(uncached.join().expect("reader").expect("read"), 0);
        assert_eq!(disk.contents()[0], 5, "written back after the hang");
    }

    fn read(c: &mut HostCache<FaultInjector<MemBackend>>, offset: u64) -> u8 {
        let mut b = [0];
        c.read_at(&mut b, offset).expect("read");
        b[0]
    }

    #[test]
    fn fsync_makes_writes_stable() {
        for model in HostModel::ALL {
            let (mut c, disk, _) = cache(model);
            c.write_at(&[5; 10], 100).expect("write");
            assert_eq!(disk.contents()[100], 0, "{model}: not before fsync");
            c.flush().expect("fsync");
            assert_eq!(disk.contents()[100], 5, "{model}");
            assert_eq!(c.dirty_pages(), 0);
        }
    }

    /// The table in the module docs, checked row by row: what a retried fsync says,
    /// what reads show before and after eviction, and what reaches the disk.
    #[test]
    fn failure_behaviour_per_model() {
        for model in HostModel::ALL {
            let (mut c, disk, faults) = cache(model);
            c.write_at(&[1; 4096], 0).expect("write");
            c.flush().expect("first fsync");
            c.write_at(&[2; 4096], 0).expect("write");
            let id = outage(&faults);
            let first = c.flush();
            faults.clear(id);
            let second = c.flush();
            let cached = read(&mut c, 0);
            c.evict();
            let after_evict = read(&mut c, 0);
            let stable = disk.contents()[0];
            let got = (first.is_err(), second.is_err(), cached, after_evict, stable);
            let want = match model {
                HostModel::Ext4Ordered | HostModel::Xfs => (true, false, 2, 1, 1),
                HostModel::Ext4Data => (false, true, 2, 1, 1),
                HostModel::Btrfs => (true, false, 1, 1, 1),
                HostModel::FreeBsd => (true, false, 2, 2, 2),
            };
            assert_eq!(
                got, want,
                "{model}: (1st err, 2nd err, cached, after evict, stable)"
            );
        }
    }

    #[test]
    fn the_cache_holds_only_what_differs_from_the_disk() {
        let (mut c, _, faults) = cache(HostModel::Xfs);
        let mut b = [0u8; 4096];
        c.read_at(&mut b, 0).expect("read");
        assert_eq!(c.cached_pages(), 0, "reads do not fill the cache");
        c.write_at(&[1; 8192], 0).expect("write");
        assert_eq!(c.cached_pages(), 2);
        c.flush().expect("fsync");
        assert_eq!(c.cached_pages(), 0, "written back: the disk has it");
        c.write_at(&[2; 4096], 0).expect("write");
        let id = outage(&faults);
        c.flush().expect_err("fsync fails");
        faults.clear(id);
        assert_eq!(
            (c.cached_pages(), c.dirty_pages()),
            (1, 0),
            "failed page: clean, kept"
        );
        assert_eq!(read(&mut c, 0), 2);
        c.evict();
        assert_eq!((c.cached_pages(), read(&mut c, 0)), (0, 1));
    }

    #[test]
    fn background_writeback_error_goes_to_next_fsync() {
        let (mut c, disk, faults) = cache(HostModel::Xfs);
        c.write_at(&[3; 10], 0).expect("write");
        let id = outage(&faults);
        c.background_writeback();
        faults.clear(id);
        assert_eq!(c.flush().expect_err("errseq").op, HostOp::Flush);
        c.flush().expect("reported once");
        assert_eq!(disk.contents()[0], 0, "the data is gone");
    }

    #[test]
    fn partial_page_write_reads_the_rest_from_disk() {
        let disk = MemBackend::from_bytes(vec![9; 2 * PAGE as usize]);
        let mut c = HostCache::new(HostModel::Xfs, disk.clone());
        c.write_at(&[1; 10], 4000).expect("write across pages");
        c.flush().expect("fsync");
        let bytes = disk.contents();
        assert_eq!(bytes[3999], 9);
        assert_eq!(&bytes[4000..4010], &[1; 10]);
        assert_eq!(bytes[4010], 9);
    }

    #[test]
    fn model_names_parse() {
        for m in HostModel::ALL {
            assert_eq!(m.as_str().parse::<HostModel>(), Ok(m));
        }
        assert!("zfs"
            .parse::<HostModel>()
            .expect_err("unknown")
            .contains("zfs"));
    }
}
