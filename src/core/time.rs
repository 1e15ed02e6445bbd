//! RFC 3339 timestamps to Unix seconds, without a date-time dependency.

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` into seconds since the Unix epoch.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    // Every byte is read with `get`: hostile key-set documents reach this parser.
    let at = |i: usize| text.as_bytes().get(i).copied();
    if at(4) != Some(b'-') || at(7) != Some(b'-') || !matches!(at(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    if at(13) != Some(b':') || at(16) != Some(b':') {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let s = text.get(from..to)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = text.get(19..)?;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        rest = frac.get(digits..)?;
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let (sign, hh_mm) = match rest.split_at_checked(1)? {
                ("+", hh_mm) => (1, hh_mm),
                ("-", hh_mm) => (-1, hh_mm),
                _ => return None,
            };
            let (hh, mm) = hh_mm.split_once(':')?;
            if hh.len() != 2 || mm.len() != 2 {
                return None;
            }
            let two_digits = |s: &str| -> Option<i64> {
                s.bytes()
                    .all(|c| c.is_ascii_digit())
                    .then(|| s.parse().ok())?
            };
            let (oh, om) = (two_digits(hh)?, two_digits(mm)?);
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month) in UTC of a Unix time: the calendar month budgets are counted in.
pub fn utc_year_month(unix_seconds: i64) -> (i64, u32) {
    let z = unix_seconds.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    (year, month as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-22T06:32:16Z"), Some(1_795_329_136));
        assert_eq!(
            parse_rfc3339("2026-11-22T07:32:16+01:00"),
            Some(1_795_329_136)
        );
        assert_eq!(
            parse_rfc3339("2026-11-22T06:32:16.123Z"),
            Some(1_795_329_136)
        );
    }

    #[test]
    fn rejects_bad_times() {
        for bad in [
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-01-01",
            "2026-01-01T00:00:00",
            "yesterday",
            "2026-01-01T25:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    /// Key-set documents come from a key service: any text must be refused, never panic.
    #[test]
    fn hostile_text_is_refused_without_panicking() {
        for bad in [
            "",
            "2026-01-01T00:00:0\u{e9}",
            "2026-01-01T00:00:00.\u{e9}",
            "2026-01-01T00:00:00\u{e9}\u{e9}\u{e9}",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
            "2026-01-01T00:00:00++1:00",
            "2026-01-01T00:00:00+1:000",
            "2026-01-01T00:00:00+01:0\u{e9}",
            "2026-01-01T00:00:00-24:00",
            "2026-01-01T00:00:00+",
            "+026-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00-00:30"), Some(1800));
    }

    #[test]
    fn year_month_of_unix_time() {
        assert_eq!(utc_year_month(0), (1970, 1));
        assert_eq!(utc_year_month(1_795_329_136), (2026, 11));
        let dec31 = parse_rfc3339("2026-12-31T23:59:59Z").unwrap_or_default();
        assert_eq!(utc_year_month(dec31), (2026, 12));
        assert_eq!(utc_year_month(dec31 + 1), (2027, 1));
    }
}
