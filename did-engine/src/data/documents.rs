//! Reading a corpus as researchers have it, streamed a document at a time:
//! text files, folders, JSON lines, Parquet, tar archives and `.gz`/`.xz`
//! files read in place (OpenWebText's `openwebtext.tar.xz` of `.xz` tars
//! included); one document per text file, JSON line or Parquet row; UTF-8
//! with a latin-1 fallback; CRLF → LF.

use crate::Error;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One document of the corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Where it came from (`archive.tgz:inner/path.txt` inside archives).
    pub name: String,
    /// Its text, normalised.
    pub text: String,
}

fn is_text_name(s: &str) -> bool {
    s.ends_with(".txt")
}

fn is_jsonl_name(s: &str) -> bool {
    s.ends_with(".jsonl")
}

/// The documents of a JSON-lines file: the string `field` of every non-empty
/// line (Hugging Face and OpenWebText dumps use `text`), each normalised as a
/// text file is and named `name:LINE`.
///
/// ```
/// let docs = did_engine::data::documents::jsonl_documents("c.jsonl", b"{\"text\": \"a\\r\\nb\"}\n\n{\"text\": \"c\"}\n", "text")?;
/// assert_eq!((docs[0].text.as_str(), docs[1].name.as_str()), ("a\nb", "c.jsonl:3"));
/// assert!(did_engine::data::documents::jsonl_documents("c.jsonl", b"{\"body\": 1}\n", "text").unwrap_err().to_string().contains("line 1"));
/// # Ok::<(), String>(())
/// ```
pub fn jsonl_documents(name: &str, bytes: &[u8], field: &str) -> Result<Vec<Document>, Error> {
    let mut out = Vec::new();
    jsonl_stream(name, bytes, field, &mut |d| {
        out.push(d);
        Ok(())
    })?;
    Ok(out)
}

/// [`jsonl_documents`] a line at a time from a reader, into `sink`.
pub fn jsonl_stream(
    name: &str,
    reader: impl Read,
    field: &str,
    sink: Sink<'_>,
) -> Result<(), Error> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, reader);
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::Corpus(format!("cannot read {name}: {e}")))?;
        if n == 0 {
            break;
        }
        let text = std::str::from_utf8(&line).map_err(|e| {
            Error::Corpus(format!(
                "{name} line {number} is not UTF-8 ({e}); JSON lines must be UTF-8"
            ))
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Corpus(format!("{name} line {number}: not JSON ({e})")))?;
        let body = value.get(field).and_then(|v| v.as_str()).ok_or_else(|| {
            Error::Corpus(format!(
                "{name} line {number}: no string field {field:?}; name the text field with --text-field"
            ))
        })?;
        let at = format!("{name}:{number}");
        sink(Document {
            text: decode(&at, body.as_bytes())?,
            name: at,
        })?;
    }
    Ok(())
}

/// Decodes bytes as UTF-8, else latin-1; normalises line ends to LF; cuts a
/// trailing Project Gutenberg licence; rejects binary data.
pub fn decode(name: &str, bytes: &[u8]) -> Result<String, Error> {
    let text = match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    };
    let control = text
        .chars()
        .filter(|&c| c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\u{c}'))
        .count();
    if control > 0 && control * 100 > text.chars().count() {
        return Err(Error::Corpus(format!(
            "{name} looks binary ({control} control characters); pass text files (UTF-8 or latin-1), or archives of them"
        )));
    }
    // CRLF and lone CR (old Mac files) both become LF, in one pass each ("\r\r\n" too).
    let mut text = text.replace("\r\n", "\n").replace('\r', "\n");
    for marker in [
        "*** END OF THE PROJECT GUTENBERG",
        "*** END OF THIS PROJECT GUTENBERG",
        "End of the Project Gutenberg",
        "End of Project Gutenberg",
    ] {
        if let Some(at) = text.find(marker) {
            text.truncate(at);
        }
    }
    Ok(text)
}

/// Where documents go as they are read: one at a time, so that a corpus far
/// larger than memory (OpenWebText: 38 GB of text) streams through.
pub type Sink<'a> = &'a mut dyn FnMut(Document) -> Result<(), Error>;

/// How a file name is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// A tar archive, compressed or not (`.tar`, `.tgz`, `.tar.gz`, `.txz`, `.tar.xz`).
    Tar(Compression),
    /// One compressed file (`.gz`, `.xz`): a tar inside (OpenWebText's subsets) or a text or JSON-lines file.
    Compressed(Compression),
    /// Hugging Face datasets' Parquet files.
    Parquet,
    /// One document per JSON line.
    Jsonl,
    /// One document.
    Text,
    /// Not part of the corpus (inside folders and archives).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Xz,
}

