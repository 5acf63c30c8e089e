//! Fault injection: a [`Backend`] wrapper that fails, delays or hangs host calls by
//! rule, in the spirit of QEMU's blkdebug and dm-flakey.
//!
//! A rule names an operation, optionally a byte range, what it does to a matching
//! call (fail it with an errno, delay it, or both; or hang it) and when. Rules come
//! from a JSON plan file (`holdfast run --disk ...,faults=FILE`, checked before the
//! guest boots) or are armed and cleared at run time through a [`FaultHandle`]
//! (QMP's `x-block-fault`). A plan looks like:
//!
//! ```json
//! { "seed": 7,
//!   "rules": [
//!     { "name": "disk-full", "op": "write", "errno": "ENOSPC", "when": { "after_bytes": 1048576 } },
//!     { "op": "flush", "errno": "EIO", "when": "once" },
//!     { "op": "read", "range": { "offset": 0, "len": 4096 }, "errno": 5, "when": { "nth": 3 } },
//!     { "op": ["read", "flush"], "errno": "EIO", "probability": 0.01 },
//!     { "op": "any", "delay_ms": 200, "active": { "from_s": 10, "for_s": 5, "every_s": 60 } },
//!     { "op": "write", "errno": "EIO", "active": { "from_call": 100, "for_calls": 20 } }
//! ] }
//! ```
//!
//! `op` is `read`, `write` (also write-zeroes and discard), `flush`, `any`, or a list
//! of them. `when` is `"always"` (until cleared; the default), `"once"`,
//! `{"nth": N}` (the N-th counted call, once) or `{"after_bytes": N}` (every counted
//! call once N bytes have been written through the injector since the rule was
//! armed, until cleared). A failing call does not reach the wrapped backend.
//!
//! `active` turns a rule on and off: in seconds since it was armed (`from_s`, then
//! for `for_s`, again every `every_s`), or by the matching calls (on from the
//! `from_call`-th, for `for_calls` of them, again every `every_calls`); a rule counts
//! (for `when`) only the calls it matches while it is active. `probability` (0 to 1)
//! makes a rule that fires hit each such call only by chance, drawn from `seed` (the
//! rule's, else the plan's, else 0): the n-th counted call of a rule gets the same
//! decision in every run with the same seed, whatever other rules and calls do.
//! `delay_ms` holds a matching call that long before it goes on (to the backend, or
//! to fail with `errno`).
//!
//! Instead of an errno a rule can say `"hang": true` (with `when` `"always"`): a
//! matching call then waits, as on a hard NFS mount or a suspended device-mapper
//! table, until the rule is cleared, and then goes on to the wrapped backend.

use std::fmt;
use std::path::Path;

/// The plan language, for `holdfast faults --help`.
pub const PLAN_HELP: &str = r#"A fault plan is a JSON file: {"seed": N, "rules": [RULE, ...]}. A rule fails, delays
or hangs the host calls it matches, before they reach the image; the plan is checked
before the guest boots, and a bad one is refused naming the field. Rules can also be
armed and cleared while the guest runs, over QMP: x-block-fault (same RULE).

RULE keys:
  op           read | write (also write-zeroes and discard) | flush | any, or a list
               of them: ["read", "flush"] (required)
  errno        what a hit call fails with: a name (EIO, ENOSPC, EROFS, EDQUOT, ...) or
               a number
  delay_ms     a hit call waits this long (1 to 600000) before it goes on to the
               image, or fails with errno if the rule has one
  hang         true: a hit call waits until the rule is cleared (x-block-fault
               "clear"), as on a hard NFS mount or a suspended dm table
  range        {"offset": BYTES, "len": BYTES}: only calls that touch these bytes
  when         "always" (the default, until cleared) | "once" | {"nth": N} (the N-th
               counted call) | {"after_bytes": N} (every call once N bytes were
               written since the rule was armed)
  active       when the rule is on, by seconds since it was armed:
               {"from_s": 10, "for_s": 5, "every_s": 60} (on at 10 s for 5 s, again
               every minute), or by its matching calls: {"from_call": 100,
               "for_calls": 20, "every_calls": 1000}. `when` counts only the calls
               the rule sees while it is on.
  probability  0 to 1: a call the rule would hit is hit only by chance, drawn from
               the seed: the n-th counted call of a rule gets the same decision in
               every run with the same seed
  seed         the rule's own seed (else the plan's, else 0)
  name         a label, to clear the rule by name over QMP

Each rule needs errno, delay_ms or hang. The first rule that hits a call decides
what happens to it; every matching rule counts it.

Examples:
  A flaky disk, as dm-flakey: every write fails for 2 s of every 10 s, after 30 s:
    {"rules": [{"op": "write", "errno": "EIO",
                "active": {"from_s": 30, "for_s": 2, "every_s": 10}}]}
  A slow, sometimes failing disk, the same in every run:
    {"seed": 42, "rules": [
      {"op": "any", "delay_ms": 20},
      {"op": ["read", "flush"], "errno": "EIO", "probability": 0.001}]}
  The disk fills up after 64 MiB written; the 3rd flush fails:
    {"rules": [{"op": "write", "errno": "ENOSPC", "when": {"after_bytes": 67108864}},
               {"op": "flush", "errno": "EIO", "when": {"nth": 3}}]}
  One bad sector, for reads only:
    {"rules": [{"op": "read", "errno": "EIO", "range": {"offset": 1048576, "len": 512}}]}

Use: holdfast run --disk path=IMG,faults=PLAN.json ...; holdfast faults PLAN.json
checks a plan and lists its rules."#;
use std::sync::{Arc, Condvar, Mutex};

use serde::Deserialize;

use crate::backend::{Backend, Capabilities};
use crate::host_error::{errno_from_name, ERRNO_NAMES};
use crate::{lock, HostError, HostOp};

/// Which host calls a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub enum FaultOp {
    Read,
    /// Writes, write-zeroes and discards.
    Write,
    Flush,
    Any,
    /// Any of several (a plan's list): bit 0 reads, 1 writes, 2 flushes.
    Set(u8),
}

