//! The node's JSON API on 127.0.0.1 (axum), and the gui-lite dashboard at `/`.
//!
//! Everything the CLI does goes through these routes when a node runs, so the terminal and the
//! dashboard never disagree. `GET` routes are open to local callers; every change (`POST`)
//! needs `Authorization: Bearer TOKEN` with the token from the data directory's `api.token`.
//! Paths in request bodies (`files`) are read by the node itself: the API serves the local
//! machine only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cohort_protocol::types::rpc::{RequestBody, Response as RpcResponse};
use cohort_protocol::types::{
    AccessPolicy, AnnouncementBody, RecordSchema, ShardInfo, ShardSubmission, Verdict,
};
use cohort_protocol::{ContentHash, PeerId, Signed};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::import::{DEFAULT_SHARD_BYTES, ImportError, default_token_counter, import_files};
use crate::node::Node;
use crate::state::{DatanetRecord, StateError, StateGone, SubmissionStatus, now};

type AppState = Arc<Node>;

/// The API's routes with the dashboard merged in.
pub fn app(node: Arc<Node>) -> Router {
    let source: Arc<dyn crate::openai::AdapterSource> =
        Arc::new(crate::rounds::NodeAdapters(Arc::downgrade(&node)));
    Router::new()
        .route("/api/status", get(status))
        .route("/api/datanets", get(list).post(create))
        .route("/api/datanets/{name}", get(show))
        .route(
            "/api/datanets/{name}/add",
            post(add).layer(DefaultBodyLimit::max(UPLOAD_LIMIT)),
        )
        .route("/api/datanets/{name}/publish", post(publish))
        .route("/api/datanets/{name}/fetch", post(fetch))
        .route(
            "/api/datanets/{name}/contribute",
            post(contribute).layer(DefaultBodyLimit::max(UPLOAD_LIMIT)),
        )
        .route("/api/submissions", get(submissions))
        .route("/api/submissions/{id}/approve", post(approve))
        .route("/api/submissions/{id}/reject", post(reject))
        .route("/api/datanets/{name}/records", get(records))
        .route("/api/datanets/{name}/grant", post(grant))
        .route("/api/datanets/{name}/revoke", post(revoke))
        .route("/api/sync", post(sync_now))
        .route("/api/jobs", get(list_jobs).post(create_job))
        .route("/api/jobs/{job}", get(show_job))
        .route("/api/jobs/{job}/events", get(job_events))
        .route("/api/models", get(models))
        .route("/api/jobs/{job}/cancel", post(cancel_job))
        .route("/api/volunteer", get(volunteer_get).post(volunteer_set))
        .route("/api/ledger", get(ledger_show))
        .route("/api/ledger/verify", post(ledger_verify))
        .route("/api/blobs/{hash}/fetch", post(fetch_blob))
        .route("/api/dht/providers/{hash}", get(dht_providers))
        .route("/api/dht/peers/{peer}", get(dht_resolve))
        .merge(cohort_gui_lite::router())
        .with_state(node)
        // The OpenAI-compatible API; models load on the first request that names them.
        .merge(crate::openai::router(crate::openai::OpenAi::with_source(
            crate::openai::ServeOptions::default(),
            Some(source),
        )))
}

/// An error answer: a status and a message for the user; internals go to the log.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::UnknownDatanet(_) => Self::new(StatusCode::NOT_FOUND, e.to_string()),
            StateError::AmbiguousDatanet(_) | StateError::Invalid(_) => Self::bad(e.to_string()),
            StateError::NotOwner(_) => Self::new(StatusCode::FORBIDDEN, e.to_string()),
            StateError::Nothing(_) => Self::new(StatusCode::CONFLICT, e.to_string()),
            other => {
                tracing::error!("{other}");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error: see the node's log",
                )
            }
        }
    }
}

impl From<StateGone> for ApiError {
    fn from(e: StateGone) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl From<ImportError> for ApiError {
    fn from(e: ImportError) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// A request that carried the bearer token.
#[derive(Debug)]
pub struct Authorized;

impl FromRequestParts<AppState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &AppState) -> Result<Self, ApiError> {
        let given = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if constant_time_eq(t.as_bytes(), node.token.as_bytes()) => Ok(Authorized),
            _ => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "changes need `Authorization: Bearer TOKEN` (the token is in the data \
                 directory's api.token)",
            )),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn status(State(node): State<AppState>) -> ApiResult {
    let dht = match node.dht.handle().stats().await {
        Ok(s) => json!(s),
        Err(e) => json!({ "error": e.to_string() }),
    };
    let (rejected, datanets) = node
        .state
        .call(|s| {
            let rejected: serde_json::Map<String, Value> = s
                .rejections()
                .iter()
                .map(|(p, counts)| (p.to_string(), json!(counts)))
                .collect();
            (rejected, s.datanets().map(|d| d.len()).unwrap_or(0))
        })
        .await?;
    let total: u64 = rejected
        .values()
        .filter_map(|v| v.as_object())
        .flat_map(|o| o.values().filter_map(|n| n.as_u64()))
        .sum();
    Ok(Json(json!({
        "peer_id": node.me().to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "data_dir": node.data_dir.root().display().to_string(),
        "uptime_s": node.started.elapsed().as_secs(),
        "http": node.http.to_string(),
        "addrs": node.endpoint.bound_sockets(),
        "neighbours": node.neighbour_peers().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "known_peers": node.known_peers().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "datanets": datanets,
        "indexed_hashes": node.index.len(),
        "dht": dht,
        "rejected": rejected,
        "rejected_total": total,
        "traffic": traffic(&node),
    })))
}

