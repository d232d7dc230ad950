//! Node.js's own IPC and cluster protocol, spoken on the channel of Node apps, so that corral
//! is the cluster primary of unmodified programs: `http.createServer(...).listen(3000)` in four
//! workers gives one port, owned by the master, with connections handed out round robin.
//!
//! Wire format (`NODE_CHANNEL_SERIALIZATION_MODE=json`): one JSON value per line. Internal
//! messages are objects whose `cmd` starts with `NODE_`; a message with a descriptor attached is
//! wrapped in `{"cmd":"NODE_HANDLE",...}` and answered by `NODE_HANDLE_ACK` (or `_NACK` when
//! the descriptor did not come); at most one handle is in flight on a channel at a time. The
//! cluster protocol is `{"cmd":"NODE_CLUSTER","act":...,"seq":N}`, replies carry `"ack"`.

use serde_json::{Value, json};

/// The most bytes one line may have before the worker counts as broken.
pub const MAX_LINE: usize = 1024 * 1024;

/// What a Node worker said, as far as the master cares.
#[derive(Debug, Clone, PartialEq)]
pub enum FromWorker {
    /// `NODE_HANDLE_ACK`: the descriptor sent last arrived.
    HandleAck,
    /// `NODE_HANDLE_NACK`: it did not.
    HandleNack,
    /// The worker sent a descriptor (`process.send(msg, handle)`), which corral does not take.
    Handle,
    /// A cluster message.
    Cluster(Cluster),
    /// Another internal message (`NODE_SOCKET_*`, ...), ignored.
    Internal,
    /// `process.send(value)`.
    Plain(Value),
}

/// The cluster messages of a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Cluster {
    /// First message of every worker.
    Online,
    /// `listen()` was called: the worker wants a server for `query`.
    QueryServer {
        /// To be echoed as `ack`.
        seq: u64,
        /// The whole query (`address`, `port`, `addressType`, `index`, `data`, ...).
        query: Value,
    },
    /// A server of the worker listens (its `'listening'` callbacks ran).
    Listening,
    /// The worker closed its server `key`.
    Close {
        /// The server's key.
        key: String,
    },
    /// The worker disconnects of its own accord and wants an acknowledgement.
    ExitedAfterDisconnect {
        /// To be echoed as `ack`.
        seq: u64,
    },
    /// The answer to a `newconn`.
    Accepted {
        /// The `seq` of the `newconn`.
        ack: u64,
        /// Whether the worker took the connection.
        accepted: bool,
    },
    /// Anything else (a later version's messages).
    Other,
}

/// Reads one line of a Node worker.
pub fn parse(line: &[u8]) -> Result<FromWorker, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        let shown = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
        format!("it sent a line that is not JSON ({e}): {shown:?}")
    })?;
    let Some(cmd) = value.get("cmd").and_then(Value::as_str) else {
        return Ok(FromWorker::Plain(value));
    };
    // Node's own test for internal messages.
    if cmd.len() <= 5 || !cmd.starts_with("NODE_") {
        return Ok(FromWorker::Plain(value));
    }
    Ok(match cmd {
        "NODE_HANDLE_ACK" => FromWorker::HandleAck,
        "NODE_HANDLE_NACK" => FromWorker::HandleNack,
        "NODE_HANDLE" => FromWorker::Handle,
        "NODE_CLUSTER" => FromWorker::Cluster(cluster(&value)),
        _ => FromWorker::Internal,
    })
}

fn cluster(value: &Value) -> Cluster {
    let seq = value.get("seq").and_then(Value::as_u64).unwrap_or(0);
    match value.get("act").and_then(Value::as_str) {
        Some("online") => Cluster::Online,
        Some("queryServer") => Cluster::QueryServer {
            seq,
            query: value.clone(),
        },
        Some("listening") => Cluster::Listening,
        Some("close") => Cluster::Close {
            key: value
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        },
        Some("exitedAfterDisconnect") => Cluster::ExitedAfterDisconnect { seq },
        Some(_) => Cluster::Other,
        None => match (
            value.get("ack").and_then(Value::as_u64),
            value.get("accepted").and_then(Value::as_bool),
        ) {
            (Some(ack), Some(accepted)) => Cluster::Accepted { ack, accepted },
            _ => Cluster::Other,
        },
    }
}

/// A value as a line.
pub fn line(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).expect("JSON values serialize");
    bytes.push(b'\n');
    bytes
}

/// `{"cmd":"NODE_HANDLE_ACK"}` or `_NACK`.
pub fn handle_answer(received: bool) -> Vec<u8> {
    let cmd = if received {
        "NODE_HANDLE_ACK"
    } else {
        "NODE_HANDLE_NACK"
    };
    line(&json!({ "cmd": cmd }))
}

