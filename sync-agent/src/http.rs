//! The agent's HTTP server (`[node] http`): health for load balancers and
//! monitors, Prometheus metrics, and a status page.
//!
//! - `GET /health`: 200 when every folder is connected and its lag is within
//!   its `max_lag_secs`, 503 otherwise; a JSON body per folder ([`health`]).
//! - `GET /health/{folder}/active`: 200 on the node that is the folder's
//!   source, 503 elsewhere, 404 for an unknown folder (what HAProxy, Traefik,
//!   keepalived or a readiness probe route on).
//! - `GET /metrics`: OpenMetrics text ([`crate::metrics`]).
//! - `GET /`: a page for people ([`crate::page`]).
//!
//! Read-only: nothing here changes the agent. Bounded against a hostile
//! client: at most [`MAX_CONNECTIONS`] at once (more are closed at accept),
//! the request head within [`HEAD_TIMEOUT`] and [`MAX_HEAD`] bytes, the whole
//! exchange within [`CONN_TIMEOUT`], one request per connection, bodies never
//! read. With `http_token_file`, every request must carry
//! `Authorization: Bearer TOKEN`, compared in constant time.

use crate::surface::Shared;
use anyhow::{Context, Result, bail};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; more are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// The request head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole connection (head, answer, the client reading it) ends after this.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head read (hyper's buffer; its minimum is 8 KiB).
pub const MAX_HEAD: usize = 8 << 10;

/// Reads a bearer token file: owned by root (or the agent's user), not
/// readable or writable by others, one non-empty line of at most 4 KiB.
pub fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    crate::trust::check(path, crate::trust::Kind::Token)?;
    let token = text.trim().to_string();
    if token.is_empty() || token.len() > 4096 || token.contains(char::is_whitespace) {
        bail!(
            "token file {}: expected one token of 1 to 4096 characters without spaces",
            path.display()
        );
    }
    Ok(token)
}

/// Whether `header` (an `Authorization` value) carries `token`. Both sides
/// are hashed first: the comparison takes the same time wherever they differ
/// and whatever their lengths (blake3's `Hash` compares in constant time).
#[must_use]
pub fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
        return false;
    };
    blake3::hash(given) == blake3::hash(token.as_bytes())
}

/// Answers HTTP requests on `listener` until the task is dropped.
pub async fn listen(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!("http: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&shared, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONN_TIMEOUT, conn).await;
        });
    }
}

