//! corral as systemd toward its workers: each process gets its own `NOTIFY_SOCKET`, a datagram
//! socket in the abstract namespace that only the master reads, so a program that speaks
//! `sd_notify` is ready on `READY=1` with no corral-specific code.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use corral_proto::channel::WorkerMessage;
use tokio::sync::mpsc;

use crate::inbox::Event;

/// One worker's notify socket, bound but not yet read.
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    /// The value for `NOTIFY_SOCKET` (`@` marks the abstract namespace, as systemd writes it).
    pub address: String,
}

/// Binds a notify socket with a name no other process uses: the daemon's pid, the instance id,
/// and a counter.
pub fn bind(id: u32, serial: u64) -> io::Result<NotifySocket> {
    let name = format!("corral/{}/notify/{id}/{serial}", std::process::id());
    let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
    socket.set_nonblocking(true)?;
    Ok(NotifySocket {
        socket,
        address: format!("@{name}"),
    })
}

/// Reads the datagrams of process `pid` until the task is aborted (when the process is gone).
pub async fn read(notify: NotifySocket, pid: u32, events: mpsc::UnboundedSender<Event>) {
    let Ok(socket) = tokio::net::UnixDatagram::from_std(notify.socket) else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok(n) = socket.recv(&mut buf).await else {
            return;
        };
        // A watchdog ping is the supervisor's business only when the app has a watchdog; it
        // is cheap to pass on either way.
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "WATCHDOG=1")
            && events.send(Event::Watchdog { pid }).is_err()
        {
            return;
        }
        for message in parse(&buf[..n]) {
            if events.send(Event::Worker { pid, message }).is_err() {
                return;
            }
        }
    }
}

/// The messages in one datagram of `KEY=VALUE` lines that corral acts on.
fn parse(datagram: &[u8]) -> Vec<WorkerMessage> {
    String::from_utf8_lossy(datagram)
        .lines()
        .filter_map(|line| match line.split_once('=') {
            Some(("READY", "1")) => Some(WorkerMessage::Ready),
            Some(("STATUS", status)) => Some(WorkerMessage::Message {
                data: serde_json::json!({ "sd_notify_status": status }),
            }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn understands_ready_and_status_and_ignores_the_rest() {
        let got = parse(b"STATUS=warming up\nREADY=1\nMAINPID=42\nWATCHDOG=1\n");
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], WorkerMessage::Ready);
        assert!(
            matches!(&got[0], WorkerMessage::Message { data } if data["sd_notify_status"] == "warming up")
        );
        assert!(parse(b"READY=0").is_empty());
    }

    #[test]
    fn a_bound_socket_receives_what_is_sent_to_its_address() {
        let notify = bind(7, 1).unwrap();
        let name = notify.address.strip_prefix('@').unwrap();
        let sender = UnixDatagram::unbound().unwrap();
        sender
            .send_to_addr(b"READY=1", &SocketAddr::from_abstract_name(name).unwrap())
            .unwrap();
        let mut buf = [0; 64];
        let n = notify.socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