/// Bytes this node's iroh endpoint sent and received since it started (UDP payloads: gossip,
/// blobs and cohort/1 alike; the DHT's TCP traffic is not included).
fn traffic(node: &Node) -> Value {
    let m = &node.endpoint.metrics().socket;
    json!({
        "sent_bytes": m.send_ipv4.get() + m.send_ipv6.get() + m.send_relay.get(),
        "received_bytes": m.recv_data_ipv4.get() + m.recv_data_ipv6.get()
            + m.recv_data_relay.get() + m.recv_data_custom.get(),
    })
}

fn schema_name(s: RecordSchema) -> &'static str {
    match s {
        RecordSchema::Chat => "chat",
        RecordSchema::Alpaca => "alpaca",
    }
}

fn summary(d: &DatanetRecord, me: PeerId) -> Value {
    json!({
        "id": d.id.to_string(),
        "name": d.name,
        "owner": d.owner.to_string(),
        "mine": d.owner == me,
        "description": d.description,
        "license": d.license,
        "schema": schema_name(d.schema),
        "access": match &d.access { AccessPolicy::Public => "public", AccessPolicy::Allowlist { .. } => "allowlist" },
        "version": d.head.map_or(0, |h| h.version),
        "manifest": d.head.map(|h| h.manifest.to_string()),
        "grantees": match &d.access {
            AccessPolicy::Public => None,
            AccessPolicy::Allowlist { grantees, .. } => {
                Some(grantees.iter().map(|g| g.to_string()).collect::<Vec<_>>())
            }
        },
        "key_epoch": match &d.access {
            AccessPolicy::Public => None,
            AccessPolicy::Allowlist { key_epoch, .. } => Some(*key_epoch),
        },
    })
}

async fn list(State(node): State<AppState>) -> ApiResult {
    let me = node.me();
    let all = node.state.call(|s| s.datanets()).await??;
    Ok(Json(json!({
        "datanets": all.iter().map(|d| summary(d, me)).collect::<Vec<_>>()
    })))
}

fn shard_json(info: &ShardInfo, contributor: Option<PeerId>, local: bool) -> Value {
    json!({
        "hash": info.hash.to_string(),
        "bytes": info.bytes,
        "records": info.records,
        "tokens": info.tokens,
        "contributor": contributor.map(|c| c.to_string()),
        "local": local,
    })
}

async fn show(State(node): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let me = node.me();
    let (d, manifest, pending, held, versions) = node
        .state
        .call(move |s| -> Result<_, StateError> {
            let d = s.resolve(&name)?;
            let manifest = match d.head {
                Some(h) => s.manifest(&h.manifest)?,
                None => None,
            };
            let pending = s.pending(&d.id)?;
            // Every earlier version this node holds, newest first, following `previous`.
            let mut versions = Vec::new();
            let mut next = d.head.map(|h| h.manifest);
            while let Some(hash) = next {
                let Some(m) = s.manifest(&hash)?.and_then(|m| m.verify().ok()) else {
                    break;
                };
                versions.push(json!({
                    "version": m.version,
                    "manifest": hash.to_string(),
                    "shards": m.shards.len(),
                    "records": m.records(),
                    "published_at_ms": m.published_at.0,
                }));
                next = m.previous;
            }
            let held: Vec<ContentHash> = s
                .local_shards()?
                .into_iter()
                .filter(|l| l.datanet == d.id)
                .map(|l| l.info.hash)
                .collect();
            Ok((d, manifest, pending, held, versions))
        })
        .await??;
    let mut out = summary(&d, me);
    out["versions"] = json!(versions);
    let m = manifest.as_ref().and_then(|m| m.verify().ok());
    // A shard counts as local only if the blob store really has it complete.
    let mut shards = Vec::new();
    if let Some(m) = &m {
        for s in &m.shards {
            let local = held.contains(&s.info.hash)
                && node
                    .blobs
                    .has(iroh_blobs::Hash::from_bytes(*s.info.hash.as_bytes()))
                    .await
                    .unwrap_or(false);
            shards.push(shard_json(&s.info, Some(s.contributor), local));
        }
        out["previous"] = json!(m.previous.map(|p| p.to_string()));
        out["records"] = json!(m.records());
        out["tokens"] = json!(m.tokens());
        out["published_at_ms"] = json!(m.published_at.0);
    }
    let mut pend = Vec::new();
    for s in &pending {
        let local = node
            .blobs
            .has(iroh_blobs::Hash::from_bytes(*s.info.hash.as_bytes()))
            .await
            .unwrap_or(false);
        pend.push(shard_json(&s.info, Some(s.contributor), local));
    }
    out["shards"] = json!(shards);
    out["pending"] = json!(pend);
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
struct CreateBody {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    license: String,
    schema: String,
    #[serde(default = "default_access")]
    access: String,
}

fn default_access() -> String {
    "public".into()
}

async fn create(
    _auth: Authorized,
    State(node): State<AppState>,
    Json(body): Json<CreateBody>,
) -> ApiResult {
    let schema = match body.schema.as_str() {
        "chat" => RecordSchema::Chat,
        "alpaca" => RecordSchema::Alpaca,
        other => {
            return Err(ApiError::bad(format!(
                "schema `{other}`: use chat or alpaca"
            )));
        }
    };
    let access = match body.access.as_str() {
        "public" => AccessPolicy::Public,
        "allowlist" => AccessPolicy::Allowlist {
            grantees: Vec::new(),
            key_epoch: 0,
        },
        other => {
            return Err(ApiError::bad(format!(
                "access `{other}`: use public or allowlist"
            )));
        }
    };
    let me = node.me();
    let d = node
        .state
        .call(move |s| {
            s.create_datanet(
                me,
                body.name,
                body.description,
                body.license,
                schema,
                access,
            )
        })
        .await??;
    Ok(Json(summary(&d, me)))
}

#[derive(Debug, Deserialize)]
struct FilesBody {
    /// Files on this node's disk.
    #[serde(default)]
    files: Vec<PathBuf>,
    /// Files sent in the request (the dashboard's drag and drop).
    #[serde(default)]
    uploads: Vec<Upload>,
    #[serde(default)]
    note: String,
    /// Largest shard in bytes (tests and benchmarks); default 16 MiB.
    #[serde(default)]
    shard_bytes: Option<usize>,
}

/// The largest request body of the routes that take uploads.
const UPLOAD_LIMIT: usize = 64 << 20;

/// A file sent in a request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Upload {
    /// Its name on the sender's machine (errors name it).
    name: String,
    /// Its text.
    content: String,
}

