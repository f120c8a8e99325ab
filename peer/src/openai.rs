//! The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions` and
//! `POST /v1/completions` (non-streaming, and streaming as server-sent events ending in
//! `data: [DONE]`), errors in OpenAI's error object, and `GET /metrics` in Prometheus' text
//! format.
//!
//! One base model is loaded once (the CPU [`Engine`] over the GGUF's blocks) and serves any
//! number of LoRA adapters, applied on the fly per request, never merged into a copy of the base.
//! Adapters live in an LRU cache with a memory budget. At most `parallel` generations run at a
//! time; requests beyond that wait in a bounded queue, and beyond the queue they are refused
//! with 429. Each request's prompt runs on a blocking thread of its own; then its sequence joins
//! the base model's decode loop, which advances all running sequences together, one batched
//! forward pass per token (continuous batching: see `decode_loop`), so that concurrent streams
//! share each read of the weights. A client that goes away (a dropped connection) stops its
//! generation at the next token.
//!
//! Model ids: a base model (`smollm2-135m-instruct`, a file name in the model cache, or the
//! file's BLAKE3 hash) or `BASE:ADAPTER`, where `ADAPTER` is a directory holding a PEFT adapter
//! (`adapter_config.json` + `adapter_model.safetensors`). On a node (`cohort up`) an
//! [`AdapterSource`] also resolves `ADAPTER` given as an adapter's blob hash or as a job (its
//! latest merged adapter, from the ledger): the node finds a provider through content routing,
//! fetches the bundle over iroh-blobs (verified against its hash as it arrives) and unpacks it;
//! and a base given by hash that the node holds as a blob (a job's base model).

use std::collections::HashMap;
use std::convert::Infallible;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cohort_trainer::adapter::AdapterWeights;
use cohort_trainer::engine::{DecodeItem, Engine, EngineCache, EngineError, Logits};
use cohort_trainer::generate::{
    CausalLm, FinishReason, GenerateError, Generation, Piece, SamplingParams, Sequence,
};
use cohort_trainer::gguf::GgufFile;
use cohort_trainer::models;
use cohort_trainer::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Base models to load at start (ids as `--model` takes them); others load on first use.
    pub models: Vec<String>,
    /// Adapters to load at start: `BASE:DIR` or a directory (for the first model).
    pub adapters: Vec<String>,
    /// Generations running at once.
    pub parallel: usize,
    /// Requests that may wait for a free generation slot; more get 429.
    pub queue: usize,
    /// Memory budget of the adapter cache, in bytes.
    pub adapter_cache_bytes: usize,
    /// Bearer keys accepted on `/v1` (empty: no key needed).
    pub api_keys: Vec<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            models: Vec::new(),
            adapters: Vec::new(),
            parallel: 4,
            queue: 64,
            adapter_cache_bytes: 1 << 30,
            api_keys: Vec::new(),
        }
    }
}

/// A loaded base model.
#[derive(Debug)]
struct Base {
    /// The id it is listed under.
    id: String,
    /// BLAKE3 of the file (hex).
    hash: String,
    engine: Engine,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    created: u64,
    /// Recent prompts' keys and values, to skip a prefix a new prompt shares with one of them.
    prefixes: Mutex<Vec<PrefixEntry>>,
    prefix_clock: AtomicU64,
    /// The decode loop of this model's running generations ([`Base::decode`]).
    decoder: Mutex<Option<std::sync::mpsc::Sender<Decoding>>>,
    /// Batched decode steps run, and the tokens they decoded (their mean batch size is the
    /// ratio).
    decode_steps: AtomicU64,
    decode_tokens: AtomicU64,
}

/// A prompt seen recently, with its keys and values under one adapter.
#[derive(Debug)]
struct PrefixEntry {
    /// The adapter's cache key ("" for the bare base): keys and values depend on it.
    adapter: String,
    tokens: Vec<u32>,
    cache: EngineCache,
    last_used: u64,
}

/// Bytes of keys and values the prefix cache of one base may hold.
const PREFIX_CACHE_BYTES: usize = 64 << 20;
/// Shorter shared prefixes are recomputed (not worth a copy).
const MIN_PREFIX: usize = 8;

impl Base {
    fn kv_dim(&self) -> usize {
        let c = self.engine.config();
        c.num_kv_heads * c.head_dim
    }

    /// The longest cached prefix of `tokens` under `adapter`, leaving at least one token to run:
    /// a copy of its keys and values, and its length.
    fn take_prefix(&self, adapter: &str, tokens: &[u32]) -> Option<(EngineCache, usize)> {
        let mut entries = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
        let limit = tokens.len().saturating_sub(1);
        let (best, len) = entries
            .iter_mut()
            .filter(|e| e.adapter == adapter)
            .map(|e| {
                let common = e
                    .tokens
                    .iter()
                    .zip(tokens)
                    .take_while(|(a, b)| a == b)
                    .count()
                    .min(limit);
                (e, common)
            })
            .max_by_key(|(_, common)| *common)?;
        if len < MIN_PREFIX {
            return None;
        }
        best.last_used = self.prefix_clock.fetch_add(1, Ordering::Relaxed);
        let mut cache = best.cache.clone();
        cache.truncate(len, self.kv_dim());
        Some((cache, len))
    }

    /// Remembers a prompt's keys and values, dropping the least recently used beyond the budget.
    fn store_prefix(&self, adapter: &str, tokens: &[u32], cache: &EngineCache) {
        if tokens.len() < MIN_PREFIX || cache.bytes() > PREFIX_CACHE_BYTES / 4 {
            return;
        }
        let mut entries = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
        if entries
            .iter()
            .any(|e| e.adapter == adapter && e.tokens == tokens)
        {
            return;
        }
        entries.push(PrefixEntry {
            adapter: adapter.to_string(),
            tokens: tokens.to_vec(),
            cache: cache.clone(),
            last_used: self.prefix_clock.fetch_add(1, Ordering::Relaxed),
        });
        while entries.iter().map(|e| e.cache.bytes()).sum::<usize>() > PREFIX_CACHE_BYTES {
            let Some(oldest) = entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            entries.remove(oldest);
        }
    }
}

