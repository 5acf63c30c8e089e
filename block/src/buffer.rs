//! The unflushed buffer: per disk, the bytes of guest writes that no successful host
//! flush has covered yet (docs/durability.md, "Words used here").
//!
//! An extent map keyed by byte offset. A newer write replaces the overlapping part of
//! older extents, byte-exact. Every extent carries the sequence number it was handed
//! to the host with; a host flush takes a [`FlushTicket`] before it is issued, and on
//! success releases exactly the extents the ticket covers, so writes issued while a
//! flush is in flight stay. Rewriting an extent (replay) hands it to the host again,
//! so it gets a fresh sequence number and needs a fresh flush.
//!
//! With `keep_extra_flush`, a flush releases only what the *previous* successful flush
//! covered: for hosts that report a write-back error one flush late (ext4
//! `data=journal`), a flush's success is proven only by the next one.

use std::collections::{BTreeMap, HashMap};

use crate::bytes::Bytes;

/// Pieces of a write at most this long that are all that is left of a larger
/// allocation are copied into allocations of their own, so that small parts do not
/// keep a large allocation (and its place under the bound) for long. A longer piece,
/// or one whose allocation stays alive anyway (another piece of it is longer, or
/// another extent keeps a part), shares the allocation: cutting an extent never makes
/// the buffer weigh more, so a write adds at most its own weight.
pub const MAX_EXTENT: u64 = 64 * 1024;

/// The bytes of one extent. Zeroes (from WRITE_ZEROES) take no memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    Bytes(Bytes),
    Zeroes(u64),
}