/// A plan's `op`: a name, or a list of names.
impl TryFrom<serde_json::Value> for FaultOp {
    type Error = String;
    fn try_from(v: serde_json::Value) -> Result<Self, String> {
        const EXPECTED: &str = "expected read, write, flush or any, or a list of them";
        let one = |v: &serde_json::Value| match v.as_str() {
            Some("read") => Ok(FaultOp::Read),
            Some("write") => Ok(FaultOp::Write),
            Some("flush") => Ok(FaultOp::Flush),
            Some("any") => Ok(FaultOp::Any),
            Some(other) => Err(format!("unknown operation `{other}` ({EXPECTED})")),
            None => Err(format!("{v} is not an operation ({EXPECTED})")),
        };
        match &v {
            serde_json::Value::Array(names) if names.is_empty() => {
                Err(format!("an empty list ({EXPECTED})"))
            }
            serde_json::Value::Array(names) => {
                let mut bits = 0u8;
                for n in names {
                    bits |= one(n)?.bits();
                }
                Ok(match bits {
                    0b001 => FaultOp::Read,
                    0b010 => FaultOp::Write,
                    0b100 => FaultOp::Flush,
                    0b111 => FaultOp::Any,
                    b => FaultOp::Set(b),
                })
            }
            v => one(v),
        }
    }
}

impl FaultOp {
    fn bits(self) -> u8 {
        match self {
            FaultOp::Read => 0b001,
            FaultOp::Write => 0b010,
            FaultOp::Flush => 0b100,
            FaultOp::Any => 0b111,
            FaultOp::Set(b) => b & 0b111,
        }
    }

    fn matches(self, op: HostOp) -> bool {
        let bit = match op {
            HostOp::Read => 0b001,
            HostOp::Write | HostOp::WriteZeroes | HostOp::Discard => 0b010,
            HostOp::Flush => 0b100,
        };
        self.bits() & bit != 0
    }

    /// Whether it matches reads only, flushes only, ...
    fn only(self, other: FaultOp) -> bool {
        self.bits() == other.bits()
    }
}

/// A byte range `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// When a rule fires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    #[default]
    Always,
    Once,
    Nth(u64),
    AfterBytes(u64),
}

/// An errno, written in a plan as a name (`"ENOSPC"`) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ErrnoSpec")]
pub struct Errno(pub i32);

#[derive(Deserialize)]
#[serde(untagged)]
enum ErrnoSpec {
    Name(String),
    Number(i64),
}

/// The message for an errno a plan names that we do not know.
#[derive(Debug)]
pub struct BadErrno(String);

impl fmt::Display for BadErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = ERRNO_NAMES.iter().map(|(n, _)| *n).collect();
        write!(
            f,
            "unknown errno {} (expected a positive number or one of {})",
            self.0,
            names.join(", ")
        )
    }
}

impl TryFrom<ErrnoSpec> for Errno {
    type Error = BadErrno;
    fn try_from(spec: ErrnoSpec) -> Result<Self, BadErrno> {
        match spec {
            ErrnoSpec::Name(name) => errno_from_name(&name)
                .map(Errno)
                .ok_or(BadErrno(format!("`{name}`"))),
            ErrnoSpec::Number(n) if n > 0 && n < 4096 => Ok(Errno(n as i32)),
            ErrnoSpec::Number(n) => Err(BadErrno(n.to_string())),
        }
    }
}

/// A chance, written in a plan as a number from 0 to 1; kept in parts per 2^32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Probability(u64);

impl TryFrom<f64> for Probability {
    type Error = String;
    fn try_from(p: f64) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&p) {
            return Err(format!("{p} is not a probability from 0 to 1"));
        }
        Ok(Probability((p * (1u64 << 32) as f64).round() as u64))
    }
}

impl Probability {
    /// Whether a draw (uniform over 2^32 values) hits.
    fn hits(self, draw: u64) -> bool {
        draw & 0xffff_ffff < self.0
    }
}

/// When a rule is on: by time since it was armed, or by the calls it matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// On from this many seconds after the rule was armed.
    #[serde(default, deserialize_with = "seconds")]
    pub from_s: Option<u64>,
    /// For this many seconds (in milliseconds here).
    #[serde(default, deserialize_with = "seconds")]
    pub for_s: Option<u64>,
    /// Again every this many seconds.
    #[serde(default, deserialize_with = "seconds")]
    pub every_s: Option<u64>,
    /// On from the matching call with this number (the first is 1).
    #[serde(default)]
    pub from_call: Option<u64>,
    /// For this many matching calls.
    #[serde(default)]
    pub for_calls: Option<u64>,
    /// Again every this many matching calls.
    #[serde(default)]
    pub every_calls: Option<u64>,
}

/// Seconds (a number, fractions allowed) as milliseconds.
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = f64::deserialize(d)?;
    if !(0.0..=1e9).contains(&s) {
        return Err(serde::de::Error::custom(format!(
            "{s} is not a number of seconds from 0 to 10^9"
        )));
    }
    Ok(Some((s * 1000.0).round() as u64))
}

impl Window {
    fn by_time(&self) -> bool {
        self.from_s.is_some() || self.for_s.is_some() || self.every_s.is_some()
    }

    fn by_calls(&self) -> bool {
        self.from_call.is_some() || self.for_calls.is_some() || self.every_calls.is_some()
    }

    /// Whether the rule is on `ms` milliseconds after it was armed, for its `call`-th
    /// matching call (1-based).
    fn contains(&self, ms: u64, call: u64) -> bool {
        let on = |at: u64, from: u64, length: Option<u64>, every: Option<u64>| {
            let Some(since) = at.checked_sub(from) else {
                return false;
            };
            let Some(length) = length else { return true };
            let phase = match every {
                Some(every) => since % every,
                None => since,
            };
            phase < length
        };
        if self.by_time() {
            on(ms, self.from_s.unwrap_or(0), self.for_s, self.every_s)
        } else {
            on(
                call,
                self.from_call.unwrap_or(1),
                self.for_calls,
                self.every_calls,
            )
        }
    }
}