/// The engine with an adapter for one generation, starting from a cached prefix of the prompt
/// when one is there (the chat template's system turn, a conversation's earlier turns).
struct PrefixLm<'a> {
    base: &'a Base,
    adapter: Option<&'a AdapterWeights>,
    adapter_key: &'a str,
    cache: EngineCache,
    /// Prefix tokens reused by this generation (for the metrics).
    reused: usize,
}

impl CausalLm for PrefixLm<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let prompt = self.cache.is_empty();
        let mut skip = 0;
        if prompt && let Some((cache, n)) = self.base.take_prefix(self.adapter_key, tokens) {
            self.cache = cache;
            skip = n;
            self.reused = n;
        }
        let logits = self.base.engine.forward_with(
            &tokens[skip..],
            &mut self.cache,
            Logits::Last,
            self.adapter,
        )?;
        if prompt {
            self.base
                .store_prefix(self.adapter_key, tokens, &self.cache);
        }
        Ok(logits)
    }

    fn position(&self) -> usize {
        self.cache.len()
    }

    fn context_len(&self) -> usize {
        self.base.engine.config().max_seq_len
    }

    fn reset(&mut self) {
        self.cache = EngineCache::new();
    }
}

#[derive(Debug)]
struct CachedAdapter {
    weights: Arc<AdapterWeights>,
    bytes: usize,
    last_used: u64,
}

/// Where a node finds what a model id names beyond local files: adapters by blob hash or by job,
/// and base models by hash.
pub trait AdapterSource: Send + Sync + std::fmt::Debug {
    /// The local directory of the PEFT adapter `name` (an adapter's blob hash or a job id),
    /// fetched and unpacked if needed; `Ok(None)` when `name` is neither.
    fn adapter<'a>(
        &'a self,
        name: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Option<PathBuf>, String>> + Send + 'a>>;
    /// The local file of base model `hash`, if this node holds it.
    fn base(&self, hash: &str) -> Option<PathBuf>;
    /// Fetches base model `hash` from the network if this node does not hold it; `Ok(None)`
    /// when `hash` is not a hash.
    fn fetch_base<'a>(
        &'a self,
        hash: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Option<PathBuf>, String>> + Send + 'a>>;
}