/// Uploaded files written under the data directory for the importer, removed when dropped.
struct Uploads {
    dir: Option<PathBuf>,
    paths: Vec<PathBuf>,
}

impl Uploads {
    fn write(node: &Node, uploads: &[Upload]) -> Result<Self, ApiError> {
        if uploads.is_empty() {
            return Ok(Self {
                dir: None,
                paths: Vec::new(),
            });
        }
        let internal = |e: std::io::Error| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing uploads: {e}"),
            )
        };
        let dir = node
            .data_dir
            .root()
            .join("uploads")
            .join(hex::encode(rand::random::<[u8; 8]>()));
        std::fs::create_dir_all(&dir).map_err(internal)?;
        let mut out = Self {
            dir: Some(dir.clone()),
            paths: Vec::new(),
        };
        for (i, u) in uploads.iter().enumerate() {
            // Only the last path component, and nothing hidden: the name is the sender's.
            let name: String = u
                .name
                .rsplit(['/', '\\'])
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_control())
                .collect();
            let name = name.trim_start_matches('.');
            if name.is_empty() {
                return Err(ApiError::bad(format!("uploads[{i}].name: empty")));
            }
            // One directory per upload keeps two files of the same name apart.
            let path = dir.join(i.to_string()).join(name);
            std::fs::create_dir_all(dir.join(i.to_string())).map_err(internal)?;
            std::fs::write(&path, &u.content).map_err(internal)?;
            out.paths.push(path);
        }
        Ok(out)
    }

    /// An import error, naming uploads by their own names rather than where they were written.
    fn explain(&self, e: ImportError) -> ApiError {
        let mut message = e.to_string();
        if let Some(dir) = &self.dir {
            for (i, p) in self.paths.iter().enumerate() {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                message = message.replace(&p.display().to_string(), &name);
                message = message.replace(&dir.join(i.to_string()).display().to_string(), "");
            }
        }
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            std::fs::remove_dir_all(dir).ok();
        }
    }
}

/// Validates and imports files into blobs (synced to disk); returns each new shard's info and
/// record hashes. Nothing is recorded in the metadata store yet.
async fn import_into_blobs(
    node: &Node,
    d: &DatanetRecord,
    body: &FilesBody,
    dedup_against_store: bool,
    encrypt: Option<(crate::crypto::DatanetKey, u32)>,
) -> Result<(Vec<(ShardInfo, Vec<ContentHash>)>, u64, u64), ApiError> {
    if body.files.is_empty() && body.uploads.is_empty() {
        return Err(ApiError::bad("no files given"));
    }
    let reader = node.state.call(|s| s.reader()).await?;
    let uploads = Uploads::write(node, &body.uploads)?;
    let mut files = body.files.clone();
    files.extend(uploads.paths.iter().cloned());
    let schema = d.schema;
    let id = d.id;
    let max = body.shard_bytes.unwrap_or(DEFAULT_SHARD_BYTES).max(1024);
    let imported = tokio::task::spawn_blocking(move || {
        import_files(&files, schema, default_token_counter(), max, &|h| {
            dedup_against_store && crate::state::has_record(&reader, &id, h).unwrap_or(false)
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| uploads.explain(e))?;
    drop(uploads);
    let mut out = Vec::new();
    for shard in imported.shards {
        let blob = match &encrypt {
            Some((key, epoch)) => crate::crypto::encrypt_shard(key, &id, *epoch, &shard.bytes),
            None => shard.bytes,
        };
        let bytes = blob.len() as u64;
        let tag = node.blobs.add_bytes(blob).await.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("blob store: {e}"),
            )
        })?;
        out.push((
            ShardInfo {
                hash: ContentHash::from_bytes(*tag.hash.as_bytes()),
                bytes,
                records: shard.records,
                tokens: shard.tokens,
            },
            shard.record_hashes,
        ));
    }
    // The shards are recorded only once the blob store has them on disk.
    node.blobs.sync_db().await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("blob store: {e}"),
        )
    })?;
    Ok((out, imported.records_read, imported.duplicates))
}

async fn add(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<FilesBody>,
) -> ApiResult {
    let me = node.me();
    let n2 = name.clone();
    let d = node.state.call(move |s| s.resolve(&n2)).await??;
    if d.owner != me {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "datanet `{name}` belongs to {}: use `cohort datanet contribute`",
                d.owner
            ),
        ));
    }
    let (epoch, encrypt) = match &d.access {
        AccessPolicy::Public => (None, None),
        AccessPolicy::Allowlist { key_epoch, .. } => {
            let (id, e) = (d.id, *key_epoch);
            let key = node
                .state
                .call(move |s| s.datanet_key(&id, e))
                .await??
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("the key of epoch {e} is missing from the store"),
                    )
                })?;
            (Some(e), Some((key, e)))
        }
    };
    let (shards, read, duplicates) = import_into_blobs(&node, &d, &body, true, encrypt).await?;
    let id = d.id;
    let infos: Vec<_> = shards.iter().map(|(i, _)| *i).collect();
    node.state
        .call(move |s| s.commit_shards(&id, me, epoch, &shards))
        .await??;
    let hashes: Vec<_> = infos.iter().map(|i| i.hash).collect();
    node.provide_own(&hashes).await;
    Ok(Json(json!({
        "datanet": d.id.to_string(),
        "records_read": read,
        "duplicates": duplicates,
        "shards": infos.iter().map(|i| shard_json(i, Some(me), true)).collect::<Vec<_>>(),
    })))
}

