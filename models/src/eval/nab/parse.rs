//! Parsing NAB text: `YYYY-MM-DD HH:MM:SS` timestamps, `timestamp,value` data CSVs and the
//! `combined_windows.json` labels.
//!
//! The date arithmetic is written out here (Howard Hinnant's days-from-civil) rather than pulled in from
//! a date crate: NAB timestamps are naive UTC with one fixed layout, so a few lines cover them exactly.
//! Reading the files is the caller's job; this module only sees their text.

use super::super::EvalError;
use std::collections::BTreeMap;

/// One data file: row timestamps (ms since the Unix epoch, UTC) and values, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Row timestamps in file order (mostly increasing; NAB has a few repeats and steps back).
    pub timestamps_ms: Vec<i64>,
    /// Row values, finite.
    pub values: Vec<f64>,
}

impl Series {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.timestamps_ms.len()
    }

    /// Whether the file has no data rows.
    pub fn is_empty(&self) -> bool {
        self.timestamps_ms.is_empty()
    }
}

/// A labelled anomaly window: first and last timestamp, both inclusive, ms since the epoch.
pub type Window = (i64, i64);

/// Labels: data file (`category/file.csv`) → its windows, in file order.
pub type Labels = BTreeMap<String, Vec<Window>>;

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

/// Parses `YYYY-MM-DD HH:MM:SS` (a `T` separator and a fraction of up to 9 digits are accepted; the
/// fraction is truncated to ms) as UTC, returning ms since the Unix epoch, or `None` if malformed.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b' ' || b[10] == b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    let millis = match &b[19..] {
        [] => 0,
        [b'.', frac @ ..] if (1..=9).contains(&frac.len()) => {
            let mut ms = digits(frac)?;
            // Scale to exactly three digits: pad short fractions, truncate long ones.
            for _ in frac.len()..3 {
                ms *= 10;
            }
            for _ in 3..frac.len() {
                ms /= 10;
            }
            ms
        }
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

/// Formats ms since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC), adding `.mmm` only when the
/// milliseconds are not zero. The inverse of [`parse_timestamp`] for years 0000–9999.
pub fn format_timestamp(ts_ms: i64) -> String {
    let days = ts_ms.div_euclid(86_400_000);
    let in_day = ts_ms.rem_euclid(86_400_000);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, ms) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    if ms == 0 {
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
    } else {
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{ms:03}")
    }
}

/// Parses a NAB data file: a `timestamp,value` header, then one row per line with a timestamp and a
/// finite value. Row order is kept as it is: NAB scores by row index, and a few of its files repeat or
/// step back in time (daylight saving, a gap in `machine_temperature_system_failure.csv`). Blank lines are skipped. Errors carry the 1-based line number.
pub fn parse_csv(text: &str) -> Result<Series, EvalError> {
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, l)| l).unwrap_or_default();
    let header = header.trim_start_matches('\u{feff}').trim();
    if header.replace(' ', "") != "timestamp,value" {
        return Err(EvalError::Csv {
            line: 1,
            detail: format!("expected header \"timestamp,value\", got {header:?}"),
        });
    }
    let mut series = Series::default();
    for (i, raw) in lines {
        let line = i + 1;
        let row = raw.trim();
        if row.is_empty() {
            continue;
        }
        let bad = |detail: String| EvalError::Csv { line, detail };
        let (ts_text, value_text) = row
            .split_once(',')
            .ok_or_else(|| bad(format!("expected \"timestamp,value\", got {row:?}")))?;
        let ts_text = ts_text.trim();
        let ts =
            parse_timestamp(ts_text).ok_or_else(|| bad(format!("bad timestamp {ts_text:?}")))?;
        let value_text = value_text.trim();
        let value = value_text
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| bad(format!("bad value {value_text:?}")))?;
        series.timestamps_ms.push(ts);
        series.values.push(value);
    }
    Ok(series)
}

