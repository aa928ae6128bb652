//! Five-field cron expressions (minute hour day-of-month month day-of-week, UTC) and the
//! one-shot `@at UNIX_MS` form, evaluated per minute.
use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum When {
    At(u64),
    Cron(Box<Cron>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minute: BTreeSet<u32>,
    hour: BTreeSet<u32>,
    dom: BTreeSet<u32>,
    month: BTreeSet<u32>,
    dow: BTreeSet<u32>,
    dom_any: bool,
    dow_any: bool,
}

fn field(text: &str, lo: u32, hi: u32, what: &str) -> Result<BTreeSet<u32>, String> {
    let mut out = BTreeSet::new();
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| format!("bad step {s:?} in {what}"))?;
                if step == 0 {
                    return Err(format!("zero step in {what}"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let a = a.parse().map_err(|_| format!("bad {what} {a:?}"))?;
            let b = b.parse().map_err(|_| format!("bad {what} {b:?}"))?;
            (a, b)
        } else {
            let v = range.parse().map_err(|_| format!("bad {what} {range:?}"))?;
            (v, if step > 1 { hi } else { v })
        };
        if a < lo || b > hi || a > b {
            return Err(format!("{what} {part:?} outside {lo}-{hi}"));
        }
        out.extend((a..=b).step_by(step as usize));
    }
    Ok(out)
}

impl std::str::FromStr for When {
    type Err = String;
    fn from_str(s: &str) -> Result<When, String> {
        if let Some(ms) = s.strip_prefix("@at ") {
            return ms
                .trim()
                .parse()
                .map(When::At)
                .map_err(|_| format!("bad time in {s:?}"));
        }
        let f: Vec<&str> = s.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!(
                "cron {s:?} needs 5 fields: minute hour day-of-month month day-of-week"
            ));
        }
        let mut dow = field(f[4], 0, 7, "day-of-week")?;
        if dow.remove(&7) {
            dow.insert(0);
        }
        Ok(When::Cron(Box::new(Cron {
            minute: field(f[0], 0, 59, "minute")?,
            hour: field(f[1], 0, 23, "hour")?,
            dom: field(f[2], 1, 31, "day-of-month")?,
            month: field(f[3], 1, 12, "month")?,
            dow,
            dom_any: f[2] == "*",
            dow_any: f[4] == "*",
        })))
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Cron {
    /// Does the minute starting at `ms` (unix milliseconds, UTC) match?
    pub fn matches(&self, ms: u64) -> bool {
        let mins = ms / 60_000;
        let (minute, hour) = ((mins % 60) as u32, ((mins / 60) % 24) as u32);
        let days = (mins / 1440) as i64;
        let (_, month, dom) = civil(days);
        let dow = ((days + 4).rem_euclid(7)) as u32; // 1970-01-01 was a Thursday
        let day = match (self.dom_any, self.dow_any) {
            (true, true) => true,
            (false, true) => self.dom.contains(&dom),
            (true, false) => self.dow.contains(&dow),
            (false, false) => self.dom.contains(&dom) || self.dow.contains(&dow),
        };
        self.minute.contains(&minute)
            && self.hour.contains(&hour)
            && self.month.contains(&month)
            && day
    }
}

/// Unix milliseconds as UTC RFC 3339 with milliseconds, e.g. `2026-11-24T22:31:05.123Z`.
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, mo, d) = civil((secs / 86_400) as i64);
    let day_s = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_s / 3600,
        day_s / 60 % 60,
        day_s % 60,
        ms % 1000
    )
}

