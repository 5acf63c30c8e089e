//! `holdfast run`'s command line (clap derive: [`RunArgs`]), its help, and the checks
//! that make it [`RunOpts`], each error naming the option it is about; the `holdfast`
//! command as a whole is defined in `main.rs` from these pieces.

use std::path::PathBuf;

use clap::{Args, Parser};
use holdfast_block::sim::strategy::Strategy;
use holdfast_block::sim::HostModel;
use holdfast_block::{DiskConfig, ErrorPolicy};

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";
pub const DEFAULT_MEM: u64 = 512 << 20;
const MIN_MEM: u64 = 64 << 20;
const MAX_MEM: u64 = 1 << 40;

/// The end of parsing without a command to run: help, a version, or an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliExit {
    /// What to print, on stdout (`ok`) or stderr.
    pub text: String,
    pub ok: bool,
}

impl CliExit {
    /// From clap's error: help and version as clap prints them; the errors a user
    /// meets most in holdfast's own words (`--qmp needs a value`, `unknown option
    /// `--x``), the rest in clap's.
    pub fn from_clap(e: clap::Error) -> CliExit {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        let arg = || match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(s)) => s.split_whitespace().next().map(str::to_owned),
            _ => None,
        };
        let text = match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                return CliExit {
                    text: e.render().to_string(),
                    ok: matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion),
                }
            }
            ErrorKind::UnknownArgument => match arg() {
                Some(a) => format!("unknown option `{a}` (see --help)\n"),
                None => e.render().to_string(),
            },
            ErrorKind::InvalidValue if matches!(e.get(ContextKind::InvalidValue), Some(ContextValue::String(v)) if v.is_empty()) => {
                match arg() {
                    Some(a) => format!("{a} needs a value\n"),
                    None => e.render().to_string(),
                }
            }
            _ => e.render().to_string(),
        };
        CliExit { text, ok: false }
    }
}

