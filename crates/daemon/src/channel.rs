//! The master's end of each worker's channel: frames in, typed messages out to the supervisor.
//! A worker that sends garbage, an oversized frame or descriptors gets its channel closed and is
//! restarted; nothing it sends can harm the daemon or the other workers.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use corral_proto::channel::{MAX_CHANNEL_FRAME_LEN, StateCall, WorkerMessage};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::balance::{Codec, Conduit};
use crate::bus::Bus;
use crate::inbox::Event;
use crate::node::{self, Cluster, FromWorker};

/// The master's end as a tokio stream.
pub fn open(fd: OwnedFd) -> io::Result<UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

/// Reads a worker's messages until it closes its end or breaks the protocol. Answers about
/// connections go to the conduit, bus and state messages to the bus, the rest to the
/// supervisor. When it ends, the conduit closes (its unaccepted connections go to other
/// workers) and the worker leaves the bus.
pub async fn read(conduit: Arc<Conduit>, events: mpsc::UnboundedSender<Event>, bus: Arc<Bus>) {
    let pid = conduit.pid();
    let problem = match conduit.codec() {
        Codec::Corral => read_until_closed(&conduit, &events, &bus).await,
        Codec::Node => read_node_until_closed(&conduit, &events, &bus).await,
    };
    if let Some(problem) = problem {
        let _ = events.send(Event::ChannelFault { pid, problem });
    }
    conduit.close();
    bus.leave(pid);
}

/// A bus message: to the bus; a state call: onto `calls`, which go to the bus together once the
/// read they came in is handled. Gives the message back when it is another kind.
fn to_bus(
    bus: &Bus,
    pid: u32,
    message: WorkerMessage,
    calls: &mut Vec<(u64, StateCall)>,
) -> Option<WorkerMessage> {
    match message {
        WorkerMessage::Send {
            id,
            to,
            data,
            request,
            timeout_ms,
        } => bus.send(pid, id, &to, &data, request, timeout_ms),
        WorkerMessage::Reply {
            request,
            data,
            error,
        } => bus.reply(pid, request, data, error),
        WorkerMessage::State { id, call } => calls.push((id, call)),
        message => return Some(message),
    }
    None
}

/// `None` when the worker closed its end (or the daemon is going away), else what was wrong.
async fn read_until_closed(
    conduit: &Conduit,
    events: &mpsc::UnboundedSender<Event>,
    bus: &Bus,
) -> Option<String> {
    let (pid, stream) = (conduit.pid(), conduit.stream());
    let mut pending: Vec<u8> = Vec::new();
    loop {
        // A worker that does not read what the master writes to it is not read either.
        conduit.room_for(crate::bus::MAX_BACKLOG).await;
        // Reads go straight into `pending`: 4 KiB, or what the frame begun needs to be whole.
        // Small reads keep idle workers cheap and make a worker's JSON state calls run in
        // groups of a few dozen, Redis working on one group while the master reads the next
        // (larger reads measured slower); a state batch comes whole in one read.
        let start = pending.len();
        let want = frame_rest(&pending).clamp(READ_SIZE, MAX_CHANNEL_FRAME_LEN + 4);
        pending.resize(start + want, 0);
        let received = receive(stream, &mut pending[start..]).await;
        let n = match received {
            Ok(None) => return None,
            Ok(Some((_, fds))) if fds > 0 => {
                return Some(format!(
                    "it sent {fds} file descriptor(s), which workers may not send"
                ));
            }
            Ok(Some((n, _))) => n,
            Err(problem) => return Some(problem),
        };
        pending.truncate(start + n);

        let frames = match drain_frames(&mut pending) {
            Ok(frames) => frames,
            Err(problem) => return Some(problem),
        };
        // After a large frame, an idle worker's buffer goes back to its usual size.
        if pending.capacity() > 16 * READ_SIZE && pending.len() < READ_SIZE {
            pending.shrink_to(2 * READ_SIZE);
        }
        // The state calls of one read run together: one pipeline, one write of the answers.
        let mut calls = Vec::new();
        for frame in frames {
            let message = match frame {
                Frame::Message(message) => message,
                Frame::Batch { first, resp } => {
                    if !calls.is_empty() {
                        bus.state(pid, std::mem::take(&mut calls)).await;
                    }
                    if let Err(problem) = bus.batch(pid, first, resp).await {
                        return Some(problem);
                    }
                    continue;
                }
            };
            let answered = match message {
                WorkerMessage::Accepted { id } => conduit.accepted(id),
                WorkerMessage::Refused { id } => conduit.refused(id),
                WorkerMessage::Closed { .. } => {
                    conduit.closed();
                    true
                }
                message => {
                    if let Some(message) = to_bus(bus, pid, message, &mut calls) {
                        events.send(Event::Worker { pid, message }).ok()?;
                    }
                    continue;
                }
            };
            if !answered {
                return Some(
                    "it answered about a connection it was not given, or answered twice".into(),
                );
            }
        }
        if !calls.is_empty() {
            bus.state(pid, calls).await;
        }
    }
}

/// The least a read of a worker's channel asks for.
const READ_SIZE: usize = 4096;

/// How many bytes the frame at the end of `pending` still lacks (0 when none is begun or its
/// length is not in yet).
fn frame_rest(pending: &[u8]) -> usize {
    let mut at = 0;
    while pending.len() - at >= 4 {
        let len = u32::from_be_bytes(pending[at..at + 4].try_into().expect("4 bytes")) as usize;
        if pending.len() - at - 4 < len {
            return len + 4 - (pending.len() - at);
        }
        at += 4 + len;
    }
    0
}

