//! The outage matrix: holdfast and QEMU-like peers under simulated host outages.
//!
//! Every cell runs the same guest workload (rounds of 4 KiB writes to random blocks,
//! each round ended by a FLUSH, every write read back) on a [`HostCache`] of one
//! [`HostModel`], breaks the host storage with one [`Outage`] pattern, and plays the
//! operator: when the device stops it lets memory pressure evict the host's clean
//! pages, tries `cont` while storage is still broken, ends the outage and `cont`s
//! again. At the end it evicts the host cache and checks the stable disk with the
//! [`Oracle`].
//!
//! The device strategies are [`super::strategy`]'s, as `holdfast lab` runs them in
//! real guests; holdfast gets the extra flush on hosts that report late.

use std::fmt;

use super::hostcache::SimulatedHost;
use super::hostcache::{HostCache, HostModel};
use super::oracle::{FlushTicket, Oracle, ReadTicket, WriteId};
use super::strategy::Strategy;
use super::timeline::{HostState, Timeline, VmState};
use crate::disk::DiskConfig;
use crate::engine::Engine;
use crate::fault::{FaultHandle, FaultInjector, FaultOp, FaultRule, Trigger};
use crate::request::{Completion, Request, RequestOp, Status};
use crate::MemBackend;

const DISK_SIZE: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const ROUNDS: usize = 10;
const WRITES_PER_ROUND: usize = 8;
/// The outage starts at the start of round 5 (0-based 4).
const OUTAGE_ROUND: usize = 4;
/// `cont`s the operator tries after the outage has ended before giving up.
const CONT_TRIES: usize = 3;

/// How the host storage breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outage {
    /// `pwrite` itself fails with EIO (a file system that shut down).
    WriteEio,
    /// Write-back to the disk fails with EIO; fsync reports it.
    FlushEio,
    /// Background write-back fails before the guest's fsync; the fsync reports it.
    WritebackEio,
    /// `pwrite` fails with ENOSPC (the host file system is full).
    WriteEnospc,
    /// Write-back fails with ENOSPC (a thin-provisioned volume ran out).
    FlushEnospc,
    /// Write-back fails with EIO, and fails again part-way through the first replay
    /// after the outage seemed over.
    RepeatDuringReplay,
}

impl Outage {
    pub const ALL: [Outage; 6] = [
        Outage::WriteEio,
        Outage::FlushEio,
        Outage::WritebackEio,
        Outage::WriteEnospc,
        Outage::FlushEnospc,
        Outage::RepeatDuringReplay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outage::WriteEio => "write EIO",
            Outage::FlushEio => "flush EIO",
            Outage::WritebackEio => "writeback EIO",
            Outage::WriteEnospc => "write ENOSPC",
            Outage::FlushEnospc => "flush ENOSPC",
            Outage::RepeatDuringReplay => "repeats in replay",
        }
    }
}

impl Outage {
    /// The name used on command lines.
    pub fn slug(self) -> &'static str {
        match self {
            Outage::WriteEio => "write-eio",
            Outage::FlushEio => "flush-eio",
            Outage::WritebackEio => "writeback-eio",
            Outage::WriteEnospc => "write-enospc",
            Outage::FlushEnospc => "flush-enospc",
            Outage::RepeatDuringReplay => "repeat-in-replay",
        }
    }
}

