//! Pre-tokenizers: how a run of plain text (no special tokens) is cut into the words that BPE
//! then merges independently.
//!
//! Each variant reproduces one Hugging Face `tokenizers` pipeline, which llama.cpp names by the
//! GGUF key `tokenizer.ggml.pre`. Adding one: a variant here, its names in [`PreTokenizer::from_name`],
//! its splitting in [`PreTokenizer::split`], and a unit test.

use fancy_regex::Regex;

/// GPT-2's split regex, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
/// without its `\s+(?!\S)` branch: that lookahead is replayed by hand in [`gpt2_split`] (a
/// whitespace run followed by more text gives its last character back), which keeps the pattern
/// free of backtracking constructs, so the regex engine matches it in one linear pass.
pub(crate) const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// A supported pre-tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreTokenizer {
    /// GPT-2's byte-level split (Hugging Face `ByteLevel(use_regex=true)`).
    Gpt2,
    /// Every numeric character (`\p{N}`) on its own, then GPT-2's split on what lies between
    /// (Hugging Face `Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)]`):
    /// SmolLM2, and in llama.cpp's grouping StarCoder, Refact, Command-R, CodeShell, EXAONE and
    /// Minerva.
    DigitsThenGpt2,
}

impl PreTokenizer {
    /// The GGUF `tokenizer.ggml.pre` names this module accepts, for error messages.
    pub const SUPPORTED: &'static str = "\"smollm\", \"starcoder\", \"refact\", \"command-r\", \
        \"codeshell\", \"exaone\", \"minerva\", \"gpt2\", \"mpt\", \"olmo\", \"jais\", \"default\"";

    /// The pre-tokenizer a GGUF `tokenizer.ggml.pre` value names, if supported. `"default"` (what
    /// llama.cpp's converter writes for an unrecognised pre-tokenizer) is taken as plain GPT-2.
    pub fn from_name(name: &str) -> Option<PreTokenizer> {
        match name {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva" => Some(PreTokenizer::DigitsThenGpt2),
            "gpt2" | "mpt" | "olmo" | "jais" | "default" => Some(PreTokenizer::Gpt2),
            _ => None,
        }
    }

    /// Calls `word` with each word of `text`, in order; the words concatenate back to `text`.
    pub(crate) fn split(self, regex: &Regex, text: &str, word: &mut impl FnMut(&str)) {
        match self {
            PreTokenizer::Gpt2 => gpt2_split(regex, text, word),
            PreTokenizer::DigitsThenGpt2 => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        if start < i {
                            gpt2_split(regex, &text[start..i], word);
                        }
                        let end = i + c.len_utf8();
                        word(&text[i..end]);
                        start = end;
                    }
                }
                if start < text.len() {
                    gpt2_split(regex, &text[start..], word);
                }
            }
        }
    }
}

/// GPT-2's split of `text` (see [`GPT2_SPLIT`]).
fn gpt2_split(regex: &Regex, text: &str, word: &mut impl FnMut(&str)) {
    let mut pos = 0;
    while pos < text.len() {
        let (start, mut end) = match ascii_match(text.as_bytes(), pos) {
            Some(end) => (pos, end),
            None => match regex.find_from_pos(text, pos) {
                Ok(Some(m)) => (m.start(), m.end()),
                // The pattern matches every character, so neither happens; keep the text whole.
                Ok(None) | Err(_) => (pos, text.len()),
            },
        };
        if start > pos {
            word(&text[pos..start]);
        }
        // `\s+(?!\S)`: a whitespace run of two or more characters followed by more text stops one
        // character short, leaving that character to start the next word (" word", or a lone
        // "\n"). Only the `\s+` branch ends in whitespace.
        if end < text.len()
            && text[..end]
                .chars()
                .next_back()
                .is_some_and(char::is_whitespace)
        {
            let mut run = text[start..end].char_indices();
            if let (Some(_), Some((last, _))) = (run.next(), run.next_back()) {
                end = start + last;
            }
        }
        if end == start {
            // Never happens with GPT2_SPLIT; guarantees progress.
            end = text.len();
        }
        word(&text[start..end]);
        pos = end;
    }
}

/// The ASCII character classes of [`GPT2_SPLIT`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
    /// Not ASCII: only the regex knows.
    Unicode,
}