/// The server's state.
#[derive(Debug)]
pub struct OpenAi {
    options: ServeOptions,
    source: Option<Arc<dyn AdapterSource>>,
    /// Adapter names resolved by the source: name -> local directory.
    resolved: Mutex<HashMap<String, PathBuf>>,
    bases: Mutex<HashMap<String, Arc<Base>>>,
    adapters: Mutex<HashMap<String, CachedAdapter>>,
    clock: AtomicU64,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    metrics: Metrics,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    fn not_found(model: &str, why: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{model}` does not exist or you do not have access to it: {why}"
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        (self.status, Json(body)).into_response()
    }
}

/// The routes (`/v1/...` and `/metrics`), with their state.
pub fn router(state: Arc<OpenAi>) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl OpenAi {
    /// The server, loading every model on first use.
    pub fn lazy(options: ServeOptions) -> Arc<OpenAi> {
        Self::with_source(options, None)
    }

    /// [`OpenAi::lazy`] with a node's [`AdapterSource`] for adapters and bases by hash.
    pub fn with_source(
        options: ServeOptions,
        source: Option<Arc<dyn AdapterSource>>,
    ) -> Arc<OpenAi> {
        Arc::new(OpenAi {
            slots: Arc::new(Semaphore::new(options.parallel.max(1))),
            source,
            resolved: Mutex::new(HashMap::new()),
            options,
            bases: Mutex::new(HashMap::new()),
            adapters: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            metrics: Metrics::default(),
        })
    }

    /// The server; loads `options.models` and `options.adapters` now (the first error is returned).
    pub fn new(options: ServeOptions) -> anyhow::Result<Arc<OpenAi>> {
        let server = OpenAi::lazy(options);
        for m in &server.options.models {
            server
                .base(m)
                .map_err(|e| anyhow::anyhow!("--model {m}: {}", e.message))?;
        }
        for a in &server.options.adapters {
            let id = if a.contains(':') {
                a.clone()
            } else {
                let first = server
                    .options
                    .models
                    .first()
                    .cloned()
                    .unwrap_or_else(|| models::DEFAULT_MODEL_ID.to_string());
                format!("{first}:{a}")
            };
            server
                .resolve(&id)
                .map_err(|e| anyhow::anyhow!("--adapter {a}: {}", e.message))?;
        }
        Ok(server)
    }

    fn lock_bases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Base>>> {
        self.bases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_adapters(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedAdapter>> {
        self.adapters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A base model by id, file name or hash, loaded on first use.
    fn base(&self, spec: &str) -> Result<Arc<Base>, ApiError> {
        if let Some(b) = self
            .lock_bases()
            .values()
            .find(|b| b.id == spec || b.hash == spec)
        {
            return Ok(b.clone());
        }
        let path = match models::resolve(spec) {
            Ok(p) => p,
            Err(e) => match self.source.as_ref().and_then(|s| s.base(spec)) {
                Some(p) => p,
                None => return Err(ApiError::not_found(spec, e)),
            },
        };
        let info = models::inspect(&path).map_err(|e| ApiError::not_found(spec, e))?;
        let hash = info.hash.to_string();
        if let Some(b) = self.lock_bases().get(&hash) {
            return Ok(b.clone());
        }
        let id = if path == models::default_model_path() {
            models::DEFAULT_MODEL_ID.to_string()
        } else {
            path.file_stem()
                .map_or_else(|| hash.clone(), |s| s.to_string_lossy().into_owned())
        };
        let load = || -> anyhow::Result<Base> {
            let file = GgufFile::open(&path)?;
            Ok(Base {
                engine: Engine::from_gguf(&file)?,
                tokenizer: Tokenizer::from_gguf(&file)?,
                template: ChatTemplate::from_gguf(&file)?,
                id: id.clone(),
                hash: hash.clone(),
                created: now_secs(),
                prefixes: Mutex::new(Vec::new()),
                prefix_clock: AtomicU64::new(0),
                decoder: Mutex::new(None),
                decode_steps: AtomicU64::new(0),
                decode_tokens: AtomicU64::new(0),
            })
        };
        let base = Arc::new(
            load().map_err(|e| ApiError::internal(format!("loading {}: {e:#}", path.display())))?,
        );
        tracing::info!(model = %id, %hash, "base model loaded");
        Ok(self.lock_bases().entry(hash).or_insert(base).clone())
    }

    /// `BASE` or `BASE:ADAPTER`: the base and the adapter to apply.
    #[allow(clippy::type_complexity)]
    fn resolve(
        &self,
        model: &str,
    ) -> Result<(Arc<Base>, Option<(String, Arc<AdapterWeights>)>), ApiError> {
        let Some((base, adapter)) = model.split_once(':') else {
            return Ok((self.base(model)?, None));
        };
        let base = self.base(base)?;
        let dir = self
            .resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(adapter)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(adapter));
        let adapter = self.adapter(&base, model, &dir)?;
        Ok((base, Some(adapter)))
    }

    /// Lets the node's source fetch what `model` names before the (blocking) resolution: an
    /// adapter that is not a local directory is looked up as a blob hash or a job.
    async fn fetch_named(&self, model: &str) -> Result<(), ApiError> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        let base = model.split_once(':').map_or(model, |(b, _)| b);
        if base.len() == 64 && models::resolve(base).is_err() && source.base(base).is_none() {
            source
                .fetch_base(base)
                .await
                .map_err(|e| ApiError::not_found(model, e))?;
        }
        let Some((_, adapter)) = model.split_once(':') else {
            return Ok(());
        };
        if Path::new(adapter).is_dir()
            || self
                .resolved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(adapter)
        {
            return Ok(());
        }
        match source.adapter(adapter).await {
            Ok(Some(dir)) => {
                self.resolved
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(adapter.to_owned(), dir);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(ApiError::not_found(model, e)),
        }
    }

    fn adapter(
        &self,
        base: &Base,
        model: &str,
        dir: &Path,
    ) -> Result<(String, Arc<AdapterWeights>), ApiError> {
        let key = format!(
            "{}:{}",
            base.hash,
            std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
        );
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.lock_adapters().get_mut(&key) {
            c.last_used = tick;
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((key, c.weights.clone()));
        }
        self.metrics.cache_misses.fetch_add(1, Ordering::Relaxed);
        if !dir.join("adapter_config.json").is_file() {
            return Err(ApiError::not_found(
                model,
                format!("no PEFT adapter in {}", dir.display()),
            ));
        }
        let weights = AdapterWeights::load_peft(dir)
            .map_err(|e| ApiError::bad("model", format!("adapter {}: {e}", dir.display())))?;
        base.engine.check_adapter(&weights).map_err(|e| {
            ApiError::bad(
                "model",
                format!("adapter {} does not fit {}: {e}", dir.display(), base.id),
            )
        })?;
        let bytes = weights
            .factors
            .values()
            .map(|f| (f.a.len() + f.b.len()) * 4)
            .sum::<usize>();
        let weights = Arc::new(weights);
        let mut cache = self.lock_adapters();
        cache.insert(
            key.clone(),
            CachedAdapter {
                weights: weights.clone(),
                bytes,
                last_used: tick,
            },
        );
        // Least recently used first out, until the budget holds (the newest always stays).
        while cache.values().map(|c| c.bytes).sum::<usize>() > self.options.adapter_cache_bytes
            && cache.len() > 1
        {
            let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            cache.remove(&oldest);
            self.metrics.cache_evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok((key, weights))
    }

    fn check_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.options.api_keys.is_empty() {
            return Ok(());
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.is_some_and(|k| self.options.api_keys.iter().any(|a| a == k)) {
            return Ok(());
        }
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: send `Authorization: Bearer KEY`.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Request parsing: every field checked by name, so that a bad request says which field is wrong.

fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("body", "the body must be a JSON object")),
        Err(e) => Err(ApiError::bad(
            "body",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

fn opt_f32(
    m: &serde_json::Map<String, Value>,
    field: &str,
    range: std::ops::RangeInclusive<f32>,
) -> Result<Option<f32>, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let x = v
                .as_f64()
                .ok_or_else(|| ApiError::bad(field, format!("`{field}` must be a number")))?
                as f32;
            if !range.contains(&x) {
                return Err(ApiError::bad(
                    field,
                    format!(
                        "`{field}` is {x}; it must be between {} and {}",
                        range.start(),
                        range.end()
                    ),
                ));
            }
            Ok(Some(x))
        }
    }
}

fn opt_u64(m: &serde_json::Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad(
                field,
                format!("`{field}` must be a non-negative integer, not {v}"),
            )
        }),
    }
}

fn opt_bool(m: &serde_json::Map<String, Value>, field: &str) -> Result<bool, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::bad(
            field,
            format!("`{field}` must be true or false, not {v}"),
        )),
    }
}

/// What both endpoints take besides the prompt.
#[derive(Debug)]
struct Common {
    model: String,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
    /// `max_tokens` was given (else it is what the context leaves).
    max_given: bool,
}

fn common(m: &serde_json::Map<String, Value>) -> Result<Common, ApiError> {
    let model = match m.get("model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(ApiError::bad("model", "`model` must be a non-empty string")),
        None => return Err(ApiError::bad("model", "`model` is required")),
    };
    if let Some(n) = opt_u64(m, "n")?
        && n != 1
    {
        return Err(ApiError::bad(
            "n",
            format!("`n` is {n}; only 1 is supported"),
        ));
    }
    let max_tokens = match opt_u64(m, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => opt_u64(m, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::bad(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| {
                s.as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        ApiError::bad("stop", "each `stop` sequence must be a non-empty string")
                    })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop",
                "`stop` must be a string or an array of at most 4 strings",
            ));
        }
    };
    let stream = opt_bool(m, "stream")?;
    let include_usage = match m.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage").map_err(|_| {
            ApiError::bad(
                "stream_options.include_usage",
                "`include_usage` must be true or false",
            )
        })?,
        Some(_) => {
            return Err(ApiError::bad(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
    };
    let temperature = opt_f32(m, "temperature", 0.0..=2.0)?.unwrap_or(1.0);
    let top_p = opt_f32(m, "top_p", 0.0..=1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(ApiError::bad("top_p", "`top_p` must be above 0"));
    }
    let params = SamplingParams {
        temperature,
        top_p,
        seed: opt_u64(m, "seed")?.unwrap_or_else(rand::random),
        max_tokens: max_tokens.map_or(usize::MAX, |n| n as usize),
        stop_strings: stop,
        ..SamplingParams::default()
    };
    Ok(Common {
        model,
        params,
        stream,
        include_usage,
        max_given: max_tokens.is_some(),
    })
}

fn messages(m: &serde_json::Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let list = match m.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(_) => {
            return Err(ApiError::bad(
                "messages",
                "`messages` must be a non-empty array",
            ));
        }
        None => return Err(ApiError::bad("messages", "`messages` is required")),
    };
    list.iter()
        .enumerate()
        .map(|(i, msg)| {
            let field = |f: &str| format!("messages[{i}].{f}");
            let role = match msg.get("role").and_then(Value::as_str) {
                Some(r @ ("system" | "user" | "assistant")) => r,
                Some("developer") => "system",
                Some(other) => {
                    return Err(ApiError::bad(
                        field("role"),
                        format!("role `{other}` is not supported: use system, developer, user or assistant"),
                    ));
                }
                None => return Err(ApiError::bad(field("role"), "each message needs a `role`")),
            };
            let content = match msg.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::bad(
                                    format!("messages[{i}].content[{j}]"),
                                    "only text parts (`{\"type\": \"text\", \"text\": ...}`) are supported",
                                ));
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::bad(
                        field("content"),
                        "`content` must be a string or an array of text parts",
                    ));
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Handlers.

