//! The tokenizer and chat template on the real default model (SmolLM2-135M-Instruct, GGUF),
//! against reference ids from Hugging Face `tokenizers` in `fixtures/tokenizer_smollm2.json`
//! (how they were produced: its `produced_by` and `fixtures/tokenizer_smollm2_reference.py`).
//!
//! Without the model file the tests print a skip notice, unless `CI=true`, where they fail: run
//! `scripts/fetch-model.sh`.

use std::path::PathBuf;
use std::time::Instant;

use cohort_trainer::gguf::GgufFile;
use cohort_trainer::tokenizer::{ChatMessage, ChatTemplate, PreTokenizer, Tokenizer};
use serde::Deserialize;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Deserialize)]
struct Fixture {
    produced_by: String,
    model: String,
    cases: Vec<Case>,
    chat: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
    #[serde(default)]
    llama_cpp_ids: Option<Vec<u32>>,
}

#[derive(Deserialize)]
struct ChatCase {
    name: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
}

/// Where the default model is ([`cohort_trainer::models::default_model_path`]).
fn model_path() -> Option<PathBuf> {
    Some(cohort_trainer::models::default_model_path())
}

/// The model file, or `None` (after a notice) when it is absent outside CI.
fn model() -> Option<GgufFile> {
    let path = model_path();
    match path.as_ref().filter(|p| p.is_file()) {
        Some(p) => Some(GgufFile::open(p).unwrap_or_else(|e| panic!("{e}"))),
        None => {
            let shown = path.map_or_else(|| MODEL_FILE.into(), |p| p.display().to_string());
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the model {shown} is missing; run scripts/fetch-model.sh"
            );
            eprintln!("SKIP: {shown} not found; run scripts/fetch-model.sh to test against it");
            None
        }
    }
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizer_smollm2.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let fixture: Fixture = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(fixture.model, MODEL_FILE);
    assert!(!fixture.produced_by.is_empty());
    fixture
}

#[test]
fn smollm2_metadata() {
    let Some(file) = model() else { return };
    let t = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.pre_tokenizer(), PreTokenizer::DigitsThenGpt2);
    assert_eq!(t.bos(), Some(1));
    assert_eq!(t.eos(), Some(2));
    assert_eq!(t.pad(), Some(2));
    assert!(!t.add_bos());
    assert_eq!(t.token_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_id("<|im_end|>"), Some(2));
    assert_eq!(t.token_id("<|endoftext|>"), Some(0));
    assert!(t.is_special(0) && t.is_special(16) && !t.is_special(17));
    assert_eq!(t.stop_token_ids(), [2, 0]);
    assert_eq!(t.token_bytes(t.token_id("Ġthe").unwrap()), b" the");
    assert_eq!(t.encode_with_bos("hi", true), t.encode("hi", true));
}

#[test]
fn smollm2_matches_reference_ids() {
    let Some(file) = model() else { return };
    let t = Tokenizer::from_gguf(&file).unwrap();
    let fixture = fixture();
    let mut failures = Vec::new();
    for case in &fixture.cases {
        let ids = t.encode(&case.text, case.parse_special);
        if ids != case.ids {
            failures.push(format!(
                "{} (parse_special {}):\n  ours      {:?}\n  reference {:?}",
                case.name, case.parse_special, ids, case.ids
            ));
        }
        if let Some(llama) = &case.llama_cpp_ids {
            assert_eq!(&ids, llama, "{}: llama.cpp ids differ", case.name);
        }
        assert_eq!(
            t.decode(&ids),
            case.text,
            "{}: decode(encode(x)) != x",
            case.name
        );
        if case.parse_special {
            assert_eq!(t.count_tokens(&case.text), ids.len(), "{}", case.name);
        }
        // Streaming the ids gives the same text.
        let mut stream = t.stream_decoder();
        let mut streamed: String = ids.iter().filter_map(|&id| stream.push(id)).collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, case.text, "{}: streamed", case.name);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from the reference ({}):\n{}",
        failures.len(),
        fixture.cases.len(),
        fixture.produced_by,
        failures.join("\n")
    );
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    let Some(file) = model() else { return };
    let t = Tokenizer::from_gguf(&file).unwrap();
    let template = ChatTemplate::from_gguf(&file).unwrap();
    assert!(!template.is_fallback());
    for case in fixture().chat {
        let rendered = template
            .render(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(rendered, case.rendered, "{}", case.name);
        assert_eq!(t.encode(&rendered, true), case.ids, "{}", case.name);
        assert_eq!(t.decode(&case.ids), rendered, "{}", case.name);
    }
}

/// Prints encoding throughput on this crate's own sources and docs (code and English prose),
/// repeated to 4 MB. Run with `--nocapture`, optimised, for a meaningful number.
#[test]
fn smollm2_throughput() {
    let Some(file) = model() else { return };
    let t = Tokenizer::from_gguf(&file).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    let mut dirs = vec![root.join("src"), root.join("tests")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs" || e == "md") {
                sources.push(std::fs::read_to_string(path).unwrap());
            }
        }
    }
    for case in fixture().cases {
        sources.push(case.text);
    }
    let mut text = String::new();
    while text.len() < 4_000_000 {
        for s in &sources {
            text.push_str(s);
        }
    }
    let mut ids = Vec::new();
    for run in ["first (cold cache)", "second", "third"] {
        let start = Instant::now();
        ids = t.encode(&text, false);
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "tokenizer throughput, {run} run: {:.1} MB/s ({} bytes -> {} tokens in {:.3} s, one thread)",
            text.len() as f64 / secs / 1e6,
            text.len(),
            ids.len(),
            secs
        );
    }
    let start = Instant::now();
    let loaded = Tokenizer::from_gguf(&file).unwrap();
    eprintln!(
        "Tokenizer::from_gguf: {:.3} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(loaded.vocab_size(), t.vocab_size());
    assert_eq!(t.decode(&ids), text);
}

/// A larger differential check against Hugging Face `tokenizers`: set `COHORT_TOKENIZER_CORPUS`
/// to a file made by `fixtures/tokenizer_smollm2_reference.py --corpus` and run with
/// `--ignored`.
#[test]
#[ignore = "needs a corpus file made by the reference script (COHORT_TOKENIZER_CORPUS)"]
fn smollm2_matches_reference_on_corpus() {
    #[derive(Deserialize)]
    struct Line {
        text: String,
        ids: Vec<u32>,
    }
    let Some(file) = model() else { return };
    let Some(path) = std::env::var_os("COHORT_TOKENIZER_CORPUS") else {
        eprintln!("SKIP: COHORT_TOKENIZER_CORPUS is not set");
        return;
    };
    let t = Tokenizer::from_gguf(&file).unwrap();
    let data = std::fs::read_to_string(&path).unwrap();
    let (mut n, mut bytes, mut differ) = (0, 0, Vec::new());
    for line in data.lines() {
        let line: Line = serde_json::from_str(line).unwrap();
        let ids = t.encode(&line.text, true);
        if ids != line.ids {
            differ.push(format!(
                "{:?}\n  ours      {:?}\n  reference {:?}",
                line.text, ids, line.ids
            ));
        }
        assert_eq!(t.decode(&ids), line.text);
        n += 1;
        bytes += line.text.len();
    }
    eprintln!("{n} texts, {bytes} bytes, {} differ", differ.len());
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
