//! Fault injection: a [`Backend`] wrapper that fails host calls by rule, in the
//! spirit of QEMU's blkdebug.
//!
//! A rule names an operation, optionally a byte range, an errno and when it fires.
//! Rules come from a JSON plan file or are armed and cleared at run time through a
//! [`FaultHandle`] (QMP's fault command uses one). A plan looks like:
//!
//! ```json
//! { "rules": [
//!     { "name": "disk-full", "op": "write", "errno": "ENOSPC", "when": { "after_bytes": 1048576 } },
//!     { "op": "flush", "errno": "EIO", "when": "once" },
//!     { "op": "read", "range": { "offset": 0, "len": 4096 }, "errno": 5, "when": { "nth": 3 } }
//! ] }
//! ```
//!
//! `when` is `"always"` (until cleared; the default), `"once"`, `{"nth": N}` (the
//! N-th matching call, once) or `{"after_bytes": N}` (every matching call once N
//! bytes have been written through the injector since the rule was armed, until
//! cleared). `op` is `read`, `write` (also write-zeroes and discard), `flush` or `any`.
//! A failing call does not reach the wrapped backend.
//!
//! Instead of an errno a rule can say `"hang": true` (with `when` `"always"`): a
//! matching call then waits, as on a hard NFS mount or a suspended device-mapper
//! table, until the rule is cleared, and then goes on to the wrapped backend.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use serde::Deserialize;

use crate::backend::{Backend, Capabilities};
use crate::host_error::{errno_from_name, ERRNO_NAMES};
use crate::{lock, HostError, HostOp};

/// Which host calls a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultOp {
    Read,
    /// Writes, write-zeroes and discards.
    Write,
    Flush,
    Any,
}

impl FaultOp {
    fn matches(self, op: HostOp) -> bool {
        match self {
            FaultOp::Any => true,
            FaultOp::Read => op == HostOp::Read,
            FaultOp::Flush => op == HostOp::Flush,
            FaultOp::Write => matches!(op, HostOp::Write | HostOp::WriteZeroes | HostOp::Discard),
        }
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
    /// The error a matching call fails with; `None` for a hang.
    #[serde(default)]
    pub errno: Option<Errno>,
    /// A matching call waits until the rule is cleared instead of failing.
    #[serde(default)]
    pub hang: bool,
    #[serde(default)]
    pub when: Trigger,
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
        }
    }

    /// Matching calls wait until the rule is cleared.
    pub fn hang(op: FaultOp) -> Self {
        FaultRule {
            name: None,
            op,
            range: None,
            errno: None,
            hang: true,
            when: Trigger::Always,
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
            Trigger::AfterBytes(_) if self.op == FaultOp::Read => {
                return Err(bad(
                    "when.after_bytes",
                    "counts bytes written, so it cannot apply to reads",
                ))
            }
            _ => {}
        }
        match (self.errno, self.hang) {
            (Some(_), true) => {
                return Err(bad(
                    "hang",
                    "a rule either fails calls (errno) or hangs them, not both",
                ))
            }
            (None, false) => {
                return Err(bad(
                    "errno",
                    "missing: give the errno a matching call fails with, or \"hang\": true",
                ))
            }
            (None, true) if self.when != Trigger::Always => {
                return Err(bad(
                    "when",
                    "a hang lasts until the rule is cleared: `when` must be \"always\"",
                ))
            }
            _ => {}
        }
        if let Some(r) = self.range {
            if r.len == 0 {
                return Err(bad("range.len", "must be more than 0"));
            }
            if r.offset.checked_add(r.len).is_none() {
                return Err(bad("range", "offset + len is past 2^64"));
            }
            if self.op == FaultOp::Flush {
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
    matched: u64,
    bytes_at_arm: u64,
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
    Fail(i32),
    /// Wait until the rule with this id is cleared.
    Hang(u64),
}

impl FaultState {
    /// Whether a call fails or hangs. Every matching rule counts the call; the first
    /// that fires decides.
    fn check(&mut self, op: HostOp, range: Option<(u64, u64)>) -> Option<Action> {
        let mut fired = None;
        let written = self.bytes_written;
        self.rules.retain_mut(|armed| {
            if !armed.rule.matches(op, range) {
                return true;
            }
            armed.matched += 1;
            let (fires, retire) = match armed.rule.when {
                Trigger::Always => (true, false),
                Trigger::Once => (true, true),
                Trigger::Nth(n) => (armed.matched == n, armed.matched >= n),
                Trigger::AfterBytes(n) => (written - armed.bytes_at_arm >= n, false),
            };
            if fires && fired.is_none() {
                fired = Some(match armed.rule.errno {
                    Some(errno) => Action::Fail(errno.0),
                    None => Action::Hang(armed.id),
                });
            }
            !retire
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
            matched: 0,
            bytes_at_arm,
        });
        id
    }

    pub fn arm_plan(&self, plan: &FaultPlan) -> Vec<u64> {
        plan.rules.iter().map(|r| self.arm(r.clone())).collect()
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
        match s.check(op, range) {
            Some(Action::Fail(errno)) => Err(HostError::new(op, errno)),
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
}