/// `holdfast run`'s options, as written; [`RunArgs::check`] makes them [`RunOpts`].
#[derive(Debug, Default, Args)]
#[command(after_long_help = run_after_help())]
pub struct RunArgs {
    /// Guest kernel: a bzImage or an ELF vmlinux (required)
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<String>,
    /// Initial ramdisk
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<String>,
    /// Kernel command line (default: "console=ttyS0 panic=-1")
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// vCPUs, 1 to 254 (default: 1); the guest learns them from ACPI
    #[arg(long, value_name = "N")]
    pub cpus: Option<String>,
    /// Guest memory, K/M/G suffixes, at least 64M (default: 512M)
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// A virtio-blk disk (repeatable): path=IMG followed by key=value options (below)
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// Where the guest's serial console goes: stdio (default), file:PATH or none
    #[arg(long, value_name = "WHERE")]
    pub serial: Option<String>,
    /// A QMP socket (mode 0600) for QEMU's clients and `holdfast qmp` (below)
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<String>,
    /// End the run (status 5) if the kernel has not started the guest's init within
    /// this many seconds of running: the kernel says "Run /init as init process" on the
    /// console, or (with `quiet`) a line that is not a kernel message appears there
    #[arg(long, value_name = "SECONDS")]
    pub boot_timeout: Option<String>,
    /// The machine's name, as QMP's query-name answers it (QEMU's -name)
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// `holdfast faults`: checks a fault plan; its help is the plan language.
#[derive(Debug, Args)]
#[command(after_long_help = holdfast_block::fault::PLAN_HELP)]
pub struct FaultsArgs {
    /// A fault plan (JSON) to check: it says what is wrong, naming the field, or
    /// lists its rules
    pub plan: Option<PathBuf>,
}

/// `holdfast run --help`'s text after the options, with the simulated host models'
/// names.
pub fn run_after_help() -> String {
    RUN_AFTER_HELP.replace("{MODELS}", &HostModel::names())
}

const RUN_AFTER_HELP: &str = "\
Boots a Linux guest on KVM with virtio-blk disks that survive host storage outages:
a host write or flush error pauses the guest and keeps every unflushed guest write
in holdfast's memory until storage is back.

--disk SPEC is path=IMG (or file=IMG, as QEMU spells it) followed by any of:
  IMG                   a file, or a block device: a dm device such as dm-flakey's,
                        a partition, an LVM volume, a loop device
  id=NAME               name in messages and QMP (default: diskN)
  format=raw            the only format (a raw image or device); others are refused
  readonly=on|off       (default: off)
  cache=writeback|writethrough|none
                        writeback (default): the host page cache, guest flushes
                        become fdatasync; writethrough: every write is flushed;
                        none: O_DIRECT, write-back semantics, aligned as the host
                        file system or device asks (statx, else its logical block
                        size, else 4096)
  x-direct-align=N      with cache=none: align O_DIRECT calls to N bytes (512 to
                        65536, a power of two) instead, as 4K-native storage would ask
  werror=stop|report|ignore|enospc   host write/flush errors
  rerror=stop|report|ignore|enospc   host read errors (default: stop for both)
  unflushed-limit=SIZE  bound of the unflushed buffer's memory; past it holdfast
                        flushes on its own (default: 128M, at least 32M: the longest
                        request). Memory a flush frees is kept for later writes, up
                        to the disks' bounds (the kernel may take it back under
                        memory pressure)
  serial=STR            what the guest reads as the disk's ID
  hang-timeout=N        (seconds; `Ns` too) a host call to the image outstanding
                        longer than this (a hard NFS mount, a lost iSCSI path, a
                        suspended dm table) pauses the guest as a host error does
                        (io-error, BLOCK_IO_ERROR saying which call for how long),
                        so that its kernel sees no hung tasks; cont is refused until
                        the call returns. Default: off (the guest waits with the
                        call). 30 is a sensible value: under Linux's 120 s hung-task
                        timeout, above a busy disk's stalls
  extra-flush=on|off    keep buffered writes one extra successful flush, and flush
                        twice on replay: for hosts that report a failed write-back
                        one flush late (ext4 data=journal) (default: off)
  faults=FILE           a fault plan armed in front of the image before the guest
                        boots: errors, delays and hangs by operation, byte range,
                        count, time window and seeded chance (holdfast faults --help);
                        checked first, a bad one refused naming the field
  write-log=FILE        log every write, zeroing and discard, and every FLUSH, the
                        guest is told is done, in that order, to FILE (created or
                        truncated) in the dm-log-writes format: replay-log from the
                        dm-log-writes userspace or holdfast lab's power cuts rebuild
                        the disk as a power cut could leave it at any point. Every
                        entry is written as it happens (a killed holdfast leaves a
                        whole log); a log that cannot be written stops, said on stderr
  x-host=simulated:MODEL  (holdfast lab) a simulated host page cache with the
                        failure behaviour of MODEL: {MODELS}; x-block-fault's
                        layer=writeback breaks its write-back
  x-strategy=holdfast|retry-flush|sticky|x-lying-flush
                        (holdfast lab) what the disk does after a host error:
                        holdfast (default), or an imitation of QEMU's werror=stop
                        (retry-flush), of its default file backend (sticky), or a
                        deliberately broken holdfast (x-lying-flush)

