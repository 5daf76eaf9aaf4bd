//! Size and nesting limits on YAML configuration text, checked by a linear pre-scan before the text
//! reaches the YAML parser (issue 13).
//!
//! Why: libyaml (under `serde_norway`) is quadratic in unclosed flow nesting — a file of 100,000 `[`
//! took 12.8 s to be refused — and nothing in a configuration needs more than a handful of levels.
//! [`check`] refuses text larger than [`MAX_CONFIG_BYTES`] or nested deeper than
//! [`MAX_NESTING_DEPTH`], naming the line and column of the first too-deep opening.
//!
//! The scanner follows libyaml's tokenizer where nesting is decided, so that it never sees less
//! nesting than the parser would: flow collections (`[`, `{`) open only at a token boundary (inside a
//! plain scalar in block context, `a[b` is text); quoted scalars (`'it''s'`, `"a \" b"`) open only at
//! a token boundary too and may span lines; `#` starts a comment at a token boundary or after
//! whitespace; block scalars (`|`, `>`) are skipped by libyaml's indentation rule; block collections
//! count one level per indentation the tokenizer would open (a `-` entry, a `key:`, a `?`), plus one
//! for a sequence written at its parent key's indentation, and a `key: value` written directly in a
//! flow sequence counts as the one-pair mapping it is. Line breaks are libyaml's: LF, CR, CRLF,
//! NEL, LS and PS. Where this model and libyaml could part, it is on text libyaml refuses anyway, and
//! then the scan errs towards counting more.
//!
//! Deliberately not here: reading files (the caller reads, with its own size check before reading),
//! validating YAML (the parser does that), alias expansion (`serde_norway` bounds it itself).

use thiserror::Error;

/// Largest configuration file accepted: 1 MiB. The example configurations are under 4 KiB; a
/// fleet-wide agent file with a thousand subscriptions stays under 200 KiB.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

/// Deepest nesting accepted, counting flow `[`/`{` and block levels together. Real configurations
/// nest at most 6 levels (`source.subscriptions[0].payload.type`); `serde_norway` itself refuses
/// 128, so 64 leaves room for generated files while staying clear of the parser's own limit.
pub const MAX_NESTING_DEPTH: usize = 64;

/// The limits [`check`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YamlLimits {
    /// Largest text accepted, in bytes.
    pub max_bytes: usize,
    /// Deepest nesting accepted, in levels.
    pub max_depth: usize,
}

impl Default for YamlLimits {
    fn default() -> Self {
        Self {
            max_bytes: MAX_CONFIG_BYTES,
            max_depth: MAX_NESTING_DEPTH,
        }
    }
}

/// Why YAML text was refused before parsing. Retrying does not help: the file must change.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum YamlLimitError {
    /// The text is larger than [`YamlLimits::max_bytes`].
    #[error(
        "file of {size} bytes is larger than the limit of {max} bytes for a configuration file"
    )]
    TooLarge {
        /// Size of the text, in bytes.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The text nests deeper than [`YamlLimits::max_depth`].
    #[error(
        "nesting deeper than {max} levels (flow `[`/`{{` and block indentation) at line {line}, col {col}"
    )]
    TooDeep {
        /// 1-based line of the first opening past the limit.
        line: usize,
        /// 1-based column (in characters) of that opening.
        col: usize,
        /// The limit.
        max: usize,
    },
}

/// The deepest nesting found in some text, and where it is first reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Nesting {
    /// Levels: open block collections plus open flow collections.
    pub depth: usize,
    /// 1-based line of the opening that first reached `depth` (0 when `depth` is 0).
    pub line: usize,
    /// 1-based column, in characters, of that opening (0 when `depth` is 0).
    pub col: usize,
}

/// Refuses `text` if it is larger or nests deeper than `limits` allow. Linear in the length of the
/// text, and stops at the first opening past the depth limit.
pub fn check(text: &[u8], limits: YamlLimits) -> Result<(), YamlLimitError> {
    if text.len() > limits.max_bytes {
        return Err(YamlLimitError::TooLarge {
            size: text.len() as u64,
            max: limits.max_bytes as u64,
        });
    }
    scan(text, limits.max_depth)
        .map(|_| ())
        .map_err(|at| YamlLimitError::TooDeep {
            line: at.line,
            col: at.col,
            max: limits.max_depth,
        })
}

