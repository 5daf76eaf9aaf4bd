//! Loading YAML configuration files into each component's typed config, with errors that name the
//! file, the key path and the line and column: `configs/agent.yaml: window.size_ms (line 12, col 12): ...`.
//!
//! Two steps, as everywhere in edgewatch: serde (unknown fields rejected) gives syntax and type errors
//! with their position; then the component's `problems()` reports every invalid value, each located
//! in the file by its key path.
//!
//! YAML crate: `serde_norway`, the maintained fork of the deprecated `serde_yaml` (same API, libyaml
//! parser, security fixes, error locations), so serde-derived configs and `serde_path_to_error` work as is.
//!
//! Every YAML text goes through [`parse`], which first applies `edgewatch_models::yaml_limits`: a
//! file over 1 MiB, or nested deeper than 64 levels, is refused before libyaml sees it (libyaml is
//! quadratic in unclosed `[`). [`load`] also checks the size before reading.

use edgewatch_models::yaml_limits::{self, YamlLimitError, YamlLimits};
use serde::de::DeserializeOwned;
use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// One problem in one configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigProblem {
    /// Key path such as `window.size_ms` or `source.subscriptions[0].topic` (empty for syntax errors).
    pub key: String,
    /// 1-based line and column, when known.
    pub location: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Its problems (at least one).
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            // `file: key (line, col): message`; without a key, `file (line, col): message`.
            write!(f, "{}", self.file.display())?;
            if !p.key.is_empty() {
                write!(f, ": {}", p.key)?;
            }
            if let Some((line, col)) = p.location {
                write!(f, " (line {line}, col {col})")?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A configuration type that can list its own invalid values as `key.path: message`.
pub trait Validate {
    /// Every invalid value; empty when valid.
    fn problems(&self) -> Vec<String>;
}

impl Validate for edgewatch_agent::AgentConfig {
    fn problems(&self) -> Vec<String> {
        edgewatch_agent::AgentConfig::problems(self)
    }
}

#[cfg(feature = "cloud")]
impl Validate for edgewatch_aggregator::AggregatorConfig {
    fn problems(&self) -> Vec<String> {
        edgewatch_aggregator::AggregatorConfig::problems(self)
    }
}

#[cfg(feature = "cloud")]
impl Validate for edgewatch_simulators::SimulatorConfig {
    fn problems(&self) -> Vec<String> {
        edgewatch_simulators::SimulatorConfig::problems(self)
    }
}

impl ConfigError {
    /// One problem with no key path.
    fn whole_file(file: &Path, location: Option<(usize, usize)>, message: String) -> Self {
        Self {
            file: file.to_path_buf(),
            problems: vec![ConfigProblem {
                key: String::new(),
                location,
                message,
            }],
        }
    }
}

/// Reads and validates `path` as a `T`.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = read(path, YamlLimits::default().max_bytes)?;
    parse(&text, path)
}

/// Reads `path` as UTF-8 text of at most `max` bytes, refusing a larger file before reading it (and
/// a stream, or a file growing meanwhile, once it passes `max`).
fn read(path: &Path, max: usize) -> Result<String, ConfigError> {
    let cannot = |e: &dyn fmt::Display| {
        ConfigError::whole_file(path, None, format!("cannot read the file: {e}"))
    };
    let file = std::fs::File::open(path).map_err(|e| cannot(&e))?;
    let size = file.metadata().map_or(0, |m| m.len());
    let too_large = |size| {
        let e = YamlLimitError::TooLarge {
            size,
            max: max as u64,
        };
        ConfigError::whole_file(path, None, e.to_string())
    };
    if size > max as u64 {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(&e))?;
    if bytes.len() > max {
        let message = format!("file is more than {max} bytes, the limit for a configuration file");
        return Err(ConfigError::whole_file(path, None, message));
    }
    String::from_utf8(bytes).map_err(|e| cannot(&format_args!("not UTF-8 text ({e})")))
}

