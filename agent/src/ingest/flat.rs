//! Fast path of the JSON value mapping for the payload nearly every sensor sends: one flat object of
//! plain ASCII keys and numbers, such as `{"ts":1767225600000,"value":21.5}`. It decodes that in one
//! pass without serde and gives up (`None`) on anything else, so the serde path decodes the rest and
//! words every error; it accepts nothing serde_json refuses and yields the same numbers.

/// The numbers of `value_field` and `ts_field` in a flat JSON object, `None` unless the payload is
/// one: keys and string values of printable ASCII without escapes, other fields strings, numbers,
/// `true`, `false` or `null` (a nested object or array sends it to serde), whitespace anywhere JSON
/// allows it. As with the serde visitor, the last duplicate wins and a key equal to both fields is
/// the value. Numbers are parsed correctly rounded, like serde_json's `float_roundtrip`; one out of
/// `f64`'s range gives `None` (serde_json's error). A payload it takes is all ASCII, hence UTF-8.
pub(super) fn value_and_ts(
    payload: &[u8],
    value_field: &str,
    ts_field: Option<&str>,
) -> Option<(Option<f64>, Option<f64>)> {
    let mut c = Cursor { b: payload, i: 0 };
    let (mut value, mut ts) = (None, None);
    c.ws();
    c.eat(b'{')?;
    c.ws();
    if c.peek() == Some(b'}') {
        c.i += 1;
    } else {
        loop {
            c.ws();
            let key = c.string()?;
            c.ws();
            c.eat(b':')?;
            c.ws();
            if key == value_field.as_bytes() {
                value = Some(c.number()?);
            } else if ts_field.is_some_and(|t| key == t.as_bytes()) {
                ts = Some(c.number()?);
            } else {
                c.skip_scalar()?;
            }
            c.ws();
            match c.next()? {
                b',' => {}
                b'}' => break,
                _ => return None,
            }
        }
    }
    c.ws();
    (c.i == payload.len()).then_some((value, ts))
}

