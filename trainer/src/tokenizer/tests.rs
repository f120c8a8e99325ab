//! Unit tests on tiny hand-built tokenizers.

use super::*;

const SPECIALS: [(&str, TokenType); 4] = [
    ("<|endoftext|>", TokenType::Control),
    ("<|im_start|>", TokenType::Control),
    ("<|im_end|>", TokenType::Control),
    ("<think>", TokenType::UserDefined),
];

/// Specials (ids 0..4), the 256 byte tokens (ids 4..260, in byte order), then one token per
/// merge, in merge order.
fn tiny(merges: &[&str], pre: PreTokenizer) -> Tokenizer {
    let map = bpe::byte_to_char();
    let mut tokens: Vec<String> = SPECIALS.iter().map(|(t, _)| t.to_string()).collect();
    let mut token_types: Vec<TokenType> = SPECIALS.iter().map(|&(_, ty)| ty).collect();
    for c in map {
        tokens.push(c.to_string());
        token_types.push(TokenType::Normal);
    }
    for m in merges {
        let joined = m.replace(' ', "");
        if !tokens.contains(&joined) {
            tokens.push(joined);
            token_types.push(TokenType::Normal);
        }
    }
    Tokenizer::from_parts(TokenizerParts {
        tokens,
        token_types,
        merges: merges.iter().map(|m| m.to_string()).collect(),
        pre,
        bos: Some(1),
        eos: Some(2),
        unk: None,
        pad: Some(2),
        add_bos: false,
    })
    .unwrap()
}

fn pieces(t: &Tokenizer, text: &str, parse_special: bool) -> Vec<String> {
    t.encode(text, parse_special)
        .into_iter()
        .map(|id| t.token_text(id).unwrap().to_string())
        .collect()
}

const MERGES: &[&str] = &[
    "l l", "h e", "he ll", "hell o", "Ġ w", "Ġw o", "r l", "Ġwo rl", "Ġworl d", "b c", "a b",
    "Ġ Ġ", "Ċ Ċ", "1 2", "Ġ b",
];

#[test]
fn merges_apply_in_rank_order() {
    let t = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    assert_eq!(pieces(&t, "hello world", false), ["hello", "Ġworld"]);
    // "b c" (rank 9) beats "a b" (rank 10): a + bc, never ab + c.
    assert_eq!(pieces(&t, "abc", false), ["a", "bc"]);
    assert_eq!(pieces(&t, "ab", false), ["ab"]);
    // "l l" first: "hel" stays h+e+l... then "h e": he + l.
    assert_eq!(pieces(&t, "hel", false), ["he", "l"]);
}

#[test]
fn bytes_fall_back_to_single_byte_tokens() {
    let t = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    let ids = t.encode("é🚀", false);
    assert_eq!(ids.len(), 2 + 4);
    assert_eq!(t.token_bytes(ids[0]), &[0xC3]);
    assert_eq!(t.token_text(ids[0]), Some("Ã"));
    assert_eq!(t.decode(&ids), "é🚀");
    assert_eq!(t.decode(&ids[..3]), "é\u{FFFD}");
}

#[test]
fn special_tokens_split_only_with_parse_special() {
    let t = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    let text = "<|im_start|>hello<|im_end|>";
    assert_eq!(t.encode(text, true), [1, t.token_id("hello").unwrap(), 2]);
    let plain = t.encode(text, false);
    assert!(!plain.contains(&1) && !plain.contains(&2));
    assert_eq!(t.decode(&plain), text);
    assert_eq!(plain[0], t.token_id("<").unwrap());
    // User-defined tokens are matched either way.
    assert_eq!(pieces(&t, "a<think>b", false), ["a", "<think>", "b"]);
    assert_eq!(pieces(&t, "a<think>b", true), ["a", "<think>", "b"]);
    // Adjacent, repeated, and an unfinished one.
    assert_eq!(
        t.encode("<|im_start|><|im_start|><|im_end", true)[..2],
        [1, 1]
    );
    assert_eq!(
        t.decode(&t.encode("<|im_start|><|im_end", true)),
        "<|im_start|><|im_end"
    );
    assert_eq!(t.decode_skip_special(&t.encode(text, true)), "hello");
}

#[test]
fn special_matching_is_leftmost_then_longest() {
    let mut tokens: Vec<String> = bpe::byte_to_char().iter().map(|c| c.to_string()).collect();
    let mut token_types = vec![TokenType::Normal; tokens.len()];
    for t in ["<a>", "<a>b", "a>b"] {
        tokens.push(t.into());
        token_types.push(TokenType::Control);
    }
    let t = Tokenizer::from_parts(TokenizerParts {
        tokens,
        token_types,
        merges: vec![],
        pre: PreTokenizer::Gpt2,
        bos: None,
        eos: None,
        unk: None,
        pad: None,
        add_bos: false,
    })
    .unwrap();
    assert_eq!(t.encode("<a>b", true), [257]);
    assert_eq!(t.encode("<a>c", true), [256, u32::from(b'c')]);
}

