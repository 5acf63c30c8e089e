//! Letting go of the image and taking it back (docs/durability.md, "When the host file
//! system itself fails"), on real files: a detached disk holds no descriptor on its
//! image, keeps its buffer and parked requests, refuses a wrong replacement with
//! nothing changed, and after an attach replays every buffered byte into the file.

use std::path::{Path, PathBuf};

use holdfast_block::*;

const SIZE: usize = 256 * 1024;

type Host = FaultInjector<FileBackend>;

struct Rig {
    _dir: tempfile::TempDir,
    path: PathBuf,
    disk: Disk<Host>,
    faults: FaultHandle,
}

fn rig_with(options: FileOptions) -> Rig {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0xEE; SIZE]).expect("image");
    let file = FileBackend::open(&path, options).expect("open");
    let injector = FaultInjector::new(file);
    let faults = injector.handle();
    let config = DiskConfig {
        read_only: options.read_only,
        ..DiskConfig::default()
    };
    Rig {
        _dir: dir,
        path,
        disk: Disk::new(injector, config),
        faults,
    }
}

fn rig() -> Rig {
    rig_with(FileOptions::default())
}

fn write(tag: u64, offset: u64, byte: u8, len: usize) -> Request {
    Request::new(
        tag,
        RequestOp::Write {
            offset,
            data: vec![byte; len].into(),
        },
    )
}

fn flush(tag: u64) -> Request {
    Request::new(tag, RequestOp::Flush)
}

/// How many of this process's descriptors are open on `path`.
fn open_descriptors(path: &Path) -> usize {
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| *target == want)
        .count()
}

/// The disk as an outage leaves it: 8 KiB flushed, then two writes and a flush
/// that failed (the flush parked), 12 KiB buffered.
fn stopped_after_a_failed_flush(r: &mut Rig) {
    assert!(r.disk.submit(write(1, 0, 1, 8192)).completion.is_some());
    assert!(r.disk.submit(flush(2)).completion.is_some());
    assert!(r.disk.submit(write(3, 65536, 3, 8192)).completion.is_some());
    assert!(r
        .disk
        .submit(write(4, 131072, 4, 4096))
        .completion
        .is_some());
    r.faults
        .arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always));
    let out = r.disk.submit(flush(5));
    assert!(out.is_parked());
    assert_eq!(out.error.map(|e| e.error.errno), Some(libc::EIO));
    assert_eq!(r.disk.status().buffer.bytes, 12288);
}

/// What a refusal must leave as it was.
fn snapshot(disk: &Disk<Host>) -> (DiskStatus, Option<PathBuf>) {
    (disk.status(), disk.backend().image().map(Path::to_owned))
}

#[test]
fn detach_closes_the_image_and_keeps_buffer_and_parked_requests() {
    let mut r = rig();
    stopped_after_a_failed_flush(&mut r);
    assert_eq!(open_descriptors(&r.path), 1);
    r.disk.detach().expect("detach");
    assert_eq!(open_descriptors(&r.path), 0, "a descriptor is still open");
    let s = r.disk.status();
    assert!(s.detached && s.stopped);
    assert_eq!((s.buffer.bytes, s.parked), (12288, 1));
    assert_eq!(s.io_status, IoStatus::Failed);
    // The image can go away now (as when its file system is unmounted).
    std::fs::remove_file(&r.path).expect("remove");
    assert!(matches!(
        r.disk.detach(),
        Err(AttachmentError::AlreadyDetached)
    ));
}

#[test]
fn a_detached_disk_neither_replays_nor_touches_storage() {
    let mut r = rig();
    stopped_after_a_failed_flush(&mut r);
    r.faults.clear_all();
    r.disk.detach().expect("detach");
    let before = snapshot(&r.disk);
    let e = r.disk.replay().expect_err("replay while detached");
    assert_eq!(e.error.errno, libc::ENOMEDIUM);
    assert_eq!(
        snapshot(&r.disk),
        before,
        "a refused replay changed the disk"
    );
    // Requests park behind the detached disk without a host call.
    let out = r.disk.submit(write(6, 4096, 6, 512));
    assert!(out.is_parked() && out.error.is_none());
    assert_eq!(r.disk.status().parked, 2);
}

