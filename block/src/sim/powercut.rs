//! Power cuts: the states a disk that honours FLUSH can be left in when the power
//! goes, chosen from its write log ([`crate::writelog`]).
//!
//! Everything before the log's last flush is on the disk. Of the writes after it
//! (the tail, in the order the device completed them), a [`CutMode`] and a seed
//! choose which landed: none, all, a prefix, any subset, or a subset in which a
//! write longer than a sector may land only in part, sector by sector. The same log,
//! mode and seed always give the same state.

use std::fmt;
use std::os::unix::fs::FileExt;
use std::str::FromStr;

use crate::writelog::{LogEntry, LOG_SECTOR};

use super::matrix::Rng;

/// Which of the writes after the last completed flush a power cut keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// None of them.
    None,
    /// All of them.
    All,
    /// Those completed before a point the seed picks.
    Prefix,
    /// Each one or not, by the seed.
    Subset,
    /// `Subset`, and a write longer than a sector lands sector by sector, each one or
    /// not.
    Torn,
}

impl CutMode {
    pub const ALL: [CutMode; 5] = [
        CutMode::None,
        CutMode::All,
        CutMode::Prefix,
        CutMode::Subset,
        CutMode::Torn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CutMode::None => "none",
            CutMode::All => "all",
            CutMode::Prefix => "prefix",
            CutMode::Subset => "subset",
            CutMode::Torn => "torn",
        }
    }

    /// The modes' names, for help texts and errors.
    pub fn names() -> String {
        CutMode::ALL.map(CutMode::as_str).join(", ")
    }
}

impl fmt::Display for CutMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CutMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        CutMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a power-cut mode ({})", CutMode::names()))
    }
}

/// How much of one write after the last flush landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landed {
    Whole,
    Not,
    /// One flag per sector, in order.
    Sectors(Vec<bool>),
}

/// One crash state: what of the log is on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashState {
    pub mode: CutMode,
    pub seed: u64,
    /// Log entries up to and including the last flush (all on the disk).
    pub stable: usize,
    /// The writes and discards after it, each with what landed.
    pub tail: Vec<Landed>,
}

impl CrashState {
    /// Picks a state from a log's entries.
    pub fn choose(entries: &[LogEntry], mode: CutMode, seed: u64) -> CrashState {
        let stable = entries
            .iter()
            .rposition(|e| *e == LogEntry::Flush)
            .map_or(0, |i| i + 1);
        let after: Vec<&LogEntry> = entries[stable..]
            .iter()
            .filter(|e| matches!(e, LogEntry::Write { .. } | LogEntry::Discard { .. }))
            .collect();
        // xorshift must not start at 0; splitmix the seed so that near seeds differ.
        let mut rng = Rng(splitmix(seed) | 1);
        let mut coin = move || rng.next_u64() & 1 == 1;
        let n = after.len();
        let tail = match mode {
            CutMode::None => vec![Landed::Not; n],
            CutMode::All => vec![Landed::Whole; n],
            CutMode::Prefix => {
                let cut = (splitmix(seed ^ 0x5eed) % (n as u64 + 1)) as usize;
                (0..n)
                    .map(|i| if i < cut { Landed::Whole } else { Landed::Not })
                    .collect()
            }
            CutMode::Subset => (0..n)
                .map(|_| if coin() { Landed::Whole } else { Landed::Not })
                .collect(),
            CutMode::Torn => after
                .iter()
                .map(|e| {
                    if !coin() {
                        return Landed::Not;
                    }
                    let sectors = match e {
                        LogEntry::Write { data, .. } => data.len() as u64 / LOG_SECTOR,
                        LogEntry::Discard { len, .. } => len / LOG_SECTOR,
                        _ => 1,
                    };
                    if sectors <= 1 {
                        return Landed::Whole;
                    }
                    let each: Vec<bool> = (0..sectors).map(|_| coin()).collect();
                    // Every sector or none is not torn: counted as what it is.
                    if each.iter().all(|b| *b) {
                        Landed::Whole
                    } else if !each.iter().any(|b| *b) {
                        Landed::Not
                    } else {
                        Landed::Sectors(each)
                    }
                })
                .collect(),
        };
        CrashState {
            mode,
            seed,
            stable,
            tail,
        }
    }

