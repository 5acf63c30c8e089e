//! The bytes of a guest write, copied once out of guest memory and then shared: the
//! host write, the unflushed buffer and a replay all use the same allocation.
//!
//! One allocation per write, aligned to [`ALIGN`] when it is at least [`POOL_CLASS`]
//! long, so that an `O_DIRECT` host write can take it as it is (no bounce copy).
//! Shorter ones are not aligned: glibc's aligned allocation of 4 KiB takes 8 KiB
//! (measured: 2.00x the memory for 4 KiB, 1.06x for 64 KiB), and bouncing a short
//! write costs little. Cloning and slicing
//! share the allocation (no copy); the buffer counts what each allocation it keeps a
//! part of costs (`UnflushedBuffer`'s bound), so a small part that keeps a large
//! allocation alive is paid for in full.
//!
//! Large allocations are reused: when the last part of one is dropped (a flush
//! released it), it goes to a process-wide pool, up to [`keep_freed`] bytes, and the
//! next write of its size class takes it back. Fresh memory costs a page fault and a
//! page of zeroes per 4 KiB (measured in the Debian test host: about 80 faults per
//! MiB of a guest's sequential write without the pool); pooled memory is told
//! `MADV_FREE`, so under memory pressure the kernel may take its pages back.

use std::alloc::{self, Layout};
use std::collections::HashMap;
use std::fmt;
use std::mem::MaybeUninit;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Alignment of an allocation of at least [`POOL_CLASS`] bytes: `O_DIRECT`'s (the
/// largest logical block size holdfast writes with).
pub const ALIGN: usize = 4096;

/// Allocations of at least this many bytes are pooled, in size classes of this many
/// bytes (a guest's 1016 KiB request takes a 1 MiB allocation).
pub const POOL_CLASS: usize = 64 * 1024;

/// The default of [`keep_freed`]: one disk's default bound.
pub const DEFAULT_KEEP_FREED: usize = 128 << 20;

/// Freed large allocations by size, for reuse.
struct Pool {
    free: HashMap<usize, Vec<NonNull<u8>>>,
    bytes: usize,
    limit: usize,
}

// SAFETY: the pool owns the allocations it lists; nothing else refers to them.
unsafe impl Send for Pool {}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn with_pool<T>(f: impl FnOnce(&mut Pool) -> T) -> T {
    let mut guard = crate::lock(&POOL);
    let pool = guard.get_or_insert_with(|| Pool {
        free: HashMap::new(),
        bytes: 0,
        limit: DEFAULT_KEEP_FREED,
    });
    f(pool)
}

/// Keeps up to `limit` bytes of freed write memory for reuse (process-wide; the VMM
/// sets the sum of its disks' bounds). Lowering it frees what is over.
pub fn keep_freed(limit: usize) {
    with_pool(|p| {
        p.limit = limit;
        while p.bytes > p.limit {
            let Some((&size, list)) = p.free.iter_mut().find(|(_, l)| !l.is_empty()) else {
                break;
            };
            let ptr = list.pop().expect("not empty");
            p.bytes -= size;
            // SAFETY: pooled allocations were made by `allocate` with this layout.
            unsafe { alloc::dealloc(ptr.as_ptr(), layout(size)) }
        }
    })
}

/// Bytes of freed write memory the pool holds now (for tests and diagnostics).
pub fn kept_freed() -> usize {
    with_pool(|p| p.bytes)
}

/// The memory a write of `len` bytes takes in the unflushed buffer (its allocation,
/// [`Bytes::allocation_len`]), for counting writes not copied yet.
pub fn weight_of(len: u64) -> u64 {
    usize::try_from(len).map_or(u64::MAX, |n| allocation_size(n) as u64)
}

/// The size an allocation for `len` bytes gets: its pool class when pooled.
fn allocation_size(len: usize) -> usize {
    if len >= POOL_CLASS {
        len.div_ceil(POOL_CLASS) * POOL_CLASS
    } else {
        len
    }
}

