//! The topic template (`sensors/{device}/{metric}`): parsing, validation and rendering.
//!
//! Only the two placeholders exist; anything else in braces is an error, so a typo never becomes
//! a literal topic level. It does not check device or metric names (the config does).

use std::fmt::Write as _;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Device,
    Metric,
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TopicTemplate {
    parts: Vec<Part>,
}

impl TopicTemplate {
    /// Parses `template`; errors name the offending placeholder or character.
    pub(crate) fn parse(template: &str) -> Result<Self, String> {
        if template.is_empty() {
            return Err("must not be empty".to_string());
        }
        if let Some(c) = template.chars().find(|&c| matches!(c, '+' | '#')) {
            return Err(format!(
                "must not contain the wildcard {c:?}, got {template:?}"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        let (mut device, mut metric) = (false, false);
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!("unmatched '}}' in {template:?}"));
            }
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?;
            match &after[..close] {
                "device" => {
                    device = true;
                    parts.push(Part::Device);
                }
                "metric" => {
                    metric = true;
                    parts.push(Part::Metric);
                }
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}} in {template:?} (known: {{device}}, {{metric}})"
                    ))
                }
            }
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if !(device && metric) {
            return Err(format!(
                "must contain both {{device}} and {{metric}} so every series has its own topic, got {template:?}"
            ));
        }
        Ok(Self { parts })
    }

    /// The topic of one series.
    pub(crate) fn render(&self, device: &str, metric: &str) -> String {
        let mut s = String::with_capacity(32 + device.len() + metric.len());
        for p in &self.parts {
            // Writing into a String cannot fail.
            let _ = match p {
                Part::Literal(l) => s.write_str(l),
                Part::Device => s.write_str(device),
                Part::Metric => s.write_str(metric),
            };
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_placeholders() {
        let t = TopicTemplate::parse("sensors/{device}/{metric}").unwrap();
        assert_eq!(
            t.render("dev-0001", "temperature"),
            "sensors/dev-0001/temperature"
        );
        let t = TopicTemplate::parse("{metric}-{device}/raw").unwrap();
        assert_eq!(t.render("d", "m"), "m-d/raw");
    }

    #[test]
    fn rejects_unknown_placeholders_wildcards_and_missing_ones() {
        for (bad, needle) in [
            ("sensors/{dev}/{metric}", "{dev}"),
            ("sensors/{device}/{metric", "unclosed"),
            ("sensors/device}/{metric}", "unmatched"),
            ("sensors/+/{device}/{metric}", "'+'"),
            ("sensors/{device}", "both"),
            ("", "empty"),
        ] {
            let e = TopicTemplate::parse(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
