//! The guest workload, built static for the guest initramfs.
//!
//! `workload write FILE COUNT [SIZE] [--gate DEVICE AT[,AT...]]` appends COUNT
//! records of SIZE bytes (4096 by default) to FILE, `fdatasync`s after each and then
//! prints `ACK <n>`: a record whose ACK was printed must survive any host outage.
//! With `--gate`, before writing record AT_k (the k-th position) it waits at gate k
//! (below), so that it cannot finish before the host started its k-th outage.
//!
//! `workload gate DEVICE K` waits until the first byte of DEVICE (a small disk of
//! the guest's on healthy storage, read with O_DIRECT past the guest's page cache) is
//! at least K: the host writes K there once it started its K-th outage. Prints
//! `GATE WAIT <K>` when it has to wait and `GATE OPEN <K>` when the wait ends. A
//! scenario that waits for the guest's records before it breaks the storage thus
//! cannot be outrun by the guest however slowly it notices them. `workload verify FILE
//! [ACKED]` checks every record in FILE and, if ACKED is given, that records
//! 1..=ACKED are all there and intact. It prints `VERIFIED <n>`, or `LOST <k> of
//! <ACKED> acknowledged records` when acknowledged records are missing or damaged,
//! or says what else is wrong; and then exits 1.
//!
//! `workload list FILE` (a check for `holdfast lab`): prints `HAVE <n>` for every
//! record slot of FILE that holds record n intact, `CORRUPT <n>` for one that holds
//! something else that is not zeroes, then `RECORDS <slots>`.
//!
//! `workload power-button` waits for the power key on an input device (the ACPI
//! power button, pressed by QMP's system_powerdown), prints `POWER BUTTON` and exits 0.
//!
//! `workload exit STATUS` writes STATUS to the debug-exit port (0x501), which ends
//! the run of holdfast (or of QEMU with isa-debug-exit) with that status.
//!
//! `workload time-to MARKER -- CMD ARGS...` runs CMD, passes its output through,
//! and prints `TIME-TO <ms>` once a line containing MARKER appeared (for boot-time
//! benchmarks of VMMs whose guest prints MARKER on the serial console).
//!
//! `workload qmp SOCKET COMMAND [ARGUMENTS-JSON]` is a minimal QMP client for
//! scenarios inside the test host: it negotiates, runs one command, prints the
//! reply line and exits 0 on a `return`, 1 on an `error`. With HOLDFAST_QMP_TIMING
//! set it also says on stderr how long the command took to answer (`QMP-MS COMMAND
//! MS`, the round trip after negotiation).
//!
//! `workload relay PORT SOCKET` joins a virtio-serial port to a Unix socket, so a
//! client outside the test host reaches holdfast's QMP socket inside it: once the
//! port's host side is connected, it connects to SOCKET and copies bytes both ways
//! until either side closes.
//!
//! `workload burst DEVICE MIB...` (the guest's side of the outage benchmark): for
//! each size (the k-th, from 1), prints `BURST WRITING <k> <mib>`, waits 3 s (the host
//! arms a flush fault), writes MIB MiB to DEVICE with O_DIRECT and no flush, prints
//! `BURST WRITTEN <k> <mib>`, then fdatasyncs (the flush that fails on the host and
//! stops the VM) and prints `BURST FLUSHED <k> <mib>` once it returned.
//!
//! `workload noise FILE KIB`: KIB KiB written with O_DIRECT and never flushed every
//! 50 ms round FILE's first 4 MiB, `NOISE n` after each, until /tmp/noise-stop exists.
//!
//! `workload seqwrite FILE MIB` (the benchmark's baseline on the host): overwrites
//! MIB MiB of FILE (allocated first, untimed) with 1 MiB pwrites and one fdatasync,
//! twice: from one 1 MiB buffer, then from MIB MiB of distinct memory (as a replay
//! reads its whole buffer); prints `SEQWRITE <mib> <ns> <ns-distinct>`.
//!
//! `workload sectors DEVICE PHASES WRITES [--threads N] [--sync-every K] [--gate GATEDEV]
//! [--seed S]` keeps many writes in flight at 512-byte granularity. DEVICE is split
//! into PHASES regions (MiB-aligned), each into halves; phase p writes only in region
//! p: three quarters of the N threads (N = 16 by default) with O_DIRECT in the first
//! half, the others buffered in the second, WRITES in all, each a range of 1 to 2048
//! sectors (mostly short, mostly in the half's first MiB, so neighbours and overlaps
//! are common; chosen by a PRNG from S, 1 by default) written with one pwrite; a
//! buffered write is then fdatasync'd, an O_DIRECT one every K-th time (8 by
//! default) and before each gate and the phase's end, so that many of them are in
//! flight at once. Around each write a thread takes `start` and `ack` from one clock
//! shared by all threads, and
//! then prints `A <phase> <thread> <seq> <start> <ack> <offset> <len>` (in sectors;
//! seq counts the thread's writes from 1). With `--gate`, the threads of phase p stop
//! after WRITES/2 writes, and go on once gate p (as above) opens. Prints `SECTORS
//! START <phases> <writes> <threads> <bytes>`, `SECTORS PHASE <p> DONE <acked>` and
//! `SECTORS OK <acked>`; on an error, `SECTORS ERROR <phase> <thread> <seq> <error>`
//! and that thread stops. Every sector s a write puts holds: `HFSC`, the write's id
//! (thread << 32 | seq, u64), s (u64), payload derived from both, and an FNV-1a
//! checksum (u64) of the 504 bytes before it.
//!
//! `workload verify-sectors IMAGE CONSOLE` (on the host) reads the `A` lines of the
//! console log CONSOLE and checks every sector of IMAGE that an acknowledged write W
//! covered: it must hold W or another write that was in flight at the same time or
//! later (it did not start after W was acknowledged), or one never acknowledged;
//! zeroes or damage are lost too. Prints `VERIFY-SECTORS <n> acked writes, <m>
//! sectors checked, <k> lost, <j> acked writes lost` and a `LOST SECTOR` line for
//! each of the first 10 lost sectors; exits 1 if any is lost or if CONSOLE has no
//! `A` line at all.
//!
//! A record: magic `HFRC`, its number (u64), its length (u32), payload bytes derived
//! from the number, and an FNV-1a checksum (u64) of everything before it.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::process::ExitCode;

const MAGIC: &[u8; 4] = b"HFRC";
const HEAD: usize = 4 + 8 + 4;
const TAIL: usize = 8;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn record(n: u64, size: usize) -> Vec<u8> {
    let mut r = Vec::with_capacity(size);
    r.extend_from_slice(MAGIC);
    r.extend_from_slice(&n.to_le_bytes());
    r.extend_from_slice(&(size as u32).to_le_bytes());
    let payload = size - HEAD - TAIL;
    r.extend((0..payload).map(|i| (n as usize).wrapping_mul(31).wrapping_add(i) as u8));
    let sum = fnv1a(&r);
    r.extend_from_slice(&sum.to_le_bytes());
    r
}

