//! A disk on a block device (a loop device over a file here; a dm device, a
//! partition or an LVM volume the same): opened as a file is, its size from the
//! device, reads and writes at 512-byte granularity buffered and with O_DIRECT,
//! zeroes and discards on the device, and let go and taken back by its path. Needs
//! root (it makes a loop device); says why it skips otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use holdfast_block::{Backend, FileBackend, FileOptions};

const SIZE: u64 = 8 << 20;

/// A loop device over a file of SIZE bytes, detached when dropped.
struct Loop {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new() -> Option<Loop> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: making a loop device needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("backing");
        std::fs::write(&file, vec![0u8; SIZE as usize]).expect("backing file");
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()
            .expect("losetup (util-linux) runs");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        Some(Loop { dev, _dir: dir })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

fn round_trip(dev: &Path, options: FileOptions) {
    let mut b = FileBackend::open(dev, options).expect("opens like a file");
    assert_eq!(b.size(), SIZE, "its size is the device's");
    assert!(b.capabilities().discard && b.capabilities().write_zeroes);
    // Neighbours and overlaps at 512-byte granularity, unaligned to 4 KiB.
    for (offset, len, seed) in [
        (512u64, 1536usize, 1u8),
        (1024, 512, 2),
        (4096 - 512, 1024, 3),
    ] {
        b.write_at(&pattern(seed, len), offset).expect("write");
    }
    b.flush().expect("flush");
    let mut got = vec![0u8; 8192];
    b.read_at(&mut got, 0).expect("read");
    let mut want = vec![0u8; 8192];
    for (offset, len, seed) in [
        (512usize, 1536usize, 1u8),
        (1024, 512, 2),
        (4096 - 512, 1024, 3),
    ] {
        want[offset..offset + len].copy_from_slice(&pattern(seed, len));
    }
    assert_eq!(got, want);
    b.write_zeroes(1024, 512, false).expect("zeroes");
    b.discard(1 << 20, 1 << 20).expect("discard is advice");
    let mut z = vec![9u8; 512];
    b.read_at(&mut z, 1024).expect("read");
    assert_eq!(z, vec![0u8; 512], "zeroed on the device");
    // Let go of the device and take it back by its path.
    b.detach().expect("detach");
    assert!(b.read_at(&mut z, 0).is_err(), "detached: no I/O");
    b.attach(None).expect("attach by path");
    b.read_at(&mut got, 0).expect("read after attach");
    want[1024..1536].fill(0);
    assert_eq!(got, want, "the device kept what was flushed");
}

#[test]
fn a_block_device_is_a_disk_like_a_file() {
    let Some(lo) = Loop::new() else { return };
    round_trip(&lo.dev, FileOptions::default());
}

#[test]
fn a_block_device_with_o_direct() {
    let Some(lo) = Loop::new() else { return };
    let options = FileOptions {
        direct: true,
        ..Default::default()
    };
    let b = FileBackend::open(&lo.dev, options).expect("opens");
    assert_eq!(
        b.direct_align().map(|a| a.offset),
        Some(512),
        "aligned to the device's logical block size"
    );
    drop(b);
    round_trip(&lo.dev, options);
}