/// A pooled allocation's layout: `size` (a multiple of [`POOL_CLASS`]), aligned.
fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, ALIGN).expect("a request's size fits a Layout")
}

/// An allocation of `size` bytes (a pool class, from [`allocation_size`]), from the
/// pool if it has one.
fn allocate(size: usize) -> NonNull<u8> {
    debug_assert!(size >= POOL_CLASS && size % POOL_CLASS == 0, "{size}");
    let reused = with_pool(|p| {
        let ptr = p.free.get_mut(&size)?.pop()?;
        p.bytes -= size;
        Some(ptr)
    });
    if let Some(ptr) = reused {
        return ptr;
    }
    let layout = layout(size);
    // SAFETY: the layout's size is not zero.
    let raw = unsafe { alloc::alloc(layout) };
    NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout))
}

/// Gives an allocation back: to the pool if it has room, else to the allocator.
fn release(ptr: NonNull<u8>, size: usize) {
    let pooled = with_pool(|p| {
        if p.bytes + size > p.limit {
            return false;
        }
        // SAFETY: `ptr` is ours, page-aligned, `size` a multiple of the page size;
        // MADV_FREE only lets the kernel drop its pages.
        unsafe { libc::madvise(ptr.as_ptr().cast(), size, libc::MADV_FREE) };
        p.free.entry(size).or_default().push(ptr);
        p.bytes += size;
        true
    });
    if !pooled {
        // SAFETY: made by `allocate` with this layout, given back once.
        unsafe { alloc::dealloc(ptr.as_ptr(), layout(size)) }
    }
}