#[test]
fn attach_refuses_what_is_not_the_disk_and_changes_nothing() {
    let mut r = rig();
    stopped_after_a_failed_flush(&mut r);
    r.disk.detach().expect("detach");
    let dir = r.path.parent().expect("dir").to_owned();
    let smaller = dir.join("smaller.img");
    std::fs::write(&smaller, vec![0; SIZE - 4096]).expect("smaller");
    let read_only = dir.join("read-only.img");
    std::fs::write(&read_only, vec![0; SIZE]).expect("read-only");
    std::fs::set_permissions(
        &read_only,
        std::os::unix::fs::PermissionsExt::from_mode(0o444),
    )
    .expect("chmod");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("c string");
    // SAFETY: mkfifo reads a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let before = snapshot(&r.disk);
    let cases: [(&Path, &str); 5] = [
        (&smaller, "is 258048 bytes, but the disk is 262144 bytes"),
        (&dir, "is a directory"),
        (&dir.join("missing.img"), "does not exist"),
        (&read_only, "read-only (mode 444), but the disk is writable"),
        (&fifo, "neither a regular file nor a block device"),
    ];
    for (path, want) in cases {
        let e = r.disk.attach(Some(path)).expect_err("refused");
        let msg = e.to_string();
        assert!(
            msg.contains(want) && msg.contains(path.to_str().expect("utf-8")),
            "{}: {msg}",
            path.display()
        );
        assert_eq!(snapshot(&r.disk), before, "{}", path.display());
        assert_eq!(open_descriptors(path), 0);
    }
    // The original image, gone while detached, is refused too.
    std::fs::rename(&r.path, dir.join("moved.img")).expect("move");
    assert!(r.disk.attach(None).is_err());
    assert_eq!(snapshot(&r.disk), before);
}

#[test]
fn attach_then_replay_rewrites_every_buffered_byte() {
    let mut r = rig();
    stopped_after_a_failed_flush(&mut r);
    r.faults.clear_all();
    r.disk.detach().expect("detach");
    // The repaired file system lost what no flush covered (as ext4 after an abort).
    let mut lost = std::fs::read(&r.path).expect("read");
    lost[65536..65536 + 8192].fill(0xEE);
    lost[131072..131072 + 4096].fill(0xEE);
    std::fs::write(&r.path, &lost).expect("write");
    assert!(matches!(
        r.disk.attach(None),
        Ok(()) // the path it had
    ));
    assert!(matches!(
        r.disk.attach(None),
        Err(AttachmentError::NotDetached)
    ));
    let s = r.disk.status();
    assert!(!s.detached && s.stopped, "attached but not yet replayed");
    let report = r.disk.replay().expect("replay");
    assert_eq!(report.bytes_rewritten, 12288);
    assert_eq!(report.completions.len(), 1);
    assert_eq!(report.completions[0].tag, 5);
    let on_disk = std::fs::read(&r.path).expect("read");
    assert!(on_disk[..8192].iter().all(|&b| b == 1));
    assert!(on_disk[65536..65536 + 8192].iter().all(|&b| b == 3));
    assert!(on_disk[131072..131072 + 4096].iter().all(|&b| b == 4));
    assert_eq!(r.disk.status().buffer.bytes, 0);
    assert_eq!(r.disk.status().io_status, IoStatus::Ok);
}

#[test]
fn attach_to_another_path_moves_the_disk_there() {
    let mut r = rig();
    stopped_after_a_failed_flush(&mut r);
    r.faults.clear_all();
    r.disk.detach().expect("detach");
    let copy = r.path.with_file_name("restored.img");
    std::fs::copy(&r.path, &copy).expect("copy");
    r.disk.attach(Some(&copy)).expect("attach");
    assert_eq!(r.disk.backend().image(), Some(copy.as_path()));
    assert_eq!(open_descriptors(&copy), 1);
    assert_eq!(open_descriptors(&r.path), 0);
    r.disk.replay().expect("replay");
    let on_disk = std::fs::read(&copy).expect("read");
    assert!(on_disk[65536..65536 + 8192].iter().all(|&b| b == 3));
}

