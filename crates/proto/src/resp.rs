//! RESP, version 2: Redis's wire format, which corral workers also speak to the master for their
//! key/value calls ([`crate::channel::STATE_BATCH`]), so that the master can hand them to Redis
//! as they are and hand Redis's replies back without reading them.
//!
//! This is framing only: where a command or a reply ends, and what its parts are. It knows no
//! Redis command; the master decides which commands a worker may send, and the Redis client
//! crate does everything else with Redis (connecting, authenticating, pub/sub, scripts).
//!
//! A command is an array of bulk strings: `*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`. A reply is a simple
//! string (`+OK`), an error (`-ERR ...`), an integer (`:1`), a bulk string (`$1\r\nv`, or `$-1`
//! for none) or an array of replies (`*N`, or `*-1`).

/// The most arguments (the command's name included) a command read here may have.
pub const MAX_ARGS: usize = 8;

/// Why bytes are not RESP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not RESP at byte {at}: {what}")]
pub struct Malformed {
    /// Where, from the start of the bytes given.
    pub at: usize,
    /// What was expected there.
    pub what: &'static str,
}

fn malformed<T>(at: usize, what: &'static str) -> Result<T, Malformed> {
    Err(Malformed { at, what })
}

/// Appends the command made of `args` (its name first).
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    header(out, b'*', args.len() as i64);
    for arg in args {
        bulk(out, Some(arg));
    }
}

/// Appends a bulk string reply, or the nil reply for `None`.
pub fn bulk(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(value) => {
            header(out, b'$', value.len() as i64);
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"$-1\r\n"),
    }
}

/// Appends an integer reply.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    header(out, b':', n);
}

/// Appends the `+OK` reply.
pub fn ok(out: &mut Vec<u8>) {
    out.extend_from_slice(b"+OK\r\n");
}

