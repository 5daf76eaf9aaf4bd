//! From an MQTT message to readings: topic patterns (`sensors/{device}/{metric}`) and payload
//! mappings (bare number, JSON value object, JSON object of metrics).
//!
//! Pure and allocation-free on the common path: the JSON value mapping is decoded by a visitor that
//! only looks at the two configured fields and skips the rest.

use crate::config::{PayloadFormat, Subscription, TimestampUnit};
use crate::error::IngestError;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use std::fmt;

mod flat;

/// Longest device id accepted, in bytes (DESIGN: any UTF-8 up to 256 bytes).
pub const MAX_DEVICE_ID_BYTES: usize = 256;
/// Longest metric name accepted, in bytes.
pub const MAX_METRIC_BYTES: usize = 128;
/// Timestamps must fall in [1970, 2200) once converted to ms.
const MAX_TS_MS: f64 = 7_258_118_400_000.0;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Device,
    Metric,
}

/// A parsed topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    levels: Vec<Level>,
}

impl TopicPattern {
    /// Parses `a/{device}/{metric}`; `{device}` must appear exactly once, `{metric}` at most once.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("must not be empty".into());
        }
        let mut levels = Vec::new();
        for level in pattern.split('/') {
            levels.push(match level {
                "{device}" => Level::Device,
                "{metric}" => Level::Metric,
                l if l.contains(['{', '}', '+', '#']) => {
                    return Err(format!(
                        "level {l:?} in {pattern:?}: only {{device}} and {{metric}} placeholders are allowed, and no MQTT wildcards"
                    ))
                }
                l => Level::Literal(l.to_string()),
            });
        }
        let count = |want: &Level| levels.iter().filter(|l| *l == want).count();
        if count(&Level::Device) != 1 {
            return Err(format!("{pattern:?} must contain {{device}} exactly once"));
        }
        if count(&Level::Metric) > 1 {
            return Err(format!("{pattern:?} may contain {{metric}} at most once"));
        }
        Ok(Self { levels })
    }

    /// Whether the pattern names the metric in the topic.
    pub fn has_metric(&self) -> bool {
        self.levels.contains(&Level::Metric)
    }

    /// The MQTT subscription filter: placeholders become `+`.
    pub fn filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Device | Level::Metric => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Matches a topic, returning (device, metric-if-in-topic).
    #[inline]
    pub fn matches<'t>(&self, topic: &'t str) -> Option<(&'t str, Option<&'t str>)> {
        let mut device = None;
        let mut metric = None;
        let mut rest = topic;
        let last = self.levels.len().checked_sub(1)?;
        for (k, level) in self.levels.iter().enumerate() {
            // The topic's levels as `split('/')` gives them, the last one taking the rest (which
            // must hold no further level).
            let part = if k == last {
                if rest.as_bytes().contains(&b'/') {
                    return None;
                }
                rest
            } else {
                let cut = rest.bytes().position(|b| b == b'/')?;
                let part = &rest[..cut];
                rest = &rest[cut + 1..];
                part
            };
            match level {
                Level::Literal(l) if l == part => {}
                Level::Literal(_) => return None,
                Level::Device => device = Some(part),
                Level::Metric => metric = Some(part),
            }
        }
        Some((device?, metric))
    }
}

/// A subscription ready to decode messages.
#[derive(Debug, Clone)]
pub struct Mapping {
    pattern: TopicPattern,
    filter: Option<String>,
    fixed_metric: Option<String>,
    format: PayloadFormat,
}

/// One decoded reading, borrowing names from the topic or payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawReading<'a> {
    /// Device id.
    pub device: &'a str,
    /// Metric name.
    pub metric: &'a str,
    /// Event time, ms.
    pub ts_ms: i64,
    /// Finite value.
    pub value: f64,
}

impl Mapping {
    /// Builds a mapping from its configuration.
    pub fn new(sub: &Subscription) -> Result<Self, String> {
        Ok(Self {
            pattern: TopicPattern::parse(&sub.topic)?,
            filter: sub.filter.clone(),
            fixed_metric: sub.metric.clone(),
            format: sub.payload.clone(),
        })
    }

    /// The MQTT filter to subscribe to.
    pub fn filter(&self) -> String {
        self.filter.clone().unwrap_or_else(|| self.pattern.filter())
    }