QMP (--qmp): query-status, stop, cont, quit, query-block, query-blockstats, query-name,
query-cpus-fast, system_reset (holdfast exits, as QEMU -no-reboot does),
system_powerdown (the guest's ACPI power button; event POWERDOWN), and holdfast's
x-query-unflushed, x-block-fault, x-query-timings, x-block-detach and x-block-attach;
events STOP, RESUME, SHUTDOWN, BLOCK_IO_ERROR, X_BLOCK_REPLAY, X_UNFLUSHED_DROPPED,
X_DEVICE_NEEDS_RESET (the guest broke a disk's queue). A stale socket at PATH is
replaced. At most 128 clients at once; a client more than 1024 events behind (it does
not read) is disconnected, with a log line.

A test's verdict: the guest ends its run by writing a status byte to I/O port 0x501
(QEMU's isa-debug-exit; from a shell: printf '\\007' | dd of=/dev/port bs=1
seek=1281), and holdfast exits with that status. The default guest's init runs the
command in holdfast.run=\"...\" on the kernel command line and reports its status so.

Exit status:
  0    the guest powered off or rebooted, QMP quit, or a signal (holdfast does not
       reset a guest; it exits, like QEMU -no-reboot)
  N    the guest wrote N to the debug-exit port (0 to 255, as it is)
  1    holdfast failed (a VMM error)
  2    bad options
  3    the guest's kernel panicked (pvpanic, or \"Kernel panic\" on its console)
  4    this host's KVM cannot run the guest's kernel code (run holdfast inside the
       nested test host: tests/testhost)
  5    the kernel did not start the guest's init within --boot-timeout
  6    the run ended with acknowledged bytes dropped (storage still broken at the end)
On 3, 5 and 6 the console's last lines are printed on stderr. Where a guest's status
may be one of holdfast's own, holdfast's last line on stderr says which it is.

Signals: SIGTERM, SIGINT and SIGHUP end holdfast like QMP quit: the guest is paused,
every disk's buffered bytes are written and flushed, and what cannot be is reported per
disk.

On a host storage error (werror=stop) the guest pauses and every guest write no host
flush has covered stays in holdfast's memory; `cont` writes it again, flushes, and
resumes. When the host file system itself went down (ext4 read-only after a journal
abort: cont fails with EROFS; XFS shut down: EIO after the device is back),
`x-block-detach` lets go of the image so the file system can be unmounted, repaired and
mounted again; `x-block-attach` takes it back; `cont` then replays. The contract, step
by step: docs/durability.md.

Log: what happens while the guest runs goes to stderr, one timestamped line each with
its level, naming the disk it is about. RUST_LOG filters it (default: info; e.g.
RUST_LOG=warn).";

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOut {
    Stdio,
    File(PathBuf),
    None,
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOpt {
    pub id: String,
    pub path: PathBuf,
    pub direct: bool,
    pub config: DiskConfig,
    /// `x-host=simulated:MODEL`: a simulated host page cache over the image.
    pub simulated: Option<HostModel>,
    /// `hang-timeout=N`: past it, an outstanding host call pauses the guest.
    pub hang_timeout: Option<std::time::Duration>,
    /// `x-direct-align=N`: O_DIRECT's alignment, instead of what the host says.
    pub direct_align: Option<u64>,
    /// `x-strategy=S`: how the disk handles host errors (holdfast, or another
    /// device's way, for `holdfast lab`'s comparisons).
    pub strategy: Strategy,
    /// `faults=FILE`: a fault plan armed before the guest boots.
    pub faults: Option<holdfast_block::FaultPlan>,
    /// `write-log=FILE`: the dm-log-writes log of what the guest was told is done.
    pub write_log: Option<PathBuf>,
}

/// A parsed `holdfast run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOpts {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub mem: u64,
    pub disks: Vec<DiskOpt>,
    pub serial: SerialOut,
    pub qmp: Option<PathBuf>,
    /// `--boot-timeout`: how long the kernel has to start the guest's init.
    pub boot_timeout: Option<std::time::Duration>,
    /// `--name`.
    pub name: Option<String>,
}

/// `holdfast run ARGS`: the options checked, or `None` for `--help`; an error says
/// what is wrong in one line.
pub fn parse_run(args: &[String]) -> Result<Option<RunOpts>, String> {
    /// `holdfast run` alone.
    #[derive(Parser)]
    #[command(name = "holdfast run")]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }
    let argv = std::iter::once("holdfast run".to_owned()).chain(args.iter().cloned());
    match Run::try_parse_from(argv).map_err(CliExit::from_clap) {
        Ok(run) => run.args.check().map(Some),
        Err(CliExit { ok: true, .. }) => Ok(None),
        Err(CliExit { text, .. }) => Err(text.trim_end().trim_start_matches("error: ").to_owned()),
    }
}

impl RunArgs {
    /// The options checked, each error naming its option.
    pub fn check(self) -> Result<RunOpts, String> {
        let kernel = self
            .kernel
            .ok_or("--kernel is required (see holdfast run --help)")?;
        let kernel = existing("--kernel", &kernel)?;
        let initrd = self.initrd.map(|p| existing("--initrd", &p)).transpose()?;
        let cpus = match self.cpus {
            None => 1,
            Some(v) => v
                .parse::<u8>()
                .ok()
                .filter(|n| (1..=254).contains(n))
                .ok_or(format!("--cpus: `{v}` is not a number from 1 to 254"))?,
        };
        let mem = match self.mem {
            None => DEFAULT_MEM,
            Some(v) => {
                let mem = parse_size(&v).map_err(|e| format!("--mem: {e}"))?;
                if !(MIN_MEM..=MAX_MEM).contains(&mem) {
                    return Err(format!("--mem: {v} is outside 64M..1T"));
                }
                if mem % 4096 != 0 {
                    return Err(format!("--mem: {v} is not a multiple of 4K"));
                }
                mem
            }
        };
        let mut disks = Vec::new();
        if self.disks.len() > crate::layout::MAX_DISKS {
            return Err(format!(
                "--disk: at most {} disks (one interrupt line each), not {}",
                crate::layout::MAX_DISKS,
                self.disks.len()
            ));
        }
        for spec in &self.disks {
            let d = parse_disk(spec, disks.len()).map_err(|e| format!("--disk: {e}"))?;
            if disks.iter().any(|o: &DiskOpt| o.id == d.id) {
                return Err(format!("--disk: id `{}` is used twice", d.id));
            }
            disks.push(d);
        }
        let serial = match self.serial.as_deref() {
            None | Some("stdio") => SerialOut::Stdio,
            Some("none") => SerialOut::None,
            Some(s) if s.starts_with("file:") && s.len() > 5 => {
                SerialOut::File(PathBuf::from(&s[5..]))
            }
            Some(v) => return Err(format!("--serial: `{v}` is not stdio, file:PATH or none")),
        };
        let boot_timeout = match self.boot_timeout {
            None => None,
            Some(v) => match v.trim_end_matches('s').parse::<u64>() {
                Ok(n) if (1..=86_400).contains(&n) => Some(std::time::Duration::from_secs(n)),
                _ => {
                    return Err(format!(
                        "--boot-timeout: `{v}` is not a number of seconds from 1 to 86400"
                    ))
                }
            },
        };
        if let Some(n) = &self.name {
            if n.is_empty() || n.len() > 255 || n.chars().any(char::is_control) {
                return Err(format!(
                    "--name: `{}` is not a name (1 to 255 characters, no control characters)",
                    n.escape_debug()
                ));
            }
        }
        Ok(RunOpts {
            name: self.name,
            boot_timeout,
            kernel,
            initrd,
            cmdline: self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into()),
            cpus,
            mem,
            disks,
            serial,
            qmp: self.qmp.map(PathBuf::from),
        })
    }
}

fn existing(name: &str, path: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok(p),
        Ok(_) => Err(format!("{name}: {path} is not a file")),
        Err(e) => Err(format!("{name}: {path}: {e}")),
    }
}

