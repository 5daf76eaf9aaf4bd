//! Inputs for the fuzz targets: a seeded random source, structured generators (JSON trees with
//! non-JSON number literals, huge and tiny numbers, deep nesting, long strings, invalid UTF-8, odd
//! names and timestamps) and byte mutations (bit flips, insertions, deletions, splices, truncation,
//! repeated chunks), plus a bounded corpus of inputs worth mutating again.
//!
//! What each target builds from these lives with the target; nothing here knows edgewatch's types.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Inputs grow by mutation (repeated chunks, splices); past this they are cut back.
const MAX_INPUT_BYTES: usize = 256 * 1024;

/// Number literals a sensor or a peer might send, valid JSON or not.
pub const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "21.5",
    "0.1",
    "3000",
    "1e308",
    "-1e308",
    "1.7976931348623157e308",
    "1.3e154",
    "-1.3e154",
    "1.35e154",
    "1e309",
    "-1e309",
    "1e-400",
    "5e-324",
    "NaN",
    "Infinity",
    "-Infinity",
    "nan",
    "inf",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "123456789012345678901234567890",
    "1e99999999999",
    "0x10",
    "007",
    "+1",
    ".5",
    "1.",
    "-",
    "1e",
    "1E+2",
    "2e-2",
    "4294967295",
    "4294967296",
];

/// Timestamps in every unit, and far outside [1970, 2200).
pub const TIMESTAMPS: &[&str] = &[
    "1700000000000",
    "1700000000",
    "1700000000.5",
    "1700000000000000",
    "1700000000000000000",
    "9223372036854775807",
    "9.3e18",
    "7258118400000",
    "7258118399999",
    "7258118399999.9",
    "-1",
    "-0.5",
    "0",
    "1e300",
    "-1e300",
    "253402300800000",
    "1e-300",
    "-9223372036854775808",
];

/// Field names the payload mappings and wire types look for, and some they do not.
pub const KEYS: &[&str] = &[
    "value",
    "ts",
    "v",
    "t",
    "time",
    "temp",
    "rpm",
    "unit",
    "label",
    "agent",
    "partition",
    "records",
    "seq",
    "prev",
    "acked",
    "device",
    "metric",
    "start_ms",
    "end_ms",
    "count",
    "min",
    "max",
    "mean",
    "std",
    "first_ts_ms",
    "last_ts_ms",
    "max_score",
    "revision",
    "id",
    "ts_ms",
    "score",
    "detector",
    "window_start_ms",
    "owner",
    "acks",
    "upto_seq",
    "",
    "é",
    "\\u0000",
];

/// Byte strings that change the meaning of JSON or YAML text when inserted.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b": ",
    b"\"",
    b"'",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"-",
    b"NaN",
    b"1e308",
    b"1.3e154",
    b"9.3e18",
    b"null",
    b"true",
    b"\xff",
    b"\xc3",
    b"\0",
    b"\n",
    b"\r",
    b"\t",
    b"#",
    b"- ",
    b"? ",
    b"|",
    b"&a ",
    b"*a",
    b"!!str ",
    b"\xe2\x80\xa8",
    b"\xc2\x85",
];

/// A deterministic random source with the helpers the generators share.
pub struct Gen {
    rng: SmallRng,
}

