//! Tests of the router (with `oneshot` requests) and of the embedded files themselves (with a
//! tiny tag scanner: enough HTML to read our own pages, not a general parser).

use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use tower::ServiceExt;

use super::{ASSETS, Asset, CONTENT_SECURITY_POLICY, INDEX, etag_bytes, fnv1a64, router};

const NAV_PAGES: [(&str, &str); 5] = [
    ("Train", "train"),
    ("Chat", "chat"),
    ("Datanets", "datanets"),
    ("Credits", "credits"),
    ("Network", "network"),
];

async fn get(uri: &str) -> Response {
    request(Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn request(request: Request<Body>) -> Response {
    router::<()>().oneshot(request).await.unwrap()
}

async fn body_text(response: Response) -> String {
    let bytes = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn header_str(response: &Response, name: header::HeaderName) -> &str {
    response
        .headers()
        .get(&name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

/// `/` and every `/assets/...` URL with the file it must serve.
fn all_served() -> Vec<(String, &'static Asset)> {
    std::iter::once(("/".to_owned(), &INDEX))
        .chain(ASSETS.iter().map(|a| (format!("/assets/{}", a.name), a)))
        .collect()
}

fn all_files() -> impl Iterator<Item = &'static Asset> {
    std::iter::once(&INDEX).chain(ASSETS.iter())
}

// ----- The router. -----

#[tokio::test]
async fn index_is_html_with_every_nav_label() {
    let response = get("/").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header_str(&response, header::CONTENT_TYPE),
        "text/html; charset=utf-8"
    );
    let html = body_text(response).await;
    assert!(html.starts_with("<!doctype html>"));
    let nav = section_between(&html, "<nav", "</nav>");
    for (label, page) in NAV_PAGES {
        assert!(
            nav.contains(&format!("<a href=\"#/{page}\">{label}</a>")),
            "nav has no link {label} -> #/{page}"
        );
    }
}

#[tokio::test]
async fn every_file_has_its_content_type_and_security_headers() {
    let js = "text/javascript; charset=utf-8";
    let expected_types = [
        ("/", "text/html; charset=utf-8"),
        ("/assets/app.js", js),
        ("/assets/api.js", js),
        ("/assets/chart.js", js),
        ("/assets/chat.js", js),
        ("/assets/credits.js", js),
        ("/assets/datanets.js", js),
        ("/assets/dom.js", js),
        ("/assets/format.js", js),
        ("/assets/job.js", js),
        ("/assets/network.js", js),
        ("/assets/sse.js", js),
        ("/assets/token.js", js),
        ("/assets/train.js", js),
        ("/assets/validate.js", js),
        ("/assets/style.css", "text/css; charset=utf-8"),
    ];
    assert_eq!(
        expected_types.len(),
        all_served().len(),
        "a file is untested"
    );
    for (uri, content_type) in expected_types {
        let response = get(uri).await;
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        assert_eq!(
            header_str(&response, header::CONTENT_TYPE),
            content_type,
            "{uri}"
        );
        assert_eq!(
            header_str(&response, header::X_CONTENT_TYPE_OPTIONS),
            "nosniff",
            "{uri}"
        );
        let csp = header_str(&response, header::CONTENT_SECURITY_POLICY);
        for directive in [
            "default-src 'self'",
            "connect-src 'self'",
            "img-src 'self' data:",
            "style-src 'self'",
            "script-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(
                csp.split(';').any(|d| d.trim() == directive),
                "{uri}: CSP lacks {directive}"
            );
        }
        assert!(!csp.contains("unsafe-"), "{uri}: CSP allows unsafe-*");
        assert!(!csp.contains('*'), "{uri}: CSP has a wildcard");
        let etag = header_str(&response, header::ETAG).to_owned();
        let body = body_text(response).await;
        let file = all_served().into_iter().find(|(u, _)| u == uri).unwrap().1;
        assert_eq!(body, file.body, "{uri} serves another file's body");
        assert_eq!(etag, file.etag);
    }
}

#[tokio::test]
async fn head_requests_get_headers_without_a_body() {
    let response = request(Request::head("/assets/app.js").body(Body::empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header_str(&response, header::CONTENT_TYPE),
        "text/javascript; charset=utf-8"
    );
    assert!(body_text(response).await.is_empty());
}

#[tokio::test]
async fn matching_if_none_match_gives_304_with_an_empty_body() {
    for (uri, file) in all_served() {
        let first = get(&uri).await;
        let etag = header_str(&first, header::ETAG).to_owned();
        assert_eq!(etag.len(), 18, "{uri}: {etag}");
        assert!(
            etag.starts_with('"') && etag.ends_with('"'),
            "{uri}: {etag}"
        );
        assert_eq!(etag, file.etag);

        for if_none_match in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"0000000000000000\", {etag}"),
            "*".to_owned(),
        ] {
            let response = request(
                Request::get(&uri)
                    .header(header::IF_NONE_MATCH, &if_none_match)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
            assert_eq!(
                response.status(),
                StatusCode::NOT_MODIFIED,
                "{uri} with If-None-Match: {if_none_match}"
            );
            assert_eq!(header_str(&response, header::ETAG), etag);
            assert_eq!(
                header_str(&response, header::X_CONTENT_TYPE_OPTIONS),
                "nosniff"
            );
            assert!(
                body_text(response).await.is_empty(),
                "{uri}: 304 has a body"
            );
        }

        // A stale tag gets the whole file again.
        let response = request(
            Request::get(&uri)
                .header(header::IF_NONE_MATCH, "\"0000000000000000\"")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        assert_eq!(body_text(response).await, file.body);
    }
}

#[tokio::test]
async fn unknown_assets_are_404_plain_text() {
    for uri in [
        "/assets/nope.js",
        "/assets/App.js",
        "/assets/app.js.map",
        "/assets/sub/app.js",
        "/assets/../index.html",
        "/assets/index.html",
    ] {
        let response = get(uri).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(
            header_str(&response, header::CONTENT_TYPE),
            "text/plain; charset=utf-8",
            "{uri}"
        );
        assert_eq!(
            header_str(&response, header::X_CONTENT_TYPE_OPTIONS),
            "nosniff"
        );
        assert!(body_text(response).await.contains("404"), "{uri}");
    }
}

#[tokio::test]
async fn merges_into_a_stateful_router_next_to_the_api() {
    #[derive(Clone)]
    struct PeerState(&'static str);
    async fn status(State(state): State<PeerState>) -> &'static str {
        state.0
    }
    let app = axum::Router::new()
        .route("/api/status", axum::routing::get(status))
        .merge(router())
        .with_state(PeerState("status"));
    let api = app
        .clone()
        .oneshot(Request::get("/api/status").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(body_text(api).await, "status");
    let page = app
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
}

#[test]
fn etags_are_fnv1a_of_the_body() {
    // Published FNV-1a 64 test vectors.
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    assert_eq!(&etag_bytes(b"foobar"), b"\"85944171f73967e8\"");
    for file in all_files() {
        assert_eq!(
            file.etag,
            format!("\"{:016x}\"", fnv1a64(file.body.as_bytes())),
            "{}",
            file.name
        );
    }
    let mut tags: Vec<_> = all_files().map(|f| f.etag).collect();
    tags.sort_unstable();
    tags.dedup();
    assert_eq!(tags.len(), ASSETS.len() + 1, "two files share an ETag");
}

// ----- The embedded files. -----

/// The SVG namespace: an identifier that `createElementNS` needs, never loaded.
const SVG_NAMESPACE: &str = "'http://www.w3.org/2000/svg'";

#[test]
fn no_file_names_another_origin() {
    // Any scheme URL (http://, https://, ws://, ...) or protocol-relative //host.
    let forbidden = ["://", "\"//", "'//", "(//", "`//", "=//"];
    for file in all_files() {
        for (number, line) in file.body.lines().enumerate() {
            let line = if file.name.ends_with(".js") {
                line.replace(SVG_NAMESPACE, "")
            } else {
                line.to_owned()
            };
            for pattern in forbidden {
                assert!(
                    !line.contains(pattern),
                    "{}:{}: {pattern:?} points at another origin: {line}",
                    file.name,
                    number + 1
                );
            }
        }
    }
    // CSS may only load what the CSP allows, and there is nothing it needs to load.
    for file in all_files().filter(|f| f.name.ends_with(".css")) {
        assert!(!file.body.contains("@import"), "{}", file.name);
        assert!(!file.body.contains("url("), "{}", file.name);
        assert!(!file.body.contains("@font-face"), "{}", file.name);
    }
}

#[test]
fn every_reference_resolves_to_an_embedded_asset() {
    let served = |name: &str| ASSETS.iter().any(|a| a.name == name);
    let html = INDEX.body;
    let mut references = 0;
    for tag in tags(html) {
        for attr in ["src", "href"] {
            let Some(url) = tag.attr(attr) else { continue };
            if url.starts_with('#') || url.starts_with("data:") {
                continue;
            }
            let name = url
                .strip_prefix("assets/")
                .unwrap_or_else(|| panic!("index.html: {attr}={url:?} is not under assets/"));
            assert!(served(name), "index.html: {url} is not embedded");
            references += 1;
        }
    }
    assert!(
        references >= 2,
        "index.html loads neither its CSS nor its JS?"
    );

    for file in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
        for specifier in import_specifiers(file.body) {
            let name = specifier
                .strip_prefix("./")
                .unwrap_or_else(|| panic!("{}: import {specifier:?} is not ./relative", file.name));
            assert!(
                served(name),
                "{}: imports {specifier}, not embedded",
                file.name
            );
        }
    }
}

#[test]
fn index_obeys_the_content_security_policy() {
    for tag in tags(INDEX.body) {
        assert!(tag.name != "style", "index.html: inline <style>");
        assert!(
            tag.name != "script" || tag.attr("src").is_some(),
            "index.html: inline <script>"
        );
        for (name, _) in &tag.attrs {
            assert!(name != "style", "index.html: style= on <{}>", tag.name);
            assert!(
                !name.starts_with("on"),
                "index.html: inline handler {name}= on <{}>",
                tag.name
            );
        }
    }
    assert!(
        !CONTENT_SECURITY_POLICY.contains("unsafe-inline"),
        "the policy these checks assume"
    );
}

#[test]
fn scripts_never_turn_strings_into_markup_or_code() {
    let forbidden = [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "createContextualFragment",
        "DOMParser",
        "'style'",
        ".style.",
    ];
    for file in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
        for pattern in forbidden {
            assert!(
                !file.body.contains(pattern),
                "{}: uses {pattern}",
                file.name
            );
        }
    }
}

#[test]
fn every_form_control_in_index_has_a_label() {
    let problems = unlabelled_controls(INDEX.body);
    assert!(problems.is_empty(), "index.html: {problems:?}");
    // Make sure the check above looked at something.
    assert!(
        !controls(INDEX.body).is_empty(),
        "index.html has no controls"
    );
}

#[test]
fn the_label_scanner_catches_unlabelled_controls() {
    let ok = r#"<label for="a">A</label><input id="a">
        <select aria-label="B"></select>
        <span id="c-label">C</span><textarea aria-labelledby="c-label"></textarea>
        <input type="hidden" name="csrf">
        <INPUT ID='d'><Label For=d>D</Label>"#;
    assert_eq!(unlabelled_controls(ok), Vec::<String>::new());
    let bad = [
        r#"<input id="a">"#,
        r#"<label for="b">B</label><input id="a">"#,
        r#"<select aria-label=""></select>"#,
        r#"<textarea aria-labelledby="nowhere"></textarea>"#,
        r#"<!-- <label for="a">A</label> --><input id="a">"#,
        r#"<input type="checkbox"><label>unattached</label>"#,
    ];
    for html in bad {
        assert_eq!(unlabelled_controls(html).len(), 1, "missed: {html}");
    }
}

#[test]
fn nav_links_and_pages_match() {
    let html = INDEX.body;
    let all = tags(html);
    let pages: Vec<&str> = all.iter().filter_map(|t| t.attr("data-page")).collect();
    let nav = tags(section_between(html, "<nav", "</nav>"));
    let links: Vec<&str> = nav
        .iter()
        .filter_map(|t| t.attr("href")?.strip_prefix("#/"))
        .collect();
    let expected: Vec<&str> = NAV_PAGES.iter().map(|(_, page)| *page).collect();
    assert_eq!(links, expected, "nav links");
    let mut sorted_pages = pages.clone();
    sorted_pages.sort_unstable();
    let mut sorted_expected = expected.clone();
    sorted_expected.sort_unstable();
    assert_eq!(sorted_pages, sorted_expected, "one section per nav link");
    // Every page is a hidden section named by its <h1>, which takes focus on a page change; its
    // script is a module of the same name that app.js imports, with enter() and leave().
    let app = ASSETS.iter().find(|a| a.name == "app.js").unwrap().body;
    for (index, tag) in all.iter().enumerate() {
        let Some(page) = tag.attr("data-page") else {
            continue;
        };
        assert_eq!(tag.name, "section");
        assert!(tag.attr("hidden").is_some(), "pages start hidden");
        let heading = tag
            .attr("aria-labelledby")
            .unwrap_or_else(|| panic!("{page}: no aria-labelledby"));
        let h1 = all[index..]
            .iter()
            .find(|t| t.name == "h1")
            .unwrap_or_else(|| panic!("{page}: no <h1>"));
        assert_eq!(h1.attr("id"), Some(heading), "{page}: labelled by its <h1>");
        assert_eq!(h1.attr("tabindex"), Some("-1"), "{page}: <h1> takes focus");
        assert!(
            app.contains(&format!("import * as {page} from './{page}.js';")),
            "app.js does not import {page}.js"
        );
        let module = ASSETS
            .iter()
            .find(|a| a.name == format!("{page}.js"))
            .unwrap_or_else(|| panic!("no {page}.js"));
        for function in ["enter", "leave"] {
            assert!(
                module
                    .body
                    .contains(&format!("export function {function}("))
                    || module
                        .body
                        .contains(&format!("export async function {function}(")),
                "{page}.js does not export {function}()"
            );
        }
    }
}

#[test]
fn ids_are_unique_and_references_resolve() {
    let all = tags(INDEX.body);
    let ids: Vec<&str> = all.iter().filter_map(|t| t.attr("id")).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    for pair in sorted.windows(2) {
        assert_ne!(pair[0], pair[1], "index.html: id {} twice", pair[0]);
    }
    for tag in &all {
        for attr in [
            "aria-labelledby",
            "aria-describedby",
            "for",
            "aria-controls",
        ] {
            let Some(refs) = tag.attr(attr) else { continue };
            for id in refs.split_ascii_whitespace() {
                assert!(
                    ids.contains(&id),
                    "index.html: <{} {attr}={refs:?}> names no element",
                    tag.name
                );
            }
        }
    }
}

#[test]
fn every_button_says_its_type() {
    // A button without a type submits its form, which is never what a plain button means.
    for tag in tags(INDEX.body).iter().filter(|t| t.name == "button") {
        assert!(
            matches!(tag.attr("type"), Some("button" | "submit")),
            "index.html: <button {:?}> has no type",
            tag.attrs
        );
    }
    for file in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
        for (number, line) in file.body.lines().enumerate() {
            if line.contains("el('button'") {
                assert!(
                    line.contains("type: 'button'"),
                    "{}:{}: a button built without type: 'button'",
                    file.name,
                    number + 1
                );
            }
        }
    }
}

#[test]
fn scripts_only_look_up_ids_that_exist() {
    let all = tags(INDEX.body);
    let ids: Vec<&str> = all.iter().filter_map(|t| t.attr("id")).collect();
    let mut lookups = 0;
    for file in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
        for call in ["byId('", "getElementById('"] {
            for (at, _) in file.body.match_indices(call) {
                let rest = &file.body[at + call.len()..];
                let id = &rest[..rest.find('\'').unwrap()];
                assert!(
                    ids.contains(&id),
                    "{}: looks up #{id}, which index.html lacks",
                    file.name
                );
                lookups += 1;
            }
        }
    }
    assert!(lookups > 50, "the scan found only {lookups} lookups");
}