/// Waits until the first byte of `device` is at least `k` (see the module comment).
fn gate(device: &str, k: u8) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .map_err(|e| format!("cannot open the gate {device}: {e}"))?;
    let mut buf = AlignedMib::new(0);
    let mut waited = false;
    loop {
        f.read_exact_at(&mut buf.bytes_mut()[..4096], 0)
            .map_err(|e| format!("cannot read the gate {device}: {e}"))?;
        if buf.bytes()[0] >= k {
            break;
        }
        if !waited {
            println!("GATE WAIT {k}");
            waited = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if waited {
        println!("GATE OPEN {k}");
    }
    Ok(())
}

/// `--gate DEVICE AT[,AT...]`: the device and the records to wait before.
struct Gates {
    device: String,
    at: Vec<u64>,
}

fn write(path: &str, count: u64, size: usize, gates: Option<&Gates>) -> Result<(), String> {
    if size < HEAD + TAIL + 1 {
        return Err(format!("record size must be at least {}", HEAD + TAIL + 1));
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    for n in 1..=count {
        if let Some(g) = gates {
            if let Some(k) = g.at.iter().position(|&at| at == n) {
                gate(&g.device, k as u8 + 1)?;
            }
        }
        f.write_all(&record(n, size))
            .map_err(|e| format!("write of record {n}: {e}"))?;
        f.sync_data()
            .map_err(|e| format!("fdatasync after record {n}: {e}"))?;
        println!("ACK {n}");
    }
    Ok(())
}

/// The acknowledged records 1..=`acked` that are not intact in their slots (records
/// are appended, so record n of size S sits at byte (n-1)*S; S is record 1's size if
/// it is intact, else the default 4096).
fn lost(bytes: &[u8], acked: u64) -> Vec<u64> {
    let size = record_size(bytes);
    (1..=acked)
        .filter(|&n| {
            let at = (n as usize - 1) * size;
            bytes.get(at..at + size) != Some(&record(n, size)[..])
        })
        .collect()
}

/// The record size of the file: record 1's, if it is intact, else the default 4096.
fn record_size(bytes: &[u8]) -> usize {
    bytes
        .get(12..16)
        .and_then(|b| b.try_into().ok())
        .map(|b| u32::from_le_bytes(b) as usize)
        .filter(|&s| s > HEAD + TAIL && bytes.get(..s) == Some(&record(1, s)[..]))
        .unwrap_or(4096)
}

/// `workload list`: every slot's verdict, a line each.
fn list(bytes: &[u8]) -> Vec<String> {
    let size = record_size(bytes);
    let slots = bytes.len().div_ceil(size);
    let mut lines = Vec::new();
    for i in 0..slots {
        let n = i as u64 + 1;
        let slot = &bytes[i * size..((i + 1) * size).min(bytes.len())];
        if slot == &record(n, size)[..] {
            lines.push(format!("HAVE {n}"));
        } else if slot.iter().any(|&b| b != 0) {
            lines.push(format!("CORRUPT {n}"));
        }
    }
    lines.push(format!("RECORDS {slots}"));
    lines
}

/// Checks the records in `bytes`; returns how many are intact, in order from 1.
fn verify(bytes: &[u8]) -> Result<u64, String> {
    let mut at = 0;
    let mut n = 0u64;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEAD + TAIL || &rest[..4] != MAGIC {
            return Err(format!("record {} at byte {at}: no record header", n + 1));
        }
        let num = u64::from_le_bytes(rest[4..12].try_into().map_err(|_| "short")?);
        let size = u32::from_le_bytes(rest[12..16].try_into().map_err(|_| "short")?) as usize;
        if num != n + 1 || size < HEAD + TAIL || size > rest.len() {
            return Err(format!(
                "record {} at byte {at}: header says number {num}, size {size}",
                n + 1
            ));
        }
        if rest[..size] != record(num, size)[..] {
            return Err(format!(
                "record {num} at byte {at}: content or checksum wrong"
            ));
        }
        n = num;
        at += size;
    }
    Ok(n)
}

fn time_to(marker: &str, cmd: &[String]) -> Result<(), String> {
    use std::io::BufRead;
    let (prog, rest) = cmd.split_first().ok_or("time-to needs a command")?;
    let start = std::time::Instant::now();
    let mut child = std::process::Command::new(prog)
        .args(rest)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut found = None;
    for line in std::io::BufReader::new(out).split(b'\n') {
        let line = line.map_err(|e| format!("reading {prog}: {e}"))?;
        println!("{}", String::from_utf8_lossy(&line).trim_end());
        if found.is_none() && String::from_utf8_lossy(&line).contains(marker) {
            found = Some(start.elapsed());
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {prog}: {e}"))?;
    match found {
        Some(t) => {
            println!("TIME-TO {}", t.as_millis());
            Ok(())
        }
        None => Err(format!(
            "`{marker}` never appeared ({prog} exited with {status})"
        )),
    }
}

fn qmp(socket: &str, command: &str, arguments: Option<&str>) -> Result<(), String> {
    use std::io::BufRead;
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {socket}: {e}"))?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    let mut next = |reader: &mut std::io::BufReader<std::os::unix::net::UnixStream>| -> Result<String, String> {
        // Skip events: the reply is the first line without "event".
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(|e| format!("reading QMP: {e}"))? == 0 {
                return Err("QMP closed the connection".into());
            }
            if !line.contains("\"event\"") {
                return Ok(line.trim_end().to_owned());
            }
        }
    };
    next(&mut reader)?; // greeting
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .map_err(|e| e.to_string())?;
    next(&mut reader)?;
    let msg = match arguments {
        Some(a) => format!("{{\"execute\": \"{command}\", \"arguments\": {a}}}\n"),
        None => format!("{{\"execute\": \"{command}\"}}\n"),
    };
    let sent = std::time::Instant::now();
    writer
        .write_all(msg.as_bytes())
        .map_err(|e| e.to_string())?;
    let reply = next(&mut reader)?;
    if std::env::var_os("HOLDFAST_QMP_TIMING").is_some() {
        // The command's round trip alone (connection and negotiation excluded).
        eprintln!(
            "QMP-MS {command} {:.1}",
            sent.elapsed().as_secs_f64() * 1000.0
        );
    }
    println!("{reply}");
    if reply.contains("\"return\"") {
        Ok(())
    } else {
        Err(format!("{command} failed"))
    }
}

/// Whether the host side of a virtio-serial port is connected (poll says POLLHUP
/// while it is not).
fn host_connected(port: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: port.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n >= 0 && fd.revents & libc::POLLHUP == 0
}

fn relay(port: &str, socket: &str) -> Result<(), String> {
    use std::os::unix::net::UnixStream;
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)
        .map_err(|e| format!("cannot open {port}: {e}"))?;
    while !host_connected(&dev) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    };
    eprintln!("relay: {port} <-> {socket}");
    let mut to_socket = stream.try_clone().map_err(|e| e.to_string())?;
    let mut from_port = dev.try_clone().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        // A read of 0 bytes: the host side went away.
        let _ = std::io::copy(&mut from_port, &mut to_socket);
        let _ = to_socket.shutdown(std::net::Shutdown::Both);
    });
    let (mut from_socket, mut to_port) = (stream, dev);
    let _ = std::io::copy(&mut from_socket, &mut to_port);
    // Either side closed (the other copy ends with the process).
    eprintln!("relay: {port}: closed");
    Ok(())
}

