//! Scenario files: the JSON a user writes ([`ScenarioFile`], parsed strictly: unknown
//! keys and wrong types are errors naming the field) and the [`Plan`] checked from it
//! before anything boots. `holdfast lab --help` documents the format
//! ([`super::FORMAT_HELP`]); images/lab/ has examples.

use std::path::{Path, PathBuf};
use std::time::Duration;

use holdfast_block::sim::matrix::Outage;
pub use holdfast_block::sim::powercut::CutMode;
use holdfast_block::sim::strategy::Strategy;
use holdfast_block::sim::HostModel;
use serde::Deserialize;

use crate::cli::parse_size;

/// A scenario or plan error: the field it is about (`outages[1].when.at`), and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// A duration a scenario gives that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is negative")]
    Negative(String),
    #[error("`{0}` is not a duration (like 500ms, 5s or 2m)")]
    NotOne(String),
    #[error("`{0}` is too long")]
    TooLong(String),
}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        message: message.into(),
    })
}

// ---- The file, as written -------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub name: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub guest: GuestFile,
    pub progress: Option<ProgressFile>,
    pub outages: Vec<OutageFile>,
    #[serde(default)]
    pub operator: OperatorFile,
    pub verify: Option<VerifyFile>,
    pub hosts: Vec<String>,
    pub strategies: Vec<String>,
    /// Longest one run may take (a real guest's boot, workload, outage and check).
    pub timeout: Option<String>,
    /// holdfast's `hang-timeout` on every disk (whole seconds; none by default).
    pub hang_timeout: Option<String>,
}