/// Parses `combined_windows.json`: an object mapping each data file (`category/file.csv`) to a list of
/// `[start, end]` timestamp pairs.
pub fn parse_labels(json: &str) -> Result<Labels, EvalError> {
    let raw: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(json).map_err(|e| EvalError::Labels(e.to_string()))?;
    let mut labels = Labels::new();
    for (file, windows) in raw {
        let mut parsed = Vec::with_capacity(windows.len());
        for (i, (start, end)) in windows.iter().enumerate() {
            let ts = |s: &str| {
                parse_timestamp(s).ok_or_else(|| {
                    EvalError::Labels(format!("{file}: window {i}: bad timestamp {s:?}"))
                })
            };
            parsed.push((ts(start)?, ts(end)?));
        }
        labels.insert(file, parsed);
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_timestamps_convert_to_epoch_ms() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(
            parse_timestamp("2014-04-10 07:15:00.000000"),
            Some(1_397_114_100_000)
        );
        assert_eq!(
            parse_timestamp("2000-02-29 23:59:59"),
            Some(951_868_799_000)
        );
        assert_eq!(parse_timestamp("1969-12-31 23:59:59.5"), Some(-500));
        assert_eq!(
            parse_timestamp("2015-02-26T21:42:53"),
            Some(1_424_986_973_000)
        );
    }

    #[test]
    fn malformed_timestamps_are_rejected() {
        for s in [
            "",
            "2014-04-10",
            "2014-13-01 00:00:00",
            "2014-02-29 00:00:00",
            "2014-04-10 24:00:00",
            "2014-04-10 07:15:00.",
            "2014-04-10 07:15:00Z",
            "2014/04/10 07:15:00",
            "20a4-04-10 07:15:00",
        ] {
            assert_eq!(parse_timestamp(s), None, "{s:?}");
        }
    }

    #[test]
    fn csv_rows_parse_and_errors_name_the_line() {
        let s = parse_csv("timestamp,value\n2014-04-10 07:15:00,1.5\n\n2014-04-10 07:20:00,-2\n")
            .unwrap();
        assert_eq!(s.values, vec![1.5, -2.0]);
        assert_eq!(s.timestamps_ms[1] - s.timestamps_ms[0], 300_000);

        let e = parse_csv("timestamp,value\n2014-04-10 07:15:00,1\n2014-04-10 7:20:00,2\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3: bad timestamp \"2014-04-10 7:20:00\""
        );
        let e = parse_csv("timestamp,value\n2014-04-10 07:15:00,x\n").unwrap_err();
        assert!(matches!(e, EvalError::Csv { line: 2, .. }), "{e}");
        let dup = parse_csv("timestamp,value\n2014-04-10 07:15:00,1\n2014-04-10 07:15:00,2\n");
        assert_eq!(dup.unwrap().len(), 2, "repeated timestamps are kept");
        let e = parse_csv("time,value\n").unwrap_err();
        assert!(matches!(e, EvalError::Csv { line: 1, .. }));
        assert!(parse_csv("timestamp,value\n2014-04-10 07:15:00,nan\n").is_err());
    }

    #[test]
    fn labels_parse_with_fractional_seconds() {
        let l = parse_labels(
            r#"{"a/x.csv": [["2014-04-10 07:15:00.000000", "2014-04-11 16:45:00.000000"]], "b/y.csv": []}"#,
        )
        .unwrap();
        assert_eq!(l["a/x.csv"], vec![(1_397_114_100_000, 1_397_234_700_000)]);
        assert!(l["b/y.csv"].is_empty());
        assert!(parse_labels(r#"{"a": [["nope", "2014-04-11 16:45:00"]]}"#).is_err());
        assert!(parse_labels("[").is_err());
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(ts in -62_135_596_800_000i64..253_402_300_799_999) {
            prop_assert_eq!(parse_timestamp(&format_timestamp(ts)), Some(ts));
        }
    }
}
