//! Table names: parsing the `{table}` of a request path, and quoting identifiers for SQL.
//!
//! A table is written `name` or `schema.name`. Names are taken exactly as written (no case
//! folding, unlike unquoted SQL). A part may be double-quoted to hold a dot or a quote,
//! with `""` standing for one `"`: `"my.schema"."odd""name"`. Every identifier that reaches
//! SQL goes through [`quote_ident`], so no name can change the statement it is used in.

use std::fmt;

use serde::{Deserialize, Serialize};

/// PostgreSQL's longest identifier in bytes (NAMEDATALEN − 1). Longer names would be
/// truncated silently by the server, so they are refused instead.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// A table, optionally schema-qualified.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableName {
    /// The schema, or `None` to resolve the name through the search path.
    pub schema: Option<String>,
    /// The table name.
    pub name: String,
}

/// Why a table name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table name {input:?}: {reason}")]
pub struct TableNameError {
    input: String,
    reason: &'static str,
}

impl TableName {
    /// Parses `name`, `schema.name`, or either with double-quoted parts.
    ///
    /// # Errors
    /// For an empty part, more than two parts, an unbalanced quote, a NUL character, or a
    /// part longer than [`MAX_IDENTIFIER_BYTES`].
    pub fn parse(input: &str) -> Result<TableName, TableNameError> {
        let err = |reason| TableNameError {
            input: input.to_string(),
            reason,
        };
        let mut parts = Vec::new();
        let mut chars = input.chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err(err("a quoted part is not closed")),
                    }
                }
                if !matches!(chars.peek(), None | Some('.')) {
                    return Err(err("a quoted part must be followed by '.' or the end"));
                }
            } else {
                while let Some(&c) = chars.peek() {
                    match c {
                        '.' => break,
                        '"' => return Err(err("a quote may only open a part")),
                        _ => {
                            part.push(c);
                            chars.next();
                        }
                    }
                }
            }
            if part.is_empty() {
                return Err(err("a part is empty"));
            }
            if part.contains('\0') {
                return Err(err("names cannot hold a NUL character"));
            }
            if part.len() > MAX_IDENTIFIER_BYTES {
                return Err(err("a part is longer than PostgreSQL's 63-byte limit"));
            }
            parts.push(part);
            if chars.next().is_none() {
                break;
            }
        }
        let mut parts = parts.into_iter();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => Ok(TableName { schema: None, name }),
            (Some(schema), Some(name), None) => Ok(TableName {
                schema: Some(schema),
                name,
            }),
            _ => Err(err("use name or schema.name")),
        }
    }

    /// The name quoted for SQL: `"schema"."name"` or `"name"`.
    #[must_use]
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }
}

impl fmt::Display for TableName {
    /// Writes the name as a request path would give it, quoting parts only where needed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn part(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
            if s.contains(['.', '"']) {
                write!(f, "\"{}\"", s.replace('"', "\"\""))
            } else {
                f.write_str(s)
            }
        }
        if let Some(schema) = &self.schema {
            part(f, schema)?;
            f.write_str(".")?;
        }
        part(f, &self.name)
    }
}

/// Quotes an identifier for SQL: wraps it in double quotes and doubles the quotes inside.
/// Used for every table and column name pgspool puts into a statement.
#[must_use]
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: Option<&str>, name: &str) -> TableName {
        TableName {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        }
    }

    #[test]
    fn parses_plain_and_qualified_names_exactly() {
        assert_eq!(TableName::parse("flights"), Ok(t(None, "flights")));
        assert_eq!(
            TableName::parse("Ops.Flights"),
            Ok(t(Some("Ops"), "Flights"))
        );
        assert_eq!(TableName::parse("tâble 1"), Ok(t(None, "tâble 1")));
    }

    #[test]
    fn quoted_parts_hold_dots_and_quotes() {
        assert_eq!(
            TableName::parse(r#""my.schema"."odd""name""#),
            Ok(t(Some("my.schema"), "odd\"name"))
        );
        let name = t(Some("my.schema"), "odd\"name");
        assert_eq!(TableName::parse(&name.to_string()), Ok(name.clone()));
        assert_eq!(name.quoted(), r#""my.schema"."odd""name""#);
    }

    #[test]
    fn refuses_what_postgres_would_change_or_misread() {
        for bad in [
            "",
            ".t",
            "s.",
            "a.b.c",
            "\"open",
            "x\"y",
            "\"a\"b",
            "nul\0",
            &"x".repeat(64),
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(TableName::parse(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn quote_ident_cannot_be_escaped() {
        assert_eq!(
            quote_ident(r#"a"; DROP TABLE t; --"#),
            r#""a""; DROP TABLE t; --""#
        );
    }
}
