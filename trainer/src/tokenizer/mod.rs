//! Text <-> token ids for the base model, and its chat template.
//!
//! This module owns everything between a string and the ids the model sees:
//!
//! - [`Tokenizer`]: byte-level BPE (GGUF `tokenizer.ggml.model = "gpt2"`), built from a
//!   [`GgufFile`]'s metadata ([`Tokenizer::from_gguf`]) or from plain parts
//!   ([`Tokenizer::from_parts`], for tests and other containers). It encodes exactly as Hugging
//!   Face `tokenizers` does with the model's own `tokenizer.json` (checked against it on
//!   SmolLM2-135M in `trainer/tests/tokenizer.rs`), decodes, and streams decoded text
//!   ([`StreamDecoder`]).
//! - [`ChatTemplate`]: the model's Jinja chat template (`tokenizer.chat_template`), rendered by
//!   minijinja with the settings and Python-isms that Hugging Face `transformers` gives templates.
//!
//! # How encoding works
//!
//! 1. **Special tokens.** Tokens the GGUF types as control (3, e.g. `<|im_start|>`) are cut out of
//!    the text whole when `parse_special` is true, and are plain text otherwise. User-defined
//!    tokens (type 4, Hugging Face's non-special added tokens, e.g. `<think>`) are cut out always,
//!    as both llama.cpp and Hugging Face do. Matching is leftmost, then longest.
//! 2. **Pre-tokenization** ([`PreTokenizer`], from `tokenizer.ggml.pre`): the text between special
//!    tokens is cut into words. SmolLM2 (`"smollm"`) isolates every `\p{N}` character, then applies
//!    GPT-2's regex `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` to
//!    what lies between: Hugging Face's `Sequence[Digits(individual_digits=true),
//!    ByteLevel(add_prefix_space=false, use_regex=true)]`, and llama.cpp's
//!    `LLAMA_VOCAB_PRE_TYPE_SMOLLM`. The lookahead branch is replayed by hand so that the regex
//!    itself needs no backtracking engine (linear time), and matches made only of ASCII are
//!    found by hand without the regex (property-tested against the full pattern).
//! 3. **BPE**: each word's UTF-8 bytes start as single-byte tokens (the vocabulary spells byte `b`
//!    with GPT-2's `bytes_to_unicode` character), then the adjacent pair with the lowest merge rank
//!    (`tokenizer.ggml.merges` index; leftmost on a tie) merges, until none does. Results are
//!    cached per word (bounded: the cache is cleared when it reaches [`WORD_CACHE_CAPACITY`]
//!    words), so common words cost one hash lookup.
//!
//! No BOS is added by [`Tokenizer::encode`]; [`Tokenizer::encode_with_bos`] adds it only when the
//! file's `tokenizer.ggml.add_bos_token` asks (SmolLM2's says false).
//!
//! # Design choices
//!
//! - Checked against Hugging Face `tokenizers` and llama.cpp on SmolLM2 (fixture), and against
//!   `tokenizers` on a few MB of code, prose and random Unicode (an ignored test that reads a
//!   corpus file the fixture script makes).
//! - Token bytes live in one flat buffer; decoding is concatenation plus lossy UTF-8.
//!   Control and user-defined tokens decode to their text as written, normal tokens through the
//!   inverse byte map (a character outside it stands for its own UTF-8).
//! - The merge table and word cache use an in-module FxHash: keys come from the model file and
//!   local text, never from a peer.
//! - The word cache is sharded by word hash, each shard behind a `Mutex` taken with `try_lock`:
//!   threads encoding at once never wait; a thread finding a shard busy just merges that word.
//! - Unsupported `tokenizer.ggml.model` or `tokenizer.ggml.pre` values are refused with an error
//!   that names them; a new pre-tokenizer is a variant of [`PreTokenizer`].

mod bpe;
mod chat;
mod pretokenize;
mod stream;

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::Mutex;

use fancy_regex::Regex;

use crate::gguf::{GgufError, GgufFile};

pub use chat::{ChatMessage, ChatTemplate};
pub use pretokenize::PreTokenizer;
pub use stream::{StreamDecoder, push_utf8};

use bpe::{Bpe, FxHashMap};

