//! The portal: one web page for a vehicle's user, served from the binary
//! (plain HTML, CSS and JavaScript in `portal/`, no build step, no CDN).
//! Signed in with their token, a user sees the vehicles and periods they
//! held, follows a vehicle's data live with a chart of its state of
//! charge, downloads their export, and gives and revokes grants, seeing
//! when each recipient last read. The page holds no data of its own: it
//! calls `/account`, `/sql`, `/live`, `/export` and `/grants` with the
//! token in a header, and writes what they answer into the page as text.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("portal/index.html");
const SCRIPT: &str = include_str!("portal/portal.js");
const STYLE: &str = include_str!("portal/portal.css");

/// Only the page's own files may load, it may talk only to its own origin,
/// and no other site may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; \
     base-uri 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn page() -> Response {
    file("text/html; charset=utf-8", PAGE)
}

pub(crate) async fn script() -> Response {
    file("text/javascript; charset=utf-8", SCRIPT)
}

pub(crate) async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}
