//! Shell-style name patterns (`*` any run of characters, `/` included, or none; `?` one
//! character), for configured device groups and dataset file selection.

/// Whether `text` matches `pattern` as a whole.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // The latest `*` and the text position it currently stands for the run up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match as glob;

    #[test]
    fn globs_match_like_shell_patterns() {
        assert!(glob("pump-*", "pump-12"));
        assert!(glob("pump-*", "pump-"));
        assert!(!glob("pump-*", "pum-1"));
        assert!(glob("*-north-?", "a-b-north-7"));
        assert!(!glob("*-north-?", "a-b-north-77"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXbYbZc"));
        assert!(!glob("a*b*c", "aXbYbZ"));
        assert!(glob("ü?", "üß"));
        assert!(glob("train*", "train_01.csv"));
        assert!(glob("*/normal/*.csv", "skab/normal/a.csv"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(!glob("x*", "yx"));
    }
}