/// Longest delay a rule may add to a call: ten minutes.
pub const MAX_DELAY_MS: u64 = 600_000;

/// One fault rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// Optional label, so a rule can be cleared by name.
    #[serde(default)]
    pub name: Option<String>,
    pub op: FaultOp,
    #[serde(default)]
    pub range: Option<ByteRange>,
    /// The error a matching call fails with; `None` for a hang or a delay alone.
    #[serde(default)]
    pub errno: Option<Errno>,
    /// A matching call waits until the rule is cleared instead of failing.
    #[serde(default)]
    pub hang: bool,
    #[serde(default)]
    pub when: Trigger,
    /// Milliseconds a call the rule hits waits before it goes on (or fails).
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// The chance that a call the rule would hit is hit.
    #[serde(default)]
    pub probability: Option<Probability>,
    /// The seed of this rule's chances (else the plan's).
    #[serde(default)]
    pub seed: Option<u64>,
    /// When the rule is on (always, if none).
    #[serde(default)]
    pub active: Option<Window>,
}

impl fmt::Display for FaultRule {
    /// One line: `flush: fails EIO, once, 30% (seed 7), on from 10 s for 5 s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: Vec<&str> = [(0b001, "read"), (0b010, "write"), (0b100, "flush")]
            .into_iter()
            .filter(|(b, _)| self.op.bits() & b != 0)
            .map(|(_, n)| n)
            .collect();
        write!(f, "{}", ops.join("+"))?;
        if let Some(r) = self.range {
            write!(f, " [{}, +{})", r.offset, r.len)?;
        }
        f.write_str(":")?;
        if let Some(ms) = self.delay_ms {
            write!(f, " waits {ms} ms,")?;
        }
        match (self.errno, self.hang) {
            (Some(e), _) => write!(f, " fails {}", crate::errno_name(e.0))?,
            (None, true) => f.write_str(" hangs until cleared")?,
            (None, false) => f.write_str(" goes on")?,
        }
        match self.when {
            Trigger::Always => {}
            Trigger::Once => f.write_str(", once")?,
            Trigger::Nth(n) => write!(f, ", the {n}th counted call")?,
            Trigger::AfterBytes(n) => write!(f, ", after {n} bytes written")?,
        }
        if let Some(p) = self.probability {
            let percent = format!("{:.4}", p.0 as f64 * 100.0 / (1u64 << 32) as f64);
            let percent = percent.trim_end_matches('0').trim_end_matches('.');
            write!(f, ", {percent}% (seed {})", self.seed.unwrap_or(0))?;
        }
        if let Some(w) = self.active {
            if w.by_time() {
                write!(f, ", on from {} s", w.from_s.unwrap_or(0) as f64 / 1000.0)?;
                if let Some(l) = w.for_s {
                    write!(f, " for {} s", l as f64 / 1000.0)?;
                }
                if let Some(e) = w.every_s {
                    write!(f, " every {} s", e as f64 / 1000.0)?;
                }
            } else {
                write!(f, ", on from call {}", w.from_call.unwrap_or(1))?;
                if let Some(l) = w.for_calls {
                    write!(f, " for {l} calls")?;
                }
                if let Some(e) = w.every_calls {
                    write!(f, " every {e} calls")?;
                }
            }
        }
        if let Some(n) = &self.name {
            write!(f, " ({n})")?;
        }
        Ok(())
    }
}

impl FaultRule {
    pub fn new(op: FaultOp, errno: i32, when: Trigger) -> Self {
        FaultRule {
            name: None,
            op,
            range: None,
            errno: Some(Errno(errno)),
            hang: false,
            when,
            delay_ms: None,
            probability: None,
            seed: None,
            active: None,
        }
    }

    /// Matching calls wait until the rule is cleared.
    pub fn hang(op: FaultOp) -> Self {
        FaultRule {
            errno: None,
            hang: true,
            ..FaultRule::new(op, 0, Trigger::Always)
        }
    }