const MIB: usize = 1 << 20;

/// A 1 MiB buffer aligned for O_DIRECT, filled with `byte`.
struct AlignedMib(*mut u8);

impl AlignedMib {
    fn layout() -> std::alloc::Layout {
        // 1 MiB with 4 KiB alignment is always a valid layout.
        std::alloc::Layout::from_size_align(MIB, 4096).expect("layout")
    }

    fn new(byte: u8) -> AlignedMib {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(Self::layout()) };
        if p.is_null() {
            std::alloc::handle_alloc_error(Self::layout());
        }
        // SAFETY: `p` points to MIB writable bytes just allocated.
        unsafe { std::ptr::write_bytes(p, byte, MIB) };
        AlignedMib(p)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `self.0` points to MIB initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.0, MIB) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.0, MIB) }
    }
}

impl Drop for AlignedMib {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.0, Self::layout()) };
    }
}

/// `workload noise FILE KIB`: writes KIB KiB (at most 1 MiB) with O_DIRECT and no
/// flush every 50 ms, round the first 4 MiB of FILE (allocated and synced first),
/// printing `NOISE n` once the n-th returned, until /tmp/noise-stop exists: writes
/// no flush covers, on their way to the disk all the time (holdfast lab's power cuts
/// choose from them).
fn noise(file: &str, kib: u64) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const SPAN: u64 = 4 << 20;
    let len = (kib.clamp(4, 1024) * 1024) & !4095;
    {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(file)
            .map_err(|e| format!("cannot create {file}: {e}"))?;
        let zero = AlignedMib::new(0);
        for at in (0..SPAN).step_by(MIB) {
            f.write_all_at(zero.bytes(), at)
                .map_err(|e| format!("cannot fill {file}: {e}"))?;
        }
        f.sync_all().map_err(|e| format!("fsync of {file}: {e}"))?;
    }
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .map_err(|e| format!("cannot open {file} with O_DIRECT: {e}"))?;
    let buf = AlignedMib::new(0x6e);
    let mut n: u64 = 0;
    while !std::path::Path::new("/tmp/noise-stop").exists() {
        let at = ((n * len) % (SPAN - len + 1)) & !4095;
        f.write_all_at(&buf.bytes()[..len as usize], at)
            .map_err(|e| format!("O_DIRECT write at {at}: {e}"))?;
        n += 1;
        println!("NOISE {n}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

fn burst(device: &str, sizes: &[u64]) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .map_err(|e| format!("cannot open {device}: {e}"))?;
    for (k, &mib) in (1..).zip(sizes) {
        println!("BURST WRITING {k} {mib}");
        std::thread::sleep(std::time::Duration::from_secs(3));
        let buf = AlignedMib::new(mib as u8);
        for i in 0..mib {
            f.write_all_at(buf.bytes(), i * MIB as u64)
                .map_err(|e| format!("write of MiB {i}: {e}"))?;
        }
        println!("BURST WRITTEN {k} {mib}");
        f.sync_data()
            .map_err(|e| format!("fdatasync after {mib} MiB: {e}"))?;
        println!("BURST FLUSHED {k} {mib}");
    }
    Ok(())
}

fn seqwrite(path: &str, mib: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    let zero = vec![0u8; MIB];
    for i in 0..mib {
        f.write_all_at(&zero, i * MIB as u64)
            .map_err(|e| format!("cannot allocate {path}: {e}"))?;
    }
    f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    // Once from one 1 MiB buffer (what a plain sequential writer does), once from
    // MIB MiB of distinct memory (what a replay reads: its whole buffer).
    let data = vec![0x5au8; MIB];
    let start = std::time::Instant::now();
    for i in 0..mib {
        f.write_all_at(&data, i * MIB as u64)
            .map_err(|e| format!("write of MiB {i}: {e}"))?;
    }
    f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    let hot = start.elapsed();
    let distinct: Vec<Vec<u8>> = (0..mib).map(|i| vec![i as u8 ^ 0xa5; MIB]).collect();
    let start = std::time::Instant::now();
    for (i, chunk) in (0..).zip(&distinct) {
        f.write_all_at(chunk, i * MIB as u64)
            .map_err(|e| format!("write of MiB {i}: {e}"))?;
    }
    f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    println!(
        "SEQWRITE {mib} {} {}",
        hot.as_nanos(),
        start.elapsed().as_nanos()
    );
    Ok(())
}

/// A sector of `workload sectors`: `HFSC`, the write's id (u64), the sector's own
/// number (u64), payload derived from both, and an FNV-1a checksum (u64) of it all.
const SECTOR: usize = 512;
const SECTOR_MAGIC: &[u8; 4] = b"HFSC";

/// The splitmix64 finaliser: payload words and PRNG seeds.
fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `out` (512 bytes) with what write `id` puts at sector `s`.
fn sector(id: u64, s: u64, out: &mut [u8]) {
    out[..4].copy_from_slice(SECTOR_MAGIC);
    out[4..12].copy_from_slice(&id.to_le_bytes());
    out[12..20].copy_from_slice(&s.to_le_bytes());
    for (i, word) in (0u64..).zip(out[20..504].chunks_mut(8)) {
        let x = mix(id ^ s.rotate_left(24) ^ (i << 56)).to_le_bytes();
        word.copy_from_slice(&x[..word.len()]);
    }
    let sum = fnv1a(&out[..504]);
    out[504..SECTOR].copy_from_slice(&sum.to_le_bytes());
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Content {
    Zeroes,
    Corrupt,
    Write(u64),
}

/// What the 512 bytes at sector `s` hold.
fn content(bytes: &[u8], s: u64) -> Content {
    if bytes.iter().all(|&b| b == 0) {
        return Content::Zeroes;
    }
    let id = u64::from_le_bytes(bytes[4..12].try_into().unwrap_or_default());
    let mut want = [0u8; SECTOR];
    sector(id, s, &mut want);
    if id != 0 && bytes == want {
        Content::Write(id)
    } else {
        Content::Corrupt
    }
}

/// xorshift64*: the ranges `workload sectors` writes, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, thread: u64, phase: u64) -> Rng {
        Rng(mix(mix(seed) ^ (thread << 32) ^ phase).max(1))
    }

    /// A number in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// `workload sectors`' options.
struct Plan {
    phases: u64,
    writes: u64,
    threads: u64,
    /// An O_DIRECT thread fdatasyncs after every this many writes.
    sync_every: u64,
    gate: Option<String>,
    seed: u64,
}

/// Prints a line of `workload sectors` whole, and at once.
fn print_line(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `workload sectors`: returns how many writes were acknowledged; `emit` prints.
fn sectors(device: &str, plan: &Plan, emit: &(dyn Fn(String) + Sync)) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    if plan.threads < 2 || !(1..=255).contains(&plan.phases) {
        return Err("sectors needs at least 2 threads and 1 to 255 phases".into());
    }
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(device)
    };
    let buffered = open(0).map_err(|e| format!("cannot open {device}: {e}"))?;
    let direct = match open(libc::O_DIRECT) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("workload: {device} refuses O_DIRECT: its direct threads write buffered");
            open(0)
        }
        other => other,
    }
    .map_err(|e| format!("cannot open {device} with O_DIRECT: {e}"))?;
    let size = (&buffered)
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("cannot size {device}: {e}"))?;
    let bound = |p: u64| (p * size / plan.phases) & !(MIB as u64 - 1);
    if (1..=plan.phases).any(|p| bound(p) == bound(p - 1)) {
        return Err(format!("{device} is too small for {} phases", plan.phases));
    }
    emit(format!(
        "SECTORS START {} {} {} {size}",
        plan.phases, plan.writes, plan.threads
    ));
    let (clock, acked) = (AtomicU64::new(0), AtomicU64::new(0));
    let gate_failed = std::sync::OnceLock::new();
    let barrier = std::sync::Barrier::new(plan.threads as usize);
    // All threads wait, one runs `f`, all go on.
    let together = |f: &dyn Fn()| {
        if barrier.wait().is_leader() {
            f();
        }
        barrier.wait();
    };
    let worker = |t: u64| -> Result<(), String> {
        let is_direct = t < plan.threads - (plan.threads / 4).max(1);
        let f = if is_direct { &direct } else { &buffered };
        let mut buf = AlignedMib::new(0);
        let (mut seq, mut failed) = (0u64, None);
        for p in 1..=plan.phases {
            let (r0, r1) = (bound(p - 1) / SECTOR as u64, bound(p) / SECTOR as u64);
            let (lo, hi) = if is_direct {
                (r0, (r0 + r1) / 2)
            } else {
                ((r0 + r1) / 2, r1)
            };
            let hot = (hi - lo).min(MIB as u64 / SECTOR as u64);
            let mut rng = Rng::new(plan.seed, t, p);
            // Two bursts, WRITES/2 and the rest, with the gate (if any) between.
            for (burst, total) in [plan.writes / 2, plan.writes - plan.writes / 2]
                .into_iter()
                .enumerate()
            {
                let share = total / plan.threads + u64::from(t < total % plan.threads);
                for _ in 0..share {
                    if failed.is_some() {
                        break;
                    }
                    seq += 1;
                    // 4 times in 5 in the first MiB: neighbours and overlaps.
                    let zone = if rng.below(5) < 4 { hot } else { hi - lo };
                    let at = lo + rng.below(zone);
                    let len = match rng.below(10) {
                        0..=5 => 1 + rng.below(8),
                        6..=8 => 9 + rng.below(120),
                        _ => 129 + rng.below(1920),
                    }
                    .min(hi - at);
                    let id = t << 32 | seq;
                    let bytes = &mut buf.bytes_mut()[..len as usize * SECTOR];
                    for (s, out) in (at..).zip(bytes.chunks_mut(SECTOR)) {
                        sector(id, s, out);
                    }
                    let start = clock.fetch_add(1, SeqCst);
                    let sync = !is_direct || seq % plan.sync_every.max(1) == 0;
                    let done = f.write_all_at(bytes, at * SECTOR as u64).and_then(|()| {
                        if sync {
                            f.sync_data()
                        } else {
                            Ok(())
                        }
                    });
                    if let Err(e) = done {
                        emit(format!("SECTORS ERROR {p} {t} {seq} {e}"));
                        failed = Some(format!("thread {t}, write {seq} in phase {p}: {e}"));
                        break;
                    }
                    let ack = clock.fetch_add(1, SeqCst);
                    acked.fetch_add(1, SeqCst);
                    emit(format!("A {p} {t} {seq} {start} {ack} {at} {len}"));
                }
                // What the O_DIRECT threads wrote is flushed before the host breaks
                // its storage (and at the phase's end).
                if failed.is_none() {
                    if let Err(e) = f.sync_data() {
                        emit(format!("SECTORS ERROR {p} {t} {seq} {e}"));
                        failed = Some(format!("thread {t}, fdatasync in phase {p}: {e}"));
                    }
                }
                if let (0, Some(g)) = (burst, &plan.gate) {
                    together(&|| {
                        if let Err(e) = gate(g, p as u8) {
                            let _ = gate_failed.set(format!("phase {p}: {e}"));
                        }
                    });
                }
            }
            together(&|| emit(format!("SECTORS PHASE {p} DONE {}", acked.load(SeqCst))));
            if gate_failed.get().is_some() {
                break;
            }
        }
        failed.map_or(Ok(()), Err)
    };
    let errors: Vec<String> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..plan.threads)
            .map(|t| scope.spawn(move || worker(t)))
            .collect();
        threads
            .into_iter()
            .filter_map(|h| h.join().unwrap_or(Err("a thread panicked".into())).err())
            .collect()
    });
    if let Some(e) = gate_failed.into_inner() {
        return Err(e);
    }
    if let Some(first) = errors.first() {
        return Err(format!(
            "{} of {} threads stopped (the first: {first})",
            errors.len(),
            plan.threads
        ));
    }
    let total = acked.load(SeqCst);
    emit(format!("SECTORS OK {total}"));
    Ok(total)
}

