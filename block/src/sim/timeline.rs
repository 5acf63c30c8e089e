//! What happened during one outage run, against time: acknowledged units, the host's
//! storage state, the VM's run state and QMP events. `holdfast lab` draws it; the
//! synthetic workload ([`super::matrix`]) records one in virtual time, a real guest
//! run in wall-clock time.

use std::fmt;

/// The host storage under the guest's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostState {
    Ok,
    /// Calls fail (EIO, ENOSPC).
    Broken,
    /// Calls do not return.
    Hung,
    /// The host file system is down (shut down, journal aborted).
    Down,
}

/// The VM's run state, as QMP's query-status names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    Running,
    Paused,
    IoError,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Ok => "ok",
            HostState::Broken => "broken",
            HostState::Hung => "hung",
            HostState::Down => "down",
        }
    }
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::IoError => "io-error",
        }
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Times are milliseconds from the start of the run. Each list is in time order; a
/// state holds from its entry until the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    /// When each acknowledged unit was acknowledged.
    pub acks: Vec<u64>,
    pub host: Vec<(u64, HostState)>,
    pub vm: Vec<(u64, VmState)>,
    /// QMP events and operator commands (`BLOCK_IO_ERROR`, `STOP`, `cont refused`, ...).
    pub events: Vec<(u64, String)>,
    /// When the run ended.
    pub end: u64,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            acks: Vec::new(),
            host: vec![(0, HostState::Ok)],
            vm: vec![(0, VmState::Running)],
            events: Vec::new(),
            end: 0,
        }
    }
}

impl Timeline {
    /// Records a host state change (nothing if it is the current state; a state that
    /// lasted no time is replaced).
    pub fn host(&mut self, at: u64, state: HostState) {
        change(&mut self.host, at, state);
    }

    /// Records a VM state change, as [`Timeline::host`].
    pub fn vm(&mut self, at: u64, state: VmState) {
        change(&mut self.vm, at, state);
    }

    pub fn event(&mut self, at: u64, name: impl Into<String>) {
        self.events.push((at, name.into()));
    }

    /// Acknowledged units per whole second, from second 0 to the end.
    pub fn acks_per_second(&self) -> Vec<usize> {
        let mut per = vec![0; (self.end / 1000 + 1) as usize];
        for &t in &self.acks {
            if let Some(n) = per.get_mut((t / 1000) as usize) {
                *n += 1;
            }
        }
        per
    }
}

fn change<S: PartialEq>(states: &mut Vec<(u64, S)>, at: u64, state: S) {
    if states.len() > 1 && states.last().is_some_and(|&(t, _)| t == at) {
        states.pop();
    }
    if states.last().map(|(_, s)| s) != Some(&state) {
        states.push((at, state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_record_changes_only_and_acks_bucket_by_second() {
        let mut t = Timeline::default();
        t.host(10, HostState::Ok);
        t.host(20, HostState::Broken);
        t.vm(30, VmState::IoError);
        t.vm(31, VmState::IoError);
        t.host(40, HostState::Ok);
        t.host(40, HostState::Broken);
        t.acks = vec![5, 999, 1000, 2500];
        t.end = 2600;
        assert_eq!(t.host, vec![(0, HostState::Ok), (20, HostState::Broken)]);
        assert_eq!(t.vm.len(), 2);
        assert_eq!(t.acks_per_second(), vec![2, 1, 1]);
    }
}