#[test]
fn the_ids_end_to_end_tests_drive_exist() {
    let html = INDEX.body;
    let all = tags(html);
    let find = |id: &str| {
        all.iter()
            .find(|t| t.attr("id") == Some(id))
            .unwrap_or_else(|| panic!("index.html has no #{id}"))
    };
    for (id, name) in [
        ("train-form", "form"),
        ("train-start", "button"),
        ("job-chart", "svg"),
        ("job-phase", "span"),
        ("chat-prompt", "textarea"),
        ("chat-send", "button"),
        ("chat-stop", "button"),
        ("chat-panes", "div"),
        ("credits-chart", "svg"),
        ("network-volunteer", "input"),
        ("datanet-files", "input"),
        ("datanet-drop", "div"),
        ("token-form", "form"),
        ("token-input", "input"),
    ] {
        assert_eq!(find(id).name, name, "#{id}");
    }
    assert_eq!(find("network-volunteer").attr("type"), Some("checkbox"));
    // Built by scripts: the chat panes' output areas and the credits table.
    let script = |name: &str| ASSETS.iter().find(|a| a.name == name).unwrap().body;
    assert!(script("chat.js").contains("class: 'chat-pane'"));
    assert!(script("chat.js").contains("class: 'chat-output'"));
    assert!(script("credits.js").contains("id: 'credits-table'"));
}