/// An acknowledged write of `workload sectors`, from its `A` line.
#[derive(Clone, Debug, PartialEq)]
struct Acked {
    id: u64,
    start: u64,
    ack: u64,
    offset: u64,
    len: u64,
}

/// The `A <phase> <thread> <seq> <start> <ack> <offset> <len>` lines of a console log.
fn parse_acks(console: &str) -> Vec<Acked> {
    let max = u64::from(u32::MAX);
    console
        .lines()
        .filter_map(|line| {
            let fields = line.trim().strip_prefix("A ")?.split_whitespace();
            let fields: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
            let [_phase, thread, seq, start, ack, offset, len] = fields[..] else {
                return None;
            };
            (thread <= max && (1..=max).contains(&seq) && (1..=max).contains(&len)).then_some(
                Acked {
                    id: thread << 32 | seq,
                    start,
                    ack,
                    offset,
                    len,
                },
            )
        })
        .collect()
}

/// `THREAD.SEQ` of a write's id.
fn write_name(id: u64) -> String {
    format!("{}.{}", id >> 32, id & 0xffff_ffff)
}

/// What `verify-sectors` found: the lost sectors, and the first 10 explained.
#[derive(Debug)]
struct SectorsVerdict {
    checked: u64,
    lost: Vec<u64>,
    lines: Vec<String>,
    writes_lost: usize,
}