/// Words whose tokens the per-word cache holds before it is cleared (in total over its shards).
pub const WORD_CACHE_CAPACITY: usize = 16_384;
/// The word cache is split into this many shards, each behind its own lock, chosen by the word's
/// hash, so that threads encoding at once rarely meet on a lock.
const CACHE_SHARDS: usize = 16;
/// Words longer than this many bytes are not cached.
const CACHED_WORD_MAX: usize = 64;

/// Texts of tokens that end a turn in the chat templates of common model families; with the
/// model's EOS they make [`Tokenizer::stop_token_ids`] (llama.cpp's end-of-generation set is
/// built the same way).
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<|return|>",
    "<|call|>",
];

/// What went wrong building a tokenizer or rendering a chat template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A metadata key is missing or has the wrong type (the error names the file and key).
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "tokenizer.ggml.model is {0:?}: only \"gpt2\" (byte-level BPE) tokenizers are supported"
    )]
    UnsupportedModel(String),
    #[error("tokenizer.ggml.pre is {0:?}: supported pre-tokenizers are {supported}", supported = PreTokenizer::SUPPORTED)]
    UnsupportedPre(String),
    #[error("the vocabulary (tokenizer.ggml.tokens) is empty")]
    EmptyVocabulary,
    #[error("{key} has {found} entries, but tokenizer.ggml.tokens has {expected}")]
    LengthMismatch {
        key: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("tokenizer.ggml.token_type[{index}] is {value}, not a GGUF token type (0..=6)")]
    BadTokenType { index: usize, value: i64 },
    #[error("tokenizer.ggml.merges[{index}] {merge:?}: {problem}")]
    BadMerge {
        index: usize,
        merge: String,
        problem: &'static str,
    },
    #[error("{key} is {id}, outside the vocabulary of {vocab_size} tokens")]
    BadSpecialId {
        key: &'static str,
        id: u64,
        vocab_size: usize,
    },
    #[error("the vocabulary has {0} tokens; ids must fit in u32")]
    VocabularyTooLarge(usize),
    #[error("pre-tokenizer regex: {0}")]
    Regex(String),
    /// The chat template failed to compile or render; the message has minijinja's detail.
    #[error("chat template: {0:#}")]
    Template(#[from] minijinja::Error),
}