    /// How many writes after the last flush landed whole, in part, and not at all.
    pub fn counts(&self) -> (usize, usize, usize) {
        let whole = self.tail.iter().filter(|l| **l == Landed::Whole).count();
        let part = self
            .tail
            .iter()
            .filter(|l| matches!(l, Landed::Sectors(_)))
            .count();
        (whole, part, self.tail.len() - whole - part)
    }

    /// One line: the mode, the seed, what landed, and a fingerprint of which
    /// writes and sectors landed (two states with the same counts and another
    /// choice differ in it).
    pub fn describe(&self) -> String {
        let (whole, part, not) = self.counts();
        format!(
            "{} seed {}: {} entries up to the last flush; after it {} writes: {whole} landed, {part} torn, {not} lost (choice {:016x})",
            self.mode,
            self.seed,
            self.stable,
            self.tail.len(),
            self.fingerprint()
        )
    }

    /// FNV-1a over what landed of each write after the last flush, in order.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: u8| {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        for l in &self.tail {
            match l {
                Landed::Not => eat(0),
                Landed::Whole => eat(1),
                Landed::Sectors(v) => {
                    eat(2);
                    v.iter().for_each(|b| eat(u8::from(*b)));
                    eat(3);
                }
            }
        }
        h
    }

    /// Writes the state onto `image`, which holds the disk as it was when the log
    /// began: the stable entries, then what landed of the tail, in log order (a
    /// discard leaves zeroes, as holdfast's file backend does).
    pub fn apply(&self, entries: &[LogEntry], image: &impl FileExt) -> std::io::Result<()> {
        let put = |offset: u64, data: &[u8]| image.write_all_at(data, offset);
        let zero = |offset: u64, len: u64| -> std::io::Result<()> {
            let z = vec![0u8; len.min(1 << 20) as usize];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(z.len() as u64);
                image.write_all_at(&z[..n as usize], offset + at)?;
                at += n;
            }
            Ok(())
        };
        for e in &entries[..self.stable] {
            match e {
                LogEntry::Write { offset, data } => put(*offset, data)?,
                LogEntry::Discard { offset, len } => zero(*offset, *len)?,
                LogEntry::Flush | LogEntry::Mark(_) => {}
            }
        }
        let after = entries[self.stable..]
            .iter()
            .filter(|e| matches!(e, LogEntry::Write { .. } | LogEntry::Discard { .. }));
        for (e, landed) in after.zip(&self.tail) {
            let sectors: Vec<bool> = match landed {
                Landed::Not => continue,
                Landed::Whole => Vec::new(),
                Landed::Sectors(s) => s.clone(),
            };
            let s = LOG_SECTOR as usize;
            match e {
                LogEntry::Write { offset, data } if sectors.is_empty() => put(*offset, data)?,
                LogEntry::Write { offset, data } => {
                    for (i, chunk) in data.chunks(s).enumerate() {
                        if sectors.get(i).copied().unwrap_or(false) {
                            put(offset + (i * s) as u64, chunk)?;
                        }
                    }
                }
                LogEntry::Discard { offset, len } if sectors.is_empty() => zero(*offset, *len)?,
                LogEntry::Discard { offset, .. } => {
                    for (i, on) in sectors.iter().enumerate() {
                        if *on {
                            zero(offset + (i * s) as u64, LOG_SECTOR)?;
                        }
                    }
                }
                LogEntry::Flush | LogEntry::Mark(_) => {}
            }
        }
        Ok(())
    }
}