/// Checks every sector of `image` that an acknowledged write covered (see the module
/// comment): it must hold that write, or one in flight at the same time or later, or
/// one that was never acknowledged.
fn check_sectors(acks: &[Acked], image: &[u8]) -> Result<SectorsVerdict, String> {
    let by_id: std::collections::HashMap<u64, &Acked> = acks.iter().map(|w| (w.id, w)).collect();
    let count = (image.len() / SECTOR) as u64;
    // For each sector, the covering acknowledged write that started last.
    let mut latest: Vec<Option<&Acked>> = vec![None; count as usize];
    for w in acks {
        if w.offset + w.len > count {
            return Err(format!(
                "write {} ends at sector {}, past the image's {count}",
                write_name(w.id),
                w.offset + w.len
            ));
        }
        for l in &mut latest[w.offset as usize..(w.offset + w.len) as usize] {
            if l.is_none_or(|o| o.start < w.start) {
                *l = Some(w);
            }
        }
    }
    let (mut checked, mut lost, mut lines) = (0, Vec::new(), Vec::new());
    let mut writes_lost = std::collections::HashSet::new();
    for (s, want) in (0..).zip(&latest) {
        let Some(want) = want else { continue };
        checked += 1;
        let at = s as usize * SECTOR;
        let has = content(&image[at..at + SECTOR], s);
        let what = match has {
            Content::Write(id) => match by_id.get(&id) {
                None => continue, // never acknowledged: it may have reached the disk
                Some(w) if (w.offset..w.offset + w.len).contains(&s) && w.ack > want.start => {
                    continue
                }
                Some(w) => format!("write {} acked at {}", write_name(id), w.ack),
            },
            Content::Zeroes => "zeroes".into(),
            Content::Corrupt => "corrupt data".into(),
        };
        lost.push(s);
        writes_lost.insert(want.id);
        if lines.len() < 10 {
            lines.push(format!(
                "LOST SECTOR {s}: has {what}, but write {} (started at {}) was acked at {}",
                write_name(want.id),
                want.start,
                want.ack
            ));
        }
    }
    Ok(SectorsVerdict {
        checked,
        lost,
        lines,
        writes_lost: writes_lost.len(),
    })
}

fn verify_sectors(image: &str, console: &str) -> Result<(), String> {
    let bytes = std::fs::read(image).map_err(|e| format!("cannot read {image}: {e}"))?;
    let log = std::fs::read(console).map_err(|e| format!("cannot read {console}: {e}"))?;
    let acks = parse_acks(&String::from_utf8_lossy(&log));
    if acks.is_empty() {
        return Err(format!(
            "no acknowledged writes in {console}: nothing to check"
        ));
    }
    let v = check_sectors(&acks, &bytes)?;
    println!(
        "VERIFY-SECTORS {} acked writes, {} sectors checked, {} lost, {} acked writes lost",
        acks.len(),
        v.checked,
        v.lost.len(),
        v.writes_lost
    );
    for line in &v.lines {
        println!("{line}");
    }
    match v.lost.len() {
        0 => Ok(()),
        n => Err(format!(
            "{n} sectors lost, of {} acknowledged writes",
            v.writes_lost
        )),
    }
}

/// `NAME VALUE` taken out of `args`, if it is there.
fn take_option(args: &mut Vec<String>, name: &str) -> Result<Option<String>, String> {
    let Some(i) = args.iter().position(|a| a == name) else {
        return Ok(None);
    };
    if i + 1 >= args.len() {
        return Err(format!("{name} needs a value"));
    }
    Ok(args.drain(i..i + 2).nth(1))
}

/// `--gate DEVICE AT[,AT...]` taken out of `args`, if it is there.
fn take_gates(args: &mut Vec<String>) -> Result<Option<Gates>, String> {
    let Some(i) = args.iter().position(|a| a == "--gate") else {
        return Ok(None);
    };
    let [_, device, at] = args.get(i..i + 3).unwrap_or_default() else {
        return Err("--gate needs a DEVICE and AT[,AT...]".into());
    };
    let at = at
        .split(',')
        .map(|n| match n.parse::<u64>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!("--gate: `{n}` is not a record number")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if at.len() > usize::from(u8::MAX) || at.windows(2).any(|w| w[0] >= w[1]) {
        return Err("--gate: the records must ascend (at most 255 of them)".into());
    }
    let gates = Gates {
        device: device.clone(),
        at,
    };
    args.drain(i..i + 3);
    Ok(Some(gates))
}

fn run(args: &[String]) -> Result<(), String> {
    let num = |s: &String, what: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("{what} must be a number, not `{s}`"))
    };
    let mut args = args.to_vec();
    // `sectors` has its own `--gate GATEDEV`.
    let gates = match args.first() {
        Some(cmd) if cmd == "sectors" => None,
        _ => take_gates(&mut args)?,
    };
    if gates.is_some() && args.first().map(String::as_str) != Some("write") {
        return Err("--gate is an option of `workload write`".into());
    }
    match &args[..] {
        [cmd, file, count] if cmd == "write" => {
            write(file, num(count, "COUNT")?, 4096, gates.as_ref())
        }
        [cmd, file, count, size] if cmd == "write" => write(
            file,
            num(count, "COUNT")?,
            num(size, "SIZE")? as usize,
            gates.as_ref(),
        ),
        [cmd, device, k] if cmd == "gate" => match num(k, "K")? {
            k @ 1..=255 => gate(device, k as u8),
            _ => Err("K must be 1 to 255".into()),
        },
        [cmd, file] if cmd == "list" => {
            let mut bytes = Vec::new();
            std::fs::File::open(file)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| format!("cannot read {file}: {e}"))?;
            for line in list(&bytes) {
                println!("{line}");
            }
            Ok(())
        }
        [cmd, file, rest @ ..] if cmd == "verify" && rest.len() <= 1 => {
            let mut bytes = Vec::new();
            std::fs::File::open(file)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| format!("cannot read {file}: {e}"))?;
            if let Some(acked) = rest.first() {
                let acked = num(acked, "ACKED")?;
                let lost = lost(&bytes, acked);
                if let Some(first) = lost.first() {
                    println!("LOST {} of {acked} acknowledged records", lost.len());
                    return Err(format!(
                        "{} of {acked} acknowledged records are missing or damaged (the first: record {first})",
                        lost.len()
                    ));
                }
            }
            let intact = verify(&bytes)?;
            if let Some(acked) = rest.first() {
                let acked = num(acked, "ACKED")?;
                if intact < acked {
                    return Err(format!(
                        "only {intact} records on disk, {acked} were acknowledged"
                    ));
                }
            }
            println!("VERIFIED {intact}");
            Ok(())
        }
        [cmd, marker, dashes, rest @ ..] if cmd == "time-to" && dashes == "--" => {
            time_to(marker, rest)
        }
        [cmd, port, socket] if cmd == "relay" => relay(port, socket),
        [cmd, device, sizes @ ..] if cmd == "burst" && !sizes.is_empty() => {
            let sizes = sizes
                .iter()
                .map(|s| num(s, "MIB"))
                .collect::<Result<Vec<_>, _>>()?;
            burst(device, &sizes)
        }
        [cmd, file, mib] if cmd == "seqwrite" => seqwrite(file, num(mib, "MIB")?),
        [cmd, file, kib] if cmd == "noise" => noise(file, num(kib, "KIB")?),
        [cmd, rest @ ..] if cmd == "sectors" => {
            let mut rest = rest.to_vec();
            let mut option = |name, default| match take_option(&mut rest, name)? {
                Some(v) => num(&v, name),
                None => Ok(default),
            };
            let (threads, seed) = (option("--threads", 16)?, option("--seed", 1)?);
            let sync_every = option("--sync-every", 8)?;
            let gate = take_option(&mut rest, "--gate")?;
            let [device, phases, writes] = &rest[..] else {
                return Err(
                    "usage: workload sectors DEVICE PHASES WRITES [--threads N] [--sync-every K] [--gate GATEDEV] [--seed S]"
                        .into(),
                );
            };
            let plan = Plan {
                phases: num(phases, "PHASES")?,
                writes: num(writes, "WRITES")?,
                threads,
                sync_every,
                gate,
                seed,
            };
            sectors(device, &plan, &print_line).map(|_| ())
        }
        [cmd, image, console] if cmd == "verify-sectors" => verify_sectors(image, console),
        [cmd] if cmd == "power-button" => power_button(),
        [cmd, status] if cmd == "exit" => match num(status, "STATUS")? {
            s @ 0..=255 => debug_exit(s as u8),
            _ => Err("STATUS must be 0 to 255".into()),
        },
        [cmd, socket, command] if cmd == "qmp" => qmp(socket, command, None),
        [cmd, socket, command, arguments] if cmd == "qmp" => qmp(socket, command, Some(arguments)),
        _ => Err(
            "usage: workload write FILE COUNT [SIZE] [--gate DEVICE AT[,AT...]] | workload gate DEVICE K | workload verify FILE [ACKED] | workload list FILE | \
                  workload time-to MARKER -- CMD [ARGS...] | workload qmp SOCKET COMMAND [ARGUMENTS-JSON] | workload relay PORT SOCKET | \
                  workload burst DEVICE MIB... | workload seqwrite FILE MIB | \
                  workload sectors DEVICE PHASES WRITES [--threads N] [--sync-every K] [--gate GATEDEV] [--seed S] | \
                  workload verify-sectors IMAGE CONSOLE | workload exit STATUS | workload power-button"
                .into(),
        ),
    }
}