/// Parses and validates YAML `text` (from `file`, used in messages) as a `T`. Text over the size or
/// nesting limits of `edgewatch_models::yaml_limits` is refused before parsing.
pub fn parse<T: DeserializeOwned + Validate>(text: &str, file: &Path) -> Result<T, ConfigError> {
    yaml_limits::check(text.as_bytes(), YamlLimits::default()).map_err(|e| match e {
        YamlLimitError::TooDeep { line, col, max } => ConfigError::whole_file(
            file,
            Some((line, col)),
            format!("nested deeper than {max} levels (flow `[`/`{{` and block indentation): refused before parsing"),
        ),
        YamlLimitError::TooLarge { .. } => ConfigError::whole_file(file, None, e.to_string()),
    })?;
    let de = serde_norway::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = clean_key(e.path().to_string());
        let inner = e.into_inner();
        let location = inner.location().map(|l| (l.line(), l.column()));
        let message = clean_message(inner.to_string(), &key);
        ConfigError {
            file: file.to_path_buf(),
            problems: vec![ConfigProblem {
                key,
                location,
                message,
            }],
        }
    })?;
    let problems = value.problems();
    if problems.is_empty() {
        return Ok(value);
    }
    Err(ConfigError {
        file: file.to_path_buf(),
        problems: problems
            .into_iter()
            .map(|p| {
                let (key, message) = match p.split_once(": ") {
                    Some((k, m)) if !k.contains(' ') => (k.to_string(), m.to_string()),
                    _ => (String::new(), p),
                };
                ConfigProblem {
                    location: locate(text, &key),
                    key,
                    message,
                }
            })
            .collect(),
    })
}

/// Parses `base` (the text of `file`) with `overlay` (a YAML mapping, e.g. a configuration pushed to
/// an agent, named `overlay_name` in messages) laid over it: mappings merge key by key, any other
/// value (lists included) replaces the file's. The result is validated like [`parse`]; a problem
/// with a key the overlay sets is located in the overlay, any other in the file.
pub fn parse_overlay<T: DeserializeOwned + Validate>(
    base: &str,
    file: &Path,
    overlay: &str,
    overlay_name: &Path,
) -> Result<T, ConfigError> {
    let over: serde_norway::Value = parse_value(overlay, overlay_name)?;
    if !(over.is_mapping() || over.is_null()) {
        return Err(ConfigError::whole_file(
            overlay_name,
            None,
            "must be a mapping of configuration keys (the file's keys it replaces)".into(),
        ));
    }
    let mut merged: serde_norway::Value = parse_value(base, file)?;
    merge(&mut merged, over.clone());
    // Where a key path is: in the overlay if it sets it, else in the file.
    let place = |key: &str| -> (PathBuf, Option<(usize, usize)>) {
        if !key.is_empty() && lookup(&over, key) {
            (overlay_name.to_path_buf(), locate(overlay, key))
        } else {
            (file.to_path_buf(), locate(base, key))
        }
    };
    let value: T = serde_path_to_error::deserialize(merged).map_err(|e| {
        let key = clean_key(e.path().to_string());
        let (at, location) = place(&key);
        ConfigError {
            file: at,
            problems: vec![ConfigProblem {
                message: clean_message(e.into_inner().to_string(), &key),
                key,
                location,
            }],
        }
    })?;
    let problems = value.problems();
    if problems.is_empty() {
        return Ok(value);
    }
    let problems: Vec<(PathBuf, ConfigProblem)> = problems
        .into_iter()
        .map(|p| {
            let (key, message) = split_problem(p);
            let (at, location) = place(&key);
            (
                at,
                ConfigProblem {
                    key,
                    location,
                    message,
                },
            )
        })
        .collect();
    // One error names one file: the overlay's problems first (they are what changed).
    let first = problems
        .iter()
        .find(|(at, _)| at == overlay_name)
        .map_or_else(|| file.to_path_buf(), |(at, _)| at.clone());
    Err(ConfigError {
        file: first.clone(),
        problems: problems
            .into_iter()
            .map(|(at, mut p)| {
                if at != first {
                    p.key = format!("{} {}", at.display(), p.key);
                }
                p
            })
            .collect(),
    })
}

/// The key path of a serde error; empty for the whole document (`.`) and for syntax errors, whose
/// path is unknown (`?`), so messages never read `file.yaml: ?:` or `file.yaml: .:`.
fn clean_key(key: String) -> String {
    if key == "." || key == "?" {
        String::new()
    } else {
        key
    }
}

