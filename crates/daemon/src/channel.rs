//! The master's end of each worker's channel: frames in, typed messages out to the supervisor.
//! A worker that sends garbage, an oversized frame or descriptors gets its channel closed and is
//! restarted; nothing it sends can harm the daemon or the other workers.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use corral_proto::channel::{MAX_CHANNEL_FRAME_LEN, WorkerMessage};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::supervisor::Event;

/// The master's end as a tokio stream.
pub fn open(fd: OwnedFd) -> io::Result<UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

/// Reads a worker's messages until it closes its end or breaks the protocol.
pub async fn read(stream: UnixStream, pid: u32, events: mpsc::UnboundedSender<Event>) {
    let mut pending: Vec<u8> = Vec::new();
    // Workers say little: a small buffer, so that idle workers cost the daemon little memory.
    let mut chunk = vec![0u8; 4096];
    let problem = loop {
        if stream.readable().await.is_err() {
            return;
        }
        let received = stream.try_io(Interest::READABLE, || {
            let mut fds = Vec::new();
            let n = corral_sys::fd::recv_with_fds(stream.as_fd(), &mut chunk, &mut fds)?;
            Ok((n, fds.len()))
        });
        let n = match received {
            Ok((0, _)) => return,
            Ok((_, fds)) if fds > 0 => {
                break format!("it sent {fds} file descriptor(s), which workers may not send");
            }
            Ok((n, _)) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => break format!("reading it failed: {e}"),
        };
        pending.extend_from_slice(&chunk[..n]);
        match drain_frames(&mut pending) {
            Ok(messages) => {
                for message in messages {
                    if events.send(Event::Worker { pid, message }).is_err() {
                        return;
                    }
                }
            }
            Err(problem) => break problem,
        }
    };
    let _ = events.send(Event::ChannelFault { pid, problem });
}

/// Takes every complete frame off the front of `pending`.
fn drain_frames(pending: &mut Vec<u8>) -> Result<Vec<WorkerMessage>, String> {
    let mut messages = Vec::new();
    let mut at = 0;
    while pending.len() - at >= 4 {
        let len = u32::from_be_bytes(pending[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len > MAX_CHANNEL_FRAME_LEN {
            return Err(format!(
                "it announced a frame of {len} bytes; the limit is {MAX_CHANNEL_FRAME_LEN}"
            ));
        }
        if pending.len() - at - 4 < len {
            break;
        }
        let body = &pending[at + 4..at + 4 + len];
        let message = serde_json::from_slice(body).map_err(|e| {
            let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
            format!("it sent a frame that is not a worker message ({e}): {shown:?}")
        })?;
        messages.push(message);
        at += 4 + len;
    }
    pending.drain(..at);
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let mut all = frame(br#"{"type":"ready"}"#);
        all.extend(frame(br#"{"type":"going_down","reason":"panic"}"#));
        let mut pending = Vec::new();
        let mut got = Vec::new();
        for byte in all {
            pending.push(byte);
            got.extend(drain_frames(&mut pending).unwrap());
        }
        assert_eq!(
            got,
            [
                WorkerMessage::Ready,
                WorkerMessage::GoingDown {
                    reason: "panic".into()
                }
            ]
        );
        assert!(pending.is_empty());
    }

    #[test]
    fn garbage_and_huge_frames_are_refused() {
        let mut garbage = frame(b"hello?");
        assert!(
            drain_frames(&mut garbage)
                .unwrap_err()
                .contains("not a worker message")
        );
        let mut huge = (u32::MAX).to_be_bytes().to_vec();
        assert!(drain_frames(&mut huge).unwrap_err().contains("limit"));
        let mut unknown = frame(br#"{"type":"format_disk"}"#);
        assert!(drain_frames(&mut unknown).is_err());
    }
}