/// Appends an error reply saying `message` (line breaks made spaces, as a reply is one line).
pub fn error(out: &mut Vec<u8>, message: &str) {
    out.push(b'-');
    out.extend(
        message
            .bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

fn header(out: &mut Vec<u8>, kind: u8, n: i64) {
    out.push(kind);
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut left = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (left % 10) as u8;
        left /= 10;
        if left == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// A command read from bytes: its arguments, the name first, borrowed from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command<'a> {
    args: [&'a [u8]; MAX_ARGS],
    len: usize,
}

impl<'a> Command<'a> {
    /// The arguments, the command's name first.
    #[must_use]
    pub fn args(&self) -> &[&'a [u8]] {
        &self.args[..self.len]
    }
}

/// Reads the command at the front of `bytes`: it and the bytes it takes, `None` when it is not
/// all there yet. A command of more than [`MAX_ARGS`] arguments, or of none, is refused.
pub fn read_command(bytes: &[u8]) -> Result<Option<(Command<'_>, usize)>, Malformed> {
    let Some((count, mut at)) = line_number(bytes, 0, b'*', Numbers::Canonical)? else {
        return Ok(None);
    };
    let Ok(count @ 1..=MAX_ARGS) = usize::try_from(count) else {
        return malformed(1, "a command of 1 to 8 arguments");
    };
    let mut command = Command {
        args: [&[]; MAX_ARGS],
        len: count,
    };
    for arg in &mut command.args[..count] {
        let Some((value, next)) = bulk_at(bytes, at, Numbers::Canonical)? else {
            return Ok(None);
        };
        let Some(value) = value else {
            return malformed(at, "an argument, not nil");
        };
        *arg = value;
        at = next;
    }
    Ok(Some((command, at)))
}

/// A reply read from bytes, borrowed from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `+text`
    Simple(&'a [u8]),
    /// `-text`
    Error(&'a [u8]),
    /// `:n`
    Integer(i64),
    /// `$n` and its bytes, `None` for `$-1`.
    Bulk(Option<&'a [u8]>),
    /// `*n` (skipped whole), `None` for `*-1`.
    Array(Option<usize>),
}

/// Reads the reply at the front of `bytes` (an array with all it holds): it and the bytes it
/// takes, `None` when it is not all there yet.
pub fn read_reply(bytes: &[u8]) -> Result<Option<(Reply<'_>, usize)>, Malformed> {
    let Some((reply, mut at)) = element(bytes, 0)? else {
        return Ok(None);
    };
    // Arrays are skipped by counting the elements still to come, nested ones adding theirs.
    let mut left = match reply {
        Reply::Array(Some(n)) => n,
        _ => 0,
    };
    while left > 0 {
        let Some((inner, next)) = element(bytes, at)? else {
            return Ok(None);
        };
        left -= 1;
        if let Reply::Array(Some(n)) = inner {
            left += n;
        }
        at = next;
    }
    Ok(Some((reply, at)))
}

/// How many bytes the reply at the front of `bytes` takes; `None` when it is not all there yet.
pub fn reply_len(bytes: &[u8]) -> Result<Option<usize>, Malformed> {
    Ok(read_reply(bytes)?.map(|(_, len)| len))
}

/// One element at `at`, an array's header only.
fn element(bytes: &[u8], at: usize) -> Result<Option<(Reply<'_>, usize)>, Malformed> {
    let Some(&kind) = bytes.get(at) else {
        return Ok(None);
    };
    Ok(match kind {
        b'+' | b'-' => line(bytes, at + 1)?.map(|(text, next)| {
            let reply = if kind == b'+' {
                Reply::Simple(text)
            } else {
                Reply::Error(text)
            };
            (reply, next)
        }),
        b':' => {
            line_number(bytes, at, b':', Numbers::Any)?.map(|(n, next)| (Reply::Integer(n), next))
        }
        b'$' => bulk_at(bytes, at, Numbers::Any)?.map(|(value, next)| (Reply::Bulk(value), next)),
        b'*' => match line_number(bytes, at, b'*', Numbers::Any)? {
            None => None,
            Some((-1, next)) => Some((Reply::Array(None), next)),
            Some((n, next)) => match usize::try_from(n) {
                Ok(n) => Some((Reply::Array(Some(n)), next)),
                Err(_) => return malformed(at + 1, "an array length of -1 or more"),
            },
        },
        _ => return malformed(at, "one of + - : $ *"),
    })
}

/// A bulk string's bytes, `None` for nil.
type Bulk<'a> = Option<&'a [u8]>;

/// A bulk string at `at`: its bytes (`None` for nil) and where the next element starts.
fn bulk_at(
    bytes: &[u8],
    at: usize,
    numbers: Numbers,
) -> Result<Option<(Bulk<'_>, usize)>, Malformed> {
    let Some((len, start)) = line_number(bytes, at, b'$', numbers)? else {
        return Ok(None);
    };
    if len == -1 {
        return Ok(Some((None, start)));
    }
    let Ok(len) = usize::try_from(len) else {
        return malformed(at + 1, "a bulk length of -1 or more");
    };
    let end = start.saturating_add(len);
    let Some(after) = bytes.get(end..end.saturating_add(2)) else {
        return Ok(None);
    };
    if after != b"\r\n" {
        return malformed(end, "\\r\\n after the bulk string");
    }
    Ok(Some((Some(&bytes[start..end]), end + 2)))
}

/// Which numbers are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbers {
    /// Any decimal of at most 18 digits, negative ones too (replies).
    Any,
    /// Only as Redis writes and reads them in a command: not negative, no leading zero. A
    /// length Redis would not read (`$03`) makes it close the connection, which would fail
    /// every other worker's calls on it; such a command is refused here instead.
    Canonical,
}

/// `kind` at `at`, then a decimal number and `\r\n`: the number and where the next starts.
fn line_number(
    bytes: &[u8],
    at: usize,
    kind: u8,
    numbers: Numbers,
) -> Result<Option<(i64, usize)>, Malformed> {
    match bytes.get(at) {
        None => return Ok(None),
        Some(&b) if b != kind => return malformed(at, "another kind of element"),
        Some(_) => {}
    }
    // One pass: the digits are read as they are looked for.
    let mut i = at + 1;
    let negative = bytes.get(i) == Some(&b'-') && numbers == Numbers::Any;
    if negative {
        i += 1;
    }
    if numbers == Numbers::Canonical
        && bytes.get(i) == Some(&b'0')
        && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
    {
        return malformed(at + 1, "a length without a leading zero");
    }
    let (digits_at, mut n) = (i, 0i64);
    loop {
        match bytes.get(i) {
            None => return Ok(None),
            Some(&digit @ b'0'..=b'9') if i - digits_at < 18 => {
                n = n * 10 + i64::from(digit - b'0');
                i += 1;
            }
            Some(b'\r') if i > digits_at => break,
            Some(_) => return malformed(at + 1, "a decimal number of at most 18 digits"),
        }
    }
    match bytes.get(i + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((if negative { -n } else { n }, i + 2))),
        Some(_) => malformed(i + 1, "\\n after \\r"),
    }
}

/// The text from `at` to the next `\r\n`, and where the next element starts.
fn line(bytes: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, Malformed> {
    let Some(rest) = bytes.get(at..) else {
        return Ok(None);
    };
    let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
        return Ok(None);
    };
    match rest.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((&rest[..cr], at + cr + 2))),
        Some(_) => malformed(at + cr + 1, "\\n after \\r"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(all: &[&[&[u8]]]) -> Vec<u8> {
        let mut out = Vec::new();
        for args in all {
            command(&mut out, args);
        }
        out
    }

    #[test]
    fn commands_written_read_back_the_same() {
        let bytes = commands(&[
            &[b"GET", b"k"],
            &[b"SET", b"key", b"a\r\nvalue with \0 bytes", b"PX", b"1500"],
            &[b"INCRBY", b"n", b"-12"],
            &[b"SET", b"", b""],
        ]);
        assert!(bytes.starts_with(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*5\r\n"));
        let mut at = 0;
        let mut read = Vec::new();
        while at < bytes.len() {
            let (command, len) = read_command(&bytes[at..]).unwrap().unwrap();
            read.push(command.args().to_vec());
            at += len;
        }
        assert_eq!(read[0], [&b"GET"[..], b"k"]);
        assert_eq!(read[1][2], b"a\r\nvalue with \0 bytes");
        assert_eq!(read[2], [&b"INCRBY"[..], b"n", b"-12"]);
        assert_eq!(read[3], [&b"SET"[..], b"", b""]);
    }

    #[test]
    fn a_command_cut_anywhere_is_not_there_yet() {
        let bytes = commands(&[&[b"SET", b"key", b"value", b"PX", b"10"]]);
        for cut in 0..bytes.len() {
            assert_eq!(read_command(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(read_command(&bytes).unwrap().unwrap().1, bytes.len());
    }

    #[test]
    fn bad_commands_are_refused_with_where() {
        for (bytes, at) in [
            (&b"GET k\r\n"[..], 0),
            (b"*0\r\n", 1),
            (b"*9\r\n", 1),
            (b"*-1\r\n", 1),
            (b"*1\r\n$-1\r\n", 5),
            (b"*1\r\n:1\r\n", 4),
            (b"*1\r\n$3\r\nGETxx", 11),
            (b"*x\r\n", 1),
            (b"*1\rx", 3),
            (b"*1\r\n$99999999999999999999\r\n", 5),
            (b"*02\r\n", 1),
            (b"*1\r\n$03\r\nGET\r\n", 5),
            (b"*1\r\n$-0\r\n\r\n", 5),
        ] {
            let Err(e) = read_command(bytes) else {
                panic!("{:?} was taken", String::from_utf8_lossy(bytes));
            };
            assert_eq!(e.at, at, "{:?}: {e}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn replies_written_read_back_the_same() {
        let mut bytes = Vec::new();
        ok(&mut bytes);
        error(&mut bytes, "ERR no\r\nsuch thing");
        integer(&mut bytes, -42);
        integer(&mut bytes, i64::from(i32::MAX));
        bulk(&mut bytes, Some(b"v\r\n"));
        bulk(&mut bytes, None);
        bytes.extend_from_slice(b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n*-1\r\n+x\r\n*-1\r\n*0\r\n");
        let mut at = 0;
        let mut read = Vec::new();
        while at < bytes.len() {
            let (reply, len) = read_reply(&bytes[at..]).unwrap().unwrap();
            read.push(reply);
            at += len;
        }
        assert_eq!(
            read,
            [
                Reply::Simple(b"OK"),
                Reply::Error(b"ERR no  such thing"),
                Reply::Integer(-42),
                Reply::Integer(2_147_483_647),
                Reply::Bulk(Some(b"v\r\n")),
                Reply::Bulk(None),
                Reply::Array(Some(3)),
                Reply::Array(None),
                Reply::Array(Some(0)),
            ]
        );
    }

    #[test]
    fn a_reply_cut_anywhere_is_not_there_yet() {
        let bytes = b"*2\r\n*2\r\n$3\r\nabc\r\n:7\r\n+OK\r\n";
        for cut in 0..bytes.len() {
            assert_eq!(reply_len(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(reply_len(bytes), Ok(Some(bytes.len())));
        assert_eq!(reply_len(b"?what\r\n").unwrap_err().at, 0);
        assert_eq!(reply_len(b"$3\r\nabcd\r\n").unwrap_err().at, 7);
    }
}