    /// Whether this mapping claims `topic`.
    pub fn claims<'t>(&self, topic: &'t str) -> Option<(&'t str, Option<&'t str>)> {
        self.pattern.matches(topic)
    }

    /// Decodes `payload` (topic already matched to `device`/`topic_metric`), calling `emit` per reading.
    /// `scratch` is reused between calls for the JSON-object mapping's field names.
    pub fn decode(
        &self,
        device: &str,
        topic_metric: Option<&str>,
        payload: &[u8],
        arrival_ms: i64,
        scratch: &mut Vec<(String, f64)>,
        emit: &mut dyn FnMut(RawReading<'_>),
    ) -> Result<(), IngestError> {
        check_name("device id", device, MAX_DEVICE_ID_BYTES)?;
        if payload.is_empty() {
            return Err(IngestError::EmptyPayload);
        }
        let metric = topic_metric.or(self.fixed_metric.as_deref());
        // The common flat payload of the JSON value mapping, decoded without serde (`None`: serde
        // decodes it, or says what is wrong with it, below).
        let flat = match &self.format {
            PayloadFormat::Json {
                value_field,
                timestamp_field,
                ..
            } => flat::value_and_ts(payload, value_field, timestamp_field.as_deref()),
            _ => None,
        };
        // JSON must be UTF-8; serde_json does not check strings it skips, so check the whole payload
        // (a payload the flat path took is ASCII).
        if !matches!(self.format, PayloadFormat::Number)
            && flat.is_none()
            && std::str::from_utf8(payload).is_err()
        {
            return Err(IngestError::NotUtf8 { what: "payload" });
        }
        match &self.format {
            PayloadFormat::Number => {
                let metric = metric.ok_or(IngestError::NoMetric)?;
                check_name("metric", metric, MAX_METRIC_BYTES)?;
                let text = std::str::from_utf8(payload)
                    .map_err(|_| IngestError::NotUtf8 { what: "payload" })?;
                let value: f64 = text.trim().parse().map_err(|_| IngestError::BadNumber {
                    text: preview(text),
                })?;
                let value = finite("value", value)?;
                emit(RawReading {
                    device,
                    metric,
                    ts_ms: arrival_ms,
                    value,
                });
            }
            PayloadFormat::Json {
                value_field,
                timestamp_field,
                timestamp_unit,
            } => {
                let metric = metric.ok_or(IngestError::NoMetric)?;
                check_name("metric", metric, MAX_METRIC_BYTES)?;
                let ts_field = timestamp_field.as_deref();
                let (value, ts) = match flat {
                    Some(found) => found,
                    None => {
                        let seed = ValueSeed {
                            value_field,
                            ts_field,
                        };
                        let mut de = serde_json::Deserializer::from_slice(payload);
                        seed.deserialize(&mut de)
                            .and_then(|r| de.end().map(|_| r))
                            .map_err(json_error)?
                    }
                };
                let value = value.ok_or_else(|| IngestError::MissingField {
                    field: value_field.clone(),
                })?;
                let value = finite(value_field, value)?;
                let ts_ms = timestamp(ts, *timestamp_unit, arrival_ms)?;
                emit(RawReading {
                    device,
                    metric,
                    ts_ms,
                    value,
                });
            }
            PayloadFormat::JsonObject {
                timestamp_field,
                timestamp_unit,
            } => {
                scratch.clear();
                let seed = ObjectSeed {
                    ts_field: timestamp_field.as_deref(),
                    out: scratch,
                };
                let mut de = serde_json::Deserializer::from_slice(payload);
                let ts = seed
                    .deserialize(&mut de)
                    .and_then(|r| de.end().map(|_| r))
                    .map_err(json_error)?;
                let ts_ms = timestamp(ts, *timestamp_unit, arrival_ms)?;
                if scratch.is_empty() {
                    return Err(IngestError::MissingField {
                        field: "<any numeric metric>".into(),
                    });
                }
                for (name, value) in scratch.iter() {
                    check_name("metric", name, MAX_METRIC_BYTES)?;
                    finite(name, *value)?;
                }
                for (name, value) in scratch.iter() {
                    emit(RawReading {
                        device,
                        metric: name,
                        ts_ms,
                        value: *value,
                    });
                }
            }
        }
        Ok(())
    }
}

fn check_name(what: &'static str, name: &str, max: usize) -> Result<(), IngestError> {
    if name.is_empty() || name.len() > max {
        return Err(IngestError::BadName {
            what,
            len: name.len(),
            max,
        });
    }
    Ok(())
}

/// A value that can enter a window summary: finite, and within ±[`edgewatch_models::stats::MAX_ABS_VALUE`] so its
/// statistics cannot overflow.
fn finite(field: &str, v: f64) -> Result<f64, IngestError> {
    if !v.is_finite() {
        Err(IngestError::NonFinite {
            field: field.to_string(),
        })
    } else if !edgewatch_models::stats::in_range(v) {
        Err(IngestError::ValueOutOfRange {
            field: field.to_string(),
            value: v,
        })
    } else {
        Ok(v)
    }
}