async fn list_models(State(s): State<Arc<OpenAi>>, headers: HeaderMap) -> Response {
    if let Err(e) = s.check_key(&headers) {
        return e.into_response();
    }
    let mut data = Vec::new();
    let loaded: Vec<Arc<Base>> = s.lock_bases().values().cloned().collect();
    for b in &loaded {
        data.push(
            json!({ "id": b.id, "object": "model", "created": b.created, "owned_by": "cohort" }),
        );
    }
    // Models in the cache that are not loaded yet are listed too (they load on first use).
    if let Ok(list) = models::list() {
        for (path, info) in list {
            let Ok(info) = info else { continue };
            if loaded.iter().any(|b| b.hash == info.hash.to_string()) {
                continue;
            }
            let id = if path == models::default_model_path() {
                models::DEFAULT_MODEL_ID.to_string()
            } else {
                path.file_stem().map_or_else(
                    || info.hash.to_string(),
                    |s| s.to_string_lossy().into_owned(),
                )
            };
            data.push(json!({ "id": id, "object": "model", "created": 0, "owned_by": "cohort" }));
        }
    }
    let adapters: Vec<String> = s.lock_adapters().keys().cloned().collect();
    for key in adapters {
        if let Some((hash, dir)) = key.split_once(':')
            && let Some(b) = loaded.iter().find(|b| b.hash == hash)
        {
            data.push(json!({
                "id": format!("{}:{dir}", b.id),
                "object": "model",
                "created": b.created,
                "owned_by": "cohort",
                "parent": b.id,
            }));
        }
    }
    Json(json!({ "object": "list", "data": data })).into_response()
}

async fn get_model(
    State(s): State<Arc<OpenAi>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    if let Err(e) = s.check_key(&headers) {
        return e.into_response();
    }
    if let Err(e) = s.fetch_named(&id).await {
        return e.into_response();
    }
    let s2 = s.clone();
    let id2 = id.clone();
    match tokio::task::spawn_blocking(move || s2.resolve(&id2)).await {
        Ok(Ok((base, _))) => Json(json!({
            "id": id,
            "object": "model",
            "created": base.created,
            "owned_by": "cohort",
        }))
        .into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

/// Which endpoint a generation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn route(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Text => "/v1/completions",
        }
    }
}

async fn chat_completions(
    State(s): State<Arc<OpenAi>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    handle(s, headers, body, Kind::Chat).await
}

async fn completions(
    State(s): State<Arc<OpenAi>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    handle(s, headers, body, Kind::Text).await
}

/// A prepared request: model, prompt tokens and parameters.
struct Prepared {
    base: Arc<Base>,
    /// The adapter with its cache key.
    adapter: Option<(String, Arc<AdapterWeights>)>,
    prompt: Vec<u32>,
    common: Common,
    logprobs: bool,
}

fn prepare(s: &OpenAi, body: &[u8], kind: Kind) -> Result<Prepared, ApiError> {
    let m = parse_body(body)?;
    let mut common = common(&m)?;
    let (logprobs, top) = match kind {
        Kind::Chat => {
            let on = opt_bool(&m, "logprobs")?;
            let top = opt_u64(&m, "top_logprobs")?.unwrap_or(0);
            if top > 20 {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "`top_logprobs` must be between 0 and 20",
                ));
            }
            if top > 0 && !on {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            (on, top as usize)
        }
        Kind::Text => (false, 0),
    };
    common.params.top_logprobs = top;
    let (base, adapter) = s.resolve(&common.model)?;
    let (prompt, field) = match kind {
        Kind::Chat => {
            let msgs = messages(&m)?;
            let text = base
                .template
                .render(&msgs, true)
                .map_err(|e| ApiError::bad("messages", format!("the chat template failed: {e}")))?;
            (base.tokenizer.encode(&text, true), "messages")
        }
        Kind::Text => {
            let text = match m.get("prompt") {
                Some(Value::String(p)) => p.clone(),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_string()
                }
                Some(_) => {
                    return Err(ApiError::bad(
                        "prompt",
                        "`prompt` must be a string (or an array of one string)",
                    ));
                }
                None => return Err(ApiError::bad("prompt", "`prompt` is required")),
            };
            (base.tokenizer.encode_with_bos(&text, false), "prompt")
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad(field, format!("`{field}` is empty")));
    }
    let context = base.engine.config().max_seq_len;
    let room = context.saturating_sub(prompt.len());
    if room == 0 || (common.max_given && prompt.len() + common.params.max_tokens > context) {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the {field}, {} for the completion). Please reduce the length of the {field} or the completion.",
                prompt.len()
                    + if common.max_given {
                        common.params.max_tokens
                    } else {
                        0
                    },
                prompt.len(),
                if common.max_given {
                    common.params.max_tokens
                } else {
                    0
                },
            ),
            kind: "invalid_request_error",
            param: Some(field.into()),
            code: Some("context_length_exceeded"),
        });
    }
    common.params.max_tokens = common.params.max_tokens.min(room);
    Ok(Prepared {
        base,
        adapter,
        prompt,
        common,
        logprobs,
    })
}

