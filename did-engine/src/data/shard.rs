//! Token shards: a 48-byte header and the tokens, little-endian, memory-mapped for training.
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic `DIDTOKS\0` |
//! | 8 | version (u32, 1) |
//! | 12 | tokenizer (u32: 0 bytes, 1 gpt2) |
//! | 16 | vocabulary size with `[MASK]` (u32) |
//! | 20 | bytes per token (u32: 2 or 4) |
//! | 24 | token count (u64) |
//! | 32 | documents (u64) |
//! | 40 | FNV-1a 64 checksum of the token bytes (u64) |

use crate::Error;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use super::tokenizer::TokenizerKind;

/// The magic bytes at the start of every shard.
pub const MAGIC: &[u8; 8] = b"DIDTOKS\0";
/// The current format version.
pub const VERSION: u32 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 48;

/// What a shard's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The tokenizer that produced the tokens.
    pub tokenizer: TokenizerKind,
    /// Vocabulary size including `[MASK]`.
    pub vocab_size: u32,
    /// 2 or 4.
    pub bytes_per_token: u32,
    /// Tokens in the shard.
    pub tokens: u64,
    /// Documents in the shard.
    pub documents: u64,
    /// FNV-1a 64 of the token bytes.
    pub checksum: u64,
}

/// FNV-1a 64 over `bytes`, continuing from `hash` (start with [`FNV_OFFSET`]).
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

