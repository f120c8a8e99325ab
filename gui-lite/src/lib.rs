//! Cohort's dashboard ("gui-lite"): the pages and assets, and an axum router that serves them.
//!
//! # What this crate owns
//!
//! - The files under `gui-lite/assets/` (HTML, CSS and vanilla JavaScript modules, no build
//!   step), embedded in the binary with `include_str!` so that the dashboard works offline and a
//!   running node never reads them from disk.
//! - [`router`]: `GET /` (the page) and `GET /assets/{name}` (everything it loads), each with its
//!   exact `Content-Type`, `X-Content-Type-Options: nosniff`, a Content-Security-Policy that
//!   allows this origin only, and a strong `ETag` (FNV-1a of the file, computed at compile time)
//!   so that `If-None-Match` revalidation answers `304 Not Modified`.
//!
//! # What it must not touch
//!
//! It depends on none of the other Cohort crates and knows nothing of the node's state: the
//! router is generic over the caller's state type and extracts none of it. The peer (`cohort-peer`)
//! mounts this router next to its own routes and serves the JSON API the pages read at run time
//! (`/api/status`, `/api/jobs`, `/api/datanets`, `/api/ledger`, `/v1/models`, ...); this crate
//! neither defines nor proxies any of those.
//!
//! # The pages
//!
//! One module per page (`train.js` with `job.js`, `chat.js`, `datanets.js`, `credits.js`,
//! `network.js`), driven by `app.js`'s hash routing; shared pieces are `api.js` (fetch, the API
//! token for changes), `sse.js` (server-sent events), `chart.js` (SVG charts), `dom.js`
//! (building nodes from text only), `format.js` and `validate.js` (inline form checks). Every page talks to the node through that public API only,
//! exactly as the CLI does, so the terminal and the dashboard never disagree.
//!
//! The CSP (`default-src 'self'`, no inline script or style) means the pages must never use
//! inline `<script>`/`<style>`, `style=` or `on*=` attributes, nor any other origin; the tests
//! scan the embedded files for all of these.

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

#[cfg(test)]
mod tests;

/// The dashboard's routes: `GET /` and `GET /assets/{*name}` (and `HEAD` of both).
///
/// Generic over the state of the router it is merged into; it uses none of it.
///
/// ```
/// let app: axum::Router = axum::Router::new()
///     .route("/api/status", axum::routing::get(|| async { "{}" }))
///     .merge(cohort_gui_lite::router());
/// # let _ = app;
/// ```
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/", get(index))
        .route("/assets/{*name}", get(asset))
}

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Same origin only, no inline script or style, never framed. `base-uri` and `form-action` do not
/// fall back to `default-src`, so they are pinned as well.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'self'";

/// One embedded file.
#[derive(Debug, Clone, Copy)]
struct Asset {
    /// The name under `/assets/` (and under `gui-lite/assets/` in the source tree).
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
    /// A quoted strong entity tag, e.g. `"cbf29ce484222325"`.
    etag: &'static str,
}

/// Embeds `gui-lite/assets/<file>` and computes its ETag at compile time.
macro_rules! asset {
    ($file:literal, $content_type:expr) => {{
        const BODY: &str = include_str!(concat!("../assets/", $file));
        const ETAG_BYTES: [u8; 18] = etag_bytes(BODY.as_bytes());
        const ETAG: &str = match ::core::str::from_utf8(&ETAG_BYTES) {
            Ok(etag) => etag,
            Err(_) => panic!("an ETag is ASCII hex"),
        };
        Asset {
            name: $file,
            content_type: $content_type,
            body: BODY,
            etag: ETAG,
        }
    }};
}

/// The page served at `/`.
const INDEX: Asset = asset!("index.html", HTML);

/// Everything served under `/assets/`.
const ASSETS: &[Asset] = &[
    asset!("app.js", JAVASCRIPT),
    asset!("api.js", JAVASCRIPT),
    asset!("chart.js", JAVASCRIPT),
    asset!("chat.js", JAVASCRIPT),
    asset!("credits.js", JAVASCRIPT),
    asset!("datanets.js", JAVASCRIPT),
    asset!("dom.js", JAVASCRIPT),
    asset!("format.js", JAVASCRIPT),
    asset!("job.js", JAVASCRIPT),
    asset!("network.js", JAVASCRIPT),
    asset!("sse.js", JAVASCRIPT),
    asset!("token.js", JAVASCRIPT),
    asset!("train.js", JAVASCRIPT),
    asset!("validate.js", JAVASCRIPT),
    asset!("style.css", CSS),
];

/// 64-bit FNV-1a: small, stable across builds and platforms, good enough to tell file versions
/// apart (this is a cache validator, not a security boundary).
const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"` + 16 lowercase hex digits of the FNV-1a hash + `"`.
const fn etag_bytes(body: &[u8]) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = fnv1a64(body);
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|asset| asset.name == name) {
        Some(asset) => serve(asset, &headers),
        None => (
            StatusCode::NOT_FOUND,
            security_headers(),
            [(header::CONTENT_TYPE, HeaderValue::from_static(TEXT))],
            "404 Not Found: no such dashboard asset\n",
        )
            .into_response(),
    }
}

/// Headers every response of this router carries.
fn security_headers() -> [(HeaderName, HeaderValue); 3] {
    [
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ]
}

/// 200 with the body, or 304 with none when `If-None-Match` names the current ETag.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let validators = [
        (header::ETAG, HeaderValue::from_static(asset.etag)),
        // Asset names carry no version, so browsers must revalidate; a 304 costs one round trip.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    if none_match_hits(request, asset.etag) {
        return (StatusCode::NOT_MODIFIED, security_headers(), validators).into_response();
    }
    (
        StatusCode::OK,
        security_headers(),
        validators,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        )],
        asset.body,
    )
        .into_response()
}

/// Whether any `If-None-Match` header matches `etag` under the weak comparison RFC 9110 13.1.2
/// prescribes for it (`W/"x"` matches `"x"`), or is `*`.
fn none_match_hits(request: &HeaderMap, etag: &str) -> bool {
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}
