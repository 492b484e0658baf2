//! The routes, and the mapping between the JSON API and the queue commands
//! of [`crate::delivery::control`] (the command line sends those commands
//! as these requests over the control socket).
//!
//! | method and path | what |
//! | --- | --- |
//! | `GET /` | the live status page |
//! | `GET /api/v1/status` | what the status page shows, as JSON |
//! | `GET /health` | `ok` while the process runs |
//! | `GET /ready` | 200 once the listeners accept, the spool is open and the chain loaded, else 503 |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /api/v1/queue?domain=&sender=&older_than=&state=` | `{"messages": [...]}` |
//! | `GET /api/v1/queue/{id}` | one message |
//! | `GET /api/v1/queue/summary?...` | destinations by count and age |
//! | `POST /api/v1/queue/{flush,hold,release,delete}` | body: a selector (`id`, `domain`, `sender`, `older_than`, `state`, `all`); `{"ids": [...]}` |
//! | `POST /api/v1/queue/suspend` | `{"domain": D, "for": "2h"}` (`for` optional) |
//! | `POST /api/v1/queue/resume` | `{"domain": D}` |
//! | `GET /api/v1/queue/suspended` | `{"suspended": [{"domain", "until"}]}` |
//! | `GET /api/v1/plugins` | the chain, with per-hook counters |
//! | `POST /api/v1/messages` | injection (see [`super::inject`]) |

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path as AxPath, Query, State as AxState};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::guard::{self, error, Transport};
use super::State;
use crate::config::HumanDuration;
use crate::delivery::control::{self, Action, Answer, Entry, Failure, Request, Selector};

type Shared = AxState<Arc<State>>;

/// The router for one transport.
pub fn router(state: Arc<State>, transport: Transport) -> Router {
    let login = Router::new()
        .route("/login", get(guard::login_form).post(guard::login))
        .with_state((state.clone(), transport));
    Router::new()
        .route("/", get(super::status::page))
        .route("/api/v1/status", get(super::status::status))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/queue", get(list))
        .route("/api/v1/queue/summary", get(summary))
        .route("/api/v1/queue/suspended", get(suspended))
        .route("/api/v1/queue/suspend", post(suspend))
        .route("/api/v1/queue/resume", post(resume))
        .route("/api/v1/queue/{name}", get(show).post(act))
        .route("/api/v1/plugins", get(plugins))
        .route(
            "/api/v1/messages",
            post(super::inject::inject).layer(DefaultBodyLimit::max(super::inject::body_limit(
                state.ctx.config.limits.max_message_size,
            ))),
        )
        .with_state(state.clone())
        .merge(login)
        .layer(axum::middleware::from_fn_with_state(
            (state, transport),
            guard::guard,
        ))
}

/// A selector as the API takes it, in a query string or a JSON body:
/// `older_than` as a duration (`"2d"`, or seconds).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    older_than: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    all: Option<bool>,
}

impl From<ApiSelector> for Selector {
    fn from(a: ApiSelector) -> Selector {
        Selector {
            id: a.id,
            domain: a.domain,
            sender: a.sender,
            older_than: a.older_than.map(|d| d.0.as_secs()),
            state: a.state,
            all: a.all.unwrap_or(false),
        }
    }
}

impl From<&Selector> for ApiSelector {
    fn from(s: &Selector) -> ApiSelector {
        ApiSelector {
            id: s.id.clone(),
            domain: s.domain.clone(),
            sender: s.sender.clone(),
            older_than: s.older_than.map(|n| HumanDuration(Duration::from_secs(n))),
            state: s.state.clone(),
            all: s.all.then_some(true),
        }
    }
}

/// `{"domain": D, "for": "2h"}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendBody {
    domain: String,
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    for_: Option<HumanDuration>,
}