impl ExtentData {
    pub fn len(&self) -> u64 {
        match self {
            ExtentData::Bytes(b) => b.len() as u64,
            ExtentData::Zeroes(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[from, to)` of this extent: shared with it, or a copy if `copy`.
    fn slice(&self, from: u64, to: u64, copy: bool) -> ExtentData {
        match self {
            ExtentData::Bytes(b) => {
                let (from, to) = (from as usize, to as usize);
                if copy {
                    ExtentData::Bytes(Bytes::copy_from_slice(&b[from..to]))
                } else {
                    ExtentData::Bytes(b.slice(from, to))
                }
            }
            ExtentData::Zeroes(_) => ExtentData::Zeroes(to - from),
        }
    }

    /// Copies `[from, from + dst.len())` of this extent into `dst`.
    fn copy_to(&self, from: u64, dst: &mut [u8]) {
        match self {
            ExtentData::Bytes(b) => {
                dst.copy_from_slice(&b[from as usize..from as usize + dst.len()])
            }
            ExtentData::Zeroes(_) => dst.fill(0),
        }
    }
}

#[derive(Debug, Clone)]
struct Extent {
    seq: u64,
    data: ExtentData,
}

/// What a host flush covers: every extent handed to the host at or before `upto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTicket {
    upto: u64,
}

/// The buffer's size, as `x-query-unflushed` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Unflushed bytes (zero extents count their length).
    pub bytes: u64,
    /// What the bound counts: the memory of every allocation an extent keeps a part
    /// of, plus the length of zero extents. At least `bytes`.
    pub weight: u64,
    pub extents: usize,
    /// The most bytes ever held at once.
    pub peak_bytes: u64,
}

/// An allocation that extents keep parts of.
#[derive(Debug)]
struct Holders {
    len: u64,
    /// The offsets of the extents that keep a part of it.
    at: Vec<u64>,
}

/// The extent map. See the module docs.
#[derive(Debug, Default)]
pub struct UnflushedBuffer {
    extents: BTreeMap<u64, Extent>,
    bytes: u64,
    peak_bytes: u64,
    /// Per allocation the extents keep a part of (not all of): its length and
    /// where those extents are.
    allocations: HashMap<usize, Holders>,
    allocated: u64,
    zero_bytes: u64,
    /// A piece cut from a larger allocation is copied when at most this long
    /// ([`MAX_EXTENT`]; tests lower it).
    copy_upto: u64,
    /// Sequence number of the most recent hand-over to the host; 0 is "none yet".
    last_seq: u64,
    keep_extra_flush: bool,
    /// With `keep_extra_flush`: the previous successful flush, whose extents the next
    /// successful flush releases.
    held: Option<FlushTicket>,
}

impl UnflushedBuffer {
    pub fn new(keep_extra_flush: bool) -> Self {
        UnflushedBuffer {
            keep_extra_flush,
            copy_upto: MAX_EXTENT,
            ..Default::default()
        }
    }

    /// A buffer that copies cut pieces only up to `copy_upto` bytes (tests: so that
    /// short writes share allocations too).
    #[cfg(test)]
    fn copying_upto(keep_extra_flush: bool, copy_upto: u64) -> Self {
        UnflushedBuffer {
            copy_upto,
            ..UnflushedBuffer::new(keep_extra_flush)
        }
    }

    pub fn stats(&self) -> BufferStats {
        BufferStats {
            bytes: self.bytes,
            weight: self.weight(),
            extents: self.extents.len(),
            peak_bytes: self.peak_bytes,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What counts against the bound: the memory of the allocations the extents keep
    /// (a part keeps its whole allocation), plus the length of zero extents.
    pub fn weight(&self) -> u64 {
        self.allocated + self.zero_bytes
    }

    /// Puts an extent in the map, counting what it keeps.
    fn keep(&mut self, offset: u64, e: Extent) {
        match &e.data {
            // All of its allocation: no other extent can share it.
            ExtentData::Bytes(b) if b.len() == b.allocation_len() => {
                self.allocated += b.len() as u64
            }
            ExtentData::Bytes(b) => {
                let entry = self
                    .allocations
                    .entry(b.allocation_id())
                    .or_insert(Holders {
                        len: b.allocation_len() as u64,
                        at: Vec::new(),
                    });
                entry.at.push(offset);
                if entry.at.len() == 1 {
                    self.allocated += entry.len;
                }
            }
            ExtentData::Zeroes(n) => self.zero_bytes += n,
        }
        self.bytes += e.data.len();
        self.extents.insert(offset, e);
    }

    /// Uncounts the extent at `offset`, taken out of the map.
    fn forget(&mut self, offset: u64, e: &Extent) {
        match &e.data {
            ExtentData::Bytes(b) if b.len() == b.allocation_len() => {
                self.allocated -= b.len() as u64
            }
            ExtentData::Bytes(b) => {
                let id = b.allocation_id();
                let entry = self.allocations.get_mut(&id).expect("a kept allocation");
                entry.at.retain(|&o| o != offset);
                if entry.at.is_empty() {
                    self.allocated -= entry.len;
                    self.allocations.remove(&id);
                }
            }
            ExtentData::Zeroes(n) => self.zero_bytes -= n,
        }
        self.bytes -= e.data.len();
    }

    /// Copies what is left of the allocation `id` into allocations of their own when
    /// every extent that keeps a part of it is short ([`MAX_EXTENT`]): the
    /// allocation goes, and the buffer weighs less.
    fn compact(&mut self, id: usize) {
        let Some(holders) = self.allocations.get(&id) else {
            return;
        };
        let short = holders.at.iter().all(|o| {
            self.extents
                .get(o)
                .is_some_and(|e| e.data.len() <= self.copy_upto)
        });
        if !short {
            return;
        }
        for offset in holders.at.clone() {
            let e = self.extents.remove(&offset).expect("a holder is kept");
            self.forget(offset, &e);
            let data = e.data.slice(0, e.data.len(), true);
            self.keep(offset, Extent { seq: e.seq, data });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub fn keeps_extra_flush(&self) -> bool {
        self.keep_extra_flush
    }

    /// Records a write handed to the host at `offset`; it replaces what overlaps it.
    /// Its bytes are kept as they are (shared, not copied).
    pub fn insert(&mut self, offset: u64, data: ExtentData) {
        if data.is_empty() {
            return;
        }
        self.carve(offset, offset + data.len());
        self.last_seq += 1;
        let seq = self.last_seq;
        self.keep(offset, Extent { seq, data });
        self.peak_bytes = self.peak_bytes.max(self.bytes);
    }

    /// Forgets `[offset, offset + len)` (a discard made its content unspecified).
    pub fn remove_range(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.carve(offset, offset.saturating_add(len));
        }
    }

    /// Cuts `[start, end)` out of every extent, keeping the parts outside it.
    fn carve(&mut self, start: u64, end: u64) {
        let mut doomed: Vec<u64> = Vec::new();
        if let Some((&k, e)) = self.extents.range(..start).next_back() {
            if k + e.data.len() > start {
                doomed.push(k);
            }
        }
        doomed.extend(self.extents.range(start..end).map(|(&k, _)| k));
        let mut cut = Vec::new();
        for k in doomed {
            let Some(e) = self.extents.remove(&k) else {
                continue;
            };
            self.forget(k, &e);
            let len = e.data.len();
            if k + len > end {
                let data = e.data.slice(end - k, len, false);
                self.keep(end, Extent { seq: e.seq, data });
            }
            if k < start {
                let data = e.data.slice(0, start - k, false);
                self.keep(k, Extent { seq: e.seq, data });
            }
            if let ExtentData::Bytes(b) = &e.data {
                cut.push(b.allocation_id());
            }
        }
        for id in cut {
            self.compact(id);
        }
    }

    /// Lays the buffered bytes of `[offset, offset + buf.len())` over `buf`.
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for (k, e) in self.overlapping(offset, end) {
            let from = k.max(offset);
            let to = (k + e.data.len()).min(end);
            e.data.copy_to(
                from - k,
                &mut buf[(from - offset) as usize..(to - offset) as usize],
            );
        }
    }

    /// Whether buffered extents cover all of `[offset, offset + len)`.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        let mut at = offset;
        for (k, e) in self.overlapping(offset, end) {
            if k > at {
                return false;
            }
            at = at.max(k + e.data.len());
        }
        at >= end
    }

    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, &Extent)> {
        let before = self
            .extents
            .range(..start)
            .next_back()
            .filter(|(&k, e)| k + e.data.len() > start);
        before
            .into_iter()
            .chain(self.extents.range(start..end))
            .map(|(&k, e)| (k, e))
    }

    /// The extents in offset order, for replay.
    pub fn extents(&self) -> impl Iterator<Item = (u64, &ExtentData)> {
        self.extents.iter().map(|(&k, e)| (k, &e.data))
    }

    /// All extents were just handed to the host again (replay): only a flush issued
    /// from now on covers them.
    pub fn mark_all_rewritten(&mut self) {
        self.last_seq += 1;
        let seq = self.last_seq;
        for e in self.extents.values_mut() {
            e.seq = seq;
        }
        // A flush taken before the rewrite proves nothing about the rewritten bytes.
        self.held = None;
    }

    /// Taken just before a host flush is issued.
    pub fn begin_flush(&self) -> FlushTicket {
        FlushTicket {
            upto: self.last_seq,
        }
    }

    /// The host flush taken with `ticket` succeeded: release what it proves stable.
    /// Returns the bytes released.
    pub fn flushed(&mut self, ticket: FlushTicket) -> u64 {
        let proven = if self.keep_extra_flush {
            self.held.replace(ticket)
        } else {
            Some(ticket)
        };
        match proven {
            Some(t) => self.release_upto(t.upto),
            None => 0,
        }
    }

    fn release_upto(&mut self, upto: u64) -> u64 {
        let before = self.bytes;
        if upto >= self.last_seq {
            self.extents.clear();
            self.allocations.clear();
            self.bytes = 0;
            self.allocated = 0;
            self.zero_bytes = 0;
        } else {
            let released: Vec<u64> = self
                .extents
                .iter()
                .filter(|(_, e)| e.seq <= upto)
                .map(|(&k, _)| k)
                .collect();
            let mut cut = Vec::new();
            for k in released {
                if let Some(e) = self.extents.remove(&k) {
                    self.forget(k, &e);
                    if let ExtentData::Bytes(b) = &e.data {
                        cut.push(b.allocation_id());
                    }
                }
            }
            for id in cut {
                self.compact(id);
            }
        }
        before - self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(v: &[u8]) -> ExtentData {
        ExtentData::Bytes(Bytes::from(v))
    }

    fn read(b: &UnflushedBuffer, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xEE; len];
        b.overlay(offset, &mut buf);
        buf
    }

    #[test]
    fn newest_write_wins_byte_exact() {
        let mut b = UnflushedBuffer::new(false);
        b.insert(10, bytes(&[1; 10]));
        b.insert(15, bytes(&[2; 2]));
        assert_eq!(
            read(&b, 8, 14),
            [0xEE, 0xEE, 1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 0xEE, 0xEE]
        );
        assert_eq!(b.stats().bytes, 10);
        assert_eq!(b.stats().extents, 3);
        b.insert(5, ExtentData::Zeroes(8));
        assert_eq!(
            read(&b, 4, 16),
            [0xEE, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 1]
        );
        assert_eq!(b.stats().bytes, 15);
    }

    #[test]
    fn a_large_write_is_kept_as_it_is_and_weighs_its_allocation() {
        let mut b = UnflushedBuffer::new(false);
        let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let data = Bytes::from(big.clone());
        let at = data.as_ptr();
        b.insert(4096, ExtentData::Bytes(data));
        let kept = |b: &UnflushedBuffer| match b.extents().next() {
            Some((_, ExtentData::Bytes(d))) => d.as_ptr(),
            _ => std::ptr::null(),
        };
        assert_eq!(kept(&b), at, "kept, not copied");
        assert_eq!((b.stats().bytes, b.weight()), (1 << 20, 1 << 20));
        // A small write into the middle: the pieces before and after it share the
        // allocation (the long one keeps it alive anyway: copying the short one
        // would only weigh more).
        let mid = 4096 + (1 << 20) - 1000;
        b.insert(mid, bytes(&[7; 512]));
        assert_eq!(kept(&b), at);
        assert_eq!(b.stats().extents, 3);
        let got = read(&b, 4096, 1 << 20);
        assert_eq!(&got[..(1 << 20) - 1000], &big[..(1 << 20) - 1000]);
        assert!(got[(1 << 20) - 1000..(1 << 20) - 488]
            .iter()
            .all(|&x| x == 7));
        assert_eq!(&got[(1 << 20) - 488..], &big[(1 << 20) - 488..]);
        assert_eq!(b.bytes(), 1 << 20);
        assert_eq!(
            b.weight(),
            (1 << 20) + 512,
            "a write adds its own weight, no more"
        );
        // Overwrite all but a short piece of the large write: the two short pieces
        // left are copied and the large allocation no longer counts (nor stays alive).
        b.insert(4096 + 100, bytes(&vec![9; (1 << 20) - 1100]));
        assert_ne!(kept(&b), at);
        assert_eq!(b.bytes(), 1 << 20);
        // (the new write's allocation is its 1 MiB pool class)
        assert_eq!(b.weight(), 100 + (1 << 20) + 512 + 488);
    }

    #[test]
    fn a_part_that_keeps_a_large_allocation_weighs_all_of_it() {
        let mut b = UnflushedBuffer::new(false);
        let n = 4 * MAX_EXTENT as usize;
        b.insert(0, bytes(&vec![1; n]));
        // Keep a piece longer than MAX_EXTENT (shared) and overwrite the rest.
        b.insert(MAX_EXTENT * 2, bytes(&vec![2; 2 * MAX_EXTENT as usize]));
        assert_eq!(b.bytes(), n as u64);
        assert_eq!(b.weight(), (n + 2 * MAX_EXTENT as usize) as u64);
        let t = b.begin_flush();
        b.flushed(t);
        assert_eq!((b.bytes(), b.weight()), (0, 0));
    }

    #[test]
    fn covers_needs_no_gap() {
        let mut b = UnflushedBuffer::new(false);
        b.insert(0, bytes(&[1; 4]));
        b.insert(4, bytes(&[1; 4]));
        b.insert(10, bytes(&[1; 4]));
        assert!(b.covers(0, 8));
        assert!(b.covers(2, 4));
        assert!(!b.covers(0, 9));
        assert!(!b.covers(9, 2));
        assert!(b.covers(11, 3));
    }

    #[test]
    fn flush_releases_only_what_it_covers() {
        let mut b = UnflushedBuffer::new(false);
        b.insert(0, bytes(&[1; 4]));
        let t = b.begin_flush();
        // Issued while the flush is in flight: must stay.
        b.insert(100, bytes(&[2; 4]));
        b.insert(2, bytes(&[3; 1]));
        assert_eq!(b.flushed(t), 3);
        assert_eq!(read(&b, 0, 4), [0xEE, 0xEE, 3, 0xEE]);
        assert_eq!(b.stats().extents, 2);
        let t = b.begin_flush();
        assert_eq!(b.flushed(t), 5);
        assert!(b.is_empty());
        assert_eq!(b.stats().peak_bytes, 8);
    }

    #[test]
    fn extra_flush_keeps_extents_one_more_flush() {
        let mut b = UnflushedBuffer::new(true);
        b.insert(0, bytes(&[1; 4]));
        let t1 = b.begin_flush();
        assert_eq!(b.flushed(t1), 0, "the first flush proves nothing yet");
        b.insert(8, bytes(&[2; 4]));
        let t2 = b.begin_flush();
        assert_eq!(b.flushed(t2), 4, "the second flush proves the first");
        assert_eq!(read(&b, 8, 4), [2; 4]);
        let t3 = b.begin_flush();
        assert_eq!(b.flushed(t3), 4);
        assert!(b.is_empty());
    }

    #[test]
    fn rewritten_extents_need_a_new_flush() {
        let mut b = UnflushedBuffer::new(false);
        b.insert(0, bytes(&[1; 4]));
        let before_rewrite = b.begin_flush();
        b.mark_all_rewritten();
        assert_eq!(b.flushed(before_rewrite), 0);
        let t = b.begin_flush();
        assert_eq!(b.flushed(t), 4);
    }

    #[test]
    fn remove_range_splits() {
        let mut b = UnflushedBuffer::new(false);
        b.insert(0, bytes(&[1, 2, 3, 4, 5, 6]));
        b.remove_range(2, 2);
        assert_eq!(read(&b, 0, 6), [1, 2, 0xEE, 0xEE, 5, 6]);
        assert_eq!(b.bytes(), 4);
    }

    /// A byte-per-byte model: content and the sequence number that wrote it.
    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, u64, u8),
        Zero(u64, u64),
        Discard(u64, u64),
        Flush {
            interleaved_write: Option<(u64, u64, u8)>,
        },
        Rewrite,
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0u64..200, 1u64..60);
        prop_oneof![
            4 => (range.clone(), any::<u8>()).prop_map(|((o, l), v)| Op::Write(o, l, v)),
            1 => range.clone().prop_map(|(o, l)| Op::Zero(o, l)),
            1 => range.clone().prop_map(|(o, l)| Op::Discard(o, l)),
            2 => proptest::option::of((range, any::<u8>()).prop_map(|((o, l), v)| (o, l, v)))
                .prop_map(|w| Op::Flush { interleaved_write: w }),
            1 => Just(Op::Rewrite),
        ]
    }