#[inline]
fn class(b: u8) -> Class {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
        b'0'..=b'9' => Class::Number,
        // Unicode White_Space in ASCII (what the regex's `\s` means there).
        b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ' => Class::Space,
        0x80.. => Class::Unicode,
        _ => Class::Other,
    }
}

/// The end of [`GPT2_SPLIT`]'s match at `pos`, worked out by hand when every byte it depends on
/// is ASCII (most text); `None` sends the regex. Same alternatives, same order.
#[inline]
fn ascii_match(bytes: &[u8], pos: usize) -> Option<usize> {
    let at = |i: usize| bytes.get(i).copied();
    let first = at(pos)?;
    let run = |from: usize, c: Class| -> Option<usize> {
        let mut i = from;
        while let Some(b) = at(i) {
            match class(b) {
                k if k == c => i += 1,
                Class::Unicode => return None,
                _ => break,
            }
        }
        Some(i)
    };
    if first == b'\'' {
        let rest = &bytes[pos + 1..];
        for suffix in [&b"s"[..], b"t", b"re", b"ve", b"m", b"ll", b"d"] {
            if rest.starts_with(suffix) {
                return Some(pos + 1 + suffix.len());
            }
        }
    }
    let body = if first == b' ' { pos + 1 } else { pos };
    if let Some(b) = at(body) {
        match class(b) {
            Class::Unicode => return None,
            Class::Space => {}
            c => return run(body + 1, c),
        }
    }
    match class(first) {
        Class::Space => run(pos + 1, Class::Space),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTokenizer, text: &str) -> Vec<String> {
        let regex = Regex::new(GPT2_SPLIT).unwrap();
        let mut out = Vec::new();
        pre.split(&regex, text, &mut |w| out.push(w.to_string()));
        assert_eq!(out.concat(), text);
        out
    }

    /// The reference: the full GPT-2 pattern with its lookahead, as Hugging Face writes it.
    fn reference(text: &str) -> Vec<String> {
        let full = Regex::new(
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        )
        .unwrap();
        full.find_iter(text)
            .map(|m| m.unwrap().as_str().to_string())
            .collect()
    }

    #[test]
    fn whitespace_rules_match_the_lookahead_pattern() {
        for text in [
            "a  b",
            "a   b",
            "\n\n",
            "a\n\nb",
            "trailing   ",
            "   leading",
            "a \n b",
            "x\t\t y",
            " ",
            "",
            "it's 'S they'll",
            "tab\t\n\n  end\n",
            "x\u{a0}y\u{3000} z",
            "a  !!  ?",
        ] {
            assert_eq!(words(PreTokenizer::Gpt2, text), reference(text), "{text:?}");
        }
        assert_eq!(words(PreTokenizer::Gpt2, "a  b"), ["a", " ", " b"]);
        assert_eq!(words(PreTokenizer::Gpt2, "a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(words(PreTokenizer::Gpt2, "end   "), ["end", "   "]);
    }

    proptest::proptest! {
        #[test]
        fn ascii_fast_path_matches_the_regex(
            chars in proptest::collection::vec(proptest::sample::select(vec![
                'a', 'Z', 's', 't', 'l', 'd', 'e', 'v', 'r', 'm', '0', '7', ' ', ' ', '\t', '\n',
                '\r', '\x0b', '\x1c', '\'', '!', '=', '\x00', 'é', 'ß', '½', '٣', '\u{a0}',
                '\u{3000}', '\u{85}', '🚀', '\u{301}', '日',
            ]), 0..40),
        ) {
            let text: String = chars.into_iter().collect();
            proptest::prop_assert_eq!(words(PreTokenizer::Gpt2, &text), reference(&text));
        }
    }

    #[test]
    fn digits_are_isolated() {
        assert_eq!(
            words(PreTokenizer::DigitsThenGpt2, "x 123ab½"),
            ["x", " ", "1", "2", "3", "ab", "½"]
        );
        assert_eq!(words(PreTokenizer::Gpt2, "x 123ab"), ["x", " 123", "ab"]);
    }

    #[test]
    fn names() {
        assert_eq!(
            PreTokenizer::from_name("smollm"),
            Some(PreTokenizer::DigitsThenGpt2)
        );
        assert_eq!(PreTokenizer::from_name("default"), Some(PreTokenizer::Gpt2));
        assert_eq!(PreTokenizer::from_name("llama-bpe"), None);
    }
}
