//! Parsing labelled multi-sensor CSV text, one line at a time: the header picks the separator and
//! the timestamp, label and sensor columns ([`Layout`]); [`RowParser`] then turns each data line into
//! a [`Row`] (timestamp in ms, 0/1 label, one value per sensor with NaN for a missing reading).
//!
//! Nothing here reads a file: callers stream lines in, so a file of hundreds of MB is never held twice.

use super::super::nab::parse_timestamp;
use super::super::EvalError;

/// Which columns a file's header maps to what; all names are matched case-insensitively.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CsvOptions {
    /// Timestamp column; default: the first named `timestamp`, `time`, `datetime` or `date`, else
    /// the first column.
    pub time_column: Option<String>,
    /// 0/1 label column; default: the first named `label`, `anomaly` or `is_anomaly`, else none.
    pub label_column: Option<String>,
    /// Sensor columns to use, in this order; default: every column but the timestamp and the label.
    pub columns: Option<Vec<String>>,
    /// Columns left out of the default sensor set (extra label-like columns such as `changepoint`);
    /// a name the file does not have is no error (a folder's files may differ in extra columns).
    pub ignore: Vec<String>,
    /// Cell separator; default: `;` if the header holds more `;` than `,`, else `,`.
    pub separator: Option<char>,
}

/// Timestamp column names recognised by default, in order of preference.
pub const TIME_NAMES: [&str; 4] = ["timestamp", "time", "datetime", "date"];
/// Label column names recognised by default, in order of preference.
pub const LABEL_NAMES: [&str; 3] = ["label", "anomaly", "is_anomaly"];

/// Integer or decimal timestamps with an absolute value below this are seconds, others ms:
/// 1e11 s is the year 5138, 1e11 ms is 1973-03-03, so real data of either unit is told apart.
pub const SECONDS_BELOW: f64 = 1e11;

/// The meaning of a file's columns, from its header.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Cell separator.
    pub separator: char,
    /// Cells in the header.
    pub width: usize,
    /// Index of the timestamp column.
    pub time: usize,
    /// Index of the label column, if any.
    pub label: Option<usize>,
    /// Indices of the sensor columns, in sensor order.
    pub sensors: Vec<usize>,
    /// Header names of all cells, trimmed and unquoted.
    pub names: Vec<String>,
}

fn unquote(cell: &str) -> &str {
    let c = cell.trim();
    c.strip_prefix('"')
        .and_then(|c| c.strip_suffix('"'))
        .map_or(c, str::trim)
}

fn find(names: &[String], wanted: &str) -> Option<usize> {
    names.iter().position(|n| n.eq_ignore_ascii_case(wanted))
}

impl Layout {
    /// Reads the header line (line 1; a UTF-8 byte-order mark is dropped).
    pub fn from_header(header: &str, opts: &CsvOptions) -> Result<Self, EvalError> {
        let header = header.trim_start_matches('\u{feff}').trim_end_matches('\r');
        let bad = |detail: String| EvalError::Csv { line: 1, detail };
        if header.trim().is_empty() {
            return Err(bad("empty file: no header line".to_string()));
        }
        let separator = opts.separator.unwrap_or_else(|| {
            if header.matches(';').count() > header.matches(',').count() {
                ';'
            } else {
                ','
            }
        });
        let names: Vec<String> = header
            .split(separator)
            .map(|c| unquote(c).to_string())
            .collect();
        if let Some(i) = names.iter().position(String::is_empty) {
            return Err(bad(format!("column {} has no name", i + 1)));
        }
        for (i, n) in names.iter().enumerate() {
            if names[..i].iter().any(|m| m.eq_ignore_ascii_case(n)) {
                return Err(bad(format!("column {n:?} appears twice")));
            }
        }
        let named = |what: &str, name: &str| {
            find(&names, name).ok_or_else(|| {
                bad(format!(
                    "no {what} column {name:?}; columns: {}",
                    names.join(", ")
                ))
            })
        };
        let time = match &opts.time_column {
            Some(n) => named("timestamp", n)?,
            None => TIME_NAMES.iter().find_map(|n| find(&names, n)).unwrap_or(0),
        };
        let label = match &opts.label_column {
            Some(n) => Some(named("label", n)?),
            None => LABEL_NAMES.iter().find_map(|n| find(&names, n)),
        };
        if label == Some(time) {
            return Err(bad(format!(
                "column {:?} cannot be both the timestamp and the label",
                names[time]
            )));
        }
        let sensors: Vec<usize> = match &opts.columns {
            Some(cols) => {
                let mut out = Vec::with_capacity(cols.len());
                for n in cols {
                    let i = named("sensor", n)?;
                    if i == time || Some(i) == label {
                        return Err(bad(format!(
                            "column {n:?} is the timestamp or the label, not a sensor"
                        )));
                    }
                    if out.contains(&i) {
                        return Err(bad(format!("sensor column {n:?} is selected twice")));
                    }
                    out.push(i);
                }
                out
            }
            None => (0..names.len())
                .filter(|&i| i != time && Some(i) != label)
                .filter(|&i| !opts.ignore.iter().any(|n| names[i].eq_ignore_ascii_case(n)))
                .collect(),
        };
        if sensors.is_empty() {
            return Err(bad(format!(
                "no sensor column left; columns: {}",
                names.join(", ")
            )));
        }
        Ok(Self {
            separator,
            width: names.len(),
            time,
            label,
            sensors,
            names,
        })
    }