/// A position in the payload.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    #[inline]
    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// Skips JSON whitespace.
    #[inline]
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string's bytes between its quotes; `None` for an escape, a control character or a
    /// non-ASCII byte (serde then checks and decodes it).
    #[inline]
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match self.next()? {
                b'"' => return Some(&self.b[start..self.i - 1]),
                b'\\' | 0..=0x1f | 0x80..=0xff => return None,
                _ => {}
            }
        }
    }

    /// Skips the digits at the cursor, returning how many.
    #[inline]
    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    /// Skips a JSON number (RFC 8259 grammar) without converting it, as serde_json skips one it
    /// ignores (whatever its magnitude). Returns whether it is negative, where its integer digits
    /// are and whether it is an integer; `None` if malformed.
    #[inline]
    fn scan_number(&mut self) -> Option<(bool, usize, usize, bool)> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let int_start = self.i;
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        let int_end = self.i;
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
            integer = false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
            integer = false;
        }
        Some((negative, int_start, int_end, integer))
    }

    /// A JSON number, correctly rounded; `None` if malformed or beyond `f64`.
    #[inline]
    fn number(&mut self) -> Option<f64> {
        let start = self.i;
        let (negative, int_start, int_end, integer) = self.scan_number()?;
        // Integers of up to 15 digits are exact in an f64: no decimal conversion needed.
        if integer && int_end - int_start <= 15 {
            let n = self.b[int_start..int_end]
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            let v = n as f64;
            return Some(if negative { -v } else { v });
        }
        // The grammar above admits only ASCII.
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        let v: f64 = text.parse().ok()?;
        v.is_finite().then_some(v)
    }

    /// Skips a string, number, `true`, `false` or `null`; `None` for anything else.
    #[inline]
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'-' | b'0'..=b'9' => self.scan_number().map(|_| ()),
            b't' => self.word(b"true"),
            b'f' => self.word(b"false"),
            b'n' => self.word(b"null"),
            _ => None,
        }
    }

    #[inline]
    fn word(&mut self, w: &[u8]) -> Option<()> {
        let end = self.i.checked_add(w.len())?;
        (self.b.get(self.i..end)? == w).then(|| self.i = end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the serde path (the visitor the mapping falls back to, serde_json with
    /// `float_roundtrip` as the agent builds it) makes of the same payload.
    fn serde(payload: &[u8], value: &str, ts: Option<&str>) -> Option<(Option<f64>, Option<f64>)> {
        use serde::de::DeserializeSeed;
        let seed = super::super::ValueSeed {
            value_field: value,
            ts_field: ts,
        };
        let mut de = serde_json::Deserializer::from_slice(payload);
        seed.deserialize(&mut de)
            .and_then(|r| de.end().map(|_| r))
            .ok()
    }

    fn same(a: Option<(Option<f64>, Option<f64>)>, b: Option<(Option<f64>, Option<f64>)>) -> bool {
        let bits = |x: Option<(Option<f64>, Option<f64>)>| {
            x.map(|(v, t)| (v.map(f64::to_bits), t.map(f64::to_bits)))
        };
        bits(a) == bits(b)
    }

    #[test]
    fn the_common_payloads_decode() {
        let f = |p: &str| value_and_ts(p.as_bytes(), "value", Some("ts"));
        assert_eq!(
            f(r#"{"ts":1767225600000,"value":21.5}"#),
            Some((Some(21.5), Some(1_767_225_600_000.0)))
        );
        assert_eq!(
            f(" {\n\t\"value\" : -0.0 , \"unit\":\"C\",\"ok\":true,\"x\":null,\"n\":false}\r\n"),
            Some((Some(-0.0), None))
        );
        assert_eq!(f("{}"), Some((None, None)));
        assert_eq!(f(r#"{"value":1,"value":2}"#), Some((Some(2.0), None)));
        assert_eq!(
            f(r#"{"value":-0}"#).unwrap().0.unwrap().to_bits(),
            (-0.0f64).to_bits()
        );
        assert_eq!(f(r#"{"value":1e-400}"#), Some((Some(0.0), None)));
        assert_eq!(
            f(r#"{"value":12345678901234567890123}"#),
            Some((Some(1.2345678901234568e22), None))
        );
    }

    #[test]
    fn anything_unusual_goes_to_serde() {
        let f = |p: &[u8]| value_and_ts(p, "value", Some("ts"));
        for p in [
            &br#"{"value":1e999}"#[..],
            br#"{"value":"12"}"#,
            br#"{"value":NaN}"#,
            br#"{"value":01}"#,
            br#"{"value":1.}"#,
            br#"{"value":.5}"#,
            br#"{"value":+1}"#,
            br#"{"value":1e}"#,
            br#"{"value":1,}"#,
            br#"{"value":1} x"#,
            br#"{"value":1"#,
            br#"{"va\u006cue":1}"#,
            br#"{"value":1,"tags":{"a":1}}"#,
            br#"{"value":1,"list":[1]}"#,
            b"{\"value\":1,\"unit\":\"\xc2\xb0C\"}",
            b"{\"value\":1,\"unit\":\"a\x01\"}",
            br#"{"value":1,"x":tru}"#,
            br#"[1,2]"#,
            b"",
        ] {
            assert_eq!(f(p), None, "{}", String::from_utf8_lossy(p));
        }
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<f64>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(|v| v.to_string()),
            any::<f64>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(|v| format!("{v:e}")),
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            "-?(0|[1-9][0-9]{0,25})(\\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?",
        ]
    }

    fn field() -> impl Strategy<Value = String> {
        prop_oneof![
            number(),
            "\"[ -!#-\\[\\]-~]{0,8}\"".prop_map(|s| s),
            Just("true".to_string()),
            Just("null".to_string()),
            Just("{\"a\":1}".to_string()),
            Just("\"\\n\"".to_string()),
        ]
    }

    proptest! {
        /// Whatever the fast path accepts, serde_json decodes to the same bits; a flat object of
        /// plain fields is always accepted.
        #[test]
        fn agrees_with_serde_json(
            fields in prop::collection::vec((prop::sample::select(vec!["value", "ts", "unit", "v"]), field()), 0..5),
            ws in prop::sample::select(vec!["", " ", "\n\t"]),
        ) {
            let body = fields
                .iter()
                .map(|(k, v)| format!("{ws}\"{k}\"{ws}:{ws}{v}{ws}"))
                .collect::<Vec<_>>()
                .join(",");
            let payload = format!("{ws}{{{body}}}{ws}");
            let fast = value_and_ts(payload.as_bytes(), "value", Some("ts"));
            let slow = serde(payload.as_bytes(), "value", Some("ts"));
            if fast.is_some() {
                prop_assert!(same(fast, slow), "{payload}: {fast:?} vs {slow:?}");
                prop_assert!(payload.is_ascii(), "{payload}");
            }
            let plain = fields.iter().all(|(_, v)| !v.starts_with('{') && !v.contains('\\'));
            if plain && slow.is_some() {
                prop_assert!(fast.is_some(), "{payload} refused");
            }
        }
    }
}
