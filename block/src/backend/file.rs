//! A raw image file (or block device) on the host.
//!
//! Buffered by default, like QEMU's `cache=writeback`: writes land in the host page
//! cache and [`Backend::flush`] is `fdatasync`. With [`FileOptions::direct`] the file is
//! opened `O_DIRECT`: aligned transfers go to the host as they are (a guest write's
//! [`crate::Bytes`], or guest memory itself, [`SharedIo::write_borrowed_at`]), the
//! rest through an aligned bounce buffer, with read-modify-write at unaligned edges,
//! so callers may still use any offset. The alignment is the one the file system or
//! the device asks for ([`direct_alignment`]: 512 bytes on most disks, 4096 on
//! 4K-native ones); it is the backend's [`Backend::granularity`], since two writes
//! within one such block would each write back the other's old bytes.
//!
//! The backend can let go of its image ([`Backend::detach`]: the descriptor is
//! closed, so the host file system can be unmounted and repaired) and take it back
//! ([`Backend::attach`]), at the same path or another, with the same options and
//! size. While detached every call fails with `ENOMEDIUM`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{write_zero_chunks, Backend, Capabilities, SharedIo};
use crate::bytes::{Borrowed, Bytes};
use crate::{HostError, HostOp};

/// `O_DIRECT`'s alignment where neither the file system nor the device says
/// ([`direct_alignment`]): safe for 512-byte and 4 KiB devices. Bounce space is
/// always aligned to at least this.
pub const DIRECT_ALIGN: u64 = 4096;

/// Largest `O_DIRECT` alignment holdfast takes ([`FileOptions::direct_align`]).
pub const MAX_DIRECT_ALIGN: u64 = 64 << 10;

/// Bounce space kept between `O_DIRECT` calls; a larger call's is freed after it.
const BOUNCE_KEEP: usize = (1 << 20) + DIRECT_ALIGN as usize;

/// A window of `len` bytes in `bounce` aligned to `align` (at least
/// [`DIRECT_ALIGN`]), grown as needed; over-allocated so an aligned window always fits.
fn aligned_window(bounce: &mut Vec<u8>, len: usize, align: u64) -> &mut [u8] {
    let align = align.max(DIRECT_ALIGN) as usize;
    let need = len + align;
    if bounce.len() < need {
        *bounce = vec![0; need];
    }
    let skew = bounce.as_ptr().align_offset(align);
    &mut bounce[skew..skew + len]
}

/// What `O_DIRECT` calls on an image must be aligned to, in bytes (powers of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlign {
    /// File offsets and lengths.
    pub offset: u64,
    /// Addresses in memory.
    pub memory: u64,
}

impl DirectAlign {
    fn uniform(align: u64) -> Self {
        DirectAlign {
            offset: align,
            memory: align,
        }
    }
}

/// The alignment `O_DIRECT` calls on `file` need: what the file system says
/// (`statx`'s `STATX_DIOALIGN`, Linux 6.1 and later for ext4 and XFS, 6.11 for block
/// devices), else a block device's logical block size (`BLKSSZGET`), else
/// [`DIRECT_ALIGN`].
pub fn direct_alignment(file: &File) -> DirectAlign {
    let fd = file.as_raw_fd();
    // SAFETY: an all-zero statx is a valid value of the plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the call, the path is an empty C string (with
    // AT_EMPTY_PATH: the descriptor itself), `stx` is writable and ours.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let valid = |a: u64| a.is_power_of_two() && a <= MAX_DIRECT_ALIGN;
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        let offset = u64::from(stx.stx_dio_offset_align);
        let memory = u64::from(stx.stx_dio_mem_align).max(1);
        if valid(offset) && valid(memory) {
            return DirectAlign { offset, memory };
        }
    }
    match logical_block_size(file) {
        Some(sector) if valid(sector) => DirectAlign::uniform(sector),
        _ => DirectAlign::uniform(DIRECT_ALIGN),
    }
}