fn reply(code: StatusCode, kind: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn json(code: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(code, "application/json", format!("{v}\n"))
}

fn ok_or_unavailable(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The answer to one request.
fn answer<B>(shared: &Shared, req: &Request<B>) -> Response<Full<Bytes>> {
    if let Some(token) = &shared.token {
        let h = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if !authorized(h, token) {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "bearer token needed\n",
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    let path = req.uri().path();
    let status = shared.registry.snapshot();
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["", "health"] => {
            // The current or last handover of each folder, ended ones included.
            let mut status = status.clone();
            status.handovers = shared
                .registry
                .handovers
                .values()
                .map(|h| h.progress(usize::MAX))
                .filter(|p| p.id > 0)
                .collect();
            let (ok, body) = health(&status, &|f| shared.max_lag(f));
            json(ok_or_unavailable(ok), &body)
        }
        ["", "health", folder, "active"] => {
            let rows: Vec<_> = status
                .folders
                .iter()
                .filter(|f| f.folder == *folder)
                .collect();
            if rows.is_empty() {
                return json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": format!("no folder named {folder:?} on this node")}),
                );
            }
            let active = rows.iter().any(|f| f.role == "source");
            let role = if active { "source" } else { "replica" };
            json(
                ok_or_unavailable(active),
                &serde_json::json!({"folder": folder, "active": active, "role": role, "node": status.node}),
            )
        }
        ["", "metrics"] => match crate::metrics::encode_status(&status, shared) {
            Ok(text) => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        ["", ""] => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::page::render(&status, shared),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Whether every folder of `status` is healthy, and the JSON body of
/// `/health`: per folder its role, epoch, connection, lag and bound, last
/// applied round, held databases, its current or last handover (kind, step,
/// running, outcome), and the reasons when unhealthy.
/// `max_lag` gives a folder's bound in seconds.
#[must_use]
pub fn health(
    status: &crate::control::Status,
    max_lag: &dyn Fn(&str) -> f64,
) -> (bool, serde_json::Value) {
    let mut all_ok = true;
    let folders: Vec<serde_json::Value> = status
        .folders
        .iter()
        .map(|f| {
            let bound = max_lag(&f.folder);
            let reasons: Vec<String> = crate::lag::check(std::slice::from_ref(f), bound)
                .into_iter()
                .map(|p| p.what)
                .collect();
            all_ok &= reasons.is_empty();
            let handover =
                status.handovers.iter().find(|h| h.folder == f.folder).map(
                    |h| {
                        let outcome = h.outcome.as_ref().map(|o| o.step.as_str());
                        serde_json::json!({"kind": h.kind, "step": h.step, "running": h.running, "outcome": outcome})
                    },
                );
            serde_json::json!({
                "folder": f.folder,
                "role": f.role,
                "peer": f.peer,
                "epoch": f.epoch,
                "connected": f.connected,
                "lag_s": f.lag_s,
                "max_lag_s": bound,
                "files_pending": f.files_pending,
                "last_applied_unix": f.last_applied_unix,
                "root_hash": f.root_hash,
                "held_databases": f.held_databases,
                "handover": handover,
                "healthy": reasons.is_empty(),
                "reasons": reasons,
            })
        })
        .collect();
    let body = serde_json::json!({
        "healthy": all_ok,
        "node": status.node,
        "folders": folders,
    });
    (all_ok, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::continuous::FolderStatus;

    fn status(rows: Vec<FolderStatus>) -> crate::control::Status {
        crate::control::Status {
            node: "n".into(),
            folders: rows,
            ..Default::default()
        }
    }

    #[test]
    fn health_is_per_folder_bound_and_names_the_reason() {
        let row = |name: &str, lag_s: f64| FolderStatus {
            folder: name.into(),
            role: "source".into(),
            connected: true,
            lag_s,
            ..Default::default()
        };
        let bound = |f: &str| if f == "a" { 2.0 } else { 30.0 };
        let (ok, body) = health(&status(vec![row("a", 1.0), row("b", 20.0)]), &bound);
        assert!(ok, "{body}");
        let (ok, body) = health(&status(vec![row("a", 3.0), row("b", 20.0)]), &bound);
        assert!(!ok);
        assert_eq!(body["folders"][0]["healthy"], false);
        assert!(
            body["folders"][0]["reasons"][0]
                .as_str()
                .is_some_and(|r| r.contains("over 2 s")),
            "{body}"
        );
        assert_eq!(body["folders"][1]["healthy"], true);
        let mut down = row("b", 0.0);
        down.connected = false;
        assert!(!health(&status(vec![down]), &bound).0);
    }

    #[test]
    fn health_names_the_folders_handover_and_how_it_ended() {
        let mut st = status(vec![FolderStatus {
            folder: "app".into(),
            role: "replica".into(),
            connected: true,
            ..Default::default()
        }]);
        st.handovers = vec![crate::handover::Progress {
            folder: "app".into(),
            id: 1,
            kind: "failover".into(),
            step: "rolled_back".into(),
            outcome: Some(crate::handover::Outcome {
                step: "rolled_back".into(),
                ..Default::default()
            }),
            ..Default::default()
        }];
        let (ok, body) = health(&st, &|_| 30.0);
        assert!(ok, "{body}");
        let h = &body["folders"][0]["handover"];
        assert_eq!(
            (h["kind"].as_str(), h["running"].as_bool()),
            (Some("failover"), Some(false))
        );
        assert_eq!(h["outcome"], "rolled_back", "{body}");
    }

    #[test]
    fn a_token_is_needed_whole_and_exact() {
        assert!(authorized(Some(b"Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3cretX"), "s3cret"));
        assert!(!authorized(Some(b"bearer s3cret"), "s3cret"));
        assert!(!authorized(Some(b"s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }
}