/// Parse an operator's time: `+DURATION` from now, unix seconds or milliseconds, or
/// `YYYY-MM-DDTHH:MM[:SS[.fff]]Z` (UTC, RFC 3339). Returns unix milliseconds.
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, String> {
    let s = s.trim();
    if let Some(rel) = s.strip_prefix('+') {
        let d = parse_duration(rel).map_err(|e| e.to_string())?;
        return u64::try_from(d.as_millis())
            .ok()
            .and_then(|ms| now_ms.checked_add(ms))
            .ok_or_else(|| format!("time {s:?} is too far in the future"));
    }
    if let Ok(n) = s.parse::<u64>() {
        // Seconds until the year 2286, milliseconds after.
        return Ok(if n < 10_000_000_000 { n * 1000 } else { n });
    }
    let bad = || format!("time {s:?}: use +10m, unix seconds or 2026-01-31T22:00Z");
    let body = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = body.split_once('T').ok_or_else(bad)?;
    let d: Vec<u32> = date
        .split('-')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    // Fractional seconds (RFC 3339 `time-secfrac`): kept to the millisecond.
    let (time, frac_ms) = match time.split_once('.') {
        Some((t, f)) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            let digits: String = f.chars().chain("00".chars()).take(3).collect();
            (t, digits.parse::<u64>().map_err(|_| bad())?)
        }
        Some(_) => return Err(bad()),
        None => (time, 0),
    };
    let t: Vec<u32> = time
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if d.len() != 3
        || !(2..=3).contains(&t.len())
        || (frac_ms > 0 && t.len() != 3)
        || d[1] == 0
        || d[1] > 12
        || d[2] == 0
        || d[2] > 31
        || t[0] > 23
        || t[1] > 59
        || t.get(2).is_some_and(|s| *s > 59)
    {
        return Err(bad());
    }
    let days = days_from_civil(i64::from(d[0]), d[1], d[2]);
    let secs = i64::from(t[0] * 3600 + t[1] * 60 + t.get(2).copied().unwrap_or(0));
    days.checked_mul(86_400_000)
        .and_then(|ms| ms.checked_add(secs * 1000))
        .and_then(|ms| u64::try_from(ms).ok())
        .and_then(|ms| ms.checked_add(frac_ms))
        .ok_or_else(bad)
}

/// Parses `10s`, `500ms`, `2m`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a duration (e.g. 10s)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => anyhow::bail!("{s:?} has unknown unit {unit:?} (use ms, s, m, h)"),
    };
    Duration::try_from_secs_f64(secs).with_context(|| format!("{s:?} is not a valid duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(s: &str) -> Cron {
        match s.parse::<When>().unwrap() {
            When::Cron(c) => *c,
            When::At(_) => panic!(),
        }
    }

    #[test]
    fn cron_fields_match_utc_minutes() {
        // 2026-11-24T20:15Z is a Tuesday.
        let t = parse_time("2026-11-24T20:15Z", 0).unwrap();
        assert_eq!(days_from_civil(2026, 11, 24), t as i64 / 86_400_000);
        assert!(cron("* * * * *").matches(t));
        assert!(cron("15 20 * * *").matches(t));
        assert!(cron("*/5 * * * 2").matches(t));
        assert!(!cron("*/7 * * * *").matches(t));
        assert!(cron("0-20 20 24 11 *").matches(t));
        assert!(!cron("15 20 * * 1,3").matches(t));
        assert!(cron("15 20 1 * 2").matches(t)); // dom or dow
        assert!(!cron("16 20 * * *").matches(t));
    }

    #[test]
    fn bad_expressions_are_refused() {
        for bad in [
            "",
            "* * * *",
            "60 * * * *",
            "*/0 * * * *",
            "a * * * *",
            "5-1 * * * *",
        ] {
            assert!(bad.parse::<When>().is_err(), "{bad:?}");
        }
        assert_eq!("@at 1234".parse::<When>(), Ok(When::At(1234)));
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("+10s", 1000), Ok(11_000));
        assert_eq!(parse_time("1700000000", 0), Ok(1_700_000_000_000));
        assert_eq!(parse_time("1970-01-02T00:00Z", 0), Ok(86_400_000));
        assert!(parse_time("2026-13-01T00:00Z", 0).is_err());
        assert!(parse_time("soon", 0).is_err());
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z", 0), Ok(1_500));
        assert!(parse_time("1970-01-01T00:00:01.Z", 0).is_err());
        assert!(parse_time("1970-01-01T00:00:01.x1Z", 0).is_err());
    }

    #[test]
    fn times_format_as_utc_rfc3339_and_parse_back() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        let t = parse_time("2026-11-24T22:31:05Z", 0).unwrap() + 123;
        assert_eq!(format_time(t), "2026-11-24T22:31:05.123Z");
        // Leap day, end of a year.
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for ms in [0, 1, 999, 86_399_999, 1_764_000_000_007, 4_102_444_800_000] {
            assert_eq!(
                parse_time(&format_time(ms), 0),
                Ok(ms),
                "{}",
                format_time(ms)
            );
        }
    }
}