/// A slot to generate in, or 429 when the queue is full. The guard counts the waiting requests.
async fn acquire(s: &Arc<OpenAi>) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    if let Ok(p) = s.slots.clone().try_acquire_owned() {
        return Ok(p);
    }
    if s.waiting.fetch_add(1, Ordering::SeqCst) >= s.options.queue {
        s.waiting.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "The server is busy: {} generations running and {} waiting. Retry later.",
                s.options.parallel, s.options.queue
            ),
            kind: "requests",
            param: None,
            code: Some("rate_limit_exceeded"),
        });
    }
    struct Waiting<'a>(&'a AtomicUsize);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _w = Waiting(&s.waiting);
    s.slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal("the server is shutting down"))
}

async fn handle(
    s: Arc<OpenAi>,
    headers: HeaderMap,
    body: axum::body::Bytes,
    kind: Kind,
) -> Response {
    let started = Instant::now();
    let route = kind.route();
    if let Err(e) = s.check_key(&headers) {
        s.metrics.request(route, e.status.as_u16());
        return e.into_response();
    }
    // The model field is read once more here, only to let the node fetch a named adapter.
    let named = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["model"].as_str().map(str::to_owned));
    if let Some(model) = named
        && let Err(e) = s.fetch_named(&model).await
    {
        s.metrics.request(route, e.status.as_u16());
        return e.into_response();
    }
    let s2 = s.clone();
    let prepared = match tokio::task::spawn_blocking(move || prepare(&s2, &body, kind)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            s.metrics.request(route, e.status.as_u16());
            return e.into_response();
        }
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    let permit = match acquire(&s).await {
        Ok(p) => p,
        Err(e) => {
            s.metrics.request(route, e.status.as_u16());
            return e.into_response();
        }
    };
    let id = format!(
        "{}-{:016x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        rand::random::<u64>()
    );
    let created = now_secs();
    s.metrics.active.fetch_add(1, Ordering::Relaxed);
    if prepared.common.stream {
        stream_response(s, prepared, permit, kind, id, created, started)
    } else {
        whole_response(s, prepared, permit, kind, id, created, started).await
    }
}

// ---------------------------------------------------------------------------------------------
// Generation. A request's prompt runs on a blocking thread of its own (through the prefix
// cache), and its first token is sampled there; then the sequence joins its base model's decode
// loop, a thread that advances every running sequence of that base by one token per step with
// one batched forward pass ([`Engine::decode_batch`]: each weight matrix is read once per step
// for all of them, each sequence with its own adapter and keys and values). Sequences join
// between steps and leave when they end (continuous batching).

