//! The same as the blocking API, for tokio programs (feature `tokio`): [`incoming`] gives
//! [`Stream`]s, ready for hyper, axum or any tokio server, and [`shutdown`] completes when the
//! worker should stop taking work.
//!
//! ```no_run
//! # async fn serve(_: corral_worker::tokio::Stream) {}
//! # async fn run() -> std::io::Result<()> {
//! let mut incoming = corral_worker::tokio::incoming("127.0.0.1:8080")?;
//! corral_worker::ready()?;
//! let shutdown = corral_worker::tokio::shutdown();
//! tokio::pin!(shutdown);
//! loop {
//!     tokio::select! {
//!         next = incoming.accept() => match next {
//!             Some(Ok(stream)) => { tokio::spawn(serve(stream)); }
//!             Some(Err(e)) => eprintln!("accept: {e}"),
//!             None => break,
//!         },
//!         () = &mut shutdown => break,
//!     }
//! }
//! // Finish the open connections, then return.
//! # Ok(())
//! # }
//! ```

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::Listener;
use crate::channel::{self, Channel, CloseReport};
use crate::incoming::Source;

/// This worker's incoming connections, as [`crate::incoming`] finds them. Call it within a
/// tokio runtime.
pub fn incoming(fallback: &str) -> io::Result<Incoming> {
    let source = match Source::find(fallback)? {
        Source::Channel(channel) => Inner::Channel(channel),
        Source::Listeners(listeners) => {
            let mut watched = Vec::new();
            for listener in listeners {
                watched.push(match listener {
                    Listener::Tcp(tcp) => {
                        tcp.set_nonblocking(true)?;
                        Watched::Tcp(TcpListener::from_std(tcp)?)
                    }
                    Listener::Unix(unix) => {
                        unix.set_nonblocking(true)?;
                        Watched::Unix(UnixListener::from_std(unix)?)
                    }
                });
            }
            Inner::Listeners(watched)
        }
    };
    let shutdown = match (&source, channel::get()) {
        (Inner::Listeners(_), Some(channel)) => {
            Some(Box::pin(channel.shutdown_notice()) as Pin<Box<dyn Future<Output = ()> + Send>>)
        }
        _ => None,
    };
    Ok(Incoming { source, shutdown })
}

/// The connections of this worker: see [`incoming`].
pub struct Incoming {
    source: Inner,
    /// Accepting on listeners: completes when a shutdown begins.
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Inner {
    Channel(&'static Channel),
    Listeners(Vec<Watched>),
}

#[derive(Debug)]
enum Watched {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Incoming {
    /// The next connection; `None` once a shutdown began (the master's notice, or [`shutdown`]
    /// saw a signal): connections the master still hands over then go to other workers.
    pub async fn accept(&mut self) -> Option<io::Result<Stream>> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// The polling form of [`Incoming::accept`].
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Stream>>> {
        match &self.source {
            Inner::Channel(channel) => channel.poll_next(cx).map(|next| {
                next.map(|handed| {
                    let handed = handed?;
                    let (id, listener) = (handed.id, handed.listener);
                    let io = match crate::incoming::Stream::from_fd(handed.fd)? {
                        crate::incoming::Stream::Tcp(s) => Io::Tcp(TcpStream::from_std(s)?),
                        crate::incoming::Stream::Unix(s) => Io::Unix(UnixStream::from_std(s)?),
                    };
                    Ok(Stream {
                        io,
                        listener,
                        _report: CloseReport::for_connection(id),
                    })
                })
            }),
            Inner::Listeners(listeners) => {
                if let Some(shutdown) = &mut self.shutdown
                    && shutdown.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(None);
                }
                for (n, listener) in listeners.iter().enumerate() {
                    let accepted = match listener {
                        Watched::Tcp(l) => l.poll_accept(cx).map_ok(|(s, _)| Io::Tcp(s)),
                        Watched::Unix(l) => l.poll_accept(cx).map_ok(|(s, _)| Io::Unix(s)),
                    };
                    if let Poll::Ready(result) = accepted {
                        return Poll::Ready(Some(result.map(|io| Stream {
                            io,
                            listener: n as u32,
                            _report: None,
                        })));
                    }
                }
                Poll::Pending
            }
        }
    }

    /// The address of the first TCP socket connections arrive on, when the worker accepts them
    /// itself (not in `rr` or `least-conn` mode, where the master does).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.source {
            Inner::Channel(_) => None,
            Inner::Listeners(listeners) => listeners.iter().find_map(|l| match l {
                Watched::Tcp(tcp) => tcp.local_addr().ok(),
                Watched::Unix(_) => None,
            }),
        }
    }
}

/// Completes when this worker should stop taking work: the master's `shutdown` notice (a
/// reload, `stop`, `scale`), SIGTERM or SIGINT. From then on [`Incoming::accept`] returns `None`
/// and connections still handed over go back to the master for another worker.
pub async fn shutdown() {
    use ::tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let notice = async {
        match channel::get() {
            Some(channel) => {
                channel.listen();
                channel.shutdown_notice().await;
            }
            None => std::future::pending().await,
        }
    };
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            ::tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                () = notice => {}
            }
        }
        _ => notice.await,
    }
    if let Some(channel) = channel::get() {
        channel.shut_down();
    }
}

/// The next message the master sent this worker (`corral send <app> <json>`); `None` when the
/// master is gone. Outside corral it never completes.
pub async fn message() -> Option<serde_json::Value> {
    match channel::get() {
        Some(channel) => {
            channel.listen();
            std::future::poll_fn(|cx| channel.poll_message(cx)).await
        }
        None => std::future::pending().await,
    }
}

/// One client connection. In `least-conn` mode, dropping it tells the master it closed.
#[derive(Debug)]
pub struct Stream {
    io: Io,
    listener: u32,
    _report: Option<CloseReport>,
}

#[derive(Debug)]
enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// The TCP socket, when it is one (for `peer_addr`, `set_nodelay`, ...).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match &self.io {
            Io::Tcp(s) => Some(s),
            Io::Unix(_) => None,
        }
    }

    /// Index of the listening address it came in on (the order of the app's `--listen`).
    pub fn listener(&self) -> u32 {
        self.listener
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }
}
