//! Reading the child processes' log files for error messages and warnings: the last lines of a
//! log, and each aggregator's WARN and ERROR lines without colour codes.

use super::process::AggProc;
use std::path::Path;

/// The last `n` lines of a log file.
pub(super) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Every aggregator's count of WARN and ERROR log lines and its first `n` of them (colour codes
/// removed), one aggregator per paragraph.
pub(super) fn log_warnings(aggs: &[AggProc], n: usize) -> String {
    let mut out = Vec::new();
    for a in aggs {
        let text = std::fs::read_to_string(&a.log).unwrap_or_default();
        let warnings: Vec<String> = text
            .lines()
            .map(strip_ansi)
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        if warnings.is_empty() {
            continue;
        }
        out.push(format!(
            "  {}: {} warnings, the first {}:\n    {}",
            a.id,
            warnings.len(),
            n.min(warnings.len()),
            warnings[..n.min(warnings.len())].join("\n    ")
        ));
    }
    out.join("\n")
}

/// `line` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m lost"),
            "2026  WARN lost"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }
}
