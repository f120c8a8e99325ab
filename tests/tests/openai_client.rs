//! `cohort serve` driven by async-openai, a maintained OpenAI client library of the Rust
//! ecosystem: its request builders write the requests and its types read the answers, streamed
//! and not, so the wire format is checked by code nobody here wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use cohort_tests::{Server, default_model_present};
use n0_future::StreamExt as _;

const MODEL: &str = "smollm2-135m-instruct";

#[test]
fn the_openai_client_library_reads_every_answer() {
    if !default_model_present() {
        return;
    }
    // Another crate of the build turns on reqwest's rustls without a crypto provider; the client
    // never uses TLS here (plain HTTP to 127.0.0.1), but reqwest wants a provider installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--api-key", "sk-test"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("http://{}/v1", server.addr))
                .with_api_key("sk-test"),
        );

        let models = client.models().list().await.unwrap();
        assert!(models.data.iter().any(|m| m.id == MODEL), "{models:?}");

        let request = |stream: bool| {
            CreateChatCompletionRequestArgs::default()
                .model(MODEL)
                .messages([ChatCompletionRequestUserMessageArgs::default()
                    .content("What is the capital of France?")
                    .build()
                    .unwrap()
                    .into()])
                .temperature(0.0)
                .max_completion_tokens(12u32)
                .stream(stream)
                .build()
                .unwrap()
        };
        let whole = client.chat().create(request(false)).await.unwrap();
        let answer = whole.choices[0].message.content.clone().unwrap();
        assert!(answer.contains("Paris"), "{whole:?}");
        let usage = whole.usage.unwrap();
        assert_eq!(
            usage.total_tokens,
            usage.prompt_tokens + usage.completion_tokens
        );

        let mut stream = client.chat().create_stream(request(true)).await.unwrap();
        let mut streamed = String::new();
        let mut finished = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            for c in chunk.choices {
                if let Some(t) = c.delta.content {
                    streamed.push_str(&t);
                }
                if c.finish_reason.is_some() {
                    finished = c.finish_reason;
                }
            }
        }
        assert_eq!(streamed, answer);
        assert!(finished.is_some(), "the stream never said why it ended");

        let text = client
            .completions()
            .create(
                CreateCompletionRequestArgs::default()
                    .model(MODEL)
                    .prompt("The capital of France is")
                    .max_tokens(6u32)
                    .temperature(0.0)
                    .build()
                    .unwrap(),
            )
            .await
            .unwrap();
        assert!(!text.choices[0].text.is_empty(), "{text:?}");

        let mut unknown = request(false);
        unknown.model = "no-such-model".into();
        match client.chat().create(unknown).await {
            Err(OpenAIError::ApiError(e)) => {
                assert_eq!(e.status_code.as_u16(), 404);
                assert_eq!(e.api_error.code.as_deref(), Some("model_not_found"));
            }
            other => panic!("an unknown model gave {other:?}"),
        }
    });
}
