//! A reference model of docs/durability.md's invariant, to check a disk from the guest's
//! side and the host's.
//!
//! The oracle follows what the guest submitted and how each request completed. Write
//! contents are generated from the write's id, so nothing is stored per byte. It
//! answers two questions:
//!
//! - [`Oracle::check_read`]: does a completed read show, in every sector, the latest
//!   write submitted before it, where that write completed `S_OK`?
//! - [`Oracle::check_stable`]: is every acked write (completed `S_OK`, then a FLUSH
//!   submitted after it completed `S_OK`) on stable storage? A sector may also hold a
//!   newer write to it, acked or not, since the host may have written it back early.
//!
//! Granularity is the 512-byte sector; requests must be sector-aligned.

/// Sector size the oracle tracks.
pub const SECTOR: u64 = 512;

/// A write's id; 0 stands for the disk's initial content (zeroes).
pub type WriteId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Pattern,
    Zeroes,
    /// A discard: afterwards the sector's content is unspecified.
    Unspecified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Ok,
    Failed,
}

#[derive(Debug, Clone)]
struct Write {
    offset: u64,
    len: u64,
    content: Content,
    state: State,
    acked: bool,
}

/// What the oracle knew when a read was submitted.
#[derive(Debug, Clone)]
pub struct ReadTicket {
    offset: u64,
    /// Per sector, the latest write submitted before the read.
    latest: Vec<WriteId>,
}

/// A flush's place in the submission order.
#[derive(Debug, Clone, Copy)]
pub struct FlushTicket {
    writes_before: u64,
}

/// One mismatch the oracle found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub sector: u64,
    /// The write whose content was expected (0: initial zeroes).
    pub expected: WriteId,
}

/// The model. See the module docs.
#[derive(Debug, Clone)]
pub struct Oracle {
    writes: Vec<Write>,
    /// Per sector, the ids of the writes that touched it, in submission order.
    history: Vec<Vec<WriteId>>,
    /// Per sector, the newest acked write (0: none).
    acked: Vec<WriteId>,
    acked_writes: usize,
}

impl Oracle {
    pub fn new(disk_size: u64) -> Self {
        let sectors = (disk_size / SECTOR) as usize;
        Oracle {
            writes: Vec::new(),
            history: vec![Vec::new(); sectors],
            acked: vec![0; sectors],
            acked_writes: 0,
        }
    }

    /// The bytes write `id` puts at `offset` (0 for zero writes).
    pub fn byte(id: WriteId, offset: u64) -> u8 {
        Self::word(id, offset / 8)[(offset % 8) as usize]
    }

    /// The 8 bytes write `id` puts at `8 * index`.
    fn word(id: WriteId, index: u64) -> [u8; 8] {
        if id == 0 {
            return [0; 8];
        }
        let x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let x = x ^ (x >> 31);
        x.wrapping_mul(0xD6E8_FEB8_6659_FD93).to_le_bytes()
    }

    /// Fills `buf` with what write `id` puts at `offset` (sector-aligned).
    pub fn fill(id: WriteId, offset: u64, buf: &mut [u8]) {
        debug_assert_eq!(offset % 8, 0);
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let w = Self::word(id, offset / 8 + i as u64);
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }

    fn submit(&mut self, offset: u64, len: u64, content: Content) -> WriteId {
        assert!(
            offset % SECTOR == 0 && len % SECTOR == 0,
            "oracle requests must be sector-aligned"
        );
        self.writes.push(Write {
            offset,
            len,
            content,
            state: State::Pending,
            acked: false,
        });
        let id = self.writes.len() as WriteId;
        for s in offset / SECTOR..(offset + len) / SECTOR {
            self.history[s as usize].push(id);
        }
        id
    }