/// A block device's logical block size (`BLKSSZGET`); `None` for anything else.
fn logical_block_size(file: &File) -> Option<u64> {
    use std::os::unix::fs::FileTypeExt;
    if !file
        .metadata()
        .is_ok_and(|m| m.file_type().is_block_device())
    {
        return None;
    }
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is ours; the
    // descriptor is open for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut sector) };
    (r == 0 && sector > 0).then_some(sector as u64)
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOptions {
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
    /// With `direct`, align calls to this many bytes (a power of two, 512 to
    /// `MAX_DIRECT_ALIGN`) instead of what the host says (`direct_alignment`):
    /// to test 4K-native storage on a 512-byte disk.
    pub direct_align: Option<u64>,
}

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the size of image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is {size} bytes, not a multiple of {align} as O_DIRECT needs there")]
    DirectUnaligned {
        path: PathBuf,
        size: u64,
        align: u64,
    },
    #[error("an O_DIRECT alignment of {0} bytes: it must be a power of two from 512 to {MAX_DIRECT_ALIGN}")]
    BadDirectAlign(u64),
}

/// Why an image could not be taken back; the backend is left as it was (detached).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("this disk's storage is not an image file: it cannot be detached or attached")]
    Unsupported,
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is a directory, not an image")]
    Directory { path: PathBuf },
    #[error("{path} is neither a regular file nor a block device")]
    NotAnImage { path: PathBuf },
    #[error("{path} is {size} bytes, but the disk is {expected} bytes")]
    Size {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error("{path} is read-only (mode {mode:o}), but the disk is writable")]
    ReadOnly { path: PathBuf, mode: u32 },
    #[error("cannot look at {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// A raw image file.
#[derive(Debug)]
pub struct FileBackend {
    /// `None` while detached. Shared with the [`SharedIo`] handles of calls in
    /// flight, which the disk lets finish before it detaches.
    file: Option<Arc<File>>,
    path: PathBuf,
    options: FileOptions,
    size: u64,
    /// `O_DIRECT`'s alignment, if the image is open so.
    direct: Option<DirectAlign>,
    /// A regular file (its page cache's write-back can be started early).
    regular: bool,
    /// A regular file or a block device: fallocate punches and zeroes ranges (on a
    /// block device the kernel discards or zeroes them on the device).
    punches: bool,
    /// What such a range must be aligned to: a block device's logical block size
    /// (else the kernel refuses it, EINVAL, and the range is zeroed by writes).
    punch_align: u64,
    /// Reused bounce space for `O_DIRECT`; over-allocated by `DIRECT_ALIGN` so an
    /// aligned window always fits.
    bounce: Vec<u8>,
}

