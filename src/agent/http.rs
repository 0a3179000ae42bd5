//! The agent's HTTP endpoints, with hyper, on two addresses with different audiences:
//! - the probe address (`--readiness-addr`, loopback in the DaemonSet): `/readyz` (200 only
//!   while chained, the binary current, the last reconcile pass complete and no meshed pod
//!   known uncaptured or unchecked; else 503 with every reason, pods named) and `/healthz`
//!   (200 while every worker thread makes progress);
//! - the metrics address (`--metrics-addr`, the node's address, reachable by pods):
//!   `/metrics` only (Prometheus text 0.0.4, or OpenMetrics to a scraper that asks for it).
//!
//! Whatever reaches these ports, the agent's memory stays bounded: each listener serves a
//! fixed number of connections at once (more are closed at once, not queued in memory), a
//! request's head may not exceed a small buffer nor take more than a few seconds, and a
//! connection lives at most `CONN_LIFETIME`.

use super::Shared;
use super::readiness;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{prometheus_text, text};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once per listener. A scraper and the kubelet need one or two each.
pub const MAX_CONNECTIONS: usize = 16;
/// hyper's read buffer per connection (its minimum is 8 KiB): a request head that does not
/// fit is refused with 431.
const MAX_BUF: usize = 16 * 1024;
/// Headers per request (hyper's default is 100).
const MAX_HEADERS: usize = 32;
/// A request head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection is closed after this, whatever it is doing.
const CONN_LIFETIME: Duration = Duration::from_secs(10);

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `/readyz` and `/healthz`.
    Probes,
    /// `/metrics`.
    Metrics,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Probes => "probes",
            Role::Metrics => "metrics",
        }
    }
}

fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn plain(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

fn metrics(st: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let open = req
        .headers()
        .get(ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let mut body = String::new();
    let res = if open {
        text::encode(&mut body, &st.registry)
    } else {
        prometheus_text::encode(&mut body, &st.registry)
    };
    match res {
        Ok(()) if open => reply(StatusCode::OK, OPENMETRICS, body),
        Ok(()) => reply(StatusCode::OK, prometheus_text::CONTENT_TYPE, body),
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn route(
    st: Arc<Shared>,
    role: Role,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let known = match role {
        Role::Probes => matches!(path, "/readyz" | "/healthz"),
        Role::Metrics => path == "/metrics",
    };
    if !known {
        return Ok(plain(StatusCode::NOT_FOUND, "not found\n"));
    }
    if req.method() != Method::GET {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n",
        ));
    }
    Ok(match path {
        "/metrics" => metrics(&st, &req),
        "/healthz" => match st.health.check() {
            Ok(()) => plain(StatusCode::OK, "ok\n"),
            Err(e) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {e}\n")),
        },
        _ => {
            let why = st.readiness.check();
            let code = if why.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            plain(code, readiness::body(&why, &st.readiness.warnings()))
        }
    })
}

/// Accepts on `l` for as long as the process lives, serving at most `MAX_CONNECTIONS` at once.
async fn listen(st: Arc<Shared>, l: TcpListener, role: Role) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = l.accept().await else {
            // Out of fds or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Full: closing now costs nothing; holding it would cost memory per connection.
            st.metrics.http_rejected(role.name());
            drop(stream);
            continue;
        };
        let st = st.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| route(st.clone(), role, req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_BUF)
                .max_headers(MAX_HEADERS)
                .serve_connection(TokioIo::new(stream), svc);
            // A client that goes away mid-request is not our error.
            let _ = tokio::time::timeout(CONN_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

/// Serves the probe and metrics listeners until the process ends. Listeners are bound by the
/// caller (so a port in use fails the start, not a thread).
pub fn serve(
    st: Arc<Shared>,
    probes: Option<std::net::TcpListener>,
    metrics: Option<std::net::TcpListener>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for (l, role) in [(probes, Role::Probes), (metrics, Role::Metrics)] {
            let Some(l) = l else { continue };
            l.set_nonblocking(true)?;
            let l = TcpListener::from_std(l)?;
            tasks.push(tokio::spawn(listen(st.clone(), l, role)));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}