/// A connection for the worker's server `key`; the descriptor goes with this line.
pub fn newconn(key: &str, seq: u64) -> Vec<u8> {
    line(&json!({
        "cmd": "NODE_HANDLE",
        "type": "net.Native",
        "msg": { "cmd": "NODE_CLUSTER", "act": "newconn", "key": key, "seq": seq },
    }))
}

/// Asks the worker to close its servers and leave once their connections are done.
pub fn disconnect(seq: u64) -> Vec<u8> {
    line(&json!({ "cmd": "NODE_CLUSTER", "act": "disconnect", "seq": seq }))
}

/// The acknowledgement of an `exitedAfterDisconnect`.
pub fn ack(ack: u64, seq: u64) -> Vec<u8> {
    line(&json!({ "cmd": "NODE_CLUSTER", "ack": ack, "seq": seq }))
}

/// The answer to a `queryServer` in round-robin mode: the master listens and will hand over
/// connections; `sockname` (TCP only) is what the worker's `server.address()` reports.
pub fn round_robin_reply(
    key: &str,
    ack: u64,
    data: &Value,
    sockname: Option<Value>,
    seq: u64,
) -> Vec<u8> {
    let mut reply = json!({
        "cmd": "NODE_CLUSTER", "errno": null, "key": key, "ack": ack, "data": data,
    });
    if let Some(sockname) = sockname {
        reply["sockname"] = sockname;
    }
    reply["seq"] = json!(seq);
    line(&reply)
}

/// The answer to a `queryServer` that failed: the app's `listen()` raises the error, as Node's
/// own primary makes it (`errno` is negative, libuv's way).
pub fn error_reply(key: &str, ack: u64, data: &Value, errno: i32, seq: u64) -> Vec<u8> {
    line(&json!({
        "cmd": "NODE_CLUSTER", "errno": -errno.abs(), "key": key, "ack": ack, "data": data, "seq": seq,
    }))
}

/// The key Node's primary gives a server: `${address}:${port}:${addressType}:${fd}:${index}`
/// with JavaScript's string conversions (`null`, `undefined`).
pub fn server_key(query: &Value) -> String {
    let part = |name: &str| match query.get(name) {
        None => "undefined".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    format!(
        "{}:{}:{}:{}:{}",
        part("address"),
        part("port"),
        part("addressType"),
        part("fd"),
        part("index")
    )
}

/// What a query asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Wanted {
    /// A stream socket at this address, in corral's syntax (`[::]:80`, `unix:/path`).
    Stream(String),
    /// A UDP socket.
    Datagram(std::net::SocketAddr),
}

/// What a query asks for, or the errno to answer with and why.
pub fn wanted(query: &Value) -> Result<Wanted, (i32, String)> {
    if let Some(Value::String(kind)) = query.get("addressType")
        && (kind == "udp4" || kind == "udp6")
    {
        const EINVAL: i32 = 22;
        let port = query.get("port").and_then(Value::as_u64).unwrap_or(0);
        let port = u16::try_from(port).map_err(|_| (EINVAL, format!("port {port}")))?;
        let ip: std::net::IpAddr = match query.get("address").and_then(Value::as_str) {
            Some(ip) => ip.parse().map_err(|_| (EINVAL, format!("address {ip}")))?,
            None if kind == "udp6" => std::net::Ipv6Addr::UNSPECIFIED.into(),
            None => std::net::Ipv4Addr::UNSPECIFIED.into(),
        };
        return Ok(Wanted::Datagram((ip, port).into()));
    }
    listen_address(query).map(Wanted::Stream)
}

/// The answer to a `queryServer` in shared mode (and for UDP): the socket itself goes with this
/// line (`kind` is `net.Native` or `dgram.Native`).
pub fn shared_reply(kind: &str, key: &str, ack: u64, data: &Value, seq: u64) -> Vec<u8> {
    line(&json!({
        "cmd": "NODE_HANDLE",
        "type": kind,
        "msg": { "cmd": "NODE_CLUSTER", "errno": 0, "key": key, "ack": ack, "data": data, "seq": seq },
    }))
}