impl std::str::FromStr for Outage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Outage::ALL
            .into_iter()
            .find(|x| x.slug() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Outage::ALL.iter().map(|o| o.slug()).collect();
                format!(
                    "unknown outage `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellResult {
    /// The acked writes any of whose bytes are missing from the stable disk.
    pub acked_writes_lost: usize,
    /// Requests the guest saw fail (an error status instead of a pause).
    pub failed_requests: usize,
    pub strategy: Strategy,
    pub host: HostModel,
    pub outage: Outage,
    /// Writes that completed `S_OK` and were followed by a FLUSH that completed `S_OK`.
    pub acked_writes: usize,
    /// Bytes of acked writes missing from the stable disk after eviction.
    pub acked_bytes_lost: u64,
    /// The device ran again after the outage and the workload finished.
    pub resumed: bool,
    /// Reads that completed `S_OK` with stale bytes.
    pub stale_reads: usize,
    /// `cont`s that failed.
    pub failed_conts: usize,
}

/// A deterministic pseudo-random sequence (xorshift64*), for workloads that must be
/// the same in every run. The seed must not be 0.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// What the guest waits for on each request tag.
enum Waiting {
    Write(WriteId),
    Flush(FlushTicket),
    Read(ReadTicket),
}

/// When the outage starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the start of this round (1 is the first; the guest prints `round N`).
    Round(usize),
    /// At the first request at or after this many milliseconds of virtual time.
    AtMs(u64),
}

/// One run of the synthetic guest workload: rounds of 4 KiB writes to random blocks,
/// each round ended by a FLUSH, every write read back; on one simulated host, one
/// strategy, one outage. Time is virtual: each request takes `request_ms`, each of the
/// operator's steps `cont_after_ms`, so a run is the same on every machine.
///
/// The operator, when the device stops: the host evicts its clean pages, a `cont` is
/// tried while storage is still broken, the outage ends, and `cont` is tried up to
/// `cont_tries` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synthetic {
    pub strategy: Strategy,
    pub host: HostModel,
    pub outage: Outage,
    pub rounds: usize,
    pub writes_per_round: usize,
    pub disk_size: u64,
    pub start: Start,
    pub cont_tries: usize,
    pub seed: u64,
    pub request_ms: u64,
    pub cont_after_ms: u64,
}

impl Synthetic {
    /// A cell of the outage matrix: 10 rounds of 8 writes on 1 MiB, the outage in
    /// round 5, 3 `cont` tries, the same workload for every strategy on a host and
    /// outage.
    pub fn cell(strategy: Strategy, host: HostModel, outage: Outage) -> Self {
        Synthetic {
            strategy,
            host,
            outage,
            rounds: ROUNDS,
            writes_per_round: WRITES_PER_ROUND,
            disk_size: DISK_SIZE,
            start: Start::Round(OUTAGE_ROUND + 1),
            cont_tries: CONT_TRIES,
            seed: 0x5EED ^ ((host as u64) << 8) ^ (outage as u64),
            request_ms: 20,
            cont_after_ms: 1000,
        }
    }

    /// Runs it.
    pub fn run(&self) -> SyntheticRun {
        let mut cell = Cell::new(self);
        let resumed = cell.workload();
        cell.end_outage();
        cell.cache.evict();
        cell.timeline.end = cell.now;
        let lost = cell.oracle.check_stable(&cell.stable.contents());
        let mut lost_writes: Vec<WriteId> = lost.iter().map(|m| m.expected).collect();
        lost_writes.sort_unstable();
        lost_writes.dedup();
        SyntheticRun {
            result: CellResult {
                strategy: self.strategy,
                host: self.host,
                outage: self.outage,
                acked_writes: cell.oracle.acked_writes(),
                acked_bytes_lost: lost.len() as u64 * super::oracle::SECTOR,
                acked_writes_lost: lost_writes.len(),
                failed_requests: cell.failed_requests,
                resumed,
                stale_reads: cell.stale_reads,
                failed_conts: cell.failed_conts,
            },
            timeline: cell.timeline,
        }
    }
}

/// What a [`Synthetic`] run found, and its timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticRun {
    pub result: CellResult,
    pub timeline: Timeline,
}

struct Cell {
    device: Box<dyn Engine>,
    spec: Synthetic,
    calls: FaultHandle,
    writeback: FaultHandle,
    cache: HostCache<FaultInjector<MemBackend>>,
    stable: MemBackend,
    oracle: Oracle,
    next_tag: u64,
    stale_reads: usize,
    failed_conts: usize,
    failed_requests: usize,
    /// Times the device stopped.
    outages: usize,
    /// The round the outage started in (1-based), once it has.
    outage_round: Option<usize>,
    round: usize,
    /// Virtual milliseconds since the start.
    now: u64,
    timeline: Timeline,
}

