//! `cohort serve`: the OpenAI-compatible API on the real default model, checked over plain HTTP by
//! a client written here (tests/src: HTTP/1.1 and server-sent events by hand), every route and
//! every error of the issue, streaming and not, adapters without cross-talk, cancellation and a
//! full queue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_protocol::rng::SplitMix64;
use cohort_tests::{Server, default_model_present, http, sse_data};
use cohort_trainer::adapter::{AdapterWeights, Factors, LoraSpec};
use cohort_trainer::model::weights::Proj;
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m-instruct";

fn post(s: &Server, path: &str, key: Option<&str>, body: &Value) -> (u16, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let (status, _, body) = http(&s.addr, "POST", path, &headers, Some(&body.to_string()));
    (status, body)
}

fn ok(s: &Server, path: &str, body: &Value) -> Value {
    let (status, text) = post(s, path, Some("k1"), body);
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn error(s: &Server, body: &Value, status: u16) -> Value {
    let (got, text) = post(s, "/v1/chat/completions", Some("k1"), body);
    assert_eq!(got, status, "{body}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    e.clone()
}

fn question(extra: Value) -> Value {
    let mut v = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 12,
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn every_route_streaming_and_not_and_every_error() {
    if !default_model_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--api-key", "k1", "--parallel", "2"]);

    // Keys.
    let (status, text) = post(&s, "/v1/chat/completions", None, &question(json!({})));
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("invalid_api_key"), "{text}");
    let (status, _) = post(
        &s,
        "/v1/chat/completions",
        Some("wrong"),
        &question(json!({})),
    );
    assert_eq!(status, 401);

    // Models.
    let (status, _, text) = http(
        &s.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer k1")],
        None,
    );
    assert_eq!(status, 200, "{text}");
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["object"], "list");
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL && m["object"] == "model"),
        "{models}"
    );

    // A whole chat answer.
    let whole = ok(&s, "/v1/chat/completions", &question(json!({})));
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], MODEL);
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let answer = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(answer.contains("Paris"), "{whole}");
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let usage = &whole["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5 && (1..=12).contains(&c), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);

    // The same answer streamed: role first, then the text in pieces, a finish reason, the usage
    // (asked for), and [DONE].
    let (status, headers, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer k1")],
        Some(
            &question(json!({"stream": true, "stream_options": {"include_usage": true}}))
                .to_string(),
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")),
        "{headers:?}"
    );
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"])
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, answer, "greedy decoding streams the same text");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(
        last["usage"]["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], choice["finish_reason"]);

    // Stop sequences and the length limit.
    let stopped = ok(
        &s,
        "/v1/chat/completions",
        &question(json!({"stop": ["Paris"], "max_tokens": 30})),
    );
    let text = stopped["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(
        !text.contains("Paris") && answer.starts_with(text),
        "{stopped}"
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    let short = ok(
        &s,
        "/v1/chat/completions",
        &question(json!({"max_completion_tokens": 2})),
    );
    assert_eq!(short["choices"][0]["finish_reason"], "length");
    assert_eq!(short["usage"]["completion_tokens"], 2);

    // Log-probabilities: one entry per token, the alternatives sorted, the chosen one among them
    // (greedy: it is the first).
    let lp = ok(
        &s,
        "/v1/chat/completions",
        &question(json!({"logprobs": true, "top_logprobs": 3})),
    );
    let content = lp["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        lp["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        assert_eq!(
            top[0]["token"], t["token"],
            "greedy picks the most likely token: {t}"
        );
        let l: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(l[0] <= 0.0 && l[0] >= l[1] && l[1] >= l[2], "{t}");
        let bytes: Vec<u8> = t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            t["token"].as_str().unwrap()
        );
    }

    // Streamed, the same tokens' log-probabilities arrive with the chunks, in order, each
    // chunk's with its text; the stop token's with the final chunk.
    let (status, _, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer k1")],
        Some(&question(json!({"logprobs": true, "top_logprobs": 3, "stream": true})).to_string()),
    );
    assert_eq!(status, 200, "{body}");
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut streamed = Vec::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        let choice = &c["choices"][0];
        let tokens = choice["logprobs"]["content"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let text = choice["delta"]["content"].as_str().unwrap_or("");
        if !text.is_empty() {
            assert!(!tokens.is_empty(), "a chunk with text has its tokens: {c}");
            let bytes: Vec<u8> = tokens
                .iter()
                .flat_map(|t| t["bytes"].as_array().unwrap().iter())
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(String::from_utf8_lossy(&bytes), text, "{c}");
        }
        streamed.extend(tokens);
    }
    assert_eq!(&streamed, content, "streamed log-probabilities differ");

    // Seeded sampling repeats itself.
    let sampled =
        question(json!({"temperature": 0.9, "top_p": 0.95, "seed": 42, "max_tokens": 16}));
    assert_eq!(
        ok(&s, "/v1/chat/completions", &sampled)["choices"][0]["message"]["content"],
        ok(&s, "/v1/chat/completions", &sampled)["choices"][0]["message"]["content"]
    );

    // Plain completions, whole and streamed.
    let prompt = json!({"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 6});
    let text = ok(&s, "/v1/completions", &prompt);
    assert_eq!(text["object"], "text_completion");
    let completion = text["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!completion.is_empty(), "{text}");
    let mut streamed_prompt = prompt.clone();
    streamed_prompt["stream"] = json!(true);
    let (status, _, body) = http(
        &s.addr,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer k1")],
        Some(&streamed_prompt.to_string()),
    );
    assert_eq!(status, 200);
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let joined: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(joined, completion);

    // Errors: OpenAI's error object, the right status, the field named.
    let e = error(&s, &question(json!({"model": "no-such-model"})), 404);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(
        error(&s, &question(json!({"temperature": 5})), 400)["param"],
        "temperature"
    );
    assert_eq!(error(&s, &question(json!({"n": 2})), 400)["param"], "n");
    assert_eq!(
        error(&s, &question(json!({"top_logprobs": 2})), 400)["param"],
        "top_logprobs"
    );
    assert_eq!(
        error(&s, &question(json!({"stop": 7})), 400)["param"],
        "stop"
    );
    assert_eq!(
        error(
            &s,
            &question(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            400
        )["param"],
        "messages[0].role"
    );
    let mut no_messages = question(json!({}));
    no_messages.as_object_mut().unwrap().remove("messages");
    assert_eq!(error(&s, &no_messages, 400)["param"], "messages");
    let long = "many words ".repeat(5000);
    let e = error(
        &s,
        &question(json!({"messages": [{"role": "user", "content": long}]})),
        400,
    );
    assert_eq!(e["code"], "context_length_exceeded", "{e}");
    let e = error(&s, &question(json!({"max_tokens": 9000})), 400);
    assert_eq!(e["code"], "context_length_exceeded", "{e}");
    let (status, _, text) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer k1")],
        Some("{not json"),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"param\":\"body\""), "{text}");

    // Metrics.
    let (status, _, text) = http(&s.addr, "GET", "/metrics", &[], None);
    assert_eq!(status, 200);
    assert!(
        text.contains("cohort_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"),
        "{text}"
    );
    assert!(
        text.contains("cohort_requests_total{route=\"/v1/chat/completions\",status=\"404\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("cohort_time_to_first_token_seconds_count"),
        "{text}"
    );
    assert!(text.contains("cohort_completion_tokens_total"), "{text}");
    // The same question asked again started from the cached keys and values of its prompt (and
    // still gave the same answer, checked above).
    let reused: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("cohort_prefix_cache_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(reused > 20, "{text}");
}

/// A PEFT adapter with random factors on three projections of every layer: enough to change
/// the model's greedy answers.
fn random_adapter(dir: &std::path::Path, seed: u64) {
    let (hidden, inter, kv, layers, rank) = (576, 1536, 192, 30, 4);
    let spec = LoraSpec {
        rank,
        alpha: 16.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        seed,
        ..LoraSpec::default()
    };
    let mut rng = SplitMix64::new(seed);
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() as f32 - 0.5) * 0.2)
            .collect()
    };
    let mut factors = std::collections::BTreeMap::new();
    for l in 0..layers {
        for (p, d_in, d_out) in [
            (Proj::Q, hidden, hidden),
            (Proj::V, hidden, kv),
            (Proj::Down, inter, hidden),
        ] {
            let index = Proj::ALL.iter().position(|q| *q == p).unwrap();
            factors.insert(
                (l, index),
                Factors {
                    a: values(rank * d_in),
                    b: values(d_out * rank),
                    d_in,
                    d_out,
                },
            );
        }
    }
    AdapterWeights { spec, factors }
        .save_peft(dir, "HuggingFaceTB/SmolLM2-135M-Instruct")
        .unwrap();
}

#[test]
fn adapters_are_served_beside_the_base_without_cross_talk_and_clients_can_leave() {
    if !default_model_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a1, a2) = (dir.path().join("a1"), dir.path().join("a2"));
    random_adapter(&a1, 1);
    random_adapter(&a2, 2);
    let s = Server::start(
        &dir.path().join("serve"),
        &["--parallel", "3", "--queue", "1"],
    );
    let ids = [
        MODEL.to_string(),
        format!("{MODEL}:{}", a1.display()),
        format!("{MODEL}:{}", a2.display()),
    ];
    let ask = |model: &str| -> String {
        let body = json!({"model": model, "temperature": 0, "max_tokens": 10,
            "messages": [{"role": "user", "content": "Name a colour."}]});
        let (status, text) = post(&s, "/v1/chat/completions", None, &body);
        assert_eq!(status, 200, "{model}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // One at a time: three different answers.
    let alone: Vec<String> = ids.iter().map(|m| ask(m)).collect();
    assert_ne!(alone[0], alone[1]);
    assert_ne!(alone[1], alone[2]);
    // All at once (3 running, 1 waiting for a slot): each gets exactly its own answer.
    std::thread::scope(|scope| {
        let handles: Vec<_> = ids
            .iter()
            .cycle()
            .take(4)
            .map(|m| scope.spawn(move || (m.clone(), ask(m))))
            .collect();
        for h in handles {
            let (m, got) = h.join().unwrap();
            let i = ids.iter().position(|x| *x == m).unwrap();
            assert_eq!(got, alone[i], "{m} answered differently under concurrency");
        }
    });
    let (status, _, text) = http(&s.addr, "GET", "/v1/models", &[], None);
    assert_eq!(status, 200);
    assert!(
        text.contains(&a1.canonicalize().unwrap().display().to_string()),
        "{text}"
    );

    // A missing adapter directory is an unknown model.
    let (status, text) = post(
        &s,
        "/v1/chat/completions",
        None,
        &json!({"model": format!("{MODEL}:/no/such/dir"), "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 404, "{text}");

    // A client that goes away: its generation stops, and the slot frees.
    {
        use std::io::{Read as _, Write as _};
        let body = json!({"model": MODEL, "stream": true, "max_tokens": 4000, "temperature": 1.0, "seed": 3,
            "messages": [{"role": "user", "content": "Write a very long story about the sea."}]})
        .to_string();
        let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
        write!(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut buf = [0u8; 4096];
        let mut seen = 0;
        while seen < 3 {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0);
            seen += String::from_utf8_lossy(&buf[..n]).matches("data:").count();
        }
    }
    let metrics = cohort_tests::wait_until(
        "the cancelled generation to stop",
        std::time::Duration::from_secs(60),
        || {
            let (_, _, text) = http(&s.addr, "GET", "/metrics", &[], None);
            (text.contains("cohort_cancelled_total 1")
                && text.contains("cohort_active_generations 0"))
            .then_some(text)
        },
    );
    assert!(
        metrics.contains("cohort_adapter_cache_hits_total"),
        "{metrics}"
    );

    // A full queue: 3 long generations run, 1 waits, the next is refused with 429.
    let long = json!({"model": MODEL, "max_tokens": 150, "temperature": 1.0, "seed": 9,
        "messages": [{"role": "user", "content": "Tell me a long story."}]});
    std::thread::scope(|scope| {
        let busy: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| post(&s, "/v1/chat/completions", None, &long).0))
            .collect();
        cohort_tests::wait_until(
            "three generations and one waiting",
            std::time::Duration::from_secs(60),
            || {
                let (_, _, text) = http(&s.addr, "GET", "/metrics", &[], None);
                (text.contains("cohort_active_generations 3")
                    && text.contains("cohort_queue_depth 1"))
                .then_some(())
            },
        );
        let (status, text) = post(&s, "/v1/chat/completions", None, &long);
        assert_eq!(status, 429, "{text}");
        assert!(text.contains("rate_limit_exceeded"), "{text}");
        for b in busy {
            assert_eq!(b.join().unwrap(), 200);
        }
    });
    drop(s);
}

/// A number from `/metrics`.
fn metric(s: &Server, name: &str) -> u64 {
    let (status, _, text) = http(&s.addr, "GET", "/metrics", &[], None);
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Concurrent generations of the base and of two adapters, streamed and not, greedy and sampled,
/// decode together (one batched forward pass per step, checked through the metrics) and each
/// gives exactly its answer alone: the same text and the same log-probabilities, to the bit.
#[test]
fn concurrent_generations_are_batched_and_answer_exactly_as_alone() {
    if !default_model_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a1, a2) = (dir.path().join("a1"), dir.path().join("a2"));
    random_adapter(&a1, 3);
    random_adapter(&a2, 4);
    let s = Server::start(&dir.path().join("serve"), &["--parallel", "8"]);
    let models = [
        MODEL.to_string(),
        format!("{MODEL}:{}", a1.display()),
        format!("{MODEL}:{}", a2.display()),
    ];
    let prompts = [
        "Name a colour.",
        "What is the capital of France?",
        "Write a short poem about the sea.",
    ];
    // (model, prompt, streamed, sampled)
    let cases: Vec<(&str, &str, bool, bool)> = (0..8)
        .map(|i| {
            (
                models[i % 3].as_str(),
                prompts[(i + i / 3) % 3],
                i % 2 == 0,
                i % 4 == 3,
            )
        })
        .collect();
    // The text and the per-token log-probabilities (`logprobs.content`) of one answer.
    let ask = |&(model, prompt, stream, sampled): &(&str, &str, bool, bool)| -> (String, Value) {
        let body = json!({"model": model, "max_tokens": 24, "stream": stream,
            "temperature": if sampled { 0.9 } else { 0.0 }, "seed": 7,
            "logprobs": true, "top_logprobs": 2,
            "messages": [{"role": "user", "content": prompt}]});
        let (status, text) = post(&s, "/v1/chat/completions", None, &body);
        assert_eq!(status, 200, "{model}: {text}");
        if !stream {
            let v: Value = serde_json::from_str(&text).unwrap();
            let choice = &v["choices"][0];
            return (
                choice["message"]["content"].as_str().unwrap().to_string(),
                choice["logprobs"]["content"].clone(),
            );
        }
        let events = sse_data(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        let (mut answer, mut logprobs) = (String::new(), Vec::new());
        for e in &events[..events.len() - 1] {
            let c: Value = serde_json::from_str(e).unwrap();
            let choice = &c["choices"][0];
            answer.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(l) = choice["logprobs"]["content"].as_array() {
                logprobs.extend(l.iter().cloned());
            }
        }
        (answer, Value::Array(logprobs))
    };
    // Once first, so that every later prompt starts from the prefix cache in the same way: a
    // prompt's last token then runs on its own, which rounds differently in the last bits from
    // a prompt run whole (the texts agree; the log-probabilities differ by about 1e-6).
    cases.iter().for_each(|c| drop(ask(c)));
    let alone: Vec<(String, Value)> = cases.iter().map(&ask).collect();
    assert_ne!(alone[0].0, alone[1].0);
    assert_ne!(alone[1].0, alone[2].0);
    let (steps, tokens) = (
        metric(&s, "cohort_decode_steps_total"),
        metric(&s, "cohort_decode_tokens_total"),
    );
    assert_eq!(steps, tokens, "one at a time, each step decodes one token");
    // All at once, twice.
    for round in 0..2 {
        std::thread::scope(|scope| {
            let handles: Vec<_> = cases.iter().map(|c| scope.spawn(move || ask(c))).collect();
            for ((h, want), case) in handles.into_iter().zip(&alone).zip(&cases) {
                let got = h.join().unwrap();
                assert_eq!(got.0, want.0, "round {round}, {case:?}: the text differs");
                assert_eq!(
                    got.1, want.1,
                    "round {round}, {case:?}: log-probabilities differ"
                );
            }
        });
    }
    let steps = metric(&s, "cohort_decode_steps_total") - steps;
    let tokens = metric(&s, "cohort_decode_tokens_total") - tokens;
    assert!(
        tokens as f64 / steps as f64 > 2.0,
        "{tokens} tokens in {steps} steps: the concurrent generations were not batched"
    );
}