/// A 400 for input that did not parse, naming what serde named.
fn bad_input(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

fn failure(e: Failure) -> Response {
    match &e {
        Failure::Field { field, message } => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": format!("{field}: {message}"), "field": field })),
        )
            .into_response(),
        Failure::NotFound(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        Failure::Spool(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn run(state: &State, req: Request) -> Response {
    match control::handle(&state.delivery, req).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => failure(e),
    }
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(AxState(state): Shared) -> Response {
    let listening = state.listening();
    let spool = state.delivery.queue_dir().is_dir();
    let plugins = state.ctx.chain.current().plugins().len();
    let body = serde_json::json!({
        "ready": listening && spool,
        "listening": listening,
        "spool": spool,
        "plugins": plugins,
    });
    let status = if listening && spool {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(AxState(state): Shared) -> Response {
    let page = super::scrape::page(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        page,
    )
        .into_response()
}

async fn list(AxState(state): Shared, q: Result<Query<ApiSelector>, QueryRejection>) -> Response {
    match q {
        Ok(Query(s)) => run(&state, Request::List(s.into())).await,
        Err(e) => bad_input(e.body_text()),
    }
}

async fn summary(
    AxState(state): Shared,
    q: Result<Query<ApiSelector>, QueryRejection>,
) -> Response {
    match q {
        Ok(Query(s)) => run(&state, Request::Summary(s.into())).await,
        Err(e) => bad_input(e.body_text()),
    }
}

async fn suspended(AxState(state): Shared) -> Response {
    run(&state, Request::Suspended).await
}

async fn suspend(
    AxState(state): Shared,
    body: Result<Json<SuspendBody>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => {
            let for_secs = b.for_.map(|d| d.0.as_secs());
            run(
                &state,
                Request::Suspend {
                    domain: b.domain,
                    for_secs,
                },
            )
            .await
        }
        Err(e) => bad_input(e.body_text()),
    }
}

async fn resume(
    AxState(state): Shared,
    body: Result<Json<SuspendBody>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => run(&state, Request::Resume { domain: b.domain }).await,
        Err(e) => bad_input(e.body_text()),
    }
}

async fn show(AxState(state): Shared, AxPath(id): AxPath<String>) -> Response {
    match control::handle(&state.delivery, Request::Show { id }).await {
        Ok(Answer::Entries { mut messages }) if !messages.is_empty() => {
            Json(messages.remove(0)).into_response()
        }
        Ok(_) => error(StatusCode::NOT_FOUND, "no such message"),
        Err(e) => failure(e),
    }
}

async fn act(
    AxState(state): Shared,
    AxPath(name): AxPath<String>,
    body: Result<Json<ApiSelector>, JsonRejection>,
) -> Response {
    let Some(action) = Action::parse(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no queue action {name:?} (flush, hold, release, delete, suspend, resume)"),
        );
    };
    match body {
        Ok(Json(s)) => {
            let selector = s.into();
            run(&state, Request::Act { action, selector }).await
        }
        Err(e) => bad_input(e.body_text()),
    }
}

async fn plugins(AxState(state): Shared) -> Response {
    Json(crate::plugins::reload::status(&state.ctx.chain)).into_response()
}

/// Bytes not in RFC 3986's unreserved set, percent-encoded.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query(s: &Selector) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("id", s.id.clone()),
        ("domain", s.domain.clone()),
        ("sender", s.sender.clone()),
        ("older_than", s.older_than.map(|n| n.to_string())),
        ("state", s.state.clone()),
        ("all", s.all.then(|| "true".to_string())),
    ] {
        if let Some(v) = v {
            parts.push(format!("{k}={}", encode(&v)));
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// A command as an HTTP request: method, path and query, JSON body.
pub fn to_http(req: &Request) -> (&'static str, String, Option<Vec<u8>>) {
    let json = |v: serde_json::Result<Vec<u8>>| Some(v.unwrap_or_default());
    match req {
        Request::List(s) => ("GET", format!("/api/v1/queue{}", query(s)), None),
        Request::Show { id } => ("GET", format!("/api/v1/queue/{}", encode(id)), None),
        Request::Summary(s) => ("GET", format!("/api/v1/queue/summary{}", query(s)), None),
        Request::Act { action, selector } => (
            "POST",
            format!("/api/v1/queue/{}", action.as_str()),
            json(serde_json::to_vec(&ApiSelector::from(selector))),
        ),
        Request::Suspend { domain, for_secs } => (
            "POST",
            "/api/v1/queue/suspend".into(),
            json(serde_json::to_vec(&SuspendBody {
                domain: domain.clone(),
                for_: for_secs.map(|s| HumanDuration(Duration::from_secs(s))),
            })),
        ),
        Request::Resume { domain } => (
            "POST",
            "/api/v1/queue/resume".into(),
            json(serde_json::to_vec(&SuspendBody {
                domain: domain.clone(),
                for_: None,
            })),
        ),
        Request::Suspended => ("GET", "/api/v1/queue/suspended".into(), None),
    }
}

/// The answer to `req` from its HTTP body.
pub fn answer_from_http(req: &Request, body: &[u8]) -> serde_json::Result<Answer> {
    match req {
        Request::Show { .. } => Ok(Answer::Entries {
            messages: vec![serde_json::from_slice::<Entry>(body)?],
        }),
        _ => serde_json::from_slice(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the command line sends comes back as the same command.
    #[test]
    fn selectors_survive_the_query_string() {
        let s = Selector {
            domain: Some("example.com".into()),
            sender: Some("a+b@x.test".into()),
            older_than: Some(172800),
            state: Some("deferred".into()),
            ..Selector::default()
        };
        let (method, path, body) = to_http(&Request::List(s.clone()));
        assert_eq!(method, "GET");
        assert!(body.is_none());
        let q = path.split_once('?').unwrap().1;
        let back: ApiSelector = serde_urlencoded_like(q);
        assert_eq!(Selector::from(back), s);
    }

    fn serde_urlencoded_like(q: &str) -> ApiSelector {
        let uri: axum::http::Uri = format!("/x?{q}").parse().unwrap();
        Query::<ApiSelector>::try_from_uri(&uri).unwrap().0
    }
}
