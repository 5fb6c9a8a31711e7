//! Five-field cron expressions (`minute hour day-of-month month day-of-week`), as in
//! crontab(5): numbers, `*`, ranges `a-b`, steps `*/n` and `a-b/n`, lists, month
//! and weekday names. When both day fields are restricted, either may match.
//!
//! Hand-written rather than a crate: the cron crates bring chrono and a second
//! time-zone database, and we only need "does this minute match".

use jiff::civil::DateTime;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_any: bool,
    weekdays_any: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn value(s: &str, lo: u32, hi: u32, names: &[&str], base: u32) -> Result<u32, String> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(base + i as u32);
    }
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if n < lo || n > hi {
        return Err(format!("{n} is outside {lo}-{hi}"));
    }
    Ok(n)
}

/// Bits `lo..=hi` set as the field says; `(bits, was_star)`.
fn field(s: &str, lo: u32, hi: u32, names: &[&str], base: u32) -> Result<(u64, bool), String> {
    let mut bits = 0u64;
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => {
                let st: u32 = st
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("step {st:?} must be a positive number"))?;
                (r, st)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, mut b) = (
                value(a, lo, hi, names, base)?,
                value(b, lo, hi, names, base)?,
            );
            if hi == 7 && b == 0 {
                b = 7; // `fri-sun`: Sunday closes the week
            }
            if a > b {
                return Err(format!("range {range:?} runs backwards"));
            }
            (a, b)
        } else {
            let a = value(range, lo, hi, names, base)?;
            (a, if step > 1 { hi } else { a })
        };
        let mut i = a;
        while i <= b {
            bits |= 1 << i;
            i += step;
        }
    }
    Ok((bits, s == "*"))
}

impl Cron {
    pub fn parse(s: &str) -> Result<Cron, String> {
        let f: Vec<&str> = s.split_whitespace().collect();
        let [mi, h, dom, mo, dow] = f.as_slice() else {
            return Err(format!(
                "{s:?} must have five fields: minute hour day-of-month month day-of-week"
            ));
        };
        let named = |what: &str, r: Result<(u64, bool), String>| {
            r.map_err(|e| format!("{what} field: {e}"))
        };
        let (minutes, _) = named("minute", field(mi, 0, 59, &[], 0))?;
        let (hours, _) = named("hour", field(h, 0, 23, &[], 0))?;
        let (days, days_any) = named("day-of-month", field(dom, 1, 31, &[], 0))?;
        let (months, _) = named("month", field(mo, 1, 12, &MONTHS, 1))?;
        let (mut weekdays, weekdays_any) = named("day-of-week", field(dow, 0, 7, &WEEKDAYS, 0))?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & 0x7f; // 7 is Sunday too
        }
        Ok(Cron {
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: weekdays as u8,
            days_any,
            weekdays_any,
        })
    }

    /// Whether the minute holding `t` matches.
    pub fn matches(&self, t: DateTime) -> bool {
        let bit = |bits: u64, n: i64| bits & (1u64 << n) != 0;
        if !bit(self.minutes, t.minute().into())
            || !bit(self.hours.into(), t.hour().into())
            || !bit(self.months.into(), t.month().into())
        {
            return false;
        }
        let dom = bit(self.days.into(), t.day().into());
        let dow = bit(
            self.weekdays.into(),
            t.weekday().to_sunday_zero_offset().into(),
        );
        match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }
}

/// The longest recurring window: finding whether one is open looks back this far.
pub const MAX_WINDOW: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// A deny window, compiled.
#[derive(Clone, Debug)]
pub enum Window {
    /// Opens at every minute `cron` matches (in `tz`), stays open `duration`.
    Recurring {
        cron: Cron,
        duration: jiff::SignedDuration,
        tz: jiff::tz::TimeZone,
    },
    Fixed {
        start: jiff::Timestamp,
        end: jiff::Timestamp,
    },
}