/// SplitMix64's finalizer: spreads a seed's bits.
pub fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(offset: u64, byte: u8, sectors: usize) -> LogEntry {
        LogEntry::Write {
            offset,
            data: vec![byte; sectors * 512],
        }
    }

    fn image_after(entries: &[LogEntry], state: &CrashState) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0xeeu8; 8 * 512]).expect("base");
        let f = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        state.apply(entries, &f).expect("apply");
        std::fs::read(&path).expect("read")
    }

    #[test]
    fn what_a_flush_covered_is_always_there_and_the_modes_choose_the_rest() {
        let log = vec![
            w(0, 1, 1),
            LogEntry::Flush,
            w(512, 2, 1),
            w(1024, 3, 4),
            LogEntry::Discard {
                offset: 0,
                len: 512,
            },
        ];
        for mode in CutMode::ALL {
            for seed in 0..50 {
                let s = CrashState::choose(&log, mode, seed);
                assert_eq!(s.stable, 2);
                assert_eq!(s.tail.len(), 3);
                let img = image_after(&log, &s);
                // The covered write, unless the (later, unflushed) discard landed.
                let discarded = s.tail[2] != Landed::Not;
                assert_eq!(img[0], if discarded { 0 } else { 1 }, "{mode} {seed}");
                assert!(img[512] == 2 || img[512] == 0xee);
            }
        }
        let none = CrashState::choose(&log, CutMode::None, 7);
        assert_eq!(image_after(&log, &none)[512..], vec![0xee; 7 * 512][..]);
        let all = CrashState::choose(&log, CutMode::All, 7);
        let img = image_after(&log, &all);
        assert_eq!(
            (img[0], img[512], img[1024], img[3071], img[3072]),
            (0, 2, 3, 3, 0xee)
        );
    }

    #[test]
    fn a_prefix_is_a_prefix_and_torn_writes_land_sector_by_sector() {
        let log: Vec<LogEntry> = (0..6).map(|i| w(i * 512, i as u8 + 1, 1)).collect();
        let mut lengths = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let s = CrashState::choose(&log, CutMode::Prefix, seed);
            let k = s.tail.iter().take_while(|l| **l == Landed::Whole).count();
            assert!(s.tail[k..].iter().all(|l| *l == Landed::Not), "seed {seed}");
            lengths.insert(k);
        }
        assert_eq!(lengths.len(), 7, "every prefix length 0..=6 comes up");
        let big = vec![w(0, 9, 8)];
        let torn = (0..200)
            .map(|seed| CrashState::choose(&big, CutMode::Torn, seed))
            .find(|s| matches!(&s.tail[0], Landed::Sectors(v) if v.iter().any(|b| *b) && !v.iter().all(|b| *b)))
            .expect("some seed tears the write");
        let img = image_after(&big, &torn);
        let Landed::Sectors(on) = &torn.tail[0] else {
            unreachable!()
        };
        for (i, landed) in on.iter().enumerate() {
            assert_eq!(img[i * 512], if *landed { 9 } else { 0xee }, "sector {i}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_state_and_modes_parse() {
        let log: Vec<LogEntry> = (0..40).map(|i| w(i * 512, 1, 2)).collect();
        for mode in CutMode::ALL {
            assert_eq!(
                CrashState::choose(&log, mode, 42),
                CrashState::choose(&log, mode, 42)
            );
            assert_eq!(mode.as_str().parse::<CutMode>(), Ok(mode));
        }
        assert_ne!(
            CrashState::choose(&log, CutMode::Subset, 1),
            CrashState::choose(&log, CutMode::Subset, 2)
        );
        assert!("half"
            .parse::<CutMode>()
            .expect_err("not a mode")
            .contains("none, all, prefix, subset, torn"));
    }

    #[test]
    fn a_torn_write_is_one_that_landed_in_part_and_the_choice_is_told() {
        // Two sectors: some seeds land both or neither; those are not torn.
        let big = vec![w(0, 9, 2)];
        let states: Vec<CrashState> = (0..200)
            .map(|seed| CrashState::choose(&big, CutMode::Torn, seed))
            .collect();
        for s in &states {
            if let Landed::Sectors(v) = &s.tail[0] {
                assert!(v.iter().any(|b| *b) && !v.iter().all(|b| *b), "{v:?}");
            }
        }
        for want in [(1, 0, 0), (0, 1, 0), (0, 0, 1)] {
            assert!(states.iter().any(|s| s.counts() == want), "{want:?}");
        }
        // The same counts, another choice: the description tells them apart.
        let log: Vec<LogEntry> = (0..8).map(|i| w(i * 512, 1, 1)).collect();
        let a = CrashState::choose(&log, CutMode::Subset, 1);
        let b = (2..200)
            .map(|seed| CrashState::choose(&log, CutMode::Subset, seed))
            .find(|b| b.counts() == a.counts() && b.tail != a.tail)
            .expect("another subset of the same size");
        assert_ne!(a.fingerprint(), b.fingerprint());
        let what = |s: &CrashState| {
            s.describe()
                .split_once(": ")
                .expect("seed: rest")
                .1
                .to_string()
        };
        assert_ne!(what(&a), what(&b), "same counts, told apart");
        assert_eq!(
            a.fingerprint(),
            CrashState::choose(&log, CutMode::Subset, 1).fingerprint()
        );
    }
}