fn format_of(name: &str) -> Format {
    let n = name.to_ascii_lowercase();
    if n.ends_with(".tgz") || n.ends_with(".tar.gz") {
        Format::Tar(Compression::Gzip)
    } else if n.ends_with(".txz") || n.ends_with(".tar.xz") {
        Format::Tar(Compression::Xz)
    } else if n.ends_with(".tar") {
        Format::Tar(Compression::None)
    } else if n.ends_with(".gz") {
        Format::Compressed(Compression::Gzip)
    } else if n.ends_with(".xz") {
        Format::Compressed(Compression::Xz)
    } else if n.ends_with(".parquet") {
        Format::Parquet
    } else if is_jsonl_name(&n) {
        Format::Jsonl
    } else if is_text_name(&n) {
        Format::Text
    } else {
        Format::Other
    }
}

fn decompress<'r>(compression: Compression, reader: impl Read + 'r) -> Box<dyn Read + 'r> {
    match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Xz => Box::new(lzma_rust2::XzReader::new(reader, true)),
    }
}

/// The documents of a `.tar.gz` stream named `name` (its members are named
/// `name:member`), decoded as plain files are.
pub fn read_archive_from(
    name: &str,
    reader: impl Read,
    out: &mut Vec<Document>,
) -> Result<(), Error> {
    read_tar(
        name,
        decompress(Compression::Gzip, reader),
        "text",
        &mut |d| {
            out.push(d);
            Ok(())
        },
    )
}

/// The documents of a stream named `name` in any format but Parquet (which
/// needs to seek): archives, compressed files (a tar inside is recognised by
/// its content, as in OpenWebText's `urlsf_subset*.xz`), JSON lines, text.
pub fn read_stream(
    name: &str,
    reader: impl Read,
    field: &str,
    sink: Sink<'_>,
) -> Result<(), Error> {
    let read_all = |mut r: Box<dyn Read + '_>| {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)
            .map_err(|e| Error::Corpus(format!("cannot read {name}: {e}")))?;
        Ok::<_, Error>(bytes)
    };
    match format_of(name) {
        Format::Tar(c) => read_tar(name, decompress(c, reader), field, sink),
        Format::Compressed(c) => {
            let mut inner = decompress(c, reader);
            // A tar has "ustar" at byte 257 of its first header.
            let mut head = Vec::with_capacity(512);
            (&mut inner)
                .take(512)
                .read_to_end(&mut head)
                .map_err(|e| Error::Corpus(format!("cannot read {name}: {e}")))?;
            let is_tar = head.len() >= 262 && &head[257..262] == b"ustar";
            let whole: Box<dyn Read + '_> = Box::new(std::io::Cursor::new(head).chain(inner));
            let stem = &name[..name.rfind('.').unwrap_or(name.len())];
            if is_tar {
                read_tar(name, whole, field, sink)
            } else if format_of(stem) == Format::Jsonl {
                jsonl_stream(name, whole, field, sink)
            } else {
                let text = decode(name, &read_all(whole)?)?;
                sink(Document {
                    name: name.to_string(),
                    text,
                })
            }
        }
        Format::Jsonl => jsonl_stream(name, reader, field, sink),
        Format::Parquet => Err(Error::Corpus(format!(
            "{name}: Parquet files inside archives are not read; extract them first"
        ))),
        Format::Text | Format::Other => {
            let text = decode(name, &read_all(Box::new(reader))?)?;
            sink(Document {
                name: name.to_string(),
                text,
            })
        }
    }
}

/// A tar stream's members: text, JSON lines and compressed files (recursively);
/// everything else is skipped.
fn read_tar(name: &str, reader: impl Read, field: &str, sink: Sink<'_>) -> Result<(), Error> {
    let mut archive = tar::Archive::new(reader);
    let bad = |e: std::io::Error| Error::Corpus(format!("{name} is not a readable archive: {e}"));
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let inner = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let member = format!("{name}:{inner}");
        match format_of(&inner) {
            Format::Other | Format::Parquet => continue,
            _ => read_stream(&member, entry, field, sink)?,
        }
    }
    Ok(())
}

