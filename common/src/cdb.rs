//! CDB, the constant database of D. J. Bernstein, in the layout tinycdb
//! and Postfix's `cdb:` tables use, so files built here and by Postfix's
//! postmap read the same: a 2048-byte header of 256 (position, slots)
//! pairs; the records `key length, value length, key, value`; then 256
//! open-addressing hash tables of (hash, record position) slots. Numbers
//! are 32-bit little-endian; a file is at most 4 GiB.
//!
//! [`Reader`] looks a key up with two or three `pread`s (the header is
//! kept, nothing else), so a table of millions of entries costs no memory
//! and no start-up time. [`Writer`] streams records into a temporary file
//! beside the table, keeping 8 bytes per record, and replaces the table
//! by `rename` once the file is fsync'd: a reader has either the old file
//! or the new one, never half of one.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Size of the header: 256 tables × (position, number of slots).
pub const HEADER_LEN: u64 = 2048;

/// The CDB hash of a key (djb's "times 33, xor").
pub fn hash(key: &[u8]) -> u32 {
    key.iter().fold(5381u32, |h, &b| {
        h.wrapping_shl(5).wrapping_add(h) ^ b as u32
    })
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// An open CDB file. Lookups do not move the file offset, so one reader
/// may serve several threads.
#[derive(Debug)]
pub struct Reader {
    file: File,
    /// (position, number of slots) of each of the 256 hash tables.
    tables: Vec<(u32, u32)>,
    /// Where the records end (the first hash table).
    records_end: u64,
}

impl Reader {
    pub fn open(path: &Path) -> io::Result<Reader> {
        Reader::from_file(File::open(path)?)
    }

    /// Reads and checks the header of an open file.
    pub fn from_file(file: File) -> io::Result<Reader> {
        let size = file.metadata()?.len();
        let mut head = vec![0u8; HEADER_LEN as usize];
        if size < HEADER_LEN {
            return Err(invalid("not a CDB file (shorter than its header)"));
        }
        file.read_exact_at(&mut head, 0)?;
        Reader::from_header(file, &head, size)
    }

    /// Checks `head` (the file's first 2048 bytes) and keeps it.
    pub fn from_header(file: File, head: &[u8], size: u64) -> io::Result<Reader> {
        if head.len() < HEADER_LEN as usize || size < HEADER_LEN {
            return Err(invalid("not a CDB file (shorter than its header)"));
        }
        let mut tables = Vec::with_capacity(256);
        let mut records_end = size;
        for i in 0..256 {
            let pos = u32_at(head, i * 8);
            let slots = u32_at(head, i * 8 + 4);
            if (pos as u64) < HEADER_LEN || pos as u64 + slots as u64 * 8 > size {
                return Err(invalid("not a CDB file (its header points outside it)"));
            }
            records_end = records_end.min(pos as u64);
            tables.push((pos, slots));
        }
        Ok(Reader {
            file,
            tables,
            records_end,
        })
    }

    /// The value of `key`, if the file has it (the first record of that
    /// key, as every CDB reader answers).
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let h = hash(key);
        let (tpos, slots) = self.tables[(h & 255) as usize];
        if slots == 0 {
            return Ok(None);
        }
        // Slots are read a few at a time: most probes end in the first.
        const BATCH: u32 = 8;
        let mut slot = (h >> 8) % slots;
        let mut left = slots;
        let mut buf = [0u8; BATCH as usize * 8];
        while left > 0 {
            let n = BATCH.min(slots - slot).min(left);
            let chunk = &mut buf[..n as usize * 8];
            self.file
                .read_exact_at(chunk, tpos as u64 + slot as u64 * 8)?;
            for s in 0..n as usize {
                let (sh, sp) = (u32_at(chunk, s * 8), u32_at(chunk, s * 8 + 4));
                if sp == 0 {
                    return Ok(None);
                }
                if sh == h {
                    if let Some(v) = self.value_if_key(sp as u64, key)? {
                        return Ok(Some(v));
                    }
                }
            }
            left -= n;
            slot = (slot + n) % slots;
        }
        Ok(None)
    }

    /// The value of the record at `pos` when its key is `key`.
    fn value_if_key(&self, pos: u64, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        // One read for the lengths, the key and a short value; a second
        // one only for a long value.
        const GUESS: usize = 248;
        let want = 8 + key.len() + GUESS;
        let mut buf = vec![0u8; want];
        let got = read_up_to(&self.file, &mut buf, pos)?;
        if got < 8 {
            return Err(invalid("CDB file cut short"));
        }
        let (klen, vlen) = (u32_at(&buf, 0) as usize, u32_at(&buf, 4) as usize);
        if klen != key.len() {
            return Ok(None);
        }
        if got < 8 + klen {
            return Err(invalid("CDB file cut short"));
        }
        if &buf[8..8 + klen] != key {
            return Ok(None);
        }
        let start = 8 + klen;
        if got >= start + vlen {
            buf.truncate(start + vlen);
            buf.drain(..start);
            return Ok(Some(buf));
        }
        if pos + (start + vlen) as u64 > self.records_end {
            return Err(invalid("CDB record runs past the records"));
        }
        let mut value = vec![0u8; vlen];
        self.file.read_exact_at(&mut value, pos + start as u64)?;
        Ok(Some(value))
    }

    /// Every record in file order, duplicates included (a file built by
    /// [`Writer`] has none).
    pub fn records(&self) -> Records<&Reader> {
        Records::new(self)
    }
}