/// The deepest nesting of `text`, as [`check`] measures it (for tests and diagnostics).
pub fn deepest(text: &[u8]) -> Nesting {
    match scan(text, usize::MAX) {
        Ok(n) | Err(n) => n,
    }
}

/// Scans `text`; `Err` holds the first opening that goes past `limit`.
fn scan(text: &[u8], limit: usize) -> Result<Nesting, Nesting> {
    let text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
    let mut s = Scanner {
        limit,
        blocks: Vec::new(),
        flows: Vec::new(),
        mode: Mode::Boundary,
        key: None,
        deepest: Nesting::default(),
    };
    let mut start = 0;
    let mut line_no = 1;
    loop {
        let (end, next) = next_break(text, start);
        s.line(&text[start..end], line_no)?;
        match next {
            Some(n) => {
                start = n;
                line_no += 1;
            }
            None => return Ok(s.deepest),
        }
    }
}

/// The end of the line starting at `from`, and where the next line starts (`None` at the end).
fn next_break(text: &[u8], from: usize) -> (usize, Option<usize>) {
    let mut i = from;
    while i < text.len() {
        let len = match text[i] {
            b'\n' => 1,
            b'\r' if text.get(i + 1) == Some(&b'\n') => 2,
            b'\r' => 1,
            0xC2 if text.get(i + 1) == Some(&0x85) => 2,
            0xE2 if text.get(i + 1) == Some(&0x80)
                && matches!(text.get(i + 2), Some(0xA8 | 0xA9)) =>
            {
                3
            }
            _ => 0,
        };
        if len > 0 {
            return (i, Some(i + len));
        }
        i += 1;
    }
    (text.len(), None)
}

/// What opened a block level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// A mapping (a `key:` or `?`) whose keys start at this column.
    Map,
    /// A sequence whose `-` entries start at this column.
    Seq,
    /// A sequence whose `-` entries start at its parent key's column (`key:\n- a`).
    IndentlessSeq,
}

/// What opened a flow level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// `[`.
    Seq,
    /// `{`.
    Map,
    /// A `key: value` entry of a flow sequence (`[a: b]`): a one-pair mapping, one level deeper.
    Pair,
}

/// Where the scanner is, between lines as well as within one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between tokens.
    Boundary,
    /// Inside a plain (unquoted) scalar, which may continue on the next line.
    Plain,
    /// Inside a `'…'` scalar.
    Single,
    /// Inside a `"…"` scalar.
    Double,
    /// Inside the body of a `|` or `>` scalar.
    BlockScalar {
        /// Column of the enclosing block collection (-1 at the top).
        parent: isize,
        /// Column of the body's content, once known.
        indent: Option<usize>,
        /// Most spaces on the blank lines before the first content line.
        max_blank: usize,
    },
}

struct Scanner {
    limit: usize,
    /// Open block collections: (column, kind), columns increasing.
    blocks: Vec<(usize, Block)>,
    /// Open flow collections, innermost last.
    flows: Vec<Flow>,
    mode: Mode,
    /// (line, 0-based column) of the token that would be a mapping key if a `:` follows.
    key: Option<(usize, usize)>,
    deepest: Nesting,
}

fn is_blank(b: Option<u8>) -> bool {
    matches!(b, None | Some(b' ' | b'\t'))
}

fn is_flow_indicator(b: Option<u8>) -> bool {
    matches!(b, Some(b',' | b'[' | b']' | b'{' | b'}'))
}

/// `---` or `...` at column 0, followed by a blank or the end of the line.
fn is_document_marker(line: &[u8]) -> bool {
    (line.starts_with(b"---") || line.starts_with(b"...")) && is_blank(line.get(3).copied())
}

impl Scanner {
    fn top_col(&self) -> isize {
        self.blocks.last().map_or(-1, |&(c, _)| c as isize)
    }

    /// Counts one more open level at (line, 0-based col).
    fn opened(&mut self, line: usize, col: usize) -> Result<(), Nesting> {
        let depth = self.blocks.len() + self.flows.len();
        if depth > self.deepest.depth {
            self.deepest = Nesting {
                depth,
                line,
                col: col + 1,
            };
        }
        if depth > self.limit {
            return Err(self.deepest);
        }
        Ok(())
    }