/// Where a generation's text goes; called from the thread that advances it.
trait Sink: Send {
    /// Whether the client is still there: a generation whose client left ends at the next step.
    fn alive(&self) -> bool;
    /// A final piece of text with its tokens; `Break` ends the generation.
    fn piece(&mut self, piece: Piece<'_>) -> ControlFlow<()>;
    /// The end: the generation, or why it failed.
    fn done(self: Box<Self>, out: Result<Generation, String>);
}

/// A sequence in its base model's decode loop.
struct Decoding {
    base: Arc<Base>,
    adapter: Option<Arc<AdapterWeights>>,
    seq: Sequence,
    cache: EngineCache,
    /// The token to run at the next step.
    next: u32,
    sink: Box<dyn Sink>,
}

impl Decoding {
    /// Hands out the text still held back and reports the end.
    fn finish(self) {
        let Decoding { seq, mut sink, .. } = self;
        let g = seq.finish(&mut |p| sink.piece(p));
        sink.done(Ok(g));
    }
}

/// Runs `p`'s prompt (on a blocking thread), samples its first token and hands the sequence to
/// its base model's decode loop; `sink` gets the text and the end.
fn start(p: &Prepared, metrics: &Metrics, mut sink: Box<dyn Sink>) {
    let base = &p.base;
    let context = base.engine.config().max_seq_len;
    let mut seq = match Sequence::new(&base.tokenizer, &p.prompt, &p.common.params, context) {
        Ok(s) => s,
        Err(e) => return sink.done(Err(e.to_string())),
    };
    let mut lm = PrefixLm {
        base,
        adapter: p.adapter.as_ref().map(|(_, a)| &**a),
        adapter_key: p.adapter.as_ref().map_or("", |(k, _)| k.as_str()),
        cache: EngineCache::new(),
        reused: 0,
    };
    let logits = lm.feed(&p.prompt);
    metrics
        .prefix_tokens
        .fetch_add(lm.reused as u64, Ordering::Relaxed);
    let mut logits = match logits {
        Ok(l) => l,
        Err(e) => return sink.done(Err(GenerateError::from(e).to_string())),
    };
    if !sink.alive() {
        seq.cancel();
    }
    let next = seq.step(&base.tokenizer, &mut logits, lm.position(), &mut |piece| {
        sink.piece(piece)
    });
    let d = Decoding {
        base: base.clone(),
        adapter: p.adapter.as_ref().map(|(_, a)| a.clone()),
        seq,
        cache: lm.cache,
        next: next.unwrap_or_default(),
        sink,
    };
    match next {
        Some(_) => base.decode(d),
        None => d.finish(),
    }
}

impl Base {
    /// Adds a sequence to this model's decode loop, started on first use (and again if it has
    /// stopped).
    fn decode(&self, d: Decoding) {
        let mut loop_tx = self.decoder.lock().unwrap_or_else(|p| p.into_inner());
        let mut d = d;
        for _ in 0..2 {
            let tx = match loop_tx.as_ref() {
                Some(tx) => tx.clone(),
                None => {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let spawned = std::thread::Builder::new()
                        .name("cohort-decode".into())
                        .spawn(move || decode_loop(rx));
                    if let Err(e) = spawned {
                        return d.sink.done(Err(format!("starting the decode loop: {e}")));
                    }
                    loop_tx.insert(tx).clone()
                }
            };
            match tx.send(d) {
                Ok(()) => return,
                // The loop is gone (it can only have panicked outside a step): a new one.
                Err(std::sync::mpsc::SendError(back)) => {
                    d = back;
                    *loop_tx = None;
                }
            }
        }
        d.sink.done(Err("the decode loop stopped".into()));
    }
}

/// A base model's decode loop: waits for sequences, then steps every running one at once until
/// none is left. Ends when the base is dropped (its sender with it).
fn decode_loop(rx: std::sync::mpsc::Receiver<Decoding>) {
    let mut active: Vec<Decoding> = Vec::new();
    loop {
        if active.is_empty() {
            match rx.recv() {
                Ok(d) => active.push(d),
                Err(_) => return,
            }
        }
        // New sequences join between steps.
        active.extend(rx.try_iter());
        // Those whose client left end here.
        let (gone, running): (Vec<Decoding>, Vec<Decoding>) =
            active.into_iter().partition(|d| !d.sink.alive());
        active = running;
        for mut d in gone {
            d.seq.cancel();
            d.finish();
        }
        if active.is_empty() {
            continue;
        }
        let stepped =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_step(&mut active)));
        let failed = match stepped {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("the decode step panicked".to_string()),
        };
        if let Some(e) = failed {
            tracing::error!(error = %e, sequences = active.len(), "decode step failed");
            for d in active.drain(..) {
                d.sink.done(Err(e.clone()));
            }
            continue;
        }
        let (ended, running): (Vec<Decoding>, Vec<Decoding>) =
            active.into_iter().partition(|d| d.seq.is_done());
        active = running;
        for d in ended {
            d.finish();
        }
    }
}

/// One step of every sequence in `active` (all of one base): one batched forward pass of their
/// next tokens, then each samples its next token and hands out its text (the sequences split
/// over the cores).
fn decode_step(active: &mut [Decoding]) -> Result<(), String> {
    let base = active[0].base.clone();
    let mut items: Vec<DecodeItem<'_>> = active
        .iter_mut()
        .map(|d| DecodeItem {
            token: d.next,
            cache: &mut d.cache,
            adapter: d.adapter.as_deref(),
        })
        .collect();
    let mut logits = base
        .engine
        .decode_batch(&mut items)
        .map_err(|e| GenerateError::from(e).to_string())?;
    drop(items);
    base.decode_steps.fetch_add(1, Ordering::Relaxed);
    base.decode_tokens
        .fetch_add(active.len() as u64, Ordering::Relaxed);
    let vocab = logits.len() / active.len();
    let one = |d: &mut Decoding, logits: &mut [f32]| {
        let Decoding {
            seq,
            cache,
            next,
            sink,
            ..
        } = d;
        if let Some(t) = seq.step(&base.tokenizer, logits, cache.len(), &mut |p| sink.piece(p)) {
            *next = t;
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(active.len());
    if threads <= 1 {
        for (d, l) in active.iter_mut().zip(logits.chunks_exact_mut(vocab)) {
            one(d, l);
        }
    } else {
        // Sampling a token costs about a millisecond (a sort of the vocabulary): spread.
        let per = active.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (ds, ls) in active.chunks_mut(per).zip(logits.chunks_mut(per * vocab)) {
                let one = &one;
                scope.spawn(move || {
                    for (d, l) in ds.iter_mut().zip(ls.chunks_exact_mut(vocab)) {
                        one(d, l);
                    }
                });
            }
        });
    }
    Ok(())
}

/// Counts a generation as running while it lives.
struct Running(Arc<OpenAi>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.metrics.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn usage(g: &Generation) -> Value {
    // Every sampled token counts, the end-of-turn token that stopped the answer included.
    let completion = g.tokens.len();
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": g.prompt_tokens + completion,
    })
}

fn token_logprob(tok: &Tokenizer, id: u32, logprob: f32) -> serde_json::Map<String, Value> {
    let bytes = tok.token_bytes(id);
    let mut m = serde_json::Map::new();
    m.insert(
        "token".into(),
        String::from_utf8_lossy(bytes).into_owned().into(),
    );
    m.insert("logprob".into(), json!(logprob));
    m.insert("bytes".into(), json!(bytes));
    m
}

fn logprobs_content(base: &Base, g: &Generation) -> Value {
    logprobs_of(base, g, 0..g.tokens.len())
}