async fn publish(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult {
    let kp = node.keypair.clone();
    let signed = node.state.call(move |s| s.publish(&kp, &name)).await??;
    let m = signed
        .verify()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let hash = signed.hash();
    let announced = node
        .announce(AnnouncementBody::Manifest {
            datanet: m.datanet,
            version: m.version,
            manifest: hash,
        })
        .await;
    if let Err(e) = &announced {
        tracing::warn!("announcing manifest {hash}: {e}");
    }
    Ok(Json(json!({
        "datanet": m.datanet.to_string(),
        "version": m.version,
        "manifest": hash.to_string(),
        "shards": m.shards.len(),
        "records": m.records(),
        "tokens": m.tokens(),
        "announced": announced.is_ok(),
    })))
}

async fn fetch(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult {
    let (d, manifest) = node
        .state
        .call(move |s| -> Result<_, StateError> {
            let d = s.resolve(&name)?;
            let m = match d.head {
                Some(h) => s.manifest(&h.manifest)?,
                None => None,
            };
            Ok((d, m))
        })
        .await??;
    let Some(manifest) = manifest else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("datanet `{}` has no published version yet", d.name),
        ));
    };
    let m = manifest
        .verify()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !matches!(m.access, AccessPolicy::Public) && d.owner != node.me() {
        node.fetch_grants(d.id, d.owner)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e))?;
    }
    let infos: Vec<_> = m.shards.iter().map(|s| s.info).collect();
    let report = node
        .fetch_shards(d.id, d.owner, &infos)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e))?;
    Ok(Json(json!({
        "datanet": d.id.to_string(),
        "version": m.version,
        "report": report,
    })))
}

async fn contribute(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<FilesBody>,
) -> ApiResult {
    let me = node.me();
    let d = node.state.call(move |s| s.resolve(&name)).await??;
    if d.owner == me {
        return Err(ApiError::bad(format!(
            "you own `{}`: use `cohort datanet add`",
            d.name
        )));
    }
    let (shards, read, duplicates) = import_into_blobs(&node, &d, &body, false, None).await?;
    let id = d.id;
    let infos: Vec<_> = shards.iter().map(|(i, _)| *i).collect();
    let recorded = infos.clone();
    node.state
        .call(move |s| s.record_local_shards(&id, &recorded))
        .await??;
    node.provide_local().await;
    let mut sent = Vec::new();
    for info in &infos {
        let submission = Signed::sign(
            &node.keypair,
            &ShardSubmission {
                datanet: d.id,
                base_version: d.head.map_or(0, |h| h.version),
                shard: *info,
                note: body.note.clone(),
                submitted_at: now(),
            },
        );
        let hash = submission.hash();
        let sent_copy = submission.clone();
        node.state
            .call(move |s| s.record_sent_submission(&sent_copy))
            .await??;
        let response = node
            .call(d.owner, RequestBody::Submit { submission })
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
        match response {
            RpcResponse::Accepted => sent.push(hash.to_string()),
            RpcResponse::Refused { reason } => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the owner refused the submission: {reason}"),
                ));
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("unexpected answer from the owner: {other:?}"),
                ));
            }
        }
    }
    Ok(Json(json!({
        "datanet": d.id.to_string(),
        "records_read": read,
        "duplicates": duplicates,
        "submissions": sent,
    })))
}

async fn submissions(State(node): State<AppState>) -> ApiResult {
    let all = node.state.call(|s| s.submissions()).await??;
    let list: Vec<Value> = all
        .iter()
        .filter_map(|(hash, r)| {
            let s = r.signed.verify().ok()?;
            Some(json!({
                "id": hash.to_string(),
                "datanet": s.datanet.to_string(),
                "contributor": r.signed.signer().to_string(),
                "shard": shard_json(&s.shard, Some(r.signed.signer()), false),
                "note": s.note,
                "status": r.status,
            }))
        })
        .collect();
    Ok(Json(json!({ "submissions": list })))
}