    /// A guest write of generated content; returns its id and its bytes.
    pub fn write(&mut self, offset: u64, len: u64) -> (WriteId, Vec<u8>) {
        let id = self.submit(offset, len, Content::Pattern);
        let mut data = vec![0; len as usize];
        Self::fill(id, offset, &mut data);
        (id, data)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> WriteId {
        self.submit(offset, len, Content::Zeroes)
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> WriteId {
        self.submit(offset, len, Content::Unspecified)
    }

    /// The guest saw write `id` complete, `S_OK` or not.
    pub fn completed(&mut self, id: WriteId, ok: bool) {
        self.writes[id as usize - 1].state = if ok { State::Ok } else { State::Failed };
    }

    pub fn flush_submitted(&self) -> FlushTicket {
        FlushTicket {
            writes_before: self.writes.len() as u64,
        }
    }

    /// A flush completed; `S_OK` acks every write submitted before it that completed
    /// `S_OK`. Returns the byte ranges `(offset, len)` of the writes it acked.
    pub fn flush_completed(&mut self, ticket: FlushTicket, ok: bool) -> Vec<(u64, u64)> {
        let mut newly = Vec::new();
        if !ok {
            return newly;
        }
        for id in 1..=ticket.writes_before {
            let w = &mut self.writes[id as usize - 1];
            if w.state != State::Ok || w.acked {
                continue;
            }
            w.acked = true;
            if w.content != Content::Unspecified {
                self.acked_writes += 1;
            }
            let (offset, len) = (w.offset, w.len);
            newly.push((offset, len));
            for s in offset / SECTOR..(offset + len) / SECTOR {
                let a = &mut self.acked[s as usize];
                *a = (*a).max(id);
            }
        }
        newly
    }

    /// Acked writes so far (discards not counted).
    pub fn acked_writes(&self) -> usize {
        self.acked_writes
    }

    pub fn read_submitted(&self, offset: u64, len: u64) -> ReadTicket {
        let latest = (offset / SECTOR..(offset + len).div_ceil(SECTOR))
            .map(|s| self.history[s as usize].last().copied().unwrap_or(0))
            .collect();
        ReadTicket { offset, latest }
    }

    /// Checks a read that completed `S_OK` with `data`.
    pub fn check_read(&self, ticket: &ReadTicket, data: &[u8]) -> Vec<Mismatch> {
        let first = ticket.offset / SECTOR;
        let mut bad = Vec::new();
        for (i, &id) in ticket.latest.iter().enumerate() {
            let sector = first + i as u64;
            let Some(want) = self.definite(id) else {
                continue;
            };
            let got = &data[i * SECTOR as usize..(i + 1) * SECTOR as usize];
            if !self.sector_is(want, sector, got) {
                bad.push(Mismatch {
                    sector,
                    expected: id,
                });
            }
        }
        bad
    }

    /// The content write `id` must show, if it completed `S_OK` with defined content.
    fn definite(&self, id: WriteId) -> Option<WriteId> {
        if id == 0 {
            return Some(0);
        }
        let w = &self.writes[id as usize - 1];
        (w.state == State::Ok && w.content != Content::Unspecified).then_some(id)
    }

    fn sector_is(&self, id: WriteId, sector: u64, got: &[u8]) -> bool {
        let base = sector * SECTOR;
        match self
            .writes
            .get((id as usize).wrapping_sub(1))
            .map(|w| w.content)
        {
            None | Some(Content::Zeroes) => got.iter().all(|&b| b == 0),
            Some(Content::Pattern) => got
                .chunks(8)
                .enumerate()
                .all(|(i, c)| c == &Self::word(id, base / 8 + i as u64)[..c.len()]),
            Some(Content::Unspecified) => true,
        }
    }

    /// Checks stable storage (the whole disk image) against every acked write;
    /// returns the sectors that lost their acked content.
    pub fn check_stable(&self, stable: &[u8]) -> Vec<Mismatch> {
        self.check_stable_sectors(0..self.acked.len() as u64, |s, buf| {
            let at = (s * SECTOR) as usize;
            buf.copy_from_slice(&stable[at..at + SECTOR as usize]);
        })
    }

    /// As [`Oracle::check_stable`], for the given sectors only; `read(sector, buf)`
    /// fills `buf` with the sector's stable bytes.
    pub fn check_stable_sectors(
        &self,
        sectors: impl IntoIterator<Item = u64>,
        mut read: impl FnMut(u64, &mut [u8]),
    ) -> Vec<Mismatch> {
        let mut bad = Vec::new();
        let mut got = [0u8; SECTOR as usize];
        for sector in sectors {
            let s = sector as usize;
            let acked = self.acked[s];
            if acked == 0 {
                continue;
            }
            read(sector, &mut got);
            let matched = self.history[s]
                .iter()
                .copied()
                .filter(|&id| id >= acked)
                .any(|id| {
                    self.writes[id as usize - 1].content == Content::Unspecified
                        || self.sector_is(id, sector, &got)
                });
            if !matched {
                bad.push(Mismatch {
                    sector,
                    expected: acked,
                });
            }
        }
        bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_write_must_be_stable() {
        let mut o = Oracle::new(4096);
        let (id, data) = o.write(0, 1024);
        o.completed(id, true);
        let mut stable = vec![0u8; 4096];
        assert!(
            o.check_stable(&stable).is_empty(),
            "not acked yet: anything goes"
        );
        let f = o.flush_submitted();
        o.flush_completed(f, true);
        assert_eq!(o.acked_writes(), 1);
        assert_eq!(o.check_stable(&stable).len(), 2, "two sectors lost");
        stable[..1024].copy_from_slice(&data);
        assert!(o.check_stable(&stable).is_empty());
    }

    #[test]
    fn newer_write_may_replace_an_acked_one() {
        let mut o = Oracle::new(4096);
        let (a, _) = o.write(0, 512);
        o.completed(a, true);
        let f = o.flush_submitted();
        o.flush_completed(f, true);
        let (b, newer) = o.write(0, 512);
        o.completed(b, true);
        assert!(
            o.check_stable(&newer).is_empty(),
            "written back early is fine"
        );
        assert_eq!(
            o.check_stable(&[0; 4096]).len(),
            1,
            "initial content is not"
        );
    }

    #[test]
    fn flush_before_completion_does_not_ack() {
        let mut o = Oracle::new(4096);
        let f = o.flush_submitted();
        let (a, _) = o.write(0, 512);
        o.completed(a, true);
        o.flush_completed(f, true);
        assert_eq!(o.acked_writes(), 0);
    }

    #[test]
    fn reads_see_the_latest_completed_write() {
        let mut o = Oracle::new(4096);
        let (a, data) = o.write(512, 512);
        o.completed(a, true);
        let t = o.read_submitted(0, 1024);
        let mut got = vec![0u8; 1024];
        got[512..].copy_from_slice(&data);
        assert!(o.check_read(&t, &got).is_empty());
        got[600] ^= 1;
        assert_eq!(
            o.check_read(&t, &got),
            vec![Mismatch {
                sector: 1,
                expected: a
            }]
        );
        // A failed write leaves its sector unspecified for reads.
        let (b, _) = o.write(512, 512);
        o.completed(b, false);
        let t = o.read_submitted(512, 512);
        assert!(o.check_read(&t, &[0xAB; 512]).is_empty());
    }

    #[test]
    fn zeroes_and_discards() {
        let mut o = Oracle::new(4096);
        let (a, _) = o.write(0, 1024);
        o.completed(a, true);
        let z = o.write_zeroes(0, 512);
        o.completed(z, true);
        let d = o.discard(512, 512);
        o.completed(d, true);
        let f = o.flush_submitted();
        o.flush_completed(f, true);
        let t = o.read_submitted(0, 1024);
        let mut got = vec![0u8; 1024];
        got[512..].fill(0x55);
        assert!(o.check_read(&t, &got).is_empty());
        assert!(o.check_stable(&got).is_empty());
        got[0] = 1;
        assert_eq!(o.check_stable(&got).len(), 1);
    }
}