/// A serde message without what the location already says: libyaml's ` at line L column C` and the
/// key path some messages start with (`window.size_ms: invalid type ...` after `window.size_ms`).
fn clean_message(mut message: String, key: &str) -> String {
    if let Some(at) = message.find(" at line ") {
        message.truncate(at);
    }
    if !key.is_empty() {
        if let Some(rest) = message.strip_prefix(&format!("{key}: ")) {
            return rest.to_string();
        }
    }
    message
}

/// Syntax (and size, nesting) checks of one YAML text, as a value.
fn parse_value(text: &str, file: &Path) -> Result<serde_norway::Value, ConfigError> {
    yaml_limits::check(text.as_bytes(), YamlLimits::default())
        .map_err(|e| ConfigError::whole_file(file, None, e.to_string()))?;
    serde_norway::from_str(text).map_err(|e| {
        let location = e.location().map(|l| (l.line(), l.column()));
        let mut message = e.to_string();
        if let Some(at) = message.find(" at line ") {
            message.truncate(at);
        }
        ConfigError::whole_file(file, location, message)
    })
}

/// Lays `over` on `base`: mappings key by key, anything else replaced.
fn merge(base: &mut serde_norway::Value, over: serde_norway::Value) {
    use serde_norway::Value;
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        // An empty overlay changes nothing.
        (_, Value::Null) => {}
        (b, o) => *b = o,
    }
}

/// Whether `value` has `key_path` (`a.b[2].c`).
fn lookup(value: &serde_norway::Value, key_path: &str) -> bool {
    let mut v = value;
    for seg in segments(key_path) {
        let next = match seg {
            Seg::Key(k) => v.get(k),
            Seg::Index(i) => v.get(i),
        };
        match next {
            Some(n) => v = n,
            None => return false,
        }
    }
    true
}

/// `key.path: message` as the two parts (no key when the first part has a space).
fn split_problem(p: String) -> (String, String) {
    match p.split_once(": ") {
        Some((k, m)) if !k.contains(' ') => (k.to_string(), m.to_string()),
        _ => (String::new(), p),
    }
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            out.push(Seg::Key(key));
        }
        while let Some((idx, r)) = rest.split_once(']') {
            if let Ok(i) = idx.parse() {
                out.push(Seg::Index(i));
            }
            rest = r.strip_prefix('[').unwrap_or(r);
        }
    }
    out
}