impl FileBackend {
    pub fn open(path: &Path, options: FileOptions) -> Result<Self, OpenError> {
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let mut file = open.open(path).map_err(|source| OpenError::Open {
            path: path.to_owned(),
            source,
        })?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| OpenError::Size {
                path: path.to_owned(),
                source,
            })?;
        let direct = match (options.direct, options.direct_align) {
            (false, _) => None,
            (true, Some(a)) if !a.is_power_of_two() || !(512..=MAX_DIRECT_ALIGN).contains(&a) => {
                return Err(OpenError::BadDirectAlign(a))
            }
            (true, Some(a)) => Some(DirectAlign::uniform(a)),
            (true, None) => Some(direct_alignment(&file)),
        };
        if let Some(align) = direct {
            if size % align.offset != 0 {
                return Err(OpenError::DirectUnaligned {
                    path: path.to_owned(),
                    size,
                    align: align.offset,
                });
            }
        }
        let kind = file.metadata().map(|m| m.file_type());
        let regular = kind.as_ref().is_ok_and(|k| k.is_file());
        let block = kind.is_ok_and(|k| {
            use std::os::unix::fs::FileTypeExt;
            k.is_block_device()
        });
        let punch_align = if block {
            logical_block_size(&file).unwrap_or(4096)
        } else {
            1
        };
        Ok(FileBackend {
            file: Some(Arc::new(file)),
            path: path.to_owned(),
            options,
            size,
            direct,
            regular,
            punches: regular || block,
            punch_align,
            bounce: Vec::new(),
        })
    }

    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// `O_DIRECT`'s alignment, if the image is open so.
    pub fn direct_align(&self) -> Option<DirectAlign> {
        self.direct
    }

    /// The open image, or `ENOMEDIUM` while detached.
    fn file(&self) -> io::Result<&File> {
        self.file.as_deref().ok_or_else(detached)
    }

    /// Checks `path` as a replacement for this backend's image, then opens it with
    /// the original options. Nothing changes on failure.
    fn reopen(&self, path: &Path) -> Result<FileBackend, AttachError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(AttachError::Missing {
                    path: path.to_owned(),
                })
            }
            Err(source) => {
                return Err(AttachError::Stat {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let kind = meta.file_type();
        if kind.is_dir() {
            return Err(AttachError::Directory {
                path: path.to_owned(),
            });
        }
        if !kind.is_file() && !kind.is_block_device() {
            return Err(AttachError::NotAnImage {
                path: path.to_owned(),
            });
        }
        // Root may open a file without write permission for writing; the file's mode
        // still says it is not meant to be written.
        let mode = meta.permissions().mode() & 0o7777;
        if !self.options.read_only && kind.is_file() && mode & 0o222 == 0 {
            return Err(AttachError::ReadOnly {
                path: path.to_owned(),
                mode,
            });
        }
        let new = FileBackend::open(path, self.options)?;
        if new.size != self.size {
            return Err(AttachError::Size {
                path: path.to_owned(),
                size: new.size,
                expected: self.size,
            });
        }
        Ok(new)
    }

    /// Bytes of bounce space held between calls (for tests and diagnostics).
    pub fn bounce_bytes(&self) -> usize {
        self.bounce.capacity()
    }

    /// Lets go of bounce space past what ordinary requests need, so that one large
    /// replay does not keep its size in memory for the disk's life.
    fn trim_bounce(&mut self) {
        if self.bounce.capacity() > BOUNCE_KEEP {
            self.bounce = Vec::new();
        }
    }

    fn read_direct(&mut self, align: DirectAlign, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // The image and the bounce space are distinct fields: no dup() of the
        // descriptor to satisfy the borrow checker.
        let file = self.file.as_ref().ok_or_else(detached)?;
        read_direct(file, align, &mut self.bounce, buf, offset)?;
        self.trim_bounce();
        Ok(())
    }

    fn write_direct(&mut self, align: DirectAlign, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let file = self.file.as_ref().ok_or_else(detached)?;
        let written = write_direct(file, align, &mut self.bounce, bufs, offset);
        self.trim_bounce();
        written
    }

    fn write_vectored_plain(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        write_vectored_plain(self.file()?, bufs, offset)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let fd = self.file()?.as_raw_fd();
        // SAFETY: fallocate takes a file descriptor we own and plain integers.
        let r = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn read_plain(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Asks the kernel to start writing `[offset, offset + len)` back now.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range takes a file descriptor we own and plain integers.
    // A failure here only loses the head start; the flush reports real errors.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// An `O_DIRECT` read through the aligned bounce space `bounce`.
fn read_direct(
    file: &File,
    align: DirectAlign,
    bounce: &mut Vec<u8>,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<()> {
    let (start, end) = align_out(offset, buf.len() as u64, align.offset);
    let window = aligned_window(bounce, (end - start) as usize, align.memory);
    read_plain(file, window, start)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&window[skip..skip + buf.len()]);
    Ok(())
}

/// An `O_DIRECT` write: straight from the caller's bytes when they are one aligned
/// run (a guest write's [`crate::Bytes`] of whole blocks), else through the aligned
/// bounce space `bounce`. A write that does not cover whole blocks reads and writes
/// back its edge blocks: the caller must not run another call on those blocks
/// meanwhile ([`Backend::granularity`]).
fn write_direct(
    file: &File,
    align: DirectAlign,
    bounce: &mut Vec<u8>,
    bufs: &[&[u8]],
    offset: u64,
) -> io::Result<()> {
    let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    if len == 0 {
        return Ok(());
    }
    if let [one] = bufs {
        if (offset | len) % align.offset == 0 && one.as_ptr() as u64 % align.memory == 0 {
            return file.write_all_at(one, offset);
        }
    }
    let (start, end) = align_out(offset, len, align.offset);
    let window = aligned_window(bounce, (end - start) as usize, align.memory);
    // Read-modify-write only the edge blocks the caller does not cover.
    let block = align.offset as usize;
    if offset != start {
        read_plain(file, &mut window[..block], start)?;
    }
    if offset + len != end && (end - start > align.offset || offset == start) {
        let w = window.len();
        read_plain(file, &mut window[w - block..], end - align.offset)?;
    }
    let mut at = (offset - start) as usize;
    for b in bufs {
        window[at..at + b.len()].copy_from_slice(b);
        at += b.len();
    }
    file.write_all_at(window, start)
}

fn write_vectored_plain(file: &File, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
    // SAFETY: each run is a live `&[u8]` of `bufs`, readable for the whole call.
    let runs: Vec<Borrowed> = bufs
        .iter()
        .map(|b| unsafe { Borrowed::new(b.as_ptr(), b.len()) })
        .collect();
    write_borrowed(file, &runs, offset)
}

/// `pwritev` until all of `src` is written from `offset`, from where the runs lie.
fn write_borrowed(file: &File, src: &[Borrowed], offset: u64) -> io::Result<()> {
    {
        let fd = file.as_raw_fd();
        let mut iovs: Vec<libc::iovec> = src
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut first = 0;
        let mut at = offset;
        while first < iovs.len() {
            let batch = &iovs[first..iovs.len().min(first + IOV_MAX)];
            // SAFETY: every iovec points into a run of `src`, readable for its full
            // `iov_len` (`Borrowed::new`), or a suffix of one (see below); pwritev
            // only reads them.
            let n = unsafe { libc::pwritev(fd, batch.as_ptr(), batch.len() as i32, at as i64) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let mut n = n as usize;
            at += n as u64;
            // Skip what was written; a partly written iovec keeps its suffix.
            while n > 0 {
                let iov = &mut iovs[first];
                if n >= iov.iov_len {
                    n -= iov.iov_len;
                    first += 1;
                } else {
                    // SAFETY: n < iov_len, so the advanced pointer stays inside the buffer.
                    iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                    iov.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

const IOV_MAX: usize = 1024;

/// The image, for calls in flight beside each other ([`SharedIo`]). `O_DIRECT`
/// calls use a bounce space of their thread's.
#[derive(Debug)]
struct FileIo {
    file: Arc<File>,
    direct: Option<DirectAlign>,
    regular: bool,
}

thread_local! {
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `call` with this thread's bounce space, trimmed after it.
fn with_bounce<T>(call: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    BOUNCE.with(|b| {
        let mut bounce = b.borrow_mut();
        let r = call(&mut bounce);
        if bounce.capacity() > BOUNCE_KEEP {
            *bounce = Vec::new();
        }
        r
    })
}

impl SharedIo for FileIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        let r = if let Some(align) = self.direct {
            with_bounce(|bounce| read_direct(&self.file, align, bounce, buf, offset))
        } else {
            read_plain(&self.file, buf, offset)
        };
        r.map_err(|e| HostError::from_io(HostOp::Read, &e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        let r = if let Some(align) = self.direct {
            with_bounce(|bounce| write_direct(&self.file, align, bounce, &[buf], offset))
        } else {
            self.file.write_all_at(buf, offset)
        };
        r.map_err(|e| HostError::from_io(HostOp::Write, &e))
    }

    fn write_borrowed_at(&self, src: &[Borrowed], offset: u64) -> Result<(), HostError> {
        if let Some(align) = self.direct {
            let aligned = offset % align.offset == 0
                && src.iter().all(|b| {
                    b.as_ptr() as u64 % align.memory == 0 && b.len() as u64 % align.offset == 0
                });
            if !aligned {
                return self.write_at(&Bytes::copy_of(src), offset);
            }
        }
        write_borrowed(&self.file, src, offset).map_err(|e| HostError::from_io(HostOp::Write, &e))
    }

    fn flush(&self) -> Result<(), HostError> {
        self.file
            .sync_data()
            .map_err(|e| HostError::from_io(HostOp::Flush, &e))
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        if self.direct.is_none() && self.regular {
            start_writeback(&self.file, offset, len);
        }
    }
}

/// What every call on a detached image fails with.
fn detached() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOMEDIUM)
}

/// The smallest `align`-aligned range covering `[offset, offset + len)`.
fn align_out(offset: u64, len: u64, align: u64) -> (u64, u64) {
    let start = offset / align * align;
    let end = (offset + len).div_ceil(align) * align;
    (start, end)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            discard: self.punches,
            write_zeroes: self.punches,
        }
    }

    fn granularity(&self) -> u64 {
        self.direct.map_or(1, |a| a.offset)
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        let r = if let Some(align) = self.direct {
            self.read_direct(align, buf, offset)
        } else {
            self.file().and_then(|f| read_plain(f, buf, offset))
        };
        r.map_err(|e| HostError::from_io(HostOp::Read, &e))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        let r = if let Some(align) = self.direct {
            self.write_direct(align, &[buf], offset)
        } else {
            self.file().and_then(|f| f.write_all_at(buf, offset))
        };
        r.map_err(|e| HostError::from_io(HostOp::Write, &e))
    }

    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> Result<(), HostError> {
        let r = if let Some(align) = self.direct {
            self.write_direct(align, bufs, offset)
        } else {
            self.write_vectored_plain(bufs, offset)
        };
        r.map_err(|e| HostError::from_io(HostOp::Write, &e))
    }

    fn flush(&mut self) -> Result<(), HostError> {
        self.file()
            .and_then(File::sync_data)
            .map_err(|e| HostError::from_io(HostOp::Flush, &e))
    }

    fn shared_io(&self) -> Option<Arc<dyn SharedIo>> {
        let file = Arc::clone(self.file.as_ref()?);
        Some(Arc::new(FileIo {
            file,
            direct: self.direct,
            regular: self.regular,
        }))
    }

    fn start_writeback(&mut self, offset: u64, len: u64) {
        let Some(file) = &self.file else { return };
        if self.direct.is_none() && self.regular {
            start_writeback(file, offset, len);
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), HostError> {
        let unaligned = self.direct.is_some_and(|a| (offset | len) % a.offset != 0)
            || (offset | len) % self.punch_align != 0;
        if self.punches && !unaligned {
            let mode = if unmap {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            match self.fallocate(mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(HostError::from_io(HostOp::WriteZeroes, &e)),
            }
        }
        write_zero_chunks(self, offset, len).map_err(|e| HostError {
            op: HostOp::WriteZeroes,
            ..e
        })
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), HostError> {
        if !self.punches {
            return Err(HostError::new(HostOp::Discard, libc::EOPNOTSUPP));
        }
        if (offset | len) % self.punch_align != 0 {
            // Discard is advice: a range the device cannot discard loses nothing.
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Discard is advice: a file system that cannot punch holes loses nothing.
            Err(e) if unsupported(&e) => Ok(()),
            r => r.map_err(|e| HostError::from_io(HostOp::Discard, &e)),
        }
    }

    fn detach(&mut self) -> Result<(), AttachError> {
        // The only descriptor on the image: O_DIRECT's duplicates live for one call.
        self.file = None;
        self.bounce = Vec::new();
        Ok(())
    }

    fn attach(&mut self, path: Option<&Path>) -> Result<(), AttachError> {
        let path = path.unwrap_or(&self.path).to_owned();
        *self = self.reopen(&path)?;
        Ok(())
    }

    fn is_detached(&self) -> bool {
        self.file.is_none()
    }

    fn image(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("disk.img");
        let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, bytes).expect("write image");
        (dir, path)
    }

    fn round_trip(options: FileOptions) {
        let (_dir, path) = image(64 * 1024);
        let mut b = FileBackend::open(&path, options).expect("open");
        assert_eq!(b.size(), 64 * 1024);
        // Unaligned write across a block edge, then read it back with context.
        let data: Vec<u8> = (0..5000).map(|i| (i * 7 % 256) as u8).collect();
        b.write_at(&data, 4000).expect("write");
        let parts: [&[u8]; 3] = [&[1; 100], &[2; 5000], &[3; 3]];
        b.write_vectored_at(&parts, 20_000).expect("writev");
        b.flush().expect("flush");
        let mut back = vec![0; 9000];
        b.read_at(&mut back, 3000).expect("read");
        for (i, byte) in back.iter().enumerate() {
            let off = 3000 + i;
            let want = if (4000..9000).contains(&off) {
                ((off - 4000) * 7 % 256) as u8
            } else {
                (off % 251) as u8
            };
            assert_eq!(*byte, want, "offset {off}");
        }
        let on_disk = std::fs::read(&path).expect("read image");
        assert_eq!(&on_disk[20_000..20_100], &[1; 100][..]);
        assert_eq!(&on_disk[20_100..25_100], &[2; 5000][..]);
        assert_eq!(&on_disk[25_100..25_103], &[3; 3][..]);
        assert_eq!(on_disk[25_103], (25_103 % 251) as u8);
        assert_eq!(on_disk[19_999], (19_999 % 251) as u8);
        // Zeroing, with and without unmap, unaligned.
        b.write_zeroes(30_001, 10_000, false).expect("zero");
        b.write_zeroes(50_000, 4096, true).expect("punch");
        let on_disk = std::fs::read(&path).expect("read image");
        assert!(on_disk[30_001..40_001].iter().all(|&x| x == 0));
        assert_eq!(on_disk[30_000], (30_000 % 251) as u8);
        assert_eq!(on_disk[40_001], (40_001 % 251) as u8);
        assert!(on_disk[50_000..54_096].iter().all(|&x| x == 0));
    }

    /// Calls through [`SharedIo`] handles, from several threads at once, unaligned.
    fn shared_round_trip(options: FileOptions) {
        let (_dir, path) = image(64 * 1024);
        let mut b = FileBackend::open(&path, options).expect("open");
        let threads: Vec<_> = (0..4u64)
            .map(|i| {
                let io = b
                    .shared_io()
                    .expect("a file serves calls beside each other");
                std::thread::spawn(move || {
                    let data = vec![i as u8 + 1; 3000];
                    io.write_at(&data, 1000 + i * 8192).expect("write");
                    let mut back = vec![0; 3000];
                    io.read_at(&mut back, 1000 + i * 8192).expect("read");
                    assert_eq!(back, data);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        b.flush().expect("flush");
        let on_disk = std::fs::read(&path).expect("read image");
        for i in 0..4usize {
            let at = 1000 + i * 8192;
            assert!(on_disk[at..at + 3000].iter().all(|&x| x == i as u8 + 1));
            assert_eq!(on_disk[at - 1], ((at - 1) % 251) as u8);
            assert_eq!(on_disk[at + 3000], ((at + 3000) % 251) as u8);
        }
        b.detach().expect("detach");
        assert!(b.shared_io().is_none(), "nothing to share while detached");
    }

    #[test]
    fn buffered_calls_beside_each_other() {
        shared_round_trip(FileOptions::default());
    }

    #[test]
    fn direct_calls_beside_each_other() {
        let options = FileOptions {
            direct: true,
            ..FileOptions::default()
        };
        shared_round_trip(options);
    }

    #[test]
    fn buffered_round_trip() {
        round_trip(FileOptions::default());
    }

    #[test]
    fn direct_round_trip() {
        round_trip(FileOptions {
            direct: true,
            ..FileOptions::default()
        });
        // As on 4K-native storage: 512-byte edges are read-modify-writes.
        round_trip(FileOptions {
            direct: true,
            direct_align: Some(4096),
            ..FileOptions::default()
        });
    }

    fn open_direct(path: &Path) -> FileBackend {
        let options = FileOptions {
            direct: true,
            direct_align: Some(4096),
            ..FileOptions::default()
        };
        FileBackend::open(path, options).expect("open O_DIRECT")
    }

    #[test]
    fn a_large_direct_transfer_does_not_keep_its_bounce_space() {
        let (_dir, path) = image(16 << 20);
        let mut b = open_direct(&path);
        // Not on a 4 KiB boundary: through the bounce space.
        b.write_at(&[5; 4096], 8192 + 512).expect("small write");
        let small = b.bounce_bytes();
        assert!(small > 0 && small <= BOUNCE_KEEP, "{small}");
        let big = vec![6u8; 8 << 20];
        b.write_vectored_at(&[&big[..100], &big[100..]], 1000)
            .expect("large write");
        assert!(b.bounce_bytes() <= BOUNCE_KEEP, "{}", b.bounce_bytes());
        let mut back = vec![0; 8 << 20];
        b.read_at(&mut back, 1000).expect("large read");
        assert!(back.iter().all(|&x| x == 6));
        assert!(b.bounce_bytes() <= BOUNCE_KEEP, "{}", b.bounce_bytes());
    }

    #[test]
    fn borrowed_writes_go_to_the_host_from_where_they_lie() {
        for direct in [false, true] {
            let (_dir, path) = image(1 << 20);
            let options = FileOptions {
                direct,
                direct_align: direct.then_some(4096),
                ..FileOptions::default()
            };
            let b = FileBackend::open(&path, options).expect("open");
            let io = b.shared_io().expect("shared calls");
            let guest = crate::Bytes::copy_from_slice(&[7u8; 65536]);
            // SAFETY: `guest` outlives the calls and nothing changes it.
            let run = |from: usize, to: usize| unsafe {
                Borrowed::new(guest[from..].as_ptr(), to - from)
            };
            // Two aligned runs back to back (the pages of a guest write).
            io.write_borrowed_at(&[run(0, 32768), run(32768, 65536)], 8192)
                .expect("aligned runs");
            if direct {
                let bounced = BOUNCE.with(|b| b.borrow().capacity());
                assert_eq!(bounced, 0, "aligned runs go to O_DIRECT as they are");
            }
            // Runs no O_DIRECT call takes as they are: copied first.
            io.write_borrowed_at(&[run(512, 1024), run(4096, 8192)], 4096 * 100)
                .expect("unaligned runs");
            let on_disk = std::fs::read(&path).expect("read image");
            assert!(on_disk[8192..8192 + 65536].iter().all(|&x| x == 7));
            assert_eq!(on_disk[8191], (8191 % 251) as u8);
            assert_eq!(on_disk[8192 + 65536], ((8192 + 65536) % 251) as u8);
            let at = 4096 * 100;
            assert!(
                on_disk[at..at + 4608].iter().all(|&x| x == 7),
                "direct={direct}"
            );
            assert_eq!(on_disk[at + 4608], ((at + 4608) % 251) as u8);
        }
    }

    #[test]
    fn an_aligned_direct_write_goes_straight_from_the_guest_bytes() {
        let (_dir, path) = image(1 << 20);
        let mut b = open_direct(&path);
        let data = crate::Bytes::from(vec![9u8; 64 * 1024]);
        b.write_at(&data, 4096).expect("aligned write");
        assert_eq!(b.bounce_bytes(), 0, "no bounce copy for an aligned write");
        b.write_at(&data[..512], 4096 * 40).expect("short write");
        assert!(b.bounce_bytes() > 0, "a write of less than a block bounces");
        let on_disk = std::fs::read(&path).expect("read image");
        assert!(on_disk[4096..4096 + 65536].iter().all(|&x| x == 9));
        assert_eq!(on_disk[4095], (4095 % 251) as u8);
        assert_eq!(on_disk[4096 + 65536], ((4096 + 65536) % 251) as u8);
        assert!(on_disk[4096 * 40..4096 * 40 + 512].iter().all(|&x| x == 9));
        assert_eq!(on_disk[4096 * 40 + 512], ((4096 * 40 + 512) % 251) as u8);
    }

    /// O_DIRECT requests do not dup() the image's descriptor (each used to): the
    /// round trip above, run again under strace, makes no F_DUPFD or dup call.
    #[test]
    fn direct_requests_do_not_duplicate_the_descriptor() {
        if std::env::var_os("HOLDFAST_UNDER_STRACE").is_some() {
            return;
        }
        let dir = tempfile::tempdir().expect("dir");
        let trace = dir.path().join("trace");
        let exe = std::env::current_exe().expect("test binary");
        let out = match std::process::Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=dup,dup2,dup3,fcntl", "-o"])
            .arg(&trace)
            .arg(&exe)
            .args(["--exact", "backend::file::tests::direct_round_trip"])
            .env("HOLDFAST_UNDER_STRACE", "1")
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("skipped: cannot run strace ({e})");
                return;
            }
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let calls = std::fs::read_to_string(&trace).expect("trace");
        let dups: Vec<&str> = calls
            .lines()
            .filter(|l| l.contains("F_DUPFD") || l.contains("dup("))
            .collect();
        assert!(dups.is_empty(), "{dups:#?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    }

    #[test]
    fn reads_past_end_are_zero() {
        let (_dir, path) = image(8192);
        let mut b = FileBackend::open(&path, FileOptions::default()).expect("open");
        let mut buf = vec![9; 100];
        b.read_at(&mut buf, 8150).expect("read");
        assert!(buf[42..].iter().all(|&x| x == 0));
    }

    #[test]
    fn read_only_refuses_writes() {
        let (_dir, path) = image(8192);
        let mut b = FileBackend::open(
            &path,
            FileOptions {
                read_only: true,
                ..FileOptions::default()
            },
        )
        .expect("open");
        let e = b.write_at(&[1], 0).expect_err("write on read-only fd");
        assert_eq!(e.op, HostOp::Write);
        assert_eq!(e.errno, libc::EBADF);
    }

    #[test]
    fn direct_needs_aligned_size() {
        let (_dir, path) = image(5000);
        let err = FileBackend::open(
            &path,
            FileOptions {
                direct: true,
                ..FileOptions::default()
            },
        )
        .expect_err("unaligned");
        assert!(err.to_string().contains("5000"), "{err}");
    }

    #[test]
    fn missing_file_names_path() {
        let err = FileBackend::open(Path::new("/nonexistent/x.img"), FileOptions::default())
            .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/x.img"));
    }
}