async fn approve(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult {
    let i2 = id.clone();
    let (hash, record) = node.state.call(move |s| s.submission(&i2)).await??;
    if record.status != SubmissionStatus::Pending {
        return Err(ApiError::bad(format!(
            "submission {hash} was already decided"
        )));
    }
    let s = record
        .signed
        .verify()
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let contributor = record.signed.signer();
    // The owner takes a copy of the shard before it enters a version: it provides every shard
    // of its manifests.
    let report = node
        .fetch_shards(s.datanet, contributor, &[s.shard])
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e))?;
    // A private datanet's owner encrypts the contributed shard under the current key.
    let d = node
        .state
        .call(move |st| st.datanet(&s.datanet))
        .await??
        .ok_or_else(|| ApiError::bad(format!("unknown datanet {}", s.datanet)))?;
    let stored = match d.access {
        AccessPolicy::Public => None,
        AccessPolicy::Allowlist { key_epoch, .. } => {
            let id = d.id;
            let key = node
                .state
                .call(move |st| st.datanet_key(&id, key_epoch))
                .await??
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the datanet key is missing",
                    )
                })?;
            let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e);
            let plain = node
                .blobs
                .get_bytes(iroh_blobs::Hash::from_bytes(*s.shard.hash.as_bytes()))
                .await
                .map_err(|e| internal(e.to_string()))?;
            let sealed = crate::crypto::encrypt_shard(&key, &id, key_epoch, &plain);
            let bytes = sealed.len() as u64;
            let tag = node
                .blobs
                .add_bytes(sealed)
                .await
                .map_err(|e| internal(e.to_string()))?;
            node.blobs
                .sync_db()
                .await
                .map_err(|e| internal(e.to_string()))?;
            Some((
                ShardInfo {
                    hash: ContentHash::from_bytes(*tag.hash.as_bytes()),
                    bytes,
                    records: s.shard.records,
                    tokens: s.shard.tokens,
                },
                key_epoch,
            ))
        }
    };
    let kp = node.keypair.clone();
    let record = node
        .state
        .call(move |st| st.decide(&kp, &id, Verdict::Approved { version: 0 }, stored))
        .await??;
    node.provide_local().await;
    let notified = notify_contributor(&node, &record).await;
    Ok(Json(json!({
        "id": hash.to_string(),
        "status": record.status,
        "fetched": report,
        "contributor_notified": notified,
    })))
}

/// Sends the signed decision to the contributor (best effort: the decision stands either way).
async fn notify_contributor(node: &Node, record: &crate::state::SubmissionRecord) -> bool {
    let Some(decision) = record.decision.clone() else {
        return false;
    };
    let contributor = record.signed.signer();
    match node
        .call(contributor, RequestBody::Decision { decision })
        .await
    {
        Ok(RpcResponse::Accepted) => true,
        Ok(other) => {
            tracing::warn!(
                "contributor {} refused the decision: {other:?}",
                contributor.short()
            );
            false
        }
        Err(e) => {
            tracing::warn!("sending the decision to {}: {e}", contributor.short());
            false
        }
    }
}

#[derive(Debug, Deserialize)]
struct RejectBody {
    reason: String,
}

async fn reject(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<RejectBody>,
) -> ApiResult {
    let kp = node.keypair.clone();
    let record = node
        .state
        .call(move |st| {
            st.decide(
                &kp,
                &id,
                Verdict::Rejected {
                    reason: body.reason,
                },
                None,
            )
        })
        .await??;
    let notified = notify_contributor(&node, &record).await;
    Ok(Json(
        json!({ "status": record.status, "contributor_notified": notified }),
    ))
}

async fn sync_now(_auth: Authorized, State(node): State<AppState>) -> ApiResult {
    let mut pulled = 0;
    let mut errors = Vec::new();
    for peer in node.known_peers() {
        match node.sync_with(peer).await {
            Ok(n) => pulled += n,
            Err(e) => errors.push(format!("{}: {e}", peer.short())),
        }
    }
    Ok(Json(json!({ "pulled": pulled, "errors": errors })))
}

fn parse_hash(s: &str) -> Result<ContentHash, ApiError> {
    s.parse()
        .map_err(|e| ApiError::bad(format!("hash `{s}`: {e}")))
}

#[derive(Debug, Deserialize)]
struct BlobFetchBody {
    /// Write the blob to this absolute path once fetched.
    #[serde(default)]
    out: Option<PathBuf>,
}

/// Fetches one blob by hash: gossip index first, DHT on a miss; says which answered.
async fn fetch_blob(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(hash): Path<String>,
    Json(body): Json<BlobFetchBody>,
) -> ApiResult {
    let hash = parse_hash(&hash)?;
    if let Some(out) = &body.out
        && !out.is_absolute()
    {
        return Err(ApiError::bad(format!(
            "out `{}` must be an absolute path (the node resolves it, not the CLI)",
            out.display()
        )));
    }
    let fetched = node
        .fetch_by_hash(hash)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("blob {hash}: {e}")))?;
    if let Some(out) = &body.out {
        node.blobs
            .export(iroh_blobs::Hash::from_bytes(*hash.as_bytes()), out)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("writing {}: {e}", out.display()),
                )
            })?;
    }
    Ok(Json(json!(fetched)))
}

/// Asks the DHT alone who provides a hash (with the lookup's latency and message count).
async fn dht_providers(State(node): State<AppState>, Path(hash): Path<String>) -> ApiResult {
    let hash = parse_hash(&hash)?;
    let lookup = node
        .dht
        .handle()
        .find_providers(hash)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(json!({
        "hash": hash.to_string(),
        "providers": lookup.providers.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "first_ms": lookup.first_ms,
        "first_messages": lookup.first_messages,
        "total_ms": lookup.total_ms,
        "messages": lookup.messages,
    })))
}

/// Asks the DHT for a peer's iroh addresses (its signed address record).
async fn dht_resolve(State(node): State<AppState>, Path(peer): Path<String>) -> ApiResult {
    let peer = parse_peer(&peer)?;
    let found = node
        .dht
        .handle()
        .resolve(peer)
        .await
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, e.to_string()))?;
    Ok(Json(json!({ "peer": peer.to_string(), "lookup": found })))
}

#[derive(Debug, Deserialize)]
struct PeerBody {
    peer: String,
}

fn parse_peer(s: &str) -> Result<PeerId, ApiError> {
    s.parse()
        .map_err(|e| ApiError::bad(format!("peer `{s}`: {e}")))
}