/// One immutable, pooled heap allocation of `size` bytes (a long write's).
struct Allocation {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: the allocation is written only while being filled, before it is shared;
// after that it is read-only memory owned by this value.
unsafe impl Send for Allocation {}
// SAFETY: as above, shared references only ever read.
unsafe impl Sync for Allocation {}

impl Drop for Allocation {
    fn drop(&mut self) {
        release(self.ptr, self.size);
    }
}

/// Where a [`Bytes`]' allocation lives: a short one in one heap block with its
/// reference count (`Arc<[u8]>`: one allocation per write, as a `Vec` was), a long
/// one aligned and pooled.
#[derive(Clone)]
enum Storage {
    Short(Arc<[u8]>),
    Long(Arc<Allocation>),
}

/// A shared, immutable run of bytes: `len` bytes at `start` of an allocation.
#[derive(Clone)]
pub struct Bytes {
    storage: Storage,
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
        let size = allocation_size(len);
        let storage = if size < POOL_CLASS {
            let mut short = Arc::<[u8]>::new_uninit_slice(len);
            fill(Arc::get_mut(&mut short).expect("not shared yet"))?;
            // SAFETY: `fill` returned Ok, so it initialized all `len` bytes.
            Storage::Short(unsafe { short.assume_init() })
        } else {
            let ptr = allocate(size);
            let allocation = Allocation { ptr, size };
            // SAFETY: `ptr` is valid for `size >= len` bytes, and nothing else refers
            // to it (fresh, or taken out of the pool).
            let uninit = unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr().cast::<MaybeUninit<u8>>(), len)
            };
            fill(uninit)?;
            Storage::Long(Arc::new(allocation))
        };
        Ok(Bytes {
            storage,
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

    /// A copy of the borrowed runs, back to back, in an allocation of its own.
    pub fn copy_of(src: &[Borrowed]) -> Bytes {
        let len = src.iter().map(|b| b.len).sum();
        // SAFETY: the runs' lengths add up to `len`, and each is copied in full
        // right after the one before.
        unsafe {
            Bytes::fill(len, |dst| {
                let mut at = 0;
                for b in src {
                    // SAFETY: `b` is readable for `b.len` bytes (`Borrowed::new`);
                    // `dst[at..]` has room for them and is our own allocation.
                    std::ptr::copy_nonoverlapping(b.ptr, dst[at..].as_mut_ptr().cast(), b.len);
                    at += b.len;
                }
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
            storage: self.storage.clone(),
            start: self.start + from,
            len: to - from,
        }
    }

    /// Bytes the whole allocation takes (what keeping any part of it costs).
    pub fn allocation_len(&self) -> usize {
        match &self.storage {
            Storage::Short(a) => a.len(),
            Storage::Long(a) => a.size,
        }
    }

    /// Names the allocation: equal for bytes that share one.
    pub fn allocation_id(&self) -> usize {
        match &self.storage {
            Storage::Short(a) => Arc::as_ptr(a).cast::<u8>() as usize,
            Storage::Long(a) => Arc::as_ptr(a) as usize,
        }
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.storage {
            Storage::Short(a) => &a[self.start..self.start + self.len],
            // SAFETY: `[start, start + len)` lies in the allocation (checked when
            // sliced), which `fill` initialized and nothing writes any more.
            Storage::Long(a) => unsafe {
                std::slice::from_raw_parts(a.ptr.as_ptr().add(self.start), self.len)
            },
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

/// A run of bytes the host reads where it lies (a guest write in guest memory) rather
/// than from a copy of its own: a host write from it can run while the copy that
/// the unflushed buffer keeps is made ([`crate::Call::run_borrowed`]).
#[derive(Debug, Clone, Copy)]
pub struct Borrowed {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a `Borrowed` is an address and a length; `Borrowed::new`'s caller vouches
// that the bytes stay readable from any thread for as long as it is used.
unsafe impl Send for Borrowed {}
// SAFETY: as for Send; nothing writes through it.
unsafe impl Sync for Borrowed {}

impl Borrowed {
    /// # Safety
    /// `len` bytes at `ptr` must stay mapped and readable for as long as this value
    /// or a copy of it is used. Others may change them meanwhile (a guest that
    /// rewrites a buffer it handed to its device): readers then see some mix of
    /// their versions, as a device that reads guest memory does. No reference to
    /// them is ever made.
    pub unsafe fn new(ptr: *const u8, len: usize) -> Borrowed {
        Borrowed { ptr, len }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_write_is_aligned_for_o_direct() {
        for len in [POOL_CLASS, 3 * POOL_CLASS - 512, 1 << 20] {
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
    fn freed_large_allocations_are_reused_up_to_the_limit() {
        // A size class no other test uses (the pool is the process's).
        let len = (3 << 20) + 5;
        let class = allocation_size(len);
        assert_eq!(class, (3 << 20) + POOL_CLASS);
        let first = Bytes::copy_from_slice(&vec![1u8; len]);
        assert_eq!(first.allocation_len(), class);
        let at = first.as_ptr();
        let part = first.slice(10, 20);
        drop(first);
        let again = Bytes::copy_from_slice(&vec![2u8; len]);
        assert_ne!(
            again.as_ptr(),
            at,
            "a part still keeps the first allocation"
        );
        drop(part);
        let before = kept_freed();
        assert!(before >= class, "the pool took the freed allocation");
        let third = Bytes::copy_from_slice(&vec![3u8; len]);
        assert_eq!(third.as_ptr(), at, "the next write of its class reuses it");
        assert!(third.iter().all(|&x| x == 3));
        assert!(again.iter().all(|&x| x == 2));
        // Short writes are never pooled; a pool at its limit frees instead.
        drop(third);
        keep_freed(0);
        assert_eq!(kept_freed(), 0);
        drop(again);
        assert_eq!(kept_freed(), 0, "over the limit: freed, not kept");
        keep_freed(DEFAULT_KEEP_FREED);
    }

    #[test]
    #[should_panic(expected = "slice")]
    fn a_slice_past_the_end_panics() {
        Bytes::from(vec![1, 2, 3]).slice(2, 4);
    }
}