/// An instant: RFC 3339 with an offset, or a civil date-time read in `tz`.
fn instant(s: &str, tz: &jiff::tz::TimeZone) -> Result<jiff::Timestamp, String> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let dt: DateTime = s.parse().map_err(|_| {
        format!("{s:?} is not a date-time (2026-12-24T18:00:00, with an optional offset)")
    })?;
    tz.to_ambiguous_zoned(dt)
        .compatible()
        .map(|z| z.timestamp())
        .map_err(|e| format!("{s:?}: {e}"))
}

impl Window {
    /// From a policy's window; `Err((field, why))` names the offending field.
    pub fn from_spec(w: &crate::meridian::DenyWindow) -> Result<Window, (&'static str, String)> {
        let tz = match w.time_zone.as_deref() {
            None | Some("") | Some("UTC") => jiff::tz::TimeZone::UTC,
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|_| {
                (
                    "timeZone",
                    format!("unknown time zone {name:?} (an IANA name such as Europe/Paris)"),
                )
            })?,
        };
        match (&w.schedule, &w.start) {
            (Some(_), Some(_)) => Err((
                "schedule",
                "give either schedule and duration, or start and end".into(),
            )),
            (Some(sched), None) => {
                let cron = Cron::parse(sched).map_err(|e| ("schedule", e))?;
                let d = w
                    .duration
                    .as_deref()
                    .ok_or(("duration", "required with schedule".to_owned()))?;
                let d = crate::duration::parse(d).map_err(|e| ("duration", e))?;
                if d.is_zero() || d > MAX_WINDOW {
                    return Err(("duration", "must be more than 0 and at most 168h".into()));
                }
                let duration =
                    jiff::SignedDuration::try_from(d).map_err(|e| ("duration", e.to_string()))?;
                Ok(Window::Recurring { cron, duration, tz })
            }
            (None, Some(start)) => {
                let end = w
                    .end
                    .as_deref()
                    .ok_or(("end", "required with start".to_owned()))?;
                let start = instant(start, &tz).map_err(|e| ("start", e))?;
                let end = instant(end, &tz).map_err(|e| ("end", e))?;
                if end <= start {
                    return Err(("end", "must be after start".into()));
                }
                Ok(Window::Fixed { start, end })
            }
            (None, None) => Err((
                "schedule",
                "give schedule and duration, or start and end".into(),
            )),
        }
    }

    /// When the window holding `now` closes; `None` when `now` is outside.
    pub fn open_until(&self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        match self {
            Window::Fixed { start, end } => (*start <= now && now < *end).then_some(*end),
            Window::Recurring { cron, duration, tz } => {
                // The latest start within `duration` before now, minute by minute.
                let minute = jiff::SignedDuration::from_secs(60);
                let secs = now.as_second().div_euclid(60) * 60;
                let mut t = jiff::Timestamp::from_second(secs).ok()?;
                let oldest = now.checked_sub(*duration).ok()?;
                while t > oldest {
                    if cron.matches(t.to_zoned(tz.clone()).datetime()) {
                        let end = t.checked_add(*duration).ok()?;
                        return (now < end).then_some(end);
                    }
                    t = t.checked_sub(minute).ok()?;
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    #[test]
    fn fields_ranges_steps_names() {
        let c = Cron::parse("30 18 * * fri-sun").unwrap();
        // 2026-11-27 is a Friday.
        assert!(c.matches(date(2026, 11, 27).at(18, 30, 0, 0)));
        assert!(c.matches(date(2026, 11, 29).at(18, 30, 59, 0)));
        assert!(!c.matches(date(2026, 11, 30).at(18, 30, 0, 0)));
        assert!(!c.matches(date(2026, 11, 27).at(18, 31, 0, 0)));
        let c = Cron::parse("*/15 9-17/4 1,15 jan,JUL *").unwrap();
        assert!(c.matches(date(2026, 7, 15).at(13, 45, 0, 0)));
        assert!(!c.matches(date(2026, 7, 15).at(11, 45, 0, 0)));
        assert!(!c.matches(date(2026, 8, 15).at(13, 45, 0, 0)));
        assert!(
            Cron::parse("0 0 * * 7")
                .unwrap()
                .matches(date(2026, 11, 29).at(0, 0, 0, 0))
        );
    }

    #[test]
    fn either_day_field_matches_when_both_are_restricted() {
        let c = Cron::parse("0 0 1 * mon").unwrap();
        assert!(c.matches(date(2026, 12, 1).at(0, 0, 0, 0))); // a Tuesday, the 1st
        assert!(c.matches(date(2026, 11, 30).at(0, 0, 0, 0))); // a Monday
        assert!(!c.matches(date(2026, 12, 2).at(0, 0, 0, 0)));
    }

    #[test]
    fn recurring_windows_open_and_close_in_their_time_zone() {
        let w = crate::meridian::DenyWindow {
            schedule: Some("0 18 * * fri".into()),
            duration: Some("6h".into()),
            time_zone: Some("Asia/Shanghai".into()),
            ..Default::default()
        };
        let w = Window::from_spec(&w).unwrap();
        // Friday 18:00 in Shanghai is 10:00 UTC.
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        assert_eq!(w.open_until(at("2026-11-27T09:59:59Z")), None);
        assert_eq!(
            w.open_until(at("2026-11-27T10:00:00Z")),
            Some(at("2026-11-27T16:00:00Z"))
        );
        assert_eq!(
            w.open_until(at("2026-11-27T15:59:59Z")),
            Some(at("2026-11-27T16:00:00Z"))
        );
        assert_eq!(w.open_until(at("2026-11-27T16:00:00Z")), None);
        assert_eq!(w.open_until(at("2026-11-28T12:00:00Z")), None);
    }

    #[test]
    fn fixed_windows_take_offsets_or_the_time_zone() {
        let w = crate::meridian::DenyWindow {
            start: Some("2026-12-24T00:00:00".into()),
            end: Some("2026-12-27T00:00:00+01:00".into()),
            time_zone: Some("Europe/Paris".into()),
            ..Default::default()
        };
        let w = Window::from_spec(&w).unwrap();
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        assert_eq!(w.open_until(at("2026-12-23T22:59:59Z")), None);
        assert!(w.open_until(at("2026-12-23T23:00:00Z")).is_some());
        assert_eq!(w.open_until(at("2026-12-26T23:00:00Z")), None);
    }

    #[test]
    fn bad_windows_name_their_field() {
        let bad = |w: crate::meridian::DenyWindow| Window::from_spec(&w).unwrap_err().0;
        let d = crate::meridian::DenyWindow::default;
        assert_eq!(bad(d()), "schedule");
        assert_eq!(
            bad(crate::meridian::DenyWindow {
                schedule: Some("* * * * *".into()),
                ..d()
            }),
            "duration"
        );
        assert_eq!(
            bad(crate::meridian::DenyWindow {
                schedule: Some("* * * * *".into()),
                duration: Some("200h".into()),
                ..d()
            }),
            "duration"
        );
        assert_eq!(
            bad(crate::meridian::DenyWindow {
                start: Some("2026-01-02T00:00:00Z".into()),
                end: Some("2026-01-01T00:00:00Z".into()),
                ..d()
            }),
            "end"
        );
        assert_eq!(
            bad(crate::meridian::DenyWindow {
                start: Some("soon".into()),
                end: Some("2026-01-01T00:00:00Z".into()),
                ..d()
            }),
            "start"
        );
        assert_eq!(
            bad(crate::meridian::DenyWindow {
                schedule: Some("* * * * *".into()),
                duration: Some("1h".into()),
                time_zone: Some("Mars/Olympus".into()),
                ..d()
            }),
            "timeZone"
        );
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        for (s, want) in [
            ("* * * *", "five fields"),
            ("60 * * * *", "minute field: 60 is outside 0-59"),
            ("* 5-2 * * *", "runs backwards"),
            ("* * * * */0", "step"),
            ("* * * foo *", "month field"),
            ("* * 0 * *", "day-of-month field"),
        ] {
            let e = Cron::parse(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
