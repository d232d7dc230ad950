//! The control socket: one task per client connection, each a thin translator between frames and
//! supervisor events. Nothing a client sends can stop the daemon: bad frames get an error reply
//! and the connection is closed.

use std::sync::Arc;
use std::time::Duration;

use corral_proto::frame::tokio_io as frame;
use corral_proto::{
    ErrorKind, FrameError, Hello, LogLine, PACKAGE_VERSION, PROTOCOL_VERSION, Request, Response,
    Streams, Welcome,
};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::bus::Bus;
use crate::inbox::{Event, LogSource};
use crate::logs::Follower;

const MAX_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Log lines go out in frames of at most about this many bytes.
const LOG_BATCH_BYTES: usize = 1024 * 1024;

/// Accepts clients until the daemon exits.
pub async fn serve(
    listener: UnixListener,
    events: mpsc::UnboundedSender<Event>,
    shutdown: Arc<Notify>,
    bus: Arc<Bus>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut accept_error_logged = false;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                accept_error_logged = false;
                let events = events.clone();
                let shutdown = shutdown.clone();
                let bus = bus.clone();
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let _ = frame::write(
                            &mut stream,
                            &Response::error(
                                ErrorKind::BadFrame,
                                format!("the daemon serves at most {MAX_CONNECTIONS} clients at once; try again"),
                            ),
                        )
                        .await;
                    });
                    continue;
                };
                tokio::spawn(async move {
                    connection(stream, events, shutdown, bus).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // EMFILE and friends: wait for descriptors to come back instead of spinning.
                if !accept_error_logged {
                    crate::log!("accepting a control connection: {e}; pausing accepts");
                    accept_error_logged = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn bad_frame(e: &FrameError) -> Response {
    Response::error(ErrorKind::BadFrame, format!("bad request: {e}"))
}

async fn connection(
    mut stream: UnixStream,
    events: mpsc::UnboundedSender<Event>,
    shutdown: Arc<Notify>,
    bus: Arc<Bus>,
) {
    let me = corral_sys::effective_uid();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == me || cred.uid() == 0 => {}
        Ok(cred) => {
            crate::log!("refused a control connection from uid {}", cred.uid());
            let message = format!(
                "this daemon belongs to uid {me}; uid {} may not control it",
                cred.uid()
            );
            let _ = frame::write(
                &mut stream,
                &Response::error(ErrorKind::PermissionDenied, message),
            )
            .await;
            return;
        }
        Err(e) => {
            crate::log!("cannot identify a control client: {e}");
            return;
        }
    }
    let hello: Hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read(&mut stream)).await
    {
        Ok(Ok(hello)) => hello,
        Ok(Err(FrameError::Closed)) | Err(_) => return,
        Ok(Err(e)) => {
            let _ = frame::write(&mut stream, &bad_frame(&e)).await;
            return;
        }
    };
    if hello.protocol != PROTOCOL_VERSION {
        let message = format!(
            "the running daemon is corral {PACKAGE_VERSION} (protocol {PROTOCOL_VERSION}) and \
             this client is corral {} (protocol {}): run `corral kill` to stop the old daemon \
             (`corral save` first keeps your apps for `corral resurrect`), then run the command \
             again",
            hello.version, hello.protocol
        );
        let _ = frame::write(
            &mut stream,
            &Response::error(ErrorKind::VersionMismatch, message),
        )
        .await;
        return;
    }
    let welcome = Welcome {
        protocol: PROTOCOL_VERSION,
        version: PACKAGE_VERSION.into(),
        pid: std::process::id(),
    };
    if frame::write(&mut stream, &welcome).await.is_err() {
        return;
    }
    loop {
        let request: Request = match frame::read(&mut stream).await {
            Ok(request) => request,
            Err(FrameError::Closed) => return,
            Err(e) => {
                let _ = frame::write(&mut stream, &bad_frame(&e)).await;
                return;
            }
        };
        match request {
            Request::Logs {
                target,
                lines,
                follow,
                streams,
            } => {
                let _ = logs(&mut stream, &events, target, lines, follow, streams).await;
                if follow {
                    return;
                }
            }
            Request::Events {
                target,
                lines,
                follow,
            } => {
                let _ = events_feed(&mut stream, &events, target, lines, follow).await;
                if follow {
                    return;
                }
            }
            Request::Kill => {
                let response = ask(&events, Request::Kill).await;
                let _ = frame::write(&mut stream, &response).await;
                shutdown.notify_one();
                return;
            }
            Request::Start { apps, base_env } => {
                // A Redis store must answer before its apps start.
                let mut refused = None;
                for spec in &apps {
                    if let corral_proto::StateBackend::Redis(_) = spec.state
                        && let Err(e) = bus.store(&spec.state).await
                    {
                        refused = Some(Response::error(
                            ErrorKind::InvalidSpec,
                            format!(
                                "app '{}': its state store is unreachable: {e}. Start Redis, \
                                 or fix --state",
                                spec.name
                            ),
                        ));
                        break;
                    }
                }
                let response = match refused {
                    Some(response) => response,
                    None => ask(&events, Request::Start { apps, base_env }).await,
                };
                if frame::write(&mut stream, &response).await.is_err() {
                    return;
                }
            }
            request => {
                let response = ask(&events, request).await;
                if respond(&mut stream, &response).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes `response`; one over the frame limit (`state ls` of a huge store, say) is answered by
/// an error saying so, and the connection stays usable.
async fn respond(stream: &mut UnixStream, response: &Response) -> Result<(), FrameError> {
    match frame::write(stream, response).await {
        Err(FrameError::TooLarge { len, max }) => {
            let message = format!(
                "the answer takes {len} bytes, over the control protocol's limit of {max}: ask \
                 for less at once (a narrower pattern, fewer lines)"
            );
            frame::write(stream, &Response::error(ErrorKind::BadFrame, message)).await
        }
        written => written,
    }
}

/// Sends a request to the supervisor and waits for its answer.
pub async fn ask(events: &mpsc::UnboundedSender<Event>, request: Request) -> Response {
    let (reply, answer) = oneshot::channel();
    if events.send(Event::Request { request, reply }).is_err() {
        return Response::error(ErrorKind::ShuttingDown, "the daemon is shutting down");
    }
    answer
        .await
        .unwrap_or_else(|_| Response::error(ErrorKind::ShuttingDown, "the daemon is shutting down"))
}

async fn logs(
    stream: &mut UnixStream,
    events: &mpsc::UnboundedSender<Event>,
    target: Option<String>,
    lines: usize,
    follow: bool,
    streams: Streams,
) -> Result<(), FrameError> {
    let (reply, answer) = oneshot::channel();
    let _ = events.send(Event::LogSources {
        target,
        streams,
        reply,
    });
    let sources = match answer.await {
        Ok(Ok(sources)) => sources,
        Ok(Err(response)) => return frame::write(stream, &response).await,
        Err(_) => {
            let response = Response::error(ErrorKind::ShuttingDown, "the daemon is shutting down");
            return frame::write(stream, &response).await;
        }
    };
    let mut followers = Vec::new();
    for source in sources {
        let (follower, recent) = Follower::start(source.sink.clone(), lines);
        send_lines(stream, &source, recent).await?;
        followers.push((source, follower));
    }
    if !follow {
        return frame::write(stream, &Response::LogEnd).await;
    }
    // One reader per file; a bounded channel, so a slow client slows the readers, which read
    // from the files at their own pace: nothing buffers without bound and nothing is skipped.
    let (tx, mut rx) = mpsc::channel::<(LogSource, Vec<String>)>(16);
    let mut readers = JoinSet::new();
    for (source, mut follower) in followers {
        let tx = tx.clone();
        readers.spawn(async move {
            while let Some(lines) = follower.next_lines().await {
                if tx.send((source.clone(), lines)).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some((source, lines)) => send_lines(stream, &source, lines).await?,
                None => break,
            },
            read = stream.read(&mut probe) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
        }
    }
    readers.abort_all();
    Ok(())
}

/// `corral events`: the recent events of the target, then with `follow` every new one until
/// the client leaves. A follower too slow for the daemon's backlog is told how many it missed.
async fn events_feed(
    stream: &mut UnixStream,
    events: &mpsc::UnboundedSender<Event>,
    target: Option<String>,
    lines: usize,
    follow: bool,
) -> Result<(), FrameError> {
    let (reply, answer) = oneshot::channel();
    let _ = events.send(Event::Events {
        target,
        lines,
        reply,
    });
    let mut feed = match answer.await {
        Ok(Ok(feed)) => feed,
        Ok(Err(response)) => return frame::write(stream, &response).await,
        Err(_) => {
            let response = Response::error(ErrorKind::ShuttingDown, "the daemon is shutting down");
            return frame::write(stream, &response).await;
        }
    };
    let recent = std::mem::take(&mut feed.recent);
    frame::write(stream, &Response::Events { events: recent }).await?;
    if !follow {
        return frame::write(stream, &Response::LogEnd).await;
    }
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            next = feed.live.recv() => match next {
                Ok(event) if feed.filter.as_ref().is_none_or(|f| f.wants(&event)) => {
                    frame::write(stream, &Response::Events { events: vec![event] }).await?;
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    let message = format!(
                        "this follower fell {missed} event(s) behind and missed them; the rest \
                         follows"
                    );
                    frame::write(stream, &Response::Done { message }).await?;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            read = stream.read(&mut probe) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
        }
    }
}

async fn send_lines(
    stream: &mut UnixStream,
    source: &LogSource,
    lines: Vec<String>,
) -> Result<(), FrameError> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    for line in lines {
        bytes += line.len() + 64;
        batch.push(LogLine {
            app: source.app.clone(),
            instance: source.instance,
            stream: source.stream,
            line,
        });
        if bytes >= LOG_BATCH_BYTES {
            let lines = std::mem::take(&mut batch);
            frame::write(stream, &Response::LogLines { lines }).await?;
            bytes = 0;
        }
    }
    if !batch.is_empty() {
        frame::write(stream, &Response::LogLines { lines: batch }).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_over_the_frame_limit_is_an_error_saying_so() {
        let (mut daemon, mut client) = UnixStream::pair().unwrap();
        let huge = serde_json::Value::String("k".repeat(corral_proto::MAX_FRAME_LEN as usize));
        let writing =
            tokio::spawn(
                async move { respond(&mut daemon, &Response::Value { value: huge }).await },
            );
        let answer: Response = frame::read(&mut client).await.unwrap();
        writing.await.unwrap().unwrap();
        let Response::Error { kind, message } = answer else {
            panic!("{answer:?}");
        };
        assert_eq!(kind, ErrorKind::BadFrame);
        assert!(
            message.contains("over the control protocol's limit"),
            "{message}"
        );
    }
}