    /// Matching calls wait `ms` milliseconds, then go on.
    pub fn delay(op: FaultOp, ms: u64) -> Self {
        FaultRule {
            errno: None,
            delay_ms: Some(ms),
            ..FaultRule::new(op, 0, Trigger::Always)
        }
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    pub fn in_range(mut self, offset: u64, len: u64) -> Self {
        self.range = Some(ByteRange { offset, len });
        self
    }

    /// Parses one rule from JSON (QMP's fault command passes its argument here).
    pub fn from_json_value(value: serde_json::Value) -> Result<Self, PlanError> {
        let rule: FaultRule =
            serde_path_to_error::deserialize(value).map_err(|e| PlanError::Invalid {
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        rule.validate("")?;
        Ok(rule)
    }

    fn validate(&self, at: &str) -> Result<(), PlanError> {
        let bad = |field: &str, message: &str| PlanError::Invalid {
            field: format!("{at}{field}"),
            message: message.to_owned(),
        };
        match self.when {
            Trigger::Nth(0) => {
                return Err(bad(
                    "when.nth",
                    "must be 1 or more (the first matching call is 1)",
                ))
            }
            Trigger::AfterBytes(_) if self.op.only(FaultOp::Read) => {
                return Err(bad(
                    "when.after_bytes",
                    "counts bytes written, so it cannot apply to reads",
                ))
            }
            _ => {}
        }
        match (self.errno, self.hang, self.delay_ms) {
            (Some(_), true, _) => {
                return Err(bad(
                    "hang",
                    "a rule either fails calls (errno) or hangs them, not both",
                ))
            }
            (_, true, Some(_)) => {
                return Err(bad(
                    "delay_ms",
                    "a hang lasts until the rule is cleared: no delay with it",
                ))
            }
            (None, false, None) => return Err(bad(
                "errno",
                "missing: give the errno a matching call fails with, a delay_ms, or \"hang\": true",
            )),
            (None, true, None) if self.when != Trigger::Always => {
                return Err(bad(
                    "when",
                    "a hang lasts until the rule is cleared: `when` must be \"always\"",
                ))
            }
            _ => {}
        }
        if self.delay_ms.is_some_and(|d| d == 0 || d > MAX_DELAY_MS) {
            return Err(bad("delay_ms", "from 1 to 600000 (ten minutes)"));
        }
        if self.hang && self.probability.is_some() {
            return Err(bad(
                "probability",
                "a hang holds every matching call until it is cleared",
            ));
        }
        if let Some(w) = self.active {
            if w.by_time() && w.by_calls() {
                return Err(bad(
                    "active",
                    "by time (from_s, for_s, every_s) or by calls (from_call, for_calls, every_calls), not both",
                ));
            }
            if !w.by_time() && !w.by_calls() {
                return Err(bad("active", "empty: say from when, for how long"));
            }
            if w.from_call == Some(0) {
                return Err(bad("active.from_call", "the first matching call is 1"));
            }
            if w.for_s == Some(0) || w.for_calls == Some(0) {
                return Err(bad("active", "a window of 0 is never on"));
            }
            match (w.for_s, w.every_s, w.for_calls, w.every_calls) {
                (None, Some(_), _, _) | (_, _, None, Some(_)) => {
                    return Err(bad("active", "`every` repeats a `for`: give both"))
                }
                (Some(f), Some(e), _, _) | (_, _, Some(f), Some(e)) if e < f => {
                    return Err(bad("active", "`every` is shorter than `for`: always on"))
                }
                _ => {}
            }
        }
        if let Some(r) = self.range {
            if r.len == 0 {
                return Err(bad("range.len", "must be more than 0"));
            }
            if r.offset.checked_add(r.len).is_none() {
                return Err(bad("range", "offset + len is past 2^64"));
            }
            if self.op.only(FaultOp::Flush) {
                return Err(bad("range", "a flush has no byte range"));
            }
        }
        Ok(())
    }

    fn matches(&self, op: HostOp, range: Option<(u64, u64)>) -> bool {
        if !self.op.matches(op) {
            return false;
        }
        match (self.range, range) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(r), Some((offset, len))) => {
                offset < r.offset.saturating_add(r.len)
                    && r.offset < offset.saturating_add(len.max(1))
            }
        }
    }
}

/// A set of rules, as loaded from a plan file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultPlan {
    /// The seed of the rules' chances (a rule's own `seed` comes first).
    #[serde(default)]
    pub seed: Option<u64>,
    pub rules: Vec<FaultRule>,
}

/// A plan that cannot be used. The message names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read fault plan {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fault plan is not valid JSON: {0}")]
    Syntax(String),
    #[error("fault plan field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

impl FaultPlan {
    pub fn from_json(text: &str) -> Result<Self, PlanError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let plan: FaultPlan = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                PlanError::Syntax(inner.to_string())
            } else {
                PlanError::Invalid {
                    field,
                    message: inner.to_string(),
                }
            }
        })?;
        for (i, rule) in plan.rules.iter().enumerate() {
            rule.validate(&format!("rules[{i}]."))?;
        }
        Ok(plan)
    }

    /// The rules, each with the plan's seed unless it has its own.
    pub fn seeded_rules(&self) -> Vec<FaultRule> {
        self.rules
            .iter()
            .map(|r| FaultRule {
                seed: r.seed.or(self.seed),
                ..r.clone()
            })
            .collect()
    }

    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }
}

#[derive(Debug)]
struct ArmedRule {
    id: u64,
    rule: FaultRule,
    /// Calls it matched, on or off.
    seen: u64,
    /// Calls it matched while on (what `when` counts).
    matched: u64,
    bytes_at_arm: u64,
    armed_at: std::time::Instant,
}

#[derive(Debug, Default)]
struct FaultState {
    rules: Vec<ArmedRule>,
    next_id: u64,
    bytes_written: u64,
    injected: u64,
    /// Calls waiting on a hang rule.
    hanging: usize,
}

/// What a rule does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Fail, after waiting this long.
    Fail { errno: i32, delay_ms: u64 },
    /// Wait this long, then go on.
    Delay(u64),
    /// Wait until the rule with this id is cleared.
    Hang(u64),
}