    /// Names of the sensor columns, in sensor order.
    pub fn sensor_names(&self) -> Vec<String> {
        self.sensors
            .iter()
            .map(|&i| self.names[i].clone())
            .collect()
    }
}

/// One data row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// Timestamp, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The label (false when the file has no label column).
    pub label: bool,
    /// One value per sensor, NaN where the cell is empty or `NaN`.
    pub values: Vec<f64>,
}

/// Parses a timestamp cell: an integer or decimal number of Unix seconds or ms (told apart by
/// [`SECONDS_BELOW`]; a fraction of a ms is dropped), or `YYYY-MM-DD[ T]HH:MM[:SS[.fff]]` with an
/// optional `Z` or `±HH:MM` offset, or `YYYY-MM-DD` (midnight). Naive times are UTC.
pub fn parse_time_cell(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s.bytes()
        .all(|b| b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'+')
        && s.get(4..5) != Some("-")
    {
        let x: f64 = s.parse().ok()?;
        if !x.is_finite() {
            return None;
        }
        let ms = if x.abs() < SECONDS_BELOW {
            x * 1000.0
        } else {
            x
        };
        // Within ±9.2e18 an f64 → i64 cast is exact up to rounding; reject what does not fit.
        return (ms.abs() < 9.0e18).then(|| ms.trunc() as i64);
    }
    let (body, offset_ms) = split_offset(s)?;
    let full = match body.len() {
        10 => format!("{body} 00:00:00"),
        16 => format!("{body}:00"),
        _ => body.to_string(),
    };
    parse_timestamp(&full).map(|t| t - offset_ms)
}

/// Splits a trailing `Z` or `±HH:MM` / `±HHMM` offset off an ISO-8601 date-time.
fn split_offset(s: &str) -> Option<(&str, i64)> {
    if let Some(b) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        return Some((b, 0));
    }
    // An offset can only follow the time part (after position 10, past the date's own dashes).
    let tail_start = s.len().saturating_sub(6).max(11);
    if let Some(p) = s
        .get(tail_start..)
        .and_then(|t| t.rfind(['+', '-']).map(|p| p + tail_start))
    {
        let off = &s[p + 1..];
        let digits: String = off.chars().filter(|c| *c != ':').collect();
        if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let h: i64 = digits[..2].parse().ok()?;
        let m: i64 = digits[2..].parse().ok()?;
        if h > 23 || m > 59 {
            return None;
        }
        let sign = if s.as_bytes()[p] == b'-' { -1 } else { 1 };
        return Some((&s[..p], sign * (h * 3_600_000 + m * 60_000)));
    }
    Some((s, 0))
}

