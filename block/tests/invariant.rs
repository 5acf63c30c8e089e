//! Property tests: random interleavings of guest reads, writes, zeroes and flushes
//! with host outages, evictions, background write-back and `cont`s, on every host
//! model, checked against the oracle of docs/durability.md's invariant.

use std::collections::VecDeque;

use holdfast_block::sim::oracle::{FlushTicket, Oracle, ReadTicket, WriteId, SECTOR};
use holdfast_block::sim::*;
use holdfast_block::*;
use proptest::prelude::*;

const SIZE: u64 = 64 * 1024;
const SECTORS: u64 = SIZE / SECTOR;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
    },
    Zeroes {
        sector: u64,
        sectors: u64,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Flush,
    /// Fail host calls the engine makes (`pwrite`/`fsync`/`pread`).
    CallOutage {
        op: FaultOp,
        nospace: bool,
    },
    /// Fail the cache's write-back to its disk (or a direct backend's writes).
    DiskOutage {
        nospace: bool,
    },
    EndOutage,
    /// With calls in flight ([`HostKind::DirectInFlight`]): run the host call of
    /// one of them, or end it if it ran.
    Progress(usize),
    Evict,
    BackgroundWriteback,
    Cont,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(24)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => range().prop_map(|(sector, sectors)| Op::Write { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Zeroes { sector, sectors }),
        3 => range().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        3 => Just(Op::Flush),
        1 => (prop_oneof![Just(FaultOp::Write), Just(FaultOp::Flush), Just(FaultOp::Read)], any::<bool>())
            .prop_map(|(op, nospace)| Op::CallOutage { op, nospace }),
        2 => any::<bool>().prop_map(|nospace| Op::DiskOutage { nospace }),
        2 => Just(Op::EndOutage),
        6 => any::<usize>().prop_map(Op::Progress),
        2 => Just(Op::Evict),
        1 => Just(Op::BackgroundWriteback),
        3 => Just(Op::Cont),
    ]
}

/// The host under the engine: a simulated file system cache, or a raw in-memory disk.
#[derive(Debug, Clone, Copy)]
enum HostKind {
    Cache(HostModel),
    Direct,
    /// A raw disk, with reads and writes begun ([`Disk::begin`]) and left in flight
    /// beside each other until `Progress` runs and ends them, in any order.
    DirectInFlight,
}

enum Waiting {
    Write(WriteId),
    Flush(FlushTicket),
    Read(ReadTicket),
}

struct Harness {
    disk: Disk<Box<dyn Backend>>,
    calls: FaultHandle,
    below: FaultHandle,
    cache: Option<HostCache<FaultInjector<MemBackend>>>,
    stable: MemBackend,
    oracle: Oracle,
    waiting: VecDeque<(u64, Waiting)>,
    next_tag: u64,
    honest: bool,
    /// Requests run through `Disk::begin`; calls in flight, not yet ended.
    concurrent: bool,
    in_flight: Vec<Call>,
}

impl Harness {
    fn new(kind: HostKind, config: DiskConfig) -> Self {
        let stable = MemBackend::new(SIZE);
        let below = FaultInjector::new(stable.clone());
        let below_handle = below.handle();
        let (host, cache): (Box<dyn Backend>, _) = match kind {
            HostKind::Cache(model) => {
                let cache = HostCache::new(model, below);
                (Box::new(cache.clone()), Some(cache))
            }
            HostKind::Direct | HostKind::DirectInFlight => (Box::new(below), None),
        };
        let front = FaultInjector::new(host);
        let calls = front.handle();
        let honest = !matches!(kind, HostKind::Cache(m) if m.reports_late());
        Harness {
            disk: Disk::new(Box::new(front), config),
            calls,
            below: below_handle,
            cache,
            stable,
            oracle: Oracle::new(SIZE),
            waiting: VecDeque::new(),
            next_tag: 0,
            honest,
            concurrent: matches!(kind, HostKind::DirectInFlight),
            in_flight: Vec::new(),
        }
    }