async fn grant(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<PeerBody>,
) -> ApiResult {
    let peer = parse_peer(&body.peer)?;
    let kp = node.keypair.clone();
    let grants = node
        .state
        .call(move |s| s.grant(&kp, &name, peer))
        .await??;
    Ok(Json(json!({
        "grantee": peer.to_string(),
        "key_epochs": grants.iter().filter_map(|g| g.verify().ok()).map(|g| g.key_epoch).collect::<Vec<_>>(),
        "note": "the grantee is in the allowlist from the next published version",
    })))
}

async fn revoke(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<PeerBody>,
) -> ApiResult {
    let peer = parse_peer(&body.peer)?;
    let kp = node.keypair.clone();
    let r = node
        .state
        .call(move |s| s.revoke(&kp, &name, peer))
        .await??;
    let r = r
        .verify()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(json!({
        "revoked": peer.to_string(),
        "new_key_epoch": r.new_key_epoch,
        "from_version": r.from_version,
    })))
}

#[derive(Debug, Deserialize)]
struct RecordsQuery {
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// The records of the latest version's shards held here, decrypted where private.
async fn records(
    State(node): State<AppState>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<RecordsQuery>,
) -> ApiResult {
    let (d, manifest) = node
        .state
        .call(move |s| -> Result<_, StateError> {
            let d = s.resolve(&name)?;
            let m = match d.head {
                Some(h) => s.manifest(&h.manifest)?,
                None => None,
            };
            Ok((d, m))
        })
        .await??;
    let Some(m) = manifest.and_then(|m| m.verify().ok()) else {
        return Err(ApiError::new(StatusCode::CONFLICT, "no published version"));
    };
    let mut out = Vec::new();
    let mut total = 0u64;
    for s in &m.shards {
        let hash = iroh_blobs::Hash::from_bytes(*s.info.hash.as_bytes());
        if !node.blobs.has(hash).await.unwrap_or(false) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "shard {} is not held here: fetch the datanet first",
                    s.info.hash
                ),
            ));
        }
        let blob = node
            .blobs
            .get_bytes(hash)
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let plain = match s.key_epoch {
            None => blob.to_vec(),
            Some(epoch) => {
                let id = d.id;
                let key = node
                    .state
                    .call(move |st| st.datanet_key(&id, epoch))
                    .await??
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::FORBIDDEN,
                            format!("no key for epoch {epoch} of `{}`: not granted", d.name),
                        )
                    })?;
                crate::crypto::decrypt_shard(&key, &d.id, epoch, &blob)
                    .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e.to_string()))?
            }
        };
        for line in String::from_utf8_lossy(&plain).lines() {
            total += 1;
            if out.len() < q.limit {
                out.push(serde_json::from_str::<Value>(line).unwrap_or(Value::Null));
            }
        }
    }
    Ok(Json(
        json!({ "version": m.version, "total": total, "records": out }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Jobs, volunteering and the ledger
// ---------------------------------------------------------------------------------------------

async fn create_job(
    _auth: Authorized,
    State(node): State<AppState>,
    body: Result<
        Json<crate::rounds::coordinate::CreateJob>,
        axum::extract::rejection::JsonRejection,
    >,
) -> ApiResult {
    let Json(req) = body.map_err(|e| ApiError::bad(e.body_text()))?;
    let job = crate::rounds::coordinate::create_job(&node, req)
        .await
        .map_err(ApiError::bad)?;
    Ok(Json(json!({ "job": job.to_string() })))
}

/// The job named by an id or a unique prefix of one, among those stored here.
async fn resolve_job(
    node: &Node,
    given: &str,
) -> Result<(cohort_protocol::types::JobId, crate::rounds::JobRecord), ApiError> {
    let all = node
        .state
        .call(|s| crate::rounds::jobs(s.store()))
        .await?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let given = given.to_ascii_lowercase();
    let mut hits = all
        .into_iter()
        .filter(|(j, _)| j.to_string().starts_with(&given));
    match (hits.next(), hits.next()) {
        (Some(one), None) if !given.is_empty() => Ok(one),
        (Some(_), Some(_)) => Err(ApiError::bad(format!("job prefix `{given}` is ambiguous"))),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job `{given}` here"),
        )),
    }
}

fn job_summary(
    job: &cohort_protocol::types::JobId,
    r: &crate::rounds::JobRecord,
    status: Option<crate::rounds::JobStatus>,
) -> Value {
    let spec = r.spec.verify().ok();
    let ends_in = status
        .as_ref()
        .and_then(|s| s.phase_deadline_ms)
        .map(|t| t.saturating_sub(now().0) as f64 / 1000.0);
    let mut status = json!(status);
    if let Some(o) = status.as_object_mut() {
        o.insert("phase_ends_in_s".into(), json!(ends_in));
    }
    json!({
        "job": job.to_string(),
        "owner": r.spec.signer().to_string(),
        "role": r.role,
        "finished": r.finished,
        "name": spec.as_ref().map(|s| s.name.clone()),
        "rounds": spec.as_ref().map(|s| s.rounds),
        "base_model": spec.as_ref().map(|s| s.base_model.to_string()),
        "created_at_ms": spec.as_ref().map(|s| s.created_at.0),
        "status": status,
    })
}

async fn list_jobs(State(node): State<AppState>) -> ApiResult {
    let all = node
        .state
        .call(|s| crate::rounds::jobs(s.store()))
        .await?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let jobs: Vec<Value> = all
        .iter()
        .map(|(j, r)| job_summary(j, r, node.rounds.status(j)))
        .collect();
    Ok(Json(json!({ "jobs": jobs })))
}

/// A job this peer takes no part in, known from a ledger entry: its spec, from its coordinator.
async fn remote_job(node: &Node, given: &str) -> Result<Value, ApiError> {
    let prefix = given.to_ascii_lowercase();
    let found = node
        .state
        .call(move |s| -> Result<_, crate::store::StoreError> {
            use crate::rounds::ledger;
            for c in ledger::coordinators(s.store())? {
                for e in ledger::chain(s.store(), &c)? {
                    if let Ok(p) = e.verify()
                        && p.job.to_string().starts_with(&prefix)
                    {
                        return Ok(Some((p.job, p.coordinator)));
                    }
                }
            }
            Ok(None)
        })
        .await?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let Some((job, coordinator)) = found.filter(|_| !given.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job `{given}` here or in the ledger"),
        ));
    };
    let answer = node
        .call(coordinator, RequestBody::GetJob { job })
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let spec = match answer {
        RpcResponse::Job { spec: Some(spec) }
            if spec.signer() == coordinator && cohort_protocol::types::JobId::of(&spec) == job =>
        {
            spec
        }
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the coordinator did not answer with the job's spec: {other:?}"),
            ));
        }
    };
    let p = spec
        .verify()
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(json!({
        "job": job.to_string(),
        "owner": coordinator.to_string(),
        "role": Value::Null,
        "name": p.name,
        "rounds": p.rounds,
        "base_model": p.base_model.to_string(),
    }))
}

