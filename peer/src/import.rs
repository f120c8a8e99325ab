//! Importing JSONL records into shards: validation with `file:line` errors, normalisation,
//! deduplication by normalised-record hash, and token counting.
//!
//! Pure functions over bytes; no store or network. The node ([`crate::node`]) feeds the shards
//! this builds into the blob store and records them in the metadata store.

use std::collections::BTreeSet;
use std::io::{BufRead, Read as _};
use std::path::{Path, PathBuf};

use cohort_protocol::ContentHash;
use cohort_protocol::types::RecordSchema;
use serde_json::{Map, Value};

/// Longest accepted record (one JSONL line), in bytes.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Default largest shard, in bytes: a shard is closed before a record would take it past this.
pub const DEFAULT_SHARD_BYTES: usize = 16 << 20;

/// Counts tokens of record text.
pub trait TokenCounter {
    /// Tokens in `text`.
    fn count(&self, text: &str) -> u64;
}

/// A fallback estimate when no tokenizer is available: one token per 4 bytes of UTF-8, rounded
/// up.
#[derive(Debug, Clone, Copy, Default)]
pub struct InterimByteEstimate;

impl TokenCounter for InterimByteEstimate {
    fn count(&self, text: &str) -> u64 {
        (text.len() as u64).div_ceil(4)
    }
}

/// Counts with a model's own tokenizer (record text as plain text: special-token spellings in
/// the data are not turned into control tokens).
#[derive(Debug)]
pub struct ModelTokenCounter(cohort_trainer::tokenizer::Tokenizer);

impl TokenCounter for ModelTokenCounter {
    fn count(&self, text: &str) -> u64 {
        self.0.encode(text, false).len() as u64
    }
}

/// The default base model's tokenizer (SmolLM2's byte-level BPE, read from the GGUF in the
/// model cache) when the model is there, else [`InterimByteEstimate`]; built once per process.
pub fn default_token_counter() -> &'static (dyn TokenCounter + Sync) {
    static COUNTER: std::sync::OnceLock<Box<dyn TokenCounter + Send + Sync>> =
        std::sync::OnceLock::new();
    COUNTER
        .get_or_init(|| {
            let path = cohort_trainer::models::default_model_path();
            let loaded = cohort_trainer::gguf::GgufFile::open(&path)
                .ok()
                .and_then(|f| cohort_trainer::tokenizer::Tokenizer::from_gguf(&f).ok());
            match loaded {
                Some(t) => Box::new(ModelTokenCounter(t)),
                None => {
                    tracing::warn!(
                        "no tokenizer at {}: token counts are estimated (4 bytes a token); run scripts/fetch-model.sh",
                        path.display()
                    );
                    Box::new(InterimByteEstimate)
                }
            }
        })
        .as_ref()
}

/// Why a file could not be imported. Every variant names the file; record errors name the line
/// and the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A record is invalid.
    #[error("{path}:{line}: field `{field}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The offending field (`$` for the record itself).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The files held no records at all.
    #[error("{path}: no records")]
    Empty {
        /// The (first) file.
        path: PathBuf,
    },
}

/// One shard built from records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltShard {
    /// The normalised records, one per line, each ending in `\n`.
    pub bytes: Vec<u8>,
    /// Records in the shard.
    pub records: u64,
    /// Tokens in the shard.
    pub tokens: u64,
    /// The normalised-record hashes, for deduplication.
    pub record_hashes: Vec<ContentHash>,
}

/// What an import produced.
#[derive(Debug, Default)]
pub struct Imported {
    /// New shards (possibly none when every record was a duplicate).
    pub shards: Vec<BuiltShard>,
    /// Records read.
    pub records_read: u64,
    /// Records skipped as duplicates (of earlier records, or of records already in the datanet).
    pub duplicates: u64,
}

