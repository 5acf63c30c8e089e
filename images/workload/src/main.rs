//! The guest workload, built static for the guest initramfs.
//!
//! `workload write FILE COUNT [SIZE]` appends COUNT records of SIZE bytes (4096 by
//! default) to FILE, `fdatasync`s after each and then prints `ACK <n>`: a record
//! whose ACK was printed must survive any host outage. `workload verify FILE
//! [ACKED]` checks every record in FILE and, if ACKED is given, that records
//! 1..=ACKED are all there and intact. It prints `VERIFIED <n>` or says what is wrong
//! and exits 1.
//!
//! `workload time-to MARKER -- CMD ARGS...` runs CMD, passes its output through,
//! and prints `TIME-TO <ms>` once a line containing MARKER appeared (for boot-time
//! benchmarks of VMMs whose guest prints MARKER on the serial console).
//!
//! `workload qmp SOCKET COMMAND [ARGUMENTS-JSON]` is a minimal QMP client for
//! scenarios inside the test host: it negotiates, runs one command, prints the
//! reply line and exits 0 on a `return`, 1 on an `error`.
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

fn write(path: &str, count: u64, size: usize) -> Result<(), String> {
    if size < HEAD + TAIL + 1 {
        return Err(format!("record size must be at least {}", HEAD + TAIL + 1));
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    for n in 1..=count {
        f.write_all(&record(n, size))
            .map_err(|e| format!("write of record {n}: {e}"))?;
        f.sync_data()
            .map_err(|e| format!("fdatasync after record {n}: {e}"))?;
        println!("ACK {n}");
    }
    Ok(())
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
    writer
        .write_all(msg.as_bytes())
        .map_err(|e| e.to_string())?;
    let reply = next(&mut reader)?;
    println!("{reply}");
    if reply.contains("\"return\"") {
        Ok(())
    } else {
        Err(format!("{command} failed"))
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let num = |s: &String, what: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("{what} must be a number, not `{s}`"))
    };
    match args {
        [cmd, file, count] if cmd == "write" => write(file, num(count, "COUNT")?, 4096),
        [cmd, file, count, size] if cmd == "write" => {
            write(file, num(count, "COUNT")?, num(size, "SIZE")? as usize)
        }
        [cmd, file, rest @ ..] if cmd == "verify" && rest.len() <= 1 => {
            let mut bytes = Vec::new();
            std::fs::File::open(file)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| format!("cannot read {file}: {e}"))?;
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
        [cmd, socket, command] if cmd == "qmp" => qmp(socket, command, None),
        [cmd, socket, command, arguments] if cmd == "qmp" => qmp(socket, command, Some(arguments)),
        _ => Err(
            "usage: workload write FILE COUNT [SIZE] | workload verify FILE [ACKED] | \
                  workload time-to MARKER -- CMD [ARGS...] | workload qmp SOCKET COMMAND [ARGUMENTS-JSON]"
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
        write(&path, 7, 512).expect("write");
        let args = ["verify".to_string(), path.clone(), "7".into()];
        run(&args).expect("verify 7");
        let args = ["verify".to_string(), path, "8".into()];
        assert!(run(&args).expect_err("8 acked").contains("only 7"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