/// `pread` as much as there is, up to `buf.len()`.
fn read_up_to(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], pos + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A record read back: its position, key and value.
pub type Record = (u64, Vec<u8>, Vec<u8>);

/// The records of a [`Reader`] (borrowed, or shared as `Arc<Reader>`),
/// read sequentially through a 64 KiB buffer.
pub struct Records<R> {
    reader: R,
    pos: u64,
    buf: Vec<u8>,
    buf_at: u64,
}

impl<R: std::ops::Deref<Target = Reader>> Records<R> {
    pub fn new(reader: R) -> Records<R> {
        Records {
            reader,
            pos: HEADER_LEN,
            buf: Vec::new(),
            buf_at: HEADER_LEN,
        }
    }

    /// `n` bytes at `self.pos`, refilling the buffer as needed.
    fn bytes(&mut self, n: usize) -> io::Result<&[u8]> {
        let end = self.reader.records_end;
        if self.pos + n as u64 > end {
            return Err(invalid("CDB record runs past the records"));
        }
        let off = (self.pos - self.buf_at) as usize;
        if self.pos < self.buf_at || off + n > self.buf.len() {
            let len = (n.max(64 * 1024) as u64).min(end - self.pos) as usize;
            self.buf.resize(len, 0);
            self.reader.file.read_exact_at(&mut self.buf, self.pos)?;
            self.buf_at = self.pos;
        }
        let off = (self.pos - self.buf_at) as usize;
        self.pos += n as u64;
        Ok(&self.buf[off..off + n])
    }

    /// The next record and its position.
    pub fn next_at(&mut self) -> Option<io::Result<Record>> {
        if self.pos >= self.reader.records_end {
            return None;
        }
        let at = self.pos;
        let r = (|| {
            let lens = self.bytes(8)?;
            let (klen, vlen) = (u32_at(lens, 0) as usize, u32_at(lens, 4) as usize);
            let key = self.bytes(klen)?.to_vec();
            let value = self.bytes(vlen)?.to_vec();
            Ok((at, key, value))
        })();
        if r.is_err() {
            self.pos = self.reader.records_end;
        }
        Some(r)
    }
}

impl<R: std::ops::Deref<Target = Reader>> Iterator for Records<R> {
    type Item = io::Result<(Vec<u8>, Vec<u8>)>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_at().map(|r| r.map(|(_, k, v)| (k, v)))
    }
}

/// What [`Writer::commit`] does with several records of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicates {
    /// The first one stays (Postfix's postmap, and its `-w`).
    KeepFirst,
    /// The last one stays (postmap `-r`).
    KeepLast,
}

/// Builds a CDB file in `PATH.tmp.PID` and, on [`Writer::commit`], puts
/// it in place of `PATH`. Dropped without commit, it removes the
/// temporary file.
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    pos: u64,
    /// (hash, position) of every record.
    index: Vec<(u32, u32)>,
    committed: bool,
}

/// A temporary name beside `path`, unique to this process.
fn tmp_name(path: &Path, what: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{what}.{}", std::process::id()));
    PathBuf::from(s)
}

fn too_large() -> io::Error {
    io::Error::other("table too large: a CDB file is at most 4 GiB")
}

impl Writer {
    /// Starts a new table for `path`, its file created with `mode`
    /// (less the umask).
    pub fn create(path: &Path, mode: u32) -> io::Result<Writer> {
        let tmp = tmp_name(path, "tmp");
        let file = Writer::create_tmp(&tmp, mode)?;
        Ok(Writer {
            path: path.to_path_buf(),
            tmp,
            out: BufWriter::with_capacity(256 * 1024, file),
            pos: HEADER_LEN,
            index: Vec::new(),
            committed: false,
        })
    }

