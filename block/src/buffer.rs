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

use std::collections::BTreeMap;

/// Longest extent of bytes kept. A longer write is kept as several extents, so that
/// cutting a small write into an old one copies at most this much, not the rest of
/// a large extent.
pub const MAX_EXTENT: u64 = 64 * 1024;

/// The bytes of one extent. Zeroes (from WRITE_ZEROES) take no memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    Bytes(Vec<u8>),
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

    /// A copy of `[from, to)` of this extent.
    fn slice(&self, from: u64, to: u64) -> ExtentData {
        match self {
            ExtentData::Bytes(b) => ExtentData::Bytes(b[from as usize..to as usize].to_vec()),
            ExtentData::Zeroes(_) => ExtentData::Zeroes(to - from),
        }
    }

    fn truncate(&mut self, len: u64) {
        match self {
            ExtentData::Bytes(b) => {
                b.truncate(len as usize);
                b.shrink_to_fit();
            }
            ExtentData::Zeroes(n) => *n = len,
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
    pub extents: usize,
    /// The most bytes ever held at once.
    pub peak_bytes: u64,
}

/// The extent map. See the module docs.
#[derive(Debug, Default)]
pub struct UnflushedBuffer {
    extents: BTreeMap<u64, Extent>,
    bytes: u64,
    peak_bytes: u64,
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
            ..Default::default()
        }
    }

    pub fn stats(&self) -> BufferStats {
        BufferStats {
            bytes: self.bytes,
            extents: self.extents.len(),
            peak_bytes: self.peak_bytes,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub fn keeps_extra_flush(&self) -> bool {
        self.keep_extra_flush
    }

    /// Records a write handed to the host at `offset`; it replaces what overlaps it.
    pub fn insert(&mut self, offset: u64, data: ExtentData) {
        let len = data.len();
        if len == 0 {
            return;
        }
        self.carve(offset, offset + len);
        self.last_seq += 1;
        let seq = self.last_seq;
        match data {
            ExtentData::Bytes(b) if len > MAX_EXTENT => {
                for (i, chunk) in b.chunks(MAX_EXTENT as usize).enumerate() {
                    let data = ExtentData::Bytes(chunk.to_vec());
                    self.extents
                        .insert(offset + i as u64 * MAX_EXTENT, Extent { seq, data });
                }
            }
            data => {
                self.extents.insert(offset, Extent { seq, data });
            }
        }
        self.bytes += len;
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
        for k in doomed {
            let Some(mut e) = self.extents.remove(&k) else {
                continue;
            };
            let len = e.data.len();
            let kend = k + len;
            self.bytes -= len;
            if kend > end {
                let tail = e.data.slice(end - k, len);
                self.bytes += tail.len();
                self.extents.insert(
                    end,
                    Extent {
                        seq: e.seq,
                        data: tail,
                    },
                );
            }
            if k < start {
                e.data.truncate(start - k);
                self.bytes += e.data.len();
                self.extents.insert(k, e);
            }
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
            self.bytes = 0;
        } else {
            let mut bytes = 0;
            self.extents.retain(|_, e| {
                let keep = e.seq > upto;
                if keep {
                    bytes += e.data.len();
                }
                keep
            });
            self.bytes = bytes;
        }
        before - self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(v: &[u8]) -> ExtentData {
        ExtentData::Bytes(v.to_vec())
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
    fn a_large_write_is_kept_in_bounded_extents() {
        let mut b = UnflushedBuffer::new(false);
        let big: Vec<u8> = (0..(32u32 << 20)).map(|i| (i % 251) as u8).collect();
        b.insert(4096, ExtentData::Bytes(big.clone()));
        assert!(b.extents().all(|(_, d)| d.len() <= MAX_EXTENT));
        assert_eq!(b.stats().bytes, 32 << 20);
        // A small write into the middle copies at most one extent's worth.
        b.insert(4096 + (16 << 20) + 100, bytes(&[7; 512]));
        assert!(b.extents().all(|(_, d)| d.len() <= MAX_EXTENT));
        let got = read(&b, 4096 + (16 << 20), 1024);
        assert_eq!(&got[..100], &big[16 << 20..(16 << 20) + 100]);
        assert!(got[100..612].iter().all(|&x| x == 7));
        assert_eq!(&got[612..], &big[(16 << 20) + 612..(16 << 20) + 1024]);
        assert_eq!(b.stats().bytes, 32 << 20);
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
            let mut b = UnflushedBuffer::new(extra);
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
                        b.insert(o, ExtentData::Bytes(vec![v; l as usize]));
                        write(&mut model, &mut seq, o, l, v);
                    }
                    Op::Zero(o, l) => {
                        b.insert(o, ExtentData::Zeroes(l));
                        write(&mut model, &mut seq, o, l, 0);
                    }
                    Op::Discard(o, l) => {
                        b.remove_range(o, l);
                        for x in &mut model[o as usize..(o + l) as usize] { *x = None; }
                    }
                    Op::Flush { interleaved_write } => {
                        let t = b.begin_flush();
                        let tseq = seq;
                        if let Some((o, l, v)) = interleaved_write {
                            b.insert(o, ExtentData::Bytes(vec![v; l as usize]));
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
