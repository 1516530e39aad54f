//! The TLS parameters of a connection string, which pgspool reads itself.
//!
//! tokio-postgres parses `sslmode` only as `disable`, `prefer` or `require` and refuses any
//! key it does not know, such as `sslrootcert`. [`split`] takes both out of the string, in
//! either of its forms (a `postgres://` URL's query, or libpq `key=value` pairs with
//! libpq's quoting), and leaves the rest to tokio-postgres.

use percent_encoding::percent_decode_str;

/// The TLS parameters found in a connection string, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// `sslmode`, when given.
    pub sslmode: Option<String>,
    /// `sslrootcert`, when given.
    pub sslrootcert: Option<String>,
}

/// Keys [`split`] takes out of the string.
const KEYS: [&str; 2] = ["sslmode", "sslrootcert"];

/// Splits `url` into the string tokio-postgres parses (without `sslmode` and
/// `sslrootcert`) and those two parameters. A string that does not parse here is returned
/// whole, for tokio-postgres to report what is wrong with it.
#[must_use]
pub fn split(url: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let mut take = |key: &str, value: String| match key {
        "sslmode" => params.sslmode = Some(value),
        _ => params.sslrootcert = Some(value),
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), params);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode_str(key).decode_utf8_lossy();
            if KEYS.contains(&key.as_ref()) {
                take(
                    &key,
                    percent_decode_str(value).decode_utf8_lossy().into_owned(),
                );
            } else {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let Some(pairs) = key_values(url) else {
            return (url.to_string(), params);
        };
        let mut rest = String::new();
        let mut from = 0;
        for (key, value, span) in pairs {
            if KEYS.contains(&key.as_str()) {
                rest.push_str(&url[from..span.start]);
                from = span.end;
                take(&key, value);
            }
        }
        rest.push_str(&url[from..]);
        rest
    };
    (rest, params)
}

/// The `key=value` pairs of a libpq connection string, each with its byte span; `None`
/// when the string is not well formed.
fn key_values(s: &str) -> Option<Vec<(String, String, std::ops::Range<usize>)>> {
    let mut pairs = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_space = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_space(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            return Some(pairs);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        skip_space(&mut chars);
        chars.next_if(|(_, c)| *c == '=')?;
        skip_space(&mut chars);
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                None if quoted => return None,
                None => break s.len(),
                Some((i, '\'')) if quoted => break i + 1,
                Some((i, c)) if !quoted && c.is_whitespace() => break i,
                Some((_, '\\')) => value.push(chars.next()?.1),
                Some((_, c)) => value.push(c),
            }
        };
        if key.is_empty() {
            return None;
        }
        pairs.push((key, value, start..end));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        let (rest, params) = split(
            "postgres://u:p@db.example:5433/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(
            rest,
            "postgres://u:p@db.example:5433/app?application_name=x"
        );
        assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, params) = split("postgresql://h/db?sslmode=require");
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(params.sslmode.as_deref(), Some("require"));
        assert_eq!(split("postgres://h/db").0, "postgres://h/db");
    }

    #[test]
    fn tls_parameters_are_taken_out_of_key_value_pairs() {
        let (rest, params) = split(
            "host=db port=5432 sslmode = verify-ca sslrootcert='/a dir/it\\'s.pem' dbname=app",
        );
        assert_eq!(rest, "host=db port=5432   dbname=app");
        assert_eq!(params.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/a dir/it's.pem"));
        let rest: tokio_postgres::Config = rest.parse().expect("the rest parses");
        assert_eq!(rest.get_dbname(), Some("app"));
        let (rest, params) = split("sslrootcert=/x\\ y.pem");
        assert_eq!(rest, "");
        assert_eq!(params.sslrootcert.as_deref(), Some("/x y.pem"));
    }

    #[test]
    fn malformed_strings_are_left_whole() {
        for s in [
            "host=db sslmode",
            "sslmode='verify-full",
            "=x sslmode=require",
        ] {
            assert_eq!(split(s), (s.to_string(), TlsParams::default()), "{s}");
        }
    }
}
