//! Incoming connections, the same way in every mode: handed over the channel (`rr`,
//! `least-conn`), accepted on the inherited sockets (`shared`), on `127.0.0.1:$PORT` (`proxy`),
//! or on a socket of the program's own when it runs outside corral.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::Listener;
use crate::channel::{self, Channel, CloseReport, Handed};

/// How often a blocking accept on listeners looks whether a shutdown began.
const SHUTDOWN_CHECK: Duration = Duration::from_millis(100);

/// Where connections come from.
#[derive(Debug)]
pub(crate) enum Source {
    /// Handed over by the master.
    Channel(&'static Channel),
    /// Accepted here, on these sockets.
    Listeners(Vec<Listener>),
}

impl Source {
    /// The source for this process: the channel when the master hands connections over; else the
    /// inherited sockets; else `127.0.0.1:$PORT` in proxy mode; else `fallback`, bound here.
    pub(crate) fn find(fallback: &str) -> io::Result<Source> {
        if channel::hands_over_connections()
            && let Some(channel) = channel::get()
        {
            channel.listen();
            return Ok(Source::Channel(channel));
        }
        // The shutdown notice still matters when connections come another way.
        if let Some(channel) = channel::get() {
            channel.listen();
        }
        let inherited = crate::listeners()?;
        if !inherited.is_empty() {
            return Ok(Source::Listeners(inherited));
        }
        let proxied = std::env::var(corral_proto::env::CORRAL_LB).as_deref() == Ok("proxy");
        let address = match std::env::var("PORT") {
            Ok(port) if proxied => format!("127.0.0.1:{port}"),
            _ => fallback.to_string(),
        };
        let listener = if let Some(path) = address.strip_prefix("unix:") {
            Listener::Unix(UnixListener::bind(path)?)
        } else {
            Listener::Tcp(TcpListener::bind(&address)?)
        };
        Ok(Source::Listeners(vec![listener]))
    }
}

/// A socket of either family.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Stream> {
        Ok(if corral_sys::fd::is_unix_socket(fd.as_fd())? {
            Stream::Unix(UnixStream::from(fd))
        } else {
            Stream::Tcp(TcpStream::from(fd))
        })
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(nonblocking),
            Stream::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }
}

/// One client connection, blocking. In `least-conn` mode, dropping it tells the master it closed.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    listener: u32,
    _report: Option<CloseReport>,
}

impl Connection {
    /// The socket.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The TCP socket, when it is one (for `peer_addr`, `set_nodelay`, ...).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match &self.stream {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }

    /// Index of the listening address it came in on (the order of the app's `--listen`).
    pub fn listener(&self) -> u32 {
        self.listener
    }

    /// Shuts down reading, writing or both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// The connections of this worker, blocking: see [`incoming`].
#[derive(Debug)]
pub struct Incoming {
    source: Source,
}

/// This worker's incoming connections, whatever the mode: handed over by the master (`rr`,
/// `least-conn`), accepted on the sockets it passed (`shared`), on `127.0.0.1:$PORT`
/// (`proxy`), or, outside corral, on `fallback` (`127.0.0.1:8080`, `unix:/path`), bound here.
pub fn incoming(fallback: &str) -> io::Result<Incoming> {
    Ok(Incoming {
        source: Source::find(fallback)?,
    })
}

impl Incoming {
    /// The next connection, blocking; `None` once the master asked this worker to shut down (or
    /// is gone): the connections it still hands over go to other workers.
    pub fn accept(&self) -> Option<io::Result<Connection>> {
        match &self.source {
            Source::Channel(channel) => {
                let handed = match channel.next_blocking(None)? {
                    Ok(handed) => handed,
                    Err(e) => return Some(Err(e)),
                };
                Some(handed_connection(handed).and_then(|c| {
                    c.stream.set_nonblocking(false)?;
                    Ok(c)
                }))
            }
            Source::Listeners(listeners) => loop {
                if channel::get().is_some_and(Channel::is_shutting_down) {
                    return None;
                }
                let fds: Vec<_> = listeners.iter().map(Listener::fd).collect();
                match corral_sys::fd::wait_readable(&fds, SHUTDOWN_CHECK) {
                    Ok(None) => {}
                    Ok(Some(n)) => match accept_on(&listeners[n], n as u32) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        other => return Some(other),
                    },
                    Err(e) => return Some(Err(e)),
                }
            },
        }
    }

    /// The connections, one after the other, until a shutdown.
    pub fn iter(&self) -> impl Iterator<Item = io::Result<Connection>> + '_ {
        std::iter::from_fn(|| self.accept())
    }

    /// The address of the first TCP socket connections arrive on, when the worker accepts them
    /// itself (not in `rr` or `least-conn` mode, where the master does).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.source {
            Source::Channel(_) => None,
            Source::Listeners(listeners) => listeners.iter().find_map(|l| match l {
                Listener::Tcp(tcp) => tcp.local_addr().ok(),
                Listener::Unix(_) => None,
            }),
        }
    }
}

pub(crate) fn handed_connection(handed: Handed) -> io::Result<Connection> {
    Ok(Connection {
        stream: Stream::from_fd(handed.fd)?,
        listener: handed.listener,
        _report: CloseReport::for_connection(handed.id),
    })
}

fn accept_on(listener: &Listener, index: u32) -> io::Result<Connection> {
    // Several workers may wake for one connection (shared mode): a non-blocking accept tells.
    let stream = match listener {
        Listener::Tcp(tcp) => {
            tcp.set_nonblocking(true)?;
            let (s, _) = tcp.accept()?;
            Stream::Tcp(s)
        }
        Listener::Unix(unix) => {
            unix.set_nonblocking(true)?;
            let (s, _) = unix.accept()?;
            Stream::Unix(s)
        }
    };
    stream.set_nonblocking(false)?;
    Ok(Connection {
        stream,
        listener: index,
        _report: None,
    })
}
