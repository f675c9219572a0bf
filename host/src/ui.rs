//! The daemon's web page (`/ui`) and the read-only JSON API it is drawn from (`/api/v1/`),
//! on the daemon's own listener: the cascade around this node as a map, each volume's
//! snapshots and who pins them, the jobs and how they went.
//!
//! Access: the daemon's admin token, as a bearer token (scripts) or through the login form,
//! which trades it for a session cookie (HttpOnly, SameSite=Strict, Secure over TLS; the token
//! never appears in a URL). Everything is read-only; a request another site's page makes is
//! refused (its `Origin` or `Sec-Fetch-Site` says so), and every page carries a strict
//! Content-Security-Policy: scripts and styles only from this daemon, no inline code. The page
//! writes every value through `textContent` (never as HTML), so labels, lock values and peer
//! names show as the text they are. The assets are embedded in the binary; the page uses no
//! framework or library (plain DOM and SVG, rendered in the browser from the API's JSON).

pub(crate) mod api;
pub mod cascade;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

use crate::peer::server::ServerState;

/// The session cookie's name, followed by the node's name: browsers keep cookies by host, not
/// port, so two daemons on one host must not overwrite each other's sessions.
pub const COOKIE: &str = "holdfast-session-";
/// How long a login lasts.
const SESSION_FOR: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once (the oldest goes first).
const MAX_SESSIONS: usize = 256;
/// Failed logins remembered for the rate limit: at most this many a minute.
const FAILED_LOGINS_PER_MINUTE: usize = 10;

const INDEX_HTML: &str = include_str!("ui/assets/index.html");
const LOGIN_HTML: &str = include_str!("ui/assets/login.html");
const APP_JS: &str = include_str!("ui/assets/app.js");
const APP_CSS: &str = include_str!("ui/assets/app.css");

/// Every page and answer: nothing from elsewhere, nothing inline, never in a frame.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                   base-uri 'none'";

/// Logins and what the page's answers cost to make.
pub struct UiState {
    /// Session id → when it ends.
    sessions: Mutex<HashMap<String, Instant>>,
    /// When the last failed logins happened (for the rate limit).
    failed: Mutex<Vec<Instant>>,
    /// `exclusive_size` of a snapshot between two neighbours: (prev, id, next) → bytes.
    pub(crate) exclusive: Mutex<HashMap<api::Neighbours, u64>>,
    /// The upstreams' cascade views by the path the question came through, and when they
    /// were asked (asked at most every few seconds, whoever polls).
    pub(crate) upstream_views: Mutex<HashMap<String, (Instant, api::UpstreamViews)>>,
    /// This node's own relations, and when they were made.
    pub(crate) own_edges: Mutex<Option<(Instant, Vec<cascade::Edge>)>>,
    /// Downstreams' cascade questions asking upstream now.
    pub(crate) peer_views: tokio::sync::Semaphore,
    /// One lock per view key: the same question asked at once is asked upstream once.
    pub(crate) in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Default for UiState {
    fn default() -> Self {
        UiState {
            sessions: Mutex::default(),
            failed: Mutex::default(),
            exclusive: Mutex::default(),
            upstream_views: Mutex::default(),
            own_edges: Mutex::default(),
            peer_views: tokio::sync::Semaphore::new(api::PEER_VIEWS_AT_ONCE),
            in_flight: Mutex::default(),
        }
    }
}

impl UiState {
    fn session_valid(&self, id: &str) -> bool {
        let mut s = self.sessions.lock().expect("not poisoned");
        let now = Instant::now();
        s.retain(|_, until| *until > now);
        // Compared as hashes, like tokens: the time taken says nothing of the id.
        s.keys().any(|k| crate::peer::same_secret(k, id))
    }

    fn new_session(&self) -> String {
        let id = crate::peer::new_token();
        let mut s = self.sessions.lock().expect("not poisoned");
        if s.len() >= MAX_SESSIONS
            && let Some(oldest) = s.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone())
        {
            s.remove(&oldest);
        }
        s.insert(id.clone(), Instant::now() + SESSION_FOR);
        id
    }

    fn end_session(&self, id: &str) {
        self.sessions
            .lock()
            .expect("not poisoned")
            .retain(|k, _| !crate::peer::same_secret(k, id));
    }

    /// Whether another login may be tried now (failures are limited, successes are not).
    fn may_try_login(&self) -> bool {
        let mut f = self.failed.lock().expect("not poisoned");
        f.retain(|t| t.elapsed() < Duration::from_secs(60));
        f.len() < FAILED_LOGINS_PER_MINUTE
    }

