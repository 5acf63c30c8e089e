//! The bytes of a guest write, copied once out of guest memory and then shared: the
//! host write, the unflushed buffer and a replay all use the same allocation.
//!
//! One allocation per write, aligned to [`ALIGN`] when it is that long, so that an
//! `O_DIRECT` host write can take it as it is (no bounce copy). Cloning and slicing
//! share the allocation (no copy); the buffer counts what each allocation it keeps a
//! part of costs (`UnflushedBuffer`'s bound), so a small part that keeps a large
//! allocation alive is paid for in full.

use std::alloc::{self, Layout};
use std::fmt;
use std::mem::MaybeUninit;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of an allocation of at least this many bytes: `O_DIRECT`'s (the
/// largest logical block size holdfast writes with).
pub const ALIGN: usize = 4096;

/// One immutable heap allocation.
struct Allocation {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is written only while being filled, before it is shared;
// after that it is read-only memory owned by this value.
unsafe impl Send for Allocation {}
// SAFETY: as above, shared references only ever read.
unsafe impl Sync for Allocation {}

impl Drop for Allocation {
    fn drop(&mut self) {
        if self.layout.size() > 0 {
            // SAFETY: allocated in `Bytes::fill` with this layout, freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

/// A shared, immutable run of bytes: `len` bytes at `start` of an allocation.
#[derive(Clone)]
pub struct Bytes {
    allocation: Arc<Allocation>,
    start: usize,
    len: usize,
}

impl Bytes {
    /// A new allocation of `len` bytes that `fill` writes. `fill` gets the bytes
    /// uninitialized (nothing is zeroed first: a guest write is copied exactly once).
    ///
    /// # Safety
    /// When `fill` returns `Ok`, it must have initialized every one of the `len`
    /// bytes. On `Err` the allocation is freed unread.
    pub unsafe fn fill<E>(
        len: usize,
        fill: impl FnOnce(&mut [MaybeUninit<u8>]) -> Result<(), E>,
    ) -> Result<Bytes, E> {
        let align = if len >= ALIGN { ALIGN } else { 1 };
        let layout = Layout::from_size_align(len, align).expect("a request's size fits a Layout");
        let ptr = if len == 0 {
            NonNull::<u8>::dangling()
        } else {
            // SAFETY: the layout's size is not zero.
            let raw = unsafe { alloc::alloc(layout) };
            NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout))
        };
        let allocation = Allocation { ptr, layout };
        // SAFETY: `ptr` is valid for `len` bytes (or dangling with `len` 0), and
        // nothing else refers to it yet.
        let uninit =
            unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr().cast::<MaybeUninit<u8>>(), len) };
        fill(uninit)?;
        Ok(Bytes {
            allocation: Arc::new(allocation),
            start: 0,
            len,
        })
    }

    /// A copy of `data` in an allocation of its own.
    pub fn copy_from_slice(data: &[u8]) -> Bytes {
        // SAFETY: `fill` writes every byte (the two slices have one length).
        unsafe {
            Bytes::fill(data.len(), |dst| {
                // SAFETY: `dst` is a fresh allocation of `data.len()` bytes.
                std::ptr::copy_nonoverlapping(data.as_ptr(), dst.as_mut_ptr().cast(), data.len());
                Ok::<(), std::convert::Infallible>(())
            })
        }
        .unwrap_or_else(|never| match never {})
    }

    /// `[from, to)` of these bytes, sharing the allocation.
    pub fn slice(&self, from: usize, to: usize) -> Bytes {
        assert!(
            from <= to && to <= self.len,
            "slice {from}..{to} of {}",
            self.len
        );
        Bytes {
            allocation: Arc::clone(&self.allocation),
            start: self.start + from,
            len: to - from,
        }
    }

    /// Bytes the whole allocation takes (what keeping any part of it costs).
    pub fn allocation_len(&self) -> usize {
        self.allocation.layout.size()
    }

    /// Names the allocation: equal for bytes that share one.
    pub fn allocation_id(&self) -> usize {
        Arc::as_ptr(&self.allocation) as usize
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `[start, start + len)` lies in the allocation (checked when sliced),
        // which `fill` initialized and nothing writes any more.
        unsafe {
            std::slice::from_raw_parts(self.allocation.ptr.as_ptr().add(self.start), self.len)
        }
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Bytes {
        Bytes::copy_from_slice(&v)
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Bytes {
        Bytes::copy_from_slice(v)
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Bytes) -> bool {
        **self == **other
    }
}

impl Eq for Bytes {}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = &self[..self.len.min(16)];
        write!(f, "Bytes({} bytes, {:02x?}", self.len, head)?;
        if self.len > 16 {
            write!(f, "..")?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_write_is_aligned_for_o_direct() {
        for len in [ALIGN, 3 * ALIGN, 1 << 20] {
            let b = Bytes::copy_from_slice(&vec![7u8; len]);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0, "{len}");
            assert!(b.iter().all(|&x| x == 7));
        }
    }

    #[test]
    fn slices_share_the_allocation_and_keep_it_alive() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let whole = Bytes::from(data.clone());
        let part = whole.slice(100, 5000);
        let inner = part.slice(10, 20);
        drop(whole);
        assert_eq!(&part[..], &data[100..5000]);
        assert_eq!(&inner[..], &data[110..120]);
        assert_eq!(part.allocation_id(), inner.allocation_id());
        assert_eq!(inner.allocation_len(), 10_000);
        assert_ne!(Bytes::from(&data[..]).allocation_id(), part.allocation_id());
    }

    #[test]
    fn a_failed_fill_frees_and_reports() {
        // SAFETY: the fill fails, so nothing is read.
        let r = unsafe { Bytes::fill(8192, |_| Err("no")) };
        assert_eq!(r.expect_err("the fill failed"), "no");
        assert!(Bytes::from(Vec::new()).is_empty());
    }

    #[test]
    #[should_panic(expected = "slice")]
    fn a_slice_past_the_end_panics() {
        Bytes::from(vec![1, 2, 3]).slice(2, 4);
    }
}
