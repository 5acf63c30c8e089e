//! Other devices' error handling, on holdfast's own [`crate::Disk`], so that the lab
//! and the outage matrix compare strategies on one implementation of everything else
//! (the virtio frontend, parking, the run-state owner):
//! [`crate::DiskConfig::imitate`].

/// How a disk with `imitate` set departs from holdfast's engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Imitate {
    /// QEMU's `werror=stop`: no buffer of its own; writes go to the host as they
    /// come, a failed request is parked as it is, and `cont` re-issues only the
    /// parked requests (no rewrite, no flush first).
    RetryFlush,
    /// As `RetryFlush`, and after a failed flush every later flush fails (QEMU's
    /// default file backend, `page_cache_inconsistent`), so the VM cannot resume.
    Sticky,
    /// Deliberately broken: holdfast's engine, but a FLUSH completes at once without
    /// a host flush. It claims holdfast's promise; tests use it to show that whoever
    /// judges the results notices a loss.
    LyingFlush,
}

impl Imitate {
    /// Whether writes bypass the unflushed buffer (QEMU keeps none).
    pub fn bufferless(self) -> bool {
        matches!(self, Imitate::RetryFlush | Imitate::Sticky)
    }
}