#[test]
fn digits_split_individually() {
    let smol = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    assert_eq!(pieces(&smol, "x 12", false), ["x", "Ġ", "1", "2"]);
    let gpt2 = tiny(MERGES, PreTokenizer::Gpt2);
    assert_eq!(pieces(&gpt2, "x12", false), ["x", "12"]);
}

#[test]
fn whitespace_rules() {
    let t = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    // Two spaces before a word: the first alone, the second joins the word.
    assert_eq!(pieces(&t, "a  b", false), ["a", "Ġ", "Ġb"]);
    assert_eq!(pieces(&t, "a   b", false), ["a", "ĠĠ", "Ġb"]);
    // A whitespace run at the end stays whole.
    assert_eq!(pieces(&t, "\n\n", false), ["ĊĊ"]);
    assert_eq!(pieces(&t, "a  ", false), ["a", "ĠĠ"]);
    // Before text, a newline run gives its last newline to a word of its own.
    assert_eq!(pieces(&t, "a\n\nb", false), ["a", "Ċ", "Ċ", "b"]);
    assert_eq!(pieces(&t, "", false), Vec::<String>::new());
}

#[test]
fn decode_round_trips() {
    let t = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    for text in [
        "hello world",
        "  lead and trail  ",
        "tabs\t\tand\r\nnewlines\n\n",
        "Ünïcödé 日本語 🚀👍🏽",
        "<|im_start|>user\nhi 123<|im_end|>\n<think>",
        "",
    ] {
        for parse_special in [false, true] {
            let ids = t.encode(text, parse_special);
            assert_eq!(t.decode(&ids), text);
            assert_eq!(t.count_tokens(text), t.encode(text, true).len());
        }
    }
}

#[test]
fn stream_decoder_waits_for_whole_characters() {
    let t = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    let text = "hé🚀!";
    let ids = t.encode(text, false);
    let mut d = t.stream_decoder();
    let outs: Vec<Option<String>> = ids.iter().map(|&id| d.push(id)).collect();
    assert!(!d.has_pending());
    assert_eq!(d.finish(), "");
    let joined: String = outs.iter().flatten().cloned().collect();
    assert_eq!(joined, text);
    // "h", then é's two bytes, then 🚀's four: text only when a character completes.
    let expected = [
        Some("h"),
        None,
        Some("é"),
        None,
        None,
        None,
        Some("🚀"),
        Some("!"),
    ];
    assert_eq!(outs, expected.map(|o| o.map(String::from)));
    // An unfinished character at the end comes out as U+FFFD.
    let mut d = t.stream_decoder();
    assert_eq!(d.push(ids[1]), None);
    assert_eq!(d.finish(), "\u{FFFD}");
}

#[test]
fn accessors_and_stop_tokens() {
    let t = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    assert_eq!(t.vocab_size(), 4 + 256 + MERGES.len());
    assert_eq!(t.bos(), Some(1));
    assert_eq!(t.eos(), Some(2));
    assert!(!t.add_bos());
    assert_eq!(t.encode_with_bos("hello", false), t.encode("hello", false));
    assert!(t.is_special(0) && t.is_special(2) && !t.is_special(3) && !t.is_special(100));
    assert_eq!(t.token_type(3), Some(TokenType::UserDefined));
    assert_eq!(t.token_id("<|im_end|>"), Some(2));
    assert_eq!(t.token_id("nope"), None);
    // EOS first, then <|endoftext|> (EOS is already <|im_end|>).
    assert_eq!(t.stop_token_ids(), [2, 0]);
    assert_eq!(t.token_bytes(999_999), b"");
}

#[test]
fn bos_is_added_when_the_file_asks() {
    let mut parts_tok = tiny(MERGES, PreTokenizer::Gpt2);
    parts_tok.add_bos = true;
    assert_eq!(parts_tok.encode_with_bos("ab", false)[0], 1);
}

#[test]
fn cache_survives_overflow() {
    let t = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    let text: String = (0..WORD_CACHE_CAPACITY + 100)
        .map(|i| format!("w{i:x}q "))
        .collect();
    let first = t.encode(&text, false);
    assert_eq!(t.encode(&text, false), first);
    assert_eq!(t.decode(&first), text);
}

fn parts_with(merges: Vec<String>, types: Vec<TokenType>) -> TokenizerParts {
    TokenizerParts {
        tokens: vec!["a".into(), "b".into()],
        token_types: types,
        merges,
        pre: PreTokenizer::Gpt2,
        bos: None,
        eos: None,
        unk: None,
        pad: None,
        add_bos: false,
    }
}