/// One read from a worker: the bytes read into `chunk` and how many descriptors came (closed at
/// once); `None` when it closed its end; the problem when reading failed.
async fn receive(stream: &UnixStream, chunk: &mut [u8]) -> Result<Option<(usize, usize)>, String> {
    loop {
        if stream.readable().await.is_err() {
            return Ok(None);
        }
        let received = stream.try_io(Interest::READABLE, || {
            let mut fds = Vec::new();
            let n = corral_sys::fd::recv_with_fds(stream.as_fd(), chunk, &mut fds)?;
            Ok((n, fds.len()))
        });
        return match received {
            Ok((0, _)) => Ok(None),
            Ok(read) => Ok(Some(read)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // It closed its end with messages of ours unread (it exited): a close, not a fault.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(None),
            Err(e) => Err(format!("reading it failed: {e}")),
        };
    }
}

/// The same for a Node worker: JSON lines ([`crate::node`]).
async fn read_node_until_closed(
    conduit: &Arc<Conduit>,
    events: &mpsc::UnboundedSender<Event>,
    bus: &Bus,
) -> Option<String> {
    let (pid, stream) = (conduit.pid(), conduit.stream());
    let mut pending: Vec<u8> = Vec::new();
    let mut handles = 0usize;
    let mut chunk = vec![0u8; 4096];
    loop {
        conduit.room_for(crate::bus::MAX_BACKLOG).await;
        // Descriptors a worker sends (`process.send(msg, socket)`) are counted, not kept.
        let n = match receive(stream, &mut chunk).await {
            Ok(None) => return None,
            Ok(Some((n, fds))) => {
                handles += fds;
                n
            }
            Err(problem) => return Some(problem),
        };
        let start = pending.len();
        pending.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        let mut from = start;
        let mut calls = Vec::new();
        while let Some(end) = pending[from..].iter().position(|&b| b == b'\n') {
            let line = &pending[at..from + end];
            let parsed = match node::parse(line) {
                Ok(parsed) => parsed,
                Err(problem) => return Some(problem),
            };
            match parsed {
                FromWorker::HandleAck => conduit.handle_answered(true),
                FromWorker::HandleNack => conduit.handle_answered(false),
                FromWorker::Handle => {
                    // Answered as Node expects (it holds its later messages until then).
                    let came = handles > 0;
                    handles = handles.saturating_sub(1);
                    conduit.send_now(&node::handle_answer(came));
                }
                FromWorker::Cluster(Cluster::Accepted { ack, accepted }) => {
                    // An answer about a connection no longer given (the worker was told to
                    // leave meanwhile, say) is of no consequence.
                    let _ = if accepted {
                        conduit.accepted(ack)
                    } else {
                        conduit.refused(ack)
                    };
                }
                FromWorker::Cluster(Cluster::ExitedAfterDisconnect { seq }) => {
                    conduit.send_line(|next| node::ack(seq, next));
                }
                FromWorker::Cluster(Cluster::Online | Cluster::Other) | FromWorker::Internal => {}
                FromWorker::Cluster(message) => {
                    events.send(Event::Node { pid, message }).ok()?;
                }
                FromWorker::Plain(serde_json::Value::String(text)) if text == "ready" => {
                    let message = WorkerMessage::Ready;
                    events.send(Event::Worker { pid, message }).ok()?;
                }
                FromWorker::Plain(serde_json::Value::Object(mut object))
                    if object.contains_key("corral") =>
                {
                    // `process.send({corral: ...})`: a worker message for corral itself.
                    let inner = object.remove("corral").unwrap_or_default();
                    match serde_json::from_value::<WorkerMessage>(inner) {
                        Ok(message) => {
                            if let Some(message) = to_bus(bus, pid, message, &mut calls) {
                                events.send(Event::Worker { pid, message }).ok()?;
                            }
                        }
                        Err(e) => crate::log!(
                            "pid {pid} sent {{corral: ...}} that is not a corral message ({e}); \
                             clients/node/corral.js sends them right"
                        ),
                    }
                }
                FromWorker::Plain(data) => {
                    let message = WorkerMessage::Message { data };
                    events.send(Event::Worker { pid, message }).ok()?;
                }
            }
            at = from + end + 1;
            from = at;
        }
        pending.drain(..at);
        if !calls.is_empty() {
            bus.state(pid, calls).await;
        }
        if pending.len() > node::MAX_LINE {
            return Some(format!(
                "it sent a line longer than {} bytes",
                node::MAX_LINE
            ));
        }
    }
}

/// A frame from a worker: a message, or a state batch (calls numbered from `first`, in RESP).
#[derive(Debug, PartialEq)]
enum Frame {
    Message(WorkerMessage),
    Batch { first: u64, resp: Vec<u8> },
}

/// Takes every complete frame off the front of `pending`.
fn drain_frames(pending: &mut Vec<u8>) -> Result<Vec<Frame>, String> {
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
        if let Some((first, resp)) = corral_proto::channel::read_state_batch(body) {
            let resp = resp.to_vec();
            messages.push(Frame::Batch { first, resp });
            at += 4 + len;
            continue;
        }
        let message = corral_proto::channel::decode_worker_message(body).map_err(|e| {
            let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
            format!("it sent a frame that is not a worker message ({e}): {shown:?}")
        })?;
        messages.push(Frame::Message(message));
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
                Frame::Message(WorkerMessage::Ready),
                Frame::Message(WorkerMessage::GoingDown {
                    reason: "panic".into()
                })
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
