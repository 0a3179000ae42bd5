//! The agent's HTTP endpoints, with hyper: `/readyz` (200 only while chained, the binary
//! current, the last reconcile pass done and no meshed pod known uncaptured; else 503 with the
//! reason), `/healthz` (200 while the process runs) and
//! `/metrics` (Prometheus text 0.0.4, or OpenMetrics to a scraper that asks for it).

use super::Shared;
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

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

async fn route(
    st: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let open = req
                .headers()
                .get(ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            let mut body = String::new();
            // Writing into a String cannot fail.
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
        (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => match st.ready() {
            Ok(()) => plain(StatusCode::OK, "ok\n"),
            Err(why) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        (_, "/metrics" | "/healthz" | "/readyz") => {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// Serves the endpoints on every listener until the process ends. Listeners are bound by the
/// caller (so a port in use fails the start, not a thread).
pub fn serve(st: Arc<Shared>, listeners: Vec<std::net::TcpListener>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for l in listeners {
            l.set_nonblocking(true)?;
            let l = TcpListener::from_std(l)?;
            let st = st.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = l.accept().await else {
                        // Out of fds or similar: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| route(st.clone(), req));
                        let conn = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(5))
                            .serve_connection(TokioIo::new(stream), svc);
                        // A client that goes away mid-request is not our error.
                        let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                    });
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}
