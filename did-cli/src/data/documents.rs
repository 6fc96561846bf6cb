//! Reading a corpus: text files, JSON-lines files, folders and
//! `.tgz`/`.tar.gz` archives read in place; one document per text file or per
//! JSON line; UTF-8 with a latin-1 fallback; CRLF → LF.

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

fn is_archive(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.ends_with(".tgz") || s.ends_with(".tar.gz")
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
/// let docs = did_cli::data::documents::jsonl_documents("c.jsonl", b"{\"text\": \"a\\r\\nb\"}\n\n{\"text\": \"c\"}\n", "text")?;
/// assert_eq!((docs[0].text.as_str(), docs[1].name.as_str()), ("a\nb", "c.jsonl:3"));
/// assert!(did_cli::data::documents::jsonl_documents("c.jsonl", b"{\"body\": 1}\n", "text").unwrap_err().contains("line 1"));
/// # Ok::<(), String>(())
/// ```
pub fn jsonl_documents(name: &str, bytes: &[u8], field: &str) -> Result<Vec<Document>, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("{name} is not UTF-8 ({e}); JSON lines must be UTF-8"))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = format!("{name}:{}", i + 1);
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("{name} line {}: not JSON ({e})", i + 1))?;
        let body = value.get(field).and_then(|v| v.as_str()).ok_or_else(|| {
            format!(
                "{name} line {}: no string field {field:?}; name the text field with --jsonl-field",
                i + 1
            )
        })?;
        out.push(Document {
            text: decode(&at, body.as_bytes())?,
            name: at,
        });
    }
    Ok(out)
}

/// Decodes bytes as UTF-8, else latin-1; normalises line ends to LF; cuts a
/// trailing Project Gutenberg licence; rejects binary data.
pub fn decode(name: &str, bytes: &[u8]) -> Result<String, String> {
    let text = match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    };
    let control = text
        .chars()
        .filter(|&c| c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\u{c}'))
        .count();
    if control > 0 && control * 100 > text.chars().count() {
        return Err(format!(
            "{name} looks binary ({control} control characters); pass text files (UTF-8 or latin-1), or archives of them"
        ));
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

fn read_archive(path: &Path, out: &mut Vec<Document>) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    read_archive_from(&path.display().to_string(), file, out)
}

/// The `.txt` documents of a `.tar.gz` stream named `name` (its members are
/// named `name:member`), decoded as plain files are.
pub fn read_archive_from(
    name: &str,
    reader: impl Read,
    out: &mut Vec<Document>,
) -> Result<(), String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let bad = |e: std::io::Error| format!("{name} is not a readable .tar.gz archive: {e}");
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let inner = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        if !is_text_name(&inner) {
            continue;
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(bad)?;
        let member = format!("{name}:{inner}");
        let text = decode(&member, &bytes)?;
        out.push(Document { name: member, text });
    }
    Ok(())
}

fn read_path(
    path: &Path,
    explicit: bool,
    jsonl_field: &str,
    out: &mut Vec<Document>,
) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| {
        format!(
            "input {} cannot be read: {e}; check the path",
            path.display()
        )
    })?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("cannot list {}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() || is_archive(&p) || is_text_name(&name) || is_jsonl_name(&name) {
                read_path(&p, false, jsonl_field, out)?;
            }
        }
        Ok(())
    } else if is_archive(path) {
        read_archive(path, out)
    } else if is_jsonl_name(&path.to_string_lossy()) {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        out.extend(jsonl_documents(
            &path.display().to_string(),
            &bytes,
            jsonl_field,
        )?);
        Ok(())
    } else if explicit || is_text_name(&path.to_string_lossy()) {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let name = path.display().to_string();
        let text = decode(&name, &bytes)?;
        out.push(Document { name, text });
        Ok(())
    } else {
        Ok(())
    }
}

/// Every document under `inputs` (files given by name are read whatever their
/// extension; inside folders and archives, `.txt` files), in a stable order.
/// Empty documents are dropped.
pub fn collect(inputs: &[PathBuf]) -> Result<Vec<Document>, String> {
    collect_with(inputs, "text")
}

/// [`collect`] with the text field of JSON-lines files named.
pub fn collect_with(inputs: &[PathBuf], jsonl_field: &str) -> Result<Vec<Document>, String> {
    if inputs.is_empty() {
        return Err("no input given; name text files, folders or .tgz archives".into());
    }
    let mut out = Vec::new();
    for p in inputs {
        read_path(p, true, jsonl_field, &mut out)?;
    }
    out.retain(|d| !d.text.trim().is_empty());
    if out.is_empty() {
        return Err(format!(
            "no text found in {}; folders and archives contribute their .txt files",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
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
            .contains("looks binary"));
    }
}