/// The text column `field` of a Parquet file (as Hugging Face datasets store
/// them), one document per row, named `name:ROW`, read a row group at a time.
pub fn parquet_documents(
    name: &str,
    file: impl parquet::file::reader::ChunkReader + 'static,
    field: &str,
    sink: Sink<'_>,
) -> Result<(), Error> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: parquet::errors::ParquetError| {
        Error::Corpus(format!("{name} is not a readable Parquet file: {e}"))
    };
    let file_len = file.len();
    // The parquet crate asserts (panics) on some corrupt files instead of
    // returning an error (found by fuzzing); its calls are fenced so that a
    // corrupt file is an error that names it. The checks below catch the
    // common case (a truncated file) before any assertion is reached.
    let fenced = |e: Box<dyn std::any::Any + Send>| {
        let why = e
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| e.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Error::Corpus(format!("{name} is not a readable Parquet file: corrupt ({why}); check it with pyarrow or fetch it again"))
    };
    let fence =
        |f: &mut dyn FnMut() -> Option<
            Result<parquet::record::Row, parquet::errors::ParquetError>,
        >| { std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(fenced) };
    let reader = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        SerializedFileReader::new(file)
    }))
    .map_err(fenced)?
    .map_err(bad)?;
    // The reader asserts (panics) on column chunks outside the file; a corrupt
    // footer gets an error here instead.
    for (g, group) in reader.metadata().row_groups().iter().enumerate() {
        for c in group.columns() {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let len = c.compressed_size();
            let inside = start >= 0
                && len >= 0
                && (start as u64)
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= file_len);
            if !inside {
                return Err(Error::Corpus(format!(
                    "{name} is not a readable Parquet file: row group {g} points outside the file (truncated or corrupt)"
                )));
            }
        }
    }
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let column = schema
        .columns()
        .iter()
        .position(|c| c.path().parts() == [field])
        .ok_or_else(|| {
            let names: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
            Error::Corpus(format!(
                "{name} has no column {field:?} (it has {}); name the text column with --text-field",
                names.join(", ")
            ))
        })?;
    check_parquet_dictionaries(name, &reader, column, &fenced)?;
    let projection = parquet::schema::types::Type::group_type_builder("schema")
        .with_fields(vec![schema.column(column).self_type_ptr()])
        .build()
        .map_err(bad)?;
    let mut row_number = 0usize;
    let mut rows = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        reader.get_row_iter(Some(projection))
    }))
    .map_err(fenced)?
    .map_err(bad)?;
    while let Some(row) = fence(&mut || rows.next())? {
        let row = row.map_err(bad)?;
        row_number += 1;
        let at = format!("{name}:{row_number}");
        let text = match row.get_column_iter().next().map(|(_, v)| v) {
            Some(parquet::record::Field::Str(s)) => s.clone(),
            Some(parquet::record::Field::Bytes(b)) => decode(&at, b.data())?,
            Some(parquet::record::Field::Null) | None => continue,
            Some(other) => {
                return Err(Error::Corpus(format!(
                    "{name}: column {field:?} holds {other}, not text; name the text column with --text-field"
                )))
            }
        };
        sink(Document {
            text: decode(&at, text.as_bytes())?,
            name: at,
        })?;
    }
    Ok(())
}

/// Dictionary pages the parquet crate would size by their header alone:
/// fuzzing found a 2 KB file whose dictionary claims 1.2 G values (a 30 GB
/// allocation, which aborts the process rather than failing). Every
/// dictionary page of the text column is read first (data pages are
/// skipped) and must hold at least 4 bytes per value, as PLAIN byte arrays
/// do, and at most 256 MB.
fn check_parquet_dictionaries<R: parquet::file::reader::ChunkReader + 'static>(
    name: &str,
    reader: &parquet::file::reader::SerializedFileReader<R>,
    column: usize,
    fenced: &dyn Fn(Box<dyn std::any::Any + Send>) -> Error,
) -> Result<(), Error> {
    use parquet::column::page::Page;
    use parquet::file::reader::FileReader;
    let bad = |e: parquet::errors::ParquetError| {
        Error::Corpus(format!("{name} is not a readable Parquet file: {e}"))
    };
    for g in 0..reader.num_row_groups() {
        let group = reader.get_row_group(g).map_err(bad)?;
        {
            let mut pages = group.get_column_page_reader(column).map_err(bad)?;
            loop {
                // None: the column's pages are done; Some(None): a data page, skipped unread.
                let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    match pages.peek_next_page()? {
                        None => Ok(None),
                        Some(m) if m.is_dict => pages.get_next_page().map(Some),
                        Some(_) => pages.skip_next_page().map(|()| Some(None)),
                    }
                }))
                .map_err(fenced)?
                .map_err(bad)?;
                match next {
                    None => break,
                    Some(Some(Page::DictionaryPage {
                        buf, num_values, ..
                    })) => {
                        let values = num_values as usize;
                        if values.saturating_mul(4) > buf.len() || buf.len() > 256 << 20 {
                            return Err(Error::Corpus(format!(
                                "{name} is not a readable Parquet file: a dictionary of {values} values in {} bytes (corrupt)",
                                buf.len()
                            )));
                        }
                    }
                    Some(_) => {}
                }
            }
        }
    }
    Ok(())
}

