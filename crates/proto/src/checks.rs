//! Health checks and readiness as an [`crate::AppSpec`] states them: what to probe, how often,
//! and when a failing probe restarts an instance. Parsing lives here so that the CLI and the
//! daemon (which checks every spec again) refuse the same things with the same words.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One way to ask an instance whether it is healthy.
///
/// Written as `http://127.0.0.1:8080/healthz` (or `http://localhost:8080/`), `tcp:8080` (or
/// `tcp:127.0.0.1:8080`), or `exec:CMD ARGS` (run in the app's directory with its environment;
/// exit 0 is healthy).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Probe {
    /// An HTTP/1.1 `GET`; a 2xx or 3xx status is healthy.
    Http {
        /// The host as written (`127.0.0.1`, `[::1]`, `localhost`).
        host: String,
        /// The port.
        port: u16,
        /// The path with its query, starting with `/`.
        path: String,
    },
    /// A TCP connection that opens.
    Tcp {
        /// The host (`127.0.0.1` when only a port was written).
        host: String,
        /// The port.
        port: u16,
    },
    /// A command, split as a shell would split it (quotes, backslashes), run without a shell.
    Exec {
        /// The program and its arguments.
        argv: Vec<String>,
    },
}

impl Probe {
    /// The port an HTTP or TCP probe connects to.
    pub fn port(&self) -> Option<u16> {
        match self {
            Probe::Http { port, .. } | Probe::Tcp { port, .. } => Some(*port),
            Probe::Exec { .. } => None,
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Http { host, port, path } => write!(f, "http://{host}:{port}{path}"),
            Probe::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Probe::Exec { argv } => write!(f, "exec:{}", join_words(argv)),
        }
    }
}

impl std::str::FromStr for Probe {
    type Err = String;

    fn from_str(text: &str) -> Result<Probe, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("http://") {
            return parse_http(rest);
        }
        if text.starts_with("https://") {
            return Err(format!(
                "'{text}': corral's HTTP probe speaks plain HTTP to the instance on this machine; \
                 probe its plain port, or use exec:curl -fsk {text}"
            ));
        }
        if let Some(rest) = text.strip_prefix("tcp:") {
            let (host, port) = host_port(rest.trim_start_matches("//"), text)?;
            return Ok(Probe::Tcp { host, port });
        }
        if let Some(command) = text.strip_prefix("exec:") {
            let argv = split_words(command).map_err(|why| format!("'{text}': {why}"))?;
            if argv.is_empty() {
                return Err(format!("'{text}' names no command: write exec:CMD ARGS"));
            }
            return Ok(Probe::Exec { argv });
        }
        Err(format!(
            "'{text}' is not a health check: write http://127.0.0.1:PORT/path, tcp:PORT or \
             exec:CMD"
        ))
    }
}

impl From<Probe> for String {
    fn from(probe: Probe) -> String {
        probe.to_string()
    }
}

impl TryFrom<String> for Probe {
    type Error = String;

    fn try_from(text: String) -> Result<Probe, String> {
        text.parse()
    }
}

fn parse_http(rest: &str) -> Result<Probe, String> {
    let whole = format!("http://{rest}");
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(format!(
            "'{whole}': a health URL carries no user or password"
        ));
    }
    let (host, port) = if authority.contains(':') {
        host_port(authority, &whole)?
    } else {
        (check_host(authority, &whole)?, 80)
    };
    if path.contains(char::is_whitespace) || path.contains('#') {
        return Err(format!(
            "'{whole}': the path may hold no spaces and no #fragment"
        ));
    }
    Ok(Probe::Http {
        host,
        port,
        path: path.to_string(),
    })
}

/// `PORT`, `HOST:PORT` or `[V6]:PORT`; a bare port means `127.0.0.1`.
fn host_port(text: &str, whole: &str) -> Result<(String, u16), String> {
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, port),
        None => ("127.0.0.1", text),
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("'{whole}': '{port}' is not a port (1 to 65535)"))?;
    Ok((check_host(host, whole)?, port))
}

/// A loopback address or a host name: a probe asks this machine's instance, never another host
/// by its IP.
fn check_host(host: &str, whole: &str) -> Result<String, String> {
    if host.is_empty() {
        return Err(format!("'{whole}' names no host: write 127.0.0.1"));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        if !ip.is_loopback() {
            return Err(format!(
                "'{whole}': {ip} is not a loopback address; a health check asks the instance on \
                 this machine: use 127.0.0.1, [::1] or localhost"
            ));
        }
        return Ok(host.to_string());
    }
    let name_ok = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !name_ok {
        return Err(format!("'{whole}': '{host}' is not a host name"));
    }
    Ok(host.to_string())
}

