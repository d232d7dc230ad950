//! Redis-style glob patterns, for `keys` and pattern subscriptions of the embedded backend.
//!
//! The syntax and the byte-wise matching are Redis's (`stringmatchlen`): `*` any run of bytes,
//! `?` one byte, `[abc]` a set, `[a-z]` a range (reversed ends are swapped), `[^a]` a negated set,
//! and `\` makes the next byte literal, also inside a set. Unlike Redis, a pattern whose `[` is
//! never closed, or that ends in a lone `\`, is refused as malformed on both backends, so the two
//! backends never disagree about what such a pattern means.
//!
//! Matching uses the classic one-star backtracking walk, so it takes at most
//! `pattern × subject` steps, never exponential time.

use crate::StateError;

/// One pattern element; every element but `Star` matches exactly one byte.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Star,
    Any,
    Literal(u8),
    Set { negated: bool, items: Vec<SetItem> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetItem {
    Byte(u8),
    Range(u8, u8),
}

impl Token {
    fn matches(&self, b: u8) -> bool {
        match self {
            Token::Star | Token::Any => true,
            Token::Literal(l) => *l == b,
            Token::Set { negated, items } => {
                let hit = items.iter().any(|item| match *item {
                    SetItem::Byte(x) => x == b,
                    SetItem::Range(lo, hi) => lo <= b && b <= hi,
                });
                hit != *negated
            }
        }
    }
}

/// A parsed, validated glob pattern.
#[derive(Debug, Clone)]
pub(crate) struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    /// Parses `pattern`, refusing an unclosed `[` and a trailing lone `\`.
    pub(crate) fn new(pattern: &str) -> Result<Glob, StateError> {
        let p = pattern.as_bytes();
        let bad = |reason: String| StateError::BadPattern {
            pattern: pattern.to_owned(),
            reason,
        };
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < p.len() {
            match p[i] {
                b'*' => {
                    // Consecutive stars mean the same as one.
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                    i += 1;
                }
                b'?' => {
                    tokens.push(Token::Any);
                    i += 1;
                }
                b'\\' => {
                    let Some(&next) = p.get(i + 1) else {
                        return Err(bad(format!(
                            "it ends in a lone \\ at byte {i}; write \\\\ for a literal backslash"
                        )));
                    };
                    tokens.push(Token::Literal(next));
                    i += 2;
                }
                b'[' => {
                    let open = i;
                    i += 1;
                    let negated = p.get(i) == Some(&b'^');
                    if negated {
                        i += 1;
                    }
                    let mut items = Vec::new();
                    loop {
                        // Same reading as Redis: escape, then end of set, then `x-y` range.
                        match p.get(i..) {
                            None | Some([]) => {
                                return Err(bad(format!(
                                    "the [ at byte {open} is never closed by ]; write \\[ for a literal ["
                                )));
                            }
                            Some([b'\\', x, ..]) => {
                                items.push(SetItem::Byte(*x));
                                i += 2;
                            }
                            Some([b']', ..]) => {
                                i += 1;
                                break;
                            }
                            Some([a, b'-', z, ..]) => {
                                items.push(SetItem::Range((*a).min(*z), (*a).max(*z)));
                                i += 3;
                            }
                            Some([x, ..]) => {
                                items.push(SetItem::Byte(*x));
                                i += 1;
                            }
                        }
                    }
                    tokens.push(Token::Set { negated, items });
                }
                b => {
                    tokens.push(Token::Literal(b));
                    i += 1;
                }
            }
        }
        Ok(Glob { tokens })
    }

    /// True when the whole of `subject` matches.
    pub(crate) fn matches(&self, subject: &str) -> bool {
        let s = subject.as_bytes();
        let t = &self.tokens;
        let (mut ti, mut si) = (0, 0);
        // Where to resume after the last star: (token after the star, subject position).
        let mut resume: Option<(usize, usize)> = None;
        while si < s.len() {
            match t.get(ti) {
                Some(Token::Star) => {
                    resume = Some((ti + 1, si));
                    ti += 1;
                }
                Some(tok) if tok.matches(s[si]) => {
                    ti += 1;
                    si += 1;
                }
                _ => match resume {
                    // Let the last star swallow one more byte and try again.
                    Some((rt, rs)) => {
                        ti = rt;
                        si = rs + 1;
                        resume = Some((rt, rs + 1));
                    }
                    None => return false,
                },
            }
        }
        t[ti..].iter().all(|tok| *tok == Token::Star)
    }

    /// True when the pattern has no wildcard, so it matches exactly one string.
    #[cfg(test)]
    fn is_literal(&self) -> bool {
        self.tokens.iter().all(|t| matches!(t, Token::Literal(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, subject: &str) -> bool {
        Glob::new(pattern).unwrap().matches(subject)
    }

    #[test]
    fn stars_and_questions() {
        assert!(m("*", ""));
        assert!(m("*", "anything"));
        assert!(m("a*", "a"));
        assert!(m("a*", "abc"));
        assert!(!m("a*", "ba"));
        assert!(m("*c", "abc"));
        assert!(m("a*c", "ac"));
        assert!(m("a*c", "abbbc"));
        assert!(!m("a*c", "abcb"));
        assert!(m("a**c", "abc"));
        assert!(m("*a*b*", "xxaxxbxx"));
        assert!(!m("*a*b*", "xxbxxaxx"));
        assert!(m("?", "x"));
        assert!(!m("?", ""));
        assert!(!m("?", "xy"));
        assert!(m("h?llo", "hello"));
        assert!(m("user:*:name", "user:42:name"));
        assert!(!m("user:*:name", "user:42:age"));
        assert!(m("", ""));
        assert!(!m("", "a"));
    }

    #[test]
    fn sets_ranges_and_negation() {
        assert!(m("h[ae]llo", "hallo"));
        assert!(m("h[ae]llo", "hello"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(!m("h[a-b]llo", "hcllo"));
        // Reversed ranges are swapped, as in Redis.
        assert!(m("[z-a]", "m"));
        assert!(m("[0-9][0-9]", "42"));
        assert!(!m("[0-9]", "x"));
        // `[]` is an empty set (never matches); `[^]` matches any byte.
        assert!(!m("[]", "a"));
        assert!(m("[^]", "a"));
        // A `-` at the start or end of a set is literal.
        assert!(m("[-a]", "-"));
        // Escapes inside sets.
        assert!(m("[\\]]", "]"));
        assert!(m("[\\^a]", "^"));
        // A set matches exactly one byte.
        assert!(!m("[ab]", "ab"));
    }

    #[test]
    fn escapes() {
        assert!(m("\\*", "*"));
        assert!(!m("\\*", "a"));
        assert!(m("a\\?b", "a?b"));
        assert!(!m("a\\?b", "axb"));
        assert!(m("\\[x]", "[x]"));
        assert!(m("\\\\", "\\"));
        assert!(m("\\a", "a"));
        assert!(Glob::new("a\\*b").unwrap().is_literal());
        assert!(!Glob::new("a*b").unwrap().is_literal());
    }

    #[test]
    fn bytes_not_chars() {
        // `?` matches one byte, like Redis; "é" is two bytes in UTF-8.
        assert!(!m("?", "é"));
        assert!(m("??", "é"));
        assert!(m("caf*", "café"));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["[abc", "a[", "[^", "x\\", "[a-]", "[\\]"] {
            let err = Glob::new(bad).unwrap_err();
            assert!(
                matches!(&err, StateError::BadPattern { pattern, .. } if pattern == bad),
                "{bad}: {err}"
            );
        }
        let msg = Glob::new("ab[cd").unwrap_err().to_string();
        assert!(msg.contains("\"ab[cd\""), "{msg}");
        assert!(msg.contains("never closed"), "{msg}");
    }

    #[test]
    fn many_stars_do_not_take_exponential_time() {
        let pattern = "*a".repeat(30) + "b";
        let subject = "a".repeat(1000);
        assert!(!m(&pattern, &subject));
    }
}