    fn failed_login(&self) {
        self.failed
            .lock()
            .expect("not poisoned")
            .push(Instant::now());
    }
}

/// The session id a request's cookie for node `node` carries.
fn session_of<'a>(headers: &'a HeaderMap, node: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.strip_prefix(COOKIE) == Some(node))
        .map(|(_, v)| v)
}

/// Whether a request came from a page of another site: browsers say where a request comes
/// from (`Sec-Fetch-Site`, `Origin`); scripts and this daemon's own page pass. The daemon's
/// own origin is the request's `Host` (HTTP/1.1) or its URI's authority (HTTP/2).
fn cross_site(headers: &HeaderMap, uri: &Uri) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return true;
    }
    match headers.get(header::ORIGIN) {
        None => false,
        Some(origin) => {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .or_else(|| uri.authority().map(|a| a.as_str()))
                .unwrap_or("");
            let origin = origin.to_str().unwrap_or("");
            let origin_host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"))
                .unwrap_or("");
            host.is_empty() || origin_host != host
        }
    }
}

/// How a request is allowed in, if it is.
fn admitted(s: &ServerState, headers: &HeaderMap, uri: &Uri) -> Result<(), &'static str> {
    if cross_site(headers, uri) {
        return Err("requests from other sites' pages are refused");
    }
    if crate::peer::same_secret(ServerState::bearer(headers), s.admin_token()) {
        return Ok(());
    }
    match session_of(headers, s.node().info.node_id.as_str()) {
        Some(id) if s.ui.session_valid(id) => Ok(()),
        Some(_) => {
            Err("the session ended (the daemon restarted, or 12 hours passed): log in again")
        }
        None => Err(
            "this needs the daemon's admin token: log in at /ui, or send it as a bearer token \
             (it is in daemon.json in the state directory)",
        ),
    }
}

/// The API's gate: a refusal is a JSON error (status 401, or 403 from another site).
async fn require_admin(State(s): State<Arc<ServerState>>, req: Request, next: Next) -> Response {
    match admitted(&s, req.headers(), req.uri()) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            s.counters
                .denied
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (status, kind) = if cross_site(req.headers(), req.uri()) {
                (StatusCode::FORBIDDEN, "denied")
            } else {
                (StatusCode::UNAUTHORIZED, "unauthenticated")
            };
            // The shape of every other error answer (`kind`, `message`).
            (
                status,
                Json(serde_json::json!({ "kind": kind, "message": why })),
            )
                .into_response()
        }
    }
}

/// The headers every page and answer of the UI carries.
async fn hardened(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: under it a browser sends a form's `Origin` as `null`, and the login
    // could not tell this daemon's own page from any other.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    r
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// `/ui`: the page, or the login form.
async fn page(State(s): State<Arc<ServerState>>, headers: HeaderMap, uri: Uri) -> Response {
    match admitted(&s, &headers, &uri) {
        Ok(()) => html(StatusCode::OK, INDEX_HTML.to_string()),
        Err(_) => html(StatusCode::OK, LOGIN_HTML.replace("{{message}}", "")),
    }
}

/// `POST /ui/login` (a form with `token`): a session cookie for the admin token.
async fn login(
    State(s): State<Arc<ServerState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let refuse = |status: StatusCode, msg: &str| {
        // `msg` is one of the fixed messages below, never what the request sent.
        html(
            status,
            LOGIN_HTML.replace("{{message}}", &format!("<p class=\"error\">{msg}</p>")),
        )
    };
    if cross_site(&headers, &uri) {
        return refuse(
            StatusCode::FORBIDDEN,
            "A login from another site's page is refused.",
        );
    }
    let token = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let right = !token.is_empty() && crate::peer::same_secret(&token, s.admin_token());
    // The token is 256 random bits: guessing is hopeless anyway. The limit keeps failures
    // from filling the log; the right token always gets in, so strangers cannot lock the
    // operator out.
    if !right && !s.ui.may_try_login() {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed logins in the last minute: wait a minute and try again.",
        );
    }
    if !right {
        s.ui.failed_login();
        s.counters
            .denied
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!("refused a login to the web page: wrong admin token");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "That is not this daemon's admin token (it is in daemon.json in the daemon's \
             state directory).",
        );
    }
    let id = s.ui.new_session();
    let secure = if s.tls() { "; Secure" } else { "" };
    let node = &s.node().info.node_id;
    let cookie = format!(
        "{COOKIE}{node}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_FOR.as_secs()
    );
    let mut r = Redirect::to("/ui").into_response();
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("cookie is ASCII"),
    );
    r
}