/// Counts the bytes read from the input files into the progress bar.
struct Counting<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn read_path(
    path: &Path,
    explicit: bool,
    field: &str,
    bar: &indicatif::ProgressBar,
    sink: Sink<'_>,
) -> Result<(), Error> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::Corpus(format!(
            "input {} cannot be read: {e}; check the path",
            path.display()
        ))
    })?;
    let name = path.display().to_string();
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::Corpus(format!("cannot list {}: {e}", path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            let file_name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if file_name.starts_with('.') {
                continue;
            }
            if p.is_dir() || format_of(&file_name) != Format::Other {
                read_path(&p, false, field, bar, sink)?;
            }
        }
        return Ok(());
    }
    let format = format_of(&name);
    if format == Format::Other && !explicit {
        return Ok(());
    }
    let file = File::open(path).map_err(|e| Error::Corpus(format!("cannot open {name}: {e}")))?;
    if format == Format::Parquet {
        parquet_documents(&name, file, field, sink)?;
        bar.inc(meta.len());
        return Ok(());
    }
    let counted = Counting {
        inner: std::io::BufReader::with_capacity(1 << 20, file),
        bar: bar.clone(),
    };
    read_stream(&name, counted, field, sink)
}

/// Streams every document under `inputs` into `sink`, in a stable order:
/// text files (read whatever their extension when named), folders, tar
/// archives (`.tar`, `.tgz`, `.tar.gz`, `.txz`, `.tar.xz`), compressed files
/// (`.gz`, `.xz`, with a tar inside or not), JSON lines (the string `field`),
/// Parquet (the column `field`). Empty documents are skipped. `bar` advances
/// by the bytes read from disk. Returns the number of documents.
pub fn for_each_document(
    inputs: &[PathBuf],
    field: &str,
    bar: &indicatif::ProgressBar,
    sink: Sink<'_>,
) -> Result<usize, Error> {
    if inputs.is_empty() {
        return Err(Error::Corpus(
            "no input given; name text files, folders or archives".into(),
        ));
    }
    let mut count = 0usize;
    let mut counted = |d: Document| {
        if d.text.trim().is_empty() {
            return Ok(());
        }
        count += 1;
        sink(d)
    };
    for p in inputs {
        read_path(p, true, field, bar, &mut counted)?;
    }
    if count == 0 {
        return Err(Error::Corpus(format!(
            "no text found in {}; folders and archives contribute their .txt, .jsonl, .parquet and compressed files",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(count)
}

/// The bytes on disk of the files [`for_each_document`] would read (for a progress bar).
pub fn input_bytes(inputs: &[PathBuf]) -> u64 {
    fn walk(p: &Path, explicit: bool) -> u64 {
        let Ok(meta) = std::fs::metadata(p) else {
            return 0;
        };
        if meta.is_dir() {
            let Ok(entries) = std::fs::read_dir(p) else {
                return 0;
            };
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .map(|p| walk(&p, false))
                .sum()
        } else if explicit || format_of(&p.to_string_lossy()) != Format::Other {
            meta.len()
        } else {
            0
        }
    }
    inputs.iter().map(|p| walk(p, true)).sum()
}

/// Every document under `inputs` in memory (see [`for_each_document`]).
pub fn collect(inputs: &[PathBuf]) -> Result<Vec<Document>, Error> {
    collect_with(inputs, "text")
}

/// [`collect`] with the text field of JSON-lines and Parquet files named.
pub fn collect_with(inputs: &[PathBuf], field: &str) -> Result<Vec<Document>, Error> {
    let mut out = Vec::new();
    for_each_document(inputs, field, &indicatif::ProgressBar::hidden(), &mut |d| {
        out.push(d);
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_crlf_and_gutenberg_trailer() {
        let t = decode(
            "x",
            b"caf\xe9\r\nline\r\nEnd of the Project Gutenberg EBook",
        )
        .unwrap();
        assert_eq!(t, "café\nline\n");
        assert!(decode("blob", &[0u8, 1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap_err()
            .to_string()
            .contains("looks binary"));
    }
}