#[test]
fn bad_parts_are_refused_with_names() {
    let err = Tokenizer::from_parts(parts_with(vec!["a b".into()], vec![])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tokenizer.ggml.merges[0] \"a b\": the merged token is not in the vocabulary"
    );
    let err = Tokenizer::from_parts(parts_with(vec!["ab".into()], vec![])).unwrap_err();
    assert!(err.to_string().contains("not two tokens"), "{err}");
    let err = Tokenizer::from_parts(parts_with(vec![], vec![TokenType::Normal])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tokenizer.ggml.token_type has 1 entries, but tokenizer.ggml.tokens has 2"
    );
    let mut p = parts_with(vec![], vec![]);
    p.eos = Some(7);
    assert_eq!(
        Tokenizer::from_parts(p).unwrap_err().to_string(),
        "tokenizer.ggml.eos_token_id is 7, outside the vocabulary of 2 tokens"
    );
    assert!(TokenType::from_gguf(9).is_none());
    assert!(
        TokenizerError::UnsupportedPre("llama-bpe".into())
            .to_string()
            .contains("\"smollm\"")
    );
}

/// A GGUF file holding only tokenizer metadata, written to a temporary path and opened.
fn gguf_with(edit: impl FnOnce(&mut Vec<(&'static str, crate::gguf::Value)>)) -> GgufFile {
    use crate::gguf::Value;
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut tokens: Vec<String> = SPECIALS.iter().map(|(t, _)| t.to_string()).collect();
    tokens.extend(bpe::byte_to_char().iter().map(|c| c.to_string()));
    tokens.push("he".into());
    let mut types = vec![Value::I32(3), Value::I32(3), Value::I32(3), Value::I32(4)];
    types.extend((4..tokens.len()).map(|_| Value::I32(1)));
    let mut keys = vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(vec!["h e".into()])),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    edit(&mut keys);
    let mut w = crate::gguf::write::GgufWriter::new();
    for (k, v) in keys {
        w.metadata(k, v);
    }
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "cohort-tokenizer-test-{}-{n}.gguf",
        std::process::id()
    ));
    w.write(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

#[test]
fn from_gguf_reads_the_keys() {
    let file = gguf_with(|_| {});
    let t = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(t.vocab_size(), 4 + 256 + 1);
    assert!(t.add_bos());
    let he = t.token_id("he").unwrap();
    assert_eq!(t.encode_with_bos("he", false), [1, he]);
    assert_eq!(t.encode("<think>he", false), [3, he]);
    let chat = ChatTemplate::from_gguf(&file).unwrap();
    assert!(chat.is_fallback());
    assert_eq!(
        chat.render(&[ChatMessage::new("user", "x")], true).unwrap(),
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    );
    let file = gguf_with(|k| {
        k.push((
            "tokenizer.chat_template",
            crate::gguf::Value::String("{{ bos_token }}|{{ eos_token }}".into()),
        ))
    });
    let chat = ChatTemplate::from_gguf(&file).unwrap();
    assert!(!chat.is_fallback());
    assert_eq!(chat.render(&[], false).unwrap(), "<|im_start|>|<|im_end|>");
}

#[test]
fn from_gguf_refuses_what_it_cannot_do() {
    use crate::gguf::Value;
    let err = |edit: fn(&mut Vec<(&'static str, Value)>)| {
        Tokenizer::from_gguf(&gguf_with(edit))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(|k| k[0].1 = Value::String("llama".into())),
        "tokenizer.ggml.model is \"llama\": only \"gpt2\" (byte-level BPE) tokenizers are supported"
    );
    assert!(
        err(|k| k[1].1 = Value::String("llama-bpe".into())).starts_with(
            "tokenizer.ggml.pre is \"llama-bpe\": supported pre-tokenizers are \"smollm\""
        )
    );
    let missing = err(|k| {
        k.remove(4);
    });
    assert!(
        missing.contains("cohort-tokenizer-test")
            && missing.contains("\"tokenizer.ggml.merges\" is missing"),
        "{missing}"
    );
    assert_eq!(
        err(|k| {
            if let Value::Array(types) = &mut k[3].1 {
                types[7] = Value::I32(9);
            }
        }),
        "tokenizer.ggml.token_type[7] is 9, not a GGUF token type (0..=6)"
    );
    assert_eq!(
        err(|k| k[6].1 = Value::U32(100_000)),
        "tokenizer.ggml.eos_token_id is 100000, outside the vocabulary of 261 tokens"
    );
    // No `pre` key: GPT-2's split.
    let file = gguf_with(|k| {
        k.remove(1);
    });
    assert_eq!(
        Tokenizer::from_gguf(&file).unwrap().pre_tokenizer(),
        PreTokenizer::Gpt2
    );
}

#[test]
fn shareable_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<ChatTemplate>();
    let t = tiny(MERGES, PreTokenizer::DigitsThenGpt2);
    let text = "hello world 123 hello again\n".repeat(200);
    let expected = t.encode(&text, false);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| assert_eq!(t.encode(&text, false), expected));
        }
    });
}