/// A draw from a rule's chances: the same for the same seed, rule and call.
fn draw(seed: u64, rule: u64, call: u64) -> u64 {
    // splitmix64
    let mut z = seed ^ rule.rotate_left(32) ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl FaultState {
    /// What happens to a call: fails, waits or hangs. Every matching rule that is on
    /// counts the call; the first that hits it decides.
    fn check(&mut self, op: HostOp, range: Option<(u64, u64)>) -> Option<Action> {
        let mut fired = None;
        let written = self.bytes_written;
        let now = std::time::Instant::now();
        self.rules.retain_mut(|armed| {
            if !armed.rule.matches(op, range) {
                return true;
            }
            armed.seen += 1;
            let ms = now.duration_since(armed.armed_at).as_millis() as u64;
            if armed
                .rule
                .active
                .is_some_and(|w| !w.contains(ms, armed.seen))
            {
                return true;
            }
            armed.matched += 1;
            let (fires, retire_at_hit, retire) = match armed.rule.when {
                Trigger::Always => (true, false, false),
                Trigger::Once => (true, true, false),
                Trigger::Nth(n) => (armed.matched == n, false, armed.matched >= n),
                Trigger::AfterBytes(n) => (written - armed.bytes_at_arm >= n, false, false),
            };
            let seed = armed.rule.seed.unwrap_or(0);
            let hit = fires
                && armed
                    .rule
                    .probability
                    .is_none_or(|p| p.hits(draw(seed, armed.id, armed.matched)));
            if hit && fired.is_none() {
                let delay_ms = armed.rule.delay_ms.unwrap_or(0);
                fired = Some(match (armed.rule.errno, armed.rule.hang) {
                    (Some(errno), _) => Action::Fail {
                        errno: errno.0,
                        delay_ms,
                    },
                    (None, true) => Action::Hang(armed.id),
                    (None, false) => Action::Delay(delay_ms),
                });
            }
            !(retire || (retire_at_hit && hit))
        });
        if fired.is_some() {
            self.injected += 1;
        }
        fired
    }
}

/// Arms and clears rules of a [`FaultInjector`] from anywhere; clones share state.
#[derive(Debug, Clone, Default)]
pub struct FaultHandle {
    state: Arc<Mutex<FaultState>>,
    /// Wakes calls waiting on a hang rule when rules are cleared.
    cleared: Arc<Condvar>,
}

impl FaultHandle {
    /// Arms a rule; returns its id.
    pub fn arm(&self, rule: FaultRule) -> u64 {
        let mut s = lock(&self.state);
        s.next_id += 1;
        let id = s.next_id;
        let bytes_at_arm = s.bytes_written;
        s.rules.push(ArmedRule {
            id,
            rule,
            seen: 0,
            matched: 0,
            bytes_at_arm,
            armed_at: std::time::Instant::now(),
        });
        id
    }

    /// Arms every rule of `plan`, in order, each with the plan's seed unless it has
    /// its own.
    pub fn arm_plan(&self, plan: &FaultPlan) -> Vec<u64> {
        plan.seeded_rules()
            .into_iter()
            .map(|r| self.arm(r))
            .collect()
    }

    /// Clears one rule by id; false if there was none.
    pub fn clear(&self, id: u64) -> bool {
        let mut s = lock(&self.state);
        let before = s.rules.len();
        s.rules.retain(|r| r.id != id);
        self.cleared.notify_all();
        s.rules.len() != before
    }

    /// Clears every rule with this name; returns how many.
    pub fn clear_named(&self, name: &str) -> usize {
        let mut s = lock(&self.state);
        let before = s.rules.len();
        s.rules.retain(|r| r.rule.name.as_deref() != Some(name));
        self.cleared.notify_all();
        before - s.rules.len()
    }

    pub fn clear_all(&self) {
        lock(&self.state).rules.clear();
        self.cleared.notify_all();
    }

    /// How many calls wait on a hang rule now.
    pub fn hanging(&self) -> usize {
        lock(&self.state).hanging
    }

    /// The armed rules with their ids.
    pub fn rules(&self) -> Vec<(u64, FaultRule)> {
        lock(&self.state)
            .rules
            .iter()
            .map(|r| (r.id, r.rule.clone()))
            .collect()
    }

    /// How many calls have been failed so far.
    /// Bytes written through the injector (calls that reached the backend and
    /// succeeded), since it was made.
    pub fn bytes_written(&self) -> u64 {
        lock(&self.state).bytes_written
    }

    pub fn injected(&self) -> u64 {
        lock(&self.state).injected
    }

    fn check(&self, op: HostOp, range: Option<(u64, u64)>) -> Result<(), HostError> {
        let mut s = lock(&self.state);
        let action = s.check(op, range);
        let wait = |ms: u64| {
            if ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        };
        match action {
            Some(Action::Fail { errno, delay_ms }) => {
                drop(s);
                wait(delay_ms);
                Err(HostError::new(op, errno))
            }
            Some(Action::Delay(ms)) => {
                drop(s);
                wait(ms);
                Ok(())
            }
            Some(Action::Hang(id)) => {
                s.hanging += 1;
                while s.rules.iter().any(|r| r.id == id) {
                    s = self.cleared.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                s.hanging -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn count_written(&self, bytes: u64) {
        lock(&self.state).bytes_written += bytes;
    }
}

/// A [`FaultInjector`]'s rules in front of calls that run beside each other.
#[derive(Debug)]
struct FaultIo {
    inner: std::sync::Arc<dyn crate::backend::SharedIo>,
    handle: FaultHandle,
}

impl crate::backend::SharedIo for FaultIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        self.handle
            .check(HostOp::Read, Some((offset, buf.len() as u64)))?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        self.handle
            .check(HostOp::Write, Some((offset, buf.len() as u64)))?;
        self.inner.write_at(buf, offset)?;
        self.handle.count_written(buf.len() as u64);
        Ok(())
    }

    fn write_borrowed_at(
        &self,
        src: &[crate::bytes::Borrowed],
        offset: u64,
    ) -> Result<(), HostError> {
        let len: u64 = src.iter().map(|b| b.len() as u64).sum();
        self.handle.check(HostOp::Write, Some((offset, len)))?;
        self.inner.write_borrowed_at(src, offset)?;
        self.handle.count_written(len);
        Ok(())
    }

    fn flush(&self) -> Result<(), HostError> {
        self.handle.check(HostOp::Flush, None)?;
        self.inner.flush()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        self.inner.start_writeback(offset, len)
    }
}

/// A backend that fails calls by rule before they reach `inner`.
#[derive(Debug)]
pub struct FaultInjector<B> {
    inner: B,
    handle: FaultHandle,
}

impl<B: Backend> FaultInjector<B> {
    pub fn new(inner: B) -> Self {
        FaultInjector {
            inner,
            handle: FaultHandle::default(),
        }
    }

    pub fn with_plan(inner: B, plan: &FaultPlan) -> Self {
        let injector = Self::new(inner);
        injector.handle.arm_plan(plan);
        injector
    }

    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: Backend> Backend for FaultInjector<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), HostError> {
        self.handle
            .check(HostOp::Read, Some((offset, buf.len() as u64)))?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), HostError> {
        self.handle
            .check(HostOp::Write, Some((offset, buf.len() as u64)))?;
        self.inner.write_at(buf, offset)?;
        self.handle.count_written(buf.len() as u64);
        Ok(())
    }

    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> Result<(), HostError> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.handle.check(HostOp::Write, Some((offset, len)))?;
        self.inner.write_vectored_at(bufs, offset)?;
        self.handle.count_written(len);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), HostError> {
        self.handle.check(HostOp::Flush, None)?;
        self.inner.flush()
    }

    fn shared_io(&self) -> Option<std::sync::Arc<dyn crate::backend::SharedIo>> {
        let inner = self.inner.shared_io()?;
        Some(std::sync::Arc::new(FaultIo {
            inner,
            handle: self.handle.clone(),
        }))
    }

    fn start_writeback(&mut self, offset: u64, len: u64) {
        self.inner.start_writeback(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), HostError> {
        self.handle
            .check(HostOp::WriteZeroes, Some((offset, len)))?;
        self.inner.write_zeroes(offset, len, unmap)?;
        self.handle.count_written(len);
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), HostError> {
        self.handle.check(HostOp::Discard, Some((offset, len)))?;
        self.inner.discard(offset, len)
    }

    // Rules stay armed across a detach and an attach: they belong to the disk.
    fn detach(&mut self) -> Result<(), crate::backend::AttachError> {
        self.inner.detach()
    }

    fn attach(&mut self, path: Option<&Path>) -> Result<(), crate::backend::AttachError> {
        self.inner.attach(path)
    }

    fn is_detached(&self) -> bool {
        self.inner.is_detached()
    }

    fn image(&self) -> Option<&Path> {
        self.inner.image()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBackend;

    fn injector() -> (FaultInjector<MemBackend>, FaultHandle) {
        let f = FaultInjector::new(MemBackend::new(1 << 16));
        let h = f.handle();
        (f, h)
    }

    #[test]
    fn once_fires_once_and_skips_the_backend() {
        let (mut f, h) = injector();
        h.arm(FaultRule::new(FaultOp::Write, libc::EIO, Trigger::Once));
        let e = f.write_at(&[7; 8], 0).expect_err("first write fails");
        assert_eq!((e.op, e.errno), (HostOp::Write, libc::EIO));
        assert_eq!(
            f.inner().contents()[0],
            0,
            "failed write must not reach the backend"
        );
        f.write_at(&[7; 8], 0).expect("second write passes");
        assert!(h.rules().is_empty());
        assert_eq!(h.injected(), 1);
    }

    #[test]
    fn nth_counts_only_matching_calls() {
        let (mut f, h) = injector();
        h.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Nth(3)));
        f.write_at(&[1], 0).expect("writes do not count");
        f.flush().expect("1");
        f.flush().expect("2");
        assert!(f.flush().is_err(), "3rd flush fails");
        f.flush().expect("then retired");
    }

    #[test]
    fn range_limits_matches() {
        let (mut f, h) = injector();
        h.arm(FaultRule::new(FaultOp::Any, libc::EIO, Trigger::Always).in_range(4096, 4096));
        f.write_at(&[1; 4096], 0).expect("before the range");
        f.write_at(&[1; 4096], 8192).expect("after the range");
        assert!(f.write_at(&[1; 2], 4095).is_err(), "straddles the start");
        let mut buf = [0; 10];
        assert!(f.read_at(&mut buf, 5000).is_err());
        f.flush().expect("flush has no range");
    }

    #[test]
    fn after_bytes_counts_from_arming_until_cleared() {
        let (mut f, h) = injector();
        f.write_at(&[1; 1000], 0).expect("before arming");
        let id = h.arm(FaultRule::new(
            FaultOp::Write,
            libc::ENOSPC,
            Trigger::AfterBytes(1024),
        ));
        f.write_at(&[1; 512], 0).expect("512");
        f.write_at(&[1; 512], 512).expect("1024");
        let e = f.write_at(&[1; 1], 0).expect_err("full");
        assert_eq!(e.errno, libc::ENOSPC);
        assert!(f.write_at(&[1; 1], 0).is_err(), "stays full");
        f.flush().expect("flushes unaffected");
        assert!(h.clear(id));
        f.write_at(&[1; 1], 0).expect("cleared");
    }

    #[test]
    fn clear_named() {
        let (mut f, h) = injector();
        h.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always).named("outage"));
        h.arm(FaultRule::new(FaultOp::Read, libc::EIO, Trigger::Always).named("outage"));
        assert!(f.flush().is_err());
        assert_eq!(h.clear_named("outage"), 2);
        f.flush().expect("cleared");
    }

    #[test]
    fn a_hang_waits_until_cleared_then_reaches_the_backend() {
        let (mut f, h) = injector();
        h.arm(FaultRule::hang(FaultOp::Flush).named("stall"));
        f.write_at(&[7; 4], 0).expect("writes do not hang");
        let flusher = std::thread::spawn(move || {
            f.flush().expect("the flush goes on after the hang");
            f
        });
        // The flush is waiting: the handle says so, and it stays so until cleared.
        while h.hanging() == 0 {
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!flusher.is_finished(), "returned during the hang");
        assert_eq!(h.hanging(), 1);
        assert_eq!(h.clear_named("stall"), 1);
        let mut f = flusher.join().expect("flusher");
        assert_eq!(h.hanging(), 0);
        let mut buf = [0; 4];
        f.read_at(&mut buf, 0).expect("read");
        assert_eq!(buf, [7; 4]);
    }

    #[test]
    fn a_hang_rule_is_parsed_and_checked() {
        let rule = FaultRule::from_json_value(serde_json::json!({"op": "any", "hang": true}))
            .expect("a hang rule");
        assert_eq!(rule, FaultRule::hang(FaultOp::Any));
        let e = plan_error(r#"{"rules": [{"op": "any", "hang": true, "errno": "EIO"}]}"#);
        assert!(e.contains("rules[0].hang") && e.contains("not both"), "{e}");
        let e = plan_error(r#"{"rules": [{"op": "any", "hang": true, "when": "once"}]}"#);
        assert!(e.contains("rules[0].when") && e.contains("always"), "{e}");
        let e = plan_error(r#"{"rules": [{"op": "any"}]}"#);
        assert!(e.contains("rules[0].errno") && e.contains("hang"), "{e}");
    }

    #[test]
    fn parses_a_plan() {
        let plan = FaultPlan::from_json(
            r#"{ "rules": [
                { "name": "full", "op": "write", "errno": "ENOSPC", "when": { "after_bytes": 4096 } },
                { "op": "flush", "errno": "EIO", "when": "once" },
                { "op": "read", "range": { "offset": 0, "len": 512 }, "errno": 5, "when": { "nth": 2 } },
                { "op": "any", "errno": "edquot" }
            ] }"#,
        )
        .expect("valid plan");
        assert_eq!(plan.rules.len(), 4);
        assert_eq!(plan.rules[0].when, Trigger::AfterBytes(4096));
        assert_eq!(plan.rules[2].errno, Some(Errno(libc::EIO)));
        assert_eq!(plan.rules[3].when, Trigger::Always);
        assert_eq!(plan.rules[3].errno, Some(Errno(libc::EDQUOT)));
    }

    fn plan_error(text: &str) -> String {
        FaultPlan::from_json(text)
            .expect_err("bad plan")
            .to_string()
    }

    #[test]
    fn bad_plans_name_the_field() {
        let e = plan_error(r#"{"rules": [{"op": "write", "errno": "EFOO"}]}"#);
        assert!(
            e.contains("rules[0].errno") && e.contains("EFOO") && e.contains("ENOSPC"),
            "{e}"
        );
        let e = plan_error(r#"{"rules": [{"op": "write", "erno": "EIO"}]}"#);
        assert!(e.contains("erno"), "{e}");
        let e = plan_error(r#"{"rules": [{"op": "trim", "errno": "EIO"}]}"#);
        assert!(e.contains("rules[0].op") && e.contains("trim"), "{e}");
        let e =
            plan_error(r#"{"rules": [{}, {"op": "flush", "errno": "EIO", "when": {"nth": 0}}]}"#);
        assert!(e.contains("rules[0]") && e.contains("op"), "{e}");
        let e = plan_error(r#"{"rules": [{"op": "flush", "errno": "EIO", "when": {"nth": 0}}]}"#);
        assert!(e.contains("rules[0].when.nth"), "{e}");
        let e = plan_error(
            r#"{"rules": [{"op": "flush", "errno": "EIO", "range": {"offset": 0, "len": 1}}]}"#,
        );
        assert!(e.contains("rules[0].range"), "{e}");
        let e = plan_error(
            r#"{"rules": [{"op": "read", "errno": "EIO", "when": {"after_bytes": 1}}]}"#,
        );
        assert!(e.contains("after_bytes"), "{e}");
        let e = plan_error(r#"{"rules": [{"op": "write", "errno": -3}]}"#);
        assert!(e.contains("rules[0].errno"), "{e}");
        let e = plan_error(r#"{"rules": [{"op": "write", "errno": "EIO", "when": "sometimes"}]}"#);
        assert!(e.contains("rules[0].when"), "{e}");
        let e = plan_error(r#"{"rules": [ "#);
        assert!(e.contains("not valid JSON") && e.contains("line 1"), "{e}");
        // An offset and length that overflow (armed over QMP, this panicked the
        // device thread when a write was checked against it).
        let e = plan_error(
            r#"{"rules": [{"op": "write", "errno": "EIO", "range": {"offset": 18446744073709551000, "len": 4096}}]}"#,
        );
        assert!(e.contains("rules[0].range") && e.contains("2^64"), "{e}");
    }

    #[test]
    fn ranges_at_the_end_of_the_address_space_do_not_overflow() {
        let (mut f, h) = injector();
        let mut rule = FaultRule::new(FaultOp::Any, libc::EIO, Trigger::Always);
        rule.range = Some(ByteRange {
            offset: u64::MAX - 10,
            len: 10,
        });
        h.arm(rule);
        // A call near the end must be checked without overflowing either range.
        assert!(f
            .handle
            .check(HostOp::Write, Some((u64::MAX - 5, u64::MAX)))
            .is_err());
        assert!(f.handle.check(HostOp::Write, Some((0, 4096))).is_ok());
        assert!(f.write_at(&[0; 16], 0).is_ok());
    }

    #[test]
    fn loads_a_plan_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("plan.json");
        std::fs::write(
            &path,
            r#"{"rules": [{"op": "flush", "errno": "EIO", "when": "once"}]}"#,
        )
        .expect("write");
        let plan = FaultPlan::load(&path).expect("load");
        let (mut f, h) = injector();
        h.arm_plan(&plan);
        assert!(f.flush().is_err());
        f.flush().expect("once");
        let missing = dir.path().join("missing.json");
        let e = FaultPlan::load(&missing).expect_err("missing");
        assert!(e.to_string().contains("missing.json"), "{e}");
    }

    #[test]
    fn rule_from_json_value() {
        let rule = FaultRule::from_json_value(serde_json::json!({"op": "flush", "errno": "EIO"}))
            .expect("valid");
        assert_eq!(rule.op, FaultOp::Flush);
        let e = FaultRule::from_json_value(serde_json::json!({"op": "flush", "errno": true}))
            .expect_err("bad errno");
        assert!(e.to_string().contains("errno"), "{e}");
    }

    /// Which of `n` flushes a plan's rules fail, in order.
    fn flush_outcomes(plan: &str, n: usize) -> Vec<bool> {
        let plan = FaultPlan::from_json(plan).expect("valid plan");
        let (mut f, h) = injector();
        h.arm_plan(&plan);
        (0..n).map(|_| f.flush().is_err()).collect()
    }

    #[test]
    fn a_probability_hits_by_the_seed_the_same_in_every_run() {
        let plan = |seed: u64| {
            format!(
                r#"{{"seed": {seed}, "rules": [{{"op": "flush", "errno": "EIO", "probability": 0.3}}]}}"#
            )
        };
        let a = flush_outcomes(&plan(7), 2000);
        assert_eq!(
            a,
            flush_outcomes(&plan(7), 2000),
            "the same seed, the same calls hit"
        );
        assert_ne!(
            a,
            flush_outcomes(&plan(8), 2000),
            "another seed, other calls"
        );
        let hits = a.iter().filter(|&&h| h).count();
        assert!((450..750).contains(&hits), "about 30% of 2000: {hits}");
        assert!(flush_outcomes(
            r#"{"rules": [{"op": "flush", "errno": "EIO", "probability": 0}]}"#,
            100
        )
        .iter()
        .all(|&h| !h));
        assert!(flush_outcomes(
            r#"{"rules": [{"op": "flush", "errno": "EIO", "probability": 1}]}"#,
            100
        )
        .iter()
        .all(|&h| h));
        // A rule's own seed comes first; other rules do not move its draws.
        let alone = flush_outcomes(
            r#"{"seed": 1, "rules": [{"op": "flush", "errno": "EIO", "probability": 0.5, "seed": 9}]}"#,
            300,
        );
        let beside = flush_outcomes(
            r#"{"seed": 2, "rules": [{"op": "flush", "errno": "EIO", "probability": 0.5, "seed": 9},
                                     {"op": "write", "errno": "EIO", "probability": 0.5}]}"#,
            300,
        );
        assert_eq!(alone, beside);
    }

    #[test]
    fn a_window_of_calls_turns_a_rule_on_and_off() {
        let got = flush_outcomes(
            r#"{"rules": [{"op": "flush", "errno": "EIO", "active": {"from_call": 3, "for_calls": 2, "every_calls": 5}}]}"#,
            12,
        );
        let want: Vec<bool> = [0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
            .iter()
            .map(|&b| b == 1)
            .collect();
        assert_eq!(got, want);
        // `when` counts the calls it sees while on: the 2nd of them fails.
        let got = flush_outcomes(
            r#"{"rules": [{"op": "flush", "errno": "EIO", "when": {"nth": 2}, "active": {"from_call": 4}}]}"#,
            8,
        );
        assert_eq!(got.iter().position(|&h| h), Some(4), "{got:?}");
        assert_eq!(got.iter().filter(|&&h| h).count(), 1);
    }

    #[test]
    fn a_window_in_seconds_turns_a_rule_on_and_off() {
        let plan = FaultPlan::from_json(
            r#"{"rules": [{"op": "flush", "errno": "EIO", "active": {"from_s": 0.2, "for_s": 0.2}}]}"#,
        )
        .expect("valid");
        let (mut f, h) = injector();
        h.arm_plan(&plan);
        f.flush().expect("not on yet");
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert!(f.flush().is_err(), "on from 0.2 s");
        std::thread::sleep(std::time::Duration::from_millis(250));
        f.flush().expect("off after 0.4 s");
    }

    #[test]
    fn a_delay_holds_a_call_then_lets_it_go_or_fail() {
        let (mut f, h) = injector();
        h.arm(FaultRule::delay(FaultOp::Write, 150));
        let t = std::time::Instant::now();
        f.write_at(&[3; 8], 0)
            .expect("a delay alone lets the call go on");
        assert!(t.elapsed() >= std::time::Duration::from_millis(150));
        assert_eq!(f.inner().contents()[0], 3);
        f.flush().expect("flushes are not delayed");
        h.clear_all();
        let plan = FaultPlan::from_json(
            r#"{"rules": [{"op": ["read", "flush"], "errno": "EIO", "delay_ms": 100}]}"#,
        )
        .expect("valid");
        h.arm_plan(&plan);
        let t = std::time::Instant::now();
        assert!(f.flush().is_err());
        assert!(t.elapsed() >= std::time::Duration::from_millis(100));
        let mut buf = [0; 8];
        assert!(f.read_at(&mut buf, 0).is_err(), "reads too");
        f.write_at(&[4; 8], 0).expect("writes are not in the list");
    }

    #[test]
    fn the_new_fields_are_checked_naming_the_field() {
        for (plan, field, words) in [
            (
                r#"{"rules": [{"op": "flush", "errno": "EIO", "probability": 1.5}]}"#,
                "rules[0].probability",
                "from 0 to 1",
            ),
            (
                r#"{"rules": [{"op": "flush", "delay_ms": 0}]}"#,
                "rules[0].delay_ms",
                "from 1",
            ),
            (
                r#"{"rules": [{"op": "flush", "hang": true, "delay_ms": 5}]}"#,
                "rules[0].delay_ms",
                "hang",
            ),
            (
                r#"{"rules": [{"op": "flush", "hang": true, "probability": 0.5}]}"#,
                "rules[0].probability",
                "hang",
            ),
            (
                r#"{"rules": [{"op": "flush", "errno": "EIO", "active": {"from_s": 1, "from_call": 2}}]}"#,
                "rules[0].active",
                "not both",
            ),
            (
                r#"{"rules": [{"op": "flush", "errno": "EIO", "active": {}}]}"#,
                "rules[0].active",
                "empty",
            ),
            (
                r#"{"rules": [{"op": "flush", "errno": "EIO", "active": {"from_call": 0}}]}"#,
                "rules[0].active.from_call",
                "first",
            ),
            (
                r#"{"rules": [{"op": "flush", "errno": "EIO", "active": {"every_s": 5}}]}"#,
                "rules[0].active",
                "give both",
            ),
            (
                r#"{"rules": [{"op": "flush", "errno": "EIO", "active": {"for_calls": 5, "every_calls": 2}}]}"#,
                "rules[0].active",
                "shorter",
            ),
            (
                r#"{"rules": [{"op": "flush", "errno": "EIO", "active": {"from_s": -1}}]}"#,
                "rules[0].active.from_s",
                "seconds",
            ),
            (
                r#"{"rules": [{"op": [], "errno": "EIO"}]}"#,
                "rules[0].op",
                "empty list",
            ),
            (
                r#"{"rules": [{"op": ["flush", "trim"], "errno": "EIO"}]}"#,
                "rules[0].op",
                "",
            ),
            (
                r#"{"rules": [{"op": "flush"}]}"#,
                "rules[0].errno",
                "delay_ms",
            ),
        ] {
            let e = plan_error(plan);
            assert!(e.contains(field) && e.contains(words), "{plan}: {e}");
        }
    }
}