impl Gen {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.gen_range(0..n)
    }

    /// True `num` times in `den`.
    pub fn chance(&mut self, num: u32, den: u32) -> bool {
        self.rng.gen_ratio(num, den)
    }

    /// Any u64.
    pub fn u64(&mut self) -> u64 {
        self.rng.gen()
    }

    /// One element of `xs` (non-empty).
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// A number literal: mostly ordinary values, often the edge cases of [`NUMBERS`].
    pub fn number(&mut self) -> String {
        match self.below(6) {
            0 | 1 => self.pick(NUMBERS).to_string(),
            2 => self.pick(TIMESTAMPS).to_string(),
            3 => format!("{}", self.rng.gen_range(-1000..1000)),
            4 => format!("{:e}", f64::from_bits(self.u64())),
            _ => format!("{:.3}", self.rng.gen_range(-50.0..150.0)),
        }
    }

    /// A device, metric or agent name: usually plain, sometimes empty, at or past the length limits
    /// (256 bytes for devices, 128 for metrics, 64 for agents), with `/`, wildcards, NUL, invisible
    /// characters or invalid UTF-8.
    pub fn name(&mut self) -> Vec<u8> {
        match self.below(14) {
            0 => Vec::new(),
            1 => vec![b'd'; self.pick(&[64, 65, 128, 129, 256, 257, 4096])],
            2 => "温度-センサー".into(),
            3 => b"a/b".to_vec(),
            4 => self
                .pick::<&[u8]>(&[b"+", b"#", b"\0", b"\xff\xfe", b"\xe2\x80\x8b", b" "])
                .to_vec(),
            5 => {
                let len = self.below(12);
                (0..len).map(|_| self.rng.gen()).collect()
            }
            _ => {
                let base = self.pick(&["d1", "pump-7", "temp", "rpm", "gw-1", "sensor_3", "x"]);
                format!("{base}{}", self.below(40)).into_bytes()
            }
        }
    }

    /// The inside of a JSON string (without quotes): escapes, lone surrogates, control characters,
    /// raw invalid UTF-8, or something long.
    pub fn string_body(&mut self, out: &mut Vec<u8>) {
        match self.below(10) {
            0 => out.extend(std::iter::repeat_n(b'x', self.below(20_000))),
            1 => out.extend_from_slice(self.pick(&[
                &b"\\u0000"[..],
                b"\\ud800",
                b"\\udbff\\udfff",
                b"\\\"",
                b"\\n\\t",
                b"\x01",
                b"\xff",
                b"\xed\xa0\x80",
                "é😀".as_bytes(),
            ])),
            2 => out.extend_from_slice(self.pick(KEYS).as_bytes()),
            _ => {
                let name = self.name();
                out.extend(name.into_iter().filter(|&b| b != b'"' && b != b'\\'));
            }
        }
    }

    /// A random JSON(-like) value at most `depth` levels deep.
    pub fn json(&mut self, depth: usize, out: &mut Vec<u8>) {
        let kind = if depth == 0 {
            self.below(5)
        } else {
            self.below(8)
        };
        match kind {
            0 => out.extend_from_slice(self.pick(&[&b"null"[..], b"true", b"false"])),
            1 | 2 => out.extend_from_slice(self.number().as_bytes()),
            3 | 4 => {
                out.push(b'"');
                self.string_body(out);
                out.push(b'"');
            }
            5 => {
                out.push(b'[');
                for i in 0..self.below(5) {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.json(depth - 1, out);
                }
                out.push(b']');
            }
            _ => {
                out.push(b'{');
                for i in 0..self.below(6) {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.key(out);
                    self.json(depth - 1, out);
                }
                out.push(b'}');
            }
        }
    }

    /// `"key":` with a key from [`KEYS`] or a generated one.
    pub fn key(&mut self, out: &mut Vec<u8>) {
        out.push(b'"');
        if self.chance(3, 4) {
            out.extend_from_slice(self.pick(KEYS).as_bytes());
        } else {
            self.string_body(out);
        }
        out.extend_from_slice(b"\":");
    }

    /// Deeply nested arrays or objects, closed or not: the parser's recursion limits.
    pub fn deep(&mut self, out: &mut Vec<u8>) {
        let levels = self.pick(&[64, 127, 128, 129, 1000, 20_000]);
        let object = self.chance(1, 2);
        for _ in 0..levels {
            out.extend_from_slice(if object { b"{\"value\":" } else { b"[" });
        }
        out.extend_from_slice(b"1");
        if self.chance(1, 2) {
            for _ in 0..levels {
                out.push(if object { b'}' } else { b']' });
            }
        }
    }

    /// Applies one to four mutations to `buf`; `other` is the second input of a splice.
    pub fn mutate(&mut self, buf: &mut Vec<u8>, other: &[u8]) {
        for _ in 0..1 + self.below(4) {
            let len = buf.len();
            match self.below(9) {
                0 if len > 0 => {
                    let i = self.below(len);
                    buf[i] ^= 1 << self.below(8);
                }
                1 => {
                    let at = self.below(len + 1);
                    let b = if self.chance(1, 2) {
                        self.rng.gen()
                    } else {
                        self.pick(b"{}[]\",:-.0123456789eE+ \\'#\n")
                    };
                    buf.insert(at, b);
                }
                2 if len > 0 => {
                    let at = self.below(len);
                    let n = 1 + self.below((len - at).min(16));
                    buf.drain(at..at + n);
                }
                3 => {
                    let cut = self.below(len + 1);
                    let from = self.below(other.len() + 1);
                    buf.truncate(cut);
                    buf.extend_from_slice(&other[from..]);
                }
                4 => {
                    let cut = self.below(len + 1);
                    buf.truncate(cut);
                }
                5 if len > 0 => {
                    let a = self.below(len);
                    let b = a + 1 + self.below((len - a).min(64));
                    let chunk = buf[a..b].to_vec();
                    let times = self.pick(&[1, 2, 7, 64, 1000]);
                    let at = self.below(buf.len() + 1);
                    let tail = buf.split_off(at);
                    for _ in 0..times {
                        buf.extend_from_slice(&chunk);
                    }
                    buf.extend_from_slice(&tail);
                }
                6 => {
                    let at = self.below(len + 1);
                    let token = self.pick(TOKENS);
                    buf.splice(at..at, token.iter().copied());
                }
                7 if len > 0 => {
                    // Replace a number-looking byte with another: keeps the structure, moves values.
                    let i = self.below(len);
                    buf[i] = self.pick(b"0123456789-.eE");
                }
                _ => {
                    let at = self.below(len + 1);
                    let number = self.number();
                    buf.splice(at..at, number.bytes());
                }
            }
        }
        buf.truncate(MAX_INPUT_BYTES);
    }
}

/// Inputs worth mutating: the seeds, then inputs the code under test accepted. Bounded: once full,
/// a newcomer replaces a random entry (never a seed).
pub struct Corpus<T> {
    items: Vec<T>,
    seeds: usize,
    cap: usize,
}

impl<T: Clone> Corpus<T> {
    /// A corpus holding `seeds` and room for `cap` entries in all.
    pub fn new(seeds: Vec<T>, cap: usize) -> Self {
        Self {
            seeds: seeds.len(),
            items: seeds,
            cap,
        }
    }

    /// Keeps `item` (maybe replacing a non-seed entry).
    pub fn add(&mut self, g: &mut Gen, item: T) {
        if self.items.len() < self.cap {
            self.items.push(item);
        } else if self.cap > self.seeds {
            let i = self.seeds + g.below(self.cap - self.seeds);
            self.items[i] = item;
        }
    }

    /// A copy of a random entry (the corpus is never empty: targets seed it).
    pub fn pick(&self, g: &mut Gen) -> T {
        self.items[g.below(self.items.len())].clone()
    }

    /// A copy of a random seed.
    pub fn seed(&self, g: &mut Gen) -> T {
        self.items[g.below(self.seeds.max(1))].clone()
    }
}
