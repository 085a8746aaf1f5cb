//! The web console's files, served at `/console`.
//!
//! The page is static (plain ES modules, a vendored chart library) and lives in
//! `console/` in the repository. It is compiled into the binary with `rust-embed`, so a
//! fresh machine serves it with no Node.js toolchain and nothing to install; debug builds
//! read the folder from disk instead, so editing a file needs only a reload.
//!
//! Everything the page shows comes from the token-protected APIs
//! ([`super::console_api`], [`super::history`]); these files are not secret and need no
//! token. Every response carries a strict Content-Security-Policy (scripts, styles and
//! connections from this origin only; audio from blob URLs) so an injected string in a
//! device's chat history can never run as script in an operator's browser.
//!
//! Only the page's own files are served: `package.json`, the vendoring script, the
//! end-to-end test and `node_modules` are excluded at compile time.

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::HttpState;

/// The page's files, embedded at compile time (read from disk in debug builds).
#[derive(rust_embed::Embed)]
#[folder = "../../console/"]
#[exclude = "node_modules/*"]
#[exclude = "tests/*"]
#[exclude = "scripts/*"]
#[exclude = "package.json"]
#[exclude = "package-lock.json"]
#[exclude = ".gitignore"]
#[exclude = "*.md"]
struct ConsoleFiles;

/// The policy every console response carries.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; \
     media-src 'self' blob:; style-src 'self'; script-src 'self'; connect-src 'self'; \
     object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// The console routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route(
            "/console/",
            get(|headers: HeaderMap| async move { file("index.html", &headers) }),
        )
        .route(
            "/console/{*path}",
            get(
                |Path(path): Path<String>, headers: HeaderMap| async move { file(&path, &headers) },
            ),
        )
}

/// One embedded file (304 when the browser's copy is current), or a 404.
fn file(path: &str, request: &HeaderMap) -> Response {
    let Some(asset) = ConsoleFiles::get(path) else {
        return (StatusCode::NOT_FOUND, "no such console file").into_response();
    };
    let mime = asset.metadata.mimetype();
    // Our own modules change with every release and carry no version in their names:
    // the browser must revalidate them (cheap: the ETag is the content hash).
    let etag = format!("\"{}\"", hex::encode(&asset.metadata.sha256_hash()[..16]));
    let current = request
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut response = if current {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(Body::from(asset.data.into_owned()))
    };
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(mime) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// Whether the page is present in this build (tests and `config check`).
pub fn has_index() -> bool {
    ConsoleFiles::get("index.html").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_404_and_sources_are_not_served() {
        let none = HeaderMap::new();
        assert_eq!(
            file("no/such/file.js", &none).status(),
            StatusCode::NOT_FOUND
        );
        for private in ["package.json", "scripts/vendor.mjs", "tests/e2e.mjs"] {
            assert_eq!(
                file(private, &none).status(),
                StatusCode::NOT_FOUND,
                "{private}"
            );
        }
    }

    #[test]
    fn the_page_is_embedded_with_its_security_headers() {
        let response = file("index.html", &HeaderMap::new());
        assert_eq!(response.status(), StatusCode::OK);
        let etag = response.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(
            file("index.html", &again).status(),
            StatusCode::NOT_MODIFIED
        );
        let headers = response.headers();
        assert_eq!(headers[header::CONTENT_TYPE], "text/html");
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(headers.contains_key(header::ETAG));
    }
}