    fn submit(&mut self, op: RequestOp, waiting: Waiting) -> Result<(), TestCaseError> {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.waiting.push_back((tag, waiting));
        let req = Request::new(tag, op);
        let out = if self.concurrent {
            match self.disk.begin(req) {
                Begun::Done(out) => out,
                Begun::Call(call) => {
                    self.in_flight.push(call);
                    self.in_flight.extend(self.disk.flush_ahead());
                    return Ok(());
                }
                Begun::Alone(req) => {
                    self.drain()?;
                    self.disk.submit(req)
                }
            }
        } else {
            self.disk.submit(req)
        };
        if let Some(c) = out.completion {
            self.complete(c)?;
        }
        Ok(())
    }

    /// Runs or ends the `n`-th call in flight (modulo how many there are).
    fn progress(&mut self, n: usize) -> Result<(), TestCaseError> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let at = n % self.in_flight.len();
        if n / self.in_flight.len() % 2 == 0 {
            self.in_flight[at].run();
            return Ok(());
        }
        let call = self.in_flight.remove(at);
        self.end(call)
    }

    fn end(&mut self, call: Call) -> Result<(), TestCaseError> {
        if let Some(c) = self.disk.end(call).completion {
            self.complete(c)?;
        }
        Ok(())
    }

    /// Ends every call in flight, last begun first (what a disk waits for before
    /// it runs a request alone).
    fn drain(&mut self) -> Result<(), TestCaseError> {
        while let Some(call) = self.in_flight.pop() {
            self.end(call)?;
        }
        prop_assert_eq!(self.disk.in_flight(), 0);
        Ok(())
    }

    /// Hands a completion to the oracle; a completion is for the oldest request still
    /// waiting or for one that never touched the host (a guest error).
    fn complete(&mut self, c: Completion) -> Result<(), TestCaseError> {
        let at = self.waiting.iter().position(|(t, _)| *t == c.tag);
        let Some(at) = at else {
            return Err(TestCaseError::fail(format!(
                "completion for unknown tag {}",
                c.tag
            )));
        };
        let (_, w) = self.waiting.remove(at).expect("found above");
        let ok = c.status == Status::Ok;
        match w {
            Waiting::Write(id) => self.oracle.completed(id, ok),
            Waiting::Flush(t) => {
                self.oracle.flush_completed(t, ok);
            }
            Waiting::Read(t) => {
                if ok {
                    let bad = self.oracle.check_read(&t, &c.data);
                    prop_assert!(bad.is_empty(), "stale read: {:?}", bad);
                }
            }
        }
        Ok(())
    }

    fn cont(&mut self) -> Result<bool, TestCaseError> {
        self.drain()?;
        match self.disk.replay() {
            Ok(report) => {
                for c in report.completions {
                    self.complete(c)?;
                }
                prop_assert!(self.waiting.is_empty(), "replay left requests waiting");
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Write { sector, sectors } => {
                let (id, data) = self.oracle.write(sector * SECTOR, sectors * SECTOR);
                self.submit(
                    RequestOp::Write {
                        offset: sector * SECTOR,
                        data: data.into(),
                    },
                    Waiting::Write(id),
                )?;
            }
            Op::Zeroes { sector, sectors } => {
                let id = self.oracle.write_zeroes(sector * SECTOR, sectors * SECTOR);
                let op = RequestOp::WriteZeroes {
                    offset: sector * SECTOR,
                    len: sectors * SECTOR,
                    unmap: false,
                };
                self.submit(op, Waiting::Write(id))?;
            }
            Op::Read { sector, sectors } => {
                let t = self
                    .oracle
                    .read_submitted(sector * SECTOR, sectors * SECTOR);
                self.submit(
                    RequestOp::Read {
                        offset: sector * SECTOR,
                        len: sectors * SECTOR,
                    },
                    Waiting::Read(t),
                )?;
            }
            Op::Flush => {
                let t = self.oracle.flush_submitted();
                self.submit(RequestOp::Flush, Waiting::Flush(t))?;
            }
            Op::CallOutage { op, nospace } => {
                let errno = if nospace { libc::ENOSPC } else { libc::EIO };
                self.calls.arm(FaultRule::new(op, errno, Trigger::Always));
            }
            Op::DiskOutage { nospace } => {
                let errno = if nospace { libc::ENOSPC } else { libc::EIO };
                self.below
                    .arm(FaultRule::new(FaultOp::Write, errno, Trigger::Always));
            }
            Op::EndOutage => {
                self.calls.clear_all();
                self.below.clear_all();
            }
            Op::Progress(n) => self.progress(n)?,
            Op::Evict => {
                if let Some(c) = &self.cache {
                    c.evict();
                }
            }
            Op::BackgroundWriteback => {
                if let Some(c) = &self.cache {
                    c.background_writeback();
                }
            }
            Op::Cont => {
                self.cont()?;
            }
        }
        Ok(())
    }

    fn check_stable(&self) -> Result<(), TestCaseError> {
        let bad = self.oracle.check_stable(&self.stable.contents());
        prop_assert!(
            bad.is_empty(),
            "acked writes missing from stable storage: {:?}",
            bad
        );
        Ok(())
    }

    /// Ends every outage and lets the guest flush until it succeeds; then every acked
    /// write must be stable and read back.
    fn settle_and_check(&mut self) -> Result<(), TestCaseError> {
        self.calls.clear_all();
        self.below.clear_all();
        self.drain()?;
        let mut flushed_ok = 0;
        for _ in 0..8 {
            if self.disk.is_stopped() {
                self.cont()?;
                continue;
            }
            let t = self.oracle.flush_submitted();
            self.next_tag += 1;
            let tag = self.next_tag;
            self.waiting.push_back((tag, Waiting::Flush(t)));
            if let Some(c) = self
                .disk
                .submit(Request::new(tag, RequestOp::Flush))
                .completion
            {
                let ok = c.status == Status::Ok;
                self.complete(c)?;
                flushed_ok = if ok { flushed_ok + 1 } else { 0 };
                if flushed_ok == 2 {
                    break;
                }
            }
        }
        prop_assert_eq!(
            flushed_ok,
            2,
            "the disk did not recover after the outage ended"
        );
        prop_assert!(self.waiting.is_empty());
        if let Some(c) = &self.cache {
            c.evict();
        }
        self.check_stable()?;
        let t = self.oracle.read_submitted(0, SIZE);
        let c = self.disk.submit(Request::new(
            0,
            RequestOp::Read {
                offset: 0,
                len: SIZE,
            },
        ));
        let data = c.completion.expect("read after recovery").data;
        let bad = self.oracle.check_read(&t, &data);
        prop_assert!(bad.is_empty(), "stale after recovery: {:?}", bad);
        Ok(())
    }
}