    fn create_tmp(tmp: &Path, mode: u32) -> io::Result<File> {
        // A leftover of a crashed run of this same PID is ours to replace.
        let _ = std::fs::remove_file(tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(mode)
            .open(tmp)?;
        file.write_all(&[0u8; HEADER_LEN as usize])?;
        Ok(file)
    }

    /// Appends one record.
    pub fn add(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let len = 8 + key.len() as u64 + value.len() as u64;
        // The record, and later its two hash slots, must stay addressable.
        if self.pos + len + 16 * (self.index.len() as u64 + 1) > u32::MAX as u64 {
            return Err(too_large());
        }
        self.out.write_all(&(key.len() as u32).to_le_bytes())?;
        self.out.write_all(&(value.len() as u32).to_le_bytes())?;
        self.out.write_all(key)?;
        self.out.write_all(value)?;
        self.index.push((hash(key), self.pos as u32));
        self.pos += len;
        Ok(())
    }

    /// Number of records added so far.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Resolves duplicate keys (`dups`), writes the hash tables and the
    /// header, fsyncs the file, renames it over the table and fsyncs the
    /// directory. Returns the keys of the records dropped as duplicates,
    /// in file order, and the number of records kept.
    pub fn commit(mut self, dups: Duplicates) -> io::Result<(Vec<Vec<u8>>, usize)> {
        self.out.flush()?;
        let dropped = self.find_duplicates(dups)?;
        let mut dropped_keys = Vec::with_capacity(dropped.len());
        if !dropped.is_empty() {
            for &p in &dropped {
                dropped_keys.push(self.key_at(p)?);
            }
            self.compact(&dropped)?;
        }
        self.write_tables()?;
        let file = self.out.get_ref();
        file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
        Ok((dropped_keys, self.index.len()))
    }

    fn key_at(&self, pos: u32) -> io::Result<Vec<u8>> {
        let file = self.out.get_ref();
        let mut lens = [0u8; 8];
        file.read_exact_at(&mut lens, pos as u64)?;
        let mut key = vec![0u8; u32_at(&lens, 0) as usize];
        file.read_exact_at(&mut key, pos as u64 + 8)?;
        Ok(key)
    }

    /// Positions of the records that lose to another of the same key,
    /// sorted. Only records of equal hash are compared, by reading their
    /// keys back.
    fn find_duplicates(&mut self, dups: Duplicates) -> io::Result<Vec<u32>> {
        self.index.sort_unstable();
        let mut dropped = Vec::new();
        let mut i = 0;
        while i < self.index.len() {
            let h = self.index[i].0;
            let mut j = i + 1;
            while j < self.index.len() && self.index[j].0 == h {
                j += 1;
            }
            if j - i > 1 {
                // Same hash: group by key, in position order.
                let mut keyed = Vec::with_capacity(j - i);
                for &(_, p) in &self.index[i..j] {
                    keyed.push((self.key_at(p)?, p));
                }
                keyed.sort();
                let mut a = 0;
                while a < keyed.len() {
                    let mut b = a + 1;
                    while b < keyed.len() && keyed[b].0 == keyed[a].0 {
                        b += 1;
                    }
                    let keep = match dups {
                        Duplicates::KeepFirst => a,
                        Duplicates::KeepLast => b - 1,
                    };
                    dropped.extend((a..b).filter(|&x| x != keep).map(|x| keyed[x].1));
                    a = b;
                }
            }
            i = j;
        }
        dropped.sort_unstable();
        Ok(dropped)
    }

    /// Copies the records but `dropped` into a fresh temporary file, so
    /// the table holds each key once.
    fn compact(&mut self, dropped: &[u32]) -> io::Result<()> {
        let tmp2 = tmp_name(&self.path, "tmp2");
        let mode = self.out.get_ref().metadata()?.permissions();
        let file = Writer::create_tmp(&tmp2, 0o600)?;
        file.set_permissions(mode)?;
        let old = std::mem::replace(&mut self.out, BufWriter::with_capacity(256 * 1024, file));
        let old = old.into_inner().map_err(|e| e.into_error())?;
        let reader = Reader {
            file: old,
            tables: Vec::new(),
            records_end: self.pos,
        };
        self.index.clear();
        self.pos = HEADER_LEN;
        let mut records = reader.records();
        let mut skip = dropped.iter().peekable();
        while let Some(r) = records.next_at() {
            let (at, k, v) = r?;
            if skip.peek() == Some(&&(at as u32)) {
                skip.next();
                continue;
            }
            self.add(&k, &v)?;
        }
        self.out.flush()?;
        std::fs::rename(&tmp2, &self.tmp)?;
        Ok(())
    }

    /// Appends the 256 hash tables and writes the header.
    fn write_tables(&mut self) -> io::Result<()> {
        // Group by table, each in record order (as tinycdb does).
        self.index.sort_unstable_by_key(|&(h, p)| ((h & 255), p));
        let mut header = vec![0u8; HEADER_LEN as usize];
        let mut at = 0;
        let mut slots: Vec<(u32, u32)> = Vec::new();
        let mut bytes: Vec<u8> = Vec::new();
        for t in 0..256u32 {
            let start = at;
            while at < self.index.len() && self.index[at].0 & 255 == t {
                at += 1;
            }
            let entries = &self.index[start..at];
            let n = entries.len() as u32 * 2;
            slots.clear();
            slots.resize(n as usize, (0, 0));
            for &(h, p) in entries {
                let mut s = ((h >> 8) % n) as usize;
                while slots[s].1 != 0 {
                    s = (s + 1) % n as usize;
                }
                slots[s] = (h, p);
            }
            if self.pos + n as u64 * 8 > u32::MAX as u64 {
                return Err(too_large());
            }
            header[t as usize * 8..t as usize * 8 + 4]
                .copy_from_slice(&(self.pos as u32).to_le_bytes());
            header[t as usize * 8 + 4..t as usize * 8 + 8].copy_from_slice(&n.to_le_bytes());
            bytes.clear();
            for &(h, p) in &slots {
                bytes.extend_from_slice(&h.to_le_bytes());
                bytes.extend_from_slice(&p.to_le_bytes());
            }
            self.out.write_all(&bytes)?;
            self.pos += n as u64 * 8;
        }
        self.out.flush()?;
        self.out.get_ref().write_all_at(&header, 0)?;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pcdb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn known_hash() {
        // Values from tinycdb's cdb_hash.
        assert_eq!(hash(b""), 5381);
        assert_eq!(hash(b"a"), 177604);
    }

    #[test]
    fn build_and_read() {
        let d = dir("rw");
        let path = d.join("t.cdb");
        let mut w = Writer::create(&path, 0o644).unwrap();
        for i in 0..5000u32 {
            w.add(
                format!("key{i}").as_bytes(),
                format!("value {i}").as_bytes(),
            )
            .unwrap();
        }
        let long = vec![b'x'; 10_000];
        w.add(b"long", &long).unwrap();
        w.add(b"", b"empty key").unwrap();
        w.add(b"key7", b"second").unwrap();
        let (dropped, kept) = w.commit(Duplicates::KeepFirst).unwrap();
        assert_eq!(dropped, vec![b"key7".to_vec()]);
        assert_eq!(kept, 5002);
        let r = Reader::open(&path).unwrap();
        for i in (0..5000u32).step_by(7) {
            assert_eq!(
                r.get(format!("key{i}").as_bytes()).unwrap(),
                Some(format!("value {i}").into_bytes())
            );
        }
        assert_eq!(r.get(b"key7").unwrap(), Some(b"value 7".to_vec()));
        assert_eq!(r.get(b"long").unwrap(), Some(long));
        assert_eq!(r.get(b"").unwrap(), Some(b"empty key".to_vec()));
        assert_eq!(r.get(b"nope").unwrap(), None);
        assert_eq!(r.records().count(), 5002);
        assert!(!tmp_name(&path, "tmp").exists());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn keep_last_and_empty() {
        let d = dir("last");
        let path = d.join("t.cdb");
        let mut w = Writer::create(&path, 0o600).unwrap();
        w.add(b"a", b"1").unwrap();
        w.add(b"b", b"2").unwrap();
        w.add(b"a", b"3").unwrap();
        w.commit(Duplicates::KeepLast).unwrap();
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.get(b"a").unwrap(), Some(b"3".to_vec()));
        let all: Vec<_> = r.records().map(|r| r.unwrap()).collect();
        assert_eq!(
            all,
            vec![
                (b"b".to_vec(), b"2".to_vec()),
                (b"a".to_vec(), b"3".to_vec())
            ]
        );
        Writer::create(&path, 0o600)
            .unwrap()
            .commit(Duplicates::KeepFirst)
            .unwrap();
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.get(b"a").unwrap(), None);
        assert_eq!(r.records().count(), 0);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn refuses_garbage() {
        let d = dir("bad");
        let path = d.join("t.cdb");
        std::fs::write(&path, b"short").unwrap();
        assert!(Reader::open(&path).is_err());
        std::fs::write(&path, vec![0xffu8; 4096]).unwrap();
        assert!(Reader::open(&path).is_err());
        std::fs::remove_dir_all(d).unwrap();
    }
}