/// `workload power-button`: waits until an input device (/dev/input/event*) reports
/// the power key pressed (the ACPI power button: holdfast's or QEMU's
/// system_powerdown), prints `POWER BUTTON` and returns (`POWER BUTTON WAITING`
/// once it watches a device). Devices that appear later
/// are looked for every second.
fn power_button() -> Result<(), String> {
    use std::os::unix::io::AsRawFd;
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    /// struct input_event on x86_64: a timeval, then type, code, value.
    const EVENT_SIZE: usize = 24;
    let mut open: Vec<(String, std::fs::File)> = Vec::new();
    let mut said = false;
    loop {
        if let Ok(dir) = std::fs::read_dir("/dev/input") {
            for entry in dir.flatten() {
                let path = entry.path().display().to_string();
                if path.contains("/event") && !open.iter().any(|(p, _)| *p == path) {
                    if let Ok(f) = std::fs::File::open(&path) {
                        open.push((path, f));
                    }
                }
            }
        }
        if !said && !open.is_empty() {
            println!("POWER BUTTON WAITING ({} input devices)", open.len());
            said = true;
        }
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|(_, f)| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n <= 0 {
            continue;
        }
        for (i, p) in fds.iter().enumerate() {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            let mut buf = [0u8; EVENT_SIZE * 16];
            let got = open[i]
                .1
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", open[i].0))?;
            for ev in buf[..got].chunks_exact(EVENT_SIZE) {
                let kind = u16::from_le_bytes([ev[16], ev[17]]);
                let code = u16::from_le_bytes([ev[18], ev[19]]);
                let value = i32::from_le_bytes([ev[20], ev[21], ev[22], ev[23]]);
                if kind == EV_KEY && code == KEY_POWER && value == 1 {
                    println!("POWER BUTTON");
                    return Ok(());
                }
            }
        }
    }
}

/// QEMU's isa-debug-exit port, which holdfast's debug-exit device also takes.
const DEBUG_EXIT_PORT: u16 = 0x501;

