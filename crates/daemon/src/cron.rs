//! Cron schedules, for an app's `cron_restart` (PM2's option of that name).
//!
//! A [`Schedule`] is parsed once, when the spec is accepted, so a bad expression is refused with
//! advice instead of failing later; [`Schedule::next_after`] then tells the supervisor when to
//! arm its next timer. Matching is done in the machine's local time zone, as cron and PM2 do.
//!
//! The parsing and the search are croner's; this module fixes the accepted dialect (5 fields,
//! or 6 with seconds first, and the `@daily`-style shortcuts; no year field) and turns croner's
//! errors into messages that name the field at fault.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Local, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// What every refusal ends with: the two accepted shapes.
const HOW_TO_WRITE: &str = "write 5 fields (minute hour day month weekday, as in '0 3 * * *') \
                            or 6 with seconds first";

/// The shortcuts croner expands, as the user may write them.
const SHORTCUTS: [&str; 6] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@hourly",
];

/// One field of the 6-field form: its name in messages and its range of numbers.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
}

/// The fields of the 6-field form, seconds first; a 5-field expression uses the last five.
const FIELDS: [Field; 6] = [
    Field {
        name: "second",
        min: 0,
        max: 59,
    },
    Field {
        name: "minute",
        min: 0,
        max: 59,
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
    },
    // 0 and 7 both mean Sunday.
    Field {
        name: "weekday",
        min: 0,
        max: 7,
    },
];

/// A parsed cron expression: when an app is restarted by its `cron_restart`.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    expression: String,
}

impl Schedule {
    /// Parses 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), as
    /// PM2's `cron_restart`; also the shortcuts `@yearly` (or `@annually`), `@monthly`,
    /// `@weekly`, `@daily` and `@hourly`. Fields take numbers, `*`, ranges (`1-5`), steps
    /// (`*/15`, `0-30/10`), lists (`1,15`), month and weekday names (`JAN`, `MON`) and croner's
    /// `L`, `W`, `#` and `?`. A 7th (year) field is refused: PM2 has none.
    ///
    /// The error says what is wrong and how to write one, naming the expression.
    pub fn parse(expression: &str) -> Result<Schedule, String> {
        let expression = expression.trim();
        let refuse = |why: String| {
            Err(format!(
                "'{expression}' is not a cron expression ({why}): {HOW_TO_WRITE}"
            ))
        };
        if expression.is_empty() {
            return refuse("it is empty".to_owned());
        }
        if expression.starts_with('@') {
            if !SHORTCUTS.iter().any(|s| s.eq_ignore_ascii_case(expression)) {
                return refuse(format!(
                    "unknown shortcut; the shortcuts are {}",
                    SHORTCUTS.join(", ")
                ));
            }
        } else {
            let fields: Vec<&str> = expression.split_whitespace().collect();
            match fields.len() {
                5 | 6 => {}
                7 => return refuse("7 fields: a year field is not supported".to_owned()),
                n => return refuse(format!("{n} field{}", if n == 1 { "" } else { "s" })),
            }
        }
        match parser().parse(expression) {
            Ok(cron) => Ok(Schedule {
                cron,
                expression: expression.to_owned(),
            }),
            Err(error) => refuse(explain(expression, &error)),
        }
    }

    /// The next match strictly after `now`, in the machine's local time zone (as PM2 and cron
    /// do), on a whole second; `None` if it never matches again (`0 0 30 2 *`: February has no
    /// 30th) or `now` is beyond the dates the calendar handles.
    pub fn next_after(&self, now: SystemTime) -> Option<SystemTime> {
        let now = to_utc(now)?.with_timezone(&Local);
        let next = self.cron.find_next_occurrence(&now, false).ok()?;
        Some(SystemTime::from(next))
    }

    /// The expression as the user wrote it (trimmed).
    pub fn expression(&self) -> &str {
        &self.expression
    }
}

/// The accepted dialect: seconds optional (6 fields put them first), no year field.
fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

/// Converts without panicking: chrono's own `From<SystemTime>` panics outside its range.
fn to_utc(time: SystemTime) -> Option<DateTime<Utc>> {
    let (secs, nanos) = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => (i64::try_from(after.as_secs()).ok()?, after.subsec_nanos()),
        Err(before) => {
            let before = before.duration();
            // Round towards the past so the nanoseconds stay positive.
            let secs = i64::try_from(before.as_secs()).ok()?;
            match before.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, 1_000_000_000 - n),
            }
        }
    };
    DateTime::from_timestamp(secs, nanos)
}