impl Header {
    /// The header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.tokenizer.id().to_le_bytes());
        b[16..20].copy_from_slice(&self.vocab_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.bytes_per_token.to_le_bytes());
        b[24..32].copy_from_slice(&self.tokens.to_le_bytes());
        b[32..40].copy_from_slice(&self.documents.to_le_bytes());
        b[40..48].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Parses and checks a header (`file_len`: the whole file's length).
    /// Every failure names what is wrong and what to do.
    pub fn parse(bytes: &[u8], file_len: u64) -> Result<Header, Error> {
        let redo = "re-create it with `did data prepare`";
        if bytes.len() < HEADER_LEN {
            return Err(Error::Shards(format!(
                "too short for a token shard ({} bytes, the header alone is {HEADER_LEN}); {redo}",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(Error::Shards(format!(
                "not a did token shard (bad magic bytes); {redo}"
            )));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(Error::Shards(format!(
                "shard format version {version}, this build reads version {VERSION}; {redo}"
            )));
        }
        let tokenizer = TokenizerKind::from_id(u32_at(12))
            .ok_or_else(|| Error::Shards(format!("unknown tokenizer id {}; {redo}", u32_at(12))))?;
        let bytes_per_token = u32_at(20);
        if bytes_per_token != 2 && bytes_per_token != 4 {
            return Err(Error::Shards(format!(
                "{bytes_per_token} bytes per token (expected 2 or 4); {redo}"
            )));
        }
        let vocab_size = u32_at(16);
        if vocab_size == 0 || (bytes_per_token == 2 && vocab_size > 65_536) {
            return Err(Error::Shards(format!(
                "vocabulary size {vocab_size} does not fit {bytes_per_token}-byte tokens; {redo}"
            )));
        }
        let tokens = u64_at(24);
        let expected = tokens
            .checked_mul(u64::from(bytes_per_token))
            .and_then(|b| b.checked_add(HEADER_LEN as u64));
        if expected != Some(file_len) {
            return Err(Error::Shards(format!(
                "the header promises {tokens} tokens but the file has {file_len} bytes (truncated or corrupt); {redo}"
            )));
        }
        Ok(Header {
            tokenizer,
            vocab_size,
            bytes_per_token,
            tokens,
            documents: u64_at(32),
            checksum: u64_at(40),
        })
    }
}

/// Writes tokens to a shard at `path` (through a temporary file renamed into place).
pub fn write(
    path: &Path,
    tokenizer: TokenizerKind,
    vocab_size: u32,
    documents: u64,
    tokens: &[u32],
) -> Result<Header, Error> {
    let mut w = ShardWriter::create(path, tokenizer, vocab_size)?;
    w.append(tokens)?;
    w.documents = documents;
    w.finish()?.commit()
}

/// A shard written as its documents stream in: tokens go to `PATH.tmp` behind
/// a placeholder header; [`ShardWriter::finish`] writes the real header and
/// syncs; [`Finished::commit`] renames it into place, so that a failure
/// anywhere before leaves the previous shard untouched. A writer dropped
/// unfinished removes its temporary file.
pub struct ShardWriter {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    file: Option<std::io::BufWriter<File>>,
    tokenizer: TokenizerKind,
    vocab_size: u32,
    bytes_per_token: u32,
    tokens: u64,
    /// Documents written so far.
    pub documents: u64,
    checksum: u64,
    buf: Vec<u8>,
}

/// A shard written and synced under its temporary name.
#[derive(Debug)]
pub struct Finished {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    header: Header,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| {
        Error::Shards(format!(
            "cannot write {}: {e}; check that the output folder is writable and has space",
            path.display()
        ))
    }
}

impl ShardWriter {
    /// Starts `path`'s temporary file.
    pub fn create(path: &Path, tokenizer: TokenizerKind, vocab_size: u32) -> Result<Self, Error> {
        let tmp = path.with_extension("bin.tmp");
        let mut file =
            std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io_error(path))?);
        file.write_all(&[0u8; HEADER_LEN]).map_err(io_error(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            file: Some(file),
            tokenizer,
            vocab_size,
            bytes_per_token: if vocab_size <= 65_536 { 2 } else { 4 },
            tokens: 0,
            documents: 0,
            checksum: FNV_OFFSET,
            buf: Vec::new(),
        })
    }

    /// Appends tokens.
    pub fn append(&mut self, tokens: &[u32]) -> Result<(), Error> {
        self.buf.clear();
        for &t in tokens {
            if self.bytes_per_token == 2 {
                self.buf.extend_from_slice(&(t as u16).to_le_bytes());
            } else {
                self.buf.extend_from_slice(&t.to_le_bytes());
            }
        }
        self.checksum = fnv1a(self.checksum, &self.buf);
        self.tokens += tokens.len() as u64;
        let file = self
            .file
            .as_mut()
            .ok_or(Error::Shards("shard writer already finished".into()))?;
        file.write_all(&self.buf).map_err(io_error(&self.path))
    }

    /// Appends one document's tokens (EOS included) and counts it.
    pub fn push_document(&mut self, tokens: &[u32]) -> Result<(), Error> {
        self.append(tokens)?;
        self.documents += 1;
        Ok(())
    }

    /// Tokens written so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Writes the header and syncs the temporary file.
    pub fn finish(mut self) -> Result<Finished, Error> {
        use std::io::{Seek, SeekFrom};
        let header = Header {
            tokenizer: self.tokenizer,
            vocab_size: self.vocab_size,
            bytes_per_token: self.bytes_per_token,
            tokens: self.tokens,
            documents: self.documents,
            checksum: self.checksum,
        };
        let path = self.path.clone();
        let io = io_error(&path);
        let file = self
            .file
            .take()
            .ok_or(Error::Shards("shard writer already finished".into()))?;
        let mut file = file.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(&io)?;
        file.write_all(&header.to_bytes()).map_err(&io)?;
        file.sync_all().map_err(&io)?;
        Ok(Finished {
            path: self.path.clone(),
            tmp: std::mem::take(&mut self.tmp),
            header,
        })
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Finished {
    /// Renames the shard into place.
    pub fn commit(self) -> Result<Header, Error> {
        std::fs::rename(&self.tmp, &self.path).map_err(io_error(&self.path))?;
        Ok(self.header)
    }
}

/// A shard opened for reading, memory-mapped, its checksum verified.
pub struct Shard {
    header: Header,
    map: memmap2::Mmap,
}

impl Shard {
    /// Opens and checks `path`.
    pub fn open(path: &Path) -> Result<Shard, Error> {
        let file = File::open(path).map_err(|e| {
            Error::Shards(format!(
                "cannot open the token shard {}: {e}; run `did data prepare` first",
                path.display()
            ))
        })?;
        let len = file
            .metadata()
            .map_err(|e| Error::Shards(format!("cannot read {}: {e}", path.display())))?
            .len();
        // SAFETY: the map is read-only; a shard modified while mapped is the user's
        // error and can only yield wrong tokens (every index is bounds-checked).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::Shards(format!("cannot map {}: {e}", path.display())))?;
        let header = Header::parse(&map, len)
            .map_err(|e| Error::Shards(format!("{}: {e}", path.display())))?;
        if fnv1a(FNV_OFFSET, &map[HEADER_LEN..]) != header.checksum {
            return Err(Error::Shards(format!(
                "{}: checksum mismatch (the file is corrupt); re-create it with `did data prepare`",
                path.display()
            )));
        }
        Ok(Shard { header, map })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.header.tokens as usize
    }

    /// Whether the shard holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `i`.
    pub fn get(&self, i: usize) -> Option<u32> {
        let w = self.header.bytes_per_token as usize;
        let b = self.map.get(HEADER_LEN + i * w..HEADER_LEN + (i + 1) * w)?;
        Some(if w == 2 {
            u32::from(u16::from_le_bytes([b[0], b[1]]))
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        })
    }

    /// Tokens `start..start + out.len()` into `out`; `false` if the range leaves the shard.
    pub fn read(&self, start: usize, out: &mut [u32]) -> bool {
        if start
            .checked_add(out.len())
            .is_none_or(|end| end > self.len())
        {
            return false;
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.get(start + i).unwrap_or(0);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("did-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.bin");
        let tokens: Vec<u32> = (0..1000).map(|i| (i * 37) % 50258).collect();
        let h = write(&path, TokenizerKind::Gpt2, 50258, 3, &tokens).unwrap();
        assert_eq!(h.bytes_per_token, 2);
        let s = Shard::open(&path).unwrap();
        assert_eq!(*s.header(), h);
        let mut out = vec![0; 10];
        assert!(s.read(990, &mut out));
        assert_eq!(out, tokens[990..]);
        assert!(!s.read(991, &mut out));
        drop(s);
        // Flip one token byte: the checksum catches it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 5] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Shard::open(&path)
            .err()
            .unwrap()
            .to_string()
            .contains("checksum mismatch"));
        // Truncate: the length check catches it.
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Shard::open(&path)
            .err()
            .unwrap()
            .to_string()
            .contains("truncated or corrupt"));
        std::fs::write(&path, b"hello").unwrap();
        assert!(Shard::open(&path)
            .err()
            .unwrap()
            .to_string()
            .contains("too short"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn header_rejects_every_bad_field() {
        let good = Header {
            tokenizer: TokenizerKind::Bytes,
            vocab_size: 258,
            bytes_per_token: 2,
            tokens: 4,
            documents: 1,
            checksum: 0,
        };
        let file_len = (HEADER_LEN + 8) as u64;
        assert_eq!(Header::parse(&good.to_bytes(), file_len).unwrap(), good);
        let cases: [(usize, u8, &str); 4] = [
            (0, b'X', "bad magic"),
            (8, 9, "version"),
            (12, 7, "tokenizer id"),
            (20, 3, "bytes per token"),
        ];
        for (at, v, want) in cases {
            let mut b = good.to_bytes();
            b[at] = v;
            assert!(
                Header::parse(&b, file_len)
                    .unwrap_err()
                    .to_string()
                    .contains(want),
                "{want}"
            );
        }
    }
}