    proptest! {
        #[test]
        fn matches_byte_model(ops in proptest::collection::vec(op(), 1..60), extra in any::<bool>()) {
            // Pieces up to 8 bytes are copied, longer ones share their allocation.
            let mut b = UnflushedBuffer::copying_upto(extra, 8);
            // Per byte: Some((value, seq)) while buffered.
            let mut model: Vec<Option<(u8, u64)>> = vec![None; 300];
            let mut seq = 0u64;
            let mut held: Option<u64> = None;
            let mut peak = 0u64;
            let write = |model: &mut Vec<Option<(u8, u64)>>, seq: &mut u64, o: u64, l: u64, v: u8| {
                *seq += 1;
                for x in &mut model[o as usize..(o + l) as usize] { *x = Some((v, *seq)); }
            };
            for op in ops {
                match op {
                    Op::Write(o, l, v) => {
                        let before = b.weight();
                        b.insert(o, bytes(&vec![v; l as usize]));
                        write(&mut model, &mut seq, o, l, v);
                        // The bound counts a write by its own weight (docs/durability.md):
                        // cutting the extents it replaces never weighs more.
                        prop_assert!(b.weight() <= before + l, "{} > {} + {}", b.weight(), before, l);
                    }
                    Op::Zero(o, l) => {
                        let before = b.weight();
                        b.insert(o, ExtentData::Zeroes(l));
                        write(&mut model, &mut seq, o, l, 0);
                        prop_assert!(b.weight() <= before + l);
                    }
                    Op::Discard(o, l) => {
                        let before = b.weight();
                        b.remove_range(o, l);
                        prop_assert!(b.weight() <= before);
                        for x in &mut model[o as usize..(o + l) as usize] { *x = None; }
                    }
                    Op::Flush { interleaved_write } => {
                        let t = b.begin_flush();
                        let tseq = seq;
                        if let Some((o, l, v)) = interleaved_write {
                            b.insert(o, bytes(&vec![v; l as usize]));
                            write(&mut model, &mut seq, o, l, v);
                            peak = peak.max(model.iter().filter(|x| x.is_some()).count() as u64);
                        }
                        b.flushed(t);
                        let upto = if extra { held.replace(tseq) } else { Some(tseq) };
                        if let Some(upto) = upto {
                            for x in model.iter_mut() {
                                if matches!(x, Some((_, s)) if *s <= upto) { *x = None; }
                            }
                        }
                    }
                    Op::Rewrite => {
                        b.mark_all_rewritten();
                        seq += 1;
                        for x in model.iter_mut().flatten() { x.1 = seq; }
                        held = None;
                    }
                }
                let expect_bytes = model.iter().filter(|x| x.is_some()).count() as u64;
                prop_assert_eq!(b.bytes(), expect_bytes);
                peak = peak.max(expect_bytes);
                let mut buf = vec![0xEE_u8; 300];
                b.overlay(0, &mut buf);
                for (i, x) in model.iter().enumerate() {
                    let want = x.map(|(v, _)| v).unwrap_or(0xEE);
                    // 0xEE written by the guest is indistinguishable; skip those bytes.
                    if want != 0xEE {
                        prop_assert_eq!(buf[i], want, "byte {}", i);
                    }
                    prop_assert_eq!(b.covers(i as u64, 1), x.is_some(), "covers byte {}", i);
                }
                let extent_bytes: u64 = b.extents().map(|(_, d)| d.len()).sum();
                prop_assert_eq!(extent_bytes, b.bytes());
                // The weight: each allocation kept once, plus zero extents.
                let mut allocations = std::collections::HashMap::new();
                let mut zeroes = 0;
                for (_, d) in b.extents() {
                    match d {
                        ExtentData::Bytes(x) => { allocations.insert(x.allocation_id(), x.allocation_len() as u64); }
                        ExtentData::Zeroes(n) => zeroes += n,
                    }
                }
                prop_assert_eq!(b.weight(), allocations.values().sum::<u64>() + zeroes);
                prop_assert!(b.weight() >= b.bytes());
                let mut last_end = 0;
                for (k, d) in b.extents() {
                    prop_assert!(k >= last_end, "extents overlap");
                    last_end = k + d.len();
                }
            }
            prop_assert_eq!(b.stats().peak_bytes, peak);
        }
    }
}