/// A disk's image: a regular file or a block device (a dm device, a partition, a
/// loop device).
fn image(path: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::FileTypeExt;
    let p = PathBuf::from(path);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => Ok(p),
        Ok(_) => Err(format!(
            "path: {path} is neither a regular file nor a block device"
        )),
        Err(e) => Err(format!("path: {path}: {e}")),
    }
}

/// `512`, `64K`, `512M`, `2G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (like 512M or 2G)"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or(format!("`{s}` is too large"))
}

fn policy(key: &str, v: &str) -> Result<ErrorPolicy, String> {
    v.parse().map_err(|e| format!("{key}: {e}"))
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}: `{v}` is not on or off")),
    }
}

pub fn parse_disk(spec: &str, index: usize) -> Result<DiskOpt, String> {
    let mut path = None;
    let mut id = format!("disk{index}");
    let mut direct = false;
    let mut config = DiskConfig::default();
    let mut simulated = None;
    let mut strategy = Strategy::Holdfast;
    let mut faults = None;
    let mut hang_timeout = None;
    let mut direct_align = None;
    let mut write_log = None;
    for part in spec.split(',') {
        let (key, v) = part
            .split_once('=')
            .ok_or(format!("`{part}` is not key=value"))?;
        match key {
            // QEMU's spelling too.
            "path" | "file" => path = Some(image(v)?),
            "format" if v == "raw" => {}
            "format" => {
                return Err(format!(
                    "format: `{v}` is not supported: holdfast reads and writes raw images and \
                     block devices only (convert with qemu-img convert -O raw)"
                ))
            }
            "faults" => {
                let plan = holdfast_block::FaultPlan::load(std::path::Path::new(v))
                    .map_err(|e| format!("faults: {}", crate::error_chain(&e)))?;
                faults = Some(plan);
            }
            "id" if !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                id = v.into()
            }
            "id" => return Err(format!("id: `{v}` must be letters, digits, - or _")),
            "readonly" => config.read_only = on_off(key, v)?,
            "cache" => match v {
                "writeback" => (config.writeback, direct) = (true, false),
                "writethrough" => (config.writeback, direct) = (false, false),
                "none" => (config.writeback, direct) = (true, true),
                _ => {
                    return Err(format!(
                        "cache: `{v}` is not writeback, writethrough or none"
                    ))
                }
            },
            "werror" => config.werror = policy(key, v)?,
            "rerror" => config.rerror = policy(key, v)?,
            "unflushed-limit" => {
                let limit = parse_size(v).map_err(|e| format!("unflushed-limit: {e}"))?;
                if limit < holdfast_block::disk::MAX_REQUEST_BYTES {
                    return Err(format!(
                        "unflushed-limit: `{v}` is less than the longest request the disk \
                         takes (32M): the bound must hold each request"
                    ));
                }
                config.unflushed_limit = limit;
            }
            "serial" => config.serial = v.into(),
            "extra-flush" => config.keep_extra_flush = on_off(key, v)?,
            "hang-timeout" => hang_timeout = Some(seconds(key, v)?),
            "write-log" if !v.is_empty() => write_log = Some(PathBuf::from(v)),
            "write-log" => return Err("write-log: name a file".into()),
            "x-direct-align" => {
                let n = parse_size(v).map_err(|e| format!("x-direct-align: {e}"))?;
                if !n.is_power_of_two() || !(512..=65536).contains(&n) {
                    return Err(format!(
                        "x-direct-align: `{v}` is not a power of two from 512 to 65536"
                    ));
                }
                direct_align = Some(n);
            }
            "x-host" => {
                let model = v.strip_prefix("simulated:").ok_or(format!(
                    "x-host: `{v}` is not simulated:MODEL ({})",
                    HostModel::names()
                ))?;
                simulated = Some(model.parse().map_err(|e| format!("x-host: {e}"))?);
            }
            "x-strategy" => {
                strategy = v.parse().map_err(|e| format!("x-strategy: {e}"))?;
            }
            _ => return Err(format!("unknown key `{key}`")),
        }
    }
    let path = path.ok_or("path=IMG is required (or file=IMG)")?;
    if config.serial.is_empty() {
        config.serial = id.clone();
    }
    if simulated.is_some() && direct {
        return Err("x-host=simulated:... has its own page cache: not with cache=none".into());
    }
    if direct_align.is_some() && !direct {
        return Err("x-direct-align: only with cache=none (O_DIRECT)".into());
    }
    Ok(DiskOpt {
        id,
        path,
        direct,
        config,
        simulated,
        hang_timeout,
        direct_align,
        strategy,
        faults,
        write_log,
    })
}