/// OpenAI's `logprobs` object for the generated tokens `range` of `g`.
fn logprobs_of(base: &Base, g: &Generation, range: std::ops::Range<usize>) -> Value {
    let content: Vec<Value> = g.tokens[range.clone()]
        .iter()
        .zip(&g.logprobs[range.clone()])
        .zip(range)
        .map(|((&t, &lp), i)| {
            let mut m = token_logprob(&base.tokenizer, t, lp);
            let top: Vec<Value> = g
                .top_logprobs
                .get(i)
                .map(|alts| {
                    alts.iter()
                        .map(|&(a, alp)| Value::Object(token_logprob(&base.tokenizer, a, alp)))
                        .collect()
                })
                .unwrap_or_default();
            m.insert("top_logprobs".into(), Value::Array(top));
            Value::Object(m)
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// A whole answer's end, for the request that waits for it.
struct WholeSink {
    result: Option<oneshot::Sender<Result<Generation, String>>>,
    s: Arc<OpenAi>,
    _running: Running,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Sink for WholeSink {
    fn alive(&self) -> bool {
        // The receiver is dropped with the request's future when the client goes away.
        self.result.as_ref().is_some_and(|r| !r.is_closed())
    }

    fn piece(&mut self, _: Piece<'_>) -> ControlFlow<()> {
        if self.alive() {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    fn done(mut self: Box<Self>, out: Result<Generation, String>) {
        if matches!(&out, Ok(g) if g.finish == FinishReason::Cancelled) && !self.alive() {
            self.s.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(r) = self.result.take() {
            // Fails only when the request is gone: no one is left to answer.
            let _ = r.send(out);
        }
    }
}

async fn whole_response(
    s: Arc<OpenAi>,
    p: Prepared,
    permit: tokio::sync::OwnedSemaphorePermit,
    kind: Kind,
    id: String,
    created: u64,
    started: Instant,
) -> Response {
    // The receiver is dropped with this future when the client goes away: the generation sees
    // it and stops.
    let (tx, rx) = oneshot::channel();
    let sink = Box::new(WholeSink {
        result: Some(tx),
        s: s.clone(),
        _running: Running(s.clone()),
        _permit: permit,
    });
    let s2 = s.clone();
    let p = match tokio::task::spawn_blocking(move || {
        start(&p, &s2.metrics, sink);
        p
    })
    .await
    {
        Ok(p) => p,
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    let out = rx
        .await
        .unwrap_or_else(|_| Err("the generation stopped without an answer".into()));
    let g = match out {
        Ok(g) => g,
        Err(e) => {
            s.metrics.request(kind.route(), 500);
            return ApiError::internal(e).into_response();
        }
    };
    s.metrics.finish(kind.route(), &g, started, None);
    let choice = match kind {
        Kind::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": g.text, "refusal": null },
            "logprobs": if p.logprobs { logprobs_content(&p.base, &g) } else { Value::Null },
            "finish_reason": finish_reason(g.finish),
        }),
        Kind::Text => json!({
            "index": 0,
            "text": g.text,
            "logprobs": null,
            "finish_reason": finish_reason(g.finish),
        }),
    };
    Json(json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": p.common.model,
        "system_fingerprint": format!("cohort-{}", &p.base.hash[..12]),
        "choices": [choice],
        "usage": usage(&g),
    }))
    .into_response()
}

/// The events of one streamed answer.
struct Chunks {
    id: String,
    kind: Kind,
    created: u64,
    model: String,
    fingerprint: String,
}

impl Chunks {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Event {
        let mut v = json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    }

    fn piece(&self, text: &str, finish: Option<&str>, logprobs: Value) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = if finish.is_some() {
                    json!({})
                } else {
                    json!({ "content": text })
                };
                json!([{ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish }])
            }
            Kind::Text => {
                json!([{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }])
            }
        }
    }
}

/// A streamed answer: each piece goes out as a chunk as soon as it is final.
struct StreamSink {
    s: Arc<OpenAi>,
    base: Arc<Base>,
    chunks: Chunks,
    /// Unbounded, so that the decode loop never waits for a slow client; an answer's events
    /// are bounded by its `max_tokens`.
    tx: mpsc::UnboundedSender<Event>,
    logprobs: bool,
    include_usage: bool,
    started: Instant,
    first_token: Option<f64>,
    /// Tokens whose log-probabilities went out with a piece; the rest go with the last chunk.
    sent: usize,
    _running: Running,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Sink for StreamSink {
    fn alive(&self) -> bool {
        // The receiver is the response body: closed when the client goes away.
        !self.tx.is_closed()
    }

    fn piece(&mut self, part: Piece<'_>) -> ControlFlow<()> {
        let started = self.started;
        self.first_token
            .get_or_insert_with(|| started.elapsed().as_secs_f64());
        let logprobs = if self.logprobs {
            self.sent = part.tokens.end;
            logprobs_of(&self.base, part.generation, part.tokens)
        } else {
            Value::Null
        };
        let ev = self.chunks.chunk(
            self.chunks.piece(part.text, None, logprobs),
            self.include_usage.then_some(Value::Null),
        );
        match self.tx.send(ev) {
            Ok(()) => ControlFlow::Continue(()),
            // The client is gone.
            Err(_) => ControlFlow::Break(()),
        }
    }

    // Every `send` below whose result is dropped can only fail because the client has gone:
    // there is no one left to tell, so it is ignored.
    fn done(self: Box<Self>, out: Result<Generation, String>) {
        let route = self.chunks.kind.route();
        let usage_field = self.include_usage.then_some(Value::Null);
        match out {
            Ok(g) if g.finish == FinishReason::Cancelled && self.tx.is_closed() => {
                self.s.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                self.s
                    .metrics
                    .finish(route, &g, self.started, self.first_token);
            }
            Ok(g) => {
                self.s
                    .metrics
                    .finish(route, &g, self.started, self.first_token);
                let logprobs = if self.logprobs {
                    logprobs_of(
                        &self.base,
                        &g,
                        self.sent.min(g.tokens.len())..g.tokens.len(),
                    )
                } else {
                    Value::Null
                };
                let _ = self.tx.send(
                    self.chunks.chunk(
                        self.chunks
                            .piece("", Some(finish_reason(g.finish)), logprobs),
                        usage_field,
                    ),
                );
                if self.include_usage {
                    let _ = self.tx.send(self.chunks.chunk(json!([]), Some(usage(&g))));
                }
                let _ = self.tx.send(Event::default().data("[DONE]"));
            }
            Err(e) => {
                self.s.metrics.request(route, 500);
                let err = json!({ "error": { "message": e, "type": "server_error", "param": null, "code": null } });
                let _ = self.tx.send(Event::default().data(err.to_string()));
                let _ = self.tx.send(Event::default().data("[DONE]"));
            }
        }
    }
}

fn stream_response(
    s: Arc<OpenAi>,
    p: Prepared,
    permit: tokio::sync::OwnedSemaphorePermit,
    kind: Kind,
    id: String,
    created: u64,
    started: Instant,
) -> Response {
    // Unbounded so that a slow client never stalls the shared decode batch; what it holds is
    // bounded by the request's max_tokens (one event per piece, plus the closing three).
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let chunks = Chunks {
        id,
        kind,
        created,
        model: p.common.model.clone(),
        fingerprint: format!("cohort-{}", &p.base.hash[..12]),
    };
    let include_usage = p.common.include_usage;
    if kind == Kind::Chat {
        let opening = json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]);
        // Fails only when the client is gone (the generation then sees it and stops).
        let _ = tx.send(chunks.chunk(opening, include_usage.then_some(Value::Null)));
    }
    let sink = Box::new(StreamSink {
        s: s.clone(),
        base: p.base.clone(),
        chunks,
        tx,
        logprobs: p.logprobs,
        include_usage,
        started,
        first_token: None,
        sent: 0,
        _running: Running(s.clone()),
        _permit: permit,
    });
    tokio::task::spawn_blocking(move || start(&p, &s.metrics, sink));
    let events = n0_future::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| (Ok::<Event, Infallible>(ev), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Metrics.

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, x: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if x <= b {
                *c += 1;
            }
        }
        self.sum += x;
        self.count += 1;
    }

    fn render(&self, name: &str, labels: &str, out: &mut String) {
        use std::fmt::Write as _;
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Metrics {
    /// (route, status) -> requests.
    requests: Mutex<HashMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Prompt tokens whose keys and values came from the prefix cache.
    prefix_tokens: AtomicU64,
    /// route -> request latency.
    latency: Mutex<HashMap<&'static str, Histogram>>,
    first_token: Mutex<Histogram>,
    active: AtomicUsize,
    cancelled: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_evictions: AtomicU64,
}

impl Metrics {
    fn request(&self, route: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route, status))
            .or_default() += 1;
    }

    fn finish(&self, route: &'static str, g: &Generation, started: Instant, first: Option<f64>) {
        self.request(route, 200);
        self.prompt_tokens
            .fetch_add(g.prompt_tokens as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(g.tokens.len() as u64, Ordering::Relaxed);
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route)
            .or_default()
            .observe(started.elapsed().as_secs_f64());
        if let Some(t) = first {
            self.first_token
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(t);
        }
    }
}

