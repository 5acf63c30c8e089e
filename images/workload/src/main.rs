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
//! `workload seqwrite FILE MIB` (the benchmark's baseline on the host): overwrites
//! MIB MiB of FILE (allocated first, untimed) with 1 MiB pwrites and one fdatasync,
//! twice: from one 1 MiB buffer, then from MIB MiB of distinct memory (as a replay
//! reads its whole buffer); prints `SEQWRITE <mib> <ns> <ns-distinct>`.
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
    let gates = take_gates(&mut args)?;
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
        [cmd, socket, command] if cmd == "qmp" => qmp(socket, command, None),
        [cmd, socket, command, arguments] if cmd == "qmp" => qmp(socket, command, Some(arguments)),
        _ => Err(
            "usage: workload write FILE COUNT [SIZE] [--gate DEVICE AT[,AT...]] | workload gate DEVICE K | workload verify FILE [ACKED] | workload list FILE | \
                  workload time-to MARKER -- CMD [ARGS...] | workload qmp SOCKET COMMAND [ARGUMENTS-JSON] | workload relay PORT SOCKET | \
                  workload burst DEVICE MIB... | workload seqwrite FILE MIB"
                .into(),
        ),
    }
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
}