/// `workload exit STATUS`: ends the virtual machine's run with STATUS, written to
/// the debug-exit port (as root: ioperm), for kernels without /dev/port. Returns only
/// if the write did not end the run (no such device).
fn debug_exit(status: u8) -> Result<(), String> {
    // SAFETY: ioperm(2) changes this process's I/O permission bitmap only.
    if unsafe { libc::ioperm(u64::from(DEBUG_EXIT_PORT), 1, 1) } != 0 {
        return Err(format!(
            "ioperm({DEBUG_EXIT_PORT:#x}): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `out` to a port this process was just given; it writes one byte to the
    // device and touches no memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") DEBUG_EXIT_PORT, in("al") status, options(nomem, nostack));
    }
    Err("the debug-exit port did not end the run (not holdfast, nor QEMU's isa-debug-exit?)".into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("workload: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqwrite_overwrites_the_file() {
        let dir = std::env::temp_dir().join(format!("workload-seq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("seq.dat");
        seqwrite(file.to_str().expect("utf-8"), 2).expect("seqwrite");
        let bytes = std::fs::read(&file).expect("read");
        assert_eq!(bytes.len(), 2 * MIB);
        assert_eq!(bytes[..MIB], vec![0xa5; MIB][..]);
        assert_eq!(bytes[MIB..], vec![0xa4; MIB][..]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn lost_records_are_counted_in_their_slots() {
        let mut bytes: Vec<u8> = (1..=6).flat_map(|n| record(n, 4096)).collect();
        assert_eq!(lost(&bytes, 6), Vec::<u64>::new());
        bytes[2 * 4096 + 100] ^= 1; // record 3
        bytes[4 * 4096..5 * 4096].fill(0); // record 5: the page never reached the disk
        assert_eq!(lost(&bytes, 6), vec![3, 5]);
        assert_eq!(lost(&bytes, 8), vec![3, 5, 7, 8], "acked past the end");
        let other: Vec<u8> = (1..=3).flat_map(|n| record(n, 512)).collect();
        assert_eq!(lost(&other, 3), Vec::<u64>::new(), "size from record 1");
    }

    #[test]
    fn list_names_every_slot() {
        let mut bytes: Vec<u8> = (1..=4).flat_map(|n| record(n, 4096)).collect();
        bytes[4096 + 7] ^= 1; // record 2 damaged
        bytes[2 * 4096..3 * 4096].fill(0); // record 3 never reached the disk
        assert_eq!(list(&bytes), ["HAVE 1", "CORRUPT 2", "HAVE 4", "RECORDS 4"]);
        assert_eq!(list(&[]), ["RECORDS 0"]);
    }

    #[test]
    fn records_verify_and_damage_is_found() {
        let mut bytes: Vec<u8> = (1..=5).flat_map(|n| record(n, 100)).collect();
        assert_eq!(verify(&bytes), Ok(5));
        bytes[250] ^= 1;
        assert!(verify(&bytes).expect_err("damaged").contains("record 3"));
        let truncated: Vec<u8> = (1..=3).flat_map(|n| record(n, 100)).collect();
        assert_eq!(
            verify(&truncated[..250]).map_err(|e| e.contains("record 3")),
            Err(true)
        );
        let skipped: Vec<u8> = [1, 3].iter().flat_map(|&n| record(n, 100)).collect();
        assert!(verify(&skipped).is_err());
    }

    #[test]
    fn time_to_a_marker() {
        let cmd: Vec<String> = ["sh", "-c", "echo one; echo GUEST INIT; echo three"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        time_to("GUEST INIT", &cmd).expect("marker seen");
        assert!(time_to("NEVER", &cmd)
            .expect_err("absent")
            .contains("never appeared"));
    }

    #[test]
    fn write_then_verify_a_file() {
        let dir = std::env::temp_dir().join(format!("workload-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("r.dat");
        let path = file.to_str().expect("utf-8").to_owned();
        write(&path, 7, 512, None).expect("write");
        let args = ["verify".to_string(), path.clone(), "7".into()];
        run(&args).expect("verify 7");
        let args = ["verify".to_string(), path, "8".into()];
        assert!(run(&args)
            .expect_err("8 acked")
            .contains("1 of 8 acknowledged records are missing"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn gate_options_are_read_and_checked() {
        let mut args = strings(&["write", "f", "300", "--gate", "/dev/vdb", "250,550"]);
        let g = take_gates(&mut args).expect("parsed").expect("given");
        assert_eq!((g.device.as_str(), g.at), ("/dev/vdb", vec![250, 550]));
        assert_eq!(args, strings(&["write", "f", "300"]));
        let mut args = strings(&["write", "f", "300"]);
        assert!(take_gates(&mut args).expect("parsed").is_none());
        for bad in [
            &["write", "f", "3", "--gate", "/dev/vdb"][..],
            &["write", "f", "3", "--gate", "/dev/vdb", "0"],
            &["write", "f", "3", "--gate", "/dev/vdb", "5,x"],
            &["write", "f", "3", "--gate", "/dev/vdb", "9,9"],
        ] {
            assert!(take_gates(&mut strings(bad)).is_err(), "{bad:?}");
        }
        let args = strings(&["verify", "f", "--gate", "/dev/vdb", "2"]);
        assert!(run(&args).expect_err("not write").contains("--gate"));
        assert!(run(&strings(&["gate", "/dev/vdb", "0"])).is_err());
    }

    /// A writer with gates at records 3 and 5 stops before each until the gate's
    /// first byte says so, and then writes on.
    #[test]
    fn write_waits_at_each_gate_until_it_opens() {
        let dir = std::env::temp_dir().join(format!("workload-gate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let gate_file = dir.join("gate.img");
        std::fs::write(&gate_file, vec![0u8; 4096]).expect("gate");
        let records = dir.join("r.dat");
        let path = records.to_str().expect("utf-8").to_owned();
        let gates = Gates {
            device: gate_file.to_str().expect("utf-8").to_owned(),
            at: vec![3, 5],
        };
        let writer = std::thread::spawn(move || write(&path, 6, 512, Some(&gates)));
        let written = || std::fs::metadata(&records).map_or(0, |m| m.len() / 512);
        for (k, before) in [(1u8, 2), (2, 4)] {
            while written() < before {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // The gate is shut: the writer must stay before record `before + 1`.
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert_eq!(written(), before, "passed gate {k} while it was shut");
            use std::os::unix::fs::FileExt;
            let f = OpenOptions::new()
                .write(true)
                .open(&gate_file)
                .expect("open");
            f.write_all_at(&[k], 0).expect("open the gate");
        }
        writer.join().expect("writer").expect("write");
        assert_eq!(written(), 6);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// An image of `count` sectors, holding `writes` (id, first sector, sectors) in order.
    fn image(count: usize, writes: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut bytes = vec![0u8; count * SECTOR];
        for &(id, at, len) in writes {
            for s in at..at + len {
                sector(id, s, &mut bytes[s as usize * SECTOR..][..SECTOR]);
            }
        }
        bytes
    }

    fn acked(thread: u64, seq: u64, start: u64, ack: u64, offset: u64, len: u64) -> Acked {
        let id = thread << 32 | seq;
        Acked {
            id,
            start,
            ack,
            offset,
            len,
        }
    }

    fn lost_sectors(acks: &[Acked], bytes: &[u8]) -> Vec<u64> {
        check_sectors(acks, bytes).expect("checked").lost
    }

    #[test]
    fn sectors_round_trip() {
        let mut s = [0u8; SECTOR];
        sector(7 << 32 | 3, 42, &mut s);
        assert_eq!(content(&s, 42), Content::Write(7 << 32 | 3));
        assert_eq!(content(&s, 43), Content::Corrupt, "in the wrong place");
        for at in [0, 5, 13, 300, 510] {
            let mut bad = s;
            bad[at] ^= 0x10;
            assert_eq!(content(&bad, 42), Content::Corrupt, "byte {at} flipped");
        }
        assert_eq!(content(&[0; SECTOR], 42), Content::Zeroes);
    }

    /// Write 0.1 acknowledged, then 1.1 started over half of it: that half must hold 1.1.
    #[test]
    fn a_write_started_after_an_ack_must_replace_it() {
        let (w1, w2) = (acked(0, 1, 0, 1, 0, 4), acked(1, 1, 2, 3, 2, 4));
        let acks = [w1.clone(), w2.clone()];
        let stale = image(8, &[(w1.id, 0, 4), (w2.id, 4, 2)]);
        let v = check_sectors(&acks, &stale).expect("checked");
        assert_eq!((v.checked, &v.lost[..], v.writes_lost), (6, &[2, 3][..], 1));
        assert!(v.lines[0].starts_with("LOST SECTOR 2: has write 0.1 acked at 1, but write 1.1"));
        let good = image(8, &[(w1.id, 0, 4), (w2.id, 2, 4)]);
        assert_eq!(lost_sectors(&acks, &good), Vec::<u64>::new());
    }

    /// Two overlapping writes, each started before the other was acknowledged.
    #[test]
    fn overlapping_writes_in_flight_together_may_leave_either() {
        let (w1, w2) = (acked(0, 1, 0, 3, 0, 4), acked(1, 1, 1, 2, 2, 4));
        let acks = [w1.clone(), w2.clone()];
        for order in [
            [(w1.id, 0, 4), (w2.id, 2, 4)],
            [(w2.id, 2, 4), (w1.id, 0, 4)],
        ] {
            assert_eq!(lost_sectors(&acks, &image(8, &order)), Vec::<u64>::new());
        }
        // Sector by sector, too: 2 from one, 3 from the other.
        let mixed = image(8, &[(w1.id, 0, 4), (w2.id, 2, 4), (w1.id, 3, 1)]);
        assert_eq!(lost_sectors(&acks, &mixed), Vec::<u64>::new());
    }

    #[test]
    fn zeroes_damage_and_strangers_where_an_acked_write_was() {
        let w = acked(2, 5, 10, 11, 1, 3);
        let acks = [w.clone()];
        let mut bytes = image(8, &[(w.id, 1, 3)]);
        bytes[2 * SECTOR..3 * SECTOR].fill(0);
        bytes[3 * SECTOR + 100] ^= 1;
        let v = check_sectors(&acks, &bytes).expect("checked");
        assert_eq!((&v.lost[..], v.writes_lost), (&[2, 3][..], 1));
        assert_eq!(
            v.lines,
            [
                "LOST SECTOR 2: has zeroes, but write 2.5 (started at 10) was acked at 11",
                "LOST SECTOR 3: has corrupt data, but write 2.5 (started at 10) was acked at 11"
            ]
        );
        // A write never acknowledged (its line lost, or it failed) may have landed.
        let stranger = image(8, &[(w.id, 1, 3), (9 << 32 | 1, 2, 2)]);
        assert_eq!(lost_sectors(&acks, &stranger), Vec::<u64>::new());
        assert!(
            check_sectors(&[acked(0, 1, 0, 1, 6, 3)], &bytes).is_err(),
            "past the end"
        );
    }

    #[test]
    fn console_lines_are_picked_out_of_junk() {
        let console = "[    1.2] virtio_blk virtio0: [vda] 65536 512-byte sectors\r\n\
                       A 1 0 1 0 1 2048 8\r\n\
                       GATE WAIT 1\n  A 1 3 2 5 9 4096 1  \n\
                       A 1 0 2 3 4\nA 1 x 2 3 4 5 6\nA 1 0 2 3 4 5 6 7\nAB 1 0 2 3 4 5 6\n\
                       A 1 0 0 3 4 5 6\n\u{fffd}\u{fffd}A 1 0 3 3 4 5 6\nA 2 1 7 20 30 100 2";
        assert_eq!(
            parse_acks(console),
            [
                acked(0, 1, 0, 1, 2048, 8),
                acked(3, 2, 5, 9, 4096, 1),
                acked(1, 7, 20, 30, 100, 2)
            ]
        );
    }

    /// `sectors` on a 4 MiB file (buffered, if it refuses O_DIRECT), then its verifier.
    #[test]
    fn sectors_then_verify_sectors() {
        let dir = std::env::temp_dir().join(format!("workload-sectors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (img, log) = (dir.join("disk.img"), dir.join("console.log"));
        std::fs::write(&img, vec![0u8; 4 * MIB]).expect("image");
        let plan = Plan {
            phases: 2,
            writes: 64,
            threads: 4,
            sync_every: 3,
            gate: None,
            seed: 1,
        };
        let lines = std::sync::Mutex::new(Vec::new());
        let emit = |line| lines.lock().expect("lines").push(line);
        let path = img.to_str().expect("utf-8");
        assert_eq!(sectors(path, &plan, &emit), Ok(128));
        let lines = lines.into_inner().expect("lines");
        assert_eq!(lines[0], format!("SECTORS START 2 64 4 {}", 4 * MIB));
        assert!(lines.contains(&"SECTORS PHASE 1 DONE 64".to_string()));
        assert_eq!(lines.last().map(String::as_str), Some("SECTORS OK 128"));
        let acks = parse_acks(&lines.join("\n"));
        assert_eq!(acks.len(), 128);
        // Phase 1 in the first 2 MiB, the O_DIRECT threads 0 to 2 in its first half.
        for (line, w) in lines.iter().filter(|l| l.starts_with("A ")).zip(&acks) {
            let phase: u64 = line
                .split(' ')
                .nth(1)
                .and_then(|p| p.parse().ok())
                .expect("phase");
            let thread = w.id >> 32;
            let half = w.offset / 2048;
            assert_eq!(half, (w.offset + w.len - 1) / 2048, "{line}");
            assert_eq!(half, (phase - 1) * 2 + u64::from(thread >= 3), "{line}");
        }
        std::fs::write(&log, lines.join("\r\n")).expect("console");
        let (img, log) = (img.to_str().expect("utf-8"), log.to_str().expect("utf-8"));
        let args = strings(&["verify-sectors", img, log]);
        run(&args).expect("nothing lost");
        let mut bytes = std::fs::read(img).expect("read");
        let s = acks[0].offset as usize;
        bytes[s * SECTOR..(s + 1) * SECTOR].fill(0);
        assert_eq!(lost_sectors(&acks, &bytes), [s as u64]);
        std::fs::write(img, &bytes).expect("write");
        assert!(run(&args)
            .expect_err("lost")
            .contains("1 sectors lost, of 1 acknowledged writes"));
        std::fs::write(log, "GATE WAIT 1\n").expect("console");
        assert!(run(&args)
            .expect_err("vacuous")
            .contains("nothing to check"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// With a gate, each phase stops after WRITES/2 acknowledged writes until it opens.
    #[test]
    fn sectors_wait_at_each_phase_gate() {
        let dir = std::env::temp_dir().join(format!("workload-sgate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (img, gate_file) = (dir.join("disk.img"), dir.join("gate.img"));
        std::fs::write(&img, vec![0u8; 4 * MIB]).expect("image");
        std::fs::write(&gate_file, vec![0u8; 4096]).expect("gate");
        let plan = Plan {
            phases: 2,
            writes: 21,
            threads: 3,
            sync_every: 8,
            gate: Some(gate_file.to_str().expect("utf-8").to_owned()),
            seed: 7,
        };
        let lines = std::sync::Mutex::new(Vec::<String>::new());
        let acks = || {
            lines
                .lock()
                .expect("lines")
                .iter()
                .filter(|l| l.starts_with("A "))
                .count()
        };
        let emit = |line| lines.lock().expect("lines").push(line);
        let path = img.to_str().expect("utf-8");
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| sectors(path, &plan, &emit));
            for (k, before) in [(1u8, 10), (2, 31)] {
                while acks() < before {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
                assert_eq!(acks(), before, "passed gate {k} while it was shut");
                use std::os::unix::fs::FileExt;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&gate_file)
                    .expect("open");
                f.write_all_at(&[k], 0).expect("open the gate");
            }
            assert_eq!(writer.join().expect("writer"), Ok(42));
        });
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