/// `POST /ui/logout`: ends the session.
async fn logout(State(s): State<Arc<ServerState>>, headers: HeaderMap, uri: Uri) -> Response {
    if cross_site(&headers, &uri) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let node = &s.node().info.node_id;
    if let Some(id) = session_of(&headers, node.as_str()) {
        s.ui.end_session(id);
    }
    let mut r = Redirect::to("/ui").into_response();
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{COOKIE}{node}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        ))
        .expect("ASCII"),
    );
    r
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// The page, its assets, the login and the API.
pub fn router(state: Arc<ServerState>) -> Router<Arc<ServerState>> {
    let api = Router::new()
        .route("/api/v1/node", get(api::node))
        .route("/api/v1/volumes", get(api::volumes))
        .route("/api/v1/volumes/{volume}", get(api::volume))
        .route("/api/v1/volumes/{volume}/snapshots", get(api::snapshots))
        .route("/api/v1/volumes/{volume}/timeline", get(api::timeline))
        .route("/api/v1/volumes/{volume}/holders", get(api::holders))
        .route("/api/v1/locks", get(api::locks))
        .route("/api/v1/jobs", get(api::jobs))
        .route("/api/v1/cascade", get(api::cascade))
        .route_layer(axum::middleware::from_fn_with_state(state, require_admin));
    Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(|| async { Redirect::permanent("/ui") }))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .merge(api)
        .layer(axum::middleware::from_fn(hardened))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn requests_from_other_sites_are_told_apart() {
        let root = Uri::from_static("/ui");
        let h1 = headers;
        // HTTP/2: no Host header, the authority is in the URI.
        let h2 = Uri::from_static("https://127.0.0.1:8443/ui/login");
        let same = headers(&[
            ("origin", "https://127.0.0.1:8443"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(!cross_site(&same, &h2));
        assert!(cross_site(&same, &root), "no Host and no authority");
        assert!(cross_site(
            &headers(&[("origin", "https://evil.example")]),
            &h2
        ));
        assert!(!cross_site(&h1(&[("host", "127.0.0.1:8443")]), &root));
        assert!(!cross_site(
            &h1(&[
                ("host", "127.0.0.1:8443"),
                ("origin", "https://127.0.0.1:8443"),
                ("sec-fetch-site", "same-origin"),
            ]),
            &root
        ));
        assert!(cross_site(
            &h1(&[
                ("host", "127.0.0.1:8443"),
                ("origin", "https://evil.example"),
            ]),
            &root
        ));
        assert!(cross_site(
            &h1(&[
                ("host", "127.0.0.1:8443"),
                ("origin", "https://127.0.0.1:8443.evil.example"),
            ]),
            &root
        ));
        assert!(cross_site(
            &h1(&[("host", "127.0.0.1:8443"), ("sec-fetch-site", "cross-site"),]),
            &root
        ));
        assert!(cross_site(
            &h1(&[("host", "127.0.0.1:8443"), ("sec-fetch-site", "same-site"),]),
            &root
        ));
        assert!(cross_site(&h1(&[("origin", "null")]), &root));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let h = headers(&[(
            "cookie",
            "a=1; holdfast-session-b=xyz; holdfast-session-a=abc; b=2",
        )]);
        assert_eq!(session_of(&h, "a"), Some("abc"));
        assert_eq!(session_of(&h, "b"), Some("xyz"));
        assert_eq!(session_of(&h, "c"), None);
        assert_eq!(session_of(&headers(&[("cookie", "a=1")]), "a"), None);
    }

    #[test]
    fn sessions_end_and_failed_logins_are_limited() {
        let ui = UiState::default();
        let id = ui.new_session();
        assert!(ui.session_valid(&id));
        assert!(!ui.session_valid("not-a-session"));
        ui.end_session(&id);
        assert!(!ui.session_valid(&id));
        for _ in 0..FAILED_LOGINS_PER_MINUTE {
            assert!(ui.may_try_login());
            ui.failed_login();
        }
        assert!(!ui.may_try_login());
        for _ in 0..MAX_SESSIONS + 5 {
            ui.new_session();
        }
        assert_eq!(ui.sessions.lock().unwrap().len(), MAX_SESSIONS);
    }
}