/// Validates and normalises one record. Returns the normalised JSON text and its token count.
pub fn normalize_record(
    schema: RecordSchema,
    value: &Value,
    counter: &dyn TokenCounter,
) -> Result<(String, u64), (String, String)> {
    let fail = |field: &str, reason: &str| Err((field.to_owned(), reason.to_owned()));
    let Some(obj) = value.as_object() else {
        return fail("$", "a record must be a JSON object");
    };
    let mut tokens = 0;
    let mut text = |field: String, v: Option<&Value>, required: bool| match v {
        None if required => Err((field, "is missing".to_owned())),
        None => Ok(String::new()),
        Some(Value::String(s)) => {
            let s = s.replace("\r\n", "\n");
            let s = s.trim();
            if required && s.is_empty() {
                return Err((field, "must not be empty".to_owned()));
            }
            if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
                return Err((field, "contains control characters".to_owned()));
            }
            tokens += counter.count(s);
            Ok(s.to_owned())
        }
        Some(_) => Err((field, "must be a string".to_owned())),
    };
    let normalized = match schema {
        RecordSchema::Chat => {
            let Some(messages) = obj.get("messages") else {
                return fail("messages", "is missing");
            };
            let Some(messages) = messages.as_array() else {
                return fail("messages", "must be an array");
            };
            if messages.is_empty() {
                return fail("messages", "must not be empty");
            }
            let mut out = Vec::with_capacity(messages.len());
            for (i, m) in messages.iter().enumerate() {
                let Some(m) = m.as_object() else {
                    return Err((format!("messages[{i}]"), "must be an object".to_owned()));
                };
                let role = text(format!("messages[{i}].role"), m.get("role"), true)?;
                if !matches!(role.as_str(), "system" | "user" | "assistant" | "tool") {
                    return Err((
                        format!("messages[{i}].role"),
                        format!("`{role}` is not one of system, user, assistant, tool"),
                    ));
                }
                let content = text(format!("messages[{i}].content"), m.get("content"), true)?;
                let mut o = Map::new();
                o.insert("content".into(), Value::String(content));
                o.insert("role".into(), Value::String(role));
                out.push(Value::Object(o));
            }
            let mut o = Map::new();
            o.insert("messages".into(), Value::Array(out));
            Value::Object(o)
        }
        RecordSchema::Alpaca => {
            let instruction = text("instruction".into(), obj.get("instruction"), true)?;
            let input = text("input".into(), obj.get("input"), false)?;
            let output = text("output".into(), obj.get("output"), true)?;
            let mut o = Map::new();
            o.insert("input".into(), Value::String(input));
            o.insert("instruction".into(), Value::String(instruction));
            o.insert("output".into(), Value::String(output));
            Value::Object(o)
        }
    };
    // serde_json's map is sorted by key: the normalised text is canonical.
    Ok((normalized.to_string(), tokens))
}