fn timestamp(ts: Option<f64>, unit: TimestampUnit, arrival_ms: i64) -> Result<i64, IngestError> {
    match ts {
        None => Ok(arrival_ms),
        Some(t) => {
            let ms = unit.to_ms(t);
            if ms.is_finite() && (0.0..MAX_TS_MS).contains(&ms) {
                Ok(ms as i64)
            } else {
                Err(IngestError::TimestampOutOfRange { value: t })
            }
        }
    }
}

fn preview(text: &str) -> String {
    let mut end = text.len().min(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn json_error(e: serde_json::Error) -> IngestError {
    IngestError::BadJson {
        detail: e.to_string(),
    }
}

/// Pulls `value_field` and `ts_field` out of a JSON object, skipping every other field.
struct ValueSeed<'a> {
    value_field: &'a str,
    ts_field: Option<&'a str>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = (Option<f64>, Option<f64>);
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = (Option<f64>, Option<f64>);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a JSON object with a numeric {:?} field",
            self.value_field
        )
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut value, mut ts) = (None, None);
        while let Some(key) = map.next_key::<KeyStr<'de>>()? {
            let key = key.as_str();
            if key == self.value_field {
                value = Some(map.next_value::<NumberField>()?.0);
            } else if Some(key) == self.ts_field {
                ts = Some(map.next_value::<NumberField>()?.0);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok((value, ts))
    }
}

/// Collects every numeric field of a JSON object (except the timestamp) into `out`.
struct ObjectSeed<'a> {
    ts_field: Option<&'a str>,
    out: &'a mut Vec<(String, f64)>,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Option<f64>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = Option<f64>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of numeric metrics")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut ts = None;
        while let Some(key) = map.next_key::<KeyStr<'de>>()? {
            if Some(key.as_str()) == self.ts_field {
                ts = Some(map.next_value::<NumberField>()?.0);
            } else {
                // Non-numeric fields (labels, units) are not metrics: skip them.
                if let Some(v) = map.next_value::<MaybeNumber>()?.0 {
                    self.out.push((key.as_str().to_string(), v));
                }
            }
        }
        Ok(ts)
    }
}

/// A JSON key, borrowed when it has no escapes.
enum KeyStr<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl KeyStr<'_> {
    fn as_str(&self) -> &str {
        match self {
            Self::Borrowed(s) => s,
            Self::Owned(s) => s,
        }
    }
}

