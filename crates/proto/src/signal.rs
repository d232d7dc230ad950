//! Signal names accepted by `--stop-signal` and `corral signal`.

/// Linux signal numbers by name (x86-64 and aarch64 share these), without the `SIG` prefix.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// A signal, by its number and canonical name (`SIGTERM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal {
    /// The signal number.
    pub number: i32,
    /// The name without the `SIG` prefix.
    pub short_name: &'static str,
}

impl Signal {
    /// Parses `SIGTERM`, `TERM`, `sigterm` or `15`.
    pub fn parse(text: &str) -> Option<Signal> {
        let text = text.trim();
        if let Ok(number) = text.parse::<i32>() {
            return SIGNALS
                .iter()
                .find(|(_, n)| *n == number)
                .map(|&(short_name, number)| Signal { number, short_name });
        }
        let upper = text.to_ascii_uppercase();
        let short = upper.strip_prefix("SIG").unwrap_or(&upper);
        SIGNALS
            .iter()
            .find(|(name, _)| *name == short)
            .map(|&(short_name, number)| Signal { number, short_name })
    }

    /// `SIGTERM` for signal 15.
    pub fn name(self) -> String {
        format!("SIG{}", self.short_name)
    }

    /// The name of signal `number`, or the number itself when it has none here.
    pub fn describe(number: i32) -> String {
        Signal::parse(&number.to_string()).map_or_else(|| format!("signal {number}"), Signal::name)
    }
}

#[cfg(test)]
mod tests {
    use super::Signal;

    #[test]
    fn parses_every_spelling() {
        for text in ["SIGTERM", "TERM", "sigterm", "term", "15", " SIGTERM "] {
            assert_eq!(Signal::parse(text).map(|s| s.number), Some(15), "{text}");
        }
        assert_eq!(Signal::parse("SIGUSR2").unwrap().name(), "SIGUSR2");
    }

    #[test]
    fn rejects_unknown_names() {
        for text in ["", "SIG", "TERMINATE", "99", "-1", "SIGFOO"] {
            assert_eq!(Signal::parse(text), None, "{text}");
        }
    }
}