/// Best-effort position of `key_path` in block-style YAML `text` (1-based line and column of the key,
/// or of the closest parent found). Flow style (`{a: 1}`) falls back to the parent's position.
pub fn locate(text: &str, key_path: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0usize;
    let mut parent_indent: isize = -1;
    let mut found = None;
    for seg in segments(key_path) {
        let mut hit = None;
        let mut seen_items = 0usize;
        let mut item_indent = None;
        for (i, raw) in lines.iter().enumerate().skip(start) {
            let content = raw.trim_start();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let mut indent = (raw.len() - content.len()) as isize;
            if i > start && indent <= parent_indent {
                break;
            }
            match seg {
                Seg::Key(k) => {
                    let mut c = content;
                    while let Some(rest) = c.strip_prefix("- ") {
                        indent += 2 + (rest.len() - rest.trim_start().len()) as isize;
                        c = rest.trim_start();
                    }
                    let key_here = c.strip_prefix(k).is_some_and(|r| r.starts_with(':'))
                        || c.strip_prefix(&format!("\"{k}\""))
                            .is_some_and(|r| r.starts_with(':'));
                    if key_here && (i == start || indent > parent_indent) {
                        hit = Some((i, indent));
                        break;
                    }
                }
                Seg::Index(n) => {
                    let is_item = content.starts_with("- ") || content == "-";
                    if is_item && *item_indent.get_or_insert(indent) == indent {
                        if seen_items == n {
                            hit = Some((i, indent));
                            break;
                        }
                        seen_items += 1;
                    }
                }
            }
        }
        match hit {
            Some((line, indent)) => {
                found = Some((line + 1, indent as usize + 1));
                start = line;
                parent_indent = indent;
            }
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
id: gw-1
source:
  mqtt:
    host: localhost
  subscriptions:
    - topic: a/{device}
      payload: { type: number }
    - topic: b/{device}/{metric}
window:
  size_ms: 0
";

    #[test]
    fn an_overlay_merges_over_the_file_and_its_problems_are_located_in_it() {
        let base = "id: gw-1\nwindow:\n  size_ms: 1000\nanomaly:\n  rearm_ratio: 0.5\n";
        let cfg: edgewatch_agent::AgentConfig = parse_overlay(
            base,
            Path::new("a.yaml"),
            "anomaly:\n  threshold: 0.8\n",
            Path::new("remote config"),
        )
        .unwrap();
        assert_eq!(cfg.anomaly.threshold, Some(0.8));
        assert_eq!(cfg.anomaly.rearm_ratio, 0.5, "kept from the file");
        assert_eq!(cfg.window.size_ms, 1000);
        let e = parse_overlay::<edgewatch_agent::AgentConfig>(
            base,
            Path::new("a.yaml"),
            "# pushed\nanomaly:\n  threshold: 7\n",
            Path::new("remote config"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "remote config: anomaly.threshold (line 3, col 3): must be in (0, 1], got 7"
        );
        let e = parse_overlay::<edgewatch_agent::AgentConfig>(
            base,
            Path::new("a.yaml"),
            "anomaly:\n  treshold: 0.5\n",
            Path::new("remote config"),
        )
        .unwrap_err();
        assert_eq!(e.file, Path::new("remote config"));
        assert_eq!(e.problems[0].location, Some((2, 3)));
        assert!(e.problems[0].message.contains("unknown field `treshold`"));
    }

    #[test]
    fn an_overlay_with_bad_syntax_or_not_a_mapping_is_refused_with_its_line() {
        let e = parse_overlay::<edgewatch_agent::AgentConfig>(
            "id: gw\n",
            Path::new("a.yaml"),
            "anomaly:\n  threshold: [\n",
            Path::new("remote config"),
        )
        .unwrap_err();
        assert_eq!(e.file, Path::new("remote config"));
        assert!(e.problems[0].location.is_some(), "{e}");
        let e = parse_overlay::<edgewatch_agent::AgentConfig>(
            "id: gw\n",
            Path::new("a.yaml"),
            "- 1\n",
            Path::new("remote config"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("must be a mapping"), "{e}");
        // An empty overlay is the file.
        let cfg: edgewatch_agent::AgentConfig =
            parse_overlay("id: gw\n", Path::new("a.yaml"), "", Path::new("r")).unwrap();
        assert_eq!(cfg.id, "gw");
    }

    #[test]
    fn messages_repeat_neither_the_key_nor_an_unknown_path() {
        let e = parse::<edgewatch_agent::AgentConfig>(
            "id: gw\nwindow: { size_ms: x }\n",
            Path::new("a.yaml"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.yaml: window.size_ms (line 2, col 20): invalid type: string \"x\", expected i64"
        );
        let e = parse::<edgewatch_agent::AgentConfig>(":\n", Path::new("a.yaml")).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("a.yaml (line 1, col 1): "), "{text}");
        assert!(!text.contains('?') && !text.contains("::"), "{text}");
    }

    #[test]
    fn locate_finds_nested_keys_and_list_items() {
        assert_eq!(locate(YAML, "window.size_ms"), Some((10, 3)));
        assert_eq!(locate(YAML, "source.mqtt.host"), Some((4, 5)));
        assert_eq!(locate(YAML, "source.subscriptions[1].topic"), Some((8, 7)));
        assert_eq!(
            locate(YAML, "source.subscriptions[0].payload"),
            Some((7, 7))
        );
        assert_eq!(locate(YAML, "nothing.here"), None);
    }

    #[test]
    fn validation_problems_carry_file_key_and_line() {
        let e =
            parse::<edgewatch_agent::AgentConfig>(YAML, Path::new("configs/x.yaml")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(
                "configs/x.yaml: window.size_ms (line 10, col 3): window size must be > 0, got 0"
            ),
            "{text}"
        );
    }

    #[test]
    fn unknown_fields_name_the_key_path_line_and_column() {
        let e = parse::<edgewatch_agent::AgentConfig>(
            "id: a\nwindow:\n  sise_ms: 5\n",
            Path::new("f.yaml"),
        )
        .unwrap_err();
        let p = &e.problems[0];
        assert_eq!(p.key, "window.sise_ms");
        assert_eq!(p.location, Some((3, 3)));
        assert!(
            p.message.contains("unknown field `sise_ms`"),
            "{}",
            p.message
        );
    }

    #[test]
    fn wrong_types_and_syntax_errors_are_located() {
        let e = parse::<edgewatch_agent::AgentConfig>(
            "id: a\nwindow:\n  size_ms: ten\n",
            Path::new("f.yaml"),
        )
        .unwrap_err();
        assert_eq!(e.problems[0].key, "window.size_ms");
        assert_eq!(e.problems[0].location.map(|l| l.0), Some(3));
        let e = parse::<edgewatch_agent::AgentConfig>("id: [a\n", Path::new("f.yaml")).unwrap_err();
        assert!(e.problems[0].location.is_some(), "{e}");
    }

    #[test]
    fn issue_13_a_100k_bracket_file_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("brackets.yaml");
        std::fs::write(&path, "[".repeat(100_000)).unwrap();
        let started = std::time::Instant::now();
        let e = load::<edgewatch_agent::AgentConfig>(&path).unwrap_err();
        println!("100k-bracket file refused in {:?}", started.elapsed());
        assert_eq!(e.problems.len(), 1);
        assert_eq!(e.problems[0].location, Some((1, 65)));
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "{} (line 1, col 65): nested deeper than 64 levels",
                path.display()
            )),
            "{text}"
        );
    }

    #[test]
    #[cfg(feature = "cloud")]
    fn every_config_kind_is_refused_past_the_nesting_limit() {
        let deep = format!("id: a\nx: {}\n", "{a: ".repeat(80));
        let file = Path::new("deep.yaml");
        let errors = [
            parse::<edgewatch_agent::AgentConfig>(&deep, file).unwrap_err(),
            parse::<edgewatch_aggregator::AggregatorConfig>(&deep, file).unwrap_err(),
            parse::<edgewatch_simulators::SimulatorConfig>(&deep, file).unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e.problems[0].location, Some((2, 4 + 4 * 63)), "{e}");
            assert!(e.problems[0].message.contains("deeper than 64"), "{e}");
        }
    }

    #[test]
    fn a_file_over_one_mib_is_refused_naming_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        let mut text = String::from("id: a\n");
        while text.len() <= 1024 * 1024 {
            text.push_str("# padding padding padding padding padding padding padding padding\n");
        }
        std::fs::write(&path, &text).unwrap();
        let e = load::<edgewatch_agent::AgentConfig>(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: file of {} bytes is larger than the limit of 1048576 bytes for a configuration file",
                path.display(),
                text.len()
            )
        );
        let e = parse::<edgewatch_agent::AgentConfig>(&text, &path).unwrap_err();
        assert!(e.to_string().contains("larger than the limit"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_utf8_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.yaml");
        std::fs::write(&path, b"id: caf\xe9\n").unwrap();
        let e = load::<edgewatch_agent::AgentConfig>(&path).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot read the file: not UTF-8 text"),
            "{e}"
        );
    }

    #[test]
    #[cfg(feature = "cloud")]
    fn aggregator_cluster_problems_are_located_in_the_file() {
        let yaml = "id: a\ncluster:\n  type: nats\n  servers:\n    - nats://n1:4222\n    - n2:4222\n  heartbeat_ms: 9000\n";
        let e = parse::<edgewatch_aggregator::AggregatorConfig>(yaml, Path::new("agg.yaml"))
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(
                "agg.yaml: cluster.servers[1] (line 6, col 5): expected nats://host:port"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "agg.yaml: cluster.heartbeat_ms (line 7, col 3): must be > 0 and at most"
            ),
            "{text}"
        );
        let e = parse::<edgewatch_aggregator::AggregatorConfig>(
            "id: a\ncluster:\n  type: nats\n  servers: []\n  lease_ttl: 5\n",
            Path::new("agg.yaml"),
        )
        .unwrap_err();
        assert_eq!(e.problems[0].key, "cluster.lease_ttl");
    }
}