impl<'de> de::Deserialize<'de> for KeyStr<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(KeyStr::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(KeyStr::Owned(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

/// A field that must be a JSON number.
struct NumberField(f64);

impl<'de> de::Deserialize<'de> for NumberField {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NumberField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<NumberField, E> {
                Ok(NumberField(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NumberField, E> {
                Ok(NumberField(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NumberField, E> {
                Ok(NumberField(v as f64))
            }
        }
        d.deserialize_f64(V)
    }
}

/// A field that may or may not be a number.
struct MaybeNumber(Option<f64>);

impl<'de> de::Deserialize<'de> for MaybeNumber {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeNumber;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(Some(v as f64)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(Some(v as f64)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<MaybeNumber, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeNumber(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<MaybeNumber, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeNumber(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(topic: &str, payload: PayloadFormat, metric: Option<&str>) -> Mapping {
        Mapping::new(&Subscription {
            topic: topic.into(),
            filter: None,
            metric: metric.map(str::to_string),
            payload,
        })
        .unwrap()
    }

    fn decode(
        m: &Mapping,
        topic: &str,
        payload: &[u8],
    ) -> Result<Vec<(String, String, i64, f64)>, IngestError> {
        let (device, metric) = m.claims(topic).expect("topic matches");
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        m.decode(device, metric, payload, 777, &mut scratch, &mut |r| {
            out.push((r.device.into(), r.metric.into(), r.ts_ms, r.value))
        })?;
        Ok(out)
    }

    #[test]
    fn pattern_matches_and_builds_filter() {
        let p = TopicPattern::parse("sensors/{device}/{metric}").unwrap();
        assert_eq!(p.filter(), "sensors/+/+");
        assert_eq!(p.matches("sensors/d1/temp"), Some(("d1", Some("temp"))));
        assert_eq!(p.matches("sensors/d1"), None);
        assert_eq!(p.matches("sensors/d1/temp/x"), None);
        assert_eq!(p.matches("other/d1/temp"), None);
    }

    /// The matcher before it worked on bytes: `split('/')` level by level.
    fn matches_by_split<'t>(
        p: &TopicPattern,
        topic: &'t str,
    ) -> Option<(&'t str, Option<&'t str>)> {
        let (mut device, mut metric) = (None, None);
        let mut parts = topic.split('/');
        for level in &p.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(l) if l == part => {}
                Level::Literal(_) => return None,
                Level::Device => device = Some(part),
                Level::Metric => metric = Some(part),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((device?, metric))
    }

    proptest::proptest! {
        #[test]
        fn matching_agrees_with_splitting_the_topic(
            pattern in proptest::sample::select(vec![
                "sensors/{device}/{metric}", "{device}", "a/{device}", "{device}/{metric}/v",
                "a//{device}", "a/{metric}/{device}/b",
            ]),
            topic in "[ab/é]{0,3}(sensors|a|b|v)?(/[abv]{0,2}){0,4}/?",
        ) {
            let p = TopicPattern::parse(pattern).unwrap();
            proptest::prop_assert_eq!(p.matches(&topic), matches_by_split(&p, &topic));
        }
    }

    #[test]
    fn bad_patterns_are_explained() {
        assert!(TopicPattern::parse("a/{metric}")
            .unwrap_err()
            .contains("{device}"));
        assert!(TopicPattern::parse("a/{device}/#")
            .unwrap_err()
            .contains("wildcards"));
        assert!(TopicPattern::parse("a/{dev}/x").is_err());
    }

    #[test]
    fn json_value_with_timestamp_and_extra_fields() {
        let m = mapping("s/{device}/{metric}", PayloadFormat::default(), None);
        let r = decode(
            &m,
            "s/d/t",
            br#"{"unit":"C","ts":1700000000000,"value":21.5,"tags":{"a":[1]}}"#,
        )
        .unwrap();
        assert_eq!(r, vec![("d".into(), "t".into(), 1_700_000_000_000, 21.5)]);
    }

    #[test]
    fn missing_timestamp_uses_arrival_time() {
        let m = mapping("s/{device}/{metric}", PayloadFormat::default(), None);
        assert_eq!(decode(&m, "s/d/t", br#"{"value":1}"#).unwrap()[0].2, 777);
    }

    #[test]
    fn seconds_timestamps_are_converted() {
        let m = mapping(
            "s/{device}/{metric}",
            PayloadFormat::Json {
                value_field: "v".into(),
                timestamp_field: Some("t".into()),
                timestamp_unit: TimestampUnit::S,
            },
            None,
        );
        assert_eq!(
            decode(&m, "s/d/x", br#"{"t":1700000000.5,"v":2}"#).unwrap()[0].2,
            1_700_000_000_500
        );
    }

    #[test]
    fn bare_number_with_fixed_metric() {
        let m = mapping("raw/{device}", PayloadFormat::Number, Some("temp"));
        assert_eq!(
            decode(&m, "raw/d", b" 3.25\n").unwrap(),
            vec![("d".into(), "temp".into(), 777, 3.25)]
        );
        for bad in [&b"NaN"[..], b"inf", b"-Infinity"] {
            assert!(
                matches!(decode(&m, "raw/d", bad), Err(IngestError::NonFinite { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            decode(&m, "raw/d", b"abc"),
            Err(IngestError::BadNumber { .. })
        ));
    }

    #[test]
    fn json_object_yields_one_reading_per_numeric_field() {
        let m = mapping(
            "plant/{device}",
            PayloadFormat::JsonObject {
                timestamp_field: Some("ts".into()),
                timestamp_unit: TimestampUnit::Ms,
            },
            None,
        );
        let r = decode(
            &m,
            "plant/p1",
            br#"{"ts":5,"temp":1.5,"label":"x","rpm":3000,"ok":true}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            vec![
                ("p1".into(), "temp".into(), 5, 1.5),
                ("p1".into(), "rpm".into(), 5, 3000.0)
            ]
        );
    }

    #[test]
    fn malformed_payloads_give_typed_errors() {
        let m = mapping("s/{device}/{metric}", PayloadFormat::default(), None);
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"{", "json"),
            (br#"{"value":"12"}"#, "json"),
            (br#"{"ts":1}"#, "missing"),
            (br#"{"value":1e999}"#, "json"),
            (br#"{"value":NaN}"#, "json"),
            (br#"{"value":1,"ts":-5}"#, "timestamp"),
            (br#"{"value":1} trailing"#, "json"),
            (b"\xff\xfe", "UTF-8"),
            (b"{\"value\":1,\"unit\":\"\xff\"}", "UTF-8"),
            (b"[1,2]", "json"),
        ];
        for (payload, want) in cases {
            let e = decode(&m, "s/d/t", payload).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(want), "{payload:?}: {text}");
        }
    }

    #[test]
    fn oversized_ids_are_rejected() {
        let m = mapping("s/{device}/{metric}", PayloadFormat::default(), None);
        let topic = format!("s/{}/t", "d".repeat(300));
        assert!(matches!(
            decode(&m, &topic, br#"{"value":1}"#),
            Err(IngestError::BadName { .. })
        ));
    }
}