async fn show_job(State(node): State<AppState>, Path(given): Path<String>) -> ApiResult {
    job_json(&node, &given).await.map(Json)
}

/// What `GET /api/jobs/{job}` answers: the job's summary, its closed rounds and its spec.
async fn job_json(node: &Node, given: &str) -> Result<Value, ApiError> {
    let (job, record) = match resolve_job(node, given).await {
        Ok(found) => found,
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            return remote_job(node, given).await;
        }
        Err(e) => return Err(e),
    };
    let closes = node
        .state
        .call(move |s| crate::rounds::closes(s.store(), &job))
        .await?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let rounds: Vec<Value> = closes
        .iter()
        .filter_map(|c| c.verify().ok())
        .map(|c| {
            json!({
                "round": c.round,
                "outcome": format!("{:?}", c.outcome),
                "merged_adapter": c.merged_adapter.map(|h| h.to_string()),
                "validation_loss_before": c.validation_loss_before,
                "validation_loss_after": c.validation_loss_after,
                "truncation_error": c.truncation_error,
                "closed_at_ms": c.closed_at.0,
                "verdicts": c.verdicts.iter().map(|v| json!({
                    "worker": v.worker.to_string(),
                    "commit": v.commit.to_string(),
                    "rejected": v.rejected.as_ref().map(|r| format!("{r:?}")),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut v = job_summary(&job, &record, node.rounds.status(&job));
    v["closed_rounds"] = json!(rounds);
    if let Ok(spec) = record.spec.verify() {
        v["created_at_ms"] = json!(spec.created_at.0);
        v["spec"] = json!({
            "rank": spec.adapter.rank,
            "alpha": spec.adapter.alpha,
            "targets": spec.adapter.targets.iter().map(|t| t.hf_name()).collect::<Vec<_>>(),
            "qlora": matches!(spec.adapter.kind, cohort_protocol::types::AdapterKind::Qlora { .. }),
            "learning_rate": spec.hyper.learning_rate,
            "epochs": spec.hyper.epochs,
            "batch_size": spec.hyper.batch_size,
            "seq_len": spec.hyper.seq_len,
            "min_updates": spec.quorum.min_updates,
            "max_workers": spec.quorum.max_workers,
            "validation_set": spec.validation.set.to_string(),
            "datanets": spec.datanets.iter().map(|d| json!({
                "datanet": d.datanet.to_string(), "version": d.version,
            })).collect::<Vec<_>>(),
        });
    }
    Ok(v)
}

/// `GET /api/models`: the base models in this node's model cache (what a job's `model` names).
async fn models() -> ApiResult {
    let list = tokio::task::spawn_blocking(cohort_trainer::models::list)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let default = cohort_trainer::models::default_model_path();
    let models: Vec<Value> = list
        .into_iter()
        .map(|(path, info)| {
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            match info {
                Ok(m) => json!({
                    "name": file,
                    "title": m.name,
                    "architecture": m.architecture,
                    "hash": m.hash.to_string(),
                    "bytes": m.size_bytes,
                    "params": m.config.as_ref().ok().map(|c| c.num_params()),
                    "runnable": m.config.as_ref().err(),
                    "default": path == default,
                }),
                Err(e) => json!({ "name": file, "error": e.to_string(), "default": false }),
            }
        })
        .collect();
    Ok(Json(json!({ "models": models })))
}

/// `GET /api/jobs/{job}/events`: server-sent events, `job` with the JSON of `GET /api/jobs/{job}`
/// on connect and on every change (the phase's countdown aside), then `end` once the job has
/// finished; `failed` with `{"error"}` if the job can no longer be read.
async fn job_events(
    State(node): State<AppState>,
    Path(given): Path<String>,
) -> Result<Sse<impl n0_future::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    // Unknown jobs are a 404 before the stream starts.
    let first = job_json(&node, &given).await?;
    let stream = n0_future::stream::unfold(
        (node, given, Some(first), None::<String>, false),
        |(node, given, mut next, mut last, done)| async move {
            if done {
                return None;
            }
            loop {
                let v = match next.take() {
                    Some(v) => v,
                    None => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        match job_json(&node, &given).await {
                            Ok(v) => v,
                            Err(e) => {
                                let err = Event::default()
                                    .event("failed")
                                    .data(json!({ "error": e.message }).to_string());
                                return Some((Ok(err), (node, given, None, last, true)));
                            }
                        }
                    }
                };
                // The countdown alone is no change worth an event.
                let mut same = v.clone();
                if let Some(st) = same["status"].as_object_mut() {
                    st.remove("phase_ends_in_s");
                }
                let text = same.to_string();
                if last.as_deref() == Some(text.as_str()) {
                    if v["finished"] == json!(true) {
                        let end = Event::default().event("end").data("{}");
                        return Some((Ok(end), (node, given, None, last, true)));
                    }
                    continue;
                }
                last = Some(text);
                let event = Event::default().event("job").data(v.to_string());
                return Some((Ok(event), (node, given, None, last, false)));
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn cancel_job(
    _auth: Authorized,
    State(node): State<AppState>,
    Path(given): Path<String>,
) -> ApiResult {
    let (job, _) = resolve_job(&node, &given).await?;
    crate::rounds::coordinate::cancel(&node, &job)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    Ok(Json(json!({ "job": job.to_string(), "cancelled": true })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolunteerBody {
    enabled: bool,
    #[serde(default)]
    policy: crate::rounds::volunteer::Policy,
}

async fn volunteer_get(State(node): State<AppState>) -> ApiResult {
    let policy = node.rounds.policy();
    Ok(Json(
        json!({ "enabled": policy.is_some(), "policy": policy }),
    ))
}

async fn volunteer_set(
    _auth: Authorized,
    State(node): State<AppState>,
    body: Result<Json<VolunteerBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(b) = body.map_err(|e| ApiError::bad(e.body_text()))?;
    for o in &b.policy.owners {
        o.parse::<PeerId>()
            .map_err(|e| ApiError::bad(format!("policy.owners: `{o}`: {e}")))?;
    }
    node.rounds.set_policy(b.enabled.then(|| b.policy.clone()));
    if b.enabled {
        let n = node.clone();
        node.spawn(async move { crate::rounds::volunteer::discover(&n).await });
    }
    volunteer_get(State(node)).await
}

async fn ledger_show(State(node): State<AppState>) -> ApiResult {
    let (chains, totals) = node
        .state
        .call(|s| -> Result<_, crate::store::StoreError> {
            use crate::rounds::ledger;
            let mut chains = Vec::new();
            for c in ledger::coordinators(s.store())? {
                let entries: Vec<Value> = ledger::chain(s.store(), &c)?
                    .iter()
                    .filter_map(|e| e.verify().ok().map(|p| (e.hash(), p)))
                    .map(|(hash, p)| {
                        json!({
                            "seq": p.seq,
                            "hash": hash.to_string(),
                            "job": p.job.to_string(),
                            "round": p.round,
                            "merged_adapter": p.merged_adapter.map(|h| h.to_string()),
                            "validation_loss_before": p.validation_loss_before,
                            "validation_loss_after": p.validation_loss_after,
                            "data": p.data.iter().map(|d| json!({
                                "shard": d.shard.to_string(),
                                "datanet": d.datanet.to_string(),
                                "contributor": d.contributor.to_string(),
                                "credit": d.value.to_string(),
                                "flag": format!("{:?}", d.flag),
                            })).collect::<Vec<_>>(),
                            "compute": p.compute.iter().map(|c| json!({
                                "peer": c.peer.to_string(),
                                "tokens": c.tokens,
                                "verified": c.verified,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                chains.push(json!({ "coordinator": c.to_string(), "entries": entries }));
            }
            Ok((chains, ledger::totals(s.store())?))
        })
        .await?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let contributors: serde_json::Map<String, Value> = totals
        .contributors
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                json!(cohort_protocol::types::Credit(*v).to_string()),
            )
        })
        .collect();
    Ok(Json(json!({
        "chains": chains,
        "totals": {
            "contributors": contributors,
            "volunteer_tokens": totals.volunteers,
            "volunteer_failed_updates": totals.failed,
        },
    })))
}

async fn ledger_verify(_auth: Authorized, State(node): State<AppState>) -> ApiResult {
    // Pull the latest of every known chain first, so the verdict is about today's ledger.
    for p in node.known_peers() {
        if let Err(e) = node.sync_ledger(p).await {
            tracing::debug!("ledger of {}: {e}", p.short());
        }
    }
    let reports = node
        .state
        .call(|s| -> Result<_, crate::store::StoreError> {
            let mut closes = std::collections::BTreeMap::new();
            for (job, _) in crate::rounds::jobs(s.store())? {
                for c in crate::rounds::closes(s.store(), &job)? {
                    closes.insert(c.hash(), c);
                }
            }
            crate::rounds::ledger::verify_all(s.store(), &closes)
        })
        .await?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // Then every entry's round, recomputed from the published blobs.
    let mut reports = reports;
    for r in &mut reports {
        let Ok(coordinator) = r.coordinator.parse::<PeerId>() else {
            continue;
        };
        let chain = node
            .state
            .call(move |s| crate::rounds::ledger::chain(s.store(), &coordinator))
            .await?
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        for e in chain {
            let Ok(entry) = e.verify() else { continue };
            let checked = crate::rounds::recheck::recheck(&node, &entry).await;
            let at = format!(
                "entry {} (job {}, round {})",
                entry.seq,
                entry.job.0.short(),
                entry.round
            );
            if let Some(why) = checked.unchecked {
                r.unchecked.push(format!("{at}: {why}"));
            } else if checked.problems.is_empty() {
                r.recomputed += 1;
            }
            r.problems
                .extend(checked.problems.into_iter().map(|p| format!("{at}: {p}")));
        }
    }
    let ok = reports
        .iter()
        .all(|r| r.problems.is_empty() && r.equivocations == 0);
    Ok(Json(json!({ "ok": ok, "chains": reports })))
}
