//! A disk's write log in the dm-log-writes format: every write, zeroing and discard
//! the guest was told is done, and every FLUSH it was told is done, in the order the
//! device told it, so that a crash state after any point can be rebuilt offline
//! (`replay-log` from the dm-log-writes userspace, xfstests' log-writes helpers,
//! `holdfast lab`'s power cuts).
//!
//! The format (Linux `drivers/md/dm-log-writes.c`; all fields little-endian): sector 0
//! holds the super block `{magic u64, version u64, nr_entries u64, sectorsize u32}`;
//! from sector 1 on, each entry is one sector `{sector u64, nr_sectors u64, flags u64,
//! data_len u64}` followed by its data (`nr_sectors` sectors; none for a discard or a
//! flush). Sectors are [`LOG_SECTOR`] bytes here, the guest's logical block. A flush
//! entry says that everything before it in the log is on stable storage.
//!
//! The writer appends each entry with `pwrite` as the device completes it and then
//! rewrites the super block's entry count: a VMM killed at any point leaves a log
//! whose counted entries are whole (the page cache keeps what a killed process wrote).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The log's sector size: the guest's logical block (virtio-blk's 512 bytes).
pub const LOG_SECTOR: u64 = 512;
/// `WRITE_LOG_MAGIC`.
pub const MAGIC: u64 = 0x006a_7366_7773_6872;
/// `WRITE_LOG_VERSION`.
pub const VERSION: u64 = 1;
/// Entry flags.
pub const FLAG_FLUSH: u64 = 1 << 0;
pub const FLAG_FUA: u64 = 1 << 1;
pub const FLAG_DISCARD: u64 = 1 << 2;
pub const FLAG_MARK: u64 = 1 << 3;
pub const FLAG_METADATA: u64 = 1 << 4;
const KNOWN_FLAGS: u64 = FLAG_FLUSH | FLAG_FUA | FLAG_DISCARD | FLAG_MARK | FLAG_METADATA;

/// Appends a disk's completed writes and flushes to a file.
#[derive(Debug)]
pub struct WriteLog {
    file: File,
    /// Where the next entry goes, in log sectors.
    next: u64,
    entries: u64,
}

impl WriteLog {
    /// Creates (or truncates) the log file and writes an empty super block.
    pub fn create(path: &Path) -> io::Result<WriteLog> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let mut log = WriteLog {
            file,
            next: 1,
            entries: 0,
        };
        log.write_super()?;
        Ok(log)
    }

    /// How many entries the log holds.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// A write of `data` at byte `offset` (both whole sectors).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.append(offset, data.len() as u64, 0, Some(data))
    }

    /// A write that was on stable storage when it completed (a writethrough disk
    /// flushes each one first): flagged FUA, which readers take as the write and a
    /// flush after it.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.append(offset, data.len() as u64, FLAG_FUA, Some(data))
    }

    /// `len` bytes of zeroes at `offset`: a write of zeroes, as QEMU's blklogwrites
    /// logs them (the log's readers then need no special case); `fua` as in
    /// [`WriteLog::write_fua`].
    pub fn zeroes(&mut self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let zero = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
        self.append(offset, len, if fua { FLAG_FUA } else { 0 }, Some(&zero))
    }

    /// A discard: the range's content is unspecified from here on.
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.append(offset, len, FLAG_DISCARD, None)
    }

    /// A completed FLUSH: every entry before it is stable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.append(0, 0, FLAG_FLUSH, None)
    }

    fn append(&mut self, offset: u64, len: u64, flags: u64, data: Option<&[u8]>) -> io::Result<()> {
        if offset % LOG_SECTOR != 0 || len % LOG_SECTOR != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write log: {len} bytes at {offset} are not whole {LOG_SECTOR}-byte sectors"
                ),
            ));
        }
        let mut entry = vec![0u8; LOG_SECTOR as usize];
        entry[0..8].copy_from_slice(&(offset / LOG_SECTOR).to_le_bytes());
        entry[8..16].copy_from_slice(&(len / LOG_SECTOR).to_le_bytes());
        entry[16..24].copy_from_slice(&flags.to_le_bytes());
        if let Some(data) = data {
            entry.extend_from_slice(data);
        }
        self.file.write_all_at(&entry, self.next * LOG_SECTOR)?;
        self.next += entry.len() as u64 / LOG_SECTOR;
        self.entries += 1;
        self.write_super()
    }

    fn write_super(&mut self) -> io::Result<()> {
        let mut sb = [0u8; LOG_SECTOR as usize];
        sb[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        sb[8..16].copy_from_slice(&VERSION.to_le_bytes());
        sb[16..24].copy_from_slice(&self.entries.to_le_bytes());
        sb[24..28].copy_from_slice(&(LOG_SECTOR as u32).to_le_bytes());
        self.file.write_all_at(&sb, 0)
    }
}

/// One entry of a log, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    /// Bytes written at a byte offset (zeroes included).
    Write { offset: u64, data: Vec<u8> },
    /// A discarded byte range.
    Discard { offset: u64, len: u64 },
    /// A completed flush: everything before it is stable.
    Flush,
    /// A mark (dm-log-writes' `dmsetup message ... mark NAME`).
    Mark(String),
}

/// Why a log cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("not a dm-log-writes log: {0}")]
    NotALog(String),
    #[error("entry {index}: {what}")]
    BadEntry { index: u64, what: String },
}