/// Splits a command line as a POSIX shell would (single and double quotes, backslashes), without
/// expanding anything.
pub fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("a ' quote is not closed".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("a \" quote is not closed".into()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("a \" quote is not closed".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err("the command ends with a lone backslash".into()),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Words joined back so that [`split_words`] gives them again.
fn join_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A health check: a probe, how often it runs, and how many failures in a row restart the
/// instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// What to probe.
    pub probe: Probe,
    /// Time between probes (default 10 s).
    #[serde(default = "HealthCheck::default_interval_ms")]
    pub interval_ms: u64,
    /// How long one probe may take before it counts as failed (default 2 s); an exec probe
    /// still running then is killed with its process group.
    #[serde(default = "HealthCheck::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Failures in a row that restart the instance (default 3).
    #[serde(default = "HealthCheck::default_failures")]
    pub failures: u32,
}

impl HealthCheck {
    /// Ten seconds between probes.
    pub fn default_interval_ms() -> u64 {
        10_000
    }
    /// Two seconds per probe.
    pub fn default_timeout_ms() -> u64 {
        2_000
    }
    /// Three failures in a row.
    pub fn default_failures() -> u32 {
        3
    }
    /// A check of `probe` with the default interval, timeout and threshold.
    pub fn new(probe: Probe) -> HealthCheck {
        HealthCheck {
            probe,
            interval_ms: Self::default_interval_ms(),
            timeout_ms: Self::default_timeout_ms(),
            failures: Self::default_failures(),
        }
    }
}

/// What makes a new process ready, besides the app's usual signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadyWhen {
    /// The usual: a `ready` message, Node's `listening`, `READY=1`, or `min_uptime` for programs
    /// that say nothing.
    #[default]
    Default,
    /// Only a passing health check probe (within `listen_timeout`).
    Probe,
}

impl fmt::Display for ReadyWhen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReadyWhen::Default => "default",
            ReadyWhen::Probe => "probe",
        })
    }
}

impl std::str::FromStr for ReadyWhen {
    type Err = String;

    fn from_str(text: &str) -> Result<ReadyWhen, String> {
        match text.trim() {
            "default" => Ok(ReadyWhen::Default),
            "probe" => Ok(ReadyWhen::Probe),
            other => Err(format!(
                "'{other}' is not a readiness signal: write probe (a passing health check) or \
                 default"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(text: &str) -> Result<Probe, String> {
        text.parse()
    }

    #[test]
    fn probes_parse_and_print_back() {
        for (text, shown) in [
            (
                "http://127.0.0.1:8080/healthz",
                "http://127.0.0.1:8080/healthz",
            ),
            ("http://localhost:3000", "http://localhost:3000/"),
            ("http://[::1]:81/a?b=c", "http://[::1]:81/a?b=c"),
            ("tcp:9000", "tcp:127.0.0.1:9000"),
            ("tcp:localhost:9000", "tcp:localhost:9000"),
            ("exec:sh -c 'test -f /tmp/x'", "exec:sh -c 'test -f /tmp/x'"),
        ] {
            let parsed = probe(text).unwrap();
            assert_eq!(parsed.to_string(), shown);
            assert_eq!(probe(shown).unwrap(), parsed);
        }
    }

    #[test]
    fn bad_probes_say_what_to_write() {
        for (text, says) in [
            ("https://127.0.0.1/", "plain HTTP"),
            ("http://10.1.2.3:80/", "not a loopback address"),
            ("http://127.0.0.1:0/", "not a port"),
            ("http://127.0.0.1:99999/", "not a port"),
            ("tcp:", "not a port"),
            ("exec:", "names no command"),
            ("exec:sh -c 'oops", "not closed"),
            ("ftp://x", "not a health check"),
            ("http://u:p@127.0.0.1/", "no user"),
        ] {
            let err = probe(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn words_split_as_a_shell_would() {
        assert_eq!(
            split_words(r#"python3 -m "http.server" 8000 a\ b 'c d' "e\"f" """#).unwrap(),
            [
                "python3",
                "-m",
                "http.server",
                "8000",
                "a b",
                "c d",
                "e\"f",
                ""
            ]
        );
        assert!(split_words("").unwrap().is_empty());
        assert!(split_words("trailing\\").is_err());
    }
}