    fn push_block(&mut self, line: usize, col: usize, kind: Block) -> Result<(), Nesting> {
        self.blocks.push((col, kind));
        self.opened(line, col)
    }

    /// A token that may be a mapping key starts at `col` (only the first one after an indicator).
    fn candidate(&mut self, line: usize, col: usize) {
        if self.flows.is_empty() && self.key.is_none() {
            self.key = Some((line, col));
        }
    }

    fn line(&mut self, line: &[u8], no: usize) -> Result<(), Nesting> {
        let spaces = line.iter().take_while(|&&b| b == b' ').count();
        // Leading spaces and tabs are ASCII: byte index and character column agree up to here.
        let first = line
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .unwrap_or(line.len());
        let blank = first == line.len();
        match self.mode {
            Mode::BlockScalar {
                parent,
                indent,
                max_blank,
            } => {
                let empty = spaces == line.len();
                match indent {
                    None if empty => {
                        self.mode = Mode::BlockScalar {
                            parent,
                            indent: None,
                            max_blank: max_blank.max(spaces),
                        };
                        return Ok(());
                    }
                    None => {
                        // libyaml: the body's indentation is that of its first non-empty line, at
                        // least one more than the parent's and no less than the blank lines before.
                        let min = usize::try_from(parent + 1).unwrap_or(0).max(1);
                        let m = max_blank.max(spaces).max(min);
                        if spaces >= m {
                            self.mode = Mode::BlockScalar {
                                parent,
                                indent: Some(m),
                                max_blank,
                            };
                            return Ok(());
                        }
                    }
                    Some(m) if spaces >= m || empty => return Ok(()),
                    Some(_) => {}
                }
                self.mode = Mode::Boundary;
            }
            Mode::Single | Mode::Double => return self.tokens(line, 0, 0, no),
            Mode::Plain => {
                if blank {
                    return Ok(());
                }
                if line[first] == b'#' {
                    self.mode = Mode::Boundary;
                    return Ok(());
                }
                // A plain scalar goes on over lines indented more than its block (any line in flow).
                if !is_document_marker(line)
                    && (!self.flows.is_empty() || spaces as isize > self.top_col())
                {
                    return self.tokens(line, first, first, no);
                }
                self.mode = Mode::Boundary;
            }
            Mode::Boundary => {}
        }
        if !self.flows.is_empty() {
            return self.tokens(line, 0, 0, no);
        }
        if blank || line[first] == b'#' {
            return Ok(());
        }
        if is_document_marker(line) {
            self.blocks.clear();
            self.key = None;
            return self.tokens(line, 3, 3, no);
        }
        if line[0] == b'%' {
            // A directive (`%YAML 1.2`) takes the whole line.
            return Ok(());
        }
        while self.blocks.last().is_some_and(|&(c, _)| c > spaces) {
            self.blocks.pop();
        }
        self.key = None;
        self.tokens(line, spaces, spaces, no)
    }