async fn metrics(State(s): State<Arc<OpenAi>>) -> Response {
    use std::fmt::Write as _;
    let m = &s.metrics;
    let (decode_steps, decode_tokens) = s.lock_bases().values().fold((0, 0), |(st, t), b| {
        (
            st + b.decode_steps.load(Ordering::Relaxed),
            t + b.decode_tokens.load(Ordering::Relaxed),
        )
    });
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP cohort_requests_total Requests answered, by route and HTTP status."
    );
    let _ = writeln!(out, "# TYPE cohort_requests_total counter");
    let mut requests: Vec<_> = m
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect();
    requests.sort();
    for ((route, status), n) in requests {
        let _ = writeln!(
            out,
            "cohort_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
        );
    }
    for (name, help, v) in [
        (
            "cohort_prompt_tokens_total",
            "Prompt tokens processed.",
            m.prompt_tokens.load(Ordering::Relaxed),
        ),
        (
            "cohort_completion_tokens_total",
            "Tokens generated.",
            m.completion_tokens.load(Ordering::Relaxed),
        ),
        (
            "cohort_prefix_cache_tokens_total",
            "Prompt tokens taken from the prefix cache instead of computed.",
            m.prefix_tokens.load(Ordering::Relaxed),
        ),
        (
            "cohort_decode_steps_total",
            "Batched decode steps (one forward pass for every running generation of a model).",
            decode_steps,
        ),
        (
            "cohort_decode_tokens_total",
            "Tokens decoded by those steps (divided by the steps: the mean batch).",
            decode_tokens,
        ),
        (
            "cohort_cancelled_total",
            "Generations stopped because the client went away.",
            m.cancelled.load(Ordering::Relaxed),
        ),
        (
            "cohort_adapter_cache_hits_total",
            "Adapter lookups answered from the cache.",
            m.cache_hits.load(Ordering::Relaxed),
        ),
        (
            "cohort_adapter_cache_misses_total",
            "Adapter lookups that loaded the adapter.",
            m.cache_misses.load(Ordering::Relaxed),
        ),
        (
            "cohort_adapter_cache_evictions_total",
            "Adapters dropped from the cache to keep its budget.",
            m.cache_evictions.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    let adapters = s.lock_adapters();
    for (name, help, v) in [
        (
            "cohort_active_generations",
            "Generations running now.",
            m.active.load(Ordering::Relaxed) as u64,
        ),
        (
            "cohort_queue_depth",
            "Requests waiting for a generation slot.",
            s.waiting.load(Ordering::Relaxed) as u64,
        ),
        (
            "cohort_adapters_cached",
            "Adapters in the cache.",
            adapters.len() as u64,
        ),
        (
            "cohort_adapter_cache_bytes",
            "Bytes of adapter weights in the cache.",
            adapters.values().map(|c| c.bytes as u64).sum(),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    drop(adapters);
    let _ = writeln!(
        out,
        "# HELP cohort_request_duration_seconds Time to answer a generation request."
    );
    let _ = writeln!(out, "# TYPE cohort_request_duration_seconds histogram");
    for (route, h) in m.latency.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        h.render(
            "cohort_request_duration_seconds",
            &format!("route=\"{route}\""),
            &mut out,
        );
    }
    let _ = writeln!(
        out,
        "# HELP cohort_time_to_first_token_seconds Time from request to the first streamed text."
    );
    let _ = writeln!(out, "# TYPE cohort_time_to_first_token_seconds histogram");
    m.first_token
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .render("cohort_time_to_first_token_seconds", "", &mut out);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Where `cohort serve` writes its address once listening.
pub fn serve_file(dir: &Path) -> PathBuf {
    dir.join("serve.json")
}
