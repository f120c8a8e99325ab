//! Decoding ids that arrive one at a time (token streaming in chat).

use super::Tokenizer;

/// Turns ids into text as they arrive, holding back the bytes of a UTF-8 character that a token
/// split (an emoji is often two or three byte tokens), so every piece it yields is whole text.
///
/// The concatenation of everything [`push`](Self::push) and [`finish`](Self::finish) yield
/// equals [`Tokenizer::decode`] of all the ids. Control tokens decode to their text, so check an
/// id against [`Tokenizer::stop_token_ids`] (or [`Tokenizer::is_special`]) before pushing it.
#[derive(Debug, Clone)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder {
            tokenizer,
            pending: Vec::new(),
        }
    }

    /// Adds one id; returns the text that became complete, or `None` while a character is still
    /// unfinished. Bytes that can never become valid UTF-8 come out as U+FFFD right away.
    pub fn push(&mut self, id: u32) -> Option<String> {
        push_utf8(&mut self.pending, self.tokenizer.token_bytes(id))
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: whatever is held back, as U+FFFD (empty when nothing is).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Adds `bytes` to `pending` (the bytes of a UTF-8 character not finished yet) and returns the
/// text that became complete, or `None` while a character is still unfinished. Bytes that can
/// never become valid UTF-8 come out as U+FFFD right away. [`StreamDecoder::push`] in a
/// function, for holders of the pending bytes that cannot keep a decoder borrowing the
/// tokenizer.
pub fn push_utf8(pending: &mut Vec<u8>, bytes: &[u8]) -> Option<String> {
    pending.extend_from_slice(bytes);
    let mut out = String::new();
    let mut rest: &[u8] = pending;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    // Invalid bytes: replace them and go on.
                    Some(len) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &bad[len..];
                    }
                    // An incomplete character at the end: wait for more.
                    None => {
                        rest = bad;
                        break;
                    }
                }
            }
        }
    }
    let drop = pending.len() - rest.len();
    pending.drain(..drop);
    (!out.is_empty()).then_some(out)
}
