//! Bearer-token checks shared by the HTTP endpoints of the agent and the aggregator:
//! `Authorization: Bearer <token>` with the scheme matched case-insensitively (RFC 7235) and a
//! comparison that does not stop at the first differing byte.

/// The credentials in an `Authorization` header value, if its scheme is `Bearer` (any case).
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim_start().split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches([' ', '\t']);
    (!token.is_empty()).then_some(token)
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `Authorization` header value carries `token` (always true when `token` is `None`).
pub fn authorized(header: Option<&str>, token: Option<&str>) -> bool {
    match token {
        None => true,
        Some(t) => header
            .and_then(bearer)
            .is_some_and(|g| constant_time_eq(g.as_bytes(), t.as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER abc"), Some("abc"));
        assert_eq!(
            bearer("BeArEr   abc  "),
            Some("abc"),
            "extra spaces are allowed"
        );
        assert_eq!(bearer("Bearer\tabc"), Some("abc"));
    }

    #[test]
    fn other_schemes_and_empty_credentials_are_not_bearer_tokens() {
        assert_eq!(bearer("Basic YWxhZGRpbjpvcGVu"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
        assert_eq!(bearer(""), None);
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
    }

    #[test]
    fn authorized_needs_the_token_only_when_one_is_configured() {
        assert!(authorized(None, None));
        assert!(!authorized(None, Some("t")));
        assert!(!authorized(Some("Bearer u"), Some("t")));
        assert!(!authorized(Some("Basic t"), Some("t")));
        assert!(authorized(Some("bearer t"), Some("t")));
    }
}