/// Whole seconds, `30` or `30s`, from 1 to a day.
fn seconds(key: &str, v: &str) -> Result<std::time::Duration, String> {
    let n: u64 = v
        .strip_suffix('s')
        .unwrap_or(v)
        .parse()
        .map_err(|_| format!("{key}: `{v}` is not a number of seconds (e.g. 30 or 30s)"))?;
    if !(1..=86_400).contains(&n) {
        return Err(format!("{key}: `{v}`: from 1 to 86400 seconds"));
    }
    Ok(std::time::Duration::from_secs(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    fn file() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").expect("write");
        (dir, p.to_str().expect("utf-8").to_string())
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999T")
            .expect_err("overflow")
            .contains("too large"));
    }

    #[test]
    fn at_most_as_many_disks_as_interrupt_lines_and_names_checked() {
        let (_d, f) = file();
        let mut a = args(&["--kernel", &f]);
        for i in 0..=crate::layout::MAX_DISKS {
            a.push("--disk".into());
            a.push(format!("path={f},id=d{i}"));
        }
        let e = parse_run(&a).expect_err("too many");
        assert!(e.contains("at most 18 disks"), "{e}");
        a.truncate(2 + 2 * crate::layout::MAX_DISKS);
        assert!(parse_run(&a).is_ok());
        let e = parse_run(&args(&["--kernel", &f, "--name", ""])).expect_err("empty");
        assert!(e.starts_with("--name: "), "{e}");
        let ok = parse_run(&args(&["--kernel", &f, "--name", "vm-1"]))
            .expect("valid")
            .expect("not help");
        assert_eq!(ok.name.as_deref(), Some("vm-1"));
    }

    #[test]
    fn hang_timeout_is_whole_seconds() {
        let (_d, f) = file();
        for (v, want) in [("30", 30), ("30s", 30), ("1", 1)] {
            let d = parse_disk(&format!("path={f},hang-timeout={v}"), 0).expect("valid");
            assert_eq!(
                d.hang_timeout,
                Some(std::time::Duration::from_secs(want)),
                "{v}"
            );
        }
        assert_eq!(
            parse_disk(&format!("path={f}"), 0)
                .expect("valid")
                .hang_timeout,
            None
        );
        for bad in ["0", "30ms", "-1", "1.5", "", "86401"] {
            let e = parse_disk(&format!("path={f},hang-timeout={bad}"), 0).expect_err(bad);
            assert!(e.starts_with("hang-timeout: "), "{e}");
        }
    }

    #[test]
    fn a_full_command_line() {
        let (_d, f) = file();
        let disk =
            format!("path={f},id=data,cache=none,werror=enospc,rerror=report,unflushed-limit=32M,extra-flush=on");
        let o = parse_run(&args(&[
            "--kernel",
            &f,
            "--initrd",
            &f,
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "2",
            "--mem=1G",
            "--disk",
            &disk,
            "--disk",
            &format!("path={f},readonly=on"),
            "--serial",
            "file:/tmp/x",
        ]))
        .expect("valid")
        .expect("not help");
        assert_eq!(
            (o.cpus, o.mem, o.cmdline.as_str()),
            (2, 1 << 30, "console=ttyS0 quiet")
        );
        assert_eq!(o.disks[0].id, "data");
        assert!(o.disks[0].direct && o.disks[0].config.writeback);
        assert_eq!(o.disks[0].config.werror, ErrorPolicy::Enospc);
        assert_eq!(o.disks[0].config.unflushed_limit, 32 << 20);
        assert!(o.disks[0].config.keep_extra_flush);
        assert_eq!(o.disks[1].id, "disk1");
        assert!(!o.disks[1].config.keep_extra_flush);
        assert!(o.disks[1].config.read_only);
        assert_eq!(o.serial, SerialOut::File("/tmp/x".into()));
    }

    #[test]
    fn a_disk_is_a_file_or_a_block_device() {
        let e = parse_disk("path=/dev/null", 0).expect_err("a character device");
        assert_eq!(
            e,
            "path: /dev/null is neither a regular file nor a block device"
        );
        let e = parse_disk("path=/nonexistent/disk.img", 0).expect_err("missing");
        assert!(e.starts_with("path: /nonexistent/disk.img: "), "{e}");
        // Any block device this machine has (a loop device's node is there even
        // unattached).
        let block = std::fs::read_dir("/dev")
            .expect("/dev")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                use std::os::unix::fs::FileTypeExt;
                std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
            })
            .expect("a block device in /dev");
        let d = parse_disk(&format!("path={}", block.display()), 0).expect("a block device");
        assert_eq!(d.path, block);
    }

    #[test]
    fn lab_disk_options() {
        let (_d, f) = file();
        let d = parse_disk(
            &format!("path={f},x-host=simulated:ext4-data,x-strategy=sticky"),
            0,
        )
        .expect("valid");
        assert_eq!(d.simulated, Some(HostModel::Ext4Data));
        assert_eq!(d.strategy, Strategy::Sticky);
        for (spec, want) in [
            ("x-host=xfs", "simulated:MODEL"),
            ("x-host=simulated:zfs", "zfs"),
            ("x-strategy=qemu", "x-strategy"),
            ("x-host=simulated:xfs,cache=none", "not with cache=none"),
        ] {
            let e = parse_disk(&format!("path={f},{spec}"), 0).expect_err(spec);
            assert!(e.contains(want), "{spec}: {e}");
        }
    }

    #[test]
    fn errors_name_the_option() {
        let (_d, f) = file();
        let cases: &[(&[&str], &str)] = &[
            (&[], "--kernel is required"),
            (&["--kernel", "/nonexistent"], "--kernel: /nonexistent"),
            (&["--kernel", &f, "--cpus", "0"], "--cpus"),
            (&["--kernel", &f, "--mem", "1M"], "--mem"),
            (&["--kernel", &f, "--mem", "lots"], "--mem"),
            (
                &["--kernel", &f, "--disk", "id=x"],
                "--disk: path=IMG is required",
            ),
            (
                &["--kernel", &f, "--disk", "path=/nope"],
                "--disk: path: /nope",
            ),
            (
                &[
                    "--kernel",
                    &f,
                    "--disk",
                    &format!("path={f},cache=sometimes"),
                ],
                "--disk: cache",
            ),
            (
                &["--kernel", &f, "--disk", &format!("path={f},werror=panic")],
                "--disk: werror",
            ),
            (
                &["--kernel", &f, "--disk", &format!("path={f},colour=red")],
                "--disk: unknown key `colour`",
            ),
            (
                &[
                    "--kernel",
                    &f,
                    "--disk",
                    &format!("path={f},unflushed-limit=16M"),
                ],
                "--disk: unflushed-limit: `16M` is less than the longest request",
            ),
            (
                &[
                    "--kernel",
                    &f,
                    "--disk",
                    &format!("path={f},id=a"),
                    "--disk",
                    &format!("path={f},id=a"),
                ],
                "twice",
            ),
            (&["--kernel", &f, "--serial", "tcp:1"], "--serial"),
            (&["--kernel", &f, "--qmp"], "--qmp needs a value"),
            (
                &["--kernel", &f, "--frobnicate"],
                "unknown option `--frobnicate`",
            ),
            (&["--kernel"], "--kernel needs a value"),
        ];
        for (a, want) in cases {
            let e = parse_run(&args(a)).expect_err("invalid");
            assert!(e.contains(want), "{a:?}: {e}");
        }
        assert_eq!(parse_run(&args(&["--help"])), Ok(None));
    }
}