/// Reads a whole log (its super block's count of entries).
pub fn read_log(bytes: &[u8]) -> Result<Vec<LogEntry>, LogError> {
    let field = |at: usize| -> Option<u64> {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let not = |what: &str| LogError::NotALog(what.to_string());
    if field(0) != Some(MAGIC) {
        return Err(not("no WRITE_LOG_MAGIC at its start"));
    }
    if field(8) != Some(VERSION) {
        return Err(not(&format!("version {:?}, not 1", field(8))));
    }
    let count = field(16).ok_or_else(|| not("its super block is cut short"))?;
    let sectorsize = bytes
        .get(24..28)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| not("its super block is cut short"))?;
    if !(512..=1 << 20).contains(&sectorsize) || !sectorsize.is_power_of_two() {
        return Err(not(&format!("sector size {sectorsize}")));
    }
    let sector = u64::from(sectorsize);
    let mut at = sector;
    let mut entries = Vec::new();
    for index in 0..count {
        let bad = |what: String| LogError::BadEntry { index, what };
        let start = usize::try_from(at).map_err(|_| bad("past the end".into()))?;
        let head = |i: usize| field(start + 8 * i);
        let (Some(first), Some(sectors), Some(flags), Some(data_len)) =
            (head(0), head(1), head(2), head(3))
        else {
            return Err(bad(format!(
                "cut short at byte {start} (the log has {} bytes)",
                bytes.len()
            )));
        };
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        at += sector;
        let offset = first
            .checked_mul(sector)
            .ok_or_else(|| bad(format!("sector {first} is past any disk")))?;
        let len = sectors
            .checked_mul(sector)
            .ok_or_else(|| bad(format!("{sectors} sectors is past any disk")))?;
        if flags & FLAG_MARK != 0 {
            let text = (data_len <= sector - 32)
                .then(|| bytes.get(start + 32..start + 32 + data_len as usize))
                .flatten()
                .ok_or_else(|| bad(format!("a mark of {data_len} bytes")))?;
            entries.push(LogEntry::Mark(String::from_utf8_lossy(text).into_owned()));
        } else if flags & FLAG_DISCARD != 0 {
            entries.push(LogEntry::Discard { offset, len });
        } else if sectors > 0 {
            let from = usize::try_from(at).map_err(|_| bad("past the end".into()))?;
            let data = usize::try_from(len)
                .ok()
                .and_then(|l| bytes.get(from..from.checked_add(l)?))
                .ok_or_else(|| bad(format!("its {len} bytes of data are cut short")))?;
            entries.push(LogEntry::Write {
                offset,
                data: data.to_vec(),
            });
            at += len;
        }
        // A flush may come with a write (FUA or a preflush); it follows the write.
        if flags & FLAG_FLUSH != 0 || flags & FLAG_FUA != 0 {
            entries.push(LogEntry::Flush);
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("w.log");
        let mut log = WriteLog::create(&path).expect("log");
        log.write(4096, &[7u8; 1024]).expect("write");
        log.flush().expect("flush");
        log.zeroes(512, 512, false).expect("zeroes");
        log.discard(8192, 4096).expect("discard");
        log.write(0, &[1u8; 512]).expect("write");
        log.write_fua(1024, &[2u8; 512]).expect("write");
        assert_eq!(log.entries(), 6);
        let bytes = std::fs::read(&path).expect("read");
        // Super, then entry + 2 data sectors, flush, entry + 1, discard, entry + 1.
        assert_eq!(bytes.len(), 512 * (1 + 3 + 1 + 2 + 1 + 2 + 2));
        assert_eq!(
            read_log(&bytes).expect("parse"),
            vec![
                LogEntry::Write {
                    offset: 4096,
                    data: vec![7; 1024]
                },
                LogEntry::Flush,
                LogEntry::Write {
                    offset: 512,
                    data: vec![0; 512]
                },
                LogEntry::Discard {
                    offset: 8192,
                    len: 4096
                },
                LogEntry::Write {
                    offset: 0,
                    data: vec![1; 512]
                },
                LogEntry::Write {
                    offset: 1024,
                    data: vec![2; 512]
                },
                LogEntry::Flush,
            ]
        );
    }

    #[test]
    fn a_log_cut_after_its_count_reads_its_counted_entries() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("w.log");
        let mut log = WriteLog::create(&path).expect("log");
        log.write(0, &[1u8; 512]).expect("write");
        let mut bytes = std::fs::read(&path).expect("read");
        // An entry being written when the VMM died, not yet counted.
        bytes.extend_from_slice(&[0xffu8; 300]);
        assert_eq!(read_log(&bytes).expect("parse").len(), 1);
    }

    #[test]
    fn broken_logs_are_refused_naming_what_is_wrong() {
        assert!(matches!(read_log(b"hello"), Err(LogError::NotALog(_))));
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("w.log");
        let mut log = WriteLog::create(&path).expect("log");
        log.write(0, &[1u8; 1024]).expect("write");
        let bytes = std::fs::read(&path).expect("read");
        let cut = &bytes[..bytes.len() - 1];
        assert_eq!(
            read_log(cut),
            Err(LogError::BadEntry {
                index: 0,
                what: "its 1024 bytes of data are cut short".into()
            })
        );
        let mut flags = bytes.clone();
        flags[512 + 16] = 0x80;
        assert!(matches!(
            read_log(&flags),
            Err(LogError::BadEntry { index: 0, .. })
        ));
        let mut count = bytes;
        count[16] = 9;
        assert!(matches!(
            read_log(&count),
            Err(LogError::BadEntry { index: 1, .. })
        ));
        assert!(log.write(100, &[0; 512]).is_err(), "not sector-aligned");
    }
}
