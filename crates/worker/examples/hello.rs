//! A hello-world HTTP worker on `corral-worker`, axum and hyper, for every `--lb` mode: under
//! corral it takes its connections where corral gives them (handed over by the master in `rr` and
//! `least-conn` modes, the inherited socket in `shared` mode, `PORT` in `proxy` mode); run alone,
//! it listens on `127.0.0.1:8080` (or `$HELLO_ADDR`; with `HELLO_REUSEPORT=1`, with
//! `SO_REUSEPORT`, so that several can share a port the kernel's way).
//!
//! ```sh
//! cargo build --release --example hello -p corral-worker --features tokio
//! corral start target/release/examples/hello -i 2 --listen 127.0.0.1:8080
//! ```
//!
//! It drains without failing a request, keep-alive included: when told to shut down (corral's
//! notice before a reload or stop, SIGTERM, SIGINT) it takes no new connection, answers the next
//! request on each open one with `Connection: close`, gives idle connections a moment to send
//! it, closes those still idle, and exits once the last connection is done.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

/// After a shutdown notice, how long idle keep-alive connections may take to send one more
/// request (answered with `Connection: close`) before they are closed.
const IDLE_GRACE: Duration = Duration::from_secs(1);
/// The longest the drain may take.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    corral_worker::install_panic_hook();
    let who = match corral_worker::worker_id() {
        Some(id) => format!("worker {id} (pid {})", std::process::id()),
        None => format!("standalone (pid {})", std::process::id()),
    };
    let draining = Arc::new(AtomicBool::new(false));
    let app = Router::new()
        .route(
            "/",
            get(move || async move { format!("hello from {who}\n") }),
        )
        .layer(middleware::from_fn_with_state(
            draining.clone(),
            close_when_draining,
        ));

    // Messages from `corral send hello <json>` go to the log.
    tokio::spawn(async {
        while let Some(message) = corral_worker::tokio::message().await {
            eprintln!("message from corral: {message}");
        }
    });

    let (live, mut live_count) = watch::channel(0usize);
    let (close_idle, idle_closed) = watch::channel(false);
    let server = Server {
        app,
        live,
        idle_closed,
    };
    let serve = |stream| server.serve(stream);
    let serve_tcp = |stream| server.serve(stream);

    if std::env::var_os("HELLO_REUSEPORT").is_some() && !corral_worker::is_worker() {
        // The kernel's balancing across processes, for comparison: no corral involved.
        let listener = reuseport_listener()?;
        eprintln!("serving on {} (SO_REUSEPORT)", listener.local_addr()?);
        let shutdown = corral_worker::tokio::shutdown();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        serve_tcp(stream);
                    }
                    Err(e) => eprintln!("accept: {e}"),
                },
                () = &mut shutdown => break,
            }
        }
    } else {
        let fallback = std::env::var("HELLO_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
        let mut incoming = corral_worker::tokio::incoming(&fallback)?;
        match incoming.local_addr() {
            Some(addr) => eprintln!("serving on {addr}"),
            None => eprintln!("serving the connections corral hands over"),
        }
        corral_worker::ready()?;
        let shutdown = corral_worker::tokio::shutdown();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                next = incoming.accept() => match next {
                    Some(Ok(stream)) => {
                        if let Some(tcp) = stream.tcp() {
                            let _ = tcp.set_nodelay(true);
                        }
                        serve(stream);
                    }
                    Some(Err(e)) => eprintln!("accept: {e}"),
                    None => break,
                },
                () = &mut shutdown => break,
            }
        }
    }

    // Drain: every response now says `Connection: close`; idle connections get a moment to
    // send their next request, then are closed; the rest finish their requests.
    draining.store(true, Ordering::SeqCst);
    let open = *live_count.borrow();
    eprintln!("draining {open} connection(s)");
    let all_done = |count: &mut watch::Receiver<usize>| {
        let mut count = count.clone();
        async move {
            let _ = count.wait_for(|n| *n == 0).await;
        }
    };
    if tokio::time::timeout(IDLE_GRACE, all_done(&mut live_count))
        .await
        .is_err()
    {
        let _ = close_idle.send(true);
        let _ = tokio::time::timeout(DRAIN_LIMIT, all_done(&mut live_count)).await;
    }
    eprintln!("exiting");
    Ok(())
}

/// Serves connections, counting the open ones.
struct Server {
    app: Router,
    live: watch::Sender<usize>,
    idle_closed: watch::Receiver<bool>,
}

impl Server {
    fn serve<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = TowerToHyperService::new(self.app.clone());
        let (live, mut idle_closed) = (self.live.clone(), self.idle_closed.clone());
        live.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = async { let _ = idle_closed.wait_for(|closing| *closing).await; } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            live.send_modify(|n| *n -= 1);
        });
    }
}

async fn close_when_draining(
    State(draining): State<Arc<AtomicBool>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    if draining.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn reuseport_listener() -> std::io::Result<tokio::net::TcpListener> {
    let address: std::net::SocketAddr = std::env::var("HELLO_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8080".into())
        .parse()
        .map_err(std::io::Error::other)?;
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}