fn config() -> impl Strategy<Value = DiskConfig> {
    (
        prop_oneof![
            Just(ErrorPolicy::Stop),
            Just(ErrorPolicy::Enospc),
            Just(ErrorPolicy::Report),
            Just(ErrorPolicy::Ignore)
        ],
        prop_oneof![Just(ErrorPolicy::Stop), Just(ErrorPolicy::Report)],
        any::<bool>(),
        prop_oneof![Just(8192u64), Just(32768), Just(1 << 20)],
    )
        .prop_map(|(werror, rerror, writeback, unflushed_limit)| DiskConfig {
            werror,
            rerror,
            writeback,
            unflushed_limit,
            ..Default::default()
        })
}

fn run(kind: HostKind, mut config: DiskConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    config.keep_extra_flush = matches!(kind, HostKind::Cache(m) if m.reports_late());
    // `ignore` lies to the guest by definition: only reads and recovery are checked.
    let check_anytime = config.werror != ErrorPolicy::Ignore;
    let mut h = Harness::new(kind, config);
    for op in ops {
        h.apply(op)?;
        if h.honest && check_anytime {
            h.check_stable()?;
        }
    }
    h.settle_and_check()
}

/// 96 cases per host model by default; `PROPTEST_CASES` asks for more.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

macro_rules! host_property {
    ($name:ident, $kind:expr) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]
            #[test]
            fn $name(config in config(), ops in proptest::collection::vec(op(), 1..80)) {
                run($kind, config, ops)?;
            }
        }
    };
}

host_property!(
    invariant_on_ext4_ordered,
    HostKind::Cache(HostModel::Ext4Ordered)
);
host_property!(invariant_on_xfs, HostKind::Cache(HostModel::Xfs));
host_property!(invariant_on_ext4_data, HostKind::Cache(HostModel::Ext4Data));
host_property!(invariant_on_btrfs, HostKind::Cache(HostModel::Btrfs));
host_property!(invariant_on_freebsd, HostKind::Cache(HostModel::FreeBsd));
host_property!(invariant_on_direct_disk, HostKind::Direct);
host_property!(invariant_with_calls_in_flight, HostKind::DirectInFlight);
