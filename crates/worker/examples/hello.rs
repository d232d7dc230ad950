//! A hello-world HTTP worker on `corral-worker` and axum. Under corral in shared mode it serves
//! on the app's listening socket; run alone, on `127.0.0.1:8080` (or `$HELLO_ADDR`).
//!
//! ```sh
//! cargo build --release --example hello -p corral-worker
//! corral start target/release/examples/hello -i 2 --listen 127.0.0.1:8080 --wait-ready
//! ```
//!
//! On SIGTERM it stops accepting, finishes the requests in flight, and exits: what a zero-downtime
//! `corral reload` needs.

use axum::Router;
use axum::routing::get;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let fallback = std::env::var("HELLO_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let listener = corral_worker::tcp_listener_or_bind(&fallback)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    corral_worker::install_panic_hook();

    let who = match corral_worker::worker_id() {
        Some(id) => format!("worker {id} (pid {})", std::process::id()),
        None => format!("standalone (pid {})", std::process::id()),
    };
    let app = Router::new().route(
        "/",
        get(move || async move { format!("hello from {who}\n") }),
    );

    eprintln!("serving on {}", listener.local_addr()?);
    corral_worker::ready()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            term.recv().await;
        })
        .await
}
