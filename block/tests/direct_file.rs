//! Neighbouring 512-byte writes on a real `O_DIRECT` image whose host blocks are
//! 4 KiB (docs/durability.md, "Requests in flight"): each such write is a
//! read-modify-write of its block, so two in one block must not run at once.

use std::os::unix::fs::FileExt;
use std::path::Path;

use holdfast_block::*;

const SIZE: u64 = 4 << 20;
const PAIRS: u64 = 300;

/// Runs the requests as the disk's worker does: calls beside each other, each on a
/// thread of its own; a request that needs the disk alone once they all ended.
fn run_as_the_worker(disk: &mut Disk<FileBackend>, requests: Vec<Request>) -> Vec<Completion> {
    let mut done = Vec::new();
    let mut running: Vec<std::thread::JoinHandle<Call>> = Vec::new();
    let end_all = |disk: &mut Disk<FileBackend>,
                   running: &mut Vec<std::thread::JoinHandle<Call>>,
                   done: &mut Vec<Completion>| {
        for t in running.drain(..) {
            let call = t.join().expect("call thread");
            done.extend(disk.end(call).completion);
        }
    };
    for req in requests {
        match disk.begin(req) {
            Begun::Done(out) => done.extend(out.completion),
            Begun::Call(mut call) => running.push(std::thread::spawn(move || {
                call.run();
                call
            })),
            Begun::Alone(req) => {
                end_all(disk, &mut running, &mut done);
                done.extend(disk.submit(req).completion);
            }
        }
    }
    end_all(disk, &mut running, &mut done);
    done
}

fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; SIZE as usize]).expect("image");
    path
}

fn drop_cache(path: &Path) {
    let f = std::fs::File::open(path).expect("open");
    use std::os::fd::AsRawFd;
    // SAFETY: plain integers and a descriptor we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[test]
fn neighbouring_sectors_of_one_host_block_both_reach_the_image() {
    let dir = tempfile::tempdir().expect("dir");
    let path = image(dir.path());
    let options = FileOptions {
        direct: true,
        direct_align: Some(4096),
        ..FileOptions::default()
    };
    let backend = FileBackend::open(&path, options).expect("open O_DIRECT");
    assert_eq!(backend.granularity(), 4096);
    let mut disk = Disk::new(backend, DiskConfig::default());
    let mut tag = 0;
    let mut write = |offset: u64, byte: u8| {
        tag += 1;
        Request::new(
            tag,
            RequestOp::Write {
                offset,
                data: vec![byte; 512].into(),
            },
        )
    };
    // Pairs at b and b + 512 in one 4 KiB block, taken one after the other so that
    // both are in flight at once, as a guest's two threads make them.
    let mut requests = Vec::new();
    for i in 0..PAIRS {
        let b = i * 4096 + (i % 7) * 512;
        requests.push(write(b, (2 * i % 251) as u8 + 1));
        requests.push(write(b + 512, (2 * i % 251) as u8 + 2));
    }
    let completions = run_as_the_worker(&mut disk, requests);
    assert_eq!(completions.len(), 2 * PAIRS as usize);
    assert!(completions.iter().all(|c| c.status == Status::Ok));
    let flushed = disk.submit(Request::new(u64::MAX, RequestOp::Flush));
    assert_eq!(flushed.completion.expect("flushed").status, Status::Ok);
    assert_eq!(
        disk.status().buffer.bytes,
        0,
        "the flush released the buffer"
    );
    drop_cache(&path);
    let f = std::fs::File::open(&path).expect("open");
    let mut lost = Vec::new();
    for i in 0..PAIRS {
        let b = i * 4096 + (i % 7) * 512;
        let mut got = [0u8; 1024];
        f.read_exact_at(&mut got, b).expect("read");
        let want = [(2 * i % 251) as u8 + 1, (2 * i % 251) as u8 + 2];
        for (half, w) in want.iter().enumerate() {
            if got[half * 512..(half + 1) * 512].iter().any(|x| x != w) {
                lost.push(b + half as u64 * 512);
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged sectors lost on the image, first at {:?}",
        lost.len(),
        2 * PAIRS,
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn the_granularity_is_the_hosts() {
    let dir = tempfile::tempdir().expect("dir");
    let path = image(dir.path());
    let buffered = FileBackend::open(&path, FileOptions::default()).expect("open");
    assert_eq!(
        buffered.granularity(),
        1,
        "the page cache merges neighbours"
    );
    let direct = FileOptions {
        direct: true,
        ..FileOptions::default()
    };
    let found = FileBackend::open(&path, direct).expect("open O_DIRECT");
    let align = found.direct_align().expect("direct");
    assert!(
        align.offset.is_power_of_two() && (512..=65536).contains(&align.offset),
        "{align:?}"
    );
    assert_eq!(found.granularity(), align.offset);
    eprintln!(
        "O_DIRECT alignment found for {}: {align:?}",
        dir.path().display()
    );
    let bad = FileOptions {
        direct: true,
        direct_align: Some(3000),
        ..FileOptions::default()
    };
    let e = FileBackend::open(&path, bad).expect_err("not a power of two");
    assert!(e.to_string().contains("3000"), "{e}");
}