/// Parses a sensor cell: `None` for a bad cell, `Some(NaN)` for a missing reading (empty, `NaN`, `NA`,
/// `null`), else the finite value.
fn parse_value(s: &str) -> Option<f64> {
    let s = unquote(s);
    if s.is_empty()
        || s.eq_ignore_ascii_case("nan")
        || s.eq_ignore_ascii_case("na")
        || s.eq_ignore_ascii_case("null")
    {
        return Some(f64::NAN);
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Turns data lines into [`Row`]s, checking time order.
#[derive(Debug, Clone)]
pub struct RowParser {
    layout: Layout,
    last_ts: Option<i64>,
    cells: Vec<(usize, usize)>,
}

impl RowParser {
    /// A parser for the data lines under `layout`'s header.
    pub fn new(layout: Layout) -> Self {
        Self {
            cells: Vec::with_capacity(layout.width),
            layout,
            last_ts: None,
        }
    }

    /// The layout this parser reads.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Parses data line `line` (1-based, the header is line 1) into `row`. Returns `Ok(false)` for a
    /// blank line (skipped). Errors name the line and, for a cell, its column.
    pub fn parse(&mut self, line: usize, text: &str, row: &mut Row) -> Result<bool, EvalError> {
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return Ok(false);
        }
        self.cells.clear();
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c == self.layout.separator {
                self.cells.push((start, i));
                start = i + c.len_utf8();
            }
        }
        self.cells.push((start, text.len()));
        let l = &self.layout;
        if self.cells.len() != l.width {
            return Err(EvalError::Csv {
                line,
                detail: format!(
                    "{} cells, the header has {} (separator {:?})",
                    self.cells.len(),
                    l.width,
                    l.separator
                ),
            });
        }
        let cell = |i: usize| {
            let (a, b) = self.cells[i];
            &text[a..b]
        };
        let bad = |col: usize, detail: String| EvalError::CsvColumn {
            line,
            column: l.names[col].clone(),
            detail,
        };
        let ts_text = unquote(cell(l.time));
        let ts = parse_time_cell(ts_text)
            .ok_or_else(|| bad(l.time, format!("bad timestamp {ts_text:?}")))?;
        if let Some(prev) = self.last_ts {
            if ts < prev {
                return Err(bad(
                    l.time,
                    format!(
                        "time goes backwards: {ts_text:?} is {} ms before the previous row",
                        prev - ts
                    ),
                ));
            }
        }
        let label = match l.label {
            None => false,
            Some(c) => {
                let t = unquote(cell(c));
                let v = t.parse::<f64>().ok();
                if v == Some(0.0) {
                    false
                } else if v == Some(1.0) {
                    true
                } else {
                    return Err(bad(c, format!("label must be 0 or 1, got {t:?}")));
                }
            }
        };
        row.values.clear();
        for &c in &l.sensors {
            let t = cell(c);
            let v =
                parse_value(t).ok_or_else(|| bad(c, format!("not a number: {:?}", unquote(t))))?;
            row.values.push(v);
        }
        row.ts_ms = ts;
        row.label = label;
        self.last_ts = Some(ts);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(header: &str) -> Layout {
        Layout::from_header(header, &CsvOptions::default()).unwrap()
    }

    fn parse_all(text: &str, opts: &CsvOptions) -> Result<Vec<Row>, EvalError> {
        let mut lines = text.lines();
        let mut p = RowParser::new(Layout::from_header(lines.next().unwrap_or(""), opts)?);
        let mut rows = Vec::new();
        let mut row = Row::default();
        for (i, l) in lines.enumerate() {
            if p.parse(i + 2, l, &mut row)? {
                rows.push(row.clone());
            }
        }
        Ok(rows)
    }

    #[test]
    fn separators_are_detected_from_the_header() {
        let l = layout("datetime;Accelerometer1RMS;Current;anomaly;changepoint");
        assert_eq!(l.separator, ';');
        assert_eq!((l.time, l.label), (0, Some(3)));
        assert_eq!(
            l.sensor_names(),
            ["Accelerometer1RMS", "Current", "changepoint"]
        );
        let l = layout("\u{feff}\"a\",\"Time\",\"b\"\r");
        assert_eq!((l.separator, l.time, l.label), (',', 1, None));
        assert_eq!(l.sensor_names(), ["a", "b"]);
        let opts = CsvOptions {
            separator: Some('\t'),
            ..CsvOptions::default()
        };
        assert_eq!(
            Layout::from_header("t\tx\ty", &opts).unwrap().sensors,
            [1, 2]
        );
    }

    #[test]
    fn columns_are_chosen_by_name_ignore_and_defaults() {
        let h = "when,p,q,r,Is_Anomaly,changepoint";
        // No time-like name: the first column is the timestamp.
        let l = layout(h);
        assert_eq!((l.time, l.label), (0, Some(4)));
        let opts = CsvOptions {
            ignore: vec!["CHANGEPOINT".into(), "q".into()],
            ..CsvOptions::default()
        };
        assert_eq!(
            Layout::from_header(h, &opts).unwrap().sensor_names(),
            ["p", "r"]
        );
        let opts = CsvOptions {
            time_column: Some("r".into()),
            label_column: Some("changepoint".into()),
            columns: Some(vec!["q".into(), "p".into()]),
            ..CsvOptions::default()
        };
        let l = Layout::from_header(h, &opts).unwrap();
        assert_eq!(
            (l.time, l.label, l.sensors.clone()),
            (3, Some(5), vec![2, 1])
        );
    }

    #[test]
    fn header_errors_name_line_one_and_the_column() {
        let err =
            |h: &str, opts: CsvOptions| Layout::from_header(h, &opts).unwrap_err().to_string();
        assert_eq!(
            err("", CsvOptions::default()),
            "line 1: empty file: no header line"
        );
        assert!(err("t,a,a", CsvOptions::default()).contains("column \"a\" appears twice"));
        assert!(err("t,,a", CsvOptions::default()).contains("column 2 has no name"));
        assert!(err("timestamp,label", CsvOptions::default()).contains("no sensor column"));
        let e = err(
            "t,a",
            CsvOptions {
                columns: Some(vec!["b".into()]),
                ..CsvOptions::default()
            },
        );
        assert!(
            e.starts_with("line 1: no sensor column \"b\"; columns: t, a"),
            "{e}"
        );
        let e = err(
            "t,a",
            CsvOptions {
                label_column: Some("t".into()),
                ..CsvOptions::default()
            },
        );
        assert!(e.contains("both the timestamp and the label"), "{e}");
        let ok = Layout::from_header(
            "t,a",
            &CsvOptions {
                ignore: vec!["zz".into()],
                ..CsvOptions::default()
            },
        );
        assert_eq!(
            ok.unwrap().sensors,
            [1],
            "ignoring an absent column is fine"
        );
    }

    #[test]
    fn timestamp_forms() {
        let base = 1_700_000_000_000i64; // 2023-11-14 22:13:20 UTC
        assert_eq!(parse_time_cell("1700000000"), Some(base));
        assert_eq!(parse_time_cell("1700000000.25"), Some(base + 250));
        assert_eq!(parse_time_cell("1700000000000"), Some(base));
        assert_eq!(parse_time_cell("2023-11-14 22:13:20"), Some(base));
        assert_eq!(parse_time_cell("2023-11-14T22:13:20.5Z"), Some(base + 500));
        assert_eq!(parse_time_cell("2023-11-14T23:13:20+01:00"), Some(base));
        assert_eq!(parse_time_cell("2023-11-14T21:13:20-0100"), Some(base));
        assert_eq!(parse_time_cell("2023-11-14 22:13"), Some(base - 20_000));
        assert_eq!(parse_time_cell("2023-11-14"), Some(base - 80_000_000));
        for bad in [
            "",
            "abc",
            "2023-13-01",
            "2023-11-14 25:00:00",
            "1e400",
            "2023-11-14T22:13:20+9",
        ] {
            assert_eq!(parse_time_cell(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rows_parse_with_labels_missing_cells_and_quotes() {
        let text = "datetime;a;b;anomaly\n\
                    2020-03-09 10:14:33;1.5;\"2\";0\n\
                    \n\
                    2020-03-09 10:14:34;;NaN;1.0\r\n\
                    2020-03-09 10:14:34;-3e2; 4 ;1\n";
        let rows = parse_all(text, &CsvOptions::default()).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].values, [1.5, 2.0]);
        assert!(!rows[0].label && rows[1].label && rows[2].label);
        assert!(rows[1].values.iter().all(|v| v.is_nan()));
        assert_eq!(rows[2].values, [-300.0, 4.0]);
        assert_eq!(
            rows[1].ts_ms, rows[2].ts_ms,
            "equal timestamps are in order"
        );
    }

    #[test]
    fn row_errors_name_line_and_column() {
        let opts = CsvOptions::default();
        let err = |body: &str| {
            parse_all(&format!("time,a,b,label\n1000,1,2,0\n{body}\n"), &opts)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(err("999,1,2,0"), "line 3: column \"time\": time goes backwards: \"999\" is 1000 ms before the previous row");
        assert_eq!(
            err("1001,1,x,0"),
            "line 3: column \"b\": not a number: \"x\""
        );
        assert_eq!(
            err("1001,inf,2,0"),
            "line 3: column \"a\": not a number: \"inf\""
        );
        assert_eq!(
            err("1001,1,2,2"),
            "line 3: column \"label\": label must be 0 or 1, got \"2\""
        );
        assert_eq!(
            err("yesterday,1,2,0"),
            "line 3: column \"time\": bad timestamp \"yesterday\""
        );
        assert_eq!(
            err("1001,1,2"),
            "line 3: 3 cells, the header has 4 (separator ',')"
        );
        assert_eq!(
            err("1001,1,2,0,9"),
            "line 3: 5 cells, the header has 4 (separator ',')"
        );
    }
}