    /// Scans `line` from byte `i` (character column `col`) to its end.
    fn tokens(
        &mut self,
        line: &[u8],
        mut i: usize,
        mut col: usize,
        no: usize,
    ) -> Result<(), Nesting> {
        let at = |j: usize| line.get(j).copied();
        // Advances one byte; a column is counted at each byte that starts a UTF-8 character.
        let step = |i: &mut usize, col: &mut usize| {
            if let Some(b) = line.get(*i) {
                *col += usize::from(b & 0xC0 != 0x80);
                *i += 1;
            }
        };
        while i < line.len() {
            let b = line[i];
            match self.mode {
                Mode::Single => {
                    if b == b'\'' {
                        if at(i + 1) == Some(b'\'') {
                            step(&mut i, &mut col);
                        } else {
                            self.mode = Mode::Boundary;
                        }
                    }
                    step(&mut i, &mut col);
                }
                Mode::Double => {
                    if b == b'\\' {
                        step(&mut i, &mut col);
                    } else if b == b'"' {
                        self.mode = Mode::Boundary;
                    }
                    step(&mut i, &mut col);
                }
                Mode::Plain => {
                    if is_blank(Some(b)) && at(i + 1) == Some(b'#') {
                        self.mode = Mode::Boundary;
                        return Ok(());
                    }
                    let ends = if !self.flows.is_empty() {
                        is_flow_indicator(Some(b))
                            || (b == b':'
                                && (is_blank(at(i + 1))
                                    || is_flow_indicator(at(i + 1))
                                    || at(i + 1) == Some(b'?')))
                    } else {
                        b == b':' && is_blank(at(i + 1))
                    };
                    if ends {
                        // The indicator is scanned again as a token.
                        self.mode = Mode::Boundary;
                    } else {
                        step(&mut i, &mut col);
                    }
                }
                Mode::BlockScalar { .. } => return Ok(()),
                Mode::Boundary => match b {
                    b' ' | b'\t' => step(&mut i, &mut col),
                    b'#' => return Ok(()),
                    b'[' | b'{' => {
                        self.candidate(no, col);
                        self.flows
                            .push(if b == b'[' { Flow::Seq } else { Flow::Map });
                        self.opened(no, col)?;
                        step(&mut i, &mut col);
                    }
                    b']' | b'}' => {
                        // libyaml closes the innermost collection whichever bracket closes it.
                        if self.flows.last() == Some(&Flow::Pair) {
                            self.flows.pop();
                        }
                        self.flows.pop();
                        step(&mut i, &mut col);
                    }
                    b',' => {
                        if self.flows.last() == Some(&Flow::Pair) {
                            self.flows.pop();
                        }
                        step(&mut i, &mut col);
                    }
                    b'-' if is_blank(at(i + 1)) => {
                        if self.flows.is_empty() {
                            self.block_entry(no, col)?;
                        }
                        step(&mut i, &mut col);
                    }
                    b'?' | b':' if !self.flows.is_empty() => {
                        // A key or value indicator directly in a flow sequence opens a pair.
                        if self.flows.last() == Some(&Flow::Seq) {
                            self.flows.push(Flow::Pair);
                            self.opened(no, col)?;
                        }
                        step(&mut i, &mut col);
                    }
                    b'?' if is_blank(at(i + 1)) => {
                        self.explicit_key(no, col)?;
                        step(&mut i, &mut col);
                    }
                    b':' if is_blank(at(i + 1)) => {
                        self.value()?;
                        step(&mut i, &mut col);
                    }
                    b'|' | b'>' if self.flows.is_empty() => {
                        self.block_scalar(line, i + 1);
                        return Ok(());
                    }
                    b'\'' | b'"' => {
                        self.candidate(no, col);
                        self.mode = if b == b'"' {
                            Mode::Double
                        } else {
                            Mode::Single
                        };
                        step(&mut i, &mut col);
                    }
                    b'&' | b'*' => {
                        // Anchor or alias: name characters as libyaml reads them.
                        self.candidate(no, col);
                        step(&mut i, &mut col);
                        while at(i)
                            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                        {
                            step(&mut i, &mut col);
                        }
                    }
                    b'!' => {
                        self.candidate(no, col);
                        step(&mut i, &mut col);
                        if at(i) == Some(b'<') {
                            // Verbatim tag `!<…>`: may hold brackets.
                            while at(i).is_some_and(|c| c != b'>') {
                                step(&mut i, &mut col);
                            }
                            step(&mut i, &mut col);
                        } else {
                            while !is_blank(at(i)) && !is_flow_indicator(at(i)) {
                                step(&mut i, &mut col);
                            }
                        }
                    }
                    _ => {
                        self.candidate(no, col);
                        self.mode = Mode::Plain;
                        step(&mut i, &mut col);
                    }
                },
            }
        }
        Ok(())
    }

    /// A `-` entry at `col`, block context.
    fn block_entry(&mut self, no: usize, col: usize) -> Result<(), Nesting> {
        self.key = None;
        match self.blocks.last() {
            Some(&(c, Block::Map)) if c == col => self.push_block(no, col, Block::IndentlessSeq),
            Some(&(c, _)) if c >= col => Ok(()),
            _ => self.push_block(no, col, Block::Seq),
        }
    }

    /// A `?` explicit key at `col`, block context.
    fn explicit_key(&mut self, no: usize, col: usize) -> Result<(), Nesting> {
        self.key = None;
        self.mapping_at(no, col)
    }