impl Cell {
    fn new(spec: &Synthetic) -> Self {
        let SimulatedHost {
            host: front,
            calls,
            writeback,
            cache,
            stable,
        } = SimulatedHost::new(spec.host, spec.disk_size);
        let config = DiskConfig {
            keep_extra_flush: spec.strategy.is_holdfast() && spec.host.reports_late(),
            ..Default::default()
        };
        let device = spec.strategy.engine(front, config);
        Cell {
            device,
            spec: spec.clone(),
            calls,
            writeback,
            cache,
            stable,
            oracle: Oracle::new(spec.disk_size),
            next_tag: 0,
            stale_reads: 0,
            failed_conts: 0,
            failed_requests: 0,
            outages: 0,
            outage_round: None,
            round: 0,
            now: 0,
            timeline: Timeline::default(),
        }
    }

    fn start_outage(&mut self) {
        let rule = |errno| FaultRule::new(FaultOp::Write, errno, Trigger::Always).named("outage");
        match self.spec.outage {
            Outage::WriteEio => self.calls.arm(rule(libc::EIO)),
            Outage::WriteEnospc => self.calls.arm(rule(libc::ENOSPC)),
            Outage::FlushEio | Outage::WritebackEio | Outage::RepeatDuringReplay => {
                self.writeback.arm(rule(libc::EIO))
            }
            Outage::FlushEnospc => self.writeback.arm(rule(libc::ENOSPC)),
        };
        self.outage_round = Some(self.round);
        self.timeline.host(self.now, HostState::Broken);
    }

    fn end_outage(&mut self) {
        self.calls.clear_named("outage");
        self.writeback.clear_named("outage");
        self.timeline.host(self.now, HostState::Ok);
    }

    /// Starts the outage if its time has come.
    fn maybe_start_outage(&mut self) {
        let due = match self.spec.start {
            Start::Round(r) => self.round >= r,
            Start::AtMs(t) => self.now >= t,
        };
        if due && self.outage_round.is_none() {
            self.start_outage();
        }
    }

    fn cont(&mut self) -> Option<Vec<Completion>> {
        self.now += self.spec.cont_after_ms;
        self.timeline.event(self.now, "cont");
        match self.device.replay() {
            Ok(report) => {
                let done = report.completions;
                self.timeline.event(self.now, "RESUME");
                self.timeline.vm(self.now, VmState::Running);
                Some(done)
            }
            Err(_) => {
                self.failed_conts += 1;
                self.timeline.event(self.now, "cont failed");
                None
            }
        }
    }

    /// The operator's part while the device is stopped. The outage lasts the same for
    /// every strategy: it ends right after the first `cont`, whatever that returned.
    /// Returns the completions of a successful `cont`, or `None` if the device could
    /// not be resumed.
    fn operate(&mut self) -> Option<Vec<Completion>> {
        self.timeline.event(self.now, "BLOCK_IO_ERROR");
        self.timeline.event(self.now, "STOP");
        self.timeline.vm(self.now, VmState::IoError);
        // The guest is paused; the host reclaims memory.
        self.cache.evict();
        // Too early: storage is still broken. A correct device refuses to resume.
        let early = self.cont();
        let first_outage = self.outages == 0;
        self.outages += 1;
        self.end_outage();
        if early.is_some() {
            return early;
        }
        if first_outage && self.spec.outage == Outage::RepeatDuringReplay {
            let again = FaultRule::new(FaultOp::Write, libc::EIO, Trigger::AfterBytes(BLOCK))
                .named("outage");
            self.writeback.arm(again);
            self.timeline.host(self.now, HostState::Broken);
            let done = self.cont();
            self.end_outage();
            if done.is_some() {
                return done;
            }
            self.cache.evict();
        }
        (0..self.spec.cont_tries).find_map(|_| self.cont())
    }

