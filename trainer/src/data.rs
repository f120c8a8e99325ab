//! Fine-tuning datasets: JSONL files in the two schemas Cohort accepts, validated record by record,
//! tokenized with the model's chat template, with the loss masked to what the model must learn to
//! say.
//!
//! - **chat**: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`;
//!   at least one user and one assistant message, the last one the assistant's; a system message
//!   only first.
//! - **alpaca**: `{"instruction": "...", "input": "...", "output": "..."}` (`input` optional and
//!   may be empty); it becomes a user message (`instruction`, then a blank line and `input` when
//!   there is one) and the assistant's `output`.
//!
//! Errors name the file, the line and the field. A record is tokenized by rendering the chat
//! template over its messages; the tokens of each assistant message (its content and the
//! template's end-of-turn marker) are the training targets, everything else (system prompt, user
//! turns, template scaffolding) is context with the loss masked off. Assistant spans are found by
//! rendering the conversation up to each assistant turn with `add_generation_prompt` and taking
//! what the turn adds, so any template works, not only ChatML.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tokenizer::{ChatMessage, ChatTemplate, Tokenizer, TokenizerError};

/// The longest record accepted, in bytes of JSON.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// A dataset's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schema {
    Chat,
    Alpaca,
}

/// A bad record or an unreadable file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {problem}", path.display())]
    Record {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{}: no records", path.display())]
    Empty { path: PathBuf },
    #[error(transparent)]
    Template(#[from] TokenizerError),
}

/// One validated record, as chat messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line in its file.
    pub line: usize,
    pub messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRecord {
    messages: Vec<RawMessage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlpacaRecord {
    instruction: String,
    #[serde(default)]
    input: String,
    output: String,
}

/// Parses and validates one JSONL line (1-based `line`) of `schema`.
pub fn parse_record(schema: Schema, text: &str, line: usize) -> Result<Record, String> {
    if text.len() > MAX_RECORD_BYTES {
        return Err(format!(
            "record of {} bytes exceeds the limit of {MAX_RECORD_BYTES}",
            text.len()
        ));
    }
    let messages = match schema {
        Schema::Chat => {
            let r: ChatRecord =
                serde_json::from_str(text).map_err(|e| format!("not a chat record: {e}"))?;
            if r.messages.is_empty() {
                return Err("field \"messages\" is empty".into());
            }
            let n = r.messages.len();
            for (i, m) in r.messages.iter().enumerate() {
                let field = format!("messages[{i}]");
                match m.role.as_str() {
                    "system" if i == 0 => {}
                    "system" => {
                        return Err(format!(
                            "{field}.role: a system message may only come first"
                        ));
                    }
                    "user" | "assistant" => {}
                    other => {
                        return Err(format!(
                            "{field}.role: {other:?} is not system, user or assistant"
                        ));
                    }
                }
                if m.content.trim().is_empty() {
                    return Err(format!("{field}.content is empty"));
                }
            }
            if !r.messages.iter().any(|m| m.role == "user") {
                return Err("field \"messages\" has no user message".into());
            }
            if r.messages[n - 1].role != "assistant" {
                return Err(format!(
                    "messages[{}].role: the last message must be the assistant's",
                    n - 1
                ));
            }
            r.messages
                .into_iter()
                .map(|m| ChatMessage::new(m.role, m.content))
                .collect()
        }
        Schema::Alpaca => {
            let r: AlpacaRecord =
                serde_json::from_str(text).map_err(|e| format!("not an alpaca record: {e}"))?;
            if r.instruction.trim().is_empty() {
                return Err("field \"instruction\" is empty".into());
            }
            if r.output.trim().is_empty() {
                return Err("field \"output\" is empty".into());
            }
            let user = if r.input.trim().is_empty() {
                r.instruction
            } else {
                format!("{}\n\n{}", r.instruction, r.input)
            };
            vec![
                ChatMessage::new("user", user),
                ChatMessage::new("assistant", r.output),
            ]
        }
    };
    Ok(Record { line, messages })
}

/// Reads and validates a whole JSONL file; blank lines are skipped. The first bad record stops
/// the read with an error naming its line.
pub fn read_jsonl(path: &Path, schema: Schema) -> Result<Vec<Record>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut records = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        let err = |problem: String| DataError::Record {
            path: path.to_path_buf(),
            line,
            problem,
        };
        let text = std::str::from_utf8(raw)
            .map_err(|e| err(format!("not UTF-8 (byte {})", e.valid_up_to())))?;
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            continue;
        }
        records.push(parse_record(schema, text, line).map_err(err)?);
    }
    if records.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(records)
}

/// A tokenized record: `tokens[i]` is input; the model is trained to predict `tokens[i + 1]` where
/// `target_mask[i + 1]` is true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// True on tokens the model must produce (assistant turns).
    pub target_mask: Vec<bool>,
    /// Whether the record was cut to the sequence length.
    pub truncated: bool,
}

impl Example {
    /// Tokens whose prediction is trained.
    pub fn target_count(&self) -> usize {
        self.target_mask.iter().skip(1).filter(|m| **m).count()
    }
}

/// Tokenizes a record with the chat template; cuts it to `max_len` tokens.
pub fn tokenize(
    record: &Record,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<Example, TokenizerError> {
    let mut tokens = Vec::new();
    let mut mask = Vec::new();
    let mut rendered = String::new();
    for (i, m) in record.messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        // Context up to this turn (with the assistant header), then what the turn adds.
        let prefix = template.render(&record.messages[..i], true)?;
        let full = template.render(&record.messages[..=i], false)?;
        let context = prefix.strip_prefix(rendered.as_str()).unwrap_or(&prefix);
        let ids = tokenizer.encode(context, true);
        mask.extend(std::iter::repeat_n(false, ids.len()));
        tokens.extend(ids);
        let answer = full.strip_prefix(prefix.as_str()).unwrap_or(&full);
        let ids = tokenizer.encode(answer, true);
        mask.extend(std::iter::repeat_n(true, ids.len()));
        tokens.extend(ids);
        rendered = full;
    }
    let truncated = tokens.len() > max_len;
    tokens.truncate(max_len);
    mask.truncate(max_len);
    Ok(Example {
        tokens,
        target_mask: mask,
        truncated,
    })
}

/// A padded batch: `inputs` and `targets` `[batch, len]` (targets shifted by one), `weights` 1.0
/// where a target is trained and 0.0 on context and padding.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Batch {
    /// Pads `examples` to the longest one (minus one: the last token is only a target).
    pub fn pad(examples: &[&Example], pad: u32) -> Batch {
        let len = examples
            .iter()
            .map(|e| e.tokens.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut b = Batch {
            batch: examples.len(),
            len,
            inputs: Vec::new(),
            targets: Vec::new(),
            weights: Vec::new(),
        };
        for e in examples {
            let n = e.tokens.len().saturating_sub(1);
            for j in 0..len {
                if j < n {
                    b.inputs.push(e.tokens[j]);
                    b.targets.push(e.tokens[j + 1]);
                    b.weights.push(if e.target_mask[j + 1] { 1.0 } else { 0.0 });
                } else {
                    b.inputs.push(pad);
                    b.targets.push(pad);
                    b.weights.push(0.0);
                }
            }
        }
        b
    }

    /// Trained target tokens in the batch.
    pub fn target_tokens(&self) -> usize {
        self.weights.iter().filter(|w| **w > 0.0).count()
    }
}
