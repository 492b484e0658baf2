//! Who may use the admin API. The control socket is trusted: it lives in
//! the spool folder (mode 0700) with mode 0600, so only the relay's user
//! reaches it. Over TCP, with `[admin] token` set, every request but
//! `/health` and the login form needs it: `Authorization: Bearer TOKEN`, or
//! the session cookie a browser gets by logging in with it once. Without a
//! token (loopback only, the config makes sure) anyone on the machine may
//! read (metrics, status, the queue, as Postfix lets anyone run `mailq`),
//! and nobody may change anything over TCP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Form, Request, State as AxState};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use rand::Rng;

use super::State;

/// How a request reached the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The control socket in the spool folder.
    ControlSocket,
    /// The HTTP listener; `tls` when it speaks HTTPS.
    Tcp {
        /// HTTPS.
        tls: bool,
    },
}

/// The browser session cookie's name.
pub const COOKIE: &str = "postern_session";
/// How long a browser session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Equal without an early exit, so the time taken says nothing about how
/// much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The request carries the token as a bearer credential.
pub fn bearer_ok(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()))
}

fn session_ok(state: &State, headers: &HeaderMap) -> bool {
    let Some(id) = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
    else {
        return false;
    };
    let sessions = state.sessions.lock().unwrap_or_else(|e| e.into_inner());
    sessions
        .iter()
        .any(|(s, expiry)| same(s.as_bytes(), id.as_bytes()) && *expiry > Instant::now())
}

/// A JSON error body: `{"error": "..."}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// The middleware: lets a request through or answers it.
pub async fn guard(
    AxState((state, transport)): AxState<(Arc<State>, Transport)>,
    req: Request,
    next: Next,
) -> Response {
    if transport == Transport::ControlSocket {
        return next.run(req).await;
    }
    let path = req.uri().path();
    // Injection checks its own credentials: the token, or a user's.
    if path == "/health" || path == "/login" || path == "/api/v1/messages" {
        return next.run(req).await;
    }
    let Some(token) = state.ctx.config.admin.token.as_deref() else {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            return next.run(req).await;
        }
        return error(
            StatusCode::FORBIDDEN,
            "changes over HTTP need [admin] token; without it, use the control socket (`postern queue`)",
        );
    };
    if bearer_ok(req.headers(), token) || session_ok(&state, req.headers()) {
        return next.run(req).await;
    }
    let html = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if html && req.method() == Method::GET {
        return Redirect::to("/login").into_response();
    }
    let mut resp = error(
        StatusCode::UNAUTHORIZED,
        "needs Authorization: Bearer <admin token>",
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

const LOGIN_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Postern: log in</title>
<style>body{font-family:system-ui,sans-serif;margin:4em auto;max-width:24em}input{font-size:1em;padding:.3em;width:100%;box-sizing:border-box;margin:.3em 0}</style>
</head><body><h1>Postern</h1><p>MESSAGE</p>
<form method="post" action="/login"><label>Admin token <input type="password" name="token" autofocus required></label>
<input type="submit" value="Log in"></form></body></html>
"#;

/// `GET /login`: the form.
pub async fn login_form() -> Html<String> {
    Html(LOGIN_PAGE.replace("MESSAGE", "Log in with the admin token."))
}

/// The login form's fields.
#[derive(serde::Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /login`: a session cookie for the right token.
pub async fn login(
    AxState((state, transport)): AxState<(Arc<State>, Transport)>,
    Form(form): Form<Login>,
) -> Response {
    let Some(token) = state.ctx.config.admin.token.as_deref() else {
        return Redirect::to("/").into_response();
    };
    if !same(form.token.as_bytes(), token.as_bytes()) {
        // Slows down guessing; the token is long enough that this suffices.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let page = LOGIN_PAGE.replace("MESSAGE", "That is not the admin token.");
        return (StatusCode::UNAUTHORIZED, Html(page)).into_response();
    }
    let id = hex::encode(rand::rng().random::<[u8; 32]>());
    {
        let mut sessions = state.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|_, expiry| *expiry > now);
        sessions.insert(id.clone(), now + SESSION_TTL);
    }
    let secure = if transport == (Transport::Tcp { tls: true }) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    let mut resp = Redirect::to("/").into_response();
    if let Ok(v) = header::HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcde"));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef".parse().unwrap(),
        );
        assert!(bearer_ok(&h, "0123456789abcdef"));
        assert!(!bearer_ok(&h, "0123456789abcdeg"));
        h.insert(
            header::AUTHORIZATION,
            "Basic 0123456789abcdef".parse().unwrap(),
        );
        assert!(!bearer_ok(&h, "0123456789abcdef"));
    }
}