#[test]
fn every_script_says_what_it_does() {
    for file in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
        assert!(
            file.body.starts_with("// "),
            "{}: no opening comment",
            file.name
        );
    }
}

// ----- A tiny tag scanner. -----

#[derive(Debug)]
struct Tag<'a> {
    /// Lowercase.
    name: String,
    /// Names lowercase, values as written; a bare attribute has an empty value.
    attrs: Vec<(String, &'a str)>,
}

impl Tag<'_> {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| *value)
    }
}

/// The text from the first `start` to the following `end`.
fn section_between<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let from = html.find(start).unwrap_or_else(|| panic!("no {start}"));
    let to = from + html[from..].find(end).unwrap_or_else(|| panic!("no {end}"));
    &html[from..to]
}

/// Every start tag, in order, skipping comments, `<!doctype>`, end tags and the contents of
/// `<script>` and `<style>`.
fn tags(html: &str) -> Vec<Tag<'_>> {
    let bytes = html.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(offset) = html[i..].find('<') {
        i += offset;
        if html[i..].starts_with("<!--") {
            i = html[i..].find("-->").map_or(html.len(), |end| i + end + 3);
            continue;
        }
        let name_start = i + 1;
        let mut j = name_start;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'-') {
            j += 1;
        }
        if j == name_start {
            // `</x>`, `<!doctype>`, or a stray `<`.
            i += 1;
            continue;
        }
        let name = html[name_start..j].to_ascii_lowercase();
        let (attrs, end) = attributes(html, j);
        i = end;
        if name == "script" || name == "style" {
            let close = format!("</{name}");
            i = html[i..]
                .to_ascii_lowercase()
                .find(&close)
                .map_or(html.len(), |at| i + at);
        }
        out.push(Tag { name, attrs });
    }
    out
}