#[test]
fn an_attached_file_that_is_still_broken_fails_the_replay_and_keeps_everything() {
    let mut r = rig();
    stopped_after_a_failed_flush(&mut r);
    r.disk.detach().expect("detach");
    r.disk.attach(None).expect("attach");
    // The fault is still armed: storage is still broken.
    let e = r.disk.replay().expect_err("still broken");
    assert_eq!(e.error.errno, libc::EIO);
    let s = r.disk.status();
    assert!(s.stopped && !s.detached);
    assert_eq!((s.buffer.bytes, s.parked), (12288, 1));
    r.faults.clear_all();
    assert_eq!(r.disk.replay().expect("replay").bytes_rewritten, 12288);
}

#[test]
fn a_running_disk_detached_parks_requests_until_attached_and_replayed() {
    let mut r = rig();
    assert!(r.disk.submit(write(1, 0, 7, 4096)).completion.is_some());
    r.disk.detach().expect("detach");
    assert!(r.disk.is_stopped());
    assert_eq!(r.disk.status().io_status, IoStatus::Ok);
    assert!(r.disk.submit(flush(2)).is_parked());
    r.disk.attach(None).expect("attach");
    let report = r.disk.replay().expect("replay");
    assert_eq!(report.completions.len(), 1);
    assert_eq!(report.completions[0].status, Status::Ok);
    assert_eq!(report.bytes_rewritten, 4096);
    assert_eq!(
        r.disk.status().buffer.bytes,
        0,
        "the parked flush covered it"
    );
}

#[test]
fn options_survive_a_detach_and_an_attach() {
    for options in [
        FileOptions {
            direct: true,
            ..FileOptions::default()
        },
        FileOptions {
            read_only: true,
            ..FileOptions::default()
        },
    ] {
        let mut r = rig_with(options);
        if options.read_only {
            // A read-only disk may be attached to a read-only file.
            std::fs::set_permissions(&r.path, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .expect("chmod");
        }
        r.disk.detach().expect("detach");
        r.disk.attach(None).expect("attach");
        assert_eq!(r.disk.backend().inner().is_direct(), options.direct);
        let out = r.disk.submit(write(1, 0, 1, 4096));
        if options.read_only {
            assert_eq!(
                out.completion.map(|c| c.status),
                Some(Status::IoErr),
                "read-only must stay read-only"
            );
        }
    }
}

#[test]
fn settle_while_detached_says_what_it_drops() {
    let mut r = rig();
    stopped_after_a_failed_flush(&mut r);
    r.disk.detach().expect("detach");
    let e = r.disk.settle().expect_err("detached");
    assert_eq!(e.unflushed_bytes, 12288);
    assert_eq!(e.error.errno, libc::ENOMEDIUM);
    // With nothing buffered, a detached disk has nothing to drop.
    let mut empty = rig();
    empty.disk.detach().expect("detach");
    empty.disk.settle().expect("nothing to settle");
}

/// Storage with no image to let go of (a backend that keeps `Backend`'s defaults).
struct NoImage(MemBackend);

impl Backend for NoImage {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        Backend::read_at(&mut self.0, buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        Backend::write_at(&mut self.0, buf, offset)
    }
    fn flush(&mut self) -> Result<(), HostError> {
        Backend::flush(&mut self.0)
    }
}

#[test]
fn a_backend_without_an_image_cannot_be_detached() {
    let mut disk = Disk::new(NoImage(MemBackend::new(SIZE as u64)), DiskConfig::default());
    let before = disk.status();
    assert!(matches!(
        disk.detach(),
        Err(AttachmentError::Image(AttachError::Unsupported))
    ));
    assert_eq!(disk.status(), before);
    assert!(!disk.is_stopped());
}