    /// Submits one request and waits for it (and whatever was parked before it).
    /// Returns false if the device stopped and could not be resumed.
    fn run(&mut self, op: RequestOp, waiting: Waiting) -> bool {
        self.maybe_start_outage();
        self.now += self.spec.request_ms;
        self.next_tag += 1;
        let tag = self.next_tag;
        let completions = match self.device.submit(Request::new(tag, op)).completion {
            Some(c) => vec![c],
            None => match self.operate() {
                Some(done) => done,
                None => return false,
            },
        };
        let mine = completions.into_iter().find(|c| c.tag == tag);
        let Some(c) = mine else { return false };
        let ok = c.status == Status::Ok;
        if !ok {
            self.failed_requests += 1;
        }
        match waiting {
            Waiting::Write(id) => self.oracle.completed(id, ok),
            Waiting::Flush(t) => {
                let before = self.oracle.acked_writes();
                self.oracle.flush_completed(t, ok);
                let acked = self.oracle.acked_writes() - before;
                self.timeline
                    .acks
                    .extend(std::iter::repeat_n(self.now, acked));
            }
            Waiting::Read(t) => {
                if ok && !self.oracle.check_read(&t, &c.data).is_empty() {
                    self.stale_reads += 1;
                }
            }
        }
        true
    }

    fn write(&mut self, block: u64) -> bool {
        let (id, data) = self.oracle.write(block * BLOCK, BLOCK);
        self.run(
            RequestOp::Write {
                offset: block * BLOCK,
                data: data.into(),
            },
            Waiting::Write(id),
        )
    }

    fn flush(&mut self) -> bool {
        let t = self.oracle.flush_submitted();
        self.run(RequestOp::Flush, Waiting::Flush(t))
    }

    fn read(&mut self, block: u64) -> bool {
        let t = self.oracle.read_submitted(block * BLOCK, BLOCK);
        self.run(
            RequestOp::Read {
                offset: block * BLOCK,
                len: BLOCK,
            },
            Waiting::Read(t),
        )
    }

    /// The guest's workload; false if the device never resumed.
    fn workload(&mut self) -> bool {
        let mut rng = Rng(self.spec.seed | 1);
        let blocks_on_disk = self.spec.disk_size / BLOCK;
        for round in 1..=self.spec.rounds {
            self.round = round;
            let blocks: Vec<u64> = (0..self.spec.writes_per_round)
                .map(|_| rng.next_u64() % blocks_on_disk)
                .collect();
            for &b in &blocks {
                if !self.write(b) {
                    return false;
                }
            }
            if self.outage_round == Some(round) && self.spec.outage == Outage::WritebackEio {
                self.cache.background_writeback();
            }
            if !self.flush() {
                return false;
            }
            for &b in &blocks {
                if !self.read(b) {
                    return false;
                }
            }
        }
        true
    }
}

/// Runs one cell of the matrix.
pub fn run_cell(strategy: Strategy, host: HostModel, outage: Outage) -> CellResult {
    Synthetic::cell(strategy, host, outage).run().result
}

/// Every cell: strategies x host models x outage patterns.
pub fn run_all() -> Vec<CellResult> {
    run_selected(&Strategy::ALL, &HostModel::ALL, &Outage::ALL)
}

/// The cells of the given strategies, hosts and outages, in that nesting order.
pub fn run_selected(
    strategies: &[Strategy],
    hosts: &[HostModel],
    outages: &[Outage],
) -> Vec<CellResult> {
    let mut rows = Vec::new();
    for &strategy in strategies {
        for &host in hosts {
            for &outage in outages {
                rows.push(run_cell(strategy, host, outage));
            }
        }
    }
    rows
}

/// The table, in Markdown.
pub fn markdown(rows: &[CellResult]) -> String {
    let mut out = String::from(
        "| strategy | host | outage | acked writes | acked bytes lost | resumed |\n|---|---|---|---:|---:|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.strategy,
            r.host,
            r.outage,
            r.acked_writes,
            r.acked_bytes_lost,
            if r.resumed { "yes" } else { "no" }
        ));
    }
    out
}