/// Attributes from `start` up to the tag's `>`; returns them and the index after the `>`.
fn attributes(html: &str, start: usize) -> (Vec<(String, &str)>, usize) {
    let bytes = html.as_bytes();
    let mut attrs = Vec::new();
    let mut i = start;
    loop {
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b'/') {
            i += 1;
        }
        if i >= bytes.len() {
            return (attrs, i);
        }
        if bytes[i] == b'>' {
            return (attrs, i + 1);
        }
        let name_start = i;
        while i < bytes.len() && !b" \t\r\n/>=".contains(&bytes[i]) {
            i += 1;
        }
        let name = html[name_start..i].to_ascii_lowercase();
        let mut value = "";
        if i < bytes.len() && bytes[i] == b'=' {
            i += 1;
            if i < bytes.len() && (bytes[i] == b'"' || bytes[i] == b'\'') {
                let quote = bytes[i] as char;
                let value_start = i + 1;
                let value_end = html[value_start..]
                    .find(quote)
                    .map_or(html.len(), |at| value_start + at);
                value = &html[value_start..value_end];
                i = (value_end + 1).min(html.len());
            } else {
                let value_start = i;
                while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'>' {
                    i += 1;
                }
                value = &html[value_start..i];
            }
        }
        attrs.push((name, value));
    }
}