fn default_seed() -> u64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestFile {
    pub synthetic: Option<SyntheticFile>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub memory: Option<String>,
    pub cpus: Option<u8>,
    #[serde(default)]
    pub disks: Vec<DiskFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticFile {
    pub rounds: Option<usize>,
    pub writes_per_round: Option<usize>,
    pub disk_size: Option<String>,
    pub request_time: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFile {
    pub id: String,
    pub image: PathBuf,
    /// The guest sees the disk read-only (`readonly=on`): the lab boots every run and
    /// crash state on the image itself, not on a copy, and logs nothing of it.
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressFile {
    pub ready: String,
    pub ack: String,
    pub error: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutageFile {
    pub kind: String,
    /// (power-cut from a run's write logs: none)
    pub when: Option<WhenFile>,
    pub lasts: Option<String>,
    pub disk: Option<String>,
    /// (power-cut) which crash states: none, all, prefix, subset, torn
    pub modes: Option<Vec<String>>,
    /// (power-cut) the folder of an earlier power-cut run: its write logs and
    /// acknowledged units, instead of booting the first run again
    pub from_run: Option<String>,
    /// (power-cut) the application is configured unsafely: some crash state must
    /// lose, or the run fails
    #[serde(default)]
    pub control: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhenFile {
    pub at: Option<String>,
    pub line: Option<String>,
    pub nth: Option<u32>,
    pub nth_between: Option<[u32; 2]>,
    /// (with `line`) how long after that line the outage starts
    pub after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorFile {
    pub cont_after: Option<String>,
    pub tries: Option<usize>,
    #[serde(default)]
    pub detach: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyFile {
    pub boot: Option<VerifyBootFile>,
    pub host: Option<VerifyHostFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyBootFile {
    pub cmdline: String,
    pub ok: String,
    pub have: String,
    pub corrupt: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyHostFile {
    pub command: Vec<String>,
    pub have: String,
    pub corrupt: Option<String>,
}

// ---- The plan, checked ----------------------------------------------------------

/// A checked scenario: every path exists, every name is known, every combination
/// can run here.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub name: String,
    pub seed: u64,
    pub guest: Guest,
    pub progress: Option<Progress>,
    pub outages: Vec<OutagePlan>,
    pub operator: Operator,
    pub verify: Verify,
    pub hosts: Vec<Host>,
    pub strategies: Vec<LabStrategy>,
    pub timeout: Duration,
    /// holdfast's `hang-timeout` on every disk.
    pub hang_timeout: Option<Duration>,
    /// Crash states per power cut (`--runs`).
    pub crash_states: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Guest {
    Synthetic(SyntheticGuest),
    Linux(LinuxGuest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticGuest {
    pub rounds: usize,
    pub writes_per_round: usize,
    pub disk_size: u64,
    pub request_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxGuest {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    pub cpus: u8,
    pub disks: Vec<(String, PathBuf)>,
    /// The ids of the disks the guest sees read-only (`guest.disks[].readonly`).
    pub read_only: Vec<String>,
}

impl LinuxGuest {
    /// Whether the guest sees disk `id` read-only.
    pub fn is_read_only(&self, id: &str) -> bool {
        self.read_only.iter().any(|r| r == id)
    }

    /// The disk an outage hits when it names none: the first the guest writes
    /// (scenario checking refuses a guest whose disks are all read-only).
    pub fn first_writable(&self) -> &str {
        self.disks
            .iter()
            .map(|(id, _)| id.as_str())
            .find(|id| !self.is_read_only(id))
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub ready: String,
    pub ack: String,
    /// The prefix of lines that report an error the application saw.
    pub error: Option<String>,
}

/// What breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutageKind {
    FlushEio,
    WriteEio,
    WriteEnospc,
    FlushEnospc,
    WritebackEio,
    RepeatInReplay,
    Hang,
    FsDown,
    PowerCut,
}

impl OutageKind {
    const ALL: [OutageKind; 9] = [
        OutageKind::FlushEio,
        OutageKind::WriteEio,
        OutageKind::WriteEnospc,
        OutageKind::FlushEnospc,
        OutageKind::WritebackEio,
        OutageKind::RepeatInReplay,
        OutageKind::Hang,
        OutageKind::FsDown,
        OutageKind::PowerCut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutageKind::FlushEio => "flush-eio",
            OutageKind::WriteEio => "write-eio",
            OutageKind::WriteEnospc => "write-enospc",
            OutageKind::FlushEnospc => "flush-enospc",
            OutageKind::WritebackEio => "writeback-eio",
            OutageKind::RepeatInReplay => "repeat-in-replay",
            OutageKind::Hang => "hang",
            OutageKind::FsDown => "fs-down",
            OutageKind::PowerCut => "power-cut",
        }
    }

    /// The synthetic workload's outage of this kind, if it has one.
    pub fn synthetic(self) -> Option<Outage> {
        Some(match self {
            OutageKind::FlushEio => Outage::FlushEio,
            OutageKind::WriteEio => Outage::WriteEio,
            OutageKind::WriteEnospc => Outage::WriteEnospc,
            OutageKind::FlushEnospc => Outage::FlushEnospc,
            OutageKind::WritebackEio => Outage::WritebackEio,
            OutageKind::RepeatInReplay => Outage::RepeatDuringReplay,
            OutageKind::Hang | OutageKind::FsDown | OutageKind::PowerCut => return None,
        })
    }
}

/// When an outage starts, counted from the guest's ready marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    At(Duration),
    /// `after` past the `nth` console line (from 1) after the ready marker that
    /// contains `text`.
    Line {
        text: String,
        nth: u32,
        after: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutagePlan {
    pub kind: OutageKind,
    pub when: When,
    /// How long the storage stays broken; `None`: until the operator's first `cont`
    /// has been refused (the synthetic guest's rule), or for ever (a power cut).
    pub lasts: Option<Duration>,
    pub disk: Option<String>,
    /// A power cut's crash states.
    pub cut: Option<CutPlan>,
}

/// What a power cut explores (`holdfast lab --runs N --seed S`: N states, the i-th
/// with seed S + i and mode `modes[i % len]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutPlan {
    pub modes: Vec<CutMode>,
    /// An earlier power-cut run's folder (its `DISK.wlog` files and `acked.txt`).
    pub from_run: Option<PathBuf>,
    /// The application is configured unsafely: some state must lose.
    pub control: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub cont_after: Duration,
    pub tries: usize,
    pub detach: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// The synthetic guest's oracle.
    Oracle,
    Boot(VerifyBootFile),
    Host {
        command: Vec<String>,
        have: String,
        corrupt: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    Simulated(HostModel),
    Real,
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Simulated(m) => write!(f, "simulated:{m}"),
            Host::Real => f.write_str("real"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabStrategy {
    /// Run by holdfast's engine or its QEMU-like models.
    Engine(Strategy),
    /// QEMU 10 itself, `werror=stop`, default cache or `cache=none`.
    Qemu { cache_none: bool },
}

impl LabStrategy {
    pub fn promises_no_loss(self) -> bool {
        matches!(self, LabStrategy::Engine(s) if s.promises_no_loss())
    }
}

impl std::fmt::Display for LabStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabStrategy::Engine(s) => write!(f, "{s}"),
            LabStrategy::Qemu { cache_none: false } => f.write_str("qemu"),
            LabStrategy::Qemu { cache_none: true } => f.write_str("qemu-cache-none"),
        }
    }
}

/// A seed's well-mixed number (splitmix64's finaliser).
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `500ms`, `5s`, `2m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let (digits, unit_ms) = if let Some(d) = s.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = s.strip_suffix('m') {
        (d, 60_000)
    } else {
        (s, 1000)
    };
    if digits.starts_with('-') {
        return Err(DurationError::Negative(s.to_owned()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| DurationError::NotOne(s.to_owned()))?;
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| DurationError::TooLong(s.to_owned()))
}

/// Parses and checks a scenario file; relative paths in it are relative to its
/// folder.
pub fn load(path: &Path) -> Result<Plan, FieldError> {
    load_only(path, &[], &[])
}

/// As [`load`], keeping only the named hosts and strategies (all if none is named);
/// naming one the file does not list is an error.
pub fn load_only(path: &Path, hosts: &[String], strategies: &[String]) -> Result<Plan, FieldError> {
    let text = std::fs::read_to_string(path).map_err(|e| FieldError {
        field: String::new(),
        message: format!("{}: {e}", path.display()),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut file = parse(&text)?;
    for (wanted, listed, what) in [
        (hosts, &mut file.hosts, "hosts"),
        (strategies, &mut file.strategies, "strategies"),
    ] {
        if wanted.is_empty() {
            continue;
        }
        if let Some(w) = wanted.iter().find(|w| !listed.contains(w)) {
            return err(
                what,
                format!(
                    "--{}: `{w}` is not one of the scenario's ({})",
                    &what[..what.len() - 1].replace("strategie", "strategy"),
                    listed.join(", ")
                ),
            );
        }
        listed.retain(|l| wanted.contains(l));
    }
    check(file, base)
}

/// Parses the JSON strictly; errors name the field.
pub fn parse(text: &str) -> Result<ScenarioFile, FieldError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("not valid JSON: {inner}")
        } else {
            inner.to_string()
        };
        FieldError {
            field: if field == "." { String::new() } else { field },
            message,
        }
    })
}

fn existing_file(field: &str, base: &Path, p: &Path) -> Result<PathBuf, FieldError> {
    let full = base.join(p);
    match std::fs::metadata(&full) {
        Ok(m) if m.is_file() => Ok(full),
        Ok(_) => err(field, format!("{} is not a file", full.display())),
        Err(e) => err(field, format!("{}: {e}", full.display())),
    }
}

fn duration(field: &str, s: &str) -> Result<Duration, FieldError> {
    parse_duration(s).or_else(|m| err(field, m.to_string()))
}

/// Whether `program` can be run: a path to an executable file, or a name on PATH.
fn runnable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        return executable(Path::new(program));
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| executable(&d.join(program))))
        .unwrap_or(false)
}

/// Checks everything that can be checked before a guest boots.
pub fn check(f: ScenarioFile, base: &Path) -> Result<Plan, FieldError> {
    check_name(&f.name)?;
    let guest = check_guest(&f.guest, base)?;
    let progress = check_progress(f.progress.as_ref(), &guest)?;
    let outages = check_outages(&f, &guest, progress.as_ref(), base)?;
    let operator = check_operator(&f.operator, &guest)?;
    let verify = check_verify(f.verify.as_ref(), &guest, base)?;
    let hosts = check_hosts(&f.hosts, &guest, &outages)?;
    let strategies = check_strategies(&f.strategies, &guest, &hosts)?;
    if let (Some(i), Some(j)) = (
        outages.iter().position(|o| o.kind == OutageKind::PowerCut),
        strategies
            .iter()
            .position(|s| matches!(s, LabStrategy::Qemu { .. })),
    ) {
        return err(
            format!("strategies[{j}]"),
            format!(
                "outages[{i}] is a power cut, whose crash states come from holdfast's write \
                 log (write-log=FILE): {} cannot keep one",
                strategies[j]
            ),
        );
    }
    let timeout = match &f.timeout {
        Some(t) => duration("timeout", t)?,
        None => Duration::from_secs(600),
    };
    let hang_timeout = check_hang_timeout(f.hang_timeout.as_deref(), &guest)?;
    Ok(Plan {
        name: f.name,
        seed: f.seed,
        guest,
        progress,
        outages,
        operator,
        verify,
        hosts,
        strategies,
        timeout,
        hang_timeout,
        crash_states: DEFAULT_CRASH_STATES,
    })
}

/// Crash states per power cut unless `--runs` says otherwise.
pub const DEFAULT_CRASH_STATES: usize = 10;

/// holdfast's hang-timeout: whole seconds, for a Linux guest (the synthetic guest's
/// host never hangs).
fn check_hang_timeout(t: Option<&str>, guest: &Guest) -> Result<Option<Duration>, FieldError> {
    let Some(t) = t else {
        return Ok(None);
    };
    if matches!(guest, Guest::Synthetic(_)) {
        return err(
            "hang_timeout",
            "the synthetic guest's host never hangs; remove this",
        );
    }
    let d = duration("hang_timeout", t)?;
    if d.subsec_nanos() != 0 || d.is_zero() {
        return err("hang_timeout", format!("`{t}`: whole seconds, at least 1s"));
    }
    Ok(Some(d))
}

/// The name names the results folder.
fn check_name(name: &str) -> Result<(), FieldError> {
    let fine = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if name.trim().is_empty() || !name.chars().all(fine) {
        return err(
            "name",
            format!("`{name}`: use letters, digits, `-`, `_` or `.` (it names the results folder)"),
        );
    }
    Ok(())
}

/// How a Linux guest says it is ready and acknowledges a unit; the synthetic guest
/// says it itself.
fn check_progress(p: Option<&ProgressFile>, guest: &Guest) -> Result<Option<Progress>, FieldError> {
    let synthetic = matches!(guest, Guest::Synthetic(_));
    match (p, synthetic) {
        (Some(_), true) => err(
            "progress",
            "the synthetic guest reports its own progress (`ready`, `round N`, acks by its flushes); remove this",
        ),
        (None, false) => err("progress", "missing: say how the guest reports progress (`ready` and `ack`)"),
        (None, true) => Ok(None),
        (Some(p), false) => {
            if p.ready.is_empty() {
                return err("progress.ready", "empty: the line the guest prints when its workload is ready");
            }
            if p.ack.is_empty() {
                return err("progress.ack", "empty: the prefix of the line the guest prints per acknowledged unit");
            }
            Ok(Some(Progress {
                ready: p.ready.clone(),
                ack: p.ack.clone(),
                error: p.error.clone().filter(|e| !e.is_empty()),
            }))
        }
    }
}

/// Every outage: its kind, when it starts, how long it lasts, which disk.
fn check_outages(
    f: &ScenarioFile,
    guest: &Guest,
    progress: Option<&Progress>,
    base: &Path,
) -> Result<Vec<OutagePlan>, FieldError> {
    if f.outages.is_empty() {
        return err("outages", "empty: name at least one outage");
    }
    f.outages
        .iter()
        .enumerate()
        .map(|(i, o)| check_outage(f, i, o, guest, progress, base))
        .collect()
}

/// The `i`-th outage.
fn check_outage(
    f: &ScenarioFile,
    i: usize,
    o: &OutageFile,
    guest: &Guest,
    progress: Option<&Progress>,
    base: &Path,
) -> Result<OutagePlan, FieldError> {
    let synthetic = matches!(guest, Guest::Synthetic(_));
    let at = |k: &str| format!("outages[{i}].{k}");
    let kind = check_outage_kind(f, &at("kind"), &o.kind, synthetic)?;
    let cut = check_cut(i, o, kind, base)?;
    let from_run = cut.as_ref().is_some_and(|c| c.from_run.is_some());
    let when = match &o.when {
        Some(_) if from_run => {
            return err(
                at("when"),
                "the power cut of `from_run` has happened: remove this",
            )
        }
        // Never used: the run's logs say where the power went.
        None if from_run => When::At(Duration::ZERO),
        None => {
            return err(
                at("when"),
                "missing: `at` (a time) or `line` (a console line)",
            )
        }
        Some(w) => check_when(f, i, w, guest, progress)?,
    };
    let lasts = match &o.lasts {
        None if kind == OutageKind::PowerCut => None,
        Some(_) if kind == OutageKind::PowerCut => {
            return err(at("lasts"), "a power cut does not end: remove this")
        }
        None if synthetic => None,
        None => return err(at("lasts"), "missing: how long the storage stays broken (like 10s)"),
        Some(_) if synthetic => return err(at("lasts"), "the synthetic guest's outage ends after the operator's first `cont` is refused; remove this"),
        Some(l) => Some(duration(&at("lasts"), l)?),
    };
    let disk_ids: Vec<&str> = f.guest.disks.iter().map(|d| d.id.as_str()).collect();
    let disk = match &o.disk {
        None => None,
        Some(_) if kind == OutageKind::PowerCut => {
            return err(at("disk"), "a power cut takes every disk: remove this")
        }
        Some(_) if synthetic => {
            return err(at("disk"), "the synthetic guest has one disk; remove this")
        }
        Some(d) if !disk_ids.contains(&d.as_str()) => {
            return err(
                at("disk"),
                format!("no disk `{d}` in guest.disks ({})", disk_ids.join(", ")),
            )
        }
        Some(d) if f.guest.disks.iter().any(|g| g.id == *d && g.readonly) => {
            return err(
                at("disk"),
                format!("disk `{d}` is read-only (guest.disks[].readonly): the outage needs one the guest writes"),
            )
        }
        Some(d) => Some(d.clone()),
    };
    Ok(OutagePlan {
        kind,
        when,
        lasts,
        disk,
        cut,
    })
}

/// A power cut's modes, earlier run and control flag; other outages have none.
fn check_cut(
    i: usize,
    o: &OutageFile,
    kind: OutageKind,
    base: &Path,
) -> Result<Option<CutPlan>, FieldError> {
    let at = |k: &str| format!("outages[{i}].{k}");
    if kind != OutageKind::PowerCut {
        for (set, key) in [
            (o.modes.is_some(), "modes"),
            (o.from_run.is_some(), "from_run"),
            (o.control, "control"),
        ] {
            if set {
                return err(
                    at(key),
                    format!("goes with `power-cut`, not `{}`", kind.as_str()),
                );
            }
        }
        return Ok(None);
    }
    let modes = match &o.modes {
        None => CutMode::ALL.to_vec(),
        Some(m) if m.is_empty() => {
            return err(
                at("modes"),
                format!("empty: name at least one ({})", CutMode::names()),
            )
        }
        Some(m) => m
            .iter()
            .enumerate()
            .map(|(j, name)| {
                name.parse()
                    .or_else(|e| err(format!("outages[{i}].modes[{j}]"), e))
            })
            .collect::<Result<_, _>>()?,
    };
    let from_run = match &o.from_run {
        None => None,
        Some(dir) => {
            let dir = base.join(dir);
            if !dir.join("acked.txt").is_file() {
                return err(
                    at("from_run"),
                    format!(
                        "{}: not an earlier power-cut run's folder (no acked.txt)",
                        dir.display()
                    ),
                );
            }
            Some(dir)
        }
    };
    Ok(Some(CutPlan {
        modes,
        from_run,
        control: o.control,
    }))
}

/// An outage's kind, and whether this guest and these hosts can have it.
fn check_outage_kind(
    f: &ScenarioFile,
    field: &str,
    name: &str,
    synthetic: bool,
) -> Result<OutageKind, FieldError> {
    let kind = OutageKind::ALL
        .into_iter()
        .find(|k| k.as_str() == name)
        .ok_or_else(|| FieldError {
            field: field.to_owned(),
            message: format!(
                "unknown outage `{name}` (expected one of {})",
                OutageKind::ALL.map(OutageKind::as_str).join(", ")
            ),
        })?;
    if synthetic && kind.synthetic().is_none() {
        return err(field, format!("`{name}` needs a real guest; the synthetic guest's outages are flush-eio, write-eio, write-enospc, flush-enospc, writeback-eio and repeat-in-replay"));
    }
    if !synthetic && matches!(kind, OutageKind::WritebackEio | OutageKind::RepeatInReplay) {
        return err(field, format!("`{name}` is the synthetic guest's only"));
    }
    if kind == OutageKind::FsDown && f.hosts.iter().any(|h| h != "real") {
        return err(
            field,
            "`fs-down` needs a host file system to take down: hosts must be [\"real\"] only",
        );
    }
    Ok(kind)
}

/// When the `i`-th outage starts: a time, or the nth console line with a text,
/// after the ready marker.
fn check_when(
    f: &ScenarioFile,
    i: usize,
    w: &WhenFile,
    guest: &Guest,
    progress: Option<&Progress>,
) -> Result<When, FieldError> {
    let synthetic = matches!(guest, Guest::Synthetic(_));
    let at = |k: &str| format!("outages[{i}].{k}");
    let when = match (&w.at, &w.line) {
        (Some(_), Some(_)) => return err(at("when"), "give `at` or `line`, not both"),
        (None, None) => {
            return err(
                at("when"),
                "give `at` (a time after the ready marker) or `line` (a console line after it)",
            )
        }
        (Some(t), None) => {
            if w.nth.is_some() || w.nth_between.is_some() {
                return err(at("when.nth"), "goes with `line`, not `at`");
            }
            if w.after.is_some() {
                return err(at("when.after"), "goes with `line`; `at` is a time already");
            }
            if t.trim_start().starts_with('-') {
                return err(
                    at("when.at"),
                    format!(
                        "`{t}` is before the guest is ready (times count from its ready marker)"
                    ),
                );
            }
            When::At(duration(&at("when.at"), t)?)
        }
        (None, Some(text)) => {
            if text.is_empty() {
                return err(at("when.line"), "empty");
            }
            if let Some(p) = progress {
                if p.ready.contains(text.as_str()) {
                    return err(at("when.line"), format!("`{text}` matches the ready marker `{}`: that is before the guest is ready (lines count after it)", p.ready));
                }
            }
            if synthetic && !text.starts_with("round ") {
                return err(
                    at("when.line"),
                    format!("the synthetic guest prints only `round N` lines, never `{text}`"),
                );
            }
            let nth = check_nth(f.seed, i, w)?;
            if synthetic && nth != 1 {
                return err(
                    at("when.nth"),
                    "the synthetic guest prints each `round N` once",
                );
            }
            let after = match &w.after {
                None => Duration::ZERO,
                Some(_) if synthetic => {
                    return err(
                        at("when.after"),
                        "the synthetic guest starts an outage at its round; `after` is for Linux guests",
                    )
                }
                Some(t) => duration(&at("when.after"), t)?,
            };
            When::Line {
                text: text.clone(),
                nth,
                after,
            }
        }
    };
    if let (Guest::Synthetic(s), When::Line { text, .. }) = (guest, &when) {
        let n: usize = text["round ".len()..].trim().parse().or_else(|_| {
            err(
                at("when.line"),
                format!("`{text}`: the synthetic guest's lines are `round N`"),
            )
        })?;
        if n == 0 || n > s.rounds {
            return err(
                at("when.line"),
                format!("`{text}`: the guest runs rounds 1 to {}", s.rounds),
            );
        }
    }
    Ok(when)
}

/// Which matching line starts the `i`-th outage: `nth`, or one of `nth_between`
/// chosen by the seed (the same scenario and seed meet the fault at the same line,
/// on every host and for every strategy).
fn check_nth(seed: u64, i: usize, w: &WhenFile) -> Result<u32, FieldError> {
    let at = |k: &str| format!("outages[{i}].{k}");
    match (w.nth, w.nth_between) {
        (Some(_), Some(_)) => err(at("when"), "give `nth` or `nth_between`, not both"),
        (Some(0), None) => err(at("when.nth"), "counts from 1"),
        (Some(n), None) => Ok(n),
        (None, None) => Ok(1),
        (None, Some([lo, hi])) if lo == 0 || hi < lo => {
            err(at("when.nth_between"), "[first, last], counting from 1")
        }
        (None, Some([lo, hi])) => {
            Ok(lo + (mix(seed ^ (i as u64 + 1)) % u64::from(hi - lo + 1)) as u32)
        }
    }
}

/// The operator: how often `cont`, how many times after the outage, whether to
/// detach and repair a host file system that went down.
fn check_operator(o: &OperatorFile, guest: &Guest) -> Result<Operator, FieldError> {
    let synthetic = matches!(guest, Guest::Synthetic(_));
    let operator = Operator {
        cont_after: match &o.cont_after {
            Some(s) => duration("operator.cont_after", s)?,
            None => Duration::from_secs(if synthetic { 1 } else { 2 }),
        },
        tries: match o.tries {
            Some(0) => return err("operator.tries", "at least 1"),
            Some(n) => n,
            None => 3,
        },
        detach: o.detach,
    };
    if synthetic && operator.detach {
        return err(
            "operator.detach",
            "the synthetic guest's host file system never goes down",
        );
    }
    Ok(operator)
}

/// What says what survived: a second boot or a host command (a Linux guest), the
/// oracle (the synthetic guest).
fn check_verify(v: Option<&VerifyFile>, guest: &Guest, base: &Path) -> Result<Verify, FieldError> {
    let synthetic = matches!(guest, Guest::Synthetic(_));
    let v = match (v, synthetic) {
        (None, true) => return Ok(Verify::Oracle),
        (Some(_), true) => {
            return err(
                "verify",
                "the synthetic guest is checked by its oracle; remove this",
            )
        }
        (None, false) => return err(
            "verify",
            "missing: a second boot (`boot`) or a host command (`host`) that says what survived",
        ),
        (Some(v), false) => v,
    };
    match (&v.boot, &v.host) {
        (Some(_), Some(_)) => err("verify", "give `boot` or `host`, not both"),
        (None, None) => err("verify", "give `boot` or `host`"),
        (Some(b), None) => {
            if b.ok.is_empty() || b.have.is_empty() {
                return err("verify.boot", "`ok` and `have` must not be empty");
            }
            Ok(Verify::Boot(b.clone()))
        }
        (None, Some(h)) => {
            let Some(program) = h.command.first() else {
                return err("verify.host.command", "empty");
            };
            if let Guest::Linux(g) = guest {
                if let Some(id) = g.read_only.first() {
                    return err(
                        "verify.host",
                        format!("disk `{id}` is read-only: the host command would get the scenario's own image, not a copy; check with `boot`"),
                    );
                }
            }
            let program = if program.contains('/') {
                base.join(program).to_string_lossy().into_owned()
            } else {
                program.clone()
            };
            if !runnable(&program) {
                return err(
                    "verify.host.command",
                    format!("`{program}` is not an executable file or a command on PATH"),
                );
            }
            if h.have.is_empty() {
                return err("verify.host.have", "empty");
            }
            let mut command = h.command.clone();
            command[0] = program;
            Ok(Verify::Host {
                command,
                have: h.have.clone(),
                corrupt: h.corrupt.clone(),
            })
        }
    }
}

/// The hosts: simulated models, and `real` where this machine can have it.
fn check_hosts(
    names: &[String],
    guest: &Guest,
    outages: &[OutagePlan],
) -> Result<Vec<Host>, FieldError> {
    let synthetic = matches!(guest, Guest::Synthetic(_));
    if names.is_empty() {
        return err(
            "hosts",
            "empty: name at least one (simulated:MODEL or real)",
        );
    }
    let mut hosts = Vec::new();
    for (i, h) in names.iter().enumerate() {
        let field = format!("hosts[{i}]");
        let host = if h == "real" {
            Host::Real
        } else if let Some(model) = h.strip_prefix("simulated:") {
            Host::Simulated(model.parse().or_else(|m| err(&field, m))?)
        } else {
            return err(
                &field,
                format!(
                    "`{h}`: expected simulated:MODEL ({}) or real",
                    HostModel::names()
                ),
            );
        };
        if synthetic && host == Host::Real {
            return err(&field, "the synthetic guest runs on simulated hosts only");
        }
        if host == Host::Real {
            if let Err(why) = super::realhost::preflight() {
                return err(&field, format!("`real` {why}"));
            }
            for (i, o) in outages.iter().enumerate() {
                if o.kind == OutageKind::FlushEnospc {
                    return err(
                        format!("outages[{i}].kind"),
                        "`flush-enospc` on the `real` host is not built (it needs a thin pool that runs out of space under the host file system); write-enospc fills the host file system, and simulated hosts have flush-enospc",
                    );
                }
            }
        }
        if hosts.contains(&host) {
            return err(&field, format!("`{h}` twice"));
        }
        hosts.push(host);
    }
    Ok(hosts)
}

/// The strategies: holdfast's engine and its imitations, and QEMU itself (on the
/// real host, where it is installed).
fn check_strategies(
    names: &[String],
    guest: &Guest,
    hosts: &[Host],
) -> Result<Vec<LabStrategy>, FieldError> {
    let synthetic = matches!(guest, Guest::Synthetic(_));
    let expected = format!("{}, qemu, qemu-cache-none", Strategy::names());
    if names.is_empty() {
        return err(
            "strategies",
            format!("empty: name at least one ({expected})"),
        );
    }
    let mut strategies = Vec::new();
    for (i, s) in names.iter().enumerate() {
        let field = format!("strategies[{i}]");
        let strategy = match s.as_str() {
            "qemu" => LabStrategy::Qemu { cache_none: false },
            "qemu-cache-none" => LabStrategy::Qemu { cache_none: true },
            other => LabStrategy::Engine(other.parse().or_else(|_| {
                err(
                    &field,
                    format!("unknown strategy `{other}` (expected {expected})"),
                )
            })?),
        };
        if let LabStrategy::Qemu { .. } = strategy {
            if synthetic {
                return err(&field, "QEMU runs real guests only");
            }
            if !hosts.contains(&Host::Real) {
                return err(
                    &field,
                    "QEMU runs on the `real` host only: add `real` to hosts",
                );
            }
            let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
            if !runnable(&qemu) {
                return err(&field, format!("{qemu} is not installed here"));
            }
        }
        if strategies.contains(&strategy) {
            return err(&field, format!("`{s}` twice"));
        }
        strategies.push(strategy);
    }
    Ok(strategies)
}

fn check_guest(g: &GuestFile, base: &Path) -> Result<Guest, FieldError> {
    if let Some(s) = &g.synthetic {
        for (set, key) in [
            (g.kernel.is_some(), "kernel"),
            (g.initrd.is_some(), "initrd"),
            (g.cmdline.is_some(), "cmdline"),
            (g.memory.is_some(), "memory"),
            (g.cpus.is_some(), "cpus"),
            (!g.disks.is_empty(), "disks"),
        ] {
            if set {
                return err(
                    format!("guest.{key}"),
                    "not with `synthetic` (the built-in workload is not a VM)",
                );
            }
        }
        let disk_size = match &s.disk_size {
            Some(v) => parse_size(v).or_else(|m| err("guest.synthetic.disk_size", m))?,
            None => 1 << 20,
        };
        if disk_size < 64 << 10 || disk_size % 4096 != 0 || disk_size > 1 << 30 {
            return err("guest.synthetic.disk_size", "64K to 1G, a multiple of 4K");
        }
        let rounds = s.rounds.unwrap_or(10);
        let writes_per_round = s.writes_per_round.unwrap_or(8);
        if rounds == 0 || rounds > 100_000 {
            return err("guest.synthetic.rounds", "1 to 100000");
        }
        if writes_per_round == 0 || writes_per_round > 10_000 {
            return err("guest.synthetic.writes_per_round", "1 to 10000");
        }
        let request_ms = match &s.request_time {
            Some(t) => duration("guest.synthetic.request_time", t)?.as_millis() as u64,
            None => 20,
        };
        return Ok(Guest::Synthetic(SyntheticGuest {
            rounds,
            writes_per_round,
            disk_size,
            request_ms,
        }));
    }
    let Some(kernel) = &g.kernel else {
        return err(
            "guest.kernel",
            "missing: the guest's kernel (or `synthetic` for the built-in workload)",
        );
    };
    let kernel = existing_file("guest.kernel", base, kernel)?;
    let initrd = match &g.initrd {
        Some(p) => Some(existing_file("guest.initrd", base, p)?),
        None => None,
    };
    let memory = match &g.memory {
        Some(m) => parse_size(m).or_else(|e| err("guest.memory", e))?,
        None => 512 << 20,
    };
    if memory < 64 << 20 {
        return err("guest.memory", "at least 64M");
    }
    let cpus = g.cpus.unwrap_or(1);
    if cpus == 0 || cpus > 254 {
        return err("guest.cpus", "1 to 254");
    }
    if g.disks.is_empty() {
        return err(
            "guest.disks",
            "empty: the guest needs the disk the outage hits",
        );
    }
    let mut disks: Vec<(String, PathBuf)> = Vec::new();
    let mut read_only = Vec::new();
    for (i, d) in g.disks.iter().enumerate() {
        if d.id.is_empty() || d.id.contains([',', '=']) {
            return err(
                format!("guest.disks[{i}].id"),
                format!("`{}`: not empty, no `,` or `=`", d.id),
            );
        }
        if disks.iter().any(|(id, _)| *id == d.id) {
            return err(format!("guest.disks[{i}].id"), format!("`{}` twice", d.id));
        }
        let image = existing_file(&format!("guest.disks[{i}].image"), base, &d.image)?;
        disks.push((d.id.clone(), image));
        if d.readonly {
            read_only.push(d.id.clone());
        }
    }
    if read_only.len() == disks.len() {
        return err(
            "guest.disks",
            "every disk is read-only: the outage needs one the guest writes",
        );
    }
    Ok(Guest::Linux(LinuxGuest {
        kernel,
        initrd,
        cmdline: g
            .cmdline
            .clone()
            .unwrap_or_else(|| "console=ttyS0 panic=-1".into()),
        memory,
        cpus,
        disks,
        read_only,
    }))
}
