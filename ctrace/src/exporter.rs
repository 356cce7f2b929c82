//! The Prometheus endpoint: HTTP/1 on the tokio runtime, serving the
//! exposition the Prometheus sink rendered last.
//!
//! A scrape costs a copy of a reference-counted buffer; nothing a client
//! does reaches the tracing loop. Abuse is bounded: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at accept), a client gets
//! [`HEADER_TIMEOUT`] to send its request head and [`CONNECTION_LIFETIME`]
//! in all, and one request per connection.
//!
//! A full conntrack table drops the SYN of every new connection, scrapes
//! included. `--metrics-notrack` exempts connections to the endpoint
//! from conntrack with nf_tables rules at raw priority (see
//! [`crate::netlink::nftables::NotrackRule`]), removed when ctrace exits.
use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::{netlink::nftables, netns::NetNs, sink::prometheus::Exposition};

/// Scrapers are few (Prometheus, an agent, a curl by hand).
pub const MAX_CONNECTIONS: usize = 8;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(15);
/// The exposition format served (what Prometheus, promtool and
/// node_exporter's textfile collector parse).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `PORT`, `ADDR:PORT` or `[V6ADDR]:PORT`. A bare port binds loopback only:
/// exposing the endpoint is the user's choice.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>().map_err(|_| {
        format!("`{s}` is not a listen address: use PORT, ADDR:PORT or [ADDR]:PORT (e.g. 9465, 0.0.0.0:9465)")
    })
}

/// Where and how to serve.
pub struct Options {
    pub listen: SocketAddr,
    /// Listen inside this namespace instead of ctrace's own.
    pub netns: Option<NetNs>,
    /// Exempt the port from conntrack while ctrace runs.
    pub notrack: bool,
}

/// A running endpoint; dropping it stops serving and removes the NOTRACK
/// rule.
pub struct Endpoint {
    pub local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    _notrack: Option<nftables::NotrackRule>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    // A restart must not wait out the last run's TIME_WAIT connections.
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(64)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Binds (in the namespace asked for), installs the NOTRACK rule if asked,
/// and serves `exposition` until the endpoint is dropped. Must be called
/// on the tokio runtime.
pub fn start(opts: Options, exposition: Exposition) -> anyhow::Result<Endpoint> {
    let listen = opts.listen;
    let listener = match &opts.netns {
        Some(ns) => ns.run(move || bind(listen))?,
        None => bind(listen),
    }
    .with_context(|| format!("--metrics {listen}: cannot listen"))?;
    let local = listener.local_addr()?;
    let notrack = if opts.notrack {
        Some(
            nftables::NotrackRule::install(opts.netns.as_ref(), local).with_context(|| {
                format!(
                    "--metrics-notrack: exempting TCP port {} from conntrack",
                    local.port()
                )
            })?,
        )
    } else {
        None
    };
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let task = tokio::spawn(accept_loop(listener, exposition));
    Ok(Endpoint {
        local,
        task,
        _notrack: notrack,
    })
}

async fn accept_loop(listener: tokio::net::TcpListener, exposition: Exposition) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            log::debug!("metrics endpoint: {peer} refused, {MAX_CONNECTIONS} connections open");
            continue;
        };
        let exposition = exposition.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let body = exposition.latest();
                async move { Ok::<_, Infallible>(respond(&req, body)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Err(e)) => log::debug!("metrics endpoint: {peer}: {e}"),
                Err(_) => log::debug!("metrics endpoint: {peer} took too long; closed"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn respond(req: &Request<Incoming>, body: Bytes) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, msg: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(msg.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") if body.is_empty() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "ctrace has not sampled the tables yet; retry after one interval\n",
        ),
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let mut r = Response::new(Full::new(body));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        (_, "/metrics") => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            r
        }
        (&Method::GET, "/") => text(
            StatusCode::OK,
            "ctrace: conntrack pressure tracer. Metrics at /metrics\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("9465").unwrap().to_string(), "127.0.0.1:9465");
        assert_eq!(
            parse_listen("0.0.0.0:9465").unwrap().to_string(),
            "0.0.0.0:9465"
        );
        assert_eq!(parse_listen("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert!(
            parse_listen("localhost")
                .unwrap_err()
                .contains("listen address")
        );
        assert!(parse_listen("99999").is_err());
    }
}