/// `<input>` (other than `type=hidden`), `<select>` and `<textarea>` tags.
fn controls(html: &str) -> Vec<Tag<'_>> {
    tags(html)
        .into_iter()
        .filter(|t| match t.name.as_str() {
            "input" => !t
                .attr("type")
                .is_some_and(|ty| ty.eq_ignore_ascii_case("hidden")),
            "select" | "textarea" => true,
            _ => false,
        })
        .collect()
}

/// A description of each form control with no `<label for=its id>`, no non-empty `aria-label`
/// and no `aria-labelledby` naming elements that exist.
fn unlabelled_controls(html: &str) -> Vec<String> {
    let all = tags(html);
    let ids: Vec<&str> = all.iter().filter_map(|t| t.attr("id")).collect();
    let label_targets: Vec<&str> = all
        .iter()
        .filter(|t| t.name == "label")
        .filter_map(|t| t.attr("for"))
        .collect();
    controls(html)
        .into_iter()
        .filter(|control| {
            let by_for = control
                .attr("id")
                .is_some_and(|id| label_targets.contains(&id));
            let by_aria_label = control
                .attr("aria-label")
                .is_some_and(|label| !label.trim().is_empty());
            let by_labelledby = control.attr("aria-labelledby").is_some_and(|refs| {
                let mut refs = refs.split_ascii_whitespace().peekable();
                refs.peek().is_some() && refs.all(|id| ids.contains(&id))
            });
            !(by_for || by_aria_label || by_labelledby)
        })
        .map(|control| format!("<{} {:?}>", control.name, control.attrs))
        .collect()
}

/// The module specifiers of `import ... from '...'` and `import '...'` statements.
fn import_specifiers(js: &str) -> Vec<&str> {
    js.lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with("import ") || line.starts_with("} from "))
        .filter_map(|line| {
            let at = line.rfind(['\'', '"'])?;
            let quote = line.as_bytes()[at] as char;
            let start = line[..at].rfind(quote)? + 1;
            Some(&line[start..at])
        })
        .collect()
}