    /// A `:` value indicator, block context: the pending key opens (or continues) a mapping.
    fn value(&mut self) -> Result<(), Nesting> {
        match self.key.take() {
            Some((no, col)) => self.mapping_at(no, col),
            None => Ok(()),
        }
    }

    fn mapping_at(&mut self, no: usize, col: usize) -> Result<(), Nesting> {
        if self.blocks.last() == Some(&(col, Block::IndentlessSeq)) {
            // A key at the parent's column ends the sequence written at that column.
            self.blocks.pop();
        }
        if self.top_col() < col as isize {
            self.push_block(no, col, Block::Map)?;
        }
        Ok(())
    }

    /// A `|` or `>` header whose indicators start at byte `i`; the body starts on the next line.
    fn block_scalar(&mut self, line: &[u8], mut i: usize) {
        let mut increment = None;
        while let Some(&b) = line.get(i) {
            match b {
                b'1'..=b'9' => increment = Some(usize::from(b - b'0')),
                b'+' | b'-' | b'0' => {}
                _ => break,
            }
            i += 1;
        }
        let parent = self.top_col();
        // libyaml: an explicit indentation is relative to the enclosing block's column.
        let indent = increment.map(|d| usize::try_from(parent).map_or(d, |p| p + d));
        self.key = None;
        self.mode = Mode::BlockScalar {
            parent,
            indent,
            max_blank: 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn depth(text: &str) -> usize {
        deepest(text.as_bytes()).depth
    }

    const AGENT_LIKE: &str = "\
# comment with [ and {
id: gw-1   # trailing [ comment
source:
  mqtt:
    host: 127.0.0.1
  subscriptions:
    - topic: \"sensors/{device}/{metric}\"
      payload: { type: json, value_field: value, timestamp_field: ts }
    - topic: plant/{device}
      payload: { type: number }
uplink:
  prefix: edgewatch/v1
";

    #[test]
    fn a_real_config_measures_its_real_depth() {
        // root map, source, subscriptions, item map, payload flow map.
        let n = deepest(AGENT_LIKE.as_bytes());
        assert_eq!(n.depth, 5, "{n:?}");
        assert_eq!((n.line, n.col), (8, 16));
        assert!(check(AGENT_LIKE.as_bytes(), YamlLimits::default()).is_ok());
    }

    #[test]
    fn brackets_inside_scalars_and_comments_do_not_count() {
        assert_eq!(depth("a: x[[[y\n"), 1);
        assert_eq!(depth("a: '[[[ it''s ]'\n"), 1);
        assert_eq!(depth("a: \"[[[ \\\" [[\"\n"), 1);
        assert_eq!(depth("a: b #[[[[\n"), 1);
        assert_eq!(depth("a: don't [[[\n"), 1);
        assert_eq!(depth("a: [x'y, z\"]\n"), 2);
        assert_eq!(depth("a: [b: [c: d], e]\n"), 5);
        assert_eq!(depth("a: {b: [c, d]}\n"), 3);
        assert_eq!(depth("a: [b:c, \"d\":e]\n"), 3);
        assert_eq!(depth("a: |\n  [[[[\n  '\nb: [c]\n"), 2);
        assert_eq!(
            depth("a: >-\n\n    {{{{\n    # not a comment {\n  # a comment {\nb: 1\n"),
            1
        );
        assert_eq!(depth("a: !!str [\n"), 2);
        assert_eq!(depth("a: !<x[[[> b\n"), 1);
    }

    #[test]
    fn block_levels_count_keys_entries_and_indentless_sequences() {
        assert_eq!(depth("a:\n  b:\n    c: 1\n"), 3);
        assert_eq!(depth("- - - a\n"), 3);
        assert_eq!(depth("a:\n- b:\n  - c\n"), 4);
        assert_eq!(depth("a:\n- 1\nb:\n- 2\n"), 2);
        assert_eq!(depth("? [a]\n: b\n"), 2);
        assert_eq!(depth("--- \na:\n  b: 1\n...\nc: 1\n"), 2);
    }

    #[test]
    fn a_quote_inside_a_plain_scalar_does_not_hide_later_nesting() {
        // libyaml reads `abc ['` as one plain scalar over two lines, then a flow key on line 3.
        let text = format!("key: abc\n  ['\n{}\n", "[".repeat(100));
        assert!(depth(&text) > MAX_NESTING_DEPTH);
    }

    #[test]
    fn every_libyaml_line_break_ends_a_line() {
        for br in ["\n", "\r", "\r\n", "\u{85}", "\u{2028}", "\u{2029}"] {
            let text = format!("a: '{br}'{br}{}", "[".repeat(70));
            let e = check(text.as_bytes(), YamlLimits::default()).unwrap_err();
            assert!(
                matches!(
                    e,
                    YamlLimitError::TooDeep {
                        line: 3,
                        col: 64,
                        ..
                    }
                ),
                "{br:?}: {e}"
            );
        }
    }

    #[test]
    fn too_deep_names_the_first_opening_past_the_limit() {
        let text = format!("a: 1\nb: {}\n", "[".repeat(100_000));
        let e = check(text.as_bytes(), YamlLimits::default()).unwrap_err();
        assert_eq!(
            e,
            YamlLimitError::TooDeep {
                line: 2,
                col: 67,
                max: 64
            }
        );
        assert!(e.to_string().contains("line 2, col 67"), "{e}");
        // Columns count characters, not bytes.
        let text = format!("é: {}", "{".repeat(64));
        assert!(matches!(
            check(text.as_bytes(), YamlLimits::default()),
            Err(YamlLimitError::TooDeep {
                line: 1,
                col: 67,
                ..
            })
        ));
    }

    #[test]
    fn block_nesting_counts_towards_the_limit() {
        let mut text = String::new();
        for level in 0..70 {
            text.push_str(&format!("{}k{level}:\n", "  ".repeat(level)));
        }
        let e = check(text.as_bytes(), YamlLimits::default()).unwrap_err();
        assert!(
            matches!(
                e,
                YamlLimitError::TooDeep {
                    line: 65,
                    col: 129,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn too_large_text_is_refused_with_its_size() {
        let limits = YamlLimits {
            max_bytes: 10,
            ..YamlLimits::default()
        };
        assert_eq!(
            check(b"a: 123456789", limits),
            Err(YamlLimitError::TooLarge { size: 12, max: 10 })
        );
        assert!(check(b"a: 1234567", limits).is_ok());
    }

    /// A YAML value tree, written out in mixed styles.
    #[derive(Debug, Clone)]
    enum Node {
        Scalar(u8),
        Map(Vec<Node>, bool),
        Seq(Vec<Node>, bool),
    }

    impl Node {
        fn depth(&self) -> usize {
            match self {
                Node::Scalar(_) => 0,
                Node::Map(c, _) | Node::Seq(c, _) => {
                    1 + c.iter().map(Node::depth).max().unwrap_or(0)
                }
            }
        }
        fn is_block(&self) -> bool {
            matches!(self, Node::Map(c, false) | Node::Seq(c, false) if !c.is_empty())
        }
    }

    /// Scalars that look like nesting, comments or quotes to a careless scanner.
    fn scalar(k: u8, flow: bool) -> &'static str {
        const BLOCK: [&str; 6] = [
            "x[y{",
            "'it''s [ {'",
            "\"a \\\" [ # {\"",
            "a#b",
            "don't",
            "7",
        ];
        const FLOW: [&str; 5] = ["'it''s [ {'", "\"a \\\" [ # {\"", "a#b", "don't", "7"];
        if flow {
            FLOW[k as usize % FLOW.len()]
        } else {
            BLOCK[k as usize % BLOCK.len()]
        }
    }

    fn flow(node: &Node, out: &mut String) {
        match node {
            Node::Scalar(k) => out.push_str(scalar(*k, true)),
            Node::Map(c, _) => {
                out.push('{');
                for (i, v) in c.iter().enumerate() {
                    out.push_str(if i == 0 { "k0: " } else { ", k: " });
                    flow(v, out);
                }
                out.push('}');
            }
            Node::Seq(c, _) => {
                out.push('[');
                for (i, v) in c.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    flow(v, out);
                }
                out.push(']');
            }
        }
    }

    /// Writes `node` as the value after `key: ` or `- ` at indentation `indent`.
    fn value(node: &Node, indent: usize, out: &mut String) {
        if node.is_block() {
            out.push_str("   # [ comment\n");
            block(node, indent + 2, out);
        } else if let Node::Scalar(k) = node {
            if k % 7 == 0 {
                out.push_str("|\n");
                out.push_str(&" ".repeat(indent + 2));
                out.push_str("body [[[ { ' \" #\n");
            } else {
                out.push_str(scalar(*k, false));
                out.push('\n');
            }
        } else {
            flow(node, out);
            out.push('\n');
        }
    }

    fn block(node: &Node, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match node {
            Node::Map(c, _) => {
                for (i, v) in c.iter().enumerate() {
                    out.push_str(&format!("{pad}k{i}: "));
                    value(v, indent, out);
                }
            }
            Node::Seq(c, _) => {
                for v in c {
                    out.push_str(&format!("{pad}- "));
                    value(v, indent, out);
                }
            }
            Node::Scalar(_) => value(node, indent, out),
        }
    }

    fn tree(max_depth: u32) -> impl Strategy<Value = Node> {
        any::<u8>()
            .prop_map(Node::Scalar)
            .prop_recursive(max_depth, 256, 3, |inner| {
                prop_oneof![
                    (prop::collection::vec(inner.clone(), 0..3), any::<bool>())
                        .prop_map(|(c, f)| Node::Map(c, f)),
                    (prop::collection::vec(inner, 0..3), any::<bool>())
                        .prop_map(|(c, f)| Node::Seq(c, f)),
                ]
            })
    }

    /// A chain `levels` deep whose styles follow `flows`, with a scalar at the bottom.
    fn chain(levels: usize, flows: &[bool]) -> Node {
        (0..levels).fold(Node::Scalar(1), |inner, i| {
            let f =
                flows[i % flows.len()] || matches!(inner, Node::Map(_, true) | Node::Seq(_, true));
            if i % 2 == 0 {
                Node::Map(vec![Node::Scalar(3), inner], f)
            } else {
                Node::Seq(vec![inner, Node::Scalar(2)], f)
            }
        })
    }

    proptest! {
        #[test]
        fn the_scanner_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let n = deepest(&bytes);
            prop_assert!(n.depth <= bytes.len());
            let _ = check(&bytes, YamlLimits::default());
        }

        #[test]
        fn the_scanner_never_panics_on_yaml_like_text(
            parts in prop::collection::vec(prop::sample::select(vec![
                "[", "]", "{", "}", ",", ": ", ":", "- ", "? ", "'", "''", "\"", "\\", "#", " #",
                "|", ">-", "|2", "\n", "\r", "\r\n", "\u{85}", "\u{2028}", " ", "  ", "\t", "a",
                "key", "&a ", "*a", "!t ", "!<x[>", "---", "...", "%YAML 1.2", "é",
            ]), 0..200)
        ) {
            let text = parts.concat();
            let _ = deepest(text.as_bytes());
            let _ = check(text.as_bytes(), YamlLimits::default());
        }

        #[test]
        fn a_valid_nested_config_below_the_limit_is_accepted_at_its_depth(node in tree(12)) {
            let mut text = String::from("# generated\n");
            block(&Node::Map(vec![node.clone()], false), 0, &mut text);
            let want = 1 + node.depth();
            prop_assert_eq!(depth(&text), want, "{}", text);
            prop_assert!(check(text.as_bytes(), YamlLimits::default()).is_ok());
        }

        #[test]
        fn nesting_at_the_limit_passes_and_one_more_level_fails(
            flows in prop::collection::vec(any::<bool>(), 1..8)
        ) {
            let mut ok = String::new();
            block(&Node::Map(vec![chain(MAX_NESTING_DEPTH - 1, &flows)], false), 0, &mut ok);
            prop_assert_eq!(depth(&ok), MAX_NESTING_DEPTH, "{}", ok);
            prop_assert!(check(ok.as_bytes(), YamlLimits::default()).is_ok());
            let mut deep = String::new();
            block(&Node::Map(vec![chain(MAX_NESTING_DEPTH, &flows)], false), 0, &mut deep);
            let refused = matches!(
                check(deep.as_bytes(), YamlLimits::default()),
                Err(YamlLimitError::TooDeep { .. })
            );
            prop_assert!(refused, "{}", deep);
        }
    }
}
