//! The listening sockets the master holds for its apps. Bound once when an app starts, kept
//! across every restart and reload of its workers, closed when the app is deleted.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// Connections waiting to be accepted, per socket (the kernel caps it at `somaxconn`).
const BACKLOG: i32 = 4096;

/// One bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    /// The address as the user wrote it.
    pub given: String,
    /// The address as bound: the port the kernel chose for port 0, `unix:` and the path.
    pub resolved: String,
    /// The socket.
    pub fd: OwnedFd,
    /// Whether its app serves: while it does not (every instance stopped or errored), the
    /// master's accept loop resets each new connection at once instead of letting the client
    /// wait for a worker that is not coming. The socket stays bound, so the port is the app's
    /// again when it starts.
    pub open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    unix_path: Option<PathBuf>,
}

impl Listener {
    /// Says whether new connections are served or reset.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What an address means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// Parses `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`, `8080` (all IPv4 interfaces), or
/// `unix:/path`.
pub fn parse(address: &str) -> Result<Address, String> {
    let text = address.trim();
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() || !path.starts_with('/') {
            return Err(format!(
                "'{address}': a unix socket address is unix: and an absolute path, such as unix:/run/app.sock"
            ));
        }
        return Ok(Address::Unix(PathBuf::from(path)));
    }
    if let Ok(port) = text.parse::<u16>() {
        return Ok(Address::Tcp(SocketAddr::from(([0, 0, 0, 0], port))));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Address::Tcp(addr));
    }
    match text.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => Ok(Address::Tcp(addr)),
        _ => Err(format!(
            "'{address}' is not a listen address: write 127.0.0.1:8080, [::1]:8080, 8080 (every \
             IPv4 interface), or unix:/path/to.sock"
        )),
    }
}

/// Binds and listens on `address`.
pub fn bind(address: &str) -> Result<Listener, String> {
    bind_parsed(address, parse(address)?).map_err(|e| e.message)
}

/// Why an address could not be bound: the message for people, the errno for programs.
#[derive(Debug)]
pub struct BindError {
    /// What went wrong, with the address and a hint.
    pub message: String,
    /// The OS error number, when there is one.
    pub errno: Option<i32>,
}

/// Binds a UDP socket (for Node's `dgram` in cluster mode), non-blocking.
pub fn bind_udp(addr: SocketAddr) -> Result<Listener, BindError> {
    let failed = |e: io::Error| BindError {
        message: format!("cannot bind UDP {addr}: {e}"),
        errno: e.raw_os_error(),
    };
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| failed(e.into()))?;
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true).map_err(|e| failed(e.into()))?;
    rustix::net::bind(&fd, &addr).map_err(|e| failed(e.into()))?;
    let local = std::net::UdpSocket::from(fd);
    let resolved = format!("udp:{}", local.local_addr().map_err(failed)?);
    Ok(Listener {
        open: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        given: addr.to_string(),
        resolved,
        fd: OwnedFd::from(local),
        unix_path: None,
    })
}

/// Binds and listens on `parsed` (`address` as the user wrote it, for messages).
pub fn bind_parsed(address: &str, parsed: Address) -> Result<Listener, BindError> {
    let failed = |e: io::Error| {
        let hint = match e.raw_os_error() {
            Some(98) => ": another program (or app) holds it; stop it or choose another address",
            Some(99) => ": no interface of this machine has that address",
            Some(13) => ": ports below 1024 need root (or CAP_NET_BIND_SERVICE)",
            _ => "",
        };
        BindError {
            message: format!("cannot listen on {address}: {e}{hint}"),
            errno: e.raw_os_error(),
        }
    };
    match parsed {
        Address::Tcp(addr) => {
            let family = if addr.is_ipv4() {
                AddressFamily::INET
            } else {
                AddressFamily::INET6
            };
            let fd =
                rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)
                    .map_err(|e| failed(e.into()))?;
            rustix::net::sockopt::set_socket_reuseaddr(&fd, true).map_err(|e| failed(e.into()))?;
            rustix::net::bind(&fd, &addr).map_err(|e| failed(e.into()))?;
            rustix::net::listen(&fd, BACKLOG).map_err(|e| failed(e.into()))?;
            let local = std::net::TcpListener::from(fd);
            let resolved = local.local_addr().map_err(failed)?.to_string();
            Ok(Listener {
                open: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
                given: address.to_string(),
                resolved,
                fd: OwnedFd::from(local),
                unix_path: None,
            })
        }
        Address::Unix(path) => {
            if path.exists() {
                // A socket file nobody listens on is a leftover: replace it. Anything else stays.
                let meta = std::fs::symlink_metadata(&path).map_err(failed)?;
                if !meta.file_type().is_socket() {
                    return Err(failed(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    )));
                }
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(failed(io::Error::from_raw_os_error(98)));
                }
                std::fs::remove_file(&path).map_err(failed)?;
            }
            let fd = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::CLOEXEC,
                None,
            )
            .map_err(|e| failed(e.into()))?;
            let addr = SocketAddrUnix::new(path.as_path()).map_err(|e| failed(e.into()))?;
            rustix::net::bind(&fd, &addr).map_err(|e| failed(e.into()))?;
            rustix::net::listen(fd.as_fd(), BACKLOG).map_err(|e| failed(e.into()))?;
            Ok(Listener {
                open: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
                given: address.to_string(),
                resolved: format!("unix:{}", path.display()),
                fd,
                unix_path: Some(path),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_address_forms() {
        assert_eq!(
            parse("127.0.0.1:80").unwrap(),
            Address::Tcp("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            parse("[::1]:0").unwrap(),
            Address::Tcp("[::1]:0".parse().unwrap())
        );
        assert_eq!(
            parse("8080").unwrap(),
            Address::Tcp("0.0.0.0:8080".parse().unwrap())
        );
        assert_eq!(
            parse("unix:/tmp/x.sock").unwrap(),
            Address::Unix("/tmp/x.sock".into())
        );
        assert!(
            parse("unix:relative")
                .unwrap_err()
                .contains("absolute path")
        );
        assert!(
            parse("not an address")
                .unwrap_err()
                .contains("not a listen address")
        );
    }

    #[test]
    fn port_zero_resolves_and_a_taken_port_is_explained() {
        let first = bind("127.0.0.1:0").unwrap();
        assert!(!first.resolved.ends_with(":0"), "{}", first.resolved);
        let err = bind(&first.resolved).unwrap_err();
        assert!(
            err.contains(&first.resolved) && err.contains("another program"),
            "{err}"
        );
    }

    #[test]
    fn a_unix_socket_is_bound_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let address = format!("unix:{}", path.display());
        let listener = bind(&address).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        assert!(bind(&address).unwrap_err().contains("in use"));
        drop(listener);
        assert!(!path.exists());
    }
}