/// Where a query asks to listen, in corral's address syntax, or the errno to answer with.
pub fn listen_address(query: &Value) -> Result<String, (i32, String)> {
    const EINVAL: i32 = 22;
    const EAFNOSUPPORT: i32 = 97;
    if query
        .get("fd")
        .is_some_and(|fd| fd.as_i64().is_some_and(|fd| fd >= 0))
    {
        return Err((
            EINVAL,
            "listen({fd}) names a descriptor of the primary, which corral does not have".into(),
        ));
    }
    let address = query.get("address").and_then(Value::as_str);
    let port = query.get("port").and_then(Value::as_i64).unwrap_or(0);
    match query.get("addressType") {
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => match address {
            Some(path) => Ok(format!("unix:{path}")),
            None => Err((EINVAL, "a pipe without a path".into())),
        },
        Some(Value::Number(n)) if matches!(n.as_i64(), Some(4 | 6)) => {
            if !(0..=65535).contains(&port) {
                return Err((EINVAL, format!("port {port} is out of range")));
            }
            Ok(match address {
                // As Node does: every interface, IPv6 and IPv4 (dual stack).
                None => format!("[::]:{port}"),
                Some(ip) if ip.contains(':') => format!("[{ip}]:{port}"),
                Some(ip) => format!("{ip}:{port}"),
            })
        }
        Some(Value::String(kind)) if kind.starts_with("udp") => Err((
            EAFNOSUPPORT,
            "UDP servers are not supported in corral's Node cluster yet".into(),
        )),
        other => Err((EINVAL, format!("an addressType of {other:?}"))),
    }
}

/// `sockname` for a TCP listener bound at `local`.
pub fn sockname(local: std::net::SocketAddr) -> Value {
    json!({
        "address": local.ip().to_string(),
        "family": if local.is_ipv4() { "IPv4" } else { "IPv6" },
        "port": local.port(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_workers_send() {
        let query = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":18431,"addressType":4,"backlog":0,"seq":1}"#;
        let FromWorker::Cluster(Cluster::QueryServer { seq, query }) = parse(query).unwrap() else {
            panic!("a queryServer");
        };
        assert_eq!(seq, 1);
        assert_eq!(server_key(&query), "null:18431:4:undefined:0");
        assert_eq!(listen_address(&query).unwrap(), "[::]:18431");
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":true,"seq":3}"#).unwrap(),
            FromWorker::Cluster(Cluster::Accepted {
                ack: 2,
                accepted: true
            })
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_HANDLE_ACK"}"#).unwrap(),
            FromWorker::HandleAck
        );
        assert_eq!(
            parse(br#""ready""#).unwrap(),
            FromWorker::Plain(json!("ready"))
        );
        // Node's own rule: a short or foreign `cmd` is a plain message.
        assert_eq!(
            parse(br#"{"cmd":"NODE_"}"#).unwrap(),
            FromWorker::Plain(json!({"cmd": "NODE_"}))
        );
        assert!(parse(b"{not json").is_err());
    }

    #[test]
    fn keys_and_addresses_follow_node() {
        let unix = json!({"address": "/tmp/a.sock", "port": -1, "addressType": -1, "index": 0});
        assert_eq!(server_key(&unix), "/tmp/a.sock:-1:-1:undefined:0");
        assert_eq!(listen_address(&unix).unwrap(), "unix:/tmp/a.sock");
        let v6 = json!({"address": "::1", "port": 0, "addressType": 6, "index": 1});
        assert_eq!(listen_address(&v6).unwrap(), "[::1]:0");
        let fd = json!({"address": null, "port": 0, "addressType": 4, "fd": 7});
        assert_eq!(listen_address(&fd).unwrap_err().0, 22);
        let udp = json!({"address": "127.0.0.1", "port": 0, "addressType": "udp4", "fd": -1});
        assert_eq!(listen_address(&udp).unwrap_err().0, 97);
    }

    #[test]
    fn replies_carry_what_node_reads() {
        let parsed = |bytes: Vec<u8>| {
            assert_eq!(bytes.last(), Some(&b'\n'));
            serde_json::from_slice::<Value>(&bytes).unwrap()
        };
        let reply = round_robin_reply(
            "k",
            1,
            &Value::Null,
            Some(sockname("127.0.0.1:5".parse().unwrap())),
            0,
        );
        assert_eq!(
            parsed(reply),
            json!({"cmd": "NODE_CLUSTER", "errno": null, "key": "k", "ack": 1, "data": null,
                   "sockname": {"address": "127.0.0.1", "family": "IPv4", "port": 5}, "seq": 0})
        );
        assert_eq!(
            parsed(error_reply("k", 1, &Value::Null, 98, 2)),
            json!({"cmd": "NODE_CLUSTER", "errno": -98, "key": "k", "ack": 1, "data": null, "seq": 2})
        );
        assert_eq!(parsed(newconn("k", 3))["msg"]["act"], "newconn");
    }
}