/// A token's GGUF type (`tokenizer.ggml.token_type`; llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    /// A special token (`<|im_start|>`): matched in text only with `parse_special`.
    Control,
    /// A non-special added token (`<think>`): always matched whole in text.
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// The type of a GGUF `tokenizer.ggml.token_type` value.
    pub fn from_gguf(value: i64) -> Option<TokenType> {
        Some(match value {
            0 => TokenType::Undefined,
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }

    /// Whether the token's text is matched whole in the input (control or user-defined) rather
    /// than reached by merges, and is spelled as-is rather than in the byte alphabet.
    fn is_added(self) -> bool {
        matches!(self, TokenType::Control | TokenType::UserDefined)
    }
}

/// Everything a [`Tokenizer`] is built from, as plain values: what the GGUF keys hold.
#[derive(Debug, Clone)]
pub struct TokenizerParts {
    /// `tokenizer.ggml.tokens`: each token as the vocabulary spells it (`"Ġthe"`, `"<|im_end|>"`).
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token; empty means all [`TokenType::Normal`].
    pub token_types: Vec<TokenType>,
    /// `tokenizer.ggml.merges`: `"left right"`, best (rank 0) first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`.
    pub pre: PreTokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
}

/// A byte-level BPE tokenizer. Cheap to share (`&self` everywhere; `Send + Sync`).
#[derive(Debug)]
pub struct Tokenizer {
    pre: PreTokenizer,
    regex: Regex,
    bpe: Bpe,
    /// Token `i`'s bytes are `bytes[offsets[i]..offsets[i + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    by_text: HashMap<String, u32>,
    specials: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    stop: Vec<u32>,
    cache: Box<[Mutex<WordCache>]>,
}

type WordCache = FxHashMap<Box<str>, Box<[u32]>>;

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes: `tokenizer.ggml.model` (must be `"gpt2"`),
    /// `.pre` (absent means `"default"`), `.tokens`, `.token_type` (optional), `.merges`,
    /// `.bos_token_id`, `.eos_token_id`, `.unknown_token_id`, `.padding_token_id` (all optional)
    /// and `.add_bos_token` (optional, default false).
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let meta = file.metadata();
        let pre_name = match meta.get("tokenizer.ggml.pre") {
            Some(_) => file.get_str("tokenizer.ggml.pre")?,
            None => "default",
        };
        let pre = PreTokenizer::from_name(pre_name)
            .ok_or_else(|| TokenizerError::UnsupportedPre(pre_name.to_string()))?;
        let tokens: Vec<String> = file
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let token_types = if meta.contains_key("tokenizer.ggml.token_type") {
            file.get_int_array("tokenizer.ggml.token_type")?
                .into_iter()
                .enumerate()
                .map(|(index, value)| {
                    TokenType::from_gguf(value).ok_or(TokenizerError::BadTokenType { index, value })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let merges = file
            .get_str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let id = |key: &'static str| -> Result<Option<u32>, TokenizerError> {
            if !meta.contains_key(key) {
                return Ok(None);
            }
            let id = file.get_u64(key)?;
            match u32::try_from(id) {
                Ok(v) if (v as usize) < tokens.len() => Ok(Some(v)),
                _ => Err(TokenizerError::BadSpecialId {
                    key,
                    id,
                    vocab_size: tokens.len(),
                }),
            }
        };
        let add_bos = match meta.get("tokenizer.ggml.add_bos_token") {
            Some(crate::gguf::Value::Bool(b)) => *b,
            Some(v) => v.as_u64().is_some_and(|v| v != 0),
            None => false,
        };
        let parts = TokenizerParts {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            tokens,
            token_types,
            merges,
            pre,
            add_bos,
        };
        Tokenizer::from_parts(parts)
    }

    /// Builds a tokenizer from plain parts. Errors name the GGUF key the part stands for.
    pub fn from_parts(parts: TokenizerParts) -> Result<Tokenizer, TokenizerError> {
        let TokenizerParts {
            tokens,
            mut token_types,
            merges,
            pre,
            bos,
            eos,
            unk,
            pad,
            add_bos,
        } = parts;
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::VocabularyTooLarge(n));
        }
        if token_types.is_empty() {
            token_types = vec![TokenType::Normal; n];
        }
        if token_types.len() != n {
            return Err(TokenizerError::LengthMismatch {
                key: "tokenizer.ggml.token_type",
                found: token_types.len(),
                expected: n,
            });
        }
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", bos),
            ("tokenizer.ggml.eos_token_id", eos),
            ("tokenizer.ggml.unknown_token_id", unk),
            ("tokenizer.ggml.padding_token_id", pad),
        ] {
            if let Some(id) = id
                && id as usize >= n
            {
                return Err(TokenizerError::BadSpecialId {
                    key,
                    id: id.into(),
                    vocab_size: n,
                });
            }
        }

        let byte_to_char = bpe::byte_to_char();
        let char_to_byte = bpe::char_to_byte_table(&byte_to_char);

        // Token bytes, flat.
        let mut bytes = Vec::with_capacity(tokens.iter().map(String::len).sum());
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        let mut utf8 = [0u8; 4];
        for (text, ty) in tokens.iter().zip(&token_types) {
            if ty.is_added() {
                bytes.extend_from_slice(text.as_bytes());
            } else {
                for c in text.chars() {
                    match bpe::char_to_byte(&char_to_byte, c) {
                        Some(b) => bytes.push(b),
                        None => bytes.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes()),
                    }
                }
            }
            offsets.push(bytes.len());
        }

        let mut by_text = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            by_text.entry(t.clone()).or_insert(i as u32);
        }

        // Single-byte tokens: the normal token spelling the byte.
        let mut byte_token = [unk; 256];
        for (b, &c) in byte_to_char.iter().enumerate() {
            if let Some(&id) = by_text.get(c.encode_utf8(&mut utf8) as &str)
                && !token_types[id as usize].is_added()
            {
                byte_token[b] = Some(id);
            }
        }

        let mut merge_table = FxHashMap::default();
        merge_table.reserve(merges.len());
        for (index, merge) in merges.iter().enumerate() {
            let bad = |problem| TokenizerError::BadMerge {
                index,
                merge: merge.clone(),
                problem,
            };
            let (left, right) = merge
                .split_once(' ')
                .ok_or_else(|| bad("not two tokens separated by a space"))?;
            let l = *by_text
                .get(left)
                .ok_or_else(|| bad("the left token is not in the vocabulary"))?;
            let r = *by_text
                .get(right)
                .ok_or_else(|| bad("the right token is not in the vocabulary"))?;
            let mut joined = String::with_capacity(merge.len());
            joined.push_str(left);
            joined.push_str(right);
            let new = *by_text
                .get(&joined)
                .ok_or_else(|| bad("the merged token is not in the vocabulary"))?;
            // A repeated pair keeps its first (best) rank, as in Hugging Face.
            merge_table.entry((l, r)).or_insert((index as u32, new));
        }

        let specials = SpecialMatcher::new(
            token_types
                .iter()
                .enumerate()
                .filter(|(_, ty)| ty.is_added())
                .map(|(i, &ty)| {
                    let range = offsets[i]..offsets[i + 1];
                    (i as u32, &bytes[range], ty == TokenType::UserDefined)
                }),
        );

        let mut stop: Vec<u32> = eos.into_iter().collect();
        for text in END_OF_TURN_TOKENS {
            if let Some(&id) = by_text.get(*text)
                && token_types[id as usize].is_added()
                && !stop.contains(&id)
            {
                stop.push(id);
            }
        }

        let regex = Regex::new(pretokenize::GPT2_SPLIT)
            .map_err(|e| TokenizerError::Regex(e.to_string()))?;

        Ok(Tokenizer {
            pre,
            regex,
            bpe: Bpe {
                byte_token,
                merges: merge_table,
            },
            bytes,
            offsets,
            tokens,
            types: token_types,
            by_text,
            specials,
            bos,
            eos,
            unk,
            pad,
            add_bos,
            stop,
            cache: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(WordCache::default()))
                .collect(),
        })
    }

    /// The ids of `text`, without BOS. With `parse_special`, control tokens written in the text
    /// (`<|im_start|>`) become their ids; without, they are tokenized as the characters they are.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, parse_special, &mut out);
        out
    }

    /// [`encode`](Self::encode), preceded by BOS when the model file asks for it
    /// (`tokenizer.ggml.add_bos_token`; see [`add_bos`](Self::add_bos)). Use this for a whole
    /// model input; SmolLM2 adds no BOS.
    pub fn encode_with_bos(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if self.add_bos
            && let Some(bos) = self.bos
        {
            out.push(bos);
        }
        self.encode_into(text, parse_special, &mut out);
        out
    }

    /// [`encode`](Self::encode), appending to `out` (reuse one buffer across many texts).
    pub fn encode_into(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) {
        self.for_each_piece(text, parse_special, &mut |ids| out.extend_from_slice(ids));
    }

    /// How many ids [`encode`](Self::encode)`(text, true)` gives, without building them.
    pub fn count_tokens(&self, text: &str) -> usize {
        let mut n = 0;
        self.for_each_piece(text, true, &mut |ids| n += ids.len());
        n
    }

    /// Calls `sink` with the ids of each special token and each word, in order.
    fn for_each_piece(&self, text: &str, parse_special: bool, sink: &mut impl FnMut(&[u32])) {
        let mut scratch = Vec::new();
        let mut plain = |segment: &str, sink: &mut dyn FnMut(&[u32])| {
            self.pre.split(&self.regex, segment, &mut |word| {
                self.encode_word(word, &mut scratch, sink);
            });
        };
        let mut start = 0;
        let mut pos = 0;
        while let Some((at, len, id)) = self.specials.find(text.as_bytes(), pos, parse_special) {
            if start < at {
                plain(&text[start..at], sink);
            }
            sink(&[id]);
            start = at + len;
            pos = start;
        }
        if start < text.len() {
            plain(&text[start..], sink);
        }
    }

    /// Hands `sink` the ids of one pre-tokenized word, from the cache when it is there.
    fn encode_word(&self, word: &str, scratch: &mut Vec<u32>, sink: &mut dyn FnMut(&[u32])) {
        let shard = (word.len() <= CACHED_WORD_MAX).then(|| {
            let mut h = bpe::FxHasher::default();
            h.write(word.as_bytes());
            &self.cache[(h.finish() >> 32) as usize % CACHE_SHARDS]
        });
        // A shard another thread holds is skipped, never waited for.
        let mut cache = shard.and_then(|m| m.try_lock().ok());
        if let Some(ids) = cache.as_ref().and_then(|c| c.get(word)) {
            sink(ids);
            return;
        }
        scratch.clear();
        self.bpe.encode_word(word.as_bytes(), scratch);
        sink(scratch);
        if let Some(c) = cache.as_mut() {
            if c.len() >= WORD_CACHE_CAPACITY / CACHE_SHARDS {
                c.clear();
            }
            c.insert(word.into(), scratch.as_slice().into());
        }
    }

    /// The text of `ids`: their bytes concatenated, invalid UTF-8 replaced by U+FFFD. Special
    /// tokens appear as their text (`<|im_end|>`); ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut buf = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            buf.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8(buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// [`decode`](Self::decode), leaving out control tokens (what Hugging Face calls
    /// `skip_special_tokens`).
    pub fn decode_skip_special(&self, ids: &[u32]) -> String {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| !self.is_special(id))
            .collect();
        self.decode(&kept)
    }

    /// The bytes token `id` stands for (empty for an id outside the vocabulary). A token can be
    /// part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.bytes[a..b],
            _ => &[],
        }
    }

    /// The token as the vocabulary spells it (`"Ġthe"`, `"<|im_end|>"`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a token as the vocabulary spells it (`"Ġthe"`, `"<|im_end|>"`), if any.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    /// The token's GGUF type (`None` outside the vocabulary).
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether the token is a control token (`<|im_start|>`, `<|endoftext|>`): what Hugging
    /// Face calls special. User-defined tokens are not.
    pub fn is_special(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }

    /// Number of tokens in the vocabulary (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// The padding token (SmolLM2: the same as EOS).
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// Whether the model expects BOS in front of its input (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The pre-tokenizer in use.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// Ids at which generation stops: EOS, then every control or user-defined token whose text
    /// is in [`END_OF_TURN_TOKENS`] (SmolLM2: `<|im_end|>`, which is also its EOS, and
    /// `<|endoftext|>`).
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop
    }

    /// A decoder for ids that arrive one at a time.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