/// Reads, validates, normalises and deduplicates JSONL files into shards of at most
/// `max_shard_bytes`. `known` says whether a record hash is already in the datanet.
pub fn import_files(
    paths: &[PathBuf],
    schema: RecordSchema,
    counter: &dyn TokenCounter,
    max_shard_bytes: usize,
    known: &dyn Fn(&ContentHash) -> bool,
) -> Result<Imported, ImportError> {
    let mut out = Imported::default();
    let mut seen = BTreeSet::new();
    let mut current = BuiltShard {
        bytes: Vec::new(),
        records: 0,
        tokens: 0,
        record_hashes: Vec::new(),
    };
    for path in paths {
        import_file(
            path,
            schema,
            counter,
            max_shard_bytes,
            known,
            &mut seen,
            &mut current,
            &mut out,
        )?;
    }
    if current.records > 0 {
        out.shards.push(current);
    }
    if out.records_read == 0 {
        let path = paths.first().cloned().unwrap_or_default();
        return Err(ImportError::Empty { path });
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn import_file(
    path: &Path,
    schema: RecordSchema,
    counter: &dyn TokenCounter,
    max_shard_bytes: usize,
    known: &dyn Fn(&ContentHash) -> bool,
    seen: &mut BTreeSet<ContentHash>,
    current: &mut BuiltShard,
    out: &mut Imported,
) -> Result<(), ImportError> {
    let io = |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = reader
            .by_ref()
            .take(MAX_RECORD_BYTES as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let invalid = |field: &str, reason: String| ImportError::Invalid {
            path: path.to_path_buf(),
            line: line_no,
            field: field.to_owned(),
            reason,
        };
        if buf.last() != Some(&b'\n') && n > MAX_RECORD_BYTES {
            return Err(invalid(
                "$",
                format!("record is longer than {MAX_RECORD_BYTES} bytes"),
            ));
        }
        let line = std::str::from_utf8(&buf)
            .map_err(|e| invalid("$", format!("not UTF-8: {e}")))?
            .trim();
        if line.is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| invalid("$", format!("not JSON: {e}")))?;
        let (normalized, tokens) =
            normalize_record(schema, &value, counter).map_err(|(f, r)| invalid(&f, r))?;
        out.records_read += 1;
        let hash = ContentHash::of(normalized.as_bytes());
        if known(&hash) || !seen.insert(hash) {
            out.duplicates += 1;
            continue;
        }
        if current.records > 0 && current.bytes.len() + normalized.len() + 1 > max_shard_bytes {
            out.shards.push(std::mem::replace(
                current,
                BuiltShard {
                    bytes: Vec::new(),
                    records: 0,
                    tokens: 0,
                    record_hashes: Vec::new(),
                },
            ));
        }
        current.bytes.extend_from_slice(normalized.as_bytes());
        current.bytes.push(b'\n');
        current.records += 1;
        current.tokens += tokens;
        current.record_hashes.push(hash);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn import(paths: &[PathBuf], schema: RecordSchema) -> Result<Imported, ImportError> {
        import_files(paths, schema, &InterimByteEstimate, 1 << 20, &|_| false)
    }

    #[test]
    fn chat_records_are_normalised_and_deduplicated() {
        let tmp = tempfile::tempdir().unwrap();
        let a = write(
            tmp.path(),
            "a.jsonl",
            concat!(
                r#"{"messages":[{"role":"user","content":"hi "},{"role":"assistant","content":"hello"}]}"#,
                "\n\n",
                // The same record, keys reordered and whitespace changed: a duplicate.
                r#"{"messages":[{"content":"hi","role":"user"},{"content":" hello","role":"assistant"}]}"#,
                "\n",
                r#"{"messages":[{"role":"user","content":"other"}]}"#,
            ),
        );
        let out = import(&[a], RecordSchema::Chat).unwrap();
        assert_eq!(out.records_read, 3);
        assert_eq!(out.duplicates, 1);
        assert_eq!(out.shards.len(), 1);
        let text = String::from_utf8(out.shards[0].bytes.clone()).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            r#"{"messages":[{"content":"hi","role":"user"},{"content":"hello","role":"assistant"}]}"#
        );
        assert_eq!(out.shards[0].records, 2);
        assert!(out.shards[0].tokens > 0);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let tmp = tempfile::tempdir().unwrap();
        let cases = [
            (
                RecordSchema::Chat,
                "{\"messages\":[{\"role\":\"user\",\"content\":\"ok\"}]}\n{\"messages\":[{\"role\":\"user\"}]}\n",
                2,
                "messages[0].content",
            ),
            (
                RecordSchema::Chat,
                "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}\n",
                1,
                "messages[0].role",
            ),
            (RecordSchema::Chat, "{\"messages\":[]}\n", 1, "messages"),
            (RecordSchema::Chat, "\n\nnot json\n", 3, "$"),
            (
                RecordSchema::Alpaca,
                "{\"instruction\":\"a\",\"output\":\"b\"}\n{\"instruction\":\"\",\"output\":\"b\"}\n",
                2,
                "instruction",
            ),
            (
                RecordSchema::Alpaca,
                "{\"instruction\":\"a\",\"input\":3,\"output\":\"b\"}\n",
                1,
                "input",
            ),
            (RecordSchema::Alpaca, "[1,2]\n", 1, "$"),
        ];
        for (i, (schema, text, line, field)) in cases.into_iter().enumerate() {
            let p = write(tmp.path(), &format!("case{i}.jsonl"), text);
            let err = import(std::slice::from_ref(&p), schema).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("{}:{line}: field `{field}`", p.display())),
                "case {i}: {msg}"
            );
        }
    }

    #[test]
    fn invalid_utf8_and_empty_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("bad.jsonl");
        std::fs::write(&p, b"{\"instruction\":\"\xff\"}\n").unwrap();
        let err = import(&[p], RecordSchema::Alpaca).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:1: field `$`: not UTF-8"), "{err}");
        let empty = write(tmp.path(), "empty.jsonl", "\n\n");
        assert!(matches!(
            import(&[empty], RecordSchema::Alpaca),
            Err(ImportError::Empty { .. })
        ));
    }

    #[test]
    fn shards_are_split_by_size_and_known_records_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!(
                "{{\"instruction\":\"q{i}\",\"input\":\"\",\"output\":\"a{i}\"}}\n"
            ));
        }
        let p = write(tmp.path(), "many.jsonl", &text);
        let out = import_files(
            std::slice::from_ref(&p),
            RecordSchema::Alpaca,
            &InterimByteEstimate,
            1000,
            &|_| false,
        )
        .unwrap();
        assert!(out.shards.len() > 1);
        assert!(out.shards.iter().all(|s| s.bytes.len() <= 1000));
        assert_eq!(out.shards.iter().map(|s| s.records).sum::<u64>(), 100);
        let first: BTreeSet<_> = out.shards[0].record_hashes.iter().copied().collect();
        let again = import_files(
            &[p],
            RecordSchema::Alpaca,
            &InterimByteEstimate,
            1000,
            &|h| first.contains(h),
        )
        .unwrap();
        assert_eq!(again.duplicates, first.len() as u64);
    }
}