/// Why croner refused a 5- or 6-field expression: the first field that fails on its own, or
/// croner's own words when only the combination fails.
fn explain(expression: &str, error: &croner::errors::CronError) -> String {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    let names = &FIELDS[FIELDS.len() - fields.len()..];
    for (i, field) in names.iter().enumerate() {
        // Alone among wildcards, a field is judged by itself.
        let probe: Vec<&str> = (0..fields.len())
            .map(|j| if j == i { fields[i] } else { "*" })
            .collect();
        if parser().parse(&probe.join(" ")).is_err() {
            return explain_field(field, fields[i]);
        }
    }
    error.to_string()
}

/// What is wrong with one field's text, as precisely as can be told without croner's grammar.
fn explain_field(field: &Field, text: &str) -> String {
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        for bound in range.split('-') {
            let out_of_range = bound
                .parse::<u64>()
                .ok()
                .filter(|n| !(u64::from(field.min)..=u64::from(field.max)).contains(n));
            if let Some(n) = out_of_range {
                return format!(
                    "{} {n} is out of range {}-{}",
                    field.name, field.min, field.max
                );
            }
        }
        if step == Some("0") {
            return format!("the {} field '{text}' has a step of 0", field.name);
        }
    }
    format!(
        "the {} field '{text}' is not a number, range, list or step",
        field.name
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// 2025-06-15 12:00:00 UTC: no time zone changes its offset near mid-June, and every
    /// offset in use today is a whole number of quarter hours, so matches on seconds and on
    /// minute steps dividing 15 are the same in every zone.
    const NOON: u64 = 1_749_988_800;

    fn at(secs_after_noon: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOON + secs_after_noon)
    }

    fn next(expression: &str, now: SystemTime) -> SystemTime {
        Schedule::parse(expression)
            .unwrap()
            .next_after(now)
            .unwrap_or_else(|| panic!("'{expression}' never matches after {now:?}"))
    }

    fn refusal(expression: &str) -> String {
        Schedule::parse(expression).expect_err(expression)
    }

    #[test]
    fn five_fields_match_on_whole_minutes() {
        // Every 15 minutes: the next quarter hour, strictly after.
        assert_eq!(next("*/15 * * * *", at(0)), at(15 * 60));
        assert_eq!(next("*/15 * * * *", at(60)), at(15 * 60));
        assert_eq!(next("*/15 * * * *", at(15 * 60 - 1)), at(15 * 60));
        assert_eq!(next("*/5 * * * *", at(5 * 60)), at(10 * 60));
        assert_eq!(next("* * * * *", at(30)), at(60));
    }

    #[test]
    fn six_fields_put_seconds_first() {
        assert_eq!(next("*/15 * * * * *", at(0)), at(15));
        assert_eq!(next("*/15 * * * * *", at(14)), at(15));
        assert_eq!(next("*/15 * * * * *", at(15)), at(30));
        assert_eq!(next("*/15 * * * * *", at(50)), at(60));
        assert_eq!(next("30 * * * * *", at(30)), at(90));
        // Seconds 0 of every 15th minute: the same as the 5-field form.
        assert_eq!(next("0 */15 * * * *", at(1)), at(15 * 60));
    }

    #[test]
    fn matches_are_strictly_after_now_on_whole_seconds() {
        let half = Duration::from_millis(500);
        assert_eq!(next("*/15 * * * * *", at(14) + half), at(15));
        assert_eq!(next("*/15 * * * * *", at(15) + half), at(30));
        assert_eq!(next("* * * * * *", at(7) + half), at(8));
        assert_eq!(next("* * * * * *", at(7)), at(8));
    }

    #[test]
    fn ranges_steps_and_lists() {
        let schedule = Schedule::parse("10-20/5 * * * * *").unwrap();
        let mut now = at(0);
        let mut seen = Vec::new();
        for _ in 0..4 {
            now = schedule.next_after(now).unwrap();
            seen.push(now);
        }
        assert_eq!(seen, [at(10), at(15), at(20), at(70)]);

        assert_eq!(next("5,7,9 * * * * *", at(5)), at(7));
        assert_eq!(next("5,7,9 * * * * *", at(9)), at(65));
        assert_eq!(next("40-42 * * * * *", at(41)), at(42));
        assert_eq!(next("0,15,30,45 * * * *", at(16 * 60)), at(30 * 60));
        assert_eq!(next("0 0-59/20 * * * *", at(1)), at(20 * 60));
    }

    #[test]
    fn names_and_question_marks_are_accepted() {
        for expression in [
            "0 3 * JAN-DEC MON-FRI",
            "0 3 ? * *",
            "0 0 L * *",
            "0 3 * * 7",
        ] {
            Schedule::parse(expression).unwrap();
        }
    }

    #[test]
    fn shortcuts_expand() {
        let now = SystemTime::now();
        let hourly = Schedule::parse("@hourly").unwrap().next_after(now).unwrap();
        let wait = hourly.duration_since(now).unwrap();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(3600),
            "{wait:?}"
        );
        // A day can be 25 hours long where the clock goes back.
        let daily = Schedule::parse("@DAILY").unwrap().next_after(now).unwrap();
        let wait = daily.duration_since(now).unwrap();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(25 * 3600),
            "{wait:?}"
        );
        for shortcut in SHORTCUTS {
            Schedule::parse(shortcut).unwrap();
        }
    }

    #[test]
    fn expression_is_kept_as_written_but_trimmed() {
        assert_eq!(
            Schedule::parse("  */5 * * * *\n").unwrap().expression(),
            "*/5 * * * *"
        );
        assert_eq!(Schedule::parse("@daily").unwrap().expression(), "@daily");
    }

    #[test]
    fn a_date_that_never_comes_gives_none() {
        let schedule = Schedule::parse("0 0 30 2 *").unwrap();
        assert_eq!(schedule.next_after(at(0)), None);
    }

    #[test]
    fn instants_out_of_the_calendar_give_none() {
        let schedule = Schedule::parse("* * * * * *").unwrap();
        let far = UNIX_EPOCH + Duration::from_secs(u64::MAX / 2);
        assert_eq!(schedule.next_after(far), None);
        // Before 1970 works.
        let before = UNIX_EPOCH - Duration::from_millis(1_500);
        assert_eq!(
            schedule.next_after(before),
            Some(UNIX_EPOCH - Duration::from_secs(1))
        );
    }

    #[test]
    fn bad_expressions_say_what_is_wrong_and_how_to_write_one() {
        assert_eq!(
            refusal("61 * * * *"),
            "'61 * * * *' is not a cron expression (minute 61 is out of range 0-59): write 5 \
             fields (minute hour day month weekday, as in '0 3 * * *') or 6 with seconds first"
        );
        let cases = [
            ("", "'' is not a cron expression (it is empty)"),
            ("   ", "'' is not a cron expression (it is empty)"),
            ("* * * *", "(4 fields)"),
            ("*", "(1 field)"),
            ("* * * * * * * *", "(8 fields)"),
            (
                "0 0 3 * * * 2030",
                "(7 fields: a year field is not supported)",
            ),
            (
                "@reboot",
                "(unknown shortcut; the shortcuts are @yearly, @annually",
            ),
            ("0 24 * * *", "(hour 24 is out of range 0-23)"),
            ("60 * * * * *", "(second 60 is out of range 0-59)"),
            ("0 0 0 * *", "(day of month 0 is out of range 1-31)"),
            ("0 0 * 13 *", "(month 13 is out of range 1-12)"),
            ("0 0 * * 8", "(weekday 8 is out of range 0-7)"),
            ("0-70/5 * * * *", "(minute 70 is out of range 0-59)"),
            ("1,2,99 * * * *", "(minute 99 is out of range 0-59)"),
            ("*/0 * * * *", "(the minute field '*/0' has a step of 0)"),
            ("every day", "(2 fields)"),
            (
                "x * * * *",
                "(the minute field 'x' is not a number, range, list or step)",
            ),
            (
                "0 3 * * monday-ish",
                "(the weekday field 'monday-ish' is not a number, range, list or step)",
            ),
        ];
        for (expression, expected) in cases {
            let message = refusal(expression);
            assert!(message.contains(expected), "{expression:?}: {message}");
            assert!(message.ends_with(HOW_TO_WRITE), "{expression:?}: {message}");
        }
    }
}