/// An added token to match: its bytes, its id, and whether it is matched even without
/// `parse_special` (user-defined).
type AddedEntry = (Box<[u8]>, u32, bool);

/// Finds added tokens in text: leftmost match, longest on a tie.
#[derive(Debug)]
struct SpecialMatcher {
    /// For each first byte, the tokens starting with it, longest first.
    by_first: Vec<Vec<AddedEntry>>,
    /// Whether any token starts with this byte.
    first: [bool; 256],
}

impl SpecialMatcher {
    fn new<'a>(tokens: impl Iterator<Item = (u32, &'a [u8], bool)>) -> SpecialMatcher {
        let mut by_first: Vec<Vec<AddedEntry>> = vec![Vec::new(); 256];
        let mut first = [false; 256];
        for (id, bytes, always) in tokens {
            let Some(&b) = bytes.first() else { continue };
            first[usize::from(b)] = true;
            by_first[usize::from(b)].push((bytes.into(), id, always));
        }
        for list in &mut by_first {
            // Longest first; among equal texts the lowest id (stable sort keeps id order).
            list.sort_by_key(|(bytes, _, _)| std::cmp::Reverse(bytes.len()));
        }
        SpecialMatcher { by_first, first }
    }

    /// The first token in `text[from..]`: (byte offset, byte length, id).
    fn find(&self, text: &[u8], from: usize, parse_special: bool) -> Option<(usize, usize, u32)> {
        let mut i = from;
        while i < text.len() {
            let b = text[i];
            if self.first[usize::from(b)] {
                let rest = &text[i..];
                for (bytes, id, always) in &self.by_first[usize::from(b)] {
                    if (parse_special || *always) && rest.starts_with(bytes) {
                        return Some((i, bytes.len(), *id));
                    }
                }
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests;
